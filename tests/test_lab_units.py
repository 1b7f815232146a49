"""Lab pieces that need no kernel: config rendering, credentials, parsers, the RPC wire."""
import socket
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from ipsecchan.lab import pki, rpc, swan
from ipsecchan.lab.agent import Agent
from ipsecchan.lab.xfrmstate import parse_xfrm_states

IP_S_XFRM_STATE = """\
src 10.0.0.1 dst 10.0.0.2
\tproto esp spi 0xc4c55082(3301265538) reqid 1(0x00000001) mode transport
\treplay-window 0 seq 0x00000000 flag  (0x00000000)
\taead rfc4106(gcm(aes)) 0x8aa9 (288 bits) 128
\tanti-replay context: seq 0x0, oseq 0x0, bitmap 0x00000000
\tsel src 10.0.0.1/32 dst 10.0.0.2/32 uid 0
\tlifetime config:
\t  limit: soft (INF)(bytes), hard (INF)(bytes)
\t  limit: soft (INF)(packets), hard (INF)(packets)
\t  expire add: soft 3570(sec), hard 3960(sec)
\t  expire use: soft 0(sec), hard 0(sec)
\tlifetime current:
\t  20958(bytes), 25(packets)
\t  add 2026-11-27 11:01:56 use -
\tstats:
\t  replay-window 0 replay 0 failed 0
src fd00::2 dst fd00::1
\tproto esp spi 0x00001002(4098) reqid 1000(0x000003e8) mode transport
\tlifetime current:
\t  0(bytes), 0(packets)
"""


def test_parse_ip_xfrm_state():
    a, b = parse_xfrm_states(IP_S_XFRM_STATE)
    assert (a.src, a.dst, a.proto, a.spi, a.reqid, a.mode) == \
        ("10.0.0.1", "10.0.0.2", "esp", 0xC4C55082, 1, "transport")
    assert (a.bytes, a.packets) == (20958, 25)
    assert (b.src, b.spi, b.reqid, b.packets) == ("fd00::2", 0x1002, 1000, 0)
    assert parse_xfrm_states("") == []


def test_parse_ip_xfrm_state_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="cannot read this SA"):
        parse_xfrm_states("src 10.0.0.1 dst 10.0.0.2\n\tproto esp spi 0x1 reqid 1 mode tunnel\n")


def test_settings_text_quotes_and_nests():
    text = swan.settings_text({"conn": {"id": "CN=alice", "addrs": ["fd00::1", "10.0.0.1"],
                                        "mobike": False, "skip": None}})
    assert text == ('conn {\n    id = "CN=alice"\n    addrs = fd00::1, 10.0.0.1\n'
                    '    mobike = no\n}\n')
    with pytest.raises(ValueError, match="cannot write"):
        swan.settings_text({"id": 'x" }\ninjected {'})
    with pytest.raises(ValueError, match="bad strongSwan setting name"):
        swan.settings_text({"a b": 1})


def test_strongswan_conf_lists_plugins_explicitly():
    text = swan.strongswan_conf("/run/x/charon.vici", "/run/x/charon.log")
    assert "load = " in text and "resolve" not in text and "kernel-netlink" in text
    assert "unix:///run/x/charon.vici" in text


def test_auth_sections():
    assert swan.auth_section("cert", "CN=a", "a.crt") == {"auth": "pubkey", "id": "CN=a",
                                                          "certs": "a.crt"}
    assert swan.auth_section("rpk", "a.lab", "a.pub")["pubkeys"] == "a.pub"
    assert swan.auth_section("psk", "a.lab", None) == {"auth": "psk", "id": "a.lab"}
    with pytest.raises(ValueError, match="unknown auth"):
        swan.auth_section("eap", "a", None)


def test_identity_is_a_self_signed_ed25519_certificate():
    ident = pki.make_identity("alice")
    cert = ident.cert
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["alice.lab"]
    cert.verify_directly_issued_by(cert)
    assert ident.public_key_der() == cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert (ident.dn, ident.fqdn) == ("CN=alice", "alice.lab")
    assert pki.make_identity("alice").key_pem != ident.key_pem     # fresh keys each time
    assert len(pki.make_psk()) == 32 and pki.make_psk() != pki.make_psk()


def test_rpc_round_trip_with_a_real_agent(tmp_path):
    """Controller and agent over a socket pair: concurrent calls, bytes, remote errors."""
    ours, theirs = socket.socketpair()
    agent = Agent(str(tmp_path))
    server = threading.Thread(target=rpc.serve, daemon=True, args=(
        theirs.makefile("rb", buffering=0), theirs.makefile("wb", buffering=0),
        agent.handlers()))
    server.start()
    client = rpc.Client(ours.makefile("rb", buffering=0), ours.makefile("wb", buffering=0))
    assert client.wait_ready(5)["state_dir"] == str(tmp_path)
    slow = agent.op_spawn(["sleep", "30"])
    blob = bytes(range(256))
    assert client.call("write_file", path="x/blob", data=blob).endswith("x/blob")
    assert client.call("read_file", path="x/blob") == blob
    r = client.call("run", argv=["sh", "-c", "printf 'a\\377'; echo err >&2; exit 3"])
    assert (r["rc"], r["stdout"], r["stderr"]) == (3, b"a\xff", b"err\n")
    with pytest.raises(rpc.RemoteError, match="outside the lab's state folder"):
        client.call("read_file", path="../../etc/passwd")
    with pytest.raises(rpc.RemoteError, match="unknown lab operation"):
        client.call("no_such_op")
    client.call("signal", handle=slow, sig=9)
    assert client.call("wait", handle=slow, timeout=5)["rc"] == -9
    # A request longer than the lab console takes whole is refused here, with the reason
    # (on the console its tail would be lost, and the call never answered).
    with pytest.raises(ValueError, match="through a file"):
        client.call("write_file", path="x/big", data=bytes(4000))
    # A damaged line (bytes lost on the way) does not end the agent.
    ours.sendall(b'{"id": 999, "op": "ping", "ar\n{"id": 998\n')
    assert client.call("ping", rpc_timeout=5)
    client.call("shutdown")
    server.join(5)
    ours.close()
    theirs.close()
    with pytest.raises(rpc.ChannelClosed):
        client.call("ping", rpc_timeout=5)

"""GSS-API with real MIT Kerberos over a lab IPsec channel, bound to it by channel bindings
(examples/gssapi_echo.py). The KDC runs on a host of its own and is reached in clear; the
service runs on bob and the client on alice, over an IKEv2 CHILD_SA between the two.

The first two tests hand both ends the bindings with --cb-hex, to show what MIT's acceptor
does with equal, different and missing bindings. The last runs the example as written: each
end takes the "ipsec-endpoint" binding of its own latched connection (ipsecchan.socket), and
authentication succeeds on the real channel and fails through a man in the middle who relays
it over IPsec channels of his own."""
import json
import pathlib
import secrets

import pytest

from ipsecchan.lab.kerberos import Kdc

pytest.importorskip("gssapi", reason="python-gssapi (the test extras) is not installed")

EXAMPLES = str(pathlib.Path(__file__).resolve().parents[1] / "examples")
EXAMPLE = f"{EXAMPLES}/gssapi_echo.py"
SERVICE = "echo/bob.lab@LAB.TEST"

# A client that sends its message right behind its first token: without mutual authentication
# its context is complete at once, so nothing but the server's own check stands between the
# message and the application. argv: examples folder, address, port, service, bindings (hex,
# or "" for none).
EAGER_CLIENT = r"""
import json, socket, sys
sys.path.insert(0, sys.argv[1])
import gssapi, gssapi.raw as gss
from gssapi_echo import TOKEN, WRAPPED, bindings, connect, recv_frame, send_frame
addr, port, service, cb_hex = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
res = gss.init_sec_context(
    gssapi.Name(service, gssapi.NameType.kerberos_principal), mech=gssapi.MechType.kerberos,
    flags=gssapi.RequirementFlag.integrity | gssapi.RequirementFlag.confidentiality,
    channel_bindings=bindings(bytes.fromhex(cb_hex)) if cb_hex else None)
assert not res.more_steps
sec = gssapi.SecurityContext(base=res.context)
with connect(socket, addr, port) as s:
    send_frame(s, TOKEN, res.token)
    send_frame(s, WRAPPED, sec.wrap(b"sent before any answer", True).message)
    try:
        kind, body = recv_frame(s)
    except Exception as exc:           # a reset: the server closed with the message unread
        print(json.dumps({"kind": None, "error": str(exc)}))
    else:
        text = sec.unwrap(body).message if kind == WRAPPED else body
        print(json.dumps({"kind": kind.decode(), "body": text.decode()}))
"""


@pytest.fixture
def realm(lab):
    for name in ("alice", "bob", "kdc"):
        lab.add_host(name)
    lab.ike("alice", "bob")
    kdc = Kdc.start(lab, "kdc")
    kdc.kinit("alice", "alice", kdc.add_user("alice"))
    kdc.add_service(SERVICE, "bob")
    return kdc


def serve(lab, kdc, port, cb_hex):
    """The example's server on bob, for one client, bound to cb_hex."""
    return lab.spawn("bob", [lab.kernel.python, EXAMPLE, "serve", lab.host("bob").addr(4),
                             str(port), "--once", "--cb-hex", cb_hex], env=kdc.env("bob"))


def outcome(res):
    """The last JSON line a run printed (the example prints one per connection)."""
    lines = res.text.strip().splitlines()
    assert lines, f"no output (exit status {res.rc}): {res.stderr.decode(errors='replace')}"
    return json.loads(lines[-1])


def esp_packets(lab, host):
    return {s.spi: s.packets for s in lab.xfrm_states(host) if s.proto == "esp"}


def test_kerberos_with_equal_bindings_over_ipsec(lab, realm):
    kdc, bob = realm, lab.host("bob").addr(4)
    cb = secrets.token_bytes(32).hex()
    before = esp_packets(lab, "bob")
    server = serve(lab, kdc, 6001, cb)
    cli = lab.run("alice", [lab.kernel.python, EXAMPLE, "client", bob, "6001", "--cb-hex", cb,
                            "--message", "one wrapped message"], env=kdc.env("alice"))
    srv = server.wait(30)
    assert (cli.rc, srv.rc) == (0, 0), (cli, srv, kdc.log())

    c, s = outcome(cli), outcome(srv)
    assert c["ok"] and c["client"] == "alice@LAB.TEST" and c["service"] == SERVICE
    assert c["echo"] == c["sent"] == "one wrapped message" and c["encrypted"] is True
    assert s["ok"] and s["client"] == "alice@LAB.TEST" and s["peer"] == lab.host("alice").addr(4)
    assert s["channel_bound"] is True and s["message"] == "one wrapped message"
    assert s["cb_sha256"] == c["cb_sha256"]

    # The real KDC issued alice's service ticket, asked from alice's address.
    issued = [line for line in kdc.log().splitlines() if "TGS_REQ" in line
              and "ISSUE" in line and f"alice@LAB.TEST for {SERVICE}" in line]
    assert issued and lab.host("alice").addr(4) in issued[-1], kdc.log()
    # The exchange ran inside the CHILD_SA, both ways; the KDC has no SA (reached in clear).
    after = esp_packets(lab, "bob")
    assert set(after) == set(before) and len(after) == 2
    assert all(after[spi] >= before[spi] + 4 for spi in after), (before, after)
    assert lab.xfrm_states("kdc") == []


def test_kerberos_refuses_other_or_missing_bindings(lab, realm):
    kdc, bob = realm, lab.host("bob").addr(4)
    cb, other = secrets.token_bytes(32).hex(), secrets.token_bytes(32).hex()

    # Another channel's bindings: the acceptor fails with GSS_S_BAD_BINDINGS.
    server = serve(lab, kdc, 6002, cb)
    cli = lab.run("alice", [lab.kernel.python, EXAMPLE, "client", bob, "6002", "--cb-hex", other],
                  env=kdc.env("alice"))
    srv = server.wait(30)
    assert (cli.rc, srv.rc) == (1, 1), (cli, srv)
    c, s = outcome(cli), outcome(srv)
    assert s["stage"] == "accept" and s["error"].startswith("BadChannelBindingsError"), s
    assert "message" not in s and "client" not in s
    assert c["stage"] == "auth" and "BadChannelBindingsError" in c["error"] and "echo" not in c

    def eager(port, cb_hex):
        server = serve(lab, kdc, port, cb)
        r = lab.python("alice", EAGER_CLIENT, EXAMPLES, bob, str(port), SERVICE, cb_hex,
                       env=kdc.env("alice"), check=True)
        return outcome(r), server.wait(30)

    # The eager client itself works: with the channel's bindings its message is echoed.
    c, srv = eager(6003, cb)
    assert srv.rc == 0 and outcome(srv)["message"] == "sent before any answer", srv
    assert c == {"kind": "W", "body": "sent before any answer"}

    # No bindings at all: MIT's acceptor completes the context anyway (it knows alice) and only
    # leaves GSS_C_CHANNEL_BOUND_FLAG unset; the server refuses on that, message unread.
    c, srv = eager(6004, "")
    s = outcome(srv)
    assert srv.rc == 1 and s["stage"] == "bindings", s
    assert s["client"] == "alice@LAB.TEST" and s["channel_bound"] is False
    assert "message" not in s
    assert c == {"kind": "E", "body": s["error"]} or c["kind"] is None, c


def test_kerberos_bound_to_the_real_channel_and_refused_through_a_relay(lab):
    for name in ("alice", "bob", "kdc", "mallory"):
        lab.add_host(name)
    lab.ike("alice", "bob")
    lab.ike("alice", "mallory")
    lab.ike("mallory", "bob")
    kdc = Kdc.start(lab, "kdc")
    kdc.kinit("alice", "alice", kdc.add_user("alice"))
    kdc.add_service(SERVICE, "bob")
    bob, mallory = lab.host("bob").addr(4), lab.host("mallory").addr(4)
    py = lab.kernel.python

    def env(host):
        return {**kdc.env(host), "IPSECCHAN_VICI": lab.vici_socket(host)}

    def run(port, via):
        server = lab.spawn("bob", [py, EXAMPLE, "serve", bob, str(port), "--once"],
                           env=env("bob"))
        relay = None
        target = bob
        if via:
            relay = lab.spawn("mallory", [py, "-m", "ipsecchan.lab.relay", mallory, str(port),
                                          bob, str(port)], env=env("mallory"))
            target = mallory
        for _ in range(100):
            if all(f":{port} " in lab.run(h, ["ss", "-ltn"]).text
                   for h in (["bob"] + (["mallory"] if via else []))):
                break
            lab.run("bob", ["sleep", "0.1"])
        cli = lab.run("alice", [py, EXAMPLE, "client", target, str(port), "--message",
                                "bound to IPsec"], env=env("alice"), timeout=60)
        srv = server.wait(30)
        if relay is not None:
            relay.wait(30)
        return cli, srv

    cli, srv = run(6010, via=False)
    c, s = outcome(cli), outcome(srv)
    assert (cli.rc, srv.rc) == (0, 0), (cli, srv)
    assert s["channel_bound"] is True and s["message"] == c["echo"] == "bound to IPsec"
    assert s["cb_sha256"] == c["cb_sha256"]

    # mallory relays alice's connection to bob: both of its legs are protected IPsec channels,
    # but alice's binding names alice's and mallory's keys, bob's names mallory's and bob's.
    cli, srv = run(6011, via=True)
    c, s = outcome(cli), outcome(srv)
    assert srv.rc == 1 and s["stage"] == "accept", s
    assert s["error"].startswith("BadChannelBindingsError") and "message" not in s
    assert cli.rc == 1 and "echo" not in c

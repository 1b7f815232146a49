"""XFRM netlink: decoding, and dumps checked against the real kernel (iproute2's view)."""
import json
import struct

import pytest
from hypothesis import given, strategies as st

from ipsecchan._native import ffi
from ipsecchan.xfrm import XfrmDecodeError, decode_policy, decode_sa

SA_SIZE = ffi.sizeof("struct xfrm_usersa_info")
POL_SIZE = ffi.sizeof("struct xfrm_userpolicy_info")

DUMP = r"""
import dataclasses, json, sys
from ipsecchan.xfrm import dump_sas, dump_policies
print(json.dumps({"sas": [dataclasses.asdict(s) for s in dump_sas()],
                  "policies": [dataclasses.asdict(p) for p in dump_policies()]}))
"""


def kernel_view(lab, host):
    return json.loads(lab.python(host, DUMP, check=True).text)


@pytest.mark.parametrize("family", [4, 6])
def test_sad_and_spd_dumps_match_the_kernel(lab, family):
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob", family=family)
    lab.tcp_exchange("alice", "bob", family=family, count=5)
    ours = kernel_view(lab, "alice")
    oracle = lab.xfrm_states("alice")
    fields = ("src", "dst", "proto", "spi", "reqid", "mode", "bytes", "packets")
    assert sorted(tuple(s[f] for f in fields) for s in ours["sas"]) == \
        sorted(tuple(getattr(o, f) for f in fields) for o in oracle)
    child = lab.child_sas("alice", link.conn)[0]
    assert {s["spi"] for s in ours["sas"]} == {int(child["spi-in"], 16),
                                                int(child["spi-out"], 16)}
    for sa in ours["sas"]:
        # strongSwan's aes256gcm16: 256-bit key + 32-bit salt, 128-bit ICV; no key kept.
        assert sa["algorithms"] == [{"kind": "aead", "name": "rfc4106(gcm(aes))",
                                     "key_bits": 288, "icv_bits": 128}]
        assert sa["packets"] >= 5 and sa["encap"] is None
    me, peer = lab.host("alice").addr(family), lab.host("bob").addr(family)
    plen = 32 if family == 4 else 128
    # charon exempts its own IKE sockets with template-less per-socket policies.
    ike_bypass = [p for p in ours["policies"] if p["dir"].endswith("-socket")]
    assert ike_bypass and all(p["templates"] == [] and p["action"] == "allow"
                              for p in ike_bypass)
    main_spd = [p for p in ours["policies"] if not p["dir"].endswith("-socket")]
    by_dir = {p["dir"]: p for p in main_spd}
    assert sorted(p["dir"] for p in main_spd) == ["in", "out"]     # transport: no fwd
    out = by_dir["out"]
    assert (out["selector"]["src"], out["selector"]["dst"]) == (me, peer)
    assert out["selector"]["prefixlen_s"] == out["selector"]["prefixlen_d"] == plen
    reqid = ours["sas"][0]["reqid"]
    for p in by_dir.values():
        assert p["action"] == "allow"
        assert [(t["proto"], t["mode"], t["reqid"]) for t in p["templates"]] == \
            [("esp", "transport", reqid)]


def test_static_sas_in_the_dump(lab):
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.static_sa("alice", "bob")
    sas = {s["spi"]: s for s in kernel_view(lab, "bob")["sas"]}
    assert set(sas) == {link.spi_ab, link.spi_ba}
    assert sas[link.spi_ab]["src"] == "10.0.0.1" and sas[link.spi_ab]["reqid"] == link.reqid
    assert sas[link.spi_ab]["algorithms"][0]["key_bits"] == 160   # 128-bit key + salt


SOCKET_POLICY = r"""
import dataclasses, json, socket
from ipsecchan.xfrm import Template, clear_socket_policies, dump_policies, set_socket_policy
s = socket.socket(socket.AF_INET6 if FAMILY == 6 else socket.AF_INET)
fam = s.family
t = Template(fam, LOCAL, PEER, "esp", 0x1234, 77, "transport", False)
set_socket_policy(s, "out", [t], priority=5)
set_socket_policy(s, "in", action="block")
with_policy = [dataclasses.asdict(p) for p in dump_policies() if p.per_socket]
clear_socket_policies(s)
after = [dataclasses.asdict(p) for p in dump_policies() if p.per_socket]
print(json.dumps({"with": with_policy, "after": after}))
"""


@pytest.mark.parametrize("family", [4, 6])
def test_per_socket_policies_set_dump_and_clear(lab, family):
    h = lab.add_host("alice")
    code = (SOCKET_POLICY.replace("FAMILY", str(family))
            .replace("LOCAL", repr(h.addr(family))).replace("PEER", repr("fd00::9" if family == 6
                                                                          else "10.0.0.9")))
    got = json.loads(lab.python("alice", code, check=True).text)
    by_dir = {p["dir"]: p for p in got["with"]}
    assert set(by_dir) == {"out-socket", "in-socket"}
    assert by_dir["in-socket"]["action"] == "block"
    out = by_dir["out-socket"]
    assert out["priority"] == 5 and out["action"] == "allow"
    (t,) = out["templates"]
    assert (t["spi"], t["reqid"], t["proto"], t["mode"]) == (0x1234, 77, "esp", "transport")
    assert t["src"] == h.addr(family)
    assert got["after"] == []


def test_truncated_messages_are_clear_errors():
    with pytest.raises(XfrmDecodeError, match="needs 224 bytes"):
        decode_sa(bytes(100))
    with pytest.raises(XfrmDecodeError, match="needs 168 bytes"):
        decode_policy(bytes(10))
    bad_attr = struct.pack("=HH", 80, 18) + bytes(8)       # XFRMA_ALG_AEAD, length too long
    with pytest.raises(XfrmDecodeError, match="past the end"):
        decode_sa(bytes(SA_SIZE) + bad_attr)
    short_aead = struct.pack("=HH", 12, 18) + bytes(8)     # too short for xfrm_algo_aead
    with pytest.raises(XfrmDecodeError, match="xfrm_algo_aead needs"):
        decode_sa(bytes(SA_SIZE) + short_aead)
    tmpl = struct.pack("=HH", 4 + 10, 5) + bytes(10) + bytes(2)   # 10 bytes of template
    with pytest.raises(XfrmDecodeError, match="whole number"):
        decode_policy(bytes(POL_SIZE) + tmpl)


@given(st.binary(max_size=400), st.sampled_from([decode_sa, decode_policy]))
def test_garbage_decodes_or_fails_cleanly(data, decode):
    try:
        decode(data)
    except XfrmDecodeError:
        pass


_ADDRS4 = st.sampled_from(["", "10.0.0.1", "192.0.2.255", "0.0.0.0"])
_ADDRS6 = st.sampled_from(["", "fd00::1", "2001:db8::ffff:1", "::"])


@given(v6=st.booleans(), data=st.data())
def test_socket_policy_templates_pack_as_the_c_struct(v6, data):
    # The per-socket policy's templates are packed by struct (the latching hot path); the
    # policy encoder builds them field by field through cffi. Both must give the same bytes.
    from ipsecchan.xfrm import Template
    from ipsecchan.xfrm.encode import _tmpl
    from ipsecchan.xfrm.netlink_xfrm import _template_bytes
    import socket as so
    fam, addrs = (so.AF_INET6, _ADDRS6) if v6 else (so.AF_INET, _ADDRS4)
    t = Template(fam, data.draw(addrs), data.draw(addrs),
                 data.draw(st.sampled_from(["esp", "ah"])),
                 data.draw(st.integers(0, 2**32 - 1)), data.draw(st.integers(0, 2**32 - 1)),
                 data.draw(st.sampled_from(["transport", "tunnel"])), data.draw(st.booleans()))
    assert _template_bytes(t) == _tmpl(t)

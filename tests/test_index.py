"""The C index (ipsecchan.xfrm.index) against the reference model (lookup.ReferenceIndex), and
the encoder (ipsecchan.xfrm.encode) against the decoder. Host only: no kernel needed.

The same random message streams (dumps and notifications: new, update, delete, expire,
flush, for SAs and policies) go to both; random flows, biased to hit the selectors, must get
equal answers, and the two views (sas(), policies()) must stay equal. Malformed input is
rejected by both alike, naming the offset, and leaves the index as it was."""
import dataclasses
import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ipsecchan._native import lib
from ipsecchan.xfrm import encode
from ipsecchan.xfrm.index import Index, IndexFormatError
from ipsecchan.xfrm.lookup import Flow, ReferenceIndex, socket_policy
from ipsecchan.xfrm.messages import (Algorithm, Encap, Lifetime, Policy, SA, Selector,
                                     Template, XfrmEvent, decode_event, decode_policy,
                                     decode_sa)

NOW = int(time.time())
# IPSECCHAN_INDEX_EXAMPLES=20 for a long hunt; the default keeps the file under 30 s.
SCALE = int(os.environ.get("IPSECCHAN_INDEX_EXAMPLES", "1"))
INF = (1 << 64) - 1
V4, V6 = socket.AF_INET, socket.AF_INET6
ADDRS = {V4: ["10.0.0.1", "10.0.0.2", "10.0.1.7", "192.168.0.1", "0.0.0.0"],
         V6: ["fd00::1", "fd00::2", "fd00::1:7", "2001:db8::1", "::"]}
PLENS = {V4: [0, 8, 16, 24, 31, 32, 40], V6: [0, 16, 64, 120, 127, 128]}
PORTS = [0, 22, 443, 1000, 4500]
MASKS = [0, 0xFFFF, 0xFFFF, 0xFF00]
SPIS = [0, 0x100, 0x101, 0x102, 0xC0FFEE]
REQIDS = [0, 1, 2]
MODES = ["transport", "transport", "tunnel", "beet"]
PROTOS = ["esp", "esp", "ah"]
ALGS = [(Algorithm("aead", "rfc4106(gcm(aes))", 288, 128),),
        (Algorithm("crypt", "cbc(aes)", 128), Algorithm("auth_trunc", "hmac(sha256)", 256, 128)),
        (Algorithm("auth", "hmac(sha1)", 160), Algorithm("comp", "deflate", 0)),
        ()]

families = st.sampled_from([V4, V6])
ZERO_SEL = Selector(0, "", "", 0, 0, 0, 0, 0, 0, 0, 0)


@st.composite
def selectors(draw, family=None):
    fam = family or draw(families)
    return Selector(fam, draw(st.sampled_from(ADDRS[fam])), draw(st.sampled_from(ADDRS[fam])),
                    draw(st.sampled_from(PLENS[fam])), draw(st.sampled_from(PLENS[fam])),
                    draw(st.sampled_from([0, 0, 6, 17])), draw(st.sampled_from(PORTS)),
                    draw(st.sampled_from(MASKS)), draw(st.sampled_from(PORTS)),
                    draw(st.sampled_from(MASKS)), draw(st.sampled_from([0, 0, 0, 3])))


lifetimes = st.builds(
    Lifetime, st.sampled_from([INF, INF, 0, 10 ** 6]), st.just(INF),
    st.sampled_from([INF, INF, 5, 10 ** 6]), st.just(INF),
    st.sampled_from([0, 0, 10, 10 ** 8, INF]), st.sampled_from([0, 3600]), st.just(0),
    st.just(0))


@st.composite
def sas(draw):
    fam = draw(families)
    esn = draw(st.booleans())
    replay = draw(st.one_of(st.none(), st.tuples(st.integers(0, 2 ** 32 - 1),
                                                 st.integers(0, 2 ** 32 - 1))))
    if esn and replay is None:
        replay = (0, 0)
    return SA(
        src=draw(st.sampled_from(ADDRS[fam])), dst=draw(st.sampled_from(ADDRS[fam])),
        family=fam, proto=draw(st.sampled_from(PROTOS)), spi=draw(st.sampled_from(SPIS)),
        reqid=draw(st.sampled_from(REQIDS)), mode=draw(st.sampled_from(MODES)),
        flags=draw(st.sampled_from([0, 0, 0, 8, 1])), replay_window=draw(st.integers(0, 255)),
        selector=draw(st.one_of(st.just(ZERO_SEL), st.just(ZERO_SEL), selectors())),
        bytes=draw(st.sampled_from([0, 100, 10 ** 7])),
        packets=draw(st.sampled_from([0, 3, 10 ** 7])),
        add_time=draw(st.sampled_from([0, NOW - 10 ** 5, NOW - 1000, NOW - 1000, NOW - 20])),
        use_time=draw(st.sampled_from([0, NOW - 5])), algorithms=draw(st.sampled_from(ALGS)),
        encap=draw(st.one_of(st.none(), st.just(Encap(2, 4500, 4500, ADDRS[fam][4])))),
        mark=draw(st.sampled_from([None, None, (0, 0), (1, 1), (1, 0xFF), (0, 0xFFFFFFFF)])),
        if_id=draw(st.sampled_from([None, None, 0, 1])), esn=esn,
        sec_ctx=draw(st.sampled_from([None, None, "system_u:object_r:ipsec_spd_t:s0"])),
        lifetime=draw(lifetimes), replay_seq=replay,
        direction=draw(st.sampled_from([None, None, "in", "out"])))


@st.composite
def templates(draw):
    fam = draw(families)
    return Template(fam, draw(st.sampled_from(ADDRS[fam])), draw(st.sampled_from(ADDRS[fam])),
                    draw(st.sampled_from(PROTOS)),
                    draw(st.sampled_from([0, 0, 0] + SPIS[1:])),
                    draw(st.sampled_from(REQIDS)), draw(st.sampled_from(MODES)),
                    draw(st.booleans()))


@st.composite
def policies(draw):
    return Policy(
        dir=draw(st.sampled_from(["in", "out", "out", "in", "fwd", "out-socket"])),
        action=draw(st.sampled_from(["allow", "allow", "allow", "block"])),
        priority=draw(st.sampled_from([0, 1, 100, 100, 200, 2 ** 32 - 1])),
        index=draw(st.integers(1, 14)) * 8 + draw(st.sampled_from([0, 1, 2])),
        selector=draw(selectors()),
        templates=tuple(draw(st.lists(templates(), max_size=3))),
        mark=draw(st.sampled_from([None, None, None, (1, 1), (0, 0xFF)])),
        if_id=draw(st.sampled_from([None, None, None, 1])),
        sec_ctx=draw(st.sampled_from([None, None, "ctx"])))


def _op(draw_sa, draw_pol):
    return st.one_of(
        st.builds(encode.newsa, draw_sa, update=st.booleans()),
        st.builds(encode.newsa, draw_sa, update=st.booleans()),
        st.builds(encode.newsa, draw_sa, update=st.booleans()),
        st.builds(encode.delsa, draw_sa),
        st.builds(encode.expire, draw_sa, hard=st.booleans()),
        st.builds(encode.newpolicy, draw_pol, update=st.booleans()),
        st.builds(encode.newpolicy, draw_pol, update=st.booleans()),
        st.builds(encode.newpolicy, draw_pol, update=st.booleans()),
        st.builds(encode.delpolicy, draw_pol),
        st.builds(encode.polexpire, draw_pol, hard=st.booleans()),
    )


ops = _op(sas(), policies())
rare_flush = st.one_of(st.builds(encode.flushsa, st.sampled_from([0, 50, 51, 255])),
                       st.just(encode.flushpolicy()))


@st.composite
def flows(draw):
    fam = draw(families)
    return Flow(fam, draw(st.sampled_from([6, 17, 6])), draw(st.sampled_from(ADDRS[fam])),
                draw(st.sampled_from(PORTS)), draw(st.sampled_from(ADDRS[fam])),
                draw(st.sampled_from(PORTS)), mark=draw(st.sampled_from([0, 0, 1, 0x101])),
                ifindex=draw(st.sampled_from([0, 0, 3])),
                if_id=draw(st.sampled_from([0, 0, 0, 1])))


@st.composite
def socket_policies(draw):
    out = {}
    for d in ("out", "in"):
        if draw(st.integers(0, 3)) == 0:
            out[d] = socket_policy(draw(families), d, tuple(draw(st.lists(templates(),
                                                                         max_size=2))),
                                   action=draw(st.sampled_from(["allow", "block"])))
    return out or None


def _equal_views(idx: Index, ref: ReferenceIndex):
    assert idx.sas() == ref.sas()
    assert idx.policies() == ref.policies()
    assert len(idx) == len(ref)


def _same_lookups(idx, ref, fl, sps):
    for f in fl:
        for sp in (None, sps):
            assert idx.lookup(f, sp) == ref.lookup(f, sp), f


@settings(max_examples=80 * SCALE, deadline=None, suppress_health_check=list(HealthCheck))
@given(batches=st.lists(st.lists(st.one_of(ops, ops, ops, ops, ops, ops, ops, ops, rare_flush),
                                 min_size=1, max_size=6), min_size=1, max_size=12),
       fl=st.lists(flows(), min_size=1, max_size=12), sps=socket_policies(),
       defaults=st.tuples(st.sampled_from(["accept", "block"]),
                          st.sampled_from(["accept", "block"])))
def test_index_equals_reference(batches, fl, sps, defaults):
    ref, idx = ReferenceIndex(*defaults), Index(*defaults)
    for i, batch in enumerate(batches):
        data = b"".join(batch)
        assert idx.apply(data) == ref.apply(data)
        if i % 3 == 2:
            _same_lookups(idx, ref, fl[:3], sps)
    _equal_views(idx, ref)
    _same_lookups(idx, ref, fl, sps)


@st.composite
def matching_world(draw):
    """SAs and policies built around a few flows, so that most lookups reach the SA choice."""
    fl = draw(st.lists(flows(), min_size=1, max_size=4))
    sas_, pols = [], []
    for f in fl:
        for direction in ("out", "in"):
            src, sport, dst, dport = f.packet(direction)
            bits = 32 if f.family == V4 else 128
            sel = Selector(f.family, src, dst, draw(st.sampled_from([bits, bits, 0, 24 % bits])),
                           draw(st.sampled_from([bits, bits, 16])),
                           draw(st.sampled_from([0, f.proto])), sport,
                           draw(st.sampled_from([0, 0xFFFF])), dport,
                           draw(st.sampled_from([0, 0xFFFF])), 0)
            reqid = draw(st.sampled_from(REQIDS))
            mode = draw(st.sampled_from(["transport", "tunnel"]))
            tsrc, tdst = (src, dst) if mode == "tunnel" and draw(st.booleans()) else \
                (ADDRS[f.family][4], ADDRS[f.family][4])
            tmpls = [Template(f.family, tsrc, tdst, draw(st.sampled_from(PROTOS)),
                              draw(st.sampled_from([0, 0, 0x100])), reqid, mode,
                              draw(st.booleans()))]
            tmpls += draw(st.lists(templates(), max_size=1))
            pols.append(Policy(direction, draw(st.sampled_from(["allow", "allow", "block"])),
                               draw(st.sampled_from([0, 100, 100])),
                               draw(st.integers(1, 30)) * 8 + (0 if direction == "in" else 1),
                               sel, tuple(tmpls), None, None, None))
            for _ in range(draw(st.integers(0, 3))):
                t = tmpls[0]
                base = draw(sas())
                sas_.append(dataclasses.replace(
                    base, family=f.family, src=src if mode == "transport" else tsrc,
                    dst=dst if mode == "transport" else tdst, proto=t.proto,
                    spi=t.spi or base.spi, reqid=reqid, mode=mode,
                    mark=draw(st.sampled_from([None, None, (1, 1)])),
                    if_id=None, flags=0, encap=None))
    return fl, sas_, pols


@settings(max_examples=80 * SCALE, deadline=None, suppress_health_check=list(HealthCheck))
@given(world=matching_world(), extra=st.lists(ops, max_size=10), sps=socket_policies())
def test_index_equals_reference_on_matching_worlds(world, extra, sps):
    fl, sas_, pols = world
    ref, idx = ReferenceIndex(), Index()
    ref.load(sas_, pols)
    idx.load(sas_, pols)
    _equal_views(idx, ref)
    _same_lookups(idx, ref, fl, sps)
    data = b"".join(extra)
    assert idx.apply(data) == ref.apply(data)
    _equal_views(idx, ref)
    _same_lookups(idx, ref, fl, sps)


def test_update_keeps_place_and_dying_and_rank():
    fam = V4
    base = SA("10.0.0.1", "10.0.0.2", fam, "esp", 0x100, 1, "transport", 0, 32, ZERO_SEL, 0, 0,
              NOW - 1000, 0, (), None, None, None, False, None,
              Lifetime(INF, INF, INF, INF, 0, 0, 0, 0))
    newer = dataclasses.replace(base, spi=0x101, add_time=NOW - 10)
    pol = Policy("out", "allow", 0, 9, Selector(fam, "10.0.0.1", "10.0.0.2", 32, 32, 0, 0, 0,
                                                0, 0, 0),
                 (Template(fam, "0.0.0.0", "0.0.0.0", "esp", 0, 1, "transport", False),),
                 None, None, None)
    f = Flow(fam, 6, "10.0.0.1", 1, "10.0.0.2", 2)
    ref, idx = ReferenceIndex(), Index()
    for m in (encode.dump([base, newer], [pol]), encode.expire(newer, hard=False),
              encode.newsa(dataclasses.replace(newer, bytes=5), update=True)):
        ref.apply(m)
        idx.apply(m)
        assert idx.lookup(f) == ref.lookup(f)
        _equal_views(idx, ref)
    # the newer SA is dying (kept across the update): the older one carries the flow
    assert idx.lookup(f).out.sas[0].spi == 0x100
    assert [s.spi for s in idx.sas()] == [0x100, 0x101]


# ---- the encoder ----

@settings(max_examples=60 * SCALE, deadline=None)
@given(sa=sas())
def test_encode_sa_round_trip(sa):
    assert decode_sa(encode.encode_sa(sa)) == sa
    m = encode.delsa(sa)
    t, payload = struct.unpack_from("=H", m, 4)[0], m[16:]
    assert decode_event(t, payload) == XfrmEvent("sa-delete", sa=sa, sa_key=sa.key)
    stripped = dataclasses.replace(sa, algorithms=(), encap=None, mark=None, if_id=None,
                                   esn=False, sec_ctx=None, replay_seq=None, direction=None)
    for hard in (False, True):
        m = encode.expire(sa, hard=hard)
        assert decode_event(lib.XFRM_MSG_EXPIRE, m[16:]) == \
            XfrmEvent("sa-expire", sa=stripped, sa_key=sa.key, hard=hard)
    m = encode.newsa(sa, update=True)
    assert decode_event(lib.XFRM_MSG_UPDSA, m[16:]) == \
        XfrmEvent("sa-update", sa=sa, sa_key=sa.key)


@settings(max_examples=60 * SCALE, deadline=None)
@given(pol=policies())
def test_encode_policy_round_trip(pol):
    assert decode_policy(encode.encode_policy(pol)) == pol
    key = (pol.dir, pol.index)
    assert decode_event(lib.XFRM_MSG_DELPOLICY, encode.delpolicy(pol)[16:]) == \
        XfrmEvent("policy-delete", policy=pol, policy_key=key)
    bare = dataclasses.replace(pol, templates=(), mark=None, if_id=None, sec_ctx=None)
    assert decode_event(lib.XFRM_MSG_POLEXPIRE, encode.polexpire(pol, hard=True)[16:]) == \
        XfrmEvent("policy-expire", policy=bare, policy_key=key, hard=True)
    assert decode_event(lib.XFRM_MSG_NEWPOLICY, encode.newpolicy(pol)[16:]) == \
        XfrmEvent("policy-new", policy=pol, policy_key=key)


def test_encode_flush():
    assert decode_event(lib.XFRM_MSG_FLUSHSA, encode.flushsa(50)[16:]) == \
        XfrmEvent("sa-flush", flush_proto=50)
    assert decode_event(lib.XFRM_MSG_FLUSHPOLICY, encode.flushpolicy()[16:]) == \
        XfrmEvent("policy-flush")


# ---- malformed input ----

def _world():
    sa = SA("10.0.0.1", "10.0.0.2", V4, "esp", 0x100, 1, "transport", 0, 32, ZERO_SEL, 0, 0,
            NOW, 0, ALGS[0], None, (1, 1), 2, True, "ctx", Lifetime(INF, INF, INF, INF, 0, 0,
                                                                   0, 0), (1, 2), None)
    pol = Policy("out", "allow", 0, 9, Selector(V4, "10.0.0.1", "10.0.0.2", 32, 32, 0, 0, 0,
                                                0, 0, 0),
                 (Template(V4, "0.0.0.0", "0.0.0.0", "esp", 0, 1, "transport", False),),
                 (1, 1), 2, "ctx")
    return sa, pol


def _loaded():
    sa, pol = _world()
    idx, ref = Index(), ReferenceIndex()
    other = dataclasses.replace(sa, spi=0x200)
    for x in (idx, ref):
        x.apply(encode.dump([sa, other], [pol]))
    return idx, ref


def _both_reject(data):
    idx, ref = _loaded()
    before = (idx.sas(), idx.policies())
    with pytest.raises(IndexFormatError) as info:
        idx.apply(data)
    with pytest.raises(ValueError):
        ref.apply(data)
    assert (idx.sas(), idx.policies()) == before        # nothing half-applied
    return info.value


def test_truncated_and_oversized():
    sa, pol = _world()
    m = encode.newsa(dataclasses.replace(sa, spi=0x300))
    # header claims more than the buffer holds
    e = _both_reject(m[:-4])
    assert e.offset == 0 and "offset 0" in str(e)
    # a whole header, but the payload too short for xfrm_usersa_info
    short = struct.pack("=IHHII", 16 + 100, lib.XFRM_MSG_NEWSA, 0, 0, 0) + m[16:116]
    assert _both_reject(short).offset == 16
    # an attribute whose length runs past the message
    bad = bytearray(m)
    first_attr = 16 + 224
    struct.pack_into("=H", bad, first_attr, 0x7FFF)
    assert _both_reject(bytes(bad)).offset == first_attr
    # a known attribute too short for its structure (XFRMA_MARK of 4 bytes)
    short_mark = encode.message(lib.XFRM_MSG_NEWSA, encode.encode_sa(sa)[:224] +
                                encode.attr(lib.XFRMA_MARK, b"\1\0\0\0"))
    assert _both_reject(short_mark).offset == first_attr
    # templates not a whole number
    ragged = encode.message(lib.XFRM_MSG_NEWPOLICY, encode.encode_policy(pol)[:168] +
                            encode.attr(lib.XFRMA_TMPL, bytes(65)))
    _both_reject(ragged)
    # the second message of a buffer bad: the first is applied, the error names the second
    idx = Index()
    with pytest.raises(IndexFormatError) as info:
        idx.apply(encode.newsa(sa) + short)
    assert info.value.applied == 1 and info.value.offset == len(encode.newsa(sa)) + 16
    assert idx.sas() == [sa]


def test_garbage_unknown_types_and_attributes():
    sa, pol = _world()
    idx, ref = _loaded()
    # unknown message types and NLMSG_DONE are skipped
    skipped = encode.message(0x7F, b"\xff" * 10) + encode.message(3, b"\0\0\0\0")
    assert idx.apply(skipped) == ref.apply(skipped) == 0
    # unknown attributes are carried along, never an error
    tail = encode.attr(200, b"hello") + encode.attr(lib.XFRMA_SA_EXTRA_FLAGS, b"\1\0\0\0")
    m = encode.message(lib.XFRM_MSG_NEWSA, encode.encode_sa(dataclasses.replace(sa, spi=7))
                       + tail)
    assert idx.apply(m) == ref.apply(m) == 1
    _equal_views(idx, ref)
    for junk in (b"\x01", b"\xff" * 15, b"\x10\0\0\0" + b"\0" * 11, b"\0" * 16):
        try:
            idx.apply(junk)
            ok = True
        except IndexFormatError:
            ok = False
        try:
            ref.apply(junk)
            assert ok
        except ValueError:
            assert not ok
        _equal_views(idx, ref)


@settings(max_examples=150 * SCALE, deadline=None, suppress_health_check=list(HealthCheck))
@given(msgs=st.lists(ops, min_size=1, max_size=3), data=st.data())
def test_mutated_messages_rejected_alike(msgs, data):
    """Random byte edits, cuts and length rewrites: the index accepts exactly what the
    reference decoder accepts, and ends in the same state."""
    buf = bytearray(b"".join(msgs))
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["byte", "cut", "len16", "len32"]))
        pos = data.draw(st.integers(0, len(buf) - 1))
        if kind == "byte":
            buf[pos] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del buf[pos:]
            if not buf:
                buf = bytearray(b"\0")
        elif kind == "len16" and pos + 2 <= len(buf):
            struct.pack_into("=H", buf, pos, data.draw(st.sampled_from([0, 3, 4, 5, 8, 0xFFFF])))
        elif kind == "len32" and pos + 4 <= len(buf):
            struct.pack_into("=I", buf, pos, data.draw(st.sampled_from([0, 15, 16, 17, 1 << 20])))
    idx, ref = _loaded()
    try:
        n_ref, err_ref = ref.apply(bytes(buf)), None
    except (ValueError, OverflowError) as exc:
        n_ref, err_ref = None, exc
    try:
        n_idx, err_idx = idx.apply(bytes(buf)), None
    except IndexFormatError as exc:
        n_idx, err_idx = None, exc
    assert (err_ref is None) == (err_idx is None), (err_ref, err_idx)
    assert n_idx == n_ref
    _equal_views(idx, ref)


def test_memory_is_freed_and_counted():
    sa, pol = _world()
    idx = Index()
    empty = idx.memory_bytes()
    idx.load([dataclasses.replace(sa, spi=s) for s in range(1, 2001)], [pol])
    assert len(idx) == 2001
    assert (idx.memory_bytes() - empty) / 2000 <= 512
    idx.clear()
    assert len(idx) == 0 and idx.memory_bytes() <= empty + 1024
    idx.close()

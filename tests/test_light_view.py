"""The latching fast path over the C index: SARefs (SA fields read from the C record, no
message decoded) and light notifications (the index parses each message once and says what
it did) must tell exactly what decode_sa / decode_event tell, for every kind of message."""
import random
import socket

import pytest

from ipsecchan._native import ffi, lib
from ipsecchan.latch.protection import Protection
from ipsecchan.latch.registry import _sel_other
from ipsecchan.xfrm import encode
from ipsecchan.xfrm.index import Index, SARef
from ipsecchan.xfrm.messages import (SA, Algorithm, Encap, Lifetime, Policy, Selector,
                                     Template)
from xfrm_feed import FedView

V4, V6 = socket.AF_INET, socket.AF_INET6
INF = (1 << 64) - 1
LT = Lifetime(INF, INF, INF, INF, 0, 0, 0, 0)
ALGS = [
    (Algorithm("aead", "rfc4106(gcm(aes))", 288, 128),),
    (Algorithm("aead", "rfc4106(gcm(aes))", 160, 128),),
    (Algorithm("crypt", "cbc(aes)", 256), Algorithm("auth_trunc", "hmac(sha256)", 256, 128)),
    (Algorithm("crypt", "cbc(aes)", 128), Algorithm("auth_trunc", "hmac(sha256)", 256, 128)),
    (Algorithm("auth_trunc", "hmac(sha256)", 256, 128),),
]


def _sa(rnd: random.Random, spi: int) -> SA:
    fam = rnd.choice([V4, V6])
    a, b = (("10.0.0.1", "10.0.0.2") if fam == V4 else ("fd00::1", "fd00::2"))
    src, dst = (a, b) if rnd.random() < 0.5 else (b, a)
    full = 32 if fam == V4 else 128
    sel = rnd.choice([
        Selector(fam, src, dst, full, full, 0, 0, 0, 0, 0, 0),        # its own pair
        Selector(0, "", "", 0, 0, 0, 0, 0, 0, 0, 0),                  # wildcard
        Selector(fam, src, dst, full - 8, full, 6, 0, 0, 0, 0, 0),    # a prefix
        Selector(fam, dst, src, full, full, 0, 0, 0, 0, 0, 0),        # the other way round
    ])
    encap = Encap(2, 4500, 4500, "0.0.0.0" if fam == V4 else "::") \
        if rnd.random() < 0.2 else None
    proto = "ah" if rnd.random() < 0.15 else "esp"
    algs = ALGS[-1] if proto == "ah" else rnd.choice(ALGS[:-1])
    return SA(src, dst, fam, proto, spi, rnd.randrange(1, 5),
              rnd.choice(["transport", "tunnel"]), rnd.choice([0, 8]), 32, sel, 0, 0,
              rnd.randrange(1, 1 << 31), 0, algs, encap, None, None, True, None, LT, (0, 0),
              None)


def _same_fields(ref: SARef, sa: SA) -> None:
    for name in ("key", "family", "dst", "src", "proto", "spi", "reqid", "mode", "flags",
                 "add_time"):
        assert getattr(ref, name) == getattr(sa, name), name
    assert ref.sel_other == _sel_other(sa, sa.family, sa.dst)
    assert ref.full() == sa
    assert ref.algorithms == sa.algorithms          # other fields: decoded on demand


def test_sarefs_tell_what_decode_sa_tells():
    rnd = random.Random(5660)
    sas = [_sa(rnd, 0x1000 + i) for i in range(300)]
    index = Index()
    index.apply(encode.dump(sas, []))
    by_key = {sa.key: sa for sa in sas}
    n = len(index.sas())
    assert n == len(by_key)
    protections: dict = {}
    buf = ffi.new("uint64_t[]", n)
    assert lib.ipsecchan_xidx_sa_handles(index._x, buf, n) == n
    for h in ffi.unpack(buf, n):
        ref = index.sa_ref(h)
        assert index.sa_ref(h) is ref                   # one object per record
        full = by_key[ref.key]
        _same_fields(ref, full)
        # Equal protection keys, equal protection; and every distinct protection has a key
        # of its own (a collision would let a weaker SA pass for the latched kind).
        prot = Protection.of(full)
        assert protections.setdefault(ref.prot_key, prot) == prot
    assert len(set(protections.values())) == len(protections)
    assert len(protections) >= 8


def test_a_replaced_or_removed_record_is_stale():
    rnd = random.Random(1)
    sa = _sa(rnd, 0x2000)
    index = Index()
    _, changes, n, gone = index.apply_report(encode.newsa(sa))
    ref = index.sa_ref(changes[0].handle)
    _, changes, n, gone = index.apply_report(encode.newsa(sa, update=True))
    assert gone == {ref.handle: ref} and changes[0].old_handle == ref.handle
    with pytest.raises(LookupError):
        index.sa_ref(ref.handle)
    new = index.sa_ref(changes[0].handle)
    _, changes, n, gone = index.apply_report(encode.delsa(sa))
    assert gone == {new.handle: new}


def _policy(i: int, fam: int = V4) -> Policy:
    sel = Selector(fam, "10.0.0.1", f"10.0.{i}.0", 32, 24, 0, 0, 0, 0, 0, 0)
    return Policy("out", "allow", 100 + i, 8 * i + 1, sel,
                  (Template(fam, "", "", "esp", 0, i, "transport", False),), None, None, None)


def test_light_events_tell_what_decoded_events_tell():
    rnd = random.Random(4301)
    sas = [_sa(rnd, 0x3000 + i) for i in range(60)]
    stream = []
    for i, sa in enumerate(sas):
        stream.append(encode.newsa(sa))
        if i % 5 == 0:
            stream.append(encode.newsa(sa, update=True))
        if i % 7 == 0:
            stream.append(encode.expire(sa, hard=False))
        if i % 3 == 0:
            stream.append(encode.newpolicy(_policy(i)))
    for i, sa in enumerate(sas):
        if i % 4 == 0:
            stream.append(encode.delsa(sa))
        elif i % 4 == 1:
            stream.append(encode.expire(sa, hard=True))
        if i % 6 == 0:
            stream.append(encode.delpolicy(_policy(i - i % 3)))
    stream += [encode.flushsa(), encode.flushpolicy()]
    # One message per datagram, and the same messages several to a datagram.
    batched = [b"".join(stream[i:i + 7]) for i in range(0, len(stream), 7)]
    for datagrams, per_poll in ((stream, True), (stream, False), (batched, False)):
        light, full = FedView(True), FedView(False)
        got, want = [], []
        # Polled after each datagram (each event's record is current when the view reads
        # it), or after all of them (the view applies them in one call).
        for chunk in ([[d] for d in datagrams] if per_poll else [datagrams]):
            light.monitor.datagrams.extend(chunk)
            full.monitor.datagrams.extend(chunk)
            got += light.poll()
            want += full.poll()
        refs = 0
        assert [e.kind for e in got] == [e.kind for e in want]
        for g, w in zip(got, want):
            assert (g.sa_key, g.hard, g.policy, g.policy_key, g.flush_proto) == \
                (w.sa_key, w.hard, w.policy, w.policy_key, w.flush_proto), g.kind
            if g.kind in ("sa-new", "sa-update") or (g.kind == "sa-expire" and not g.hard):
                # An SARef, unless a later message of the same batch (the view applies what
                # is queued in one call) replaced the record: then the SA as its own message
                # has it.
                assert isinstance(g.sa, SARef) or (not per_poll and g.sa == w.sa)
                refs += isinstance(g.sa, SARef)
                assert (g.sa.key, g.sa.src, g.sa.reqid) == (w.sa.key, w.sa.src, w.sa.reqid)
            elif g.sa is not None:                      # a removed record the index knew
                assert (g.sa.key, g.sa.src) == (w.sa.key, w.sa.src)
        assert refs >= 60 or not per_poll
        assert light.index.sas() == full.index.sas() == []
        assert light.index.policies() == full.index.policies() == []


def test_a_malformed_notification_makes_the_light_view_resync():
    view = FedView(True)
    resynced = []
    view.resync = lambda: resynced.append(1)
    good = encode.newsa(_sa(random.Random(2), 0x4000))
    bad = bytearray(encode.newsa(_sa(random.Random(3), 0x4001)))
    bad[-4:] = b"\xff\xff\xff\xff"                      # an attribute running past the end
    view.monitor.datagrams.extend([good, good[:16] + bytes(bad[16:])])
    events = view.poll()
    assert [e.kind for e in events] == ["resync"] and resynced == [1]


def _host_sa(src, dst, spi, reqid, fam=V4):
    full = 32 if fam == V4 else 128
    return SA(src, dst, fam, "esp", spi, reqid, "transport", 0, 32,
              Selector(fam, src, dst, full, full, 0, 0, 0, 0, 0, 0), 0, 0, 1000 + spi, 0,
              ALGS[0], None, None, None, True, None, LT, (0, 0), None)


def _host_policy(direction, src, dst, index, reqid, *, optional=False, action="allow",
                 proto=0, fam=V4):
    full = 32 if fam == V4 else 128
    sel = Selector(fam, src, dst, full, full, proto, 0, 0, 0, 0, 0)
    tmpls = () if action != "allow" or reqid is None else (
        Template(fam, "", "", "esp", 0, reqid, "transport", optional),)
    return Policy(direction, action, 100 if proto else 200, index, sel, tmpls, None, None,
                  None)


def test_lookup_brief_tells_what_lookup_tells():
    # What latching reads of a lookup (verdicts, SAs, cleartext accepted) must be lookup()'s:
    # protected flows, one whose IN policy also accepts cleartext, a bypassed protocol, flows
    # no policy covers, SAs missing; before and after changes (answers are cached).
    from ipsecchan.xfrm.lookup import Flow
    a, b, c = "10.0.0.1", "10.0.0.2", "10.0.0.3"
    sas = [_host_sa(a, b, 0x101, 1), _host_sa(b, a, 0x102, 1), _host_sa(b, a, 0x103, 1),
           _host_sa(a, c, 0x201, 2), _host_sa(c, a, 0x202, 2),
           _host_sa("fd00::1", "fd00::2", 0x301, 3, V6),
           _host_sa("fd00::2", "fd00::1", 0x302, 3, V6)]
    pols = [_host_policy("out", a, b, 9, 1), _host_policy("in", b, a, 10, 1),
            _host_policy("out", a, c, 17, 2), _host_policy("in", c, a, 18, 2, optional=True),
            _host_policy("out", a, b, 25, None, action="allow", proto=17),
            _host_policy("in", b, a, 26, None, action="allow", proto=17),
            _host_policy("out", "fd00::1", "fd00::2", 33, 3, fam=V6),
            _host_policy("in", "fd00::2", "fd00::1", 34, 3, fam=V6)]
    idx = Index()
    idx.apply(b"".join(encode.newsa(sa) for sa in sas)
              + b"".join(encode.newpolicy(p) for p in pols))
    flows = [Flow(fam, proto, x, 40000, y, 5000) for proto in (6, 17)
             for fam, x, y in ((V4, a, b), (V4, a, c), (V4, a, "10.0.0.4"),
                               (V6, "fd00::1", "fd00::2"))]
    seen = set()
    for change in ([encode.delsa(sas[0])], [encode.newsa(_host_sa(a, b, 0x104, 1))],
                   [encode.delpolicy(pols[1])], []):
        for flow in flows:
            res, brief = idx.lookup(flow), idx.lookup_brief(flow)
            assert brief == (res.out.verdict, brief[1], res.inbound.verdict, brief[3],
                             res.inbound.cleartext_accepted)
            assert [s.key for s in brief[1]] == [s.key for s in res.out.sas]
            assert [s.key for s in brief[3]] == [s.key for s in res.inbound.sas]
            assert all(type(s) is SARef for s in brief[1] + brief[3])
            seen.add((brief[0], brief[2], len(brief[1]), len(brief[3]), brief[4]))
        idx.apply(b"".join(change))
    verdicts = {(o, i) for o, i, *_ in seen}
    # The flows met every kind of answer latching tells apart.
    assert {("protected", "protected"), ("no-sa", "protected"), ("bypass", "bypass"),
            ("no-policy", "no-policy"), ("protected", "no-policy")} <= verdicts, seen
    assert any(k[4] for k in seen) and any(k[3] == 2 for k in seen), seen


def test_a_default_policy_change_is_an_event_that_reaches_every_latch():
    # The default policy decides flows no policy matches: a change must be looked at by every
    # latch (and applied to the index), in both kinds of view.
    from ipsecchan.latch.registry import LatchRegistry
    from ipsecchan.xfrm.lookup import Flow
    reg = LatchRegistry()
    reg.add(1, Flow(V4, 6, "10.0.0.1", 40000, "10.0.0.2", 5000))
    reg.add(2, Flow(V6, 17, "fd00::1", 40000, "fd00::2", 53))
    block_in_out = bytes([lib.XFRM_USERPOLICY_BLOCK, lib.XFRM_USERPOLICY_ACCEPT,
                          lib.XFRM_USERPOLICY_BLOCK, 0])
    for light in (True, False):
        view = FedView(light)
        view.index.default_in = view.index.default_out = "accept"
        view.feed(encode.message(lib.XFRM_MSG_GETDEFAULT, block_in_out))
        events = view.poll()
        assert [e.kind for e in events] == ["policy-default"], light
        assert (view.index.default_in, view.index.default_out) == ("block", "block")
        assert reg.affected(events[0]) == {1, 2}

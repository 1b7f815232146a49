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
    for datagrams in (stream, batched):
        one_each = datagrams is stream
        light, full = FedView(True), FedView(False)
        light.monitor.datagrams.extend(datagrams)
        full.monitor.datagrams.extend(datagrams)
        got, want = light.poll(), full.poll()
        assert [e.kind for e in got] == [e.kind for e in want]
        for g, w in zip(got, want):
            assert (g.sa_key, g.hard, g.policy, g.policy_key, g.flush_proto) == \
                (w.sa_key, w.hard, w.policy, w.policy_key, w.flush_proto), g.kind
            if g.kind in ("sa-new", "sa-update") or (g.kind == "sa-expire" and not g.hard):
                # An SARef, unless a later message of its datagram replaced the record: then
                # the SA as its own message has it.
                assert isinstance(g.sa, SARef) or (not one_each and g.sa == w.sa)
                assert (g.sa.key, g.sa.src, g.sa.reqid) == (w.sa.key, w.sa.src, w.sa.reqid)
            elif g.sa is not None:                      # a removed record the index knew
                assert (g.sa.key, g.sa.src) == (w.sa.key, w.sa.src)
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

"""Which latches an XFRM event reaches: exact for SAs and host policies, by prefix for wider
policies, all of them for flushes and resyncs; nothing for others."""
import socket

from ipsecchan.latch.registry import LatchRegistry
from ipsecchan.xfrm.lookup import Flow
from ipsecchan.xfrm.messages import SA, Policy, Selector, XfrmEvent

V4 = socket.AF_INET


def flow(remote, port=5000, family=V4, local="10.0.0.1"):
    return Flow(family, socket.IPPROTO_TCP, local, 40000 + port, remote, port)


def sel(src="", dst="", ps=0, pd=0, family=V4):
    return Selector(family, src, dst, ps, pd, 0, 0, 0, 0, 0, 0)


def sa(src, dst, spi, selector=None):
    # strongSwan's transport SAs carry a host-to-host selector.
    selector = selector or sel(src, dst, 32, 32)
    return SA(src, dst, V4, "esp", spi, 1, "transport", 0, 0, selector, 0, 0, 0, 0,
              (), None, None, None, False, None)


def pol(selector):
    return Policy("out", "allow", 1, 8, selector, (), None, None, None)


def registry():
    reg = LatchRegistry()
    reg.add("a", flow("10.0.0.2"), [(V4, "10.0.0.2", "esp", 0x100), (V4, "10.0.0.1", "esp", 0x200)])
    reg.add("b", flow("10.0.0.2", 5001), [(V4, "10.0.0.2", "esp", 0x100)])
    reg.add("c", flow("10.0.1.7"), [(V4, "10.0.1.7", "esp", 0x300)])
    reg.add("d", flow("fd00::2", family=socket.AF_INET6, local="fd00::1"))
    return reg


def test_sa_events_reach_the_peer_and_the_latched_sa():
    reg = registry()
    new = sa("10.0.0.1", "10.0.0.2", 0x101)          # a rekey towards 10.0.0.2
    assert reg.affected(XfrmEvent("sa-new", sa=new, sa_key=new.key)) == {"a", "b"}
    inbound = sa("10.0.1.7", "10.0.0.1", 0x301)       # from 10.0.1.7: its src is the peer
    assert reg.affected(XfrmEvent("sa-new", sa=inbound, sa_key=inbound.key)) == {"c"}
    gone = (V4, "10.0.0.1", "esp", 0x200)              # delete without the record: by key
    assert reg.affected(XfrmEvent("sa-delete", sa_key=gone)) == {"a"}
    other = sa("10.0.0.1", "10.0.9.9", 0x999)
    assert reg.affected(XfrmEvent("sa-new", sa=other, sa_key=other.key)) == set()
    # A tunnel SA's selector names the inner networks: latches inside them are reached.
    tunnel = sa("192.0.2.1", "192.0.2.2", 0x777, sel("10.0.0.1", "10.0.1.0", 32, 24))
    assert reg.affected(XfrmEvent("sa-new", sa=tunnel, sa_key=tunnel.key)) == {"c"}


def test_policy_events_by_selector():
    reg = registry()
    host = pol(sel("10.0.0.1", "10.0.0.2", 32, 32))
    assert reg.affected(XfrmEvent("policy-new", policy=host)) == {"a", "b"}
    wide = pol(sel("10.0.0.0", "10.0.0.0", 16, 16))
    assert reg.affected(XfrmEvent("policy-update", policy=wide)) == {"a", "b", "c"}
    anything6 = pol(sel(family=socket.AF_INET6))
    assert reg.affected(XfrmEvent("policy-delete", policy=anything6)) == {"d"}
    assert reg.affected(XfrmEvent("policy-delete", policy_key=("out", 8))) == {"a", "b", "c",
                                                                               "d"}


def test_flush_resync_and_ike_spis():
    reg = registry()
    for kind in ("sa-flush", "policy-flush", "resync"):
        assert reg.affected(XfrmEvent(kind)) == {"a", "b", "c", "d"}
    assert reg.affected(XfrmEvent("acquire")) == set()
    assert reg.affected_by_spis([0x100]) == {"a", "b"}
    reg.update_sas("a", [(V4, "10.0.0.2", "esp", 0x500)])
    assert reg.affected_by_spis([0x100]) == {"b"} and reg.affected_by_spis([0x500]) == {"a"}
    for name in "abcd":
        reg.remove(name)
    assert len(reg) == 0 and reg._by_peer == {} and reg._by_sa == {} and reg._by_spi == {}


def test_the_indexes_follow_random_moves_between_shared_sas():
    # Latches moving among SAs that share SPIs and are shared by several latches (rekeys keep
    # some SAs and drop others): the SA and SPI indexes answer what a plain model says, and
    # are empty at the end.
    import random
    rnd = random.Random(5660)
    keys = [(V4, dst, "esp", spi) for dst in ("10.0.0.2", "10.0.0.3") for spi in (1, 2, 3, 4)]
    reg, model = LatchRegistry(), {}
    for step in range(3000):
        latch = rnd.randrange(12)
        op = rnd.random()
        if op < 0.1:
            reg.remove(latch)
            model.pop(latch, None)
            continue
        chosen = [rnd.choice(keys) for _ in range(rnd.randrange(4))]
        if latch not in model or op < 0.2:
            reg.add(latch, flow("10.0.0.9", latch), chosen)
        else:
            reg.update_sas(latch, chosen)
        model[latch] = set(chosen)
        for spi in (1, 2, 3, 4):
            assert reg.affected_by_spis([spi]) == {i for i, ks in model.items()
                                                   if any(k[3] == spi for k in ks)}, step
        for key in keys:
            on = {i for i, ks in model.items() if key in ks}
            assert set(reg._by_sa.ids(key)) == on, step
    for latch in list(model):
        reg.remove(latch)
    assert len(reg) == 0 and reg._by_peer == {} and reg._by_sa == {} and reg._by_spi == {}

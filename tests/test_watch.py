"""The C index's watched flows (Index.watch / touched) against the Python registry.

A Latcher following in C takes the latches SA notifications reach from the index, which marks
them while applying the notifications, and makes events only for the SA changes the index
flags as not placed (tunnels, wildcard sources); the registry (LatchRegistry.collect over an
event per notification) is the reference. Two views are fed the same notifications: one with
an event per SA notification, one watching. Whatever the registry reaches must be reached.
"""
import ipaddress
import random
import socket

import pytest

from ipsecchan.latch.registry import LatchRegistry
from ipsecchan.xfrm import encode
from ipsecchan.xfrm.lookup import Flow
from ipsecchan.xfrm.messages import SA, Algorithm, Lifetime, Selector
from xfrm_feed import FedView

V4, V6 = socket.AF_INET, socket.AF_INET6
LOCAL = {V4: "10.0.0.1", V6: "fd00::1"}
PEERS = {V4: [f"10.1.{n}.{i}" for n in range(3) for i in range(1, 4)],
         V6: [f"fd00:1:{n}::{i}" for n in range(3) for i in range(1, 4)]}
GATEWAYS = {V4: ["192.0.2.1", "192.0.2.2"], V6: ["2001:db8::1", "2001:db8::2"]}
FULL = {V4: 32, V6: 128}
INF = (1 << 64) - 1
AEAD = (Algorithm("aead", "rfc4106(gcm(aes))", 288, 128),)
WILDRECV = 8


def _sa(family, src, dst, spi, mode="transport", sel=None, flags=0):
    if sel is None:
        sel = Selector(family, src, dst, FULL[family], FULL[family], 0, 0, 0, 0, 0, 0)
    return SA(src, dst, family, "esp", spi, 1, mode, flags, 32, sel, 0, 0, 1, 0, AEAD, None,
              None, None, True, None, Lifetime(INF, INF, INF, INF, 0, 0, 0, 0), (0, 0), None)


def _random_sa(rnd, spi):
    family = rnd.choice([V4, V6])
    peer = rnd.choice(PEERS[family])
    local = LOCAL[family]
    kind = rnd.choice(["out", "in", "out", "in", "tunnel", "tunnel-any", "wildrecv", "other"])
    if kind == "out":
        return _sa(family, local, peer, spi)
    if kind == "in":
        return _sa(family, peer, local, spi)
    gw = rnd.choice(GATEWAYS[family])
    if kind == "tunnel":
        # A tunnel SA between gateways whose selector covers a subnet of peers (or a host).
        plen = rnd.choice([FULL[family], FULL[family] - 8, 16 if family == V4 else 48, 0])
        net = rnd.choice(PEERS[family])
        sel = Selector(family, local, net, FULL[family], plen, 0, 0, 0, 0, 0, 0)
        if rnd.random() < 0.5:
            sel = Selector(family, net, local, plen, FULL[family], 0, 0, 0, 0, 0, 0)
        return _sa(family, LOCAL[family], gw, spi, "tunnel", sel)
    if kind == "tunnel-any":
        return _sa(family, gw, LOCAL[family], spi, "tunnel",
                   Selector(0, "", "", 0, 0, 0, 0, 0, 0, 0, 0))
    if kind == "wildrecv":
        return _sa(family, "0.0.0.0" if family == V4 else "::", local, spi, flags=WILDRECV,
                   sel=Selector(0, "", "", 0, 0, 0, 0, 0, 0, 0, 0))
    return _sa(family, rnd.choice(GATEWAYS[family]), rnd.choice(PEERS[family]), spi)


def _key(sa):
    return (int(sa.family), str(ipaddress.ip_address(sa.dst)), "esp", sa.spi)


class World:
    def __init__(self, rnd):
        self.rnd, self.spi = rnd, 0x100
        self.full, self.watching = FedView(), FedView()
        self.watching.sa_events = False
        self.registry = LatchRegistry()
        self.flows: dict[int, Flow] = {}
        self.sas: dict[tuple, SA] = {}

    def add_latch(self, hid):
        family = self.rnd.choice([V4, V6])
        flow = Flow(family, socket.IPPROTO_UDP, LOCAL[family], 4000 + hid,
                    self.rnd.choice(PEERS[family]), 5000)
        self.flows[hid] = flow
        self.registry.add(hid, flow, self._keys_for(flow))
        self.watching.index.watch(hid, flow)

    def _keys_for(self, flow):
        # The SAs a latch can be on: transport SAs of its peer, or any SA the watch does not
        # place (a tunnel's, a wildcard source's): the registry finds those by key.
        fit = [k for k, sa in self.sas.items()
               if sa.family == flow.family and (
                   sa.mode != "transport" or sa.flags & WILDRECV
                   or flow.remote in (sa.src, sa.dst))]
        return self.rnd.sample(fit, min(len(fit), self.rnd.randrange(3)))

    def drop_latch(self, hid):
        self.registry.remove(hid)
        self.watching.index.unwatch(hid)
        del self.flows[hid]

    def step(self):
        rnd = self.rnd
        msgs = []
        self.removed = set()            # keys of SAs the index had and this step removes
        self.flushed = False
        self.absent = set()             # keys of SAs deleted that the index never had
        for _ in range(rnd.randrange(1, 6)):
            op = rnd.random()
            if op < 0.45 or not self.sas:
                self.spi += 1
                sa = _random_sa(rnd, self.spi)
                self.sas[_key(sa)] = sa
                msgs.append(encode.newsa(sa))
            elif op < 0.6:
                key = rnd.choice(list(self.sas))
                msgs.append(encode.newsa(self.sas[key], update=True))
            elif op < 0.8:
                key = rnd.choice(list(self.sas))
                msgs.append(encode.delsa(self.sas.pop(key)))
                self.removed.add(key)
            elif op < 0.9:
                key = rnd.choice(list(self.sas))
                hard = rnd.random() < 0.5
                msgs.append(encode.expire(self.sas[key], hard=hard))
                if hard:
                    del self.sas[key]
                    self.removed.add(key)
            elif op < 0.93:
                msgs.append(encode.flushsa())
                self.sas.clear()
                self.flushed = True
            else:
                # An SA nobody has: applied, it changes nothing.
                self.spi += 1
                sa = _random_sa(rnd, self.spi)
                msgs.append(encode.delsa(sa))
                self.absent.add(_key(sa))
        for hid in list(self.flows):
            if rnd.random() < 0.3:
                self.registry.update_sas(hid, self._keys_for(self.flows[hid]))
        for view in (self.full, self.watching):
            view.feed(*msgs)
        return msgs


@pytest.mark.parametrize("seed", range(30))
def test_the_watch_reaches_every_latch_the_registry_reaches(seed):
    rnd = random.Random(seed)
    w = World(rnd)
    for hid in range(12):
        w.add_latch(hid)
    next_hid, reached_all, exact = 12, 0, 0
    for _ in range(60):
        w.step()
        expected = set()
        full_events = w.full.poll()
        for ev in full_events:
            # (A delete of an SA the index never had changes nothing: the registry reaches
            # its peer's latches anyway, the watch need not.)
            if ev.sa_key not in w.absent:
                w.registry.collect(ev, expected)
        events = w.watching.poll()
        touched = w.watching.index.touched()
        got = set(w.flows) if touched is None else set(touched)
        reached_all += touched is None
        markers = [ev for ev in events if ev.kind == "sa-changes"]
        for ev in events:
            if ev.kind != "sa-changes":
                w.registry.collect(ev, got)
        assert expected <= got, (seed, sorted(expected - got))
        exact += expected == got
        # One marker per batch of SA changes placed by the index, naming the SAs removed.
        assert len(markers) <= 1
        flagged = {ev.sa_key for ev in events if ev.kind.startswith("sa-")}
        if not w.flushed:
            assert set(markers[0].removed if markers else ()) == w.removed - flagged
        if rnd.random() < 0.2:
            w.drop_latch(rnd.choice(list(w.flows)))
        if rnd.random() < 0.3:
            w.add_latch(next_hid)
            next_hid += 1
    # Not every slot every time: the watch names latches (a flush or many tunnel selectors
    # aside), and most rounds reach exactly the registry's.
    assert reached_all < 20 and exact > 30, (reached_all, exact)


def test_what_the_watch_marks():
    view = FedView()
    view.sa_events = False
    index = view.index
    flows = {0: Flow(V4, 17, "10.0.0.1", 4000, "10.1.0.1", 5000),
             1: Flow(V4, 17, "10.0.0.1", 4001, "10.1.0.2", 5000),
             2: Flow(V6, 17, "fd00::1", 4002, "fd00:1::1", 5000),
             3: Flow(V4, 17, "10.0.0.1", 4003, "10.1.0.1", 5001)}
    for slot, flow in flows.items():
        index.watch(slot, flow)

    def fed(*msgs):
        view.feed(*msgs)
        return view.poll(), index.touched()

    out = _sa(V4, "10.0.0.1", "10.1.0.1", 0x10)
    events, touched = fed(encode.newsa(out))
    assert sorted(touched) == [0, 3]             # both connections to 10.1.0.1, no other
    assert [ev.kind for ev in events] == ["sa-changes"] and events[0].removed == ()
    assert fed()[1] == []                        # taken: nothing marked since
    events, touched = fed(encode.newsa(_sa(V6, "fd00:1::1", "fd00::1", 0x11)),
                          encode.delsa(out))
    assert sorted(touched) == [0, 2, 3]
    assert events[0].removed == ((V4, "10.1.0.1", "esp", 0x10),)
    # An SA the index does not have: nothing changes, nothing is marked or told.
    assert fed(encode.delsa(_sa(V4, "10.0.0.1", "10.1.0.2", 0x99))) == ([], [])
    # A tunnel SA: flagged (its event is made), and the peers its selector covers marked.
    tun = _sa(V4, "10.0.0.1", "192.0.2.1", 0x12, "tunnel",
              Selector(V4, "10.0.0.1", "10.1.0.0", 32, 24, 0, 0, 0, 0, 0, 0))
    events, touched = fed(encode.newsa(tun))
    assert [ev.kind for ev in events] == ["sa-new"] and sorted(touched) == [0, 1, 3]
    # A slot unwatched is not marked; one watched again for another peer is, for that one.
    index.unwatch(0)
    index.watch(1, Flow(V4, 17, "10.0.0.1", 4001, "10.1.0.9", 5000))
    events, touched = fed(encode.newsa(_sa(V4, "10.1.0.2", "10.0.0.1", 0x13)),
                          encode.newsa(_sa(V4, "10.1.0.9", "10.0.0.1", 0x14)),
                          encode.newsa(_sa(V4, "10.1.0.1", "10.0.0.1", 0x15)))
    assert sorted(touched) == [1, 3]
    # A flush: every slot.
    assert fed(encode.flushsa())[1] is None
    assert fed()[1] == []
    with pytest.raises(ValueError):
        index.watch(9, Flow(0, 17, "", 1, "", 2))

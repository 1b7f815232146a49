"""Host-side parts of the latch engine: the listener pin chosen from the SPD, and latches
whose socket closed under them."""
import os
import socket

import pytest

from ipsecchan.ike.static import StaticSource
from ipsecchan.latch.engine import Latcher
from ipsecchan.latch.machine import LatchState, Requirements
from ipsecchan.latch.machine import Policy as LatchPolicy

from ipsecchan.latch.engine import listener_templates
from ipsecchan.xfrm.messages import Policy, Selector, Template

V4 = socket.AF_INET


def _pol(direction, *tmpls, action="allow", family=V4):
    sel = Selector(family, "10.0.0.1", "10.0.0.2", 32, 32, 0, 0, 0, 0, 0, 0)
    return Policy(direction, action, 100, 8, sel, tuple(tmpls), None, None, None)


def _t(proto="esp", mode="transport", src="", dst="", reqid=1, optional=False):
    return Template(V4, src, dst, proto, 0, reqid, mode, optional)


def test_one_transport_kind_gives_an_any_reqid_template():
    got = listener_templates([_pol("in", _t(reqid=1)), _pol("in", _t(reqid=2)),
                              _pol("out", _t(reqid=1)), _pol("fwd", _t(mode="tunnel"))], V4)
    assert got == [Template(V4, "", "", "esp", 0, 0, "transport", False)]


def test_ah_transport():
    assert listener_templates([_pol("in", _t("ah"))], V4)[0].proto == "ah"


def test_no_listener_pin_when_it_cannot_cover_every_peer():
    # tunnel mode names endpoints; two kinds cannot be one template; no IPsec at all.
    assert listener_templates([_pol("in", _t(mode="tunnel", src="10.0.0.2",
                                            dst="10.0.0.1"))], V4) is None
    assert listener_templates([_pol("in", _t("esp")), _pol("in", _t("ah"))], V4) is None
    assert listener_templates([_pol("in"), _pol("in", action="block")], V4) is None
    assert listener_templates([], V4) is None


def test_other_family_and_optional_templates_do_not_count():
    assert listener_templates([_pol("in", _t(), family=socket.AF_INET6),
                               _pol("in", _t("ah"))], V4)[0].proto == "ah"
    assert listener_templates([_pol("in", _t("comp", optional=True), _t())],
                              V4)[0].proto == "esp"


@pytest.mark.skipif(os.geteuid() != 0, reason="latching needs CAP_NET_ADMIN")
def test_release_after_close_and_events_for_a_closed_socket():
    # A latched socket closed before its release: the release completes (its policies went
    # with the socket), and an event for a closed one drops it instead of stopping the round.
    lat = Latcher(StaticSource({}))
    try:
        with socket.create_server(("127.0.0.1", 0)) as lsn:
            pairs = []
            for _ in range(2):
                c = socket.create_connection(lsn.getsockname(), timeout=5)
                pairs.append((c, lsn.accept()[0]))
            opt = Requirements(policy=LatchPolicy.OPTIONAL)
            h1, h2 = (lat.latch(c, opt) for c, _ in pairs)
            assert h1.state is h2.state is LatchState.ESTABLISHED
            pairs[0][0].close()
            lat.release(h1)                          # no EBADF
            assert h1.state is LatchState.CLOSED and h1.id not in lat.handles
            pairs[1][0].close()
            lat._pending.add(h2.id)
            h2.latch.state = LatchState.BROKEN       # its next observation resolves: a Pin
            lat.poll()
            assert h2.id not in lat.handles          # dropped: nothing left to enforce
            for _, s in pairs:
                s.close()
    finally:
        lat.close()


# ---- the engine over a fed view: the C index and kernel-format notifications, no kernel ----

import time                                                   # noqa: E402

from ipsecchan._native import ffi, lib                        # noqa: E402
from ipsecchan.ike.base import Event, SAIdentity, State       # noqa: E402
from ipsecchan.latch import engine                            # noqa: E402
from ipsecchan.latch.machine import HISTORY_LIMIT, Cause, LatchRefused   # noqa: E402
from ipsecchan.xfrm import encode                             # noqa: E402
from ipsecchan.xfrm.messages import SA, Algorithm, Lifetime   # noqa: E402
from xfrm_feed import FedView                                 # noqa: E402

LOCAL, PEER = "127.0.0.1", "127.0.0.2"
INF = (1 << 64) - 1
GCM = (Algorithm("aead", "rfc4106(gcm(aes))", 288, 128),)
LEVEL = (socket.IPPROTO_IP, lib.IP_XFRM_POLICY)


def _sa(src, dst, spi, mallory=False):
    # Mallory's SAs have bob's reqid (the same connection config), as with strongSwan; the
    # test's identity source tells them by their replay window.
    return SA(src, dst, V4, "esp", spi, 1, "transport", 0, 66 if mallory else 32,
              Selector(V4, src, dst, 32, 32, 0, 0, 0, 0, 0, 0), 0, 0, int(time.time()) - 60,
              0, GCM, None, None, None, True, None, Lifetime(INF, INF, INF, INF, 0, 0, 0, 0),
              (0, 0), None)


class Source:
    """Identities from two static sources (bob by reqid, mallory for SAs marked as hers),
    counting the questions; `down` makes it unavailable, like an IKE daemon gone."""
    name = "test"

    def __init__(self):
        self.bob = StaticSource({"sas": [{"reqid": 1, "local": "alice", "peer": "bob"}]})
        self.mallory = StaticSource({"sas": [{"reqid": 1, "local": "alice",
                                              "peer": "mallory"}]})
        self.asked, self.down = 0, False

    def identify(self, sa):
        self.asked += 1
        if self.down:
            return SAIdentity(State.UNAVAILABLE, "test", "daemon gone")
        return (self.mallory if sa.replay_window == 66 else self.bob).identify(sa)

    def next_event(self, timeout=None):
        return None

    def close(self):
        pass


class Sock:
    """A connected socket as the engine sees it (family, type, addresses, mark), recording
    the per-socket policies set on it: ("out"|"in", OUT template SPI or None, action) or
    "clear"."""

    family, type = V4, socket.SOCK_DGRAM

    def __init__(self, port=40000):
        self.port, self.ops = port, []

    def getsockname(self):
        return (LOCAL, self.port)

    def getpeername(self):
        return (PEER, 5000)

    def getsockopt(self, level, opt):
        return 0

    def setsockopt(self, level, opt, value, length=None):
        assert (level, opt) == LEVEL
        if value is None:
            self.ops.append("clear")
            return
        info = ffi.from_buffer("struct xfrm_userpolicy_info *", value)
        direction = {0: "in", 1: "out"}[info.dir]
        tmpl = value[ffi.sizeof("struct xfrm_userpolicy_info"):]
        spi = None
        if tmpl:
            spi = socket.ntohl(ffi.from_buffer("struct xfrm_user_tmpl *", tmpl).id.spi)
        self.ops.append((direction, spi, "block" if info.action else "allow"))


def _world(src=None):
    t = Template(V4, "", "", "esp", 0, 1, "transport", False)
    pols = [Policy("out", "allow", 100, 1, Selector(V4, LOCAL, PEER, 32, 32, 0, 0, 0, 0, 0, 0),
                   (t,), None, None, None),
            Policy("in", "allow", 100, 8, Selector(V4, PEER, LOCAL, 32, 32, 0, 0, 0, 0, 0, 0),
                   (t,), None, None, None)]
    view = FedView(dump=encode.dump([_sa(LOCAL, PEER, 0x100), _sa(PEER, LOCAL, 0x200)],
                                   pols))
    src = src or Source()
    return Latcher(src, view), view, src


def test_sa_replaced_between_the_two_looks_is_refused():
    """The pin-then-confirm race through the engine: mallory's SA replaces bob's before the
    pin (its notifications not read yet at the first look): refused, the pin removed."""
    lat, view, _ = _world()
    view.feed(encode.delsa(_sa(LOCAL, PEER, 0x100)), encode.newsa(_sa(LOCAL, PEER, 0x300, True)))
    s = Sock()
    with pytest.raises(LatchRefused) as exc:
        lat.latch(s)
    assert exc.value.cause is Cause.PEER_CHANGED
    assert s.ops == [("out", 0x100, "allow"), ("in", 0, "allow"), "clear"]
    assert lat.latches() == [] and len(lat.registry) == 0


def test_unrelated_notifications_between_the_looks_still_latch():
    lat, view, _ = _world()
    view.feed(encode.newsa(_sa(LOCAL, "127.0.0.9", 0x900)))
    h = lat.latch(Sock())
    assert h.state is LatchState.ESTABLISHED and h.latch.params.peer.id == "bob"


def test_identities_asked_once_per_sa_per_round_and_unavailable_still_breaks():
    lat, view, src = _world()
    s = Sock()
    h = lat.latch(s)
    assert src.asked == 2                      # both looks of one latch: once per SA
    h2 = lat.latch(Sock(40001))
    assert src.asked == 4                      # a new round asks again
    assert h2.latch.params.out_sas[0] is h.latch.params.out_sas[0]    # facts shared
    view.feed(encode.newsa(_sa(PEER, LOCAL, 0x201)))                   # reaches both latches
    lat.poll()
    assert src.asked == 7                      # one round: 3 SAs, once each
    src.down = True                            # cached facts must not hide this
    view.feed(encode.expire(_sa(LOCAL, PEER, 0x100), hard=False))
    alerts = lat.poll()
    assert {a.new for _, a in alerts} == {LatchState.BROKEN}
    assert h.latch.cause is Cause.NOT_VERIFIED and s.ops[-2:] == [("out", None, "block"),
                                                                  ("in", None, "block")]
    src.down = False
    view.feed(encode.expire(_sa(LOCAL, PEER, 0x100), hard=False))
    lat.poll()
    assert h.state is LatchState.ESTABLISHED and s.ops[-2][:2] == ("out", 0x100)


def test_rekey_moves_the_pin_and_a_reused_sa_key_is_judged_anew():
    lat, view, _ = _world()
    s = Sock()
    h = lat.latch(s)
    view.feed(encode.newsa(_sa(PEER, LOCAL, 0x201)), encode.newsa(_sa(LOCAL, PEER, 0x101)),
              encode.delsa(_sa(LOCAL, PEER, 0x100)))
    alerts = lat.poll()
    assert [(a.new, a.rekeyed) for _, a in alerts] == [(LatchState.ESTABLISHED, True)]
    # The OUT pin moves to the new SA; the IN pin (by reqid) is the same: not set again.
    assert s.ops[-3:] == [("out", 0x100, "allow"), ("in", 0, "allow"), ("out", 0x101, "allow")]
    view.feed(encode.delsa(_sa(PEER, LOCAL, 0x200)))     # old inbound gone: nothing to tell
    assert lat.poll() == [] and [x.key[3] for x in h.latch.params.in_sas] == [0x201]
    # The same SA key comes back with another peer's SA (same SPI).
    view.feed(encode.delsa(_sa(LOCAL, PEER, 0x101)),
              encode.newsa(_sa(LOCAL, PEER, 0x101, True)))
    lat.poll()
    assert h.state is LatchState.BROKEN and h.latch.cause is Cause.PEER_CHANGED


class EpochSource(Source):
    """Source with an IdentitySource.epoch, bumped when the daemon goes or comes back (and
    said by an event, as the strongSwan source does)."""

    def __init__(self):
        super().__init__()
        self.epoch, self.events = 0, []

    def set_down(self, down: bool):
        self.down = down
        self.epoch += 1
        self.events.append(Event("daemon-lost" if down else "daemon-back", "test"))

    def next_event(self, timeout=None):
        return self.events.pop(0) if self.events else None


def _counting_observations(monkeypatch):
    seen = []
    real = engine.Latch.observe
    monkeypatch.setattr(engine.Latch, "observe", lambda self, obs: (seen.append(obs),
                                                                    real(self, obs))[1])
    return seen


@pytest.mark.parametrize("epochs", [True, False])
def test_a_removed_inbound_sa_is_taken_in_without_judging_only_when_nothing_else_came(
        epochs, monkeypatch):
    lat, view, src = _world(EpochSource() if epochs else Source())
    s = Sock()
    h = lat.latch(s)
    view.feed(encode.newsa(_sa(PEER, LOCAL, 0x201)), encode.newsa(_sa(LOCAL, PEER, 0x101)),
              encode.delsa(_sa(LOCAL, PEER, 0x100)))
    lat.poll()
    judged, ops = _counting_observations(monkeypatch), list(s.ops)
    view.feed(encode.delsa(_sa(PEER, LOCAL, 0x200)))     # the rekey's old inbound SA goes
    assert lat.poll() == [] and s.ops == ops
    assert [x.key[3] for x in h.latch.params.in_sas] == [0x201]
    # Without epochs the identities must be asked again: that latch is observed and judged.
    assert len(judged) == (0 if epochs else 1)
    assert [x.key for x in lat.observe(h.flow).in_sas] == \
        [x.key for x in h.latch.params.in_sas]                  # what a look finds now
    lat._sync_keys()            # (the registry takes new keys when an event needs them)
    assert lat.registry.affected_by_spis([0x200]) == set()
    assert lat.registry.affected_by_spis([0x201]) == {h.id}
    # Another inbound SA of bob's, then in one round: bob's older one goes and mallory's comes
    # (reqid 1 too). The removal alone could be taken in; with the newcomer it is judged.
    view.feed(encode.newsa(_sa(PEER, LOCAL, 0x202)))
    lat.poll()
    view.feed(encode.delsa(_sa(PEER, LOCAL, 0x201)), encode.newsa(_sa(PEER, LOCAL, 0x203, True)))
    alerts = lat.poll()
    assert [a.new for _, a in alerts] == [LatchState.BROKEN]
    assert h.latch.cause is Cause.PEER_CHANGED and s.ops[-2:] == [("out", None, "block"),
                                                                  ("in", None, "block")]


def test_a_removal_is_taken_in_only_if_the_kernel_shows_nothing_else():
    # The kernel's answer is checked, not assumed: an SA that reached the index without an
    # event reaching the latch (as if a notification had been missed) still gets judged.
    lat, view, src = _world(EpochSource())
    s = Sock()
    h = lat.latch(s)
    view.feed(encode.newsa(_sa(PEER, LOCAL, 0x201)))
    lat.poll()
    assert [x.key[3] for x in h.latch.params.in_sas] == [0x200, 0x201]
    view.index.apply(encode.newsa(_sa(PEER, LOCAL, 0x203, True)))      # mallory's, unseen
    view.feed(encode.delsa(_sa(PEER, LOCAL, 0x200)))
    alerts = lat.poll()
    assert [a.new for _, a in alerts] == [LatchState.BROKEN]
    assert h.latch.cause is Cause.PEER_CHANGED


def test_alerts_and_history_are_bounded():
    lat, view, src = _world()
    heard = []
    h = lat.latch(Sock(), on_alert=lambda handle, a: heard.append(a))
    for i in range(2 * max(engine.ALERTS_LIMIT, HISTORY_LIMIT)):
        src.down = not src.down
        view.feed(encode.expire(_sa(LOCAL, PEER, 0x100), hard=False))
        lat.poll()
    assert len(heard) == 1 + 2 * max(engine.ALERTS_LIMIT, HISTORY_LIMIT)   # owners hear all
    assert len(h.alerts) == engine.ALERTS_LIMIT and h.alerts[-1] is heard[-1]
    assert len(h.latch.history) == HISTORY_LIMIT


def test_an_epoch_source_is_asked_once_per_sa_until_its_epoch_changes():
    lat, view, _ = _world()
    src = lat.identities = EpochSource()
    s = Sock()
    h = lat.latch(s)
    assert src.asked == 2
    lat.latch(Sock(40001))
    assert src.asked == 2                      # same epoch, same SA records: not asked again
    view.feed(encode.newsa(_sa(PEER, LOCAL, 0x201)))
    lat.poll()
    assert src.asked == 3                      # only the new SA
    src.set_down(True)                         # a new epoch: every answer asked again
    lat.poll()
    assert h.state is LatchState.BROKEN and h.latch.cause is Cause.NOT_VERIFIED
    asked = src.asked
    src.set_down(False)
    lat.poll()
    assert h.state is LatchState.ESTABLISHED and src.asked > asked


def test_a_latch_waiting_for_its_identities_does_not_hold_up_the_others(monkeypatch):
    # carol's SAs are new and no source names them yet: her latch waits (the identity grace)
    # for the daemon; bob's latch, meanwhile, from another thread, must not wait for hers.
    import dataclasses
    import threading
    monkeypatch.setattr(engine, "IDENTITY_GRACE", 1.5)
    carol = "127.0.0.3"
    t2 = Template(V4, "", "", "esp", 0, 2, "transport", False)
    pols = [Policy("out", "allow", 100, 17, Selector(V4, LOCAL, carol, 32, 32, 0, 0, 0, 0, 0, 0),
                   (t2,), None, None, None),
            Policy("in", "allow", 100, 24, Selector(V4, carol, LOCAL, 32, 32, 0, 0, 0, 0, 0, 0),
                   (t2,), None, None, None)]
    now = int(time.time()) + 1             # whole seconds: the wait is 1.5 to 2.5 s from now
    fresh = [dataclasses.replace(_sa(a, b, spi), reqid=2, add_time=now)
             for a, b, spi in ((LOCAL, carol, 0x700), (carol, LOCAL, 0x800))]
    lat, view, _ = _world()
    view.index.apply(encode.dump(fresh, pols))

    class CarolSock(Sock):
        def getpeername(self):
            return (carol, 5000)

    # Not waiting: refused at once as "would wait", nothing left on the socket or in the engine.
    s = CarolSock(40003)
    t = time.monotonic()
    with pytest.raises(engine.LatchWouldWait):
        lat.latch(s, wait=False)
    assert time.monotonic() - t < 0.5 and s.ops == ["clear"] and lat.latches() == []

    done = {}

    def latch_carol():
        t = time.monotonic()
        try:
            lat.latch(CarolSock(40002))
        except LatchRefused as exc:
            done["carol"] = (exc.cause, time.monotonic() - t)

    th = threading.Thread(target=latch_carol)
    th.start()
    time.sleep(0.3)                                 # carol's latch is waiting now
    t = time.monotonic()
    h = lat.latch(Sock())
    bob_took = time.monotonic() - t
    th.join(5)
    assert h.state is LatchState.ESTABLISHED and h.latch.params.peer.id == "bob"
    assert done["carol"][0] is Cause.IDENTITY_UNKNOWN and done["carol"][1] >= 1.4
    assert bob_took < 0.5, bob_took                # not behind carol's 1.5 s wait


def test_a_block_that_cannot_be_set_shuts_the_connection_down():
    # The latch breaks, and the kernel refuses the block (here ENOMEM): the connection must
    # not go on under the SPD's rules. The machine will not ask for the block again.
    import errno as errno_

    class Refusing(Sock):
        refuse = False

        def setsockopt(self, level, opt, value, length=None):
            if self.refuse:
                raise OSError(errno_.ENOMEM, "no memory for the policy")
            super().setsockopt(level, opt, value, length)

        def shutdown(self, how):
            self.ops.append(("shutdown", how))

    lat, view, src = _world()
    s = Refusing()
    h = lat.latch(s)
    s.refuse, src.down = True, True
    view.feed(encode.expire(_sa(LOCAL, PEER, 0x100), hard=False))
    lat.poll()
    assert h.state is LatchState.BROKEN and s.ops[-1] == ("shutdown", socket.SHUT_RDWR)


def _dual_stack_pair():
    """A connection from an IPv4 client to a dual-stack IPv6 listener, on loopback:
    (client, accepted; the accepted one an AF_INET6 socket with an IPv4-mapped peer)."""
    srv = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    with srv:
        c = socket.create_connection(("127.0.0.1", srv.getsockname()[1]), timeout=5)
        conn, peer = srv.accept()
    assert conn.family == socket.AF_INET6 and peer[0] == "::ffff:127.0.0.1"
    return c, conn


def test_an_ipv4_connection_of_an_ipv6_socket_is_latched_and_blocked_as_ipv4():
    # Its packets are IPv4: looked up as IPv4 (the SPD's IPv4 policies and SAs), and its
    # per-socket policies must have an IPv4 selector (set through IPV6_XFRM_POLICY): the
    # kernel does not apply an IPv6 one to them (a block would block nothing). Real sockets.
    from ipsecchan.latch.engine import flow_of, packet_family
    from ipsecchan.latch.enforce import apply, apply_all
    from ipsecchan.latch.machine import Block, Cause, Release
    c, conn = _dual_stack_pair()
    with c, conn:
        flow = flow_of(conn)
        assert (flow.family, flow.local, flow.remote) == (socket.AF_INET, "127.0.0.1",
                                                          "127.0.0.1")
        assert (flow.local_port, flow.remote_port) == (c.getpeername()[1],
                                                       c.getsockname()[1])
        assert packet_family(conn) == socket.AF_INET == packet_family(c)
        apply(conn, Block(Cause.NO_SA), flow.family)
        conn.send(b"held")
        c.settimeout(0.5)
        with pytest.raises(TimeoutError):
            c.recv(16)                    # blocked: nothing left
        apply_all(conn, [Release()], flow.family)
        c.settimeout(5)
        assert c.recv(16) == b"held"      # retransmitted once the block went


def test_latching_again_to_what_was_latched_before(monkeypatch):
    # A forked child adopting its parent's latch (ipsecchan.socket) latches with `expect`: the
    # same peer, or refused and blocked. Here mallory's SAs have replaced bob's since.
    from dataclasses import replace as replace_
    from ipsecchan.runtime import Runtime
    monkeypatch.setattr("ipsecchan.latch.status.StatusServer.start", lambda self: None)
    lat, view, src = _world()
    first = lat.latch(Sock(40010))
    bob = first.latch.params
    rt = Runtime(src, view)
    try:
        again = rt.latch(Sock(40011), Requirements(), expect=bob)
        assert again.state is LatchState.ESTABLISHED and again.latch.params.peer.id == "bob"
        # A latch to another peer than expected is refused before anything is pinned to it.
        other = replace_(bob, peer=replace_(bob.peer, id="carol"))
        s = Sock(40012)
        with pytest.raises(LatchRefused) as exc:
            rt.latch(s, Requirements(), expect=other)
        assert exc.value.cause is Cause.PEER_CHANGED
        assert s.ops[-2:] == [("out", None, "block"), ("in", None, "block")]
        # Same peer, weaker protection than expected: refused after latching, blocked.
        stronger = replace_(bob, protection=tuple(replace_(p, cipher_bits=512)
                                                  for p in bob.protection))
        s = Sock(40013)
        with pytest.raises(LatchRefused) as exc:
            rt.latch(s, Requirements(), expect=stronger)
        assert exc.value.cause is Cause.PROTECTION_WEAKER
        assert s.ops[-2:] == [("out", None, "block"), ("in", None, "block")]
        assert [h for h in rt.latcher.latches() if h.sock is s] == []
    finally:
        rt.close()


import errno as errno_                                          # noqa: E402


class _Broken:
    """A monitor whose next read fails (the notification socket went bad)."""

    def __init__(self, feed):
        self.feed, self.fail = feed, True

    def read(self):
        if self.fail:
            self.fail = False
            raise OSError(errno_.EIO, "netlink read failed")
        return self.feed.read()

    def close(self):
        pass


@pytest.mark.parametrize("follow_in_c", [True, False])
def test_unreadable_notifications_rebuild_the_view_or_break_every_latch(follow_in_c):
    # Notifications may be lost when their socket fails: the round rebuilds the view from a
    # dump and judges every latch against it; when even that fails, the truth cannot be
    # read and every latch is BROKEN (not verified) and blocked, never left ESTABLISHED on a
    # view that may be stale. Both with the index settling rekeys in C and without.
    lat, view, src = _world(EpochSource())
    lat.follow_in_c = follow_in_c
    s1, s2 = Sock(), Sock(40001)
    h1, h2 = lat.latch(s1), lat.latch(s2)
    assert (h1.slot >= 0) is follow_in_c
    dump = encode.dump([_sa(LOCAL, PEER, 0x100), _sa(PEER, LOCAL, 0x200)],
                       view.index.policies())
    rebuilt = []

    def resync():                     # a dump of what the kernel holds: the same SAs
        rebuilt.append(1)
        view.index.clear()
        view.index.apply(dump)
    view.resync = resync
    view.monitor = _Broken(view.monitor)
    assert lat.poll() == [] and rebuilt == [1]
    assert h1.state is h2.state is LatchState.ESTABLISHED

    def no_dump():
        raise OSError(errno_.ENOBUFS, "dump failed")
    view.resync = no_dump
    view.monitor = _Broken(view.monitor.feed)
    alerts = lat.poll()
    assert sorted((h.id, a.new, a.cause) for h, a in alerts) == [
        (h1.id, LatchState.BROKEN, Cause.NOT_VERIFIED),
        (h2.id, LatchState.BROKEN, Cause.NOT_VERIFIED)]
    assert "dump failed" in h1.latch.detail
    for s in (s1, s2):
        assert s.ops[-2:] == [("out", None, "block"), ("in", None, "block")]
    # Still no dump: a new latch is refused (unverified), and the next round changes nothing.
    with pytest.raises(LatchRefused) as exc:
        lat.latch(Sock(40002))
    assert exc.value.cause is Cause.NOT_VERIFIED
    view.monitor = view.monitor.feed
    assert lat.poll() == [] and h1.state is LatchState.BROKEN
    # A dump works again: the view is rebuilt, and the latches come back (their SAs are the
    # latched ones), with no notification needed.
    view.resync = resync
    alerts = lat.poll()
    assert rebuilt == [1, 1] and len(alerts) == 2
    assert h1.state is h2.state is LatchState.ESTABLISHED
    assert lat.latch(Sock(40003)).state is LatchState.ESTABLISHED


@pytest.mark.parametrize("follow_in_c", [True, False])
def test_a_failed_round_is_made_up_for_by_judging_every_latch(follow_in_c, monkeypatch):
    # A bug or an allocation failure in the middle of a round: its events are consumed, so
    # the next round judges every latch again (here: the SAs were flushed in the failed
    # round, and no further notification comes).
    lat, view, src = _world(EpochSource())
    lat.follow_in_c = follow_in_c
    s = Sock()
    h = lat.latch(s)
    real = lat._observe
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("in the middle of a round")
        return real(*a, **k)
    monkeypatch.setattr(lat, "_observe", failing)
    view.feed(encode.flushsa())
    with pytest.raises(MemoryError):
        lat.poll()
    assert h.state is LatchState.ESTABLISHED and lat.has_work()
    alerts = lat.poll()
    assert [(a.new, a.cause) for _, a in alerts] == [(LatchState.BROKEN, Cause.NO_SA)]
    assert s.ops[-2:] == [("out", None, "block"), ("in", None, "block")]
    assert lat.poll() == [] and not lat._judge_all

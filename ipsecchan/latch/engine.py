"""In-process latching: the kernel view, an identity source and the latch machines, joined.

The Latcher owns an XfrmView (the C index kept current from XFRM notifications) and an
IdentitySource (strongSwan over VICI, static entries). latch(sock) observes the connection,
pins it, observes again and confirms (machine.Latch's LATCHING step); poll() turns XFRM and
IKE events into observations of the latches they reach (LatchRegistry), carries out the
effects on the sockets and hands the alerts to each latch's owner.

Observations are made of the main SPD's answer, not the socket's own pin: the pin keeps the
connection on its SAs, the SPD says what the system would now carry it with (a rekey to
follow, or an impostor to refuse).
"""
from __future__ import annotations

import _socket
import errno
import gc
import itertools
import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from ipsecchan.ike.base import IdentitySource, SAIdentity, State
from ipsecchan.latch.enforce import apply_all, apply_tracked
from ipsecchan.latch.machine import (Alert, Block, Cause, Latch, LatchParams, LatchRefused,
                                     LatchState, Observation, Party, Policy, Release,
                                     Requirements, SAFacts, conflict, keeps,
                                     make_latch_params, make_sa_facts)
from ipsecchan.latch.protection import Protection
from ipsecchan.latch.registry import LatchRegistry
from ipsecchan.xfrm import Template, set_socket_policy
from ipsecchan.xfrm.lookup import Flow
from ipsecchan.xfrm.index import FOLLOW_IN, INBOUND, KEEP, MOVED, NEED, TAG_MAX, Index, SARef
from ipsecchan.xfrm.messages import SA, XfrmEvent

log = logging.getLogger("ipsecchan")
_PROTOS = {socket.SOCK_STREAM: socket.IPPROTO_TCP, socket.SOCK_DGRAM: socket.IPPROTO_UDP}
# How long an SA the IKE daemon has not reported may wait for it (the kernel gets a rekey's
# SAs before the daemon's event says whose they are). After that, unknown is unknown.
IDENTITY_GRACE = 5.0
# Alerts a handle keeps (the oldest are dropped; owners and observers hear every one).
ALERTS_LIMIT = 16
# Bound on the per-SA caches (facts, parties, protections); they are cleared when exceeded.
_CACHE_LIMIT = 1 << 16


# How long a latch waits for the SAs an IPsec policy asks for when none carries the connection
# yet (negotiated on demand: strongSwan's start_action=trap), before it is refused (no-sa).
SA_GRACE = 5.0


def _waits(obs: Observation) -> bool:
    return obs.pending or (obs.verified and "no-sa" in (obs.out_verdict, obs.in_verdict))


class LatchWouldWait(Exception):
    """latch()/accept() with wait=False: the latch would have to wait for the identity
    source (new SAs it has not named yet) or for SAs being negotiated. Nothing was latched;
    try again with waiting."""


# What _facts answers for an SA verified earlier in the same round.
_ASKED = SAIdentity(State.VERIFIED, "latcher", "verified earlier in this round")

_FAMILIES = {socket.AF_INET: int(socket.AF_INET), socket.AF_INET6: int(socket.AF_INET6)}
_AF_INET, _AF_INET6 = int(socket.AF_INET), int(socket.AF_INET6)
# A socket.socket's family and type as plain ints (its properties convert them to enums).
_RAW_FAMILY, _RAW_TYPE = _socket.socket.family.__get__, _socket.socket.type.__get__


def _family_proto(sock: socket.socket) -> tuple[int, int]:
    if isinstance(sock, socket.socket):
        family, type_ = _RAW_FAMILY(sock), _RAW_TYPE(sock)
    else:                                    # a stand-in (the broker's ClientSocket)
        family, type_ = sock.family, sock.type
    family = _FAMILIES.get(family)
    if family is None:
        raise ValueError("only IPv4 and IPv6 sockets latch")
    proto = _PROTOS.get(type_ & 0xF)
    if proto is None:
        raise ValueError("only TCP and UDP sockets latch")
    return family, proto


def _proto(sock: socket.socket) -> int:
    return _family_proto(sock)[1]


def flow_of(sock: socket.socket, mark: int | None = None) -> Flow:
    """The connection's flow, read from the socket itself (never from a caller's word).
    `mark`: the socket's SO_MARK when the caller knows it already (an accepted socket has its
    listener's), saving a syscall."""
    family, proto = _family_proto(sock)
    local, remote = sock.getsockname(), sock.getpeername()
    if mark is None:
        mark = sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
    laddr, raddr = local[0], remote[0]
    if family == _AF_INET6 and raddr.startswith("::ffff:") and laddr.startswith("::ffff:") \
            and "." in raddr:
        # An IPv6 socket's IPv4 connection (a dual-stack listener's IPv4 client): its packets
        # are IPv4, looked up and protected as IPv4 (the kernel's flow is IPv4), and its pins
        # must say so (enforce: an IPv6 selector does not apply to them).
        family, laddr, raddr = _AF_INET, laddr[7:], raddr[7:]
    # Interned: every latch with the same peer shares its address text.
    return Flow(family, proto, sys.intern(laddr), local[1], sys.intern(raddr), remote[1],
                mark=mark)


def packet_family(sock) -> int:
    """The family of a connected socket's packets: AF_INET for an IPv6 socket with an
    IPv4-mapped peer (see flow_of), else the socket's own. What a block needs when no flow is
    at hand (a refused latch)."""
    family = _family_proto(sock)[0]
    if family == _AF_INET6:
        try:
            peer = sock.getpeername()[0]
        except OSError:
            return family
        if peer.startswith("::ffff:") and "." in peer:
            return _AF_INET
    return family


def _cut(sock, hid: int) -> None:
    """A broken latch whose block could not be set: the connection is shut down both ways
    instead (the machine, BROKEN now, will not ask for the block again, and the kernel would
    go on carrying the connection under the SPD's rules)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
        log.warning("latch %d: connection shut down (its block could not be set)", hid)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            log.error("latch %d: neither blocked nor shut down: %s", hid, exc)


def _party(ident) -> Party | None:
    return None if ident is None else Party(ident.id, ident.pubkey_sha256, ident.auth)


@dataclass(eq=False, slots=True)
class LatchHandle:
    """A latched socket: its flow (None for a listener), its latch, and who hears its
    alerts. `listener`: the listener's handle id for an accepted connection."""
    id: int
    sock: socket.socket
    flow: Flow | None
    latch: Latch
    on_alert: Callable[["LatchHandle", Alert], None] | None = None
    alerts: list = field(default_factory=list)
    listener: int | None = None
    mark: int = 0
    pin_in: bytes | None = None      # the IN policy this latch's last pin set (enforce)
    slot: int = -1                   # its slot in the index's followed flows (-1: none)
    watch: int = -1                  # its slot in the index's watched flows (-1: none)

    @property
    def state(self) -> LatchState:
        return self.latch.state


class _PinTrack:
    """What enforce.apply_tracked keeps for a latch being made (its handle does it after)."""
    __slots__ = ("pin_in",)

    def __init__(self) -> None:
        self.pin_in = None


def listener_templates(policies, family: int) -> list[Template] | None:
    """The IN pin of a listening socket, or None when none can be set.

    A listener does not know its peers, so its pin cannot name an SA or a reqid; the kernel
    clones it into every connection the listener accepts, so it guards the first SYN (or
    datagram) before any latch exists. It can be one template (protocol and mode, any reqid)
    only when every IN policy of the SPD that asks for IPsec asks for one kind of
    transport-mode SA: tunnel templates name the tunnel's endpoints, which differ per peer.
    Otherwise the SPD alone guards the first packets and the accepted connection is pinned as
    soon as it is accepted."""
    kinds = {(t.proto, t.mode) for p in policies if p.dir == "in" and p.action == "allow"
             and p.selector.family in (0, family) for t in p.templates if not t.optional}
    if len(kinds) != 1:
        return None
    proto, mode = kinds.pop()
    if mode != "transport":
        return None
    return [Template(family, "", "", proto, 0, 0, mode, False)]


class Latcher:
    def __init__(self, identities: IdentitySource, view=None):
        if view is None:
            from ipsecchan.xfrm.monitor import XfrmView
            view = XfrmView(Index, light=True)
        self.view = view
        self.identities = identities
        self.registry = LatchRegistry()
        # Latches' new SA keys not yet in the registry: a rekey round moves thousands of
        # latches, and only events the index does not place (policy changes, tunnel SAs, IKE
        # events) read the registry's keys; they are brought in before those are looked up.
        self._keys_due: dict[int, tuple] = {}
        self.handles: dict[int, LatchHandle] = {}
        self._ids = itertools.count(1)
        self._backlog: list = []     # XFRM events read while observing, for the next poll()
        self._view_lost: OSError | None = None    # notifications lost, view not rebuilt yet
        self._judge_all = False          # a round failed: judge every latch in the next one
        self._pending: set[int] = set()   # latches whose last observation was pending
        # Per SA key, the last verified answer: [SA record, SAFacts, validity]. The facts stand
        # while the index hands out the same record (one object per version of an SA) and the
        # identity source names the same parties; the source is asked again in every round
        # (it may have become unavailable) or epoch (see _next_round), but once per round: a
        # round is one latch() or accept() (both of its looks), one poll(), or one
        # observe(). The parties outlive the
        # source's listing: an SA's peer cannot change during its life, and strongSwan stops
        # listing a rekeyed CHILD_SA while its inbound SA still lives a few seconds (charon's
        # delete_rekeyed_delay). Forgotten when the SA goes.
        self._sa_facts: dict[tuple, list] = {}
        self._round = 0
        self._valid = (1, 0)             # what a cached verified answer must carry to stand
        self._parties: dict = {}         # Identity -> Party
        self._sides: dict = {}           # ids of SAFacts -> a (shared) tuple of them
        self._protections: dict = {}     # (proto, mode, algorithms, encap) -> Protection
        self._seen: dict = {}            # this round's observations, by index answer (_observe)
        # Revalidation in C (Index.revalidate): ESTABLISHED latches whose SAs are all of one
        # class (identities and protection, tagged on the SA records) that keeps them are
        # followed by the index itself, which settles a rekey of such a latch (all its new SAs
        # tagged with its class) without an Observation. Only with the C index and an identity
        # source whose answers stand for an epoch (tags live as long as those answers).
        self._in_c = False
        self._watch_hids: list[int | None] = []   # watched slot -> latch id (None: free)
        self._free_watch: list[int] = []
        self.follow_in_c = isinstance(view.index, Index)
        self._classes: dict[tuple, tuple] = {}   # ids of (local, peer, protection) -> tag
        self._class_ids = itertools.count(1)
        self._class_generation = 0
        self._tagged: dict[int, SAFacts] = {}   # SA handle -> the facts its tag stands for
        self._tags_valid = None                  # the _valid the tags were set under
        self._tag_bound = 4096                   # when to look for handles long gone
        self._free_slots: list[int] = []
        self._slots = 0
        self._carried_memo: dict = {}            # parameters _carried made (shared)
        # Latching, polling and releasing may come from several threads (the socket API's
        # event thread, the application's); one lock, never taken on the data path.
        self.lock = threading.RLock()
        self._idle = threading.Condition(self.lock)    # to wait without holding the lock
        # Called with (handle, alert) for every alert of every latch, after its owner: for
        # `ipsecchan watch` and status queries. Must not block.
        self.observers: list[Callable[[LatchHandle, Alert], None]] = []

    # -- observing --
    def _party_of(self, ident) -> Party | None:
        if ident is None:
            return None
        p = self._parties.get(ident)
        if p is None:
            if len(self._parties) > _CACHE_LIMIT:
                self._parties.clear()
            p = self._parties[ident] = _party(ident)
        return p

    def _protection_of(self, sa: SA | SARef) -> Protection:
        ref = type(sa) is SARef
        key = sa.prot_key if ref else (sa.proto, sa.mode, sa.algorithms, sa.encap is not None)
        p = self._protections.get(key)
        if p is None:
            if len(self._protections) > _CACHE_LIMIT:
                self._protections.clear()
            p = self._protections[key] = Protection.of(sa.full() if ref else sa)
        return p

    def _next_round(self) -> None:
        """A new round: verified answers cached in an earlier one are asked again, unless the
        identity source has epochs (IdentitySource.epoch): within an epoch a verified answer
        stands (an SA's identities cannot change during its life; losing the daemon starts a
        new epoch)."""
        self._round += 1
        self._seen.clear()
        epoch = getattr(self.identities, "epoch", None)
        self._valid = (0, epoch) if epoch is not None else (1, self._round)
        if self._valid != self._tags_valid and self.follow_in_c:
            # A new epoch: the identity answers the tags stand for are asked again.
            if self._tagged:
                self._untag_all()
            self._tags_valid = self._valid

    # -- watched latches: which ones SA notifications reach, told by the C index --
    @property
    def follow_in_c(self) -> bool:
        """The C index settles rekeys (followed latches) and says which latches SA
        notifications reach (watched latches: every latch with a flow), with no Python event
        per notification; else the Python judgement and registry do all of it."""
        return self._in_c

    @follow_in_c.setter
    def follow_in_c(self, on: bool) -> None:
        on = bool(on) and isinstance(self.view.index, Index)
        if on == self._in_c:
            return
        self._in_c = on
        if getattr(self.view, "light", False):
            self.view.sa_events = not on
        if not on:
            self._judge_all = True      # (marks the index took meanwhile are not read now)
        for handle in list(self.handles.values()):
            if on:
                self._watch(handle)
            else:
                self._unfollow(handle)
                self._unwatch(handle)

    def _watching(self) -> bool:
        return self._in_c and getattr(self.view, "sa_events", True) is False

    def _watch(self, handle: LatchHandle) -> None:
        if not self._watching() or handle.flow is None or handle.watch >= 0:
            return
        slot = self._free_watch.pop() if self._free_watch else len(self._watch_hids)
        try:
            self.view.index.watch(slot, handle.flow)
        except ValueError:
            self._free_watch.append(slot)
            raise
        if slot == len(self._watch_hids):
            self._watch_hids.append(handle.id)
        else:
            self._watch_hids[slot] = handle.id
        handle.watch = slot

    def _unwatch(self, handle: LatchHandle) -> None:
        if handle.watch >= 0:
            self.view.index.unwatch(handle.watch)
            self._watch_hids[handle.watch] = None
            self._free_watch.append(handle.watch)
            handle.watch = -1

    # -- class tags and followed latches (revalidation in C) --
    def _following(self) -> bool:
        return self.follow_in_c and self._valid[0] == 0

    def _untag_all(self) -> None:
        self._tagged.clear()
        self._carried_memo.clear()           # (made of the facts the tags stood for)
        self.view.index.clear_tags()

    def _class_tag(self, f: SAFacts) -> int:
        key = (id(f.local), id(f.peer), id(f.protection))
        hit = self._classes.get(key)
        if hit is None:
            tag = next(self._class_ids)
            if tag > TAG_MAX:
                self._reset_classes()
                tag = next(self._class_ids)
            hit = self._classes[key] = (f.local, f.peer, f.protection, tag)
        return hit[3]

    def _reset_classes(self) -> None:
        """Tags are 16 bits in the index: when they run out, start over. No SA record and no
        followed latch keeps an old tag (those latches are judged in Python when next
        touched, and followed again)."""
        self._classes.clear()
        self._class_ids = itertools.count(1)
        self._class_generation += 1
        self._untag_all()
        for handle in self.handles.values():
            self._unfollow(handle)

    def _tag(self, sa: SARef, f: SAFacts) -> None:
        """Label an identified SA record with its class (only verified identities)."""
        h = sa.handle
        if f.local is None or f.peer is None or self._tagged.get(h) is f:
            return
        tagged = self._tagged
        if len(tagged) > self._tag_bound:
            self._bound_tags()
        if self.view.index.set_tag(h, self._class_tag(f)):
            tagged[h] = f

    def _bound_tags(self) -> None:
        index = self.view.index
        if len(self._tagged) > 2 * len(index) + 1024:
            self._untag_all()                # handles of records long gone: start over
        self._tag_bound = max(2 * len(index) + 1024, len(self._tagged) + 1024)

    def _refollow(self, handle: LatchHandle) -> None:
        """Follow the latch in C when C can settle its rekeys (see follow_in_c), else not."""
        if not self._following() or handle.flow is None:
            return
        latch = handle.latch
        params = latch.params
        ok = (latch.state is LatchState.ESTABLISHED and params is not None and params.protected
              and len(params.out_sas) == 1 and 1 <= len(params.in_sas) <= FOLLOW_IN
              and handle.id not in self._pending)
        if ok:
            f = params.out_sas[0]
            ok = all(s.local is f.local and s.peer is f.peer and s.protection is f.protection
                     for s in params.in_sas) and keeps(params, f, latch.requirements)
        index = self.view.index
        if ok:
            if handle.slot < 0:
                if self._free_slots:
                    handle.slot = self._free_slots.pop()
                else:
                    handle.slot, self._slots = self._slots, self._slots + 1
            try:
                index.follow(handle.slot, handle.flow, self._class_tag(f), f.key, f.reqid,
                             [s.key for s in params.in_sas])
                return
            except ValueError:
                pass                          # not one C can follow: the Python judgement
        self._unfollow(handle)

    def _unfollow(self, handle: LatchHandle) -> None:
        """Stop following the latch in C (its slot is freed: slot >= 0 means followed)."""
        if handle.slot >= 0:
            self.view.index.unfollow(handle.slot)
            self._free_slots.append(handle.slot)
            handle.slot = -1

    def _facts(self, sa: SA | SARef) -> tuple[SAFacts | None, SAIdentity]:
        key = sa.key
        hit = self._sa_facts.get(key)
        if hit is not None and hit[0] is sa and hit[2] == self._valid:
            return hit[1], _ASKED           # verified this round (or this epoch) already
        ans = self.identities.identify(sa)
        state = ans.state
        if state is State.VERIFIED:
            local, peer = self._party_of(ans.local), self._party_of(ans.peer)
            if hit is not None and hit[0] is sa and hit[1].local is local \
                    and hit[1].peer is peer:
                hit[2] = self._valid
                return hit[1], ans
            facts = make_sa_facts(key, sa.reqid, self._protection_of(sa), local, peer,
                                  sa.src)
            self._sa_facts[key] = [sa, facts, self._valid]
            return facts, ans
        if state is State.UNAVAILABLE:
            return None, ans
        if hit is not None and hit[1].peer is not None:
            # Verified before, no longer listed (a rekeyed CHILD_SA's lingering inbound SA).
            ans = replace(ans, state=State.VERIFIED)
            if hit[0] is sa:
                return hit[1], ans
            return SAFacts(key, sa.reqid, self._protection_of(sa), hit[1].local, hit[1].peer,
                           sa.src), ans
        return SAFacts(key, sa.reqid, self._protection_of(sa), None, None, sa.src), ans

    def observe(self, flow: Flow, fresh: bool = True) -> Observation:
        """The system's answer for a flow, now. Fails closed: any part that cannot be read
        makes it unverified. fresh=False skips reading pending XFRM notifications first (the
        first look of a latch may: the confirming look after pinning reads them, and any
        change it finds is judged against the first)."""
        with self.lock:
            self._next_round()
            return self._observe(flow, fresh)

    def _observe(self, flow: Flow, fresh: bool = True) -> Observation:
        if self._view_lost is not None:
            return Observation(False, reason=f"XFRM view not rebuilt since: {self._view_lost}")
        if fresh:
            try:
                self._take(self.view.poll())
            except OSError as exc:
                return Observation(False, reason=f"XFRM notifications: {exc}")
        brief = self._lookup(flow)
        # Latches on the same SAs get the same answer object from the index (cached by its
        # words): within a round, so is their observation (identity answers stand for the
        # round). Held by the entry, so that the id stays the answer's.
        memo = self._seen.get(id(brief))
        if memo is not None and memo[0] is brief:
            return memo[1]
        out_verdict, out_sas, in_verdict, in_sas, in_clear = brief
        pending, now = False, None
        tagging = self._following()         # (then the SAs are the C index's SARefs)
        sides = []
        facts_of, shared_sides = self._facts, self._sides
        for sas in (out_sas, in_sas):
            facts = []
            for sa in sas:
                f, ans = facts_of(sa)
                if f is None:
                    return Observation(False, reason=f"identity source: {ans.reason}")
                if ans.state is State.UNKNOWN:
                    # The clock is read only here: under user-mode-linux a clock read is a
                    # system call, and the common case needs none.
                    now = time.time() if now is None else now
                    pending |= now - sa.add_time < IDENTITY_GRACE
                elif tagging:
                    self._tag(sa, f)
                facts.append(f)
            # One tuple object per distinct list of SAFacts objects: latches on the same SAs
            # share it in their parameters. Keyed by the objects' ids (hashing SAFacts by
            # value costs more than the tuple saves); the entry holds the objects, so their
            # ids stay theirs.
            ids = tuple(map(id, facts))
            shared = shared_sides.get(ids)
            if shared is None:
                if len(shared_sides) >= 1024:
                    shared_sides.clear()
                shared = shared_sides[ids] = tuple(facts)
            sides.append(shared)
        obs = Observation(True, out_verdict, in_verdict, sides[0], sides[1], in_clear,
                          pending=pending)
        if not pending:
            if len(self._seen) >= 1024:
                self._seen.clear()
            self._seen[id(brief)] = (brief, obs)
        return obs

    def _lookup(self, flow: Flow) -> tuple[str, tuple, str, tuple, bool]:
        """(OUT verdict, OUT SAs, IN verdict, IN SAs, IN accepts cleartext) for the flow. The
        C index answers with SARefs (nothing decoded); the reference model with SAs."""
        index = self.view.index
        if isinstance(index, Index):
            return index.lookup_brief(flow)
        res = index.lookup(flow)
        return (res.out.verdict, res.out.sas, res.inbound.verdict, res.inbound.sas,
                res.inbound.cleartext_accepted)

    def _only_gone(self, handle: LatchHandle, keys: set) -> bool:
        """The kernel's answer for the latch's flow is the latched one without the SAs
        `keys` names: then that is all an observation would find (the identities of the SAs
        left were verified in this epoch and their records did not change, or an event would
        have reached the latch)."""
        params = handle.latch.params
        if params is None or not params.protected:
            return False
        out_verdict, out_sas, in_verdict, in_sas, in_clear = self._lookup(handle.flow)
        return (out_verdict == in_verdict == "protected" and not in_clear
                and [s.key for s in out_sas] == [s.key for s in params.out_sas]
                and [s.key for s in in_sas] == [s.key for s in params.in_sas
                                                if s.key not in keys])

    def _settled(self, flow: Flow, fresh: bool = True, wait: bool = True) -> Observation:
        """An observation to latch on: wait while the identity source has not named the SAs
        yet (pending), or while a policy asks for IPsec and no SA carries the flow yet (the
        IKE daemon negotiating them on demand: a connected UDP socket's connect() sends
        nothing, only its route lookup makes the kernel ask for them), up to IDENTITY_GRACE
        and SA_GRACE; or, wait=False, raise LatchWouldWait."""
        obs = self._observe(flow, fresh)
        if not _waits(obs):
            return obs
        if not wait:
            raise LatchWouldWait("the identity source has not named the SAs yet"
                                 if obs.pending else "no SA carries the connection yet")
        end = time.monotonic() + max(IDENTITY_GRACE, SA_GRACE)
        while time.monotonic() < end:
            # Waiting on the condition lets go of the lock (all its levels) meanwhile: other
            # threads' latches and event rounds go on while this one waits for the daemon.
            # Whatever they change, the next look below reads.
            self._idle.wait(0.05)
            obs = self._observe(flow, True)
            if not _waits(obs):
                return obs
        return replace(obs, pending=False)

    # -- latching --
    def latch(self, sock: socket.socket, requirements: Requirements = Requirements(),
              on_alert: Callable[[LatchHandle, Alert], None] | None = None, *,
              mark: int | None = None, wait: bool = True,
              expect: LatchParams | None = None) -> LatchHandle:
        """Latch a connected socket, or raise LatchRefused (the socket is then released).
        wait=False: raise LatchWouldWait (nothing latched, the socket released) instead of
        waiting for the identity source to name new SAs (up to IDENTITY_GRACE) or for the
        SAs a policy asks for (up to SA_GRACE).
        `expect`: the parameters the connection was latched to before (the broker restarted;
        a forked child adopts its parent's latch). The latch must carry the same peer (and
        key) and no weaker protection: another peer is refused (PEER_CHANGED) before anything
        of it is pinned; a mismatch found once latched is refused with the connection
        blocked."""
        flow = flow_of(sock, mark)
        implied = expect is not None and expect.protected and requirements.peer_id is None
        req = replace(requirements, peer_id=expect.peer.id) if implied else requirements
        with self.lock:
            latch = Latch.connector(req)
            try:
                handle = self._establish(sock, flow, latch, lambda obs: latch.begin(obs),
                                         on_alert, wait=wait)
            except LatchRefused as exc:
                if implied and exc.cause is Cause.PEER_NOT_REQUIRED:
                    raise LatchRefused(Cause.PEER_CHANGED, exc.detail) from None
                raise
            if expect is not None:
                cause, detail = conflict(handle.latch.params, expect, req)
                if cause is not None:        # same peer, another key; weaker protection
                    # Blocked before the latch goes (forget: its pins are not cleared first).
                    apply_all(sock, [Block(cause)], flow.family)
                    self.forget(handle)
                    raise LatchRefused(cause, detail)
            return handle

    def listen(self, sock: socket.socket, requirements: Requirements = Requirements(),
               on_alert: Callable[[LatchHandle, Alert], None] | None = None) -> LatchHandle:
        """A LISTENER latch for a listening (or bound UDP) socket. With protection required
        and a listener pin possible (listener_templates), the socket gets an IN policy that
        the kernel clones into each accepted connection, so even the first SYN must come
        through an SA; accept() then latches each connection."""
        _proto(sock)
        mark = sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
        with self.lock:
            if requirements.policy is Policy.REQUIRE:
                self.poll_xfrm()
                tmpls = listener_templates(self.view.index.policies(), sock.family)
                if tmpls is not None:
                    set_socket_policy(sock, "in", tmpls)
            handle = LatchHandle(next(self._ids), sock, None, Latch.listener(requirements),
                                 on_alert, mark=mark)
            self.handles[handle.id] = handle
            return handle

    def accept(self, listener: LatchHandle, conn: socket.socket,
               on_alert: Callable[[LatchHandle, Alert], None] | None = None, *,
               wait: bool = True) -> LatchHandle:
        """Latch a connection `listener`'s socket accepted, or raise LatchRefused (the
        connection is then blocked both ways: the caller should close it). wait=False: as
        for latch()."""
        flow = flow_of(conn, listener.mark)
        with self.lock:
            holder: list[Latch] = []

            def begin(obs):
                child, effects = listener.latch.accept(obs)
                holder.append(child)
                return effects
            try:
                return self._establish(conn, flow, holder, begin, on_alert, listener.id,
                                       wait=wait)
            except LatchRefused:
                # The connection carries the listener's cloned pin, and perhaps traffic the
                # latch refused: block it rather than leave it to the SPD.
                apply_all(conn, [Block(Cause.NOT_VERIFIED)], flow.family)
                raise

    def _establish(self, sock, flow, latch_or_holder, begin, on_alert, listener=None,
                   wait: bool = True):
        latch = None
        self._next_round()
        track = _PinTrack()
        try:
            first = self._settled(flow, fresh=False, wait=wait)
            effects = begin(first)
            latch = latch_or_holder[0] if isinstance(latch_or_holder, list) else latch_or_holder
            apply_tracked(sock, effects, flow.family, track)
            alerts = apply_tracked(sock, latch.confirm(self._confirming(flow, first, wait)),
                                   flow.family, track)
        except BaseException:
            if latch is not None and latch.state is not LatchState.CLOSED:
                latch.close()
            if listener is None:
                apply_all(sock, [Release()], flow.family)
            raise
        handle = LatchHandle(next(self._ids), sock, flow, latch, on_alert, listener=listener,
                             pin_in=track.pin_in)
        self.handles[handle.id] = handle
        self.registry.add(handle.id, flow, _keys(latch))
        try:
            self._watch(handle)
        except BaseException:
            self.release(handle)
            raise
        self._refollow(handle)
        self._deliver(handle, alerts)
        return handle

    def _confirming(self, flow: Flow, first: Observation, wait: bool = True) -> Observation:
        """The look after pinning: what the kernel says now. The notifications that came
        since the first look are read (the race the pin-then-confirm step closes shows there:
        an SA replaced or added meanwhile). None came and the default policy is the same: the
        index is as the first look saw it, and this round's identity answers stand, so the
        first observation is the answer."""
        index = self.view.index
        defaults = (index.default_in, index.default_out)
        try:
            events = self.view.poll()
        except OSError as exc:
            return Observation(False, reason=f"XFRM notifications: {exc}")
        if events:
            self._take(events)
        elif not first.pending and defaults == (index.default_in, index.default_out):
            return first
        return self._settled(flow, fresh=False, wait=wait)

    def release(self, handle: LatchHandle) -> None:
        """Close the latch and remove the socket's per-socket policies (before the socket is
        closed: the kernel keeps a closed TCP socket, with its policies, until FIN_WAIT
        ends)."""
        with self.lock:
            self._pending.discard(handle.id)
            self.registry.remove(handle.id)
            self._keys_due.pop(handle.id, None)
            if self.handles.pop(handle.id, None) is handle:
                self._unfollow(handle)
                self._unwatch(handle)
            if handle.latch.state is not LatchState.CLOSED:
                effects = handle.latch.close()
                handle.pin_in = None
                try:
                    apply_all(handle.sock, effects)
                except OSError as exc:
                    if exc.errno != errno.EBADF:
                        raise
                    # Closed before its release: its policies went with it.
                self._deliver(handle, [e for e in effects if isinstance(e, Alert)])

    def forget(self, handle: LatchHandle) -> None:
        """Close the latch without any effect on its socket: its pins stay (another process
        holds the socket too, and its connection must not lose them), nobody here follows
        it any more."""
        with self.lock:
            if self.handles.get(handle.id) is not handle:
                return              # not this Latcher's (another process's, before a fork)
            self._pending.discard(handle.id)
            self.registry.remove(handle.id)
            self._keys_due.pop(handle.id, None)
            del self.handles[handle.id]
            self._unfollow(handle)
            self._unwatch(handle)
            if handle.latch.state is not LatchState.CLOSED:
                effects = handle.latch.close()
                self._deliver(handle, [e for e in effects if isinstance(e, Alert)])

    def latches(self) -> list[LatchHandle]:
        """The live latches, listeners included (a copy: safe from any thread)."""
        with self.lock:
            return list(self.handles.values())

    def poll_xfrm(self) -> None:
        """Bring the kernel view up to date now (its events wait for the next poll())."""
        self._take(self.view.poll())

    def _take(self, events) -> None:
        """XFRM events just applied to the index: kept for the next poll(), and what they end
        forgotten at once (an SA gone takes its verified identities with it)."""
        if not events:
            return
        self._backlog += events
        for ev in events:
            kind = ev.kind
            if kind == "sa-flush" or kind == "resync":
                self._sa_facts.clear()
                if self._tagged:
                    self._untag_all()
            elif kind == "sa-delete" or (kind == "sa-expire" and ev.hard):
                self._sa_facts.pop(ev.sa_key, None)
            elif kind == "sa-changes":
                for key in ev.removed:
                    self._sa_facts.pop(key, None)

    # -- following events --
    def has_work(self) -> bool:
        """Whether poll() has anything to do but XFRM notifications not read yet (whoever
        asks watches view.monitor for those): notifications read meanwhile, latches waiting
        for their identities, IKE events. Read without the lock (a hint: a caller asks again
        at its next turn)."""
        if self._backlog or self._pending or self._judge_all:
            return True
        has = getattr(self.identities, "has_events", None)
        return has is None or has()

    def poll(self, timeout: float = 0.0) -> list[tuple[LatchHandle, Alert]]:
        """Apply pending XFRM and IKE events to the latches they reach."""
        if timeout and not self._backlog:
            # Wait outside the lock, so that latching is not held up by an idle poller.
            self.view.wait(timeout)
        with self.lock:
            return self._poll()

    def _poll(self) -> list[tuple[LatchHandle, Alert]]:
        # A round over a burst of notifications (a rekey of thousands of SAs, a flush)
        # allocates hundreds of thousands of short-lived objects, none in cycles; the cyclic
        # collector would sweep the whole heap (every latch) many times meanwhile: a third of
        # such a round's time. It is paused while the round runs (then runs if it was on).
        pause = gc.isenabled()
        if pause:
            gc.disable()
        try:
            return self._round_of_events()
        except BaseException:
            # The round's events are consumed: whatever they should have done to which latch
            # is not known. The next round judges every latch again.
            self._judge_all = True
            raise
        finally:
            if pause:
                gc.enable()

    def _round_of_events(self) -> list[tuple[LatchHandle, Alert]]:
        self._next_round()
        touched: set[int] = set()
        if self._judge_all:
            self._judge_all = False
            touched = self.registry.ids()
        unreadable = None
        lost = self._view_lost
        if lost is None:
            try:
                self._take(self.view.poll(0))
            except OSError as exc:
                lost = exc
        if lost is not None:
            # Notifications could not be read, so some may be lost: the view is rebuilt
            # from a dump, and every latch judged against it. If that fails too, the kernel's
            # truth cannot be read: every latch is judged unverified (BROKEN, blocked), and
            # so is every new one, until a rebuild succeeds (tried again every round).
            touched = self.registry.ids()
            try:
                self.view.resync()
                self._view_lost = None
                self._take([XfrmEvent("resync")])
            except OSError as again:
                self._view_lost = lost
                unreadable = Observation(False, reason=f"XFRM notifications: {lost}; "
                                                       f"dump: {again}")
        if self._watching():
            # The latches SA notifications reached, as the index marked them applying them.
            slots = self.view.index.touched()
            if slots is None:
                touched = self.registry.ids()
            else:
                hids = self._watch_hids
                touched.update([hid for s in slots if (hid := hids[s]) is not None])
        events, self._backlog = self._backlog, []
        collect, affected = self.registry.collect, self.registry.affected
        # SAs removed (a rekey's old ones going): a latch they alone reached, whose flow the
        # kernel now carries on its latched SAs less those, is told which went
        # (Latch.inbound_gone) instead of being observed and judged again, when its identity
        # answers stand for the source's whole epoch (a source without epochs is asked again
        # in every round).
        gone: dict[int, set] = {}
        quick = self._valid[0] == 0
        if self._keys_due and any(ev.kind != "sa-changes" for ev in events):
            self._sync_keys()
        for ev in events:
            kind = ev.kind
            if kind == "sa-changes":
                continue                        # (whom they reach: the index said above)
            if quick and (kind == "sa-delete" or (kind == "sa-expire" and ev.hard)):
                key = ev.sa_key
                for hid in affected(ev):
                    keys = gone.get(hid)
                    if keys is None:
                        gone[hid] = {key}
                    else:
                        keys.add(key)
            else:
                collect(ev, touched)
        while (ike := self.identities.next_event(0)) is not None:
            self._sync_keys()
            if ike.kind in ("daemon-lost", "daemon-back"):
                touched |= self.registry.ids()
            for side in (ike.old, ike.new):
                if side is not None:
                    touched |= self.registry.affected_by_spis(
                        s for s in (side.spi_in, side.spi_out) if s)
        pending = self._pending
        handles = self.handles
        for hid, keys in gone.items():
            if hid in touched or hid in pending:
                continue                        # observed below in any case
            handle = handles.get(hid)
            if handle is None or handle.flow is None:
                continue
            latch = handle.latch
            if handle.slot < 0 and latch.state is LatchState.ESTABLISHED \
                    and self._only_gone(handle, keys) and latch.inbound_gone(keys) is not None:
                self._keys_due[hid] = _keys(latch)
            else:
                touched.add(hid)                # (a latch followed in C: settled there)
        order = sorted(touched | pending)
        settled = self._settle_in_c(order) if self._following() and unreadable is None else {}
        out = []
        for hid in order:
            handle = handles.get(hid)
            if handle is None or handle.flow is None:
                continue
            carried = settled.get(hid)
            if carried is not None:
                if carried is _KEPT:
                    continue
                params, moved, keys = carried
                effects = handle.latch.carried(params, moved)
                if effects:
                    alerts = self._carry_out(handle, effects, keys)
                else:
                    alerts = []
                    self._keys_due[hid] = keys
            else:
                self._unfollow(handle)          # followed again below if it can be
                # The view was brought up to date at the start of the round: every latch of
                # the round is judged against the same view (events arriving meanwhile are
                # the next round's), with no netlink read per latch.
                obs = unreadable or self._observe(handle.flow, fresh=False)
                if obs.pending:
                    pending.add(hid)
                else:
                    pending.discard(hid)
                effects = handle.latch.observe(obs)
                alerts = self._carry_out(handle, effects)
                if hid in handles:
                    self._refollow(handle)
            self._deliver(handle, alerts)
            out += [(handle, a) for a in alerts]
        return out

    def _sync_keys(self) -> None:
        """The registry takes the latches' SA keys due (see _keys_due)."""
        due, self._keys_due = self._keys_due, {}
        update, handles = self.registry.update_sas, self.handles
        for hid, keys in due.items():
            if hid in handles:
                update(hid, keys)

    def _carry_out(self, handle: LatchHandle, effects, keys: tuple | None = None
                   ) -> list[Alert]:
        """A round's effects for one latch, on its socket; returns the alerts. `keys`: the
        latch's SA keys when the caller has them (else read from its parameters)."""
        hid = handle.id
        try:
            alerts = apply_tracked(handle.sock, effects, handle.flow.family, handle)
        except OSError as exc:
            # The socket could not be changed. Closed: nothing is left to enforce, the latch
            # goes. Otherwise its owner still hears what the latch says, and the latch is
            # looked at again next round (one socket's failure must not stop the others'
            # events from being applied).
            alerts = [e for e in effects if isinstance(e, Alert)]
            if exc.errno == errno.EBADF:
                self.registry.remove(hid)
                self._keys_due.pop(hid, None)
                self.handles.pop(hid, None)
                self._pending.discard(hid)
                self._unfollow(handle)
                self._unwatch(handle)
                return alerts
            log.warning("latch %d: applying %s: %s", hid, effects, exc)
            self._pending.add(hid)
            self._unfollow(handle)            # judged in Python next round
            if any(isinstance(e, Block) for e in effects):
                _cut(handle.sock, hid)
        if hid in self.handles:
            self._keys_due[hid] = _keys(handle.latch) if keys is None else keys
        return alerts

    def _settle_in_c(self, order: list[int]) -> dict:
        """What the index settles of this round's latches (Index.revalidate): hid -> _KEPT,
        or (Latch.carried's arguments, the latch's SA keys). The SAs it asks about (new, not
        yet tagged) are identified here, once each, and the latches asking are looked at
        again; whatever is left goes to the Python judgement."""
        handles, pending = self.handles, self._pending
        hids = [hid for hid in order if hid not in pending
                and (h := handles.get(hid)) is not None and h.slot >= 0]
        settled: dict = {}
        index = self.view.index
        stride = 1 + FOLLOW_IN
        for attempt in (0, 1):
            if not hids:
                break
            codes, nsas, hs = index.revalidate([handles[hid].slot for hid in hids])
            need: list[int] = []
            asked: set[int] = set()
            for i, hid in enumerate(hids):
                code = codes[i]
                if code == KEEP:
                    settled[hid] = _KEPT
                elif code == MOVED or code == INBOUND:
                    first = i * stride
                    carried = self._carried(handles[hid], hs[first:first + nsas[i]],
                                            code == MOVED)
                    if carried is not None:
                        settled[hid] = carried
                elif code == NEED and not attempt:
                    need.append(hid)
                    first = i * stride
                    asked.update(hs[first:first + nsas[i]])
            if asked:
                self._identify_and_tag(asked)
            # (Tags running out meanwhile unfollows every latch: those are Python's now.)
            hids = [hid for hid in need if handles[hid].slot >= 0]
        return settled

    def _identify_and_tag(self, sa_handles) -> None:
        """Identify the SAs of these handles (once each this round, as _observe would) and
        tag those verified, in one call to the index."""
        index = self.view.index
        facts_of, class_tag, tagged = self._facts, self._class_tag, self._tagged
        if len(tagged) > self._tag_bound:
            self._bound_tags()
        hs, tags, facts = [], [], []
        generation = self._class_generation
        for h in sa_handles:
            try:
                sa = index.sa_ref(h)
            except LookupError:
                continue
            f, _ans = facts_of(sa)
            if f is not None and f.local is not None and f.peer is not None:
                hs.append(h)
                tags.append(class_tag(f))
                facts.append(f)
        if generation != self._class_generation:
            return              # the tags above are from before a reset: none is set
        for h, f, done in zip(hs, facts, index.set_tags(hs, tags)):
            if done:
                tagged[h] = f

    def _carried(self, handle: LatchHandle, sa_handles: list[int], moved: bool
                 ) -> tuple | None:
        """(Latch.carried's arguments, SA keys) for the SAs the index named (tagged:
        identified); None if a tag is not known here (the Python judgement then).
        Latches on the same SAs share the parameters."""
        latched = handle.latch.params
        key = (id(latched), *sa_handles)
        memo = self._carried_memo
        hit = memo.get(key)
        if hit is not None and hit[0] is latched:
            return hit[1], moved, hit[2]
        tagged = self._tagged
        out = tagged.get(sa_handles[0])
        ins = tuple([tagged.get(h) for h in sa_handles[1:]])
        if out is None or any(f is None for f in ins):
            return None
        params = make_latch_params(True, latched.local, latched.peer, latched.protection,
                                   (out.reqid,), (out,), ins)
        keys = (out.key, *[f.key for f in ins])
        if len(memo) >= 1024:
            memo.clear()
        memo[key] = (latched, params, keys)
        return params, moved, keys

    def _deliver(self, handle: LatchHandle, alerts: list[Alert]) -> None:
        for a in alerts:
            kept = handle.alerts
            kept.append(a)
            if len(kept) > ALERTS_LIMIT:
                del kept[0]
            if handle.on_alert is not None:
                handle.on_alert(handle, a)
            for obs in self.observers:
                obs(handle, a)

    def close(self) -> None:
        for handle in list(self.handles.values()):
            self.release(handle)
        self.view.close()
        self.identities.close()


_KEYS: dict[int, tuple] = {}
_KEPT = ("kept",)                    # _settle_in_c: the index found nothing changed


def _keys(latch: Latch) -> tuple:
    """The latch's SA keys, without repeats: shared by latches that share their parameters
    (machine's memos), held with them so that the id stays theirs."""
    params = latch.params
    if params is None:
        return ()
    hit = _KEYS.get(id(params))
    if hit is not None and hit[0] is params:
        return hit[1]
    out, inbound = params.sa_keys()
    keys = tuple(dict.fromkeys(out + inbound))
    if len(_KEYS) >= 4096:
        _KEYS.clear()
    _KEYS[id(params)] = (params, keys)
    return keys

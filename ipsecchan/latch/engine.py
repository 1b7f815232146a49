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

import itertools
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from ipsecchan.ike.base import IdentitySource, SAIdentity, State
from ipsecchan.latch.enforce import apply_all
from ipsecchan.latch.machine import (Alert, Latch, LatchState, Observation, Party, Release,
                                     Requirements, SAFacts)
from ipsecchan.latch.protection import Protection
from ipsecchan.latch.registry import LatchRegistry
from ipsecchan.xfrm.lookup import Flow
from ipsecchan.xfrm.messages import SA

_PROTOS = {socket.SOCK_STREAM: socket.IPPROTO_TCP, socket.SOCK_DGRAM: socket.IPPROTO_UDP}
# How long an SA the IKE daemon has not reported may wait for it (the kernel gets a rekey's
# SAs before the daemon's event says whose they are). After that, unknown is unknown.
IDENTITY_GRACE = 5.0


def flow_of(sock: socket.socket) -> Flow:
    """The connection's flow, read from the socket itself (never from a caller's word)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError("only IPv4 and IPv6 sockets latch")
    proto = _PROTOS.get(sock.type & 0xF)
    if proto is None:
        raise ValueError("only TCP and UDP sockets latch")
    local, remote = sock.getsockname(), sock.getpeername()
    mark = sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
    return Flow(sock.family, proto, local[0], local[1], remote[0], remote[1], mark=mark)


def _party(ident) -> Party | None:
    return None if ident is None else Party(ident.id, ident.pubkey_sha256, ident.auth)


@dataclass(eq=False)
class LatchHandle:
    """A latched socket: its flow, its latch, and who hears its alerts."""
    id: int
    sock: socket.socket
    flow: Flow
    latch: Latch
    on_alert: Callable[["LatchHandle", Alert], None] | None = None
    alerts: list = field(default_factory=list)

    @property
    def state(self) -> LatchState:
        return self.latch.state


class Latcher:
    def __init__(self, identities: IdentitySource, view=None):
        if view is None:
            from ipsecchan.xfrm.index import Index
            from ipsecchan.xfrm.monitor import XfrmView
            view = XfrmView(Index)
        self.view = view
        self.identities = identities
        self.registry = LatchRegistry()
        self.handles: dict[int, LatchHandle] = {}
        self._ids = itertools.count(1)
        self._backlog: list = []     # XFRM events read while observing, for the next poll()
        self._pending: set[int] = set()   # latches whose last observation was pending
        # Identities once verified, by SA key: an SA's peer cannot change during its life, and
        # strongSwan stops listing a rekeyed CHILD_SA while its inbound SA still lives a few
        # seconds (charon's delete_rekeyed_delay). Forgotten when the SA goes.
        self._verified: dict[tuple, tuple[Party | None, Party | None]] = {}

    # -- observing --
    def _facts(self, sa: SA) -> tuple[SAFacts | None, SAIdentity]:
        ans = self.identities.identify(sa)
        if ans.state is State.UNAVAILABLE:
            return None, ans
        if ans.state is State.VERIFIED:
            local, peer = self._verified[sa.key] = _party(ans.local), _party(ans.peer)
        else:
            local, peer = self._verified.get(sa.key, (None, None))
            if peer is not None:
                ans = replace(ans, state=State.VERIFIED)
        return SAFacts(sa.key, sa.reqid, Protection.of(sa), local, peer, sa.src), ans

    def observe(self, flow: Flow) -> Observation:
        """The system's answer for a flow, now. Fails closed: any part that cannot be read
        makes it unverified."""
        try:
            self._backlog += self.view.poll()
        except OSError as exc:
            return Observation(False, reason=f"XFRM notifications: {exc}")
        res = self.view.index.lookup(flow)
        facts, pending, now = [], False, time.time()
        for sa in res.out.sas + res.inbound.sas:
            f, ans = self._facts(sa)
            if f is None:
                return Observation(False, reason=f"identity source: {ans.reason}")
            pending |= ans.state is State.UNKNOWN and now - sa.add_time < IDENTITY_GRACE
            facts.append(f)
        n = len(res.out.sas)
        return Observation(True, res.out.verdict, res.inbound.verdict, tuple(facts[:n]),
                           tuple(facts[n:]), res.inbound.cleartext_accepted, pending=pending)

    def _settled(self, flow: Flow) -> Observation:
        """An observation that is not pending: wait for the identity source meanwhile."""
        end = time.monotonic() + IDENTITY_GRACE
        while (obs := self.observe(flow)).pending and time.monotonic() < end:
            time.sleep(0.05)
        return obs if not obs.pending else replace(obs, pending=False)

    # -- latching --
    def latch(self, sock: socket.socket, requirements: Requirements = Requirements(),
              on_alert: Callable[[LatchHandle, Alert], None] | None = None) -> LatchHandle:
        """Latch a connected socket, or raise LatchRefused (the socket is then released)."""
        flow = flow_of(sock)
        latch = Latch.connector(requirements)
        try:
            apply_all(sock, latch.begin(self._settled(flow)))
            alerts = apply_all(sock, latch.confirm(self._settled(flow)))
        except BaseException:
            if latch.state is not LatchState.CLOSED:
                latch.close()
            apply_all(sock, [Release()])
            raise
        handle = LatchHandle(next(self._ids), sock, flow, latch, on_alert)
        self.handles[handle.id] = handle
        self.registry.add(handle.id, flow, _keys(latch))
        self._deliver(handle, alerts)
        return handle

    def release(self, handle: LatchHandle) -> None:
        self._pending.discard(handle.id)
        self.registry.remove(handle.id)
        self.handles.pop(handle.id, None)
        if handle.latch.state is not LatchState.CLOSED:
            self._deliver(handle, apply_all(handle.sock, handle.latch.close()))

    # -- following events --
    def poll(self, timeout: float = 0.0) -> list[tuple[LatchHandle, Alert]]:
        """Apply pending XFRM and IKE events to the latches they reach."""
        touched: set[int] = set()
        events, self._backlog = self._backlog, []
        try:
            events += self.view.poll(0 if events else timeout)
        except OSError:
            touched = self.registry.ids()
        for ev in events:
            touched |= self.registry.affected(ev)
            if ev.kind in ("sa-flush", "resync"):
                self._verified.clear()
            elif ev.kind == "sa-delete" or (ev.kind == "sa-expire" and ev.hard):
                self._verified.pop(ev.sa_key, None)
        while (ike := self.identities.next_event(0)) is not None:
            if ike.kind in ("daemon-lost", "daemon-back"):
                touched |= self.registry.ids()
            for side in (ike.old, ike.new):
                if side is not None:
                    touched |= self.registry.affected_by_spis(
                        s for s in (side.spi_in, side.spi_out) if s)
        out = []
        for hid in sorted(touched | self._pending):
            handle = self.handles.get(hid)
            if handle is None:
                continue
            obs = self.observe(handle.flow)
            if obs.pending:
                self._pending.add(hid)
            else:
                self._pending.discard(hid)
            alerts = apply_all(handle.sock, handle.latch.observe(obs))
            self.registry.update_sas(hid, _keys(handle.latch))
            self._deliver(handle, alerts)
            out += [(handle, a) for a in alerts]
        return out

    def _deliver(self, handle: LatchHandle, alerts: list[Alert]) -> None:
        for a in alerts:
            handle.alerts.append(a)
            if handle.on_alert is not None:
                handle.on_alert(handle, a)

    def close(self) -> None:
        for handle in list(self.handles.values()):
            self.release(handle)
        self.view.close()
        self.identities.close()


def _keys(latch: Latch) -> list[tuple]:
    if latch.params is None:
        return []
    out, inbound = latch.params.sa_keys()
    return list(out + inbound)

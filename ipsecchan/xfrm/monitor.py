"""The SAD/SPD kept current from XFRM notifications, with a full resync after an overrun.

Order matters: the notification socket subscribes *before* the dump, so every change after the
dump started is queued as an event; replaying the queue over the dump then yields the kernel's
state (a notification about something the dump already holds is applied again, harmlessly).
When the kernel drops notifications (ENOBUFS: the socket's buffer overran), the view no longer
knows what it missed, so it says so (`resyncs` grows, a "resync" event is returned) and rebuilds
from a fresh dump: never a silently stale index.
"""
from __future__ import annotations

import errno
import select
import socket
import time
from typing import Callable

from ipsecchan._native import ffi, lib
from ipsecchan.netlink import split_messages
from ipsecchan.xfrm.lookup import ReferenceIndex
from ipsecchan.xfrm.messages import PROTO_NAMES, XfrmEvent, _addr_text, decode_event
from ipsecchan.xfrm.netlink_xfrm import (NETLINK_XFRM, decode_default_policy, dump_messages,
                                         get_default_policy)

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
GROUPS = ("XFRMNLGRP_SA", "XFRMNLGRP_POLICY", "XFRMNLGRP_EXPIRE", "XFRMNLGRP_ACQUIRE")
DEFAULT_RCVBUF = 4 << 20


class XfrmMonitor:
    """A netlink socket on the XFRM notification groups. fileno() for select/asyncio."""

    def __init__(self, *, rcvbuf: int = DEFAULT_RCVBUF):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                  NETLINK_XFRM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.bind((0, 0))
            for name in GROUPS:
                self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, getattr(lib, name))
        except BaseException:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> bytes | None:
        """One datagram of notifications, or None when nothing is pending.
        Raises OSError(ENOBUFS) when the kernel had to drop notifications."""
        try:
            return self.sock.recv(1 << 20)
        except BlockingIOError:
            return None

    def close(self) -> None:
        self.sock.close()


_SA_KINDS = {lib.XFRM_MSG_NEWSA: "sa-new", lib.XFRM_MSG_UPDSA: "sa-update",
             lib.XFRM_MSG_DELSA: "sa-delete", lib.XFRM_MSG_EXPIRE: "sa-expire"}
_FLUSHSA, _GETDEFAULT = lib.XFRM_MSG_FLUSHSA, lib.XFRM_MSG_GETDEFAULT
_HDR = 16                                            # struct nlmsghdr
_BATCH = 256 << 10          # bytes of notifications applied in one C call (light views)
# XfrmEvent is a frozen dataclass with slots: setting the slots directly builds the same
# object for less (light events are made by the ten thousand in a rekey burst).
_new_event = object.__new__
(_set_kind, _set_sa, _set_sa_key, _set_policy, _set_policy_key, _set_hard, _set_flush_proto,
 _set_acquire, _set_removed) = (XfrmEvent.__dict__[f].__set__ for f in (
    "kind", "sa", "sa_key", "policy", "policy_key", "hard", "flush_proto", "acquire",
    "removed"))
assert set(XfrmEvent.__dataclass_fields__) == {
    "kind", "sa", "sa_key", "policy", "policy_key", "hard", "flush_proto", "acquire",
    "removed"}
_DELSA, _EXPIRE = lib.XFRM_MSG_DELSA, lib.XFRM_MSG_EXPIRE


def _sa_event(kind: str, sa, key: tuple, hard: bool) -> XfrmEvent:
    ev = _new_event(XfrmEvent)
    _set_kind(ev, kind)
    _set_sa(ev, sa)
    _set_sa_key(ev, key)
    _set_policy(ev, None)
    _set_policy_key(ev, None)
    _set_hard(ev, hard)
    _set_flush_proto(ev, 0)
    _set_acquire(ev, None)
    _set_removed(ev, ())
    return ev


class XfrmView:
    """An index (ReferenceIndex, or the C Index) that follows the kernel.

    poll() applies what is pending and returns the decoded events (acquires included, which
    do not change the index); after an overrun it returns a single XfrmEvent("resync").

    light=True (the C Index only): SA events carry the index's SARef of the SA (its new
    record; for a delete or hard expire the removed record's SARef when the index had made
    one, else None) instead of a decoded SA, and the messages are parsed once, by the index.
    Policy, flush, acquire and default-policy messages are decoded as usual (they are rare).

    sa_events=False (light views, an index that watches flows: Index.watch): SA
    notifications the index places itself make no event each; a batch of them is told by
    one XfrmEvent("sa-changes") (with the keys of the SAs removed), and whom they reach by
    Index.touched(). SA changes the index flags as not placed (change.unwatched) still make
    their events.
    """

    light = False
    sa_events = True

    def __init__(self, index_factory: Callable[[], object] = ReferenceIndex, *,
                 rcvbuf: int = DEFAULT_RCVBUF, light: bool = False):
        self.index = index_factory()
        self.light = light and hasattr(self.index, "apply_report")
        self.resyncs = 0
        self.monitor = XfrmMonitor(rcvbuf=rcvbuf)
        try:
            self._load()
        except BaseException:
            self.monitor.close()
            raise

    def _load(self) -> None:
        default_in, default_out = get_default_policy()
        self.index.clear()
        self.index.default_in, self.index.default_out = default_in, default_out
        self.index.apply(dump_messages("sa") + dump_messages("policy"))
        self.loaded_at = time.monotonic()

    def resync(self) -> None:
        """Drop what is queued (the new dump supersedes it) and rebuild from a dump."""
        self.resyncs += 1
        while True:
            try:
                if self.monitor.read() is None:
                    break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
        self._load()

    def wait(self, timeout: float) -> bool:
        """Wait until a notification is queued (True) or the timeout passes (False)."""
        return bool(select.select([self.monitor], [], [], timeout)[0])

    def poll(self, timeout: float = 0.0) -> list[XfrmEvent]:
        events: list[XfrmEvent] = []
        if timeout and not self.wait(timeout):
            return events
        # Light views apply what is queued in batches of datagrams (one C call each: a rekey
        # burst is tens of thousands of one-message datagrams), in order.
        batch: list[bytes] = []
        size = 0
        while True:
            try:
                data = self.monitor.read()
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.resync()
                return [XfrmEvent("resync")]
            if self.light:
                if data is not None:
                    batch.append(data if not len(data) & 3 else data + bytes(4 - len(data) & 3))
                    size += len(batch[-1])
                    if size < _BATCH:
                        continue
                if not batch:
                    return events
                try:
                    events += self._light_events(b"".join(batch) if len(batch) > 1
                                                 else batch[0])
                except ValueError:
                    # A message the index rejected: the messages before it were applied, the
                    # rest not. The view would be wrong: rebuild it, and say so.
                    self.resync()
                    return [XfrmEvent("resync")]
                if data is None:
                    return events
                batch, size = [], 0
                continue
            if data is None:
                return events
            changed = False
            for m in split_messages(data):
                if m.type == lib.XFRM_MSG_GETDEFAULT:      # the default policy changed
                    self.index.default_in, self.index.default_out = \
                        decode_default_policy(m.payload)
                    events.append(XfrmEvent("policy-default"))
                    continue
                ev = decode_event(m.type, m.payload)
                if ev is not None:
                    events.append(ev)
                    changed = True
            if changed:
                # The index takes the raw bytes (the C index parses them itself).
                self.index.apply(data)

    def _light_events(self, data) -> list[XfrmEvent]:
        index = self.index
        _count, changes, n, gone = index.apply_report(data)
        events = []
        quiet = not self.sa_events
        applied, removed = False, []
        for i in range(n):
            c = changes[i]
            t = c.type
            kind = _SA_KINDS.get(t)
            if kind is not None and quiet and not c.unwatched:
                old = c.old_handle
                if old and (t == _DELSA or t == _EXPIRE):
                    ref = gone.get(old)
                    fam = c.family
                    removed.append(ref.key if ref is not None else (
                        fam, _addr_text(fam, ffi.unpack(c.dst, 16)),
                        PROTO_NAMES.get(c.proto) or str(c.proto), c.spi))
                applied = applied or bool(old or c.handle)
                continue
            if kind is not None:
                # handle: the record stored (or marked dying) now; else the one removed
                try:
                    sa = index.sa_ref(c.handle) if c.handle else gone.get(c.old_handle)
                except LookupError:
                    # A later message of the same batch replaced or removed the record: this
                    # event tells of the SA as its own message has it.
                    events.append(decode_event(t, memoryview(data)[c.offset + _HDR:
                                                                   c.offset + c.len]))
                    continue
                if sa is not None:
                    key = sa.key             # the record's key is the message's
                else:
                    fam = c.family
                    key = (fam, _addr_text(fam, ffi.unpack(c.dst, 16)),
                           PROTO_NAMES.get(c.proto) or str(c.proto), c.spi)
                events.append(_sa_event(kind, sa, key, bool(c.hard)))
                continue
            payload = memoryview(data)[c.offset + _HDR:c.offset + c.len]
            if t == _GETDEFAULT:                           # the default policy changed
                index.default_in, index.default_out = decode_default_policy(payload)
                events.append(XfrmEvent("policy-default"))
                continue
            ev = decode_event(t, payload)
            if ev is not None:
                events.append(ev)
        if applied:
            ev = _sa_event("sa-changes", None, None, False)
            _set_removed(ev, tuple(removed))
            events.append(ev)
        return events

    def close(self) -> None:
        self.monitor.close()

    def __enter__(self) -> "XfrmView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["XfrmMonitor", "XfrmView"]

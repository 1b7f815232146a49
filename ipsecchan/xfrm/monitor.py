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

from ipsecchan._native import lib
from ipsecchan.netlink import split_messages
from ipsecchan.xfrm.lookup import ReferenceIndex
from ipsecchan.xfrm.messages import XfrmEvent, decode_event
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


class XfrmView:
    """An index (ReferenceIndex, or the C Index) that follows the kernel.

    poll() applies what is pending and returns the decoded events (acquires included, which
    do not change the index); after an overrun it returns a single XfrmEvent("resync").
    """

    def __init__(self, index_factory: Callable[[], object] = ReferenceIndex, *,
                 rcvbuf: int = DEFAULT_RCVBUF):
        self.index = index_factory()
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
        while True:
            try:
                data = self.monitor.read()
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.resync()
                return [XfrmEvent("resync")]
            if data is None:
                return events
            changed = False
            for m in split_messages(data):
                if m.type == lib.XFRM_MSG_GETDEFAULT:      # the default policy changed
                    self.index.default_in, self.index.default_out = \
                        decode_default_policy(m.payload)
                    continue
                ev = decode_event(m.type, m.payload)
                if ev is not None:
                    events.append(ev)
                    changed = True
            if changed:
                # The index takes the raw bytes (the C index parses them itself).
                self.index.apply(data)

    def close(self) -> None:
        self.monitor.close()

    def __enter__(self) -> "XfrmView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["XfrmMonitor", "XfrmView"]

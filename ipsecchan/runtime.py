"""The process's latching context, behind ipsecchan.socket: one Latcher (kernel view and
identity source), an event thread that follows XFRM and IKE events for every latch, and the
socket references the latches act on.

Configured from the environment on first use, or by configure() before it:

    IPSECCHAN_VICI     charon's VICI socket (default /var/run/charon.vici)
    IPSECCHAN_STATIC   a static identities file for manually keyed SAs (ipsecchan.ike.static)

In-process latching needs CAP_NET_ADMIN (the SAD/SPD, XFRM notifications, per-socket
policies). Without it the first latch fails with a clear error.
"""
from __future__ import annotations

import logging
import os
import socket as _std
import threading
import time
import weakref

from ipsecchan.ike import ChainSource, StaticSource, StrongSwanSource
from ipsecchan.latch.engine import Latcher

log = logging.getLogger("ipsecchan")

DEFAULT_VICI = "/var/run/charon.vici"
CONNECT_WAIT = 5.0          # how long the first latch waits for charon's VICI session
SWEEP_EVERY = 2.0           # how often latches of sockets dropped without close() are freed


class LatchedFd:
    """The socket a latch acts on, without keeping the socket object alive.

    Usually the ipsecchan socket that latched (weakly referenced). When its descriptor has
    moved on (detach(): ssl.wrap_socket takes it over, fromfd/dup), the descriptor number is
    used, but only while it still names the same kernel socket (its inode, recorded at detach):
    descriptor numbers are reused, and a policy must never land on somebody else's socket."""
    __slots__ = ("_owner", "fd", "family", "type", "ino", "__weakref__")

    def __init__(self, owner: _std.socket):
        self._owner = weakref.ref(owner)
        self.fd = owner.fileno()
        self.family, self.type = owner.family, owner.type
        self.ino: int | None = None

    def detached(self) -> None:
        """The owner gives its descriptor away: keep following it by inode."""
        try:
            self.ino = os.fstat(self.fd).st_ino
        except OSError:
            self.ino = None

    def _target(self) -> tuple[_std.socket | None, bool]:
        owner = self._owner()
        if owner is not None and owner.fileno() == self.fd:
            return owner, False
        if self.ino is None:
            return None, False
        try:
            if os.fstat(self.fd).st_ino != self.ino:
                return None, False
            return _std.socket(fileno=os.dup(self.fd)), True
        except OSError:
            return None, False

    @property
    def gone(self) -> bool:
        sock, tmp = self._target()
        if tmp:
            sock.close()
        return sock is None

    def _call(self, name: str, *args):
        sock, tmp = self._target()
        if sock is None:
            # The socket is closed: its policies went with it (nothing to pin, block or
            # clear); what needed the socket itself fails.
            if name == "setsockopt":
                return None
            raise OSError(9, "the latched socket is closed")
        try:
            return getattr(_std.socket, name)(sock, *args)
        finally:
            if tmp:
                sock.close()

    def fileno(self) -> int:
        return self.fd

    def setsockopt(self, *args):
        return self._call("setsockopt", *args)

    def getsockopt(self, *args):
        return self._call("getsockopt", *args)

    def getsockname(self):
        return self._call("getsockname")

    def getpeername(self):
        return self._call("getpeername")


class Runtime:
    def __init__(self, identities=None, view=None):
        if identities is None:
            identities = default_identities()
        self.latcher = Latcher(identities, view)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ipsecchan-latch",
                                        daemon=True)
        self._thread.start()
        self.status = None
        try:
            from ipsecchan.latch.status import StatusServer
        except ImportError:
            pass
        else:
            try:
                self.status = StatusServer(self.latcher)
                self.status.start()
            except OSError as exc:
                log.warning("latch status service not started: %s", exc)
                self.status = None

    def _run(self) -> None:
        next_sweep = time.monotonic() + SWEEP_EVERY
        while not self._stop.is_set():
            try:
                self.latcher.poll(0.5)
            except Exception:       # a bug must not silently stop break detection
                log.exception("latch event handling failed; latches resynced")
                time.sleep(0.1)
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_EVERY
                self.sweep()

    def sweep(self) -> None:
        """Free the latches of sockets that were dropped without close()."""
        for handle in self.latcher.latches():
            if isinstance(handle.sock, LatchedFd) and handle.sock.gone:
                self.latcher.release(handle)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        if self.status is not None:
            self.status.close()
        self.latcher.close()


def default_identities():
    vici = os.environ.get("IPSECCHAN_VICI", DEFAULT_VICI)
    src = StrongSwanSource(vici)
    if os.path.exists(vici):
        src.wait_connected(CONNECT_WAIT)
    static = os.environ.get("IPSECCHAN_STATIC")
    if static:
        return ChainSource([src, StaticSource.from_file(static)])
    return src


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()
_config: dict = {}


def configure(*, identities=None, view=None) -> None:
    """Choose the identity source (and kernel view) before the first latch of the process."""
    with _runtime_lock:
        if _runtime is not None:
            raise RuntimeError("ipsecchan is already latching in this process; configure "
                               "it before the first connection")
        _config.update(identities=identities, view=view)


def get() -> Runtime:
    global _runtime
    rt = _runtime
    if rt is not None:
        return rt
    with _runtime_lock:
        if _runtime is None:
            try:
                _runtime = Runtime(_config.get("identities"), _config.get("view"))
            except PermissionError as exc:
                raise PermissionError(
                    exc.errno, "ipsecchan: latching in this process needs CAP_NET_ADMIN "
                               f"(reading the SAD/SPD and setting per-socket policies): {exc}"
                ) from None
        return _runtime


def shutdown() -> None:
    """Release every latch and stop the event thread (tests, and orderly exits)."""
    global _runtime
    with _runtime_lock:
        rt, _runtime = _runtime, None
    if rt is not None:
        rt.close()

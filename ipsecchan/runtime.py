"""The process's latching backend, behind ipsecchan.socket: either in-process (one Latcher
with its kernel view and identity source, an event thread following XFRM and IKE events) or
the broker (`ipsecchan daemon`, for processes without CAP_NET_ADMIN). Both offer latch,
listen, accept and release, so the socket module behaves the same either way.

Chosen on first use: the broker when its socket answers, in-process when this process has
CAP_NET_ADMIN, otherwise an error that says which of the two to provide. From the
environment (or configure() before the first latch):

    IPSECCHAN_MODE     auto (default), broker or inprocess
    IPSECCHAN_BROKER   the broker's socket (default /run/ipsecchan/broker.sock)
    IPSECCHAN_VICI     charon's VICI socket (default /var/run/charon.vici), in-process
    IPSECCHAN_STATIC   a static identities file for manually keyed SAs (ipsecchan.ike.static)
"""
from __future__ import annotations

import logging
import os
import socket as _std
import threading
import time
import weakref

from ipsecchan.ike import ChainSource, StaticSource, StrongSwanSource
from ipsecchan.latch.engine import Latcher, packet_family
from ipsecchan.latch.enforce import apply
from ipsecchan.latch.machine import Block, LatchRefused
from ipsecchan.xfrm import clear_socket_policies

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
    __slots__ = ("_owner", "fd", "family", "type", "ino", "_owner_ino", "__weakref__")

    def __init__(self, owner: _std.socket):
        self._owner = weakref.ref(owner)
        self.fd = owner.fileno()
        self.family, self.type = owner.family, owner.type
        self.ino: int | None = None
        self._owner_ino: int | None = None      # inode(), read once while the owner has it

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

    def current(self) -> tuple[_std.socket | None, bool]:
        """(the latched socket, whether that is a temporary copy to close), or (None, False)
        when it is gone."""
        return self._target()

    def inode(self) -> int | None:
        """The latched socket's inode, or None when it is gone."""
        owner = self._owner()
        if owner is not None and owner.fileno() == self.fd:
            # (is_latched asks every latch's: one fstat each, not one per question)
            if self._owner_ino is None:
                try:
                    self._owner_ino = os.fstat(self.fd).st_ino
                except OSError:
                    return None
            return self._owner_ino
        sock, tmp = self._target()
        if sock is None:
            return None
        try:
            return os.fstat(sock.fileno()).st_ino
        except OSError:
            return None
        finally:
            if tmp:
                sock.close()

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

    # -- the backend interface ipsecchan.socket uses (the broker client has the same) --
    def latch(self, sock, requirements, on_alert=None, expect=None):
        """`expect`: as Latcher.latch (a forked child adopting its parent's latch)."""
        try:
            return self.latcher.latch(sock, requirements, on_alert, expect=expect)
        except LatchRefused as exc:
            # Nothing of the connection may leave (the engine released its pin): block it.
            apply(sock, Block(exc.cause), packet_family(sock))
            raise

    def listen(self, sock, requirements, on_alert=None):
        return self.latcher.listen(sock, requirements, on_alert)

    def accept(self, listener, sock, on_alert=None):
        return self.latcher.accept(listener, sock, on_alert)

    def release(self, handle, wait: bool = False) -> None:
        self.latcher.release(handle)        # (done when it returns, waited for or not)

    def forget(self, handle) -> None:
        """Let go of a latch without touching its socket (another process holds it too)."""
        self.latcher.forget(handle)

    def is_latched(self, sock) -> bool:
        """Whether a latch of this process holds the socket (another descriptor of it)."""
        ino = os.fstat(sock.fileno()).st_ino
        return any(isinstance(h.sock, LatchedFd) and h.sock.inode() == ino
                   for h in self.latcher.latches())

    def abort(self, sock) -> None:
        """Clear the block on a socket whose latch was refused (it is about to be reset)."""
        clear_socket_policies(sock)

    def _run(self) -> None:
        next_sweep = time.monotonic() + SWEEP_EVERY
        while not self._stop.is_set():
            try:
                self.latcher.poll(0.5)
            except Exception:       # a bug must not silently stop break detection
                log.exception("latch event handling failed; every latch is judged again")
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


_runtime = None
_runtime_lock = threading.Lock()
_config: dict = {}
_CAP_NET_ADMIN = 12
# Forks so far in this process's line (counted in the parent and in the child): a latch made
# before the last fork may be shared with another process (see fork_generation()).
_generation = 0
_pid = os.getpid()


def pid() -> int:
    """This process's id, kept across forks without a system call per question."""
    return _pid


def fork_generation() -> int:
    """Changes at every fork (os.fork, multiprocessing's fork; not subprocess, whose children
    exec). A socket latched in an earlier generation is also the other process's: a release
    must not clear its pins there (ipsecchan.socket lets go of the latch instead)."""
    return _generation


def _after_fork_in_parent() -> None:
    global _generation
    _generation += 1


def _after_fork_in_child() -> None:
    # The parent's backend is not the child's: its netlink, VICI and broker sockets are
    # shared with the parent, whose notifications and replies the child would read. The child
    # makes its own on first use. The old one is dropped, not closed: closing would release
    # the parent's latches. Configured objects holding sockets go too (a StaticSource stays).
    global _runtime, _runtime_lock, _generation, _pid
    _runtime, _runtime_lock = None, threading.Lock()
    _generation += 1
    _pid = os.getpid()
    _config.pop("view", None)
    if not isinstance(_config.get("identities"), StaticSource):
        _config.pop("identities", None)


os.register_at_fork(after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


def configure(*, identities=None, view=None, mode: str | None = None,
              broker: str | None = None) -> None:
    """Choose the backend (and, in-process, the identity source and kernel view) before the
    first latch of the process."""
    with _runtime_lock:
        if _runtime is not None:
            raise RuntimeError("ipsecchan is already latching in this process; configure "
                               "it before the first connection")
        _config.update(identities=identities, view=view, mode=mode, broker=broker)


def has_net_admin() -> bool:
    try:
        with open("/proc/self/status") as f:
            caps = next(line for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caps.split()[1], 16) >> _CAP_NET_ADMIN & 1)


def _choose():
    from ipsecchan.broker.client import BrokerClient, BrokerUnavailable
    from ipsecchan.broker.protocol import DEFAULT_PATH
    mode = _config.get("mode") or os.environ.get("IPSECCHAN_MODE", "auto")
    path = _config.get("broker") or os.environ.get("IPSECCHAN_BROKER", DEFAULT_PATH)
    if mode not in ("auto", "broker", "inprocess"):
        raise ValueError(f"IPSECCHAN_MODE={mode!r}: expected auto, broker or inprocess")
    broker_error = None
    if mode in ("auto", "broker"):
        try:
            return BrokerClient(path)
        except BrokerUnavailable as exc:
            broker_error = exc
            if mode == "broker":
                raise
    if mode == "inprocess" or has_net_admin():
        try:
            return Runtime(_config.get("identities"), _config.get("view"))
        except PermissionError as exc:
            raise PermissionError(
                exc.errno, "ipsecchan: latching in this process needs CAP_NET_ADMIN "
                           f"(reading the SAD/SPD and setting per-socket policies): {exc}"
            ) from None
    raise PermissionError(
        1, "ipsecchan: cannot latch: no broker answers at "
           f"{path} ({broker_error.strerror if broker_error else 'not tried'}) and this "
           "process lacks CAP_NET_ADMIN. Start `ipsecchan daemon` (or set IPSECCHAN_BROKER "
           "to its socket), or run with CAP_NET_ADMIN.")


def current():
    """The backend, if this process has made one (None: not yet, or a fork since)."""
    return _runtime


def get():
    global _runtime
    rt = _runtime
    if rt is not None:
        return rt
    with _runtime_lock:
        if _runtime is None:
            _runtime = _choose()
        return _runtime


def shutdown() -> None:
    """Release every latch and stop the event thread (tests, and orderly exits)."""
    global _runtime
    with _runtime_lock:
        rt, _runtime = _runtime, None
    if rt is not None:
        rt.close()

"""`ipsecchan daemon`: the broker that latches other processes' sockets.

Reading the SAD/SPD, following XFRM notifications and setting per-socket policies need
CAP_NET_ADMIN; applications should not. One broker per host (network namespace) holds one
kernel view and one IKE event stream for all of them: a client passes its own socket with
SCM_RIGHTS, the broker checks what it got (an IPv4/IPv6 TCP or UDP socket, connected, or a
listening TCP socket: read from the descriptor itself, never from the client's word), latches
it, answers with the latch, and pushes that latch's alerts to that client only.

The broker keeps no descriptor of a client's socket once a request is done: a descriptor held
here would keep the connection open after the application closed it. (The received copy is
closed by helper threads in batches, within about half a second of the request: LAZY_DELAY
and a turn of the loop. A connection its application closes at once may send its FIN that
much later.) It reaches the socket again, when an event needs its policies changed, through
the client process (pidfd_getfd on the descriptor number the client gave, checked against the
socket's inode): a closed socket, or a number reused for another, is never touched.
pidfd_getfd needs ptrace-level access to the client (CAP_SYS_PTRACE); without it the received
descriptor is kept until the latch ends. A release may come with the latch's socket: the
broker clears the policies through that copy, then lets it go, so the application may close
its own at once (the socket lives until the policies are gone) and need not wait for a reply.

A client that goes away takes its latches with it. Sockets already closed need nothing; one
that lives on (handed to another process, or the client's session dropped) is blocked both
ways, since nobody verifies it any more: the client library latches it again when it
reconnects. Each client is one peer (SO_PEERCRED); it can name only its own latches, hears
only their alerts, and no socket carries two latches. Listing every latch is for root and
the operator group. A socket latched again after a restart of the broker comes back only to
what it had ("expect": the same peer and key, no weaker protection), else it is blocked.

Bad input is answered with an error and the broker keeps serving the others; it never blocks
on a client: replies wait in a bounded queue (the client's requests are not read meanwhile),
and the client's descriptors are closed by helper threads (see _Closer).

    ipsecchan daemon [--socket PATH] [--operators GROUP]...

Started by systemd with socket activation (LISTEN_FDS), it serves the socket it is given.
Every latch is logged with the client's SO_PEERCRED (pid, uid, gid).
"""
from __future__ import annotations

import argparse
import array
import collections
import concurrent.futures
import ctypes
import errno
import grp
import logging
import os
import queue
import resource
import select
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

from ipsecchan.broker import protocol
from ipsecchan.latch.enforce import apply, unsent
from ipsecchan.latch.machine import (Block, Cause, LatchParams, LatchRefused, LatchState,
                                     Policy, Requirements, conflict)
from ipsecchan.latch.engine import Latcher, LatchWouldWait, packet_family
from ipsecchan.xfrm import clear_socket_policies
from ipsecchan.xfrm.lookup import Flow

log = logging.getLogger("ipsecchan.broker")

MAX_CLIENTS = 4096
MAX_LATCHES_PER_CLIENT = 4096
MAX_LATCHES_PER_UID = 65536    # root excepted
MAX_PEER_ID = 1024
SWEEP_EVERY = 2.0              # how often latches of closed sockets are looked for
MAX_QUEUED = 256               # messages queued for a client that does not read; then it goes
MAX_BATCH = 16                 # requests read from one client per turn: others get theirs
FD_RESERVE = 64                # descriptors kept free for the broker's own work
CLOSERS = 64                   # at most this many threads closing clients' descriptors
LAZY_DELAY, LAZY_MAX = 0.2, 32  # descriptors the client holds too: closed within (s), or by
STALLED = 0.1                  # a closer thread that long without progress is stuck (s)
ACCEPT_PAUSE = 1.0             # out of descriptors: stop accepting for this long
LATCH_WORKERS = 8              # latches made at once (one may wait seconds for its identities)
_SYS_PIDFD_GETFD = 438         # the same number on every architecture (since Linux 5.6)
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_SO_NETNS_COOKIE = getattr(socket, "SO_NETNS_COOKIE", 71)
_libc = ctypes.CDLL(None, use_errno=True)
_TCP_ESTABLISHED, _TCP_LISTEN = 1, 10
_OPS = ("latch", "listen", "accept", "abort", "release", "list", "follow", "lookup")
MAX_LOOKUP_FLOWS = 64          # flows one "lookup" request may ask about
_POLICIES = {"require": Policy.REQUIRE, "optional": Policy.OPTIONAL}


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A copy of descriptor `fd` of the process behind `pidfd` (Python has no binding)."""
    r = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def _exited(pidfd: int) -> bool:
    p = select.poll()
    p.register(pidfd, select.POLLIN)      # a pidfd turns readable when its process exits
    return bool(p.poll(0))


class _Closer:
    """Closes descriptors of clients' files away from the broker's loop.

    Closing the last reference to a file can block: a TCP socket with SO_LINGER waits up to
    its linger time for unsent data, a FUSE file for its flush. A client can make the broker's
    copy the last one (by closing its own at the right moment), so the loop never closes one
    itself. A thread stuck on one leaves the others; idle threads are reused.

    close() only collects; flush() hands the collected ones over at the end of a turn of the
    loop, waking one thread: a helper woken in the middle of a request would take the GIL
    from the loop at each of its system calls (costly on one CPU, as under UML). A lazy one
    (the client holds the socket too, as far as the broker knows) may wait for the next
    flush, up to LAZY_DELAY or LAZY_MAX of them, so that most flushes wake nobody."""

    def __init__(self, threads: int = CLOSERS):
        self._q: queue.SimpleQueue = queue.SimpleQueue()     # wake-ups for idle threads
        self._lock = threading.Lock()
        self._max, self._threads, self._idle, self._draining = threads, 0, 0, 0
        self._later: list[int] = []             # collected, not handed over yet
        self._due = False                       # one of them is not lazy
        self._since: float | None = None        # lazy ones waiting since (the loop's clock)
        self._todo: collections.deque = collections.deque()     # handed over
        self._closed = self._seen = 0           # closes done; as of the last flush
        self._moved = 0.0                       # when work was handed over or got done
        self.pending = 0          # not closed yet (they count against the limit)

    def close(self, fd: int, lazy: bool = False) -> None:
        with self._lock:
            self.pending += 1
            self._later.append(fd)
            if not lazy:
                self._due = True

    def flush(self, now: float, force: bool = False) -> None:
        if not self._later and not self._todo:
            return
        start = wake = False
        with self._lock:
            if self._closed != self._seen:
                self._seen, self._moved = self._closed, now
            # Nothing closed for a while though some wait: a thread is stuck on one (a
            # lingering socket); another one takes the rest.
            stalled = bool(self._todo) and now - self._moved >= STALLED
            if self._later:
                if self._since is None:
                    self._since = now
                if self._due or force or len(self._later) >= LAZY_MAX or \
                        now - self._since >= LAZY_DELAY:
                    self._todo.extend(self._later)
                    self._later, self._due, self._since = [], False, None
            if not self._todo or (self._draining and not stalled):
                return                          # (a thread at work takes them too)
            self._moved = now
            if self._idle:
                self._idle -= 1
                self._draining += 1
                wake = True
            elif self._threads < self._max:
                self._threads += 1
                self._draining += 1
                start = True
            # else every thread is busy: the first one free takes them
        if wake:
            self._q.put(None)
        if start:
            threading.Thread(target=self._run, name="ipsecchan-closer", daemon=True).start()

    def _run(self) -> None:
        while True:
            while True:
                with self._lock:
                    if not self._todo:
                        self._draining -= 1
                        self._idle += 1
                        break
                    fd = self._todo.popleft()
                try:
                    os.close(fd)
                except OSError:
                    pass
                with self._lock:
                    self.pending -= 1
                    self._closed += 1
            self._q.get()


_closer = _Closer()


def _dispose(obj, lazy: bool = False) -> None:
    """Let go of a client's descriptor (a number, or a socket object made over one). `lazy`:
    the client holds it too, as far as the broker knows (see _Closer)."""
    fd = obj.detach() if isinstance(obj, socket.socket) else obj
    if fd >= 0:
        _closer.close(fd, lazy)


def _as_socket(fd: int, family: int = -1, type: int = -1, proto: int = -1) -> socket.socket:
    """A socket object over `fd`, or OSError (ENOTSOCK for another kind of file).

    The socket layer is asked first (getsockname, and SO_TYPE and SO_PROTOCOL for what the
    caller does not give): fstat() of an arbitrary file can block (FUSE), of a socket it
    cannot. Nothing here may change the file's flags (no timeouts): the client shares it."""
    return socket.socket(family, type, proto, fd)


def _same_socket(fd: int, ino: int, family: int = -1, type: int = -1,
                 proto: int = -1) -> socket.socket | None:
    """`fd` as a socket if it is still the socket with inode `ino`; else None (fd let go).
    `family`, `type`, `proto`: that socket's, when known (its inode is checked anyway)."""
    try:
        sock = _as_socket(fd, family, type, proto)
    except OSError:
        _dispose(fd)
        return None
    try:
        same = os.fstat(sock.fileno()).st_ino == ino
    except OSError:
        same = False
    if not same:
        _dispose(sock)
        return None
    return sock


class RequestError(Exception):
    def __init__(self, message: str, code: int | None = None, cause: str | None = None,
                 detail: str | None = None):
        super().__init__(message)
        self.code, self.cause, self.detail = code, cause, detail

    def reply(self) -> dict:
        r = {"ok": False, "error": str(self), "errno": self.code, "cause": self.cause}
        if self.detail is not None:
            r["detail"] = self.detail       # a refusal's own words (LatchRefused.detail)
        return r


class ClientSocket:
    """A client's socket as a latch acts on it (Latcher calls setsockopt, getsockname, ...).

    During the request, the descriptor received with it; afterwards the client's own
    descriptor, fetched anew for each use and checked to be the same socket (inode)."""

    def __init__(self, sock: socket.socket, pidfd: int | None, client_fd: int, ino: int):
        self.sock: socket.socket | None = sock
        self.family, self.type, self.proto = sock.family, sock.type, sock.proto
        self.pidfd, self.client_fd, self.ino = pidfd, client_fd, ino

    @property
    def held(self) -> bool:
        """The broker holds a descriptor of it (during a request, or without pidfd_getfd)."""
        return self.sock is not None

    def let_go(self) -> None:
        """The request is done: keep nothing of the client's socket open here."""
        if self.pidfd is not None and self.sock is not None:
            _dispose(self.sock, lazy=True)      # the client has it at client_fd (checked)
            self.sock = None

    def _target(self) -> tuple[socket.socket | None, bool]:
        """(the socket, whether it is a temporary copy), or (None, False) when it is closed.
        Raises OSError when that cannot be told (the broker out of descriptors, say): a
        closed socket's policies are skipped, so "cannot tell" must never pass for closed."""
        if self.sock is not None:
            return self.sock, False
        if self.pidfd is None:
            return None, False          # released
        try:
            fd = pidfd_getfd(self.pidfd, self.client_fd)
        except OSError as exc:
            if exc.errno in (errno.ESRCH, errno.EBADF):
                return None, False      # the process or the descriptor is gone
            raise
        sock = _same_socket(fd, self.ino, self.family, self.type, self.proto)
        return (sock, True) if sock is not None else (None, False)

    @property
    def gone(self) -> bool:
        try:
            s, tmp = self._target()
        except OSError as exc:
            log.warning("cannot tell whether a client's socket is open: %s", exc)
            return False
        if tmp:
            _dispose(s)
        return s is None

    def _call(self, name: str, *args):
        s, tmp = self._target()
        if s is None:
            if name == "setsockopt":
                return None             # closed: its policies went with it
            raise OSError(errno.EBADF, "the client's socket is closed")
        try:
            return getattr(s, name)(*args)
        finally:
            if tmp:
                _dispose(s)

    def fileno(self) -> int:
        return self.client_fd

    def setsockopt(self, *a):
        return self._call("setsockopt", *a)

    def getsockopt(self, *a):
        return self._call("getsockopt", *a)

    def getsockname(self):
        return self._call("getsockname")

    def getpeername(self):
        return self._call("getpeername")

    def shutdown(self, how: int) -> None:
        return self._call("shutdown", how)

    def close(self) -> None:
        if self.sock is not None:
            _dispose(self.sock)
            self.sock = None


class _Detached:
    """Stands in for a blocked socket while its latch is closed: the block stays."""

    def __init__(self, family: int):
        self.family = family

    def setsockopt(self, *a) -> None:
        pass


@dataclass(eq=False)
class Client:
    conn: socket.socket
    pid: int
    uid: int
    gid: int
    pidfd: int | None
    latches: dict = field(default_factory=dict)        # latch id -> LatchHandle
    queued: collections.deque = field(default_factory=collections.deque)  # encoded, unsent
    events: int = selectors.EVENT_READ
    closed: bool = False
    follower: bool = False          # an operator following every latch's alerts (watch)
    busy: bool = False              # a latch of its is being made: its next requests wait

    def label(self) -> str:
        return f"pid={self.pid} uid={self.uid} gid={self.gid}"


# by_ino's mark for a socket whose latch a worker is making.
_BEING_LATCHED = object()

_own_cookie: list = []


def _netns_cookie(sock: socket.socket | None) -> int | None:
    """The network namespace a socket lives in (None: the kernel cannot say, before 5.14).
    None for `sock` asks for the broker's own namespace."""
    if sock is None:
        if not _own_cookie:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                _own_cookie.append(_netns_cookie(probe))
        return _own_cookie[0]
    try:
        return struct.unpack("Q", sock.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8))[0]
    except OSError:
        return None


def _check_socket(fd: int, want: str) -> tuple[socket.socket, int]:
    """The received descriptor as a socket of the kind the operation needs ("listen",
    "connected", or "any" IPv4/IPv6 TCP or UDP socket of this network namespace), or
    RequestError (the descriptor then let go)."""
    try:
        sock = _as_socket(fd)
    except OSError as exc:
        _dispose(fd)
        if exc.errno == errno.ENOTSOCK:
            raise RequestError("not a socket", errno.ENOTSOCK) from None
        raise RequestError(f"unusable descriptor: {exc.strerror}", exc.errno) from None
    try:
        ino = os.fstat(sock.fileno()).st_ino
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise RequestError("only IPv4 and IPv6 sockets latch", errno.EAFNOSUPPORT)
        kind = (sock.type & 0xF, sock.proto)       # (read with SO_TYPE and SO_PROTOCOL)
        if kind not in ((socket.SOCK_STREAM, socket.IPPROTO_TCP),
                        (socket.SOCK_DGRAM, socket.IPPROTO_UDP)):
            raise RequestError("only TCP and UDP sockets latch", errno.ESOCKTNOSUPPORT)
        if _netns_cookie(sock) != _netns_cookie(None):
            # One broker per network namespace: its view of SAs is its namespace's only.
            raise RequestError("a socket of another network namespace", errno.EXDEV)
        tcp = kind[0] == socket.SOCK_STREAM
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] if tcp else None
        if want == "listen":
            if not tcp or state != _TCP_LISTEN:
                raise RequestError("not a listening TCP socket", errno.EINVAL)
        elif want == "connected":
            try:
                sock.getpeername()
            except OSError:
                raise RequestError("not connected", errno.ENOTCONN) from None
            if tcp and state != _TCP_ESTABLISHED:
                # Half-closed, closing or not yet connected: nothing to latch for its life.
                raise RequestError("not an established TCP connection", errno.ENOTCONN)
        return sock, ino
    except RequestError:
        _dispose(sock)
        raise
    except OSError as exc:
        _dispose(sock)
        raise RequestError(f"unusable socket: {exc.strerror}", exc.errno) from None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _int_field(msg: dict, name: str) -> int | None:
    value = msg.get(name)
    if value is None:
        return None
    if type(value) is not int:          # bool is an int subclass: not a number here
        raise RequestError(f"{name!r} must be an integer", errno.EINVAL)
    return value


class _Memo:
    """An identity source asked once per SA within one request (an SA the IKE daemon does not
    know makes it list its SAs again on each ask)."""

    def __init__(self, source):
        self.source, self.answers = source, {}

    def identify(self, sa):
        ans = self.answers.get(sa.key)
        if ans is None:
            ans = self.answers[sa.key] = self.source.identify(sa)
        return ans


def _family_of(handle, ref) -> int:
    """The family of a latched socket's packets (enforce.apply's `family`): its flow's; a
    listener's is its socket's own."""
    return handle.flow.family if handle.flow is not None else ref.family


def _flow(value) -> Flow:
    """A flow as `lookup` takes it: [family, proto, local, local_port, remote, remote_port,
    mark, ifindex], the addresses in the family's text form."""
    if not (isinstance(value, list) and len(value) == 8
            and all(type(v) is int for v in value[:2] + value[3:4] + value[5:])
            and all(isinstance(v, str) for v in (value[2], value[4]))):
        raise RequestError("a flow is [family, proto, local, local_port, remote, remote_port, "
                           "mark, ifindex]", errno.EINVAL)
    family, proto, local, lport, remote, rport, mark, ifindex = value
    if family not in (socket.AF_INET, socket.AF_INET6) or not 0 <= proto <= 255 \
            or not (0 <= lport <= 65535 and 0 <= rport <= 65535) \
            or not 0 <= mark <= 0xFFFFFFFF or not 0 <= ifindex <= 0x7FFFFFFF:
        raise RequestError("a flow's family, protocol, port, mark or ifindex is out of range",
                           errno.EINVAL)
    try:
        local, remote = (socket.inet_ntop(family, socket.inet_pton(family, a))
                         for a in (local, remote))
    except (OSError, ValueError):
        raise RequestError("a flow's address is not one of its family", errno.EINVAL) from None
    return Flow(family, proto, local, lport, remote, rport, mark=mark, ifindex=ifindex)


def _requirements(msg: dict) -> Requirements:
    policy, peer_id = msg.get("policy", "require"), msg.get("peer_id")
    if not (isinstance(policy, str) and policy in _POLICIES):
        raise RequestError("'policy' must be \"require\" or \"optional\"", errno.EINVAL)
    if not (peer_id is None or (isinstance(peer_id, str) and len(peer_id) <= MAX_PEER_ID)):
        raise RequestError(f"'peer_id' must be null or a string of at most {MAX_PEER_ID} "
                           "characters", errno.EINVAL)
    return Requirements(_POLICIES[policy], peer_id)


def _expected(msg: dict) -> LatchParams | None:
    """What a latch made again must match ("expect": the params it had), or None."""
    d = msg.get("expect")
    if d is None:
        return None
    try:
        params = protocol.params_of(d)
        if params.protected and params.peer is None:
            raise ValueError("a protected latch names its peer")
        return params
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise RequestError(f"'expect' is not a latch's params: {_short(exc)}",
                           errno.EINVAL) from None


def _peer_groups(conn: socket.socket) -> set[int]:
    """The client's supplementary groups (none known if it has more than 256)."""
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)
    except OSError:
        return set()
    return set(array.array("I", raw[:len(raw) - len(raw) % 4]))


def _fd_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class Broker:
    def __init__(self, path: str = protocol.DEFAULT_PATH, identities=None, view=None, *,
                 operator_gids=(), listener: socket.socket | None = None):
        """Serve on `path` (a stale socket of a dead broker is replaced), or on `listener`, a
        listening SOCK_SEQPACKET socket made by someone else (systemd) who also owns its
        path. `operator_gids`: groups whose members may list every latch (besides root)."""
        if socket.getdefaulttimeout() is not None:
            # Socket objects made with a default timeout set O_NONBLOCK on the file: on the
            # clients' own sockets, which the broker must never change.
            raise ValueError("the broker cannot run with socket.setdefaulttimeout() set")
        self.path, self.operator_gids = path, frozenset(operator_gids)
        self._own_path = listener is None
        if listener is None:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._unlink_stale(path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                listener.bind(path)
                os.chmod(path, 0o666)  # any user may ask; what it may ask about is its own
                listener.listen(socket.SOMAXCONN)
                self._ino = os.stat(path).st_ino
            except OSError:
                listener.close()
                raise
        self.listener = listener
        try:
            if identities is None:
                from ipsecchan.runtime import default_identities
                identities = default_identities()
            self.latcher = Latcher(identities, view)
        except BaseException:
            self._close_listener()
            raise
        self.clients: set[Client] = set()
        self.owner: dict[int, Client] = {}            # latch id -> client
        # latch id -> the other clients holding that connection too (a descriptor passed
        # over a Unix socket, or inherited), each with its own descriptor of it (see _join)
        self.sharers: dict[int, dict[Client, ClientSocket]] = {}
        self.by_ino: dict[int, object] = {}            # socket inode -> its latch handle
        self.per_uid: collections.Counter = collections.Counter()   # latches by uid
        self.held = 0          # client descriptors kept (no pidfd_getfd), counted for limits
        self.listener.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ, "listener")
        self.sel.register(self.latcher.view.monitor, selectors.EVENT_READ, "xfrm")
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stop = threading.Event()
        # Latches are made in worker threads: one waiting for its identities (the grace
        # after a rekey, up to seconds) must not hold up every other client. Finished ones
        # come back through _done (and a byte on the wake pipe) to this loop, which alone
        # touches the broker's state.
        self._workers = concurrent.futures.ThreadPoolExecutor(
            LATCH_WORKERS, thread_name_prefix="ipsecchan-latch")
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._next_sweep = 0.0
        self._fd_max = _fd_limit()          # read again with each sweep
        self._accept_paused = 0.0
        self.latcher.observers.append(self._on_alert)

    @staticmethod
    def _unlink_stale(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        probe.settimeout(2)      # a live broker with a full backlog makes connect() wait
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)      # nobody listens: a dead broker's leftover
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            raise OSError(errno.EADDRINUSE, f"{path}: cannot tell whether a broker serves "
                                            f"it ({exc.strerror or exc})") from None
        finally:
            probe.close()
        raise OSError(errno.EADDRINUSE, f"a broker already serves {path}")

    # -- the loop --
    def serve_forever(self) -> None:
        now = time.monotonic()      # read once a turn (a system call under UML)
        while not self._stop.is_set():
            if self._accept_paused and now >= self._accept_paused:
                self._accept_paused = 0.0
                self.sel.register(self.listener, selectors.EVENT_READ, "listener")
            _closer.flush(now)
            xfrm = False
            for key, mask in self.sel.select(0.2):
                what = key.data
                try:
                    if what == "xfrm":
                        xfrm = True
                    elif what == "listener":
                        self._accept()
                    elif what == "wake":
                        try:
                            os.read(self._wake_r, 64)
                        except BlockingIOError:
                            pass
                        self._finish_latches()
                    elif isinstance(what, Client) and not what.closed:
                        if mask & selectors.EVENT_WRITE:
                            self._flush(what)
                        if mask & selectors.EVENT_READ and not what.closed:
                            self._read(what)
                except Exception:
                    # A bug: this client's session ends (its sockets blocked), others go on.
                    log.exception("serving %s", what.label() if isinstance(what, Client)
                                  else what)
                    if isinstance(what, Client):
                        self._drop(what, "internal error")
            self._finish_latches()          # (the wake byte is a hint; this is the check)
            # XFRM and IKE events (the IKE source queues them from its own thread). Not
            # looked for in a turn with none: the poll takes the Latcher's lock and reads
            # netlink, system calls each under UML (and at least every SWEEP_EVERY anyway).
            now = time.monotonic()
            sweep = now >= self._next_sweep
            if xfrm or sweep or self.latcher.has_work():
                try:
                    self.latcher.poll(0)
                except Exception:
                    log.exception("event handling failed")
            if sweep:
                self._next_sweep = now + SWEEP_EVERY
                self._fd_max = _fd_limit()
                try:
                    self._sweep()
                except Exception:
                    log.exception("sweeping closed sockets failed")

    def stop(self) -> None:
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def close(self) -> None:
        self._workers.shutdown(wait=True)       # latches being made: finished, then dropped
        self._finish_latches()
        for client in list(self.clients):
            self._drop(client, "broker stopping")
        _closer.flush(time.monotonic(), force=True)
        self.sel.close()
        self._close_listener()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.latcher.close()

    def _close_listener(self) -> None:
        self.listener.close()
        try:
            # Its own socket only: not one that systemd made, or a newer broker's.
            if self._own_path and os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except OSError:
            pass

    def _fd_room(self, more: int) -> bool:
        """Whether `more` descriptors still leave the broker its reserve. What it holds is
        counted (each client's connection and pidfd, kept sockets, closes in progress), so
        that no event ever finds it out of descriptors."""
        used = 2 * len(self.clients) + self.held + _closer.pending + FD_RESERVE
        return used + more <= self._fd_max

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of descriptors (EMFILE, ENFILE): the connection waits in the backlog;
                # pause, rather than spin on a listener that stays readable.
                log.warning("accepting a client: %s; pausing %.1f s", exc, ACCEPT_PAUSE)
                self.sel.unregister(self.listener)
                self._accept_paused = time.monotonic() + ACCEPT_PAUSE
                return
            if len(self.clients) >= MAX_CLIENTS or not self._fd_room(2):
                try:
                    protocol.send(conn, {"id": None, "ok": False, "errno": errno.EMFILE,
                                         "error": "the broker serves too many clients",
                                         "cause": None})
                except OSError:
                    pass
                conn.close()
                continue
            pid, uid, gid = struct.unpack("3i", conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                pidfd = None            # gone already, or no pidfd: descriptors are kept
            conn.setblocking(False)
            client = Client(conn, pid, uid, gid, pidfd)
            self.clients.add(client)
            self.sel.register(conn, selectors.EVENT_READ, client)

    def _read(self, client: Client) -> None:
        for _ in range(MAX_BATCH):
            if client.queued or client.closed or client.busy:
                return      # replies wait for it: read no more of its requests meanwhile
            try:
                msg, fds = protocol.recv(client.conn, _dispose)
            except (BlockingIOError, InterruptedError):
                return
            except protocol.ProtocolError as exc:
                self._reply(client, {"id": None, "ok": False, "error": str(exc),
                                     "errno": errno.EINVAL, "cause": None})
                continue
            except OSError as exc:
                self._drop(client, f"read: {exc}")
                return
            if msg is None:
                self._drop(client, "closed")
                return
            reply = self._request(client, msg, fds)
            if reply is None:               # a latch being made: answered when it is done
                self._rest(client)
                return
            if reply["ok"] and msg.get("quiet") is True and msg.get("op") == "release":
                continue                    # the client does not wait for it
            self._reply(client, reply)

    # -- requests --
    def _request(self, client: Client, msg: dict, fds: list[int]) -> dict:
        rid = msg.get("id")
        try:
            if rid is not None and type(rid) is not int:
                rid = None
                raise RequestError("'id' must be an integer", errno.EINVAL)
            if len(fds) > 1:
                raise RequestError("one socket per request", errno.EINVAL)
            reply = self._handle(client, msg, fds, rid)
            if reply is None:
                return None
        except RequestError as exc:
            reply = exc.reply()
        except Exception:         # a bug: answer, log, keep serving others
            log.exception("request from %s", client.label())
            reply = {"ok": False, "error": "internal error (logged by the broker)",
                     "errno": None, "cause": None}
        finally:
            for fd in fds:          # left over by a request that failed early
                _dispose(fd)
        reply["id"] = rid
        return reply

    def _handle(self, client: Client, msg: dict, fds: list[int], rid=None) -> dict | None:
        op = msg.get("op")
        if op not in _OPS:
            raise RequestError(f"unknown op {_short(op)}", errno.EINVAL)
        takes_fd = op in ("latch", "listen", "accept", "abort")
        if takes_fd != bool(fds) and op != "release":
            raise RequestError(f"{op!r} takes {'one socket' if takes_fd else 'no socket'}",
                               errno.EINVAL)
        if op == "release":
            lid = _int_field(msg, "latch")
            handle = client.latches.get(lid)
            if handle is None:
                raise RequestError("no such latch", errno.ENOENT)
            passed = self._latched_socket(handle, fds.pop()) if fds else None
            self._release(client, handle, passed=passed)
            return {"ok": True}
        if op == "list":
            return self._list(client, msg)
        if op == "follow":
            self._check_operator(client, "following latches")
            client.follower = True
            return {"ok": True}
        if op == "lookup":
            return self._lookup(client, msg)
        if op == "abort":
            return self._abort(fds.pop())
        # Everything about the request is checked before the socket is looked at.
        if op == "accept":
            lid = _int_field(msg, "listener")
            listener = client.latches.get(lid)
            if listener is None or listener.flow is not None:
                raise RequestError("no such listener", errno.ENOENT)
            req = None
        else:
            listener, req = None, _requirements(msg)
        expect = _expected(msg) if op == "latch" else None
        client_fd = msg.get("fd")
        if client.pidfd is not None and (type(client_fd) is not int or client_fd < 0):
            raise RequestError("'fd' must be the passed socket's descriptor number in the "
                               "client", errno.EINVAL)
        if len(client.latches) >= MAX_LATCHES_PER_CLIENT or (
                client.uid != 0 and self.per_uid[client.uid] >= MAX_LATCHES_PER_UID):
            raise RequestError("too many latches", errno.EMFILE)
        sock, ino = _check_socket(fds.pop(), "listen" if op == "listen" else "connected")
        ref = ClientSocket(sock, client.pidfd, client_fd if type(client_fd) is int else -1,
                           ino)
        try:
            self._check_client_fd(ref)
            # The received descriptor is held until the latch is made.
            if not self._fd_room(1):
                raise RequestError("the broker is out of descriptors", errno.EMFILE)
            shared = self._latched_elsewhere(client, ino) if op == "latch" else None
            if shared is not None:
                self._join(client, shared, ref, req, expect)
                return {"ok": True, "latch": protocol.latch_json(shared)}
            self._claim(ino)
        except BaseException:
            ref.close()
            raise
        try:
            # Most latches need no wait: made at once, here. One that would wait for its
            # identities goes to a worker.
            handle = self._latch(op, ref, req, listener, expect, wait=False)
        except LatchWouldWait:
            pass
        except BaseException:
            ref.close()
            raise
        else:
            self._register(client, op, ref, ino, handle)
            return {"ok": True, "latch": protocol.latch_json(handle)}
        self.by_ino[ino] = _BEING_LATCHED
        self.held += 1
        client.busy = True
        try:
            self._workers.submit(self._latch_job, client, rid, op, ref, ino, req, listener,
                                 expect)
        except BaseException:
            self.by_ino.pop(ino, None)
            self.held -= 1
            client.busy = False
            ref.close()
            raise
        return None

    def _latch_job(self, client: Client, rid, op: str, ref: ClientSocket, ino: int,
                   req, listener, expect) -> None:
        """In a worker thread: make the latch (the Latcher is thread-safe), hand it back."""
        try:
            result = self._latch(op, ref, req, listener, expect)
        except BaseException as exc:
            result = exc
        self._done.put((client, rid, op, ref, ino, result))
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass                # closing: close() finishes what is left

    def _register(self, client: Client, op: str, ref: ClientSocket, ino: int, handle) -> None:
        ref.let_go()
        self.held += ref.held
        client.latches[handle.id] = handle
        self.owner[handle.id] = client
        self.by_ino[ino] = handle
        self.per_uid[client.uid] += 1
        log.info("latch %d (%s) for %s: %s", handle.id, op, client.label(),
                 handle.latch.state.value)

    def _finish_latches(self) -> None:
        """Latches made by the workers: recorded and answered (in the loop's thread)."""
        while not self._done.empty():       # (lock-free, unlike get_nowait())
            try:
                client, rid, op, ref, ino, result = self._done.get_nowait()
            except queue.Empty:
                return
            self.held -= 1
            if self.by_ino.get(ino) is _BEING_LATCHED:
                del self.by_ino[ino]
            client.busy = False
            if isinstance(result, BaseException):
                ref.close()
                if isinstance(result, RequestError):
                    reply = result.reply()
                else:             # a bug: answer, log, keep serving others
                    log.error("latch for %s", client.label(), exc_info=result)
                    reply = {"ok": False, "error": "internal error (logged by the broker)",
                             "errno": None, "cause": None}
            elif client.closed:
                # Gone meanwhile (its pidfd closed with it): its socket, still held here, is
                # blocked (nobody verifies it any more) and the latch forgotten.
                handle = result
                try:
                    apply(ref, Block(Cause.NOT_VERIFIED), _family_of(handle, ref))
                    handle.sock = _Detached(ref.family)     # closing the latch keeps the block
                    self.latcher.release(handle)
                except OSError as exc:
                    log.warning("latch %d of %s, gone: %s", handle.id, client.label(), exc)
                ref.close()
                continue
            else:
                self._register(client, op, ref, ino, result)
                reply = {"ok": True, "latch": protocol.latch_json(result)}
            reply["id"] = rid
            self._reply(client, reply)
            if not client.closed:
                self._rest(client)
                self._read(client)      # its requests that waited

    def _abort(self, fd: int) -> dict:
        """A connection whose latch was refused is about to be reset by its owner: clear the
        block so that the reset reaches the peer (who would otherwise wait on a half-dead
        connection). Not for a latched socket: whoever holds a socket could set it free of
        its latch so; not for one with bytes queued (they would follow the block out)."""
        sock, ino = _check_socket(fd, "any")
        try:
            self._claim(ino, "the socket is latched: release it")
            if sock.type & 0xF == socket.SOCK_STREAM and unsent(sock):
                # A retransmission after the block is gone would carry those bytes out.
                raise RequestError("bytes are queued on the connection: reset it behind its "
                                   "block", errno.EBUSY)
            clear_socket_policies(sock)
        except OSError as exc:
            raise RequestError(f"cannot clear its policies: {exc.strerror or exc}",
                               exc.errno or errno.EIO) from None
        finally:
            _dispose(sock)
        return {"ok": True}

    @staticmethod
    def _check_client_fd(ref: ClientSocket) -> None:
        """The client holds the socket it passed, at the number it gave: the broker reaches
        it there later."""
        if ref.pidfd is None:
            return      # no pidfd (the process gone already, old kernel): kept instead
        try:
            fd = pidfd_getfd(ref.pidfd, ref.client_fd)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOSYS):
                ref.pidfd = None        # not allowed here: keep the received descriptor
                return
            if exc.errno == errno.ESRCH or _exited(ref.pidfd):
                raise RequestError("the client process is gone", errno.ESRCH) from None
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise RequestError("the broker is out of descriptors", errno.EMFILE) from None
            raise RequestError("'fd' does not name the passed socket", errno.EBADF) from None
        same = _same_socket(fd, ref.ino, ref.family, ref.type, ref.proto)
        if same is None:
            raise RequestError("'fd' does not name the passed socket", errno.EBADF)
        # Closed here at once: the received descriptor of the same socket is still held
        # (ref.sock), so this close cannot be the socket's last one, and cannot block.
        os.close(same.detach())

    def _latched_elsewhere(self, client: Client, ino: int):
        """The latch another client holds on this connection, if any (None: none, or one
        _claim refuses: a listener's, one being made, this client's own)."""
        other = self.by_ino.get(ino)
        if other is None or other is _BEING_LATCHED or other.flow is None:
            return None
        owner = self.owner.get(other.id)
        if owner is not None and self._ref_of(owner, other).gone:
            self._release(owner, other)     # (a sharer, if any, holds it from now on)
            return self._latched_elsewhere(client, ino)
        if owner is None or owner is client or client in self.sharers.get(other.id, ()):
            return None
        return other

    def _join(self, client: Client, handle, ref: ClientSocket, req: Requirements,
              expect: LatchParams | None) -> None:
        """Another client holds this connection too (passed to it, or inherited) and asks
        for its latch: it shares the one there is. Two latches on one socket would undo each
        other's pins, and holding the socket is what entitles a client to its latch. The
        latch must meet this client's requirements (and `expect`), else it is refused, and
        not blocked: the other holder's latch still pins the connection."""
        latch = handle.latch
        if latch.state is not LatchState.ESTABLISHED:
            cause = latch.cause or Cause.NOT_VERIFIED
            raise RequestError(f"connection not latched: {cause.value} (its latch, held by "
                               f"another process, is {latch.state.value})",
                               errno.ECONNREFUSED, cause.value, latch.detail)
        params = latch.params
        if not params.protected and req.policy is not Policy.OPTIONAL:
            cause, detail = Cause.CLEARTEXT, "the connection is latched to cleartext"
        elif req.peer_id is not None and (not params.protected or
                                          params.peer.id != req.peer_id):
            cause = Cause.PEER_NOT_REQUIRED
            detail = f"peer is {params.peer.id if params.peer else None!r}, " \
                     f"required {req.peer_id!r}"
        elif expect is not None:
            cause, detail = conflict(params, expect, req)
        else:
            cause, detail = None, ""
        if cause is not None:
            raise RequestError(f"connection not latched: {cause.value} ({detail})",
                               errno.ECONNREFUSED, cause.value, detail)
        if req.strict_algorithms and not latch.requirements.strict_algorithms:
            raise RequestError("the socket is latched already, without strict algorithms",
                               errno.EBUSY)
        ref.let_go()
        self.held += ref.held
        client.latches[handle.id] = handle
        self.sharers.setdefault(handle.id, {})[client] = ref
        self.per_uid[client.uid] += 1
        log.info("latch %d shared with %s", handle.id, client.label())

    def _ref_of(self, client: Client, handle) -> "ClientSocket":
        """The client's own descriptor of a latch's socket."""
        if self.owner.get(handle.id) is client:
            return handle.sock
        return self.sharers[handle.id][client]

    def _leave(self, client: Client, handle) -> "ClientSocket | None":
        """A latch other clients hold too: this client's hold ends, the latch stays with its
        pins (a sharer becomes its owner if this client was). The client's descriptor
        record, or None when nobody else holds the latch."""
        sharers = self.sharers.get(handle.id)
        if not sharers:
            return None
        if self.owner.get(handle.id) is client:
            heir = next(iter(sharers))
            ref, handle.sock = handle.sock, sharers.pop(heir)
            self.owner[handle.id] = heir
        else:
            ref = sharers.pop(client)
        if not sharers:
            del self.sharers[handle.id]
        return ref

    def _claim(self, ino: int, busy: str = "this socket is latched already") -> None:
        """One latch per socket: a second (by this client or another) would replace the
        first one's policies, and releasing either would clear them under the other."""
        other = self.by_ino.get(ino)
        if other is None:
            return
        if other is _BEING_LATCHED:
            raise RequestError(busy, errno.EBUSY)
        if other.sock.gone:       # closed without a release, its inode since reused
            owner = self.owner.get(other.id)
            if owner is not None:
                self._release(owner, other)
            self.by_ino.pop(ino, None)
            return
        raise RequestError(busy, errno.EBUSY)

    def _latch(self, op: str, ref: ClientSocket, req: Requirements | None, listener,
               expect: LatchParams | None = None, wait: bool = True):
        try:
            if op == "listen":
                # A block left by a session that ended would stay on the OUT side (a listener
                # pins IN only) and be cloned into every connection: no SYN-ACK would leave.
                clear_socket_policies(ref)
                return self.latcher.listen(ref, req)
            if op == "accept":
                # The flow is looked up with the listener's mark (it is inherited): a socket
                # with another one is not the listener's connection.
                if ref.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) != listener.mark:
                    raise RequestError("not a connection of that listener", errno.EINVAL)
                return self.latcher.accept(listener, ref, wait=wait)
            try:
                # expect: latching again what was latched before (the broker restarted).
                return self.latcher.latch(ref, req, wait=wait, expect=expect)
            except LatchWouldWait:
                raise                # nothing latched: made again, waiting, by a worker
            except BaseException as exc:
                # Nothing of it may leave: the client cannot set policies itself.
                cause = exc.cause if isinstance(exc, LatchRefused) else Cause.NOT_VERIFIED
                try:
                    apply(ref, Block(cause), packet_family(ref))
                except OSError as err:
                    log.warning("blocking a connection that did not latch: %s", err)
                raise
        except LatchRefused as exc:
            raise RequestError(str(exc), errno.ECONNREFUSED, exc.cause.value,
                               exc.detail) from None
        except OSError as exc:
            raise RequestError(f"cannot latch: {exc.strerror or exc}",
                               exc.errno or errno.EIO) from None

    def _check_operator(self, client: Client, what: str) -> None:
        if client.uid != 0 and not (self.operator_gids and self.operator_gids & (
                {client.gid} | _peer_groups(client.conn))):
            raise RequestError(f"{what} is for root and the operator group", errno.EPERM)

    def _owned(self, handle, owner: Client) -> dict:
        # For operators (`ss`, `watch`): the status services' LATCH format, with the socket's
        # inode (ss joins on it) and the process that owns the latch.
        from ipsecchan.latch.status import latch_dict
        return {**latch_dict(handle, getattr(handle.sock, "ino", None)),
                "owner": {"pid": owner.pid, "uid": owner.uid},
                "sharers": [{"pid": c.pid, "uid": c.uid}
                            for c in self.sharers.get(handle.id, ())]}

    def _list(self, client: Client, msg: dict) -> dict:
        self._check_operator(client, "listing latches")
        after = _int_field(msg, "after")
        out, size, nxt = [], 256, None
        for hid in sorted(self.owner):
            if after is not None and hid <= after:
                continue
            owner = self.owner[hid]
            item = self._owned(owner.latches[hid], owner)
            n = len(protocol.encode(item)) + 1
            if size + n > protocol.MAX_MESSAGE:
                nxt = out[-1]["id"] if out else None
                break
            out.append(item)
            size += n
        return {"ok": True, "latches": out, "next": nxt}

    def _lookup(self, client: Client, msg: dict) -> dict:
        """For operators without CAP_NET_ADMIN (`ipsecchan ss`): what the kernel's SAD/SPD
        (the broker's view of it) and the IKE daemon say of each flow asked about, in ss's
        "ipsec" format. As many answers as fit in one reply; the client asks again for the
        rest."""
        self._check_operator(client, "reading the kernel's IPsec state")
        flows, ike = msg.get("flows"), msg.get("ike", True)
        if not isinstance(flows, list) or len(flows) > MAX_LOOKUP_FLOWS:
            raise RequestError(f"'flows' must be a list of at most {MAX_LOOKUP_FLOWS} flows",
                               errno.EINVAL)
        if type(ike) is not bool:
            raise RequestError("'ike' must be true or false", errno.EINVAL)
        flows = [_flow(f) for f in flows]
        from ipsecchan.ss import ipsec_dict
        out, size = [], 256
        identities = _Memo(self.latcher.identities) if ike else None
        with self.latcher.lock:
            try:
                self.latcher.poll_xfrm()    # the view as of now (its events go to the latches)
            except OSError as exc:
                raise RequestError(f"the kernel's IPsec state cannot be read: {exc}",
                                   exc.errno or errno.EIO) from None
            index = self.latcher.view.index
            for flow in flows:
                item = ipsec_dict(index.lookup(flow), identities)
                size += len(protocol.encode(item)) + 1
                if size > protocol.MAX_MESSAGE:
                    break
                out.append(item)
        if flows and not out:
            raise RequestError("the answer for one flow does not fit in a message", errno.E2BIG)
        return {"ok": True, "ipsec": out}

    @staticmethod
    def _latched_socket(handle, fd: int) -> socket.socket:
        """The socket passed with a release, if it is the latch's (else RequestError; `fd` is
        let go either way by the caller's cleanup or here)."""
        ref = handle.sock
        if not isinstance(ref, ClientSocket):
            _dispose(fd)
            raise RequestError("the latch has no socket", errno.EINVAL)
        sock = _same_socket(fd, ref.ino, ref.family, ref.type, ref.proto)
        if sock is None:
            raise RequestError("the socket passed is not the latch's", errno.EINVAL)
        return sock

    def _release(self, client: Client, handle, *, block: bool = False,
                 passed: socket.socket | None = None) -> None:
        """Close the latch. `block`: its client is gone; a socket that lives on is blocked
        both ways (nobody verifies it any more), else its policies are cleared. `passed`: the
        latch's socket, received with the release (used, then let go)."""
        if client.latches.pop(handle.id, None) is not None:
            self.per_uid[client.uid] -= 1
            if not self.per_uid[client.uid]:
                del self.per_uid[client.uid]
        mine = self._leave(client, handle)
        if mine is not None:
            # Others hold the connection too: the latch and its pins stay theirs (nor is it
            # blocked when this client is gone: they still verify it).
            if passed is not None:
                _dispose(passed)
            self.held -= mine.held
            mine.close()
            return
        self.owner.pop(handle.id, None)
        ref = handle.sock
        if self.by_ino.get(ref.ino) is handle:
            del self.by_ino[ref.ino]
        held = ref.held
        if passed is not None:
            if held:
                _dispose(passed)        # a descriptor of it is kept here already
            else:
                ref.sock = passed       # the policies are cleared through it, then let go
        try:
            if block and not ref.gone:
                apply(ref, Block(Cause.NOT_VERIFIED), _family_of(handle, ref))
                handle.sock = _Detached(ref.family)     # closing the latch keeps the block
            self.latcher.release(handle)
        except OSError as exc:
            log.warning("releasing latch %d of %s: %s", handle.id, client.label(), exc)
        self.held -= held
        ref.close()

    # -- events --
    def _on_alert(self, handle, alert) -> None:
        client = self.owner.get(handle.id)
        if client is None:
            return
        msg = {"event": "alert", "latch": protocol.latch_json(handle), "old": alert.old.value,
               "new": alert.new.value, "cause": alert.cause.value if alert.cause else None,
               "detail": alert.detail, "rekeyed": alert.rekeyed}
        self._reply(client, msg)
        for sharer in list(self.sharers.get(handle.id, ())):
            self._reply(sharer, msg)
        holders = {client, *self.sharers.get(handle.id, ())}
        followers = [c for c in self.clients if c.follower and c not in holders]
        if followers:
            # The status services' ALERT format (see ipsecchan.latch.status).
            msg = {"event": "alert", "time": time.time(), "pid": client.pid, "id": handle.id,
                   "old": alert.old.value, "new": alert.new.value, "cause": msg["cause"],
                   "detail": alert.detail, "rekeyed": alert.rekeyed,
                   "latch": self._owned(handle, client)}
            for f in followers:
                self._reply(f, msg)

    def _reply(self, client: Client, msg: dict) -> None:
        if client.closed:
            return
        try:
            data = protocol.encode(msg)
        except protocol.ProtocolError as exc:
            log.error("to %s: %s", client.label(), exc)
            if "event" in msg:
                self._drop(client, "an alert it cannot be sent")   # it must not miss one
                return
            data = protocol.encode({"id": msg.get("id"), "ok": False, "errno": errno.E2BIG,
                                    "error": "the reply is too long", "cause": None})
        client.queued.append(data)
        self._flush(client)

    def _flush(self, client: Client) -> None:
        while client.queued:
            try:
                client.conn.send(client.queued[0])
            except (BlockingIOError, InterruptedError):
                if len(client.queued) > MAX_QUEUED:
                    self._drop(client, "not reading its messages")
                else:
                    self._interest(client, selectors.EVENT_WRITE)
                return
            except OSError as exc:
                self._drop(client, f"send: {exc}")
                return
            client.queued.popleft()
        self._rest(client)

    def _rest(self, client: Client) -> None:
        """Nothing to send: wait for its requests, or (while its latch is being made) for
        nothing: a readable socket not read would wake the loop at once, again and again."""
        self._interest(client, 0 if client.busy else selectors.EVENT_READ)

    def _interest(self, client: Client, events: int) -> None:
        if client.events == events or client.closed:
            return
        if not events:
            self.sel.unregister(client.conn)
        elif not client.events:
            self.sel.register(client.conn, events, client)
        else:
            self.sel.modify(client.conn, events, client)
        client.events = events

    def _sweep(self) -> None:
        """Latches whose socket is gone (closed without a release) are released."""
        for client in list(self.clients):
            for handle in list(client.latches.values()):
                if self._ref_of(client, handle).gone:
                    self._release(client, handle)

    def _drop(self, client: Client, why: str) -> None:
        if client.closed:
            return
        client.closed = True
        self.clients.discard(client)
        log.info("client %s gone (%s): releasing %d latches", client.label(), why,
                 len(client.latches))
        for handle in list(client.latches.values()):
            self._release(client, handle, block=True)
        try:
            self.sel.unregister(client.conn)
        except (KeyError, ValueError):
            pass
        client.conn.close()
        client.queued.clear()
        if client.pidfd is not None:
            os.close(client.pidfd)
            client.pidfd = None


def activated_listener() -> socket.socket | None:
    """The listening socket systemd passed (socket activation: LISTEN_PID, LISTEN_FDS), or
    None when started otherwise."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = os.environ.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)      # not for anything this process might start
    if count != "1":
        raise OSError(errno.EINVAL, f"socket activation passed {count or 'no'} sockets; the "
                                    "broker takes one")
    sock = socket.socket(fileno=3)      # SD_LISTEN_FDS_START
    if (sock.family, sock.type) != (socket.AF_UNIX, socket.SOCK_SEQPACKET) or \
            not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise OSError(errno.EINVAL, "the socket passed by socket activation is not a "
                                    "listening SOCK_SEQPACKET Unix socket")
    sock.set_inheritable(False)
    return sock


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ipsecchan daemon", description=__doc__.split("\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--socket", default=os.environ.get("IPSECCHAN_BROKER",
                                                       protocol.DEFAULT_PATH),
                    help="where to listen (ignored under socket activation)")
    ap.add_argument("--operators", action="append", default=[], metavar="GROUP",
                    help="a group (name or gid) whose members may list every latch, with "
                         "its owner and peer; root always may")
    ap.add_argument("-v", "--verbose", action="store_true")


def _gid(name: str) -> int:
    try:
        return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise OSError(errno.EINVAL, f"no group {name!r}") from None


def run(opts: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if opts.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # The format names no process: no getpid() for every record (a system call).
    logging.logProcesses = False
    # One descriptor per client (and its pidfd): take all the room the system allows.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            pass
    try:
        listener = activated_listener()
        path = listener.getsockname() if listener is not None else opts.socket
        broker = Broker(path, operator_gids=[_gid(g) for g in opts.operators],
                        listener=listener)
    except PermissionError as exc:
        print(f"ipsecchan daemon: needs CAP_NET_ADMIN: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"ipsecchan daemon: {exc}", file=sys.stderr)
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: broker.stop())
    print(f"listening on {path} (pid {os.getpid()})", flush=True)
    try:
        broker.serve_forever()
    finally:
        broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

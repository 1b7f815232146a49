"""`ipsecchan daemon`: the broker that latches other processes' sockets.

Reading the SAD/SPD, following XFRM notifications and setting per-socket policies need
CAP_NET_ADMIN; applications should not. One broker per host (network namespace) holds one
kernel view and one IKE event stream for all of them: a client passes its own socket with
SCM_RIGHTS, the broker checks what it got (an IPv4/IPv6 TCP or UDP socket, connected, or a
listening TCP socket: read from the descriptor itself, never from the client's word), latches
it, answers with the latch, and pushes that latch's alerts to that client only.

The broker keeps no descriptor of a client's socket once a request is done: a descriptor held
here would keep the connection open after the application closed it. It reaches the socket
again, when an event needs its policies changed, through the client process (pidfd_getfd on
the descriptor number the client gave, checked against the socket's inode): a closed socket,
or a number reused for another, is never touched. A client that goes away takes its latches
with it: each is released, its policies cleared where the socket still lives.

    ipsecchan daemon [--socket PATH] [--operators]

Every latch is logged with the client's SO_PEERCRED (pid, uid, gid).
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import logging
import os
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
from ipsecchan.latch.enforce import apply
from ipsecchan.latch.machine import Block, LatchRefused, Policy, Requirements
from ipsecchan.latch.engine import Latcher
from ipsecchan.xfrm import clear_socket_policies

log = logging.getLogger("ipsecchan.broker")

MAX_LATCHES_PER_CLIENT = 4096
MAX_CLIENTS = 4096
SWEEP_EVERY = 2.0              # how often latches of closed sockets are looked for
MAX_QUEUED = 1024              # alerts queued for a client that does not read; then it goes
_SYS_PIDFD_GETFD = 438         # the same number on every architecture (since Linux 5.6)
_libc = ctypes.CDLL(None, use_errno=True)
_TCP_ESTABLISHED, _TCP_LISTEN = 1, 10


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A copy of descriptor `fd` of the process behind `pidfd` (Python has no binding)."""
    r = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


class RequestError(Exception):
    def __init__(self, message: str, code: int | None = None, cause: str | None = None):
        super().__init__(message)
        self.code, self.cause = code, cause


class ClientSocket:
    """A client's socket as a latch acts on it (Latcher calls setsockopt, getsockname, ...).

    During the request, the descriptor received with it; afterwards the client's own
    descriptor, fetched anew for each use and checked to be the same socket (inode)."""

    def __init__(self, sock: socket.socket, pidfd: int | None, client_fd: int, ino: int):
        self.sock: socket.socket | None = sock
        self.family, self.type = sock.family, sock.type
        self.pidfd, self.client_fd, self.ino = pidfd, client_fd, ino

    def let_go(self) -> None:
        """The request is done: keep nothing of the client's socket open here."""
        if self.pidfd is not None and self.sock is not None:
            self.sock.close()
            self.sock = None

    def _target(self) -> tuple[socket.socket | None, bool]:
        if self.sock is not None:
            return self.sock, False
        if self.pidfd is None:
            return None, False
        try:
            fd = pidfd_getfd(self.pidfd, self.client_fd)
        except OSError:
            return None, False          # the process or the descriptor is gone
        if os.fstat(fd).st_ino != self.ino:
            os.close(fd)
            return None, False          # the number now names another file
        return socket.socket(fileno=fd), True

    @property
    def gone(self) -> bool:
        s, tmp = self._target()
        if tmp:
            s.close()
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
                s.close()

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

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@dataclass(eq=False)
class Client:
    conn: socket.socket
    pid: int
    uid: int
    gid: int
    pidfd: int | None
    latches: dict = field(default_factory=dict)        # latch id -> LatchHandle
    queued: list = field(default_factory=list)         # messages not yet sent (EAGAIN)

    def label(self) -> str:
        return f"pid={self.pid} uid={self.uid} gid={self.gid}"


_SO_NETNS_COOKIE = getattr(socket, "SO_NETNS_COOKIE", 71)
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
    """The received descriptor as a socket of the kind the operation needs, or RequestError
    (the descriptor then closed)."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            raise RequestError("not a socket", errno.ENOTSOCK)
        sock = socket.socket(fileno=fd)
    except RequestError:
        os.close(fd)
        raise
    except OSError as exc:
        os.close(fd)
        raise RequestError(f"unusable descriptor: {exc}", exc.errno) from None
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise RequestError("only IPv4 and IPv6 sockets latch", errno.EAFNOSUPPORT)
        proto = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
        kind = (sock.type & 0xF, proto)
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
        elif want == "any":
            pass
        else:
            try:
                sock.getpeername()
            except OSError:
                raise RequestError("not connected", errno.ENOTCONN) from None
            if tcp and state != _TCP_ESTABLISHED:
                # Half-closed, closing or not yet connected: nothing to latch for its life.
                raise RequestError("not an established TCP connection", errno.ENOTCONN)
        return sock, st.st_ino
    except RequestError:
        sock.close()
        raise


class Broker:
    def __init__(self, path: str = protocol.DEFAULT_PATH, identities=None, view=None, *,
                 operators: bool = False):
        if identities is None:
            from ipsecchan.runtime import default_identities
            identities = default_identities()
        self.latcher = Latcher(identities, view)
        self.path, self.operators = path, operators
        self.clients: dict[int, Client] = {}         # by connection fileno
        self.owner: dict[int, Client] = {}           # latch id -> client
        self.sel = selectors.DefaultSelector()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._unlink_stale(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(path)
        os.chmod(path, 0o666)      # any user may ask; what it may ask about is its own
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, "listener")
        self.sel.register(self.latcher.view.monitor, selectors.EVENT_READ, "xfrm")
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stop = threading.Event()
        self._next_sweep = 0.0
        self.latcher.observers.append(self._on_alert)

    @staticmethod
    def _unlink_stale(path: str) -> None:
        if not os.path.exists(path):
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)              # nobody answers: a previous broker's leftover
            return
        finally:
            probe.close()
        raise OSError(errno.EADDRINUSE, f"a broker already serves {path}")

    # -- the loop --
    def serve_forever(self) -> None:
        while not self._stop.is_set():
            for key, _ in self.sel.select(0.2):
                what = key.data
                if what == "listener":
                    self._accept()
                elif what == "wake":
                    try:
                        os.read(self._wake_r, 64)
                    except BlockingIOError:
                        pass
                elif isinstance(what, Client):
                    self._read(what)
            # XFRM and IKE events (the IKE source queues them from its own thread).
            try:
                self.latcher.poll(0)
            except Exception:
                log.exception("event handling failed")
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + SWEEP_EVERY
                self._sweep()

    def stop(self) -> None:
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client, "broker stopping")
        self.sel.close()
        self.listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.latcher.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:       # EMFILE and the like: refuse, keep serving
                log.warning("accepting a client: %s", exc)
                return
            if len(self.clients) >= MAX_CLIENTS:
                conn.close()
                continue
            pid, uid, gid = struct.unpack("3i", conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                pidfd = None
            conn.setblocking(False)
            client = Client(conn, pid, uid, gid, pidfd)
            self.clients[conn.fileno()] = client
            self.sel.register(conn, selectors.EVENT_READ, client)

    def _read(self, client: Client) -> None:
        for _ in range(64):      # a few messages per turn: one client cannot starve others
            try:
                msg, fds = protocol.recv(client.conn)
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
            if len(fds) > 1:
                for fd in fds:
                    os.close(fd)
                self._reply(client, {"id": msg.get("id"), "ok": False, "errno": errno.EINVAL,
                                     "error": "one socket per request", "cause": None})
                continue
            try:
                reply = self._handle(client, msg, fds)
            except RequestError as exc:
                reply = {"ok": False, "error": str(exc), "errno": exc.code, "cause": exc.cause}
            except Exception as exc:         # a bug: answer, log, keep serving others
                log.exception("request from %s", client.label())
                reply = {"ok": False, "error": f"internal error: {exc}", "errno": None,
                         "cause": None}
            finally:
                for fd in fds:          # left over by a request that failed early
                    os.close(fd)
            reply["id"] = msg.get("id")
            self._reply(client, reply)
            if client.conn.fileno() not in self.clients:
                return

    # -- requests --
    def _handle(self, client: Client, msg: dict, fds: list[int]) -> dict:
        op = msg.get("op")
        takes_fd = op in ("latch", "listen", "accept", "abort")
        if takes_fd != bool(fds):
            for fd in fds:
                os.close(fd)
            del fds[:]
            raise RequestError(f"{op!r} takes {'one socket' if takes_fd else 'no socket'}",
                               errno.EINVAL)
        if op == "abort":
            # A connection whose latch was refused is about to be reset by its owner: clear
            # the block so that the reset reaches the peer (who would otherwise wait on a
            # half-dead connection). Only for a socket no latch of this broker holds.
            sock, ino = _check_socket(fds.pop(0), "any")
            with sock:
                if any(getattr(h.sock, "ino", None) == ino
                       for c in self.clients.values() for h in c.latches.values()):
                    raise RequestError("the socket is latched: release it", errno.EBUSY)
                clear_socket_policies(sock)
            return {"ok": True}
        if op == "release":
            handle = client.latches.get(msg.get("latch"))
            if handle is None:
                raise RequestError("no such latch", errno.ENOENT)
            self._release(client, handle)
            return {"ok": True}
        if op == "list":
            if not (self.operators or client.uid == 0):
                raise RequestError("listing latches is for operators", errno.EPERM)
            return {"ok": True, "latches": [
                {**protocol.latch_json(h), "owner": {"pid": c.pid, "uid": c.uid}}
                for c in self.clients.values() for h in c.latches.values()]}
        if op not in ("latch", "listen", "accept"):
            raise RequestError(f"unknown op {op!r}", errno.EINVAL)
        if len(client.latches) >= MAX_LATCHES_PER_CLIENT:
            raise RequestError("too many latches for one client", errno.EMFILE)
        fd = fds.pop(0)
        sock, ino = _check_socket(fd, "listen" if op == "listen" else "connected")
        client_fd = msg.get("fd")
        ref = ClientSocket(sock, client.pidfd, client_fd if isinstance(client_fd, int) else -1,
                           ino)
        try:
            self._check_client_fd(ref)
            handle = self._latch(client, op, msg, ref)
        except BaseException:
            ref.close()
            raise
        ref.let_go()
        client.latches[handle.id] = handle
        self.owner[handle.id] = client
        log.info("latch %d (%s) for %s: %s", handle.id, op, client.label(),
                 handle.latch.state.value)
        return {"ok": True, "latch": protocol.latch_json(handle)}

    @staticmethod
    def _check_client_fd(ref: ClientSocket) -> None:
        if ref.pidfd is None:
            return      # no pidfd (old kernel): the received descriptor is kept instead
        try:
            fd = pidfd_getfd(ref.pidfd, ref.client_fd)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOSYS):
                ref.pidfd = None        # not allowed here: keep the received descriptor
                return
            raise RequestError("'fd' does not name the passed socket", errno.EBADF) from None
        try:
            if os.fstat(fd).st_ino != ref.ino:
                raise RequestError("'fd' does not name the passed socket", errno.EBADF)
        finally:
            os.close(fd)

    def _latch(self, client: Client, op: str, msg: dict, ref: ClientSocket):
        try:
            if op == "accept":
                listener = client.latches.get(msg.get("listener"))
                if listener is None or listener.flow is not None:
                    raise RequestError("no such listener", errno.ENOENT)
                return self.latcher.accept(listener, ref)
            policy = {"require": Policy.REQUIRE, "optional": Policy.OPTIONAL}.get(
                msg.get("policy", "require"))
            peer_id = msg.get("peer_id")
            if policy is None or not (peer_id is None or isinstance(peer_id, str)):
                raise RequestError("bad policy or peer_id", errno.EINVAL)
            req = Requirements(policy, peer_id)
            if op == "listen":
                return self.latcher.listen(ref, req)
            try:
                return self.latcher.latch(ref, req)
            except LatchRefused as exc:
                apply(ref, Block(exc.cause))      # nothing of it may leave: the client cannot
                raise                             # set policies itself
        except LatchRefused as exc:
            raise RequestError(str(exc), errno.ECONNREFUSED, exc.cause.value) from None

    def _release(self, client: Client, handle) -> None:
        client.latches.pop(handle.id, None)
        self.owner.pop(handle.id, None)
        try:
            self.latcher.release(handle)
        except OSError as exc:
            log.warning("releasing latch %d of %s: %s", handle.id, client.label(), exc)
        if isinstance(handle.sock, ClientSocket):
            handle.sock.close()

    # -- events --
    def _on_alert(self, handle, alert) -> None:
        client = self.owner.get(handle.id)
        if client is None:
            return
        self._reply(client, {"event": "alert", "latch": protocol.latch_json(handle),
                             "old": alert.old.value, "new": alert.new.value,
                             "cause": alert.cause.value if alert.cause else None,
                             "detail": alert.detail, "rekeyed": alert.rekeyed})

    def _reply(self, client: Client, msg: dict) -> None:
        if client.conn.fileno() not in self.clients:
            return
        client.queued.append(msg)
        while client.queued:
            try:
                protocol.send(client.conn, client.queued[0])
            except (BlockingIOError, InterruptedError):
                if len(client.queued) > MAX_QUEUED:
                    self._drop(client, "not reading its messages")
                return
            except OSError as exc:
                self._drop(client, f"send: {exc}")
                return
            client.queued.pop(0)

    def _sweep(self) -> None:
        """Latches whose socket is gone (closed without a release) are released."""
        for client in list(self.clients.values()):
            for handle in list(client.latches.values()):
                if handle.sock.gone:
                    self._release(client, handle)

    def _drop(self, client: Client, why: str) -> None:
        if self.clients.pop(client.conn.fileno(), None) is None:
            return
        log.info("client %s gone (%s): releasing %d latches", client.label(), why,
                 len(client.latches))
        for handle in list(client.latches.values()):
            self._release(client, handle)
        try:
            self.sel.unregister(client.conn)
        except (KeyError, ValueError):
            pass
        client.conn.close()
        if client.pidfd is not None:
            os.close(client.pidfd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ipsecchan daemon", description=__doc__.split("\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--socket", default=os.environ.get("IPSECCHAN_BROKER",
                                                       protocol.DEFAULT_PATH))
    ap.add_argument("--operators", action="store_true",
                    help="let any local user list every latch (off: root only)")
    ap.add_argument("-v", "--verbose", action="store_true")


def run(opts: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if opts.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        broker = Broker(opts.socket, operators=opts.operators)
    except PermissionError as exc:
        print(f"ipsecchan daemon: needs CAP_NET_ADMIN: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"ipsecchan daemon: {exc}", file=sys.stderr)
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: broker.stop())
    print(f"listening on {opts.socket}", flush=True)
    try:
        broker.serve_forever()
    finally:
        broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A process's latches, published on a local status service for `ipsecchan ss` and `watch`.

Latches live in the processes that latch (an in-process Latcher). Each such process runs a
StatusServer: a Unix stream socket in the abstract namespace, `@ipsecchan/latches/<pid>` by
default (nothing on disk; one namespace per network namespace, so `ss` and `watch` see the
latches of their own network namespace, like the sockets they list). Clients find the servers
in /proc/net/unix (find_servers) and ask each (query_all).

Who may ask: root, and the user the server runs as (SO_PEERCRED). A latch names its peer's
identity and the connection's addresses; another user must not learn them. Anyone else gets
one error line and the connection is closed.

A client checks the server too: an abstract name is anyone's to bind, so the pid in the name
must be the pid SO_PEERCRED gives for the server, and `ss` shows a latch only on a socket
that pid holds.

Protocol: JSON lines, UTF-8, one request per line (at most 64 KiB), answers one per line.

    {"op": "list"}     -> {"pid": P, "time": T, "latches": [LATCH...]}
    {"op": "follow"}   -> the list line, then one ALERT line per latch alert, until the client
                          leaves; {"error": "overrun"} and the connection closed when the
                          client fell too far behind (the client must list again: states it
                          holds may be stale)
    anything else      -> {"error": "..."} (the connection stays open, except after an
                          oversized line)

LATCH (the latch of one socket of process P):

    id           the latch's handle id in P (unique within P's life)
    role         "connector" | "listener" | "accepted"
    listener     the listener latch's id, for an accepted connection; else null
    state        LISTENER | LATCHING | ESTABLISHED | BROKEN | CLOSED
    cause        why BROKEN (machine.Cause values: "no-sa", "peer-changed", ...), else null
    detail       the cause in words ("" when none; "resolved" after BROKEN -> ESTABLISHED)
    policy       "require" | "optional" (RFC 5660 3.1: cleartext allowed, knowingly)
    protected    whether the latch holds IPsec protection; null for a listener
    flow         {"proto": "tcp"|"udp", "family": 4|6, "local", "local_port", "peer",
                  "peer_port"}; null for a listener
    bound        a listener's {"proto", "family", "local", "local_port"} (getsockname), null
                 for connections and for a listener whose socket is closed
    inode        the socket's inode (as in ss and /proc/PID/fd), null if it could not be read
    local, peer  the latched IKE identities {"id", "auth", "pubkey_sha256"}, or null
    protection   one text per SA of the bundle, e.g. "esp transport rfc4106(gcm(aes))/256 icv128"
    out_spis, in_spis   the SAs the latch holds the connection to, "0x%08x" each
    reqids       the reqids of the bundle

ALERT: {"time", "pid", "id", "old", "new", "cause", "detail", "rekeyed", "latch": LATCH}; the
latch object as it is right after the alert (old -> new; old == new with rekeyed true for a
rekey that moved the latch to new SAs).
"""
from __future__ import annotations

import json
import os
import queue
import select
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass

from ipsecchan.latch.machine import Alert, LatchState

NAME_PREFIX = "ipsecchan/latches/"
MAX_LINE = 64 * 1024          # a request line longer than this is refused
QUEUE_LIMIT = 1024            # alerts waiting for one follower before it is dropped
SEND_TIMEOUT = 10.0           # a follower that takes no data this long is dropped
IDLE_TIMEOUT = 30.0           # a client that sends no request this long is closed
MAX_CLIENTS = 64
CLIENT_TIMEOUT = 10.0         # a client's wait for an answer (the server may wait on the
#                               Latcher's lock while a latch is being made: up to ~5 s)
MAX_REPLY = 64 << 20
_ACCEPTCON = 0x10000          # __SO_ACCEPTCON in /proc/net/unix flags: a listening socket
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

_OVERRUN = object()
_CLOSE = object()


def default_name(pid: int | None = None) -> str:
    return "\0" + NAME_PREFIX + str(os.getpid() if pid is None else pid)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel recorded it."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


# ---- latches as JSON ----

def _party(p) -> dict | None:
    return None if p is None else {"id": p.id, "auth": p.auth, "pubkey_sha256": p.pubkey_sha256}


def _proto_name(sock_type: int) -> str:
    return {socket.SOCK_STREAM: "tcp", socket.SOCK_DGRAM: "udp"}.get(sock_type & 0xF, "?")


def _family(af: int) -> int:
    return 6 if af == socket.AF_INET6 else 4


def socket_inode(sock) -> int | None:
    """The inode of the socket behind sock's descriptor, or None (closed, not a socket)."""
    try:
        fd = sock.fileno()
        if fd < 0:
            return None
        st = os.fstat(fd)
    except (OSError, ValueError):
        return None
    return st.st_ino if stat.S_ISSOCK(st.st_mode) else None


def _bound(sock) -> dict | None:
    try:
        if sock.fileno() < 0:
            return None
        addr = sock.getsockname()
    except (OSError, ValueError):
        return None
    return {"proto": _proto_name(sock.type), "family": _family(sock.family), "local": addr[0],
            "local_port": addr[1]}


def latch_dict(handle, inode: int | None) -> dict:
    """The LATCH object of a LatchHandle (call with the Latcher's lock held: the latch's
    fields change together under it)."""
    latch, flow = handle.latch, handle.flow
    params = latch.params
    if flow is None:
        role = "listener"
    else:
        role = "connector" if handle.listener is None else "accepted"
    out_sas, in_sas = (params.out_sas, params.in_sas) if params is not None else ((), ())
    return {
        "id": handle.id, "role": role, "listener": handle.listener,
        "state": latch.state.value, "cause": latch.cause.value if latch.cause else None,
        "detail": latch.detail, "policy": latch.requirements.policy.value,
        "protected": None if role == "listener" or params is None else params.protected,
        "flow": None if flow is None else {
            "proto": {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}.get(
                flow.proto, str(flow.proto)),
            "family": _family(flow.family), "local": flow.local, "local_port": flow.local_port,
            "peer": flow.remote, "peer_port": flow.remote_port},
        "bound": _bound(handle.sock) if flow is None else None,
        "inode": inode,
        "local": _party(params.local) if params else None,
        "peer": _party(params.peer) if params else None,
        "protection": [p.describe() for p in params.protection] if params else [],
        "out_spis": [f"0x{s.key[3]:08x}" for s in out_sas],
        "in_spis": [f"0x{s.key[3]:08x}" for s in in_sas],
        "reqids": list(params.reqids) if params else [],
    }


# ---- the server ----

class _Follower:
    __slots__ = ("q", "dropped")

    def __init__(self):
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.dropped = False


class _TooLong(Exception):
    pass


class _Lines:
    """Lines from a stream socket, each at most `limit` bytes."""

    def __init__(self, sock: socket.socket, limit: int):
        self.sock, self.limit, self.buf = sock, limit, b""

    def readline(self) -> bytes | None:
        """The next line (without its newline), or None at EOF."""
        while b"\n" not in self.buf:
            if len(self.buf) > self.limit:
                raise _TooLong
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        if len(line) > self.limit:
            raise _TooLong
        return line


class StatusServer:
    """Publishes a Latcher's latches; see the module's docstring for the protocol.

    start() binds and serves from a daemon thread; close() stops it, closes every client and
    leaves the Latcher as it was. Alerts reach followers through latcher.observers, which the
    Latcher calls under its lock: the observer only queues (bounded per follower)."""

    def __init__(self, latcher, path: str | None = None, *, queue_limit: int = QUEUE_LIMIT,
                 max_clients: int = MAX_CLIENTS):
        self.latcher = latcher
        self.path = default_name() if path is None else path
        self.queue_limit = queue_limit
        self.max_clients = max_clients
        self._lock = threading.Lock()            # our sets and the inode cache
        self._followers: set[_Follower] = set()
        self._clients: dict[socket.socket, threading.Thread] = {}
        # Inodes by handle id, read when a latch is first seen: a released socket may be
        # closed (and its descriptor reused) before a client asks.
        self._inodes: dict[int, int | None] = {}
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._closing = False

    def start(self) -> "StatusServer":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        with self.latcher.lock:
            self.latcher.observers.append(self._observe)
            handles = self.latcher.latches()
        for h in handles:           # latches made before us: their sockets, while open
            self._inode(h)
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name="ipsecchan-status")
        self._thread.start()
        return self

    def close(self) -> None:
        if self._sock is None or self._closing:
            return
        self._closing = True
        with self.latcher.lock:
            if self._observe in self.latcher.observers:
                self.latcher.observers.remove(self._observe)
        os.write(self._wake_w, b"x")
        self._thread.join(5)
        self._sock.close()
        with self._lock:
            clients = dict(self._clients)
            for f in self._followers:
                f.q.put(_CLOSE)
            self._followers.clear()
        for conn in clients:
            try:
                conn.shutdown(socket.SHUT_RDWR)     # wakes a thread blocked on it
            except OSError:
                pass
        for t in clients.values():
            t.join(5)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> "StatusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- state --
    def _inode(self, handle) -> int | None:
        with self._lock:
            if handle.id in self._inodes:
                return self._inodes[handle.id]
        ino = socket_inode(handle.sock)
        with self._lock:
            return self._inodes.setdefault(handle.id, ino)

    def listing(self) -> dict:
        """The answer to "list": every live latch, each read under the Latcher's lock (one at
        a time: a long listing does not hold up latching)."""
        handles = self.latcher.latches()
        latches = []
        for h in handles:
            ino = self._inode(h)
            with self.latcher.lock:
                latches.append(latch_dict(h, ino))
        if handles:
            # Handle ids only grow: an id below the newest listed that is not listed was
            # released (its CLOSED alert normally forgets it already).
            live, top = {h.id for h in handles}, max(h.id for h in handles)
            with self._lock:
                for hid in [k for k in self._inodes if k < top and k not in live]:
                    del self._inodes[hid]
        return {"pid": os.getpid(), "time": time.time(), "latches": latches}

    def _observe(self, handle, alert: Alert) -> None:
        # Called by the Latcher under its lock, from the application's threads: never block,
        # never raise into the application.
        try:
            ino = self._inode(handle)
            with self._lock:
                followers = list(self._followers)
            if followers:
                line = {"time": time.time(), "pid": os.getpid(), "id": handle.id,
                        "old": alert.old.value, "new": alert.new.value,
                        "cause": alert.cause.value if alert.cause else None,
                        "detail": alert.detail, "rekeyed": alert.rekeyed,
                        "latch": latch_dict(handle, ino)}
                for f in followers:
                    self._queue(f, line)
            if alert.new is LatchState.CLOSED:
                with self._lock:
                    self._inodes.pop(handle.id, None)
        except Exception:
            # A follower must not be left believing a state we failed to tell it about.
            with self._lock:
                followers, self._followers = self._followers, set()
            for f in followers:
                f.dropped = True
                f.q.put(_OVERRUN)

    def _queue(self, f: _Follower, line: dict) -> None:
        if f.dropped:
            return
        if f.q.qsize() >= self.queue_limit:
            f.dropped = True
            with self._lock:
                self._followers.discard(f)
            f.q.put(_OVERRUN)       # the queue itself is unbounded: the marker always fits
        else:
            f.q.put(line)

    # -- serving --
    def _accept_loop(self) -> None:
        # poll, not select: a process with many sockets has descriptors past FD_SETSIZE.
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._closing:
            try:
                ready = {fd for fd, _ev in poller.poll()}
            except OSError:
                return
            if self._wake_r in ready or self._closing:
                return
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            try:
                self._admit(conn)
            except Exception:       # one client's trouble never stops the service
                conn.close()

    def _admit(self, conn: socket.socket) -> None:
        _pid, uid, _gid = peer_credentials(conn)
        me = os.geteuid()
        refusal = None
        if uid not in (0, me):
            refusal = f"not permitted: uid {uid} is neither root nor this process's user ({me})"
        else:
            with self._lock:
                if len(self._clients) >= self.max_clients:
                    refusal = f"busy: {self.max_clients} clients already"
        if refusal is not None:
            # A fresh socket's buffer takes one short line without blocking.
            conn.setblocking(False)
            try:
                conn.send(_encode({"error": refusal}))
            except OSError:
                pass
            conn.close()
            return
        t = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="ipsecchan-status-client")
        with self._lock:
            self._clients[conn] = t
        t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(IDLE_TIMEOUT)
            lines = _Lines(conn, MAX_LINE)
            while not self._closing:
                try:
                    line = lines.readline()
                except _TooLong:
                    conn.settimeout(SEND_TIMEOUT)
                    conn.sendall(_encode({"error": f"request longer than {MAX_LINE} bytes"}))
                    return
                if line is None:
                    return
                if not line.strip():
                    continue
                try:
                    req = json.loads(line)
                except (ValueError, RecursionError):   # UnicodeDecodeError is a ValueError
                    conn.sendall(_encode({"error": "not a JSON request"}))
                    continue
                op = req.get("op") if isinstance(req, dict) else None
                if op == "list":
                    conn.sendall(_encode(self.listing()))
                elif op == "follow":
                    self._follow(conn)
                    return
                else:
                    conn.sendall(_encode({"error": f"unknown op {op!r}: list or follow"}))
        except OSError:             # timeouts included: the client is gone or stuck
            pass
        except Exception as exc:    # a bug: say so to the client, keep serving the others
            try:
                conn.sendall(_encode({"error": f"internal error: {exc!r}"}))
            except OSError:
                pass
        finally:
            with self._lock:
                self._clients.pop(conn, None)
            conn.close()

    def _follow(self, conn: socket.socket) -> None:
        f = _Follower()
        # Registered before the listing is read: an alert in between is sent after the
        # listing that already shows its result (told twice, never missed).
        with self._lock:
            self._followers.add(f)
        try:
            conn.settimeout(SEND_TIMEOUT)
            conn.sendall(_encode(self.listing()))
            while not self._closing:
                try:
                    item = f.q.get(timeout=0.5)
                except queue.Empty:
                    if _client_left(conn):
                        return
                    continue
                if item is _CLOSE:
                    return
                if item is _OVERRUN:
                    conn.sendall(_encode({"error": "overrun"}))
                    return
                conn.sendall(_encode(item))
        finally:
            with self._lock:
                self._followers.discard(f)


def _client_left(conn: socket.socket) -> bool:
    """True when a following client closed its end (anything it sends is ignored)."""
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    for _ in range(16):
        # Poll first: recv on a socket with a timeout waits for data before it tries.
        if not poller.poll(0):
            return False
        if not conn.recv(65536):
            return True
    return False


def _encode(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


# ---- clients ----

@dataclass(frozen=True)
class Server:
    name: str              # the abstract name, without its leading NUL
    pid: int | None        # the pid the name claims


@dataclass
class Reply:
    """One server's answer: `reply` (the decoded line), or `error` saying why there is
    none. pid/uid: the server process as SO_PEERCRED gives it (None if never connected)."""
    server: Server
    reply: dict | None = None
    error: str | None = None
    pid: int | None = None
    uid: int | None = None


class StatusError(OSError):
    pass


def find_servers(proc_net_unix: str = "/proc/net/unix") -> list[Server]:
    """Listening status servers of this network namespace (abstract names are per network
    namespace, and /proc/net/unix shows those of the reader's)."""
    out = {}
    with open(proc_net_unix) as f:
        next(f, None)
        for line in f:
            parts = line.split()
            if len(parts) < 8 or not parts[7].startswith("@" + NAME_PREFIX):
                continue
            try:
                listening = int(parts[3], 16) & _ACCEPTCON
            except ValueError:
                continue
            if listening:
                name = parts[7][1:]
                tail = name[len(NAME_PREFIX):]
                out[name] = Server(name, int(tail) if tail.isdigit() else None)
    return sorted(out.values(), key=lambda s: (s.pid is None, s.pid or 0, s.name))


class Connection:
    """A client's connection to one server (verified: the name's pid is the server's)."""

    def __init__(self, server: Server, timeout: float = CLIENT_TIMEOUT):
        self.server = server
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.buf = b""
        try:
            self.sock.settimeout(timeout)
            self.sock.connect("\0" + server.name)
            self.pid, self.uid, _gid = peer_credentials(self.sock)
            if server.pid is not None and self.pid != server.pid:
                raise StatusError(f"@{server.name} is held by pid {self.pid} (uid {self.uid}),"
                                  f" not pid {server.pid}: not trusted")
        except BaseException:
            self.sock.close()
            raise

    def send(self, request: dict) -> None:
        # A server that refuses us has sent its reason and closed: a failed send still
        # leaves that line to read.
        try:
            self.sock.sendall(_encode(request))
        except OSError:
            pass

    def lines(self) -> list[dict]:
        """Read what is available (non-blocking sockets) or wait for at least one line."""
        out = []
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                out.append(_decode(line))
            if out:
                return out
            if len(self.buf) > MAX_REPLY:
                raise StatusError(f"@{self.server.name}: a line longer than {MAX_REPLY} bytes")
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                return out
            except ConnectionResetError:
                data = b""
            if not data:
                raise EOFError(f"@{self.server.name} closed the connection")
            self.buf += data

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


def _decode(line: bytes) -> dict:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        raise StatusError(f"not a JSON line: {line[:80]!r}") from None
    if not isinstance(obj, dict):
        raise StatusError(f"not a JSON object: {line[:80]!r}")
    return obj


def query(server: Server, op: str = "list", timeout: float = CLIENT_TIMEOUT) -> Reply:
    """Ask one server; any failure is in Reply.error, never an exception."""
    reply = Reply(server)
    try:
        conn = Connection(server, timeout)
    except OSError as exc:
        reply.error = error_text(exc)
        return reply
    reply.pid, reply.uid = conn.pid, conn.uid
    try:
        conn.send({"op": op})
        first = conn.lines()[0]
        if "error" in first:
            reply.error = f"refused: {first['error']}"
        else:
            reply.reply = first
    except (OSError, EOFError) as exc:
        reply.error = error_text(exc)
    finally:
        conn.close()
    return reply


def query_all(op: str = "list", timeout: float = CLIENT_TIMEOUT) -> list[Reply]:
    """Every server's answer to `op` (a server that fails is in the list, with its error)."""
    return [query(s, op, timeout) for s in find_servers()]


def error_text(exc: BaseException) -> str:
    """An exception in words, without errno's number."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__

"""The client side of the broker: latching through `ipsecchan daemon`, for processes without
CAP_NET_ADMIN. Same interface as the in-process runtime (latch, listen, accept, release), so
ipsecchan.socket behaves the same either way.

A reader thread takes the broker's replies and pushed alerts. If the broker goes away, every
latch is reported BROKEN (not-verified) at once — never kept as if nothing happened — and the
client reconnects in the background; on reconnecting it latches its live sockets again, each
coming back ESTABLISHED only if the broker confirms the same peer and protection.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import struct
import threading
import time
import weakref

from ipsecchan.broker import protocol
from ipsecchan.latch.machine import (Alert, Cause, LatchParams, LatchRefused, LatchState,
                                     Requirements)

log = logging.getLogger("ipsecchan")
REQUEST_TIMEOUT = 30.0
RECONNECT_EVERY = 0.5


class BrokerUnavailable(ConnectionError):
    pass


class RemoteLatch:
    """The broker's latch, as the client last heard of it (machine.Latch's read side)."""
    __slots__ = ("state", "cause", "detail", "params", "history")

    def __init__(self):
        self.state = LatchState.LATCHING
        self.cause: Cause | None = None
        self.detail = ""
        self.params: LatchParams | None = None
        self.history: list = []

    def update(self, d: dict) -> None:
        self.state = LatchState(d["state"])
        self.cause = Cause(d["cause"]) if d.get("cause") else None
        self.detail = d.get("detail") or ""
        if d.get("params") is not None or self.params is None:
            self.params = protocol.params_of(d.get("params"))


class RemoteHandle:
    __slots__ = ("id", "remote_id", "sock", "flow", "latch", "on_alert", "listener", "op",
                 "requirements", "__weakref__")

    def __init__(self, sock, op: str, requirements: Requirements, on_alert, listener=None):
        self.id = None
        self.remote_id = None
        self.sock = sock
        self.flow = None
        self.latch = RemoteLatch()
        self.on_alert = on_alert
        self.listener = listener
        self.op, self.requirements = op, requirements

    @property
    def state(self) -> LatchState:
        return self.latch.state


def _current(sock) -> tuple[socket.socket | None, bool]:
    """(the latched socket as a socket object, whether that is a temporary copy to close), or
    (None, False) when it is closed."""
    if isinstance(sock, socket.socket):
        return (sock, False) if sock.fileno() >= 0 else (None, False)
    current = getattr(sock, "current", None)        # ipsecchan.runtime.LatchedFd
    return current() if current is not None else (None, False)


def _lingers(sock: socket.socket) -> bool:
    """Whether closing the TCP socket waits for its unsent data (SO_LINGER)."""
    if sock.type & 0xF != socket.SOCK_STREAM:
        return False
    try:
        return struct.unpack("ii", sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                   8))[0] != 0
    except OSError:
        return True         # cannot tell: as if it did (the release is waited for)


def _request(req: Requirements) -> dict:
    return {"policy": req.policy.value, "peer_id": req.peer_id}


class BrokerClient:
    def __init__(self, path: str):
        self.path = path
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        # Request ids someone waits for, each with a lock held until its reply is in
        # _replies (or the session ends). Both dicts are used without self._lock (a single
        # dict operation is atomic): in CPython every acquisition of a lock, even a free
        # one, reads the clock, a system call under user-mode-linux. Locks that did their
        # job come back to _spare, still held: ready for the next request.
        self._replies: dict[int, dict] = {}
        self._waiting: dict[int, threading.Lock] = {}
        self._spare: list[threading.Lock] = []
        self._handles: dict[int, RemoteHandle] = {}          # by the broker's latch id
        self._all: "weakref.WeakSet[RemoteHandle]" = weakref.WeakSet()
        self._conn: socket.socket | None = None
        self._closed = False
        self._connect()
        self._thread = threading.Thread(target=self._run, name="ipsecchan-broker",
                                        daemon=True)
        self._thread.start()

    def _connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.connect(self.path)
        except OSError as exc:
            s.close()
            raise BrokerUnavailable(exc.errno, f"ipsecchan broker at {self.path}: "
                                               f"{exc.strerror}") from None
        self._conn = s

    # -- requests --
    def _call(self, msg: dict, fd: int | None = None, wait: bool = True) -> dict | None:
        rid = next(self._ids)
        msg["id"] = rid
        conn = self._conn
        if conn is None:
            raise BrokerUnavailable(errno.ECONNREFUSED, "the ipsecchan broker is gone")
        done = None
        if wait:
            try:
                done = self._spare.pop()
            except IndexError:
                done = threading.Lock()
                done.acquire()
            self._waiting[rid] = done
            if self._conn is not conn:
                # Lost meanwhile: _lost() may have woken the waiters before this one was in.
                self._waiting.pop(rid, None)
                raise BrokerUnavailable(errno.ECONNRESET, "the ipsecchan broker went away")
        try:
            protocol.send(conn, msg, fd)
            if not wait:
                return None
            if not done.acquire(timeout=REQUEST_TIMEOUT):
                if self._waiting.pop(rid, None) is not None:
                    done = None
                    raise BrokerUnavailable(errno.ETIMEDOUT, "the ipsecchan broker is not "
                                                             "answering")
                done.acquire()      # answered just now: released at once
            reply = self._replies.pop(rid, None)
            if reply is None:
                raise BrokerUnavailable(errno.ECONNRESET, "the ipsecchan broker went away")
            self._spare.append(done)
            return reply
        finally:
            if wait:
                self._waiting.pop(rid, None)
                self._replies.pop(rid, None)

    def _latch_request(self, handle: RemoteHandle, fd: int, extra: dict) -> RemoteHandle:
        reply = self._call({"op": handle.op, "fd": fd, **extra}, fd)
        if not reply.get("ok"):
            cause = reply.get("cause")
            if cause:
                raise LatchRefused(Cause(cause), reply.get("detail", reply.get("error", "")))
            code = reply.get("errno")
            raise OSError(code or errno.EIO, f"ipsecchan broker: {reply.get('error')}")
        d = reply["latch"]
        with self._lock:
            handle.remote_id = d["id"]
            handle.id = handle.id or d["id"]
            handle.flow = protocol.flow_of(d.get("flow"))
            handle.latch.update(d)
            self._handles[d["id"]] = handle
            self._all.add(handle)
        return handle

    def latch(self, sock, requirements: Requirements = Requirements(), on_alert=None,
              expect=None):
        """`expect`: as Runtime.latch (the broker checks it, and blocks on a mismatch)."""
        h = RemoteHandle(sock, "latch", requirements, on_alert)
        extra = _request(requirements)
        if expect is not None:
            extra["expect"] = protocol.params_json(expect)
        return self._latch_request(h, sock.fileno(), extra)

    def listen(self, sock, requirements: Requirements = Requirements(), on_alert=None):
        h = RemoteHandle(sock, "listen", requirements, on_alert)
        return self._latch_request(h, sock.fileno(), _request(requirements))

    def accept(self, listener: RemoteHandle, sock, on_alert=None):
        if listener not in self._all:
            # Another session's listener (inherited across a fork): its id is not this
            # session's. The connection latches on its own, to the listener's requirements.
            h = RemoteHandle(sock, "latch", listener.requirements, on_alert)
            return self._latch_request(h, sock.fileno(), _request(listener.requirements))
        h = RemoteHandle(sock, "accept", listener.requirements, on_alert, listener)
        return self._latch_request(h, sock.fileno(), {"listener": listener.remote_id})

    def is_latched(self, sock) -> bool:
        """Whether a latch of this client holds the socket (the broker allows one per
        socket; asking it would latch)."""
        ino = os.fstat(sock.fileno()).st_ino
        return any(h.latch.state is not LatchState.CLOSED and h.sock.inode() == ino
                   for h in list(self._all))

    def abort(self, sock) -> None:
        """Clear the block on a socket whose latch was refused (it is about to be reset)."""
        reply = self._call({"op": "abort"}, sock.fileno())
        if not reply.get("ok"):
            raise OSError(reply.get("errno") or errno.EIO, f"ipsecchan broker: "
                                                           f"{reply.get('error')}")

    def forget(self, handle: RemoteHandle) -> None:
        """Let go of a latch here without a word to the broker, which keeps its pins on the
        socket (another process holds it too); the broker drops the latch once this
        process's descriptor is gone."""
        with self._lock:
            if handle not in self._all:
                return              # not this session's (another process's, before a fork)
            if self._handles.get(handle.remote_id) is handle:
                del self._handles[handle.remote_id]
            self._all.discard(handle)
        handle.latch.state = LatchState.CLOSED

    def release(self, handle: RemoteHandle, wait: bool = False) -> None:
        """Release the latch. wait=True: return once the broker has cleared the socket's
        policies (the socket is about to be used unlatched, not closed)."""
        with self._lock:
            self._handles.pop(handle.remote_id, None)
            self._all.discard(handle)
        old = handle.latch.state
        handle.latch.state = LatchState.CLOSED
        if handle.remote_id is not None:
            msg = {"op": "release", "latch": handle.remote_id}
            on_reader = threading.current_thread() is self._thread
            try:
                sock, tmp = _current(handle.sock)
                try:
                    if sock is not None and not wait and not _lingers(sock):
                        # The policies must be gone before the socket's last descriptor
                        # closes (a closing TCP socket lives on, with them). The socket goes
                        # with the request: the copy in flight, then the broker's, keeps it
                        # open until the broker has cleared them, and only then is let go.
                        # So this process may close its own at once: nothing to wait for.
                        msg["quiet"] = True
                        self._call(msg, sock.fileno(), wait=False)
                    else:
                        # Closed already, or its close must linger here (SO_LINGER): waited
                        # for, so that the policies are gone before it closes; but not on
                        # the reader's own thread (a socket collected there), which must not
                        # wait for itself.
                        self._call(msg, wait=not on_reader)
                finally:
                    if tmp:
                        sock.close()
            except (BrokerUnavailable, OSError):
                pass        # the broker released it when this client's session ended
        if old is not LatchState.CLOSED and handle.on_alert is not None:
            handle.on_alert(handle, Alert(old, LatchState.CLOSED))

    def close(self) -> None:
        """Release every latch, as Latcher.close() does (the sockets live on, unlatched), and
        end the session."""
        if self._closed:
            return
        for h in list(self._all):
            try:
                self.release(h)
            except Exception as exc:        # (one failure must not keep the others latched)
                log.warning("releasing latch %s on close: %s", h.remote_id, exc)
        self._closed = True
        with self._lock:
            if self._conn is not None:
                # Closing alone would not wake the reader's recvmsg (nor end the session: the
                # blocked call holds the socket); shutting it down does, and the reader closes
                # it. The releases sent before are read by the broker first.
                try:
                    self._conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._wake_all()

    def _wake_all(self) -> None:
        """Every waiting request ends without a reply (called once self._conn is None)."""
        waiting = self._waiting
        for rid in list(waiting):
            done = waiting.pop(rid, None)       # (or popped by the reader: released there)
            if done is not None:
                done.release()

    # -- the reader --
    def _run(self) -> None:
        try:
            self._read_all()
        finally:
            with self._lock:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                self._wake_all()

    def _read_all(self) -> None:
        while not self._closed:
            conn = self._conn
            if conn is None:
                self._reconnect()
                continue
            try:
                msg, fds = protocol.recv(conn)
            except protocol.ProtocolError as exc:
                log.warning("bad message from the broker: %s", exc)
                continue
            except OSError:
                msg, fds = None, []
            for fd in fds:
                os.close(fd)
            if msg is None:
                if self._closed:
                    break
                self._lost()
                continue
            if "event" in msg:
                self._event(msg)
            else:
                rid = msg.get("id")
                done = self._waiting.pop(rid, None) if type(rid) is int else None
                if done is not None:
                    self._replies[rid] = msg        # (before the waiter wakes)
                    done.release()
                elif msg.get("ok") is False:
                    # A request nobody waits for failed (a release sent with its socket): the
                    # broker's sweep drops that latch once the socket is closed.
                    log.warning("the ipsecchan broker refused request %s: %s", rid,
                                msg.get("error"))

    def _event(self, msg: dict) -> None:
        d = msg["latch"]
        with self._lock:
            handle = self._handles.get(d["id"])
        if handle is None:
            return
        handle.latch.update(d)
        alert = Alert(LatchState(msg["old"]), LatchState(msg["new"]),
                      Cause(msg["cause"]) if msg.get("cause") else None,
                      msg.get("detail") or "", bool(msg.get("rekeyed")))
        handle.latch.history.append((alert.old, alert.new, alert.cause))
        if handle.on_alert is not None:
            handle.on_alert(handle, alert)

    def _lost(self) -> None:
        """The broker is gone: nothing it said can be relied on any more (fail closed)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            self._handles.clear()
            handles = list(self._all)
            self._wake_all()
        log.warning("the ipsecchan broker went away: %d latches not verified", len(handles))
        for h in handles:
            self._set(h, LatchState.BROKEN, Cause.NOT_VERIFIED, "the broker went away")

    @staticmethod
    def _set(h: RemoteHandle, state: LatchState, cause, detail: str) -> None:
        old = h.latch.state
        if old in (LatchState.CLOSED, LatchState.LISTENER) and state is LatchState.BROKEN:
            return
        h.latch.state, h.latch.cause, h.latch.detail = state, cause, detail
        if old is not state and h.on_alert is not None:
            h.on_alert(h, Alert(old, state, cause, detail))

    def _reconnect(self) -> None:
        time.sleep(RECONNECT_EVERY)
        try:
            self._connect()
        except BrokerUnavailable:
            return
        # Latch every live socket again, from the reader's side of a fresh session: replies
        # arrive through a short-lived helper thread reading meanwhile.
        threading.Thread(target=self._relatch, name="ipsecchan-relatch", daemon=True).start()

    def _relatch(self) -> None:
        for h in list(self._all):
            if h.latch.state is LatchState.CLOSED:
                continue
            fd = h.sock.fileno() if h.sock is not None else -1
            if fd < 0:
                continue
            if h.op == "accept":
                h.op = "latch"      # its listener's id died with the old session
            try:
                old = h.latch.state
                # The new latch must carry what the old one did (same peer, key and no
                # weaker protection): the broker refuses, and blocks, anything else.
                self._latch_request(h, fd, {**_request(h.requirements),
                                            "expect": protocol.params_json(h.latch.params)})
                if old is not h.latch.state and h.on_alert is not None:
                    h.on_alert(h, Alert(old, h.latch.state, None, "broker back"))
            except LatchRefused as exc:
                self._set(h, LatchState.BROKEN, exc.cause, str(exc))
            except OSError as exc:
                log.warning("latching again after the broker came back: %s", exc)


class OperatorFeed:
    """An operator's view of every latch the broker holds (root, or a member of one of its
    --operators groups): `ipsecchan ss` lists them, `ipsecchan watch` follows them. Latches
    and alerts come in the status services' formats (ipsecchan.latch.status), each latch
    with "owner": {"pid", "uid"}."""

    def __init__(self, path: str, timeout: float = 5.0):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.pid = struct.unpack("3i", self.sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
        self._ids = itertools.count(1)
        self.events: list[dict] = []        # alerts read while waiting for a reply

    def request(self, msg: dict) -> dict:
        rid = next(self._ids)
        protocol.send(self.sock, {**msg, "id": rid})
        while True:
            reply, fds = protocol.recv(self.sock)
            for fd in fds:
                os.close(fd)
            if reply is None:
                raise ConnectionError(errno.ECONNRESET, "the broker closed the connection")
            if reply.get("event") == "alert":
                self.events.append(reply)
            elif reply.get("id") == rid:
                if not reply.get("ok"):
                    code = reply.get("errno") or errno.EIO
                    raise OSError(code, f"broker: {reply.get('error')}")
                return reply

    def list_all(self) -> list[dict]:
        out, after = [], None
        while True:
            r = self.request({"op": "list", "after": after})
            out += r["latches"]
            if r.get("next") is None:
                return out
            after = r["next"]

    def lookup(self, flows, ike: bool = True) -> list[dict]:
        """What the broker's kernel view and IKE daemon say of each flow (ipsecchan.xfrm
        Flow), in `ipsecchan ss`'s "ipsec" format: for operators without CAP_NET_ADMIN."""
        wire = [[f.family, f.proto, f.local, f.local_port, f.remote, f.remote_port, f.mark,
                 f.ifindex] for f in flows]
        out: list[dict] = []
        while len(out) < len(wire):
            got = self.request({"op": "lookup", "ike": ike,
                                "flows": wire[len(out):len(out) + 64]})["ipsec"]
            if not got:
                raise OSError(errno.EIO, "broker: lookup answered nothing")
            out += got
        return out

    def follow(self) -> list[dict]:
        """Start following; returns the latches as they are now (listed after subscribing,
        so that no alert falls between the two)."""
        self.request({"op": "follow"})
        return self.list_all()

    def read_events(self) -> list[dict]:
        """Alerts available now (non-blocking); raises EOFError when the broker is gone."""
        out, self.events = self.events, []
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    msg, fds = protocol.recv(self.sock)
                except (BlockingIOError, InterruptedError):
                    return out
                for fd in fds:
                    os.close(fd)
                if msg is None:
                    if out:
                        return out
                    raise EOFError("the broker is gone")
                if msg.get("event") == "alert":
                    out.append(msg)
        finally:
            self.sock.setblocking(True)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


def broker_path() -> str:
    return os.environ.get("IPSECCHAN_BROKER", protocol.DEFAULT_PATH)

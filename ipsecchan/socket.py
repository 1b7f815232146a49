"""A drop-in `socket` module whose connections are IPsec channels (RFC 5660 latching).

    from ipsecchan import socket           # instead of: import socket

Everything of the standard library's socket module is here unchanged, except the `socket`
class (and the functions that make sockets: create_connection, create_server, fromfd,
socketpair), which latch: connect() and connect_ex() latch the connection to the IPsec SAs
that carry it, listen() makes a LISTENER latch (whose kernel pin guards even the first SYN)
and accept() returns latched connections. Non-IP sockets, loopback peers and sockets with
policy IPSEC_POLICY_BYPASS are left alone.

    s = socket.create_connection(("10.0.0.2", 5000))
    s.getpeerid()                                   # 'CN=bob'
    s.getsockopt(socket.SOL_IPSEC, socket.IPSEC_PEER_ID, 256)        # b'CN=bob'
    s.get_channel_binding("ipsec-endpoint")         # RFC 5056 bindings (ipsecchan.channel)
    s.latch.state, s.latch.protection               # 'ESTABLISHED', (Protection(...),)

A connection that cannot be latched (no IPsec under the default policy, an unverifiable
peer, not the peer IPSEC_REQUIRE_PEER_ID names) fails in connect() with LatchRefused, before
any application byte is sent; the connection is blocked in the kernel and should be closed.
Closing resets it: nothing written after the refusal ever leaves (the reset itself goes out
only when nothing is queued; otherwise the peer's next packet is answered with one).
An accepted connection that cannot be latched is closed and never returned by accept().
A connected UDP socket connected again is another connection: its old latch goes first.
After a fork, a socket latched before it is shared: closing it in either process lets go of
the latch there without clearing the pins the other process relies on; the child adopts an
inherited latch (latches the connection itself, to the same peer) when it first reads it.
sendto()/sendmsg() with MSG_FASTOPEN on a new TCP socket connect (and latch) first, then
send: data in the SYN would leave before the latch.
A latched, latching or refused socket's per-socket XFRM policies (IP_XFRM_POLICY,
IPV6_XFRM_POLICY) are its latch's pin or block: setting them raises EBUSY.

When a latch breaks (another peer behind the address, weaker protection, cleartext, the IKE
daemon gone), the kernel blocks the connection's packets, registered callbacks are called,
and the next send or receive raises LatchBrokenError; when the latch is restored, traffic and
calls work again. Healthy sockets pay nothing per call: the raising methods are put on the
socket object only while it is broken. (A call already blocked in recv() stays blocked: no
packet of the connection arrives while it is broken.)

The default policy is IPSEC_POLICY_REQUIRE; setdefaultpolicy() or the environment variable
IPSECCHAN_POLICY (require, optional, bypass) change it. install() makes the standard
library's socket module hand out these sockets, for code that cannot change its import
(socketserver, http.server, asyncio).
"""
from __future__ import annotations

import array as _array
import errno as _errno
import ipaddress as _ipaddress
import logging as _logging
import os as _os
import weakref as _weakref
import socket as _std
import _socket as _csocket
from socket import *  # noqa: F401,F403  (the drop-in: every name of the stdlib module)
from socket import (AF_INET, AF_INET6, IPPROTO_IPV6, IPV6_V6ONLY, SO_ACCEPTCONN, SO_LINGER,
                    SO_REUSEADDR, SOCK_DGRAM, SOCK_STREAM, SOL_SOCKET, error, getaddrinfo,
                    getdefaulttimeout, has_dualstack_ipv6, has_ipv6)

from ipsecchan import runtime as _runtime
from ipsecchan import sockopt as _opt
from ipsecchan.channel import CB_ENDPOINT, CHANNEL_BINDING_TYPES, endpoint_binding
from ipsecchan.latch.enforce import unsent as _unsent
from ipsecchan.latch.machine import LatchRefused, LatchState, Policy, Requirements
from ipsecchan.sockopt import (IPSEC_CHANNEL_BINDING, IPSEC_LATCH_BROKEN, IPSEC_LATCH_CAUSE,
                               IPSEC_LATCH_CLOSED, IPSEC_LATCH_ESTABLISHED,
                               IPSEC_LATCH_LATCHING, IPSEC_LATCH_LISTENER, IPSEC_LATCH_NONE,
                               IPSEC_LATCH_STATE, IPSEC_LOCAL_ID, IPSEC_PEER_ID,
                               IPSEC_PEER_KEY, IPSEC_POLICY, IPSEC_POLICY_BYPASS,
                               IPSEC_POLICY_OPTIONAL, IPSEC_POLICY_REQUIRE, IPSEC_PROTECTION,
                               IPSEC_REQUIRE_PEER_ID, SOL_IPSEC, decode_protection)
from ipsecchan.xfrm.netlink_xfrm import policy_level as _policy_level

_log = _logging.getLogger("ipsecchan")

__all__ = list(_std.__all__) + [
    "SOL_IPSEC", "IPSEC_LATCH_STATE", "IPSEC_POLICY", "IPSEC_PEER_ID", "IPSEC_LOCAL_ID",
    "IPSEC_PEER_KEY", "IPSEC_LATCH_CAUSE", "IPSEC_PROTECTION", "IPSEC_CHANNEL_BINDING",
    "IPSEC_REQUIRE_PEER_ID", "IPSEC_POLICY_BYPASS", "IPSEC_POLICY_REQUIRE",
    "IPSEC_POLICY_OPTIONAL", "IPSEC_LATCH_NONE", "IPSEC_LATCH_LISTENER",
    "IPSEC_LATCH_LATCHING", "IPSEC_LATCH_ESTABLISHED", "IPSEC_LATCH_BROKEN",
    "IPSEC_LATCH_CLOSED", "CHANNEL_BINDING_TYPES", "LatchRefused", "LatchBrokenError",
    "LatchInfo", "decode_protection", "setdefaultpolicy", "getdefaultpolicy", "install",
    "uninstall"]

_POLICIES = {IPSEC_POLICY_BYPASS: None, IPSEC_POLICY_REQUIRE: Policy.REQUIRE,
             IPSEC_POLICY_OPTIONAL: Policy.OPTIONAL}
# IP_XFRM_POLICY and IPV6_XFRM_POLICY (not in the stdlib module): a latch's pins and blocks
# are these per-socket policies.
_XFRM_POLICY_OPTIONS = {_policy_level(AF_INET), _policy_level(AF_INET6)}
_MSG_FASTOPEN = getattr(_std, "MSG_FASTOPEN", 0x20000000)
_SCM_RIGHTS = getattr(_std, "SCM_RIGHTS", 1)
_raw_family = _csocket.socket.family.__get__      # (the property makes an enum: slower)
_AF_UNIX = getattr(_std, "AF_UNIX", None)
_DATA_METHODS = ("send", "sendall", "sendto", "sendmsg", "sendfile", "recv", "recv_into",
                 "recvfrom", "recvfrom_into", "recvmsg", "recvmsg_into")


class LatchBrokenError(ConnectionError):
    """The connection's latch is BROKEN: its IPsec parameters no longer hold (`cause`). The
    kernel holds its packets; the connection works again if the latch is restored."""

    def __init__(self, cause: str, detail: str = ""):
        super().__init__(_errno.ECONNABORTED,
                         f"IPsec latch broken: {cause}" + (f" ({detail})" if detail else ""))
        self.cause = cause
        self.detail = detail


def _policy_from_env() -> int:
    name = _os.environ.get("IPSECCHAN_POLICY", "require").strip().lower()
    if name not in _opt.POLICY_NAMES:
        raise ValueError(f"IPSECCHAN_POLICY={name!r}: expected one of "
                         f"{', '.join(_opt.POLICY_NAMES)}")
    return _opt.POLICY_NAMES[name]


_default_policy = _policy_from_env()


def setdefaultpolicy(policy: int) -> None:
    """The policy of sockets made from now on (IPSEC_POLICY_REQUIRE, _OPTIONAL, _BYPASS)."""
    global _default_policy
    if policy not in _POLICIES:
        raise ValueError(f"unknown IPsec policy {policy!r}")
    _default_policy = policy


def getdefaultpolicy() -> int:
    return _default_policy


class LatchInfo:
    """A read-only view of a socket's latch (the `latch` attribute)."""
    __slots__ = ("_handle",)

    def __init__(self, handle):
        self._handle = handle

    @property
    def state(self) -> str:
        return self._handle.latch.state.value

    @property
    def cause(self) -> str | None:
        c = self._handle.latch.cause
        return c.value if c is not None else None

    @property
    def detail(self) -> str:
        return self._handle.latch.detail

    @property
    def params(self):
        return self._handle.latch.params

    @property
    def protected(self) -> bool:
        p = self.params
        return bool(p and p.protected)

    @property
    def local(self):
        p = self.params
        return p.local if p else None

    @property
    def peer(self):
        p = self.params
        return p.peer if p else None

    @property
    def protection(self) -> tuple:
        p = self.params
        return p.protection if p else ()

    @property
    def spis(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        p = self.params
        if p is None:
            return (), ()
        return tuple(s.key[3] for s in p.out_sas), tuple(s.key[3] for s in p.in_sas)

    @property
    def history(self) -> list:
        return list(self._handle.latch.history)

    def __repr__(self) -> str:
        peer = self.peer.id if self.peer else None
        return f"<LatchInfo {self.state} peer={peer!r} cause={self.cause!r}>"


class _Ipsec:
    """Per-socket latching state (kept apart from the socket's own attributes)."""
    __slots__ = ("policy", "require_peer", "handle", "ref", "callbacks", "lazy", "binding",
                 "refused", "generation", "pid")

    def __init__(self, policy: int):
        self.policy = policy
        self.require_peer: str | None = None
        self.handle = None
        self.ref = None
        self.callbacks: list = []
        self.lazy = False           # a non-blocking connect in progress: latch on first use
        self.binding: bytes | None | bool = False      # False: not computed yet
        self.refused = False        # latching refused: the kernel blocks the connection
        self.generation = 0         # runtime.fork_generation() when latched (or refused)
        self.pid = 0                # runtime.pid() of the process whose latch it is


def _is_loopback(addr: str) -> bool:
    try:
        ip = _ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, _ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class _FastOpenCall:
    """A new TCP socket's sendto or sendmsg until it connects (socket.__init__): the socket's
    method, through a weak reference (a bound method kept on the object would make a cycle,
    and a socket dropped unclosed would wait for the cyclic collector to close)."""
    __slots__ = ("ref", "impl")

    def __init__(self, ref, impl):
        self.ref, self.impl = ref, impl

    def __call__(self, *args, **kw):
        return self.impl(self.ref(), *args, **kw)


class _AdoptCall:
    """A data method of a connection inherited across a fork, until its first call adopts the
    latch (socket._finish_lazy): through a weak reference, as _FastOpenCall."""
    __slots__ = ("ref", "name")

    def __init__(self, ref, name: str):
        self.ref, self.name = ref, name

    def __call__(self, *args, **kw):
        sock = self.ref()
        sock._finish_lazy()
        d = sock.__dict__
        for name in _DATA_METHODS:          # (adopting replaced them, or had nothing to do)
            if type(d.get(name)) is _AdoptCall:
                del d[name]
        return getattr(sock, self.name)(*args, **kw)


# Connections latched by this process (or adopted by it): after a fork, the child's copies
# adopt their latches on first use (_after_fork_in_child).
_latched_connections: "_weakref.WeakSet[socket]" = _weakref.WeakSet()

# _Ipsec.generation of a latch whose socket another process may hold through a descriptor
# passed over a Unix socket (SCM_RIGHTS), either way: never a fork generation, so the socket
# counts as shared for good (its close lets go of the latch and leaves the pins, which the
# other process's latch of the same socket relies on).
_ELSEWHERE = -1


class _OwnFd(int):
    """A descriptor this module made the socket of (accept, dup, socketpair): socket.__init__
    latches only descriptors from elsewhere. (An int, so that subclasses of socket that
    override __init__ pass it on unchanged.)"""
    __slots__ = ()


def _mark_passed(ancdata) -> None:
    """Latched connections whose descriptors these SCM_RIGHTS messages pass on."""
    fds = set()
    for level, kind, data in ancdata:
        if level == SOL_SOCKET and kind == _SCM_RIGHTS:
            raw = memoryview(data).tobytes()        # (an array of ints, or bytes)
            fds.update(_array.array("i", raw[:len(raw) - len(raw) % 4]))
    if fds:
        for sock in list(_latched_connections):
            if sock.fileno() in fds:
                sock._ipsec.generation = _ELSEWHERE


class _UnixSendmsg:
    """An AF_UNIX socket's sendmsg (socket.__init__): descriptors of latched connections it
    passes to another process are marked (_mark_passed) first. Through a weak reference, as
    _FastOpenCall."""
    __slots__ = ("ref",)

    def __init__(self, ref):
        self.ref = ref

    def __call__(self, buffers, ancdata=(), flags=0, address=None):
        sock = self.ref()
        if ancdata:
            _mark_passed(ancdata)
        if address is None:
            return _std.socket.sendmsg(sock, buffers, ancdata, flags)
        return _std.socket.sendmsg(sock, buffers, ancdata, flags, address)


def _after_fork_in_child() -> None:
    # A child that only does I/O on an inherited connection (a forked handler) never reads
    # its latch, and nobody would follow it: the parent lets go of it when it closes its
    # copy, and the pins stay on the SAs of the fork's time, so the connection would stall
    # at the next rekey. Its first data call adopts the latch instead (the runtime's own
    # fork hook, registered before this one, has made that call see a new generation).
    for sock in list(_latched_connections):
        ips = sock.__dict__.get("_ipsec")
        if ips is None or ips.handle is None or ips.lazy or sock.fileno() < 0:
            continue
        ref = _weakref.ref(sock)
        for name in _DATA_METHODS:
            setattr(sock, name, _AdoptCall(ref, name))


_os.register_at_fork(after_in_child=_after_fork_in_child)


class socket(_std.socket):
    """socket.socket, latched. See the module's documentation."""

    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        super().__init__(family, type, proto, fileno)
        self._ipsec = _Ipsec(_default_policy)
        if fileno is None and self.type & 0xF == SOCK_STREAM and \
                self.family in (AF_INET, AF_INET6):
            # A new TCP socket can connect through sendto()/sendmsg() with MSG_FASTOPEN,
            # without connect(): caught until it connects or listens (then they are plain
            # again: UDP's and connected sockets' sends run no Python code of this module).
            self._catch_fast_open()
        elif _raw_family(self) == _AF_UNIX:
            self.sendmsg = _UnixSendmsg(_weakref.ref(self))
        if fileno is not None and fileno.__class__ is not _OwnFd:
            try:
                self._latch_given()
            except BaseException:
                self.detach()       # refused, or no backend: the descriptor stays the caller's
                raise

    # -- TCP Fast Open --
    def _catch_fast_open(self) -> None:
        ref = _weakref.ref(self)
        self.sendto = _FastOpenCall(ref, socket._fastopen_sendto)
        self.sendmsg = _FastOpenCall(ref, socket._fastopen_sendmsg)

    def _plain_sends(self) -> None:
        d = self.__dict__
        for name in ("sendto", "sendmsg"):
            if type(d.get(name)) is _FastOpenCall:
                del d[name]

    def _fastopen_sendto(self, data, flags_or_addr, addr=None):
        if addr is not None and flags_or_addr & _MSG_FASTOPEN and self._latchable():
            # Data in the SYN would leave before the connection is latched (and an
            # unconnected socket's sendto would connect it unlatched): connect and latch
            # first, then send. (A non-blocking one raises BlockingIOError, as a Fast Open
            # without a cookie does: the data is to be sent once connected.)
            self.connect(addr)
            return self.send(data, flags_or_addr & ~_MSG_FASTOPEN)
        if addr is None:
            return _std.socket.sendto(self, data, flags_or_addr)
        return _std.socket.sendto(self, data, flags_or_addr, addr)

    def _fastopen_sendmsg(self, buffers, ancdata=(), flags=0, address=None):
        if address is not None and flags & _MSG_FASTOPEN and self._latchable():
            self.connect(address)                  # as _fastopen_sendto
            return self.sendmsg(buffers, ancdata, flags & ~_MSG_FASTOPEN)
        if address is None:
            return _std.socket.sendmsg(self, buffers, ancdata, flags)
        return _std.socket.sendmsg(self, buffers, ancdata, flags, address)

    def _latch_given(self) -> None:
        """A descriptor from elsewhere (socket(fileno=...), fromfd(): passed over a Unix
        socket, inherited through exec, handed over by inetd or systemd): a connection is
        latched as if it had connected here, unless this process has latched it already (one
        latch per connection: the socket that made it keeps it). A listening one gets its
        LISTENER latch only when listen() is called on it again."""
        if not self._latchable():
            return
        try:
            peer = self.getpeername()
        except OSError:
            if self.type & 0xF == SOCK_STREAM and not self.getsockopt(SOL_SOCKET,
                                                                      SO_ACCEPTCONN):
                self._catch_fast_open()     # unconnected: it may connect by a Fast Open send
            return
        # (Loopback first: it needs no backend, and asking one would start it.)
        if _is_loopback(peer[0]) or _runtime.get().is_latched(self):
            return
        self._latch_connected()         # (refused: blocked; the caller detaches)
        if self._ipsec.handle is not None:
            # The other holder's latch relies on the same pins: this close must not clear them.
            self._ipsec.generation = _ELSEWHERE

    # -- which sockets latch --
    def _latchable(self) -> bool:
        return (self.family in (AF_INET, AF_INET6)
                and (self.type & 0xF) in (SOCK_STREAM, SOCK_DGRAM)
                and self._ipsec.policy != IPSEC_POLICY_BYPASS)

    def _requirements(self) -> Requirements:
        return Requirements(_POLICIES[self._ipsec.policy], self._ipsec.require_peer)

    # -- connecting --
    def connect(self, address):
        self._plain_sends()
        again = self._end_udp_connection()
        try:
            super().connect(address)
        except BlockingIOError:
            self._arm_lazy()
            raise
        except OSError:
            if again:
                self._latch_still_connected()
            raise
        self._latch_connected()

    def _end_udp_connection(self) -> bool:
        """A latched (or refused) UDP socket about to connect again: that is another
        connection (RFC 5660 5.2, simulated connections). The old latch, made for another
        peer, goes first (kept, it would go on naming that peer, and its IN pin, by reqid,
        could accept the new one's packets; its OUT pin would fail the new route lookup);
        the new connection is latched once connected. Whether there was one."""
        ips = self._ipsec
        if self.type & 0xF != SOCK_DGRAM or (ips.handle is None and not ips.refused):
            return False
        self._release(wait=True)                 # its pins gone before the connect
        for name in _DATA_METHODS:
            self.__dict__.pop(name, None)        # a broken latch's raising methods
        if ips.refused:
            ips.refused = False
            if not self._shared():
                _runtime.get().abort(self)       # the refused connection's block goes
        ips.binding = False
        return True

    def _latch_still_connected(self) -> None:
        # connect() again failed: the socket may still be connected to its old peer, now
        # without a latch. Latch it again (refused: blocked, as any refused connection).
        try:
            self.getpeername()
        except OSError:
            return
        try:
            self._latch_connected()
        except LatchRefused:
            pass

    def connect_ex(self, address):
        self._plain_sends()
        again = self._end_udp_connection()
        rc = super().connect_ex(address)
        if rc != 0 and again:
            self._latch_still_connected()
        if rc == 0:
            try:
                self._latch_connected()
            except LatchRefused as exc:
                return exc.errno or _errno.ECONNREFUSED
        elif rc in (_errno.EINPROGRESS, _errno.EAGAIN, _errno.EALREADY):
            self._arm_lazy()
        return rc

    def _latch_connected(self, expect=None) -> None:
        ips = self._ipsec
        if not self._latchable() or ips.handle is not None:
            return
        if _is_loopback(self.getpeername()[0]):
            return
        rt = _runtime.get()
        ref = _runtime.LatchedFd(self)
        ips.generation, ips.pid = _runtime.fork_generation(), _runtime.pid()
        try:
            # On refusal the backend blocks the connection: nothing of it may go out.
            handle = rt.latch(ref, self._requirements(), self._alert_callback(),
                              **({"expect": expect} if expect is not None else {}))
        except LatchRefused as exc:
            ips.refused = True
            exc.errno = _errno.ECONNREFUSED
            raise
        ips.handle, ips.ref = handle, ref
        _latched_connections.add(self)

    def _arm_lazy(self) -> None:
        # asyncio and other non-blocking callers never call connect() again: latch on the
        # first data call (or option read) once connected. The wrappers then remove
        # themselves, so the data path goes back to the plain methods.
        if not self._latchable() or self._ipsec.lazy:
            return
        self._ipsec.lazy = True
        for name in _DATA_METHODS:
            setattr(self, name, self._lazy_method(name))

    def _lazy_method(self, name: str):
        def call(*args, **kw):
            self._finish_lazy()
            if self._ipsec.lazy:        # not connected yet: the plain method answers
                return getattr(type(self), name)(self, *args, **kw)
            return getattr(self, name)(*args, **kw)
        return call

    def _finish_lazy(self) -> None:
        """Before the latch is read: the latch of a non-blocking connect, made now that it is
        connected; an inherited latch, adopted."""
        ips = self._ipsec
        if ips.generation != _runtime.fork_generation() and ips.handle is not None \
                and ips.pid != _runtime.pid():
            self._adopt()
        if not ips.lazy:
            return
        try:
            self.getpeername()
        except OSError:
            return              # not connected (yet, or failed): the call will say so
        ips.lazy = False
        for name in _DATA_METHODS:
            self.__dict__.pop(name, None)
        self._latch_connected()

    def _adopt(self) -> None:
        """A latch inherited across a fork is the parent's: nobody in this process follows
        it, and its state is as of the fork. This process latches the connection itself,
        to what it was latched to (the same peer and key, no weaker protection: anything
        else is refused and the connection blocked, as for any latch). A listener's latch is
        kept: accept() makes its connections' latches here."""
        ips = self._ipsec
        old = ips.handle
        if old.latch.state is LatchState.LISTENER:
            ips.pid = _runtime.pid()
            return
        ips.handle, ips.binding = None, False
        for name in _DATA_METHODS:
            self.__dict__.pop(name, None)        # the parent's broken latch's raisers
        params, inherited = old.latch.params, ips.generation
        try:
            self._latch_connected(expect=params if params is not None and
                                  old.latch.state is not LatchState.CLOSED else None)
        except LatchRefused as exc:
            # Blocked by the backend: the data calls say so, as for a broken latch.
            cause = exc.cause.value
            for name in _DATA_METHODS:
                setattr(self, name, _raiser(cause, exc.detail))
        except OSError as exc:
            _log.warning("latching an inherited connection: %s", exc)
        finally:
            # Still shared with the parent: closing it here must not clear its pins there.
            ips.generation, ips.pid = inherited, _runtime.pid()

    # -- listening and accepting --
    def listen(self, *args):
        self._plain_sends()
        super().listen(*args)
        ips = self._ipsec
        if self._latchable() and ips.handle is None and not _is_loopback(
                self.getsockname()[0]):
            ips.ref = _runtime.LatchedFd(self)
            ips.generation, ips.pid = _runtime.fork_generation(), _runtime.pid()
            ips.handle = _runtime.get().listen(ips.ref, self._requirements(),
                                               self._alert_callback())

    def accept(self):
        while True:
            fd, addr = self._accept()
            sock = type(self)(self.family, self.type, self.proto, fileno=_OwnFd(fd))
            if getdefaulttimeout() is None and self.gettimeout():
                sock.setblocking(True)
            try:
                sock._latch_accepted(self)
            except LatchRefused as exc:
                # Refused connections never reach the application (RFC 5660: a LISTENER
                # latch admits only connections it can latch); the kernel blocks it already.
                _log.warning("refused a connection from %s: %s", addr, exc)
                sock._ipsec.refused = True
                sock.close()
                continue
            return sock, addr

    def _latch_accepted(self, listener: "socket") -> None:
        lh = listener._ipsec.handle
        ips = self._ipsec
        ips.policy, ips.require_peer = listener._ipsec.policy, listener._ipsec.require_peer
        if lh is None or not self._latchable() or _is_loopback(self.getpeername()[0]):
            return
        ref = _runtime.LatchedFd(self)
        ips.generation, ips.pid = _runtime.fork_generation(), _runtime.pid()
        ips.handle = _runtime.get().accept(lh, ref, self._alert_callback())
        ips.ref = ref
        _latched_connections.add(self)

    # -- closing --
    def _shared(self) -> bool:
        """Latched (or refused) before a fork: the other process may hold this connection too,
        and its pins or block are its protection there as well."""
        return self._ipsec.generation != _runtime.fork_generation()

    def _release(self, wait: bool = False) -> None:
        ips = self.__dict__.get("_ipsec")
        if ips is None or ips.handle is None:
            return
        handle, ips.handle = ips.handle, None
        _latched_connections.discard(self)
        if self._shared():
            # Only let go of the latch here (its owner, if this process made it, stops
            # following it); its pins stay for the other process's sake. A child does not
            # touch its parent's latches at all.
            rt = _runtime.current()
            try:
                if rt is not None:
                    rt.forget(handle)
            except Exception as exc:
                _log.warning("letting go of a latch: %s", exc)
            return
        try:
            _runtime.get().release(handle, wait=wait)
        except OSError as exc:
            _log.warning("releasing a latch: %s", exc)

    def _real_close(self, _ss=_csocket.socket):
        # Release before the descriptor closes: a closed TCP socket lives on in the kernel
        # (FIN_WAIT) with its per-socket policies until the peer closes too.
        self._release()
        ips = self.__dict__.get("_ipsec")
        if ips is not None and ips.refused:
            self._abort()
        _ss.close(self)

    def _abort(self) -> None:
        # A refused TCP connection is reset, not closed: a FIN would wait behind the block
        # policy, retransmitted for minutes, and the peer with it. The block is lifted just
        # before the reset, so that the peer hears it, only when nothing the application
        # wrote is queued: a retransmission in between would carry those bytes out. Else
        # the connection is reset behind the block (it is gone at once; the peer's next
        # packet is answered with a reset). UDP: closing sends nothing; the block stays.
        if self.type & 0xF != SOCK_STREAM or self._shared():
            return      # (shared across a fork: the other process's copy stays blocked)
        try:
            self.setsockopt(SOL_SOCKET, SO_LINGER, b"\1\0\0\0\0\0\0\0")
            if _unsent(self) == 0:
                self._ipsec.refused = False     # (the block is the backend's to lift now)
                _runtime.get().abort(self)
        except OSError as exc:
            _log.warning("resetting a refused connection: %s", exc)

    def detach(self):
        ips = self._ipsec
        if ips.ref is not None:
            # Whoever takes the descriptor (ssl.wrap_socket) keeps the latch; this object
            # must no longer release it when it is collected.
            ips.ref.detached()
            ips.handle = None
        return super().detach()

    def __del__(self):
        try:
            self._release()
        except Exception:
            pass
        sup = getattr(super(), "__del__", None)
        if sup is not None:
            sup()

    def dup(self):
        sock = type(self)(self.family, self.type, self.proto,
                          fileno=_OwnFd(_std.dup(self.fileno())))
        sock.settimeout(self.gettimeout())
        sock._ipsec.policy = self._ipsec.policy
        if type(self.__dict__.get("sendto")) is _FastOpenCall:
            sock._catch_fast_open()         # an unconnected TCP socket's copy
        return sock

    # -- break alerts --
    def _alert_callback(self):
        ref = _weakref.ref(self)

        def on_alert(handle, alert):
            sock = ref()
            if sock is not None:
                sock._on_alert(handle, alert)
        return on_alert

    def _on_alert(self, handle, alert) -> None:
        if alert.new is LatchState.BROKEN:
            cause = alert.cause.value if alert.cause else "broken"
            for name in _DATA_METHODS:
                setattr(self, name, _raiser(cause, alert.detail))
        elif alert.old is LatchState.BROKEN and alert.new is LatchState.ESTABLISHED:
            for name in _DATA_METHODS:
                self.__dict__.pop(name, None)
        for cb in list(self._ipsec.callbacks):
            try:
                cb(self, LatchInfo(handle), alert)
            except Exception:
                _log.exception("latch callback failed")

    def add_latch_callback(self, callback) -> None:
        """callback(sock, latch_info, alert) on every latch alert (break, resolve, rekey).
        Called from ipsecchan's event thread: it must not block."""
        self._ipsec.callbacks.append(callback)

    def remove_latch_callback(self, callback) -> None:
        self._ipsec.callbacks.remove(callback)

    # -- inquiry --
    @property
    def latch(self) -> LatchInfo | None:
        """The connection's latch, or None when it is not latched."""
        self._finish_lazy()
        h = self._ipsec.handle
        return LatchInfo(h) if h is not None else None

    def _latched_params(self):
        self._finish_lazy()
        h = self._ipsec.handle
        if h is None:
            try:
                self.getpeername()
            except OSError:
                raise _opt.oserror(_errno.ENOTCONN) from None
            return None
        return h.latch.params

    def getpeerid(self) -> str | None:
        """The peer's IKE identity (e.g. 'CN=bob'), or None when not latched to one."""
        p = self._latched_params()
        return p.peer.id if p is not None and p.peer is not None else None

    def getlocalid(self) -> str | None:
        p = self._latched_params()
        return p.local.id if p is not None and p.local is not None else None

    def get_channel_binding(self, cb_type: str = CB_ENDPOINT) -> bytes | None:
        """Channel bindings of the latched IPsec channel (ipsecchan.channel), or None when
        not available (not latched, or a key is unknown: PSK, manual keying)."""
        if cb_type not in CHANNEL_BINDING_TYPES:
            raise ValueError(f"{cb_type} channel binding type not implemented")
        p = self._latched_params()
        if p is None or not p.protected or p.peer is None or p.local is None:
            return None
        ips = self._ipsec
        if ips.binding is False:
            f = ips.handle.flow
            ips.binding = endpoint_binding(f.family, f.proto, (f.local, f.local_port),
                                           (f.remote, f.remote_port),
                                           p.local.pubkey_sha256, p.peer.pubkey_sha256)
        return ips.binding

    # -- socket options --
    def getsockopt(self, level, optname, buflen=None):
        if level != SOL_IPSEC:
            if buflen is None:
                return super().getsockopt(level, optname)
            return super().getsockopt(level, optname, buflen)
        return _opt.reply(self._ipsec_option(optname), buflen)

    def _ipsec_option(self, opt: int):
        ips = self._ipsec
        if opt == IPSEC_POLICY:
            return ips.policy
        if opt == IPSEC_REQUIRE_PEER_ID:
            return (ips.require_peer or "").encode()
        if opt == IPSEC_LATCH_STATE:
            self._finish_lazy()
            h = ips.handle
            return _opt.LATCH_STATES[h.latch.state.value] if h is not None else \
                IPSEC_LATCH_NONE
        if opt == IPSEC_LATCH_CAUSE:
            h = ips.handle
            return (h.latch.cause.value if h is not None and h.latch.cause else "").encode()
        if opt not in _opt.BYTES_OPTIONS:
            raise _opt.oserror(_errno.ENOPROTOOPT)
        p = self._latched_params()
        if p is None:
            raise _opt.oserror(_errno.ENODATA, "the connection is not latched")
        if opt == IPSEC_PROTECTION:
            return _opt.encode_protection(p)
        if opt == IPSEC_CHANNEL_BINDING:
            cb = self.get_channel_binding()
            if cb is None:
                raise _opt.oserror(_errno.ENODATA, "no channel binding: a key is unknown")
            return cb
        if not p.protected:
            raise _opt.oserror(_errno.ENODATA, "latched to cleartext")
        if opt == IPSEC_PEER_ID:
            return p.peer.id.encode()
        if opt == IPSEC_LOCAL_ID:
            return p.local.id.encode()
        if opt == IPSEC_PEER_KEY:
            if not p.peer.pubkey_sha256:
                raise _opt.oserror(_errno.ENODATA, "no public key authenticated the peer")
            return bytes.fromhex(p.peer.pubkey_sha256)
        raise _opt.oserror(_errno.ENOPROTOOPT)

    def setsockopt(self, level, optname, value, optlen=None):
        if level != SOL_IPSEC:
            if (level, optname) in _XFRM_POLICY_OPTIONS:
                self._own_policies()
            if optlen is None:
                return super().setsockopt(level, optname, value)
            return super().setsockopt(level, optname, value, optlen)
        if optname not in _opt.SETTABLE:
            raise _opt.oserror(_errno.ENOPROTOOPT)
        if optlen is not None:
            raise _opt.oserror(_errno.EINVAL, "IPsec options take a value, not a length")
        ips = self._ipsec
        if ips.handle is not None or ips.lazy or self._connected():
            raise _opt.oserror(_errno.EISCONN, "set IPsec options before connect or listen")
        if optname == IPSEC_POLICY:
            policy = _opt.int_value(value)
            if policy not in _POLICIES:
                raise _opt.oserror(_errno.EINVAL, f"unknown IPsec policy {policy}")
            ips.policy = policy
        else:
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise TypeError("a bytes-like object is required, not "
                                f"{type(value).__name__!r}")
            raw = bytes(value)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _opt.oserror(_errno.EINVAL, "IPSEC_REQUIRE_PEER_ID: not UTF-8") from None
            if "\0" in text or len(raw) > 1024:
                raise _opt.oserror(_errno.EINVAL, "IPSEC_REQUIRE_PEER_ID: bad identity")
            ips.require_peer = text or None

    def _own_policies(self) -> None:
        """A latched, latching or refused socket's per-socket policies are the latch's (its
        pin, or the block that keeps a broken or refused connection from leaking): the
        application may not replace them."""
        ips = self._ipsec
        h = ips.handle
        if ips.lazy or ips.refused or (h is not None
                                       and h.latch.state is not LatchState.CLOSED):
            raise _opt.oserror(_errno.EBUSY, "the socket's IPsec policies are its latch's")

    def _connected(self) -> bool:
        try:
            self.getpeername()
            return True
        except OSError:
            return False


def _raiser(cause: str, detail: str):
    def broken(*args, **kw):
        raise LatchBrokenError(cause, detail)
    return broken


# ---- the functions that make sockets (the stdlib's would make stdlib sockets) ----

def fromfd(fd, family, type, proto=0):
    """As socket.fromfd; a connected socket is latched (as with socket(fileno=...)), a
    listening one gets a LISTENER latch only when listen() is called on it again."""
    copy = _std.dup(fd)
    try:
        return socket(family, type, proto, copy)
    except BaseException:
        _os.close(copy)         # (refused: the connection stays blocked, the block is its)
        raise


def socketpair(family=None, type=SOCK_STREAM, proto=0):
    if family is None:
        family = getattr(_std, "AF_UNIX", AF_INET)
    a, b = _std.socketpair(family, type, proto)
    return (socket(family, type, proto, _OwnFd(a.detach())),
            socket(family, type, proto, _OwnFd(b.detach())))


_GLOBAL_DEFAULT_TIMEOUT = _std._GLOBAL_DEFAULT_TIMEOUT


def create_connection(address, timeout=_GLOBAL_DEFAULT_TIMEOUT, source_address=None, *,
                      all_errors=False):
    """As socket.create_connection (the stdlib's, with this module's socket class)."""
    host, port = address
    exceptions = []
    for af, socktype, proto, _canon, sa in getaddrinfo(host, port, 0, SOCK_STREAM):
        sock = None
        try:
            sock = socket(af, socktype, proto)
            if timeout is not _GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sa)
            exceptions.clear()
            return sock
        except OSError as exc:
            if not all_errors:
                exceptions.clear()
            exceptions.append(exc)
            if sock is not None:
                sock.close()
    if exceptions:
        try:
            if not all_errors:
                raise exceptions[0]
            raise ExceptionGroup("create_connection failed", exceptions)
        finally:
            exceptions.clear()
    raise error("getaddrinfo returns an empty list")


def create_server(address, *, family=AF_INET, backlog=None, reuse_port=False,
                  dualstack_ipv6=False):
    """As socket.create_server (the stdlib's, with this module's socket class)."""
    if reuse_port and not hasattr(_std, "SO_REUSEPORT"):
        raise ValueError("SO_REUSEPORT not supported on this platform")
    if dualstack_ipv6:
        if not has_dualstack_ipv6():
            raise ValueError("dualstack_ipv6 not supported on this platform")
        if family != AF_INET6:
            raise ValueError("dualstack_ipv6 requires AF_INET6 family")
    sock = socket(family, SOCK_STREAM)
    try:
        if _os.name not in ("nt", "cygwin") and hasattr(_std, "SO_REUSEADDR"):
            try:
                sock.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
            except error:
                pass
        if reuse_port:
            sock.setsockopt(SOL_SOCKET, _std.SO_REUSEPORT, 1)
        if has_ipv6 and family == AF_INET6:
            if dualstack_ipv6:
                sock.setsockopt(IPPROTO_IPV6, IPV6_V6ONLY, 0)
            elif hasattr(_std, "IPV6_V6ONLY") and hasattr(_std, "IPPROTO_IPV6"):
                sock.setsockopt(IPPROTO_IPV6, IPV6_V6ONLY, 1)
        try:
            sock.bind(address)
        except error as err:
            raise error(err.errno, f"{err.strerror} (while attempting to bind on address "
                                   f"{address!r})") from None
        if backlog is None:
            sock.listen()
        else:
            sock.listen(backlog)
        return sock
    except error:
        sock.close()
        raise


SocketType = socket
_PATCHED = ("socket", "SocketType", "create_connection", "create_server", "fromfd",
            "socketpair")
_saved: dict = {}


def install() -> None:
    """Make the standard library's socket module hand out latched sockets, for code that
    cannot change its import (socketserver, http.server, asyncio, ...). Modules that did
    `from socket import socket` before this keep the plain class."""
    if _saved:
        return
    g = globals()
    for name in _PATCHED:
        _saved[name] = getattr(_std, name)
        setattr(_std, name, g[name])


def uninstall() -> None:
    for name, value in _saved.items():
        setattr(_std, name, value)
    _saved.clear()

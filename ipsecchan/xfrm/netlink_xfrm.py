"""Talking XFRM netlink: SAD/SPD dumps and per-socket policies.

A plain AF_NETLINK socket from the standard library carries the requests: a dump is one
request and a stream of multi-part answers, which needs no more of a framework than the
bounds-checked walker in ipsecchan.netlink. Errors are raised, never turned into a partial
answer: an incomplete view of the SPD must not pass for the whole of it.
"""
from __future__ import annotations

import errno
import functools
import os
import socket
import struct

from ipsecchan._native import ffi, lib
from ipsecchan import netlink
from ipsecchan.netlink import split_messages
from ipsecchan.xfrm.messages import Policy, SA, decode_policy, decode_sa

NETLINK_XFRM = 6
NLM_F_REQUEST, NLMSG_ERROR, RECV_BUFFER = (netlink.NLM_F_REQUEST, netlink.NLMSG_ERROR,
                                           netlink.DUMP_RECV_BUFFER)


class XfrmError(OSError):
    """The kernel refused an XFRM request, or a dump could not be read whole."""


def _dump(msg_type: int, request_payload: bytes, expect: int) -> list[bytes]:
    """The payloads of every `expect` message of a dump, read whole or not at all."""
    return netlink.dump(NETLINK_XFRM, msg_type, request_payload, expect, XfrmError, "XFRM")


def dump_sas() -> list[SA]:
    """Every SA in this network namespace's SAD (needs CAP_NET_ADMIN)."""
    req = bytes(ffi.sizeof("struct xfrm_usersa_id"))
    return [decode_sa(p) for p in _dump(lib.XFRM_MSG_GETSA, req, lib.XFRM_MSG_NEWSA)]


_DUMPS = {"sa": ("struct xfrm_usersa_id", "XFRM_MSG_GETSA", "XFRM_MSG_NEWSA"),
          "policy": ("struct xfrm_userpolicy_id", "XFRM_MSG_GETPOLICY", "XFRM_MSG_NEWPOLICY")}


def dump_messages(kind: str) -> bytes:
    """A dump ("sa" or "policy") as a buffer of netlink messages, the form an index eats."""
    req, get, new = _DUMPS[kind]
    new_type = getattr(lib, new)
    return b"".join(struct.pack("=IHHII", 16 + len(p) + (-len(p) % 4), new_type, 0, 0, 0)
                    + p + bytes(-len(p) % 4)
                    for p in _dump(getattr(lib, get), bytes(ffi.sizeof(req)), new_type))


_DEFAULT_NAMES = {lib.XFRM_USERPOLICY_UNSPEC: "accept", lib.XFRM_USERPOLICY_ACCEPT: "accept",
                  lib.XFRM_USERPOLICY_BLOCK: "block"}


def decode_default_policy(payload) -> tuple[str, str]:
    """(in, out) from a struct xfrm_userpolicy_default."""
    if len(payload) < ffi.sizeof("struct xfrm_userpolicy_default"):
        raise XfrmError(errno.EBADMSG, "short xfrm_userpolicy_default")
    p = ffi.from_buffer("struct xfrm_userpolicy_default *", payload)
    return (_DEFAULT_NAMES.get(getattr(p, "in"), "block"),
            _DEFAULT_NAMES.get(p.out, "block"))


def get_default_policy() -> tuple[str, str]:
    """The namespace's default policy (in, out): what the kernel does with a flow no policy
    matches. An unknown answer reads as "block" (fail closed)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM) as s:
        s.bind((0, 0))
        body = bytes(ffi.sizeof("struct xfrm_userpolicy_default"))
        s.send(struct.pack("=IHHII", 16 + len(body) + (-len(body) % 4),
                           lib.XFRM_MSG_GETDEFAULT, NLM_F_REQUEST, 1, 0)
               + body + bytes(-len(body) % 4))
        for m in split_messages(s.recv(RECV_BUFFER)):
            if m.type == lib.XFRM_MSG_GETDEFAULT:
                return decode_default_policy(m.payload)
            if m.type == NLMSG_ERROR:
                code = -struct.unpack_from("=i", m.payload)[0]
                raise XfrmError(code, f"XFRM_MSG_GETDEFAULT: {os.strerror(code)}")
    raise XfrmError(errno.EIO, "no answer to XFRM_MSG_GETDEFAULT")


def dump_policies() -> list[Policy]:
    """Every policy in the SPD, per-socket policies included (dir "in-socket"/"out-socket")."""
    req = bytes(ffi.sizeof("struct xfrm_userpolicy_id"))
    return [decode_policy(p)
            for p in _dump(lib.XFRM_MSG_GETPOLICY, req, lib.XFRM_MSG_NEWPOLICY)]


XFRM_INF = 0xFFFFFFFFFFFFFFFF
_SOCKET_DIRS = {"in": 0, "out": 1}


def socket_policy_bytes(family: int, direction: str, templates=(), *, action: str = "allow",
                        priority: int = 0) -> bytes:
    """struct xfrm_userpolicy_info + xfrm_user_tmpl[] for setsockopt(IP_XFRM_POLICY).

    templates: ipsecchan.xfrm.Template records; spi/reqid 0 mean "any". The selector names
    only the socket's family (the kernel insists); a per-socket policy applies to every
    packet of its socket.
    """
    if direction not in _SOCKET_DIRS:
        raise ValueError(f"a socket policy's direction is 'in' or 'out', not {direction!r}")
    # Built from cached parts: latching sets two of these per connection and per rekey, and
    # most parts repeat (the header always; an IN template per reqid).
    return policy_header(family, direction, action, priority) + b"".join(
        map(_template_bytes, templates))


@functools.lru_cache(maxsize=64)
@functools.lru_cache(maxsize=64)
def policy_header(family: int, direction: str, action: str = "allow", priority: int = 0
                  ) -> bytes:
    """The struct xfrm_userpolicy_info of a per-socket policy (templates follow it)."""
    pol = ffi.new("struct xfrm_userpolicy_info *")
    for field in ("soft_byte_limit", "hard_byte_limit", "soft_packet_limit",
                  "hard_packet_limit"):
        setattr(pol.lft, field, XFRM_INF)
    pol.sel.family = family
    pol.dir = _SOCKET_DIRS[direction]
    pol.action = {"allow": lib.XFRM_POLICY_ALLOW, "block": lib.XFRM_POLICY_BLOCK}[action]
    pol.priority = priority
    return bytes(ffi.buffer(pol))


_PROTOS = {"esp": socket.IPPROTO_ESP, "ah": socket.IPPROTO_AH}


# struct xfrm_user_tmpl packed by struct rather than built through cffi: a rekey re-pins
# every latched socket of the SAs it replaces (a new SPI each), and packing is several times
# cheaper. The layout is checked against the C header's below.
_TMPL = struct.Struct("=16sIB3xH2x16sIBBBxIII")
assert _TMPL.size == ffi.sizeof("struct xfrm_user_tmpl") and \
    [ffi.offsetof("struct xfrm_user_tmpl", f) for f in ("family", "saddr", "reqid", "mode",
                                                        "optional", "aalgos")] \
    == [24, 28, 44, 48, 50, 52]
_MODES = {"transport": lib.XFRM_MODE_TRANSPORT, "tunnel": lib.XFRM_MODE_TUNNEL}
_ANY_ALG = 0xFFFFFFFF                     # any algorithm the SA has


def template_bytes(family: int, src: str, dst: str, proto: str, spi: int, reqid: int,
                   mode: str, optional: bool = False) -> bytes:
    """One struct xfrm_user_tmpl, from a Template's fields (in its order)."""
    return _TMPL.pack(_addr16(family, dst), socket.htonl(spi), _PROTOS[proto], family,
                      _addr16(family, src), reqid, _MODES[mode], 0, int(optional),
                      _ANY_ALG, _ANY_ALG, _ANY_ALG)


@functools.lru_cache(maxsize=512)
def _template_bytes(t) -> bytes:
    return template_bytes(t.family, t.src, t.dst, t.proto, t.spi, t.reqid, t.mode, t.optional)


@functools.lru_cache(maxsize=4096)
def _addr16(family: int, text: str) -> bytes:
    return socket.inet_pton(family, text) if text else b""      # (struct pads to 16)


def set_socket_policy(sock: socket.socket, direction: str, templates=(), *,
                      action: str = "allow", priority: int = 0) -> None:
    """Install a per-socket XFRM policy (needs CAP_NET_ADMIN). There is no getsockopt for it:
    the SPD dump shows it as dir "in-socket"/"out-socket"."""
    level, opt = _level(sock)
    sock.setsockopt(level, opt, socket_policy_bytes(sock.family, direction, templates,
                                                    action=action, priority=priority))


def clear_socket_policies(sock: socket.socket) -> None:
    """Remove the socket's IN and OUT policies. The kernel only clears both at once, when
    given a NULL option value of length 0 (setsockopt(level, opt, None, 0))."""
    level, opt = _level(sock)
    sock.setsockopt(level, opt, None, 0)


_POLICY_LEVELS = {socket.AF_INET: (socket.IPPROTO_IP, lib.IP_XFRM_POLICY),
                  socket.AF_INET6: (socket.IPPROTO_IPV6, lib.IPV6_XFRM_POLICY)}


def policy_level(family: int) -> tuple[int, int]:
    """(level, option) of setsockopt for a per-socket policy on a socket of `family`."""
    level = _POLICY_LEVELS.get(family)
    if level is None:
        raise ValueError("per-socket XFRM policies exist for AF_INET and AF_INET6 sockets only")
    return level


def _level(sock: socket.socket) -> tuple[int, int]:
    return policy_level(sock.family)

"""SA and Policy records (ipsecchan.xfrm.messages) encoded into XFRM netlink messages.

The inverse of messages.decode_sa / decode_policy / decode_event, shaped as the kernel sends
them (net/xfrm/xfrm_user.c): NEWSA/UPDSA = xfrm_usersa_info + attributes; DELSA =
xfrm_usersa_id + XFRMA_SA (the usersa_info) + the SA's attributes; EXPIRE = xfrm_user_expire;
NEWPOLICY/UPDPOLICY = xfrm_userpolicy_info + attributes; DELPOLICY = xfrm_userpolicy_id +
XFRMA_POLICY + attributes; POLEXPIRE = xfrm_user_polexpire; FLUSHSA = xfrm_usersa_flush.

Fixed parts are cffi objects of the kernel's own structures (layouts from <linux/xfrm.h>).
Records carry no keys: each algorithm gets a zero-filled key of its key size. Used to feed
the index (ipsecchan.xfrm.index) and by the tests, the fuzz corpus and the benchmarks.
"""
from __future__ import annotations

import socket
import struct
import sys
from typing import Iterable

from ipsecchan._native import ffi, lib
from ipsecchan.xfrm.messages import (ACTION_NAMES, DIR_NAMES, MODE_NAMES, PROTO_NAMES,
                                     XFRMA_SA_DIR, Policy, SA, Selector, Template)

XFRM_INF = (1 << 64) - 1
NLMSG_HDRLEN = 16

_PROTOS = {v: k for k, v in PROTO_NAMES.items()}
_MODES = {v: k for k, v in MODE_NAMES.items()}
_DIRS = {v: k for k, v in DIR_NAMES.items()}
_ACTIONS = {v: k for k, v in ACTION_NAMES.items()}
_SA_DIRS = {"in": 1, "out": 2}


def _number(names: dict, value: str) -> int:
    """A name as messages.py shows it back to its number (unknown numbers show as digits)."""
    if value in names:
        return names[value]
    if value.isdigit():
        return int(value)
    raise ValueError(f"cannot encode {value!r}: not one of {sorted(names)} nor a number")


def _put_addr(field, family: int, text: str) -> None:
    if not text:
        raw = bytes(16)
    elif family in (socket.AF_INET, socket.AF_INET6):
        raw = socket.inet_pton(family, text)
    else:
        raw = bytes.fromhex(text)    # messages._addr shows other families' bytes in hex
    ffi.memmove(ffi.addressof(field), raw, len(raw))


def _put_selector(c, sel: Selector) -> None:
    c.family = sel.family
    _put_addr(c.saddr, sel.family, sel.src)
    _put_addr(c.daddr, sel.family, sel.dst)
    c.prefixlen_s, c.prefixlen_d, c.proto = sel.prefixlen_s, sel.prefixlen_d, sel.proto
    c.sport, c.sport_mask = socket.htons(sel.sport), socket.htons(sel.sport_mask)
    c.dport, c.dport_mask = socket.htons(sel.dport), socket.htons(sel.dport_mask)
    c.ifindex = sel.ifindex


def attr(type_: int, value: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    if len(value) + 4 > 0xFFFF:
        raise ValueError(f"attribute {type_} of {len(value)} bytes does not fit nla_len")
    return struct.pack("=HH", 4 + len(value), type_) + value + bytes(-len(value) % 4)


def _aligned(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def _cbytes(cdata) -> bytes:
    return bytes(ffi.buffer(cdata))


_ALG = {  # kind -> (attribute, struct, name of the third field)
    "aead": (lib.XFRMA_ALG_AEAD, "struct xfrm_algo_aead *", "alg_icv_len"),
    "crypt": (lib.XFRMA_ALG_CRYPT, "struct xfrm_algo *", None),
    "auth": (lib.XFRMA_ALG_AUTH, "struct xfrm_algo *", None),
    "comp": (lib.XFRMA_ALG_COMP, "struct xfrm_algo *", None),
    "auth_trunc": (lib.XFRMA_ALG_AUTH_TRUNC, "struct xfrm_algo_auth *", "alg_trunc_len"),
}


def _attrs_common(mark, if_id, sec_ctx) -> bytes:
    out = b""
    if mark is not None:
        m = ffi.new("struct xfrm_mark *")
        m.v, m.m = mark
        out += attr(lib.XFRMA_MARK, _cbytes(m))
    if if_id is not None:
        out += attr(lib.XFRMA_IF_ID, if_id.to_bytes(4, sys.byteorder))
    if sec_ctx is not None:
        ctx = sec_ctx.encode()
        c = ffi.new("struct xfrm_user_sec_ctx *")
        c.len = ffi.sizeof("struct xfrm_user_sec_ctx") + len(ctx)
        c.exttype = lib.XFRMA_SEC_CTX
        c.ctx_alg = c.ctx_doi = 1
        c.ctx_len = len(ctx)
        out += attr(lib.XFRMA_SEC_CTX, _cbytes(c) + ctx)
    return out


def _sa_info(sa: SA):
    p = ffi.new("struct xfrm_usersa_info *")
    _put_selector(p.sel, sa.selector)
    p.family = sa.family
    _put_addr(p.id.daddr, sa.family, sa.dst)
    _put_addr(p.saddr, sa.family, sa.src)
    p.id.spi = socket.htonl(sa.spi)
    p.id.proto = _number(_PROTOS, sa.proto)
    p.reqid, p.mode = sa.reqid, _number(_MODES, sa.mode)
    p.flags, p.replay_window = sa.flags, sa.replay_window
    p.curlft.bytes, p.curlft.packets = sa.bytes, sa.packets
    p.curlft.add_time, p.curlft.use_time = sa.add_time, sa.use_time
    lt = sa.lifetime
    if lt is None:
        for f in ("soft_byte_limit", "hard_byte_limit", "soft_packet_limit",
                  "hard_packet_limit"):
            setattr(p.lft, f, XFRM_INF)
    else:
        (p.lft.soft_byte_limit, p.lft.hard_byte_limit, p.lft.soft_packet_limit,
         p.lft.hard_packet_limit, p.lft.soft_add_expires_seconds,
         p.lft.hard_add_expires_seconds, p.lft.soft_use_expires_seconds,
         p.lft.hard_use_expires_seconds) = (
            lt.soft_bytes, lt.hard_bytes, lt.soft_packets, lt.hard_packets,
            lt.soft_add_seconds, lt.hard_add_seconds, lt.soft_use_seconds,
            lt.hard_use_seconds)
    return p


def _sa_attrs(sa: SA) -> bytes:
    out = b""
    for alg in sa.algorithms:
        type_, ctype, third = _ALG[alg.kind]
        a = ffi.new(ctype)
        name = alg.name.encode("ascii")
        if len(name) >= 64:
            raise ValueError(f"algorithm name {alg.name!r} longer than 63 bytes")
        a.alg_name = name
        a.alg_key_len = alg.key_bits
        if third:
            setattr(a, third, alg.icv_bits)
        out += attr(type_, _cbytes(a) + bytes((alg.key_bits + 7) // 8))
    if sa.encap is not None:
        e = ffi.new("struct xfrm_encap_tmpl *")
        e.encap_type = sa.encap.type
        e.encap_sport, e.encap_dport = socket.htons(sa.encap.sport), socket.htons(sa.encap.dport)
        _put_addr(e.encap_oa, sa.family, sa.encap.oa)
        out += attr(lib.XFRMA_ENCAP, _cbytes(e))
    if sa.esn:
        r = ffi.new("struct xfrm_replay_state_esn *")
        oseq, seq = sa.replay_seq or (0, 0)
        r.oseq, r.oseq_hi = oseq & 0xFFFFFFFF, oseq >> 32
        r.seq, r.seq_hi = seq & 0xFFFFFFFF, seq >> 32
        r.replay_window = sa.replay_window
        out += attr(lib.XFRMA_REPLAY_ESN_VAL, _cbytes(r))
    elif sa.replay_seq is not None:
        r = ffi.new("struct xfrm_replay_state *")
        r.oseq, r.seq = sa.replay_seq
        out += attr(lib.XFRMA_REPLAY_VAL, _cbytes(r))
    if sa.direction is not None:
        out += attr(XFRMA_SA_DIR, bytes([_number(_SA_DIRS, sa.direction)]))
    return out + _attrs_common(sa.mark, sa.if_id, sa.sec_ctx)


def encode_sa(sa: SA) -> bytes:
    """The XFRM_MSG_NEWSA payload of an SA (decode_sa's inverse)."""
    return _aligned(_cbytes(_sa_info(sa))) + _sa_attrs(sa)


def _tmpl(t: Template) -> bytes:
    c = ffi.new("struct xfrm_user_tmpl *")
    c.family = t.family
    _put_addr(c.id.daddr, t.family, t.dst)
    _put_addr(c.saddr, t.family, t.src)
    c.id.proto = _number(_PROTOS, t.proto)
    c.id.spi = socket.htonl(t.spi)
    c.reqid, c.mode, c.optional = t.reqid, _number(_MODES, t.mode), int(t.optional)
    c.aalgos = c.ealgos = c.calgos = 0xFFFFFFFF
    return _cbytes(c)


def _policy_info(pol: Policy):
    p = ffi.new("struct xfrm_userpolicy_info *")
    _put_selector(p.sel, pol.selector)
    for f in ("soft_byte_limit", "hard_byte_limit", "soft_packet_limit", "hard_packet_limit"):
        setattr(p.lft, f, XFRM_INF)
    p.priority, p.index = pol.priority, pol.index
    p.dir = _number(_DIRS, pol.dir)
    p.action = _number(_ACTIONS, pol.action)
    return p


def _policy_attrs(pol: Policy) -> bytes:
    out = b""
    if pol.templates:
        out += attr(lib.XFRMA_TMPL, b"".join(_tmpl(t) for t in pol.templates))
    return out + _attrs_common(pol.mark, pol.if_id, pol.sec_ctx)


def encode_policy(pol: Policy) -> bytes:
    """The XFRM_MSG_NEWPOLICY payload of a policy (decode_policy's inverse)."""
    return _aligned(_cbytes(_policy_info(pol))) + _policy_attrs(pol)


# ---- whole netlink messages ----

def message(msg_type: int, payload: bytes, *, flags: int = 0, seq: int = 0,
            pid: int = 0) -> bytes:
    """nlmsghdr + payload, padded to 4 bytes."""
    return struct.pack("=IHHII", NLMSG_HDRLEN + len(payload), msg_type, flags, seq, pid) + \
        _aligned(payload)


def newsa(sa: SA, *, update: bool = False) -> bytes:
    return message(lib.XFRM_MSG_UPDSA if update else lib.XFRM_MSG_NEWSA, encode_sa(sa))


def newpolicy(pol: Policy, *, update: bool = False) -> bytes:
    return message(lib.XFRM_MSG_UPDPOLICY if update else lib.XFRM_MSG_NEWPOLICY,
                   encode_policy(pol))


def delsa(sa: SA) -> bytes:
    """XFRM_MSG_DELSA as the kernel multicasts it: xfrm_usersa_id, XFRMA_SA, attributes."""
    i = ffi.new("struct xfrm_usersa_id *")
    _put_addr(i.daddr, sa.family, sa.dst)
    i.spi = socket.htonl(sa.spi)
    i.family = sa.family
    i.proto = _number(_PROTOS, sa.proto)
    payload = _aligned(_cbytes(i)) + attr(lib.XFRMA_SA, _cbytes(_sa_info(sa))) + _sa_attrs(sa)
    return message(lib.XFRM_MSG_DELSA, payload)


def delpolicy(pol: Policy) -> bytes:
    """XFRM_MSG_DELPOLICY as the kernel multicasts it: xfrm_userpolicy_id, XFRMA_POLICY,
    attributes."""
    i = ffi.new("struct xfrm_userpolicy_id *")
    _put_selector(i.sel, pol.selector)
    i.index = pol.index
    i.dir = _number(_DIRS, pol.dir)
    payload = _aligned(_cbytes(i)) + attr(lib.XFRMA_POLICY, _cbytes(_policy_info(pol))) + \
        _policy_attrs(pol)
    return message(lib.XFRM_MSG_DELPOLICY, payload)


def expire(sa: SA, *, hard: bool) -> bytes:
    """XFRM_MSG_EXPIRE: xfrm_user_expire (the state and the hard flag), mark and if_id."""
    e = ffi.new("struct xfrm_user_expire *")
    ffi.memmove(ffi.addressof(e.state), _cbytes(_sa_info(sa)),
                ffi.sizeof("struct xfrm_usersa_info"))
    e.hard = int(hard)
    return message(lib.XFRM_MSG_EXPIRE, _aligned(_cbytes(e)) +
                   _attrs_common(sa.mark, sa.if_id, None))


def polexpire(pol: Policy, *, hard: bool) -> bytes:
    """XFRM_MSG_POLEXPIRE: xfrm_user_polexpire, then the policy's attributes."""
    e = ffi.new("struct xfrm_user_polexpire *")
    ffi.memmove(ffi.addressof(e.pol), _cbytes(_policy_info(pol)),
                ffi.sizeof("struct xfrm_userpolicy_info"))
    e.hard = int(hard)
    return message(lib.XFRM_MSG_POLEXPIRE, _aligned(_cbytes(e)) + _policy_attrs(pol))


def flushsa(proto: int = 0) -> bytes:
    """XFRM_MSG_FLUSHSA: proto 0 or 255 (IPSEC_PROTO_ANY) flushes every SA."""
    f = ffi.new("struct xfrm_usersa_flush *")
    f.proto = proto
    return message(lib.XFRM_MSG_FLUSHSA, _cbytes(f))


def flushpolicy() -> bytes:
    return message(lib.XFRM_MSG_FLUSHPOLICY, b"")


def dump(sas: Iterable[SA] = (), policies: Iterable[Policy] = ()) -> bytes:
    """What SAD and SPD dumps deliver, as one buffer of NEWSA then NEWPOLICY messages."""
    return b"".join([newsa(s) for s in sas] + [newpolicy(p) for p in policies])


__all__ = ["attr", "delpolicy", "delsa", "dump", "encode_policy", "encode_sa", "expire",
           "flushpolicy", "flushsa", "message", "newpolicy", "newsa", "polexpire"]

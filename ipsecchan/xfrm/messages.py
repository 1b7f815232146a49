"""XFRM netlink messages decoded into plain records.

Fixed parts are read through cffi casts of the kernel's own structures (layouts fixed by the
compiler from <linux/xfrm.h>, csrc/build_native.py); attributes are walked by the
bounds-checked C walker. No key material is kept: only algorithm names and key sizes.

pyroute2 declares no XFRM messages (only the NETLINK_XFRM number), hence this module.
"""
from __future__ import annotations

import functools
import ipaddress
import socket
import struct
import sys
from dataclasses import dataclass

from ipsecchan._native import ffi, lib
from ipsecchan.netlink import NetlinkFormatError, split_attributes

PROTO_NAMES = {socket.IPPROTO_ESP: "esp", socket.IPPROTO_AH: "ah", 108: "comp"}
MODE_NAMES = {0: "transport", 1: "tunnel", 2: "ro", 3: "in_trigger", 4: "beet"}
# Directions as dumps show them: per-socket policies appear as dir + XFRM_POLICY_MAX (3).
DIR_NAMES = {0: "in", 1: "out", 2: "fwd", 3: "in-socket", 4: "out-socket", 5: "fwd-socket"}
ACTION_NAMES = {lib.XFRM_POLICY_ALLOW: "allow", lib.XFRM_POLICY_BLOCK: "block"}


# Linux 6.10's XFRMA_SA_DIR; older headers (Debian 12's) lack it, the number is fixed ABI.
XFRMA_SA_DIR = 40


class XfrmDecodeError(ValueError):
    """A message whose fixed part or an attribute is too short for what it must hold."""


@dataclass(frozen=True, slots=True)
class Selector:
    family: int
    src: str
    dst: str
    prefixlen_s: int
    prefixlen_d: int
    proto: int        # L4 protocol, 0 = any
    sport: int
    sport_mask: int
    dport: int
    dport_mask: int
    ifindex: int


@dataclass(frozen=True, slots=True)
class Algorithm:
    kind: str         # "aead", "crypt", "auth", "auth_trunc", "comp"
    name: str         # the kernel's crypto name, e.g. "rfc4106(gcm(aes))"
    key_bits: int     # includes the salt/nonce bits the kernel counts in the key (AEAD)
    icv_bits: int = 0  # AEAD ICV length, or truncated auth length; 0 when not applicable


@dataclass(frozen=True, slots=True)
class Encap:
    type: int         # UDP_ENCAP_ESPINUDP = 2
    sport: int
    dport: int
    oa: str


@dataclass(frozen=True, slots=True)
class Lifetime:
    """Configured limits (XFRM_INF = 2**64-1 means none) of an SA."""
    soft_bytes: int
    hard_bytes: int
    soft_packets: int
    hard_packets: int
    soft_add_seconds: int
    hard_add_seconds: int
    soft_use_seconds: int
    hard_use_seconds: int


@dataclass(frozen=True, slots=True)
class SA:
    src: str
    dst: str
    family: int
    proto: str
    spi: int
    reqid: int
    mode: str
    flags: int
    replay_window: int
    selector: Selector
    bytes: int
    packets: int
    add_time: int
    use_time: int
    algorithms: tuple[Algorithm, ...]
    encap: Encap | None
    mark: tuple[int, int] | None
    if_id: int | None
    esn: bool
    sec_ctx: str | None
    lifetime: Lifetime | None = None
    replay_seq: tuple[int, int] | None = None   # (outbound, inbound) sequence numbers
    direction: str | None = None                 # XFRMA_SA_DIR on kernels that have it

    @property
    def key(self) -> tuple[int, str, str, int]:
        """What names an SA in the SAD: (family, dst, proto, spi)."""
        return (self.family, self.dst, self.proto, self.spi)


@dataclass(frozen=True, slots=True)
class Template:
    family: int
    src: str
    dst: str
    proto: str
    spi: int          # 0 = any SA of the template
    reqid: int        # 0 = any
    mode: str
    optional: bool


@dataclass(frozen=True, slots=True)
class Policy:
    dir: str
    action: str
    priority: int
    index: int
    selector: Selector
    templates: tuple[Template, ...]
    mark: tuple[int, int] | None
    if_id: int | None
    sec_ctx: str | None

    @property
    def per_socket(self) -> bool:
        return self.dir.endswith("-socket")


def _addr(family: int, a) -> str:
    return _addr_text(family, bytes(ffi.buffer(ffi.addressof(a), 16)))


@functools.lru_cache(maxsize=65536)
def _addr_text(family: int, raw: bytes) -> str:
    # Cached: a busy SAD repeats a few addresses in every message, and ipaddress is slow.
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == socket.AF_INET6:
        return str(ipaddress.IPv6Address(raw))
    return "" if raw == bytes(16) else raw.hex()


def _fixed(payload, ctype: str):
    size = ffi.sizeof(ctype)
    if len(payload) < size:
        raise XfrmDecodeError(f"{ctype} needs {size} bytes, message has {len(payload)}")
    # Copy: netlink buffers carry no alignment promise for the 64-bit fields.
    buf = ffi.new("char[]", bytes(payload[:size]))
    return ffi.cast(ctype + " *", buf), buf, size


def _selector(sel) -> Selector:
    fam = sel.family
    return Selector(fam, _addr(fam, sel.saddr), _addr(fam, sel.daddr), sel.prefixlen_s,
                    sel.prefixlen_d, sel.proto, socket.ntohs(sel.sport),
                    socket.ntohs(sel.sport_mask), socket.ntohs(sel.dport),
                    socket.ntohs(sel.dport_mask), sel.ifindex)


def _name(chars) -> str:
    return ffi.string(chars).decode("ascii", "replace")


class _Attrs:
    """The attributes common to SA and policy messages."""

    def __init__(self, tail, family: int):
        self.algorithms: list[Algorithm] = []
        self.encap = self.mark = self.if_id = self.sec_ctx = None
        self.esn = False
        self.templates_raw = self.replay_seq = self.direction = None
        self.embedded = None
        for a in split_attributes(tail):
            t, v = a.type, a.value
            if t == lib.XFRMA_ALG_AEAD:
                p, _k, _ = _fixed(v, "struct xfrm_algo_aead")
                self.algorithms.append(Algorithm("aead", _name(p.alg_name), p.alg_key_len,
                                                 p.alg_icv_len))
            elif t in (lib.XFRMA_ALG_CRYPT, lib.XFRMA_ALG_AUTH, lib.XFRMA_ALG_COMP):
                p, _k, _ = _fixed(v, "struct xfrm_algo")
                kind = {lib.XFRMA_ALG_CRYPT: "crypt", lib.XFRMA_ALG_AUTH: "auth",
                        lib.XFRMA_ALG_COMP: "comp"}[t]
                self.algorithms.append(Algorithm(kind, _name(p.alg_name), p.alg_key_len))
            elif t == lib.XFRMA_ALG_AUTH_TRUNC:
                p, _k, _ = _fixed(v, "struct xfrm_algo_auth")
                self.algorithms.append(Algorithm("auth_trunc", _name(p.alg_name),
                                                 p.alg_key_len, p.alg_trunc_len))
            elif t == lib.XFRMA_ENCAP:
                p, _k, _ = _fixed(v, "struct xfrm_encap_tmpl")
                self.encap = Encap(p.encap_type, socket.ntohs(p.encap_sport),
                                   socket.ntohs(p.encap_dport), _addr(family, p.encap_oa))
            elif t == lib.XFRMA_MARK:
                p, _k, _ = _fixed(v, "struct xfrm_mark")
                self.mark = (p.v, p.m)
            elif t == lib.XFRMA_IF_ID:
                if len(v) < 4:
                    raise XfrmDecodeError("XFRMA_IF_ID shorter than 4 bytes")
                self.if_id = int.from_bytes(v[:4], sys.byteorder)   # host order
            elif t == lib.XFRMA_REPLAY_ESN_VAL:
                p, _k, _ = _fixed(v, "struct xfrm_replay_state_esn")
                self.esn = True
                self.replay_seq = ((p.oseq_hi << 32) | p.oseq, (p.seq_hi << 32) | p.seq)
            elif t == lib.XFRMA_REPLAY_VAL:
                p, _k, _ = _fixed(v, "struct xfrm_replay_state")
                self.replay_seq = (p.oseq, p.seq)
            elif t == XFRMA_SA_DIR:
                if len(v) < 1:
                    raise XfrmDecodeError("XFRMA_SA_DIR is empty")
                self.direction = {1: "in", 2: "out"}.get(v[0], str(v[0]))
            elif t in (lib.XFRMA_SA, lib.XFRMA_POLICY):
                self.embedded = v       # the full record inside a delete notification
            elif t == lib.XFRMA_SEC_CTX:
                p, _k, _ = _fixed(v, "struct xfrm_user_sec_ctx")
                hdr = ffi.sizeof("struct xfrm_user_sec_ctx")
                if len(v) < hdr + p.ctx_len:
                    raise XfrmDecodeError("XFRMA_SEC_CTX shorter than its ctx_len")
                self.sec_ctx = bytes(v[hdr:hdr + p.ctx_len]).rstrip(b"\0").decode(
                    "utf-8", "replace")
            elif t == lib.XFRMA_TMPL:
                self.templates_raw = v
            # Other attributes (lifetimes thresholds, offload, ...) are not needed yet: skipped.


def _fixed_and_attrs(payload, ctype: str, family_of):
    """The message's fixed struct, and its attributes decoded (in the struct's family)."""
    p, keep, size = _fixed(payload, ctype)
    try:
        return p, keep, _Attrs(payload[_aligned(size):], family_of(p))
    except NetlinkFormatError as exc:
        raise XfrmDecodeError(f"{ctype} attributes: {exc}") from None


def decode_sa(payload) -> SA:
    """Decode an XFRM_MSG_NEWSA payload (struct xfrm_usersa_info + attributes)."""
    p, _keep, attrs = _fixed_and_attrs(payload, "struct xfrm_usersa_info",
                                       lambda p: p.family)
    fam = p.family
    return SA(
        src=_addr(fam, p.saddr), dst=_addr(fam, p.id.daddr), family=fam,
        proto=PROTO_NAMES.get(p.id.proto, str(p.id.proto)), spi=socket.ntohl(p.id.spi),
        reqid=p.reqid, mode=MODE_NAMES.get(p.mode, str(p.mode)), flags=p.flags,
        replay_window=p.replay_window, selector=_selector(p.sel), bytes=p.curlft.bytes,
        packets=p.curlft.packets, add_time=p.curlft.add_time, use_time=p.curlft.use_time,
        algorithms=tuple(attrs.algorithms), encap=attrs.encap, mark=attrs.mark,
        if_id=attrs.if_id, esn=attrs.esn, sec_ctx=attrs.sec_ctx, lifetime=_lifetime(p.lft),
        replay_seq=attrs.replay_seq, direction=attrs.direction)


def _lifetime(lft) -> Lifetime:
    return Lifetime(lft.soft_byte_limit, lft.hard_byte_limit, lft.soft_packet_limit,
                    lft.hard_packet_limit, lft.soft_add_expires_seconds,
                    lft.hard_add_expires_seconds, lft.soft_use_expires_seconds,
                    lft.hard_use_expires_seconds)


def decode_policy(payload) -> Policy:
    """Decode an XFRM_MSG_NEWPOLICY payload (struct xfrm_userpolicy_info + attributes)."""
    p, _keep, attrs = _fixed_and_attrs(payload, "struct xfrm_userpolicy_info",
                                       lambda p: p.sel.family)
    return Policy(
        dir=DIR_NAMES.get(p.dir, str(p.dir)), action=ACTION_NAMES.get(p.action, str(p.action)),
        priority=p.priority, index=p.index, selector=_selector(p.sel),
        templates=tuple(decode_templates(attrs.templates_raw or b"")), mark=attrs.mark,
        if_id=attrs.if_id, sec_ctx=attrs.sec_ctx)


def decode_templates(raw) -> list[Template]:
    size = ffi.sizeof("struct xfrm_user_tmpl")
    if len(raw) % size:
        raise XfrmDecodeError(f"XFRMA_TMPL of {len(raw)} bytes is not a whole number of "
                              f"{size}-byte templates")
    out = []
    for off in range(0, len(raw), size):
        t, _keep, _ = _fixed(raw[off:off + size], "struct xfrm_user_tmpl")
        out.append(Template(t.family, _addr(t.family, t.saddr), _addr(t.family, t.id.daddr),
                            PROTO_NAMES.get(t.id.proto, str(t.id.proto)),
                            socket.ntohl(t.id.spi), t.reqid, MODE_NAMES.get(t.mode, str(t.mode)),
                            bool(t.optional)))
    return out


def _aligned(n: int) -> int:
    return (n + 3) & ~3


# ---- notifications (multicast groups SA, POLICY, EXPIRE, ACQUIRE) ----

@dataclass(frozen=True, slots=True)
class XfrmEvent:
    """One XFRM notification, decoded.

    kind: sa-new, sa-update, sa-delete, sa-expire, sa-flush, policy-new, policy-update,
    policy-delete, policy-expire, policy-flush, policy-default (the default policy changed:
    what applies to flows no policy matches), acquire. A hard expire means the kernel has
    removed the SA or policy (it sends no separate delete); a soft one marks it dying.
    sa-changes: SA notifications a watching index applied without an event each (its
    touched slots say whom they reach; see XfrmView.sa_events); `removed` holds the keys of
    the SAs they removed.
    """
    kind: str
    sa: SA | None = None
    sa_key: tuple[int, str, str, int] | None = None
    policy: Policy | None = None
    policy_key: tuple[str, int] | None = None     # (dir, index)
    hard: bool = False
    flush_proto: int = 0                          # 0 or 255 (IPSEC_PROTO_ANY): every SA
    acquire: tuple[str, str, Selector] | None = None   # (src, dst, selector) of an ACQUIRE
    removed: tuple = ()                           # sa-changes: keys of the SAs removed


def _sa_key_of(p) -> tuple[int, str, str, int]:
    fam = p.family
    return (fam, _addr(fam, p.daddr), PROTO_NAMES.get(p.proto, str(p.proto)),
            socket.ntohl(p.spi))


def _split_embedded(payload, fixed_ctype: str, family_of):
    """The fixed header, and the embedded full record (XFRMA_SA / XFRMA_POLICY) followed by
    the message's other attributes, which describe that record."""
    p, keep, size = _fixed(payload, fixed_ctype)
    tail = payload[_aligned(size):]
    try:
        attrs = split_attributes(tail)
    except NetlinkFormatError as exc:
        raise XfrmDecodeError(f"{fixed_ctype} attributes: {exc}") from None
    embedded, others = None, []
    for a in attrs:
        if a.type in (lib.XFRMA_SA, lib.XFRMA_POLICY) and embedded is None:
            embedded = bytes(a.value)
        else:
            others.append(struct.pack("=HH", 4 + len(a.value), a.type) + bytes(a.value)
                          + bytes(-len(a.value) % 4))
    return p, keep, embedded, b"".join(others)


def decode_event(msg_type: int, payload) -> XfrmEvent | None:
    """Decode one notification; None for message types the SAD/SPD view does not use."""
    if msg_type in (lib.XFRM_MSG_NEWSA, lib.XFRM_MSG_UPDSA):
        sa = decode_sa(payload)
        return XfrmEvent("sa-new" if msg_type == lib.XFRM_MSG_NEWSA else "sa-update", sa=sa,
                         sa_key=sa.key)
    if msg_type == lib.XFRM_MSG_DELSA:
        p, _keep, embedded, others = _split_embedded(payload, "struct xfrm_usersa_id",
                                                     lambda p: p.family)
        sa = None
        if embedded is not None:
            size = ffi.sizeof("struct xfrm_usersa_info")
            sa = decode_sa(embedded[:size] + bytes(-size % 4) + others)
        return XfrmEvent("sa-delete", sa=sa, sa_key=_sa_key_of(p))
    if msg_type == lib.XFRM_MSG_EXPIRE:
        p, _keep, size = _fixed(payload, "struct xfrm_user_expire")
        state = bytes(payload[:ffi.sizeof("struct xfrm_usersa_info")])
        sa = decode_sa(state)
        return XfrmEvent("sa-expire", sa=sa, sa_key=sa.key, hard=bool(p.hard))
    if msg_type == lib.XFRM_MSG_FLUSHSA:
        p, _keep, _ = _fixed(payload, "struct xfrm_usersa_flush")
        return XfrmEvent("sa-flush", flush_proto=p.proto)
    if msg_type in (lib.XFRM_MSG_NEWPOLICY, lib.XFRM_MSG_UPDPOLICY):
        pol = decode_policy(payload)
        kind = "policy-new" if msg_type == lib.XFRM_MSG_NEWPOLICY else "policy-update"
        return XfrmEvent(kind, policy=pol, policy_key=(pol.dir, pol.index))
    if msg_type == lib.XFRM_MSG_DELPOLICY:
        p, _keep, embedded, others = _split_embedded(payload, "struct xfrm_userpolicy_id",
                                                     lambda p: p.sel.family)
        pol = None
        if embedded is not None:
            size = ffi.sizeof("struct xfrm_userpolicy_info")
            pol = decode_policy(embedded[:size] + bytes(-size % 4) + others)
        index = pol.index if pol is not None else p.index
        direction = pol.dir if pol is not None else DIR_NAMES.get(p.dir, str(p.dir))
        return XfrmEvent("policy-delete", policy=pol, policy_key=(direction, index))
    if msg_type == lib.XFRM_MSG_POLEXPIRE:
        p, _keep, _ = _fixed(payload, "struct xfrm_user_polexpire")
        pol = decode_policy(bytes(payload[:ffi.sizeof("struct xfrm_userpolicy_info")]))
        return XfrmEvent("policy-expire", policy=pol, policy_key=(pol.dir, pol.index),
                         hard=bool(p.hard))
    if msg_type == lib.XFRM_MSG_FLUSHPOLICY:
        return XfrmEvent("policy-flush")
    if msg_type == lib.XFRM_MSG_ACQUIRE:
        p, _keep, _ = _fixed(payload, "struct xfrm_user_acquire")
        fam = p.sel.family
        return XfrmEvent("acquire", acquire=(_addr(fam, p.saddr), _addr(fam, p.id.daddr),
                                             _selector(p.sel)))
    return None

"""The SAD/SPD index in C (csrc/xfrm_index.c): ReferenceIndex's answers, fast.

Fed with raw XFRM netlink buffers (dump parts, multicast notifications); the C side checks
every length, keeps per SA and policy the lookup fields in compact form and a copy of its
message without key bytes, and answers lookups. The records handed back are decoded from
those copies by messages.decode_sa / decode_policy, so they equal what the reference model
(ipsecchan.xfrm.lookup.ReferenceIndex) holds for the same message stream.

Not thread-safe: one Index per thread, or a lock around it.
"""
from __future__ import annotations

import ipaddress
import time
from typing import Iterable, Mapping

from ipsecchan._native import ffi, lib
from ipsecchan.xfrm import encode
from ipsecchan.xfrm.lookup import (BLOCK, BYPASS, NO_POLICY, NO_SA, PROTECTED, Flow, Lookup,
                                   PathResult)
from ipsecchan.xfrm.messages import (MODE_NAMES, PROTO_NAMES, Policy, SA, _addr_text,
                                     decode_policy, decode_sa)

__all__ = ["Index", "IndexFormatError", "SARef", "FOLLOW_IN", "FOLLOW_ENTRY_BYTES", "KEEP",
           "MOVED", "INBOUND", "NEED", "SLOW", "TAG_MAX"]

# Index.revalidate's verdicts (see csrc/xfrm_index.h), and how many inbound SAs it follows.
KEEP, MOVED, INBOUND, NEED, SLOW = (lib.IPSECCHAN_XIDX_KEEP, lib.IPSECCHAN_XIDX_MOVED,
                                    lib.IPSECCHAN_XIDX_INBOUND, lib.IPSECCHAN_XIDX_NEED,
                                    lib.IPSECCHAN_XIDX_SLOW)
FOLLOW_IN = lib.IPSECCHAN_XIDX_FOLLOW_IN   # (the C header's; slots' handle stride - 1)
TAG_MAX = lib.IPSECCHAN_XIDX_TAG_MAX
FOLLOW_ENTRY_BYTES = ffi.sizeof("struct ipsecchan_xidx_follow")   # a followed flow's slot

_VERDICTS = {lib.IPSECCHAN_XIDX_PROTECTED: PROTECTED, lib.IPSECCHAN_XIDX_BYPASS: BYPASS,
             lib.IPSECCHAN_XIDX_BLOCK: BLOCK, lib.IPSECCHAN_XIDX_NO_POLICY: NO_POLICY,
             lib.IPSECCHAN_XIDX_NO_SA: NO_SA}

_ERRORS = {
    lib.IPSECCHAN_XIDX_ENETLINK: "malformed netlink header (nothing applied)",
    lib.IPSECCHAN_XIDX_ESHORT: "message or embedded record shorter than its structure",
    lib.IPSECCHAN_XIDX_EATTR: "malformed attribute stream",
    lib.IPSECCHAN_XIDX_EATTRLEN: "attribute shorter than its structure",
    lib.IPSECCHAN_XIDX_ETMPL: "XFRMA_TMPL is not a whole number of templates",
}


class IndexFormatError(ValueError):
    """A buffer the index rejected. `offset`: the byte offset of the bad header or attribute;
    `applied`: how many messages before it were applied (the rejected one changed nothing;
    a bad netlink header rejects the whole buffer)."""

    def __init__(self, code: int, offset: int, applied: int):
        self.code, self.offset, self.applied = code, offset, applied
        super().__init__(f"XFRM message rejected at offset {offset}: "
                         f"{_ERRORS.get(code, f'error {code}')} ({applied} applied before it)")


class SARef:
    """An SA of the index with the fields latching reads, taken from the C record's header
    without decoding its message (decode_sa costs tens of microseconds; a rekey of thousands
    of SAs would spend seconds there). Any other SA field is decoded from the index's copy on
    first use, while the record is current (LookupError once it is replaced or removed).

    prot_key names the SA's protection: (proto, mode, its algorithm attributes without keys,
    UDP encapsulation present); SAs with equal keys have equal latch.Protection."""
    __slots__ = ("handle", "key", "family", "dst", "src", "proto", "spi", "reqid", "mode",
                 "flags", "add_time", "sel_other", "prot_key", "_index", "_full")

    def full(self) -> SA:
        sa = self._full
        if sa is None:
            sa = self._full = self._index._sa(self.handle, strict=True)
        return sa

    def __getattr__(self, name):
        # Only for names that are not slots (SA fields not kept here).
        if name.startswith("_") or name not in SA.__dataclass_fields__:
            raise AttributeError(name)
        return getattr(self.full(), name)

    def __repr__(self) -> str:
        return f"SARef({self.key!r}, reqid={self.reqid}, src={self.src!r})"


_ADDRS: dict[str, bytes] = {}
_C_LOOKUP = lib.ipsecchan_xidx_lookup_flow
# Lookup is a frozen dataclass with slots: its __init__ sets each field through
# object.__setattr__; setting the slots directly builds the same object for less.
_new = object.__new__
_set_flow = Lookup.__dict__["flow"].__set__
_set_out = Lookup.__dict__["out"].__set__
_set_in = Lookup.__dict__["inbound"].__set__
_pr_direction, _pr_verdict, _pr_policy, _pr_per_socket, _pr_sas, _pr_cleartext = (
    PathResult.__dict__[f].__set__ for f in ("direction", "verdict", "policy", "per_socket",
                                             "sas", "cleartext_accepted"))
_EXPIRE, _FLUSHSA = lib.XFRM_MSG_EXPIRE, lib.XFRM_MSG_FLUSHSA
_PROTO_NUMBERS = {name: num for num, name in PROTO_NAMES.items()}
_IN_BLOCK = lib.IPSECCHAN_XIDX_DEFAULT_IN_BLOCK
_OUT_BLOCK = lib.IPSECCHAN_XIDX_DEFAULT_OUT_BLOCK


def _addr16(text: str) -> bytes:
    """An address as lookup._addr_int reads it, as 16 big-endian bytes (cached)."""
    b = _ADDRS.get(text)
    if b is None:
        b = int(ipaddress.ip_address(text)).to_bytes(16, "big") if text else bytes(16)
        if len(_ADDRS) >= 1 << 16:
            _ADDRS.clear()
        _ADDRS[text] = b
    return b


class Index:
    """The SAD and main SPD of one network namespace, and the kernel's lookup over them;
    the same interface and answers as lookup.ReferenceIndex."""

    def __init__(self, default_in: str = "accept", default_out: str = "accept"):
        ptr = lib.ipsecchan_xidx_new()
        if ptr == ffi.NULL:
            raise MemoryError("ipsecchan_xidx_new")
        self._x = ffi.gc(ptr, lib.ipsecchan_xidx_free)
        self.default_in = default_in
        self.default_out = default_out
        self._sa_cache: dict[int, SA] = {}
        # SARefs by handle: exact (apply_report drops the records it replaced or removed).
        self._refs: dict[int, SARef] = {}
        self._prot_keys: dict[tuple, tuple] = {}     # one object per distinct protection
        self._info = ffi.new("struct ipsecchan_xidx_sainfo *")
        self._prot_cap = 512
        self._prot = ffi.new("uint8_t[]", self._prot_cap)
        self._changes_cap = 0
        self._changes = None
        self._nchanges = ffi.new("size_t *")
        self._briefs: dict[bytes, tuple] = {}     # lookup_brief's, by answer words
        self._pol_cache: dict[int, Policy] = {}
        self._sock_cache: dict[Policy, bytes] = {}
        self._paths: dict = {}
        # Answers without per-socket policies, keyed by their words as bytes.
        self._answers: dict[bytes, tuple[PathResult, PathResult]] = {}
        self._limit = 4096
        self._cap = 256
        self._out = ffi.new("uint64_t[]", self._cap)
        self._outbuf = ffi.buffer(self._out)
        self._len = ffi.new("size_t *")
        self._bad = ffi.new("size_t *")
        self._applied = ffi.new("int64_t *")
        self._follow = None                          # the followed flows, made on first use
        self._verdicts_cap = 0
        self._watch_top = 0                          # watched slots are below this
        self._touched = ffi.new("uint32_t[]", 0)

    # -- lifecycle --
    def close(self) -> None:
        """Free the C side now (it is freed with the object otherwise)."""
        if self._x is not None:
            ffi.release(self._x)
            self._x = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- mutation --
    def apply(self, data, *, now: float | None = None) -> int:
        """Apply a buffer of netlink messages; returns how many were of the handled types
        (ReferenceIndex.apply's count). Raises IndexFormatError on a malformed message."""
        view = ffi.from_buffer(data)
        r = lib.ipsecchan_xidx_apply(self._x, view, len(view),
                                     time.time() if now is None else now,
                                     self._bad, self._applied)
        if r < 0:
            if r == lib.IPSECCHAN_XIDX_ENOMEM:
                raise MemoryError("XFRM index: out of memory")
            raise IndexFormatError(r, self._bad[0], self._applied[0])
        return r

    def load(self, sas: Iterable[SA], policies: Iterable[Policy], *,
             now: float | None = None) -> None:
        """Replace the whole view by a fresh dump (encoded, then applied)."""
        data = encode.dump(sas, policies)
        self.clear()
        self.apply(data, now=now)

    def apply_report(self, data, *, now: float | None = None):
        """apply(), also saying what each message did: returns (count, changes, n, gone):
        changes are n `struct ipsecchan_xidx_change` (valid until the next call); gone holds
        the SARefs of records replaced or removed, by old handle (forgotten by the index)."""
        view = ffi.from_buffer(data)
        need = len(view) // 16 + 1
        if need > self._changes_cap:
            self._changes_cap = max(need, 2 * self._changes_cap, 64)
            self._changes = ffi.new("struct ipsecchan_xidx_change[]", self._changes_cap)
        changes = self._changes
        r = lib.ipsecchan_xidx_apply_report(self._x, view, len(view),
                                            time.time() if now is None else now, self._bad,
                                            self._applied, changes, self._changes_cap,
                                            self._nchanges)
        n = self._nchanges[0]
        refs = self._refs
        if n:
            # Answers name records by handle; after a change they are rebuilt on demand (the
            # cache serves the many latches looked at in one round, and holds no stale SA).
            self._briefs.clear()
        gone = {}
        for i in range(n):
            c = changes[i]
            old = c.old_handle
            if old:
                ref = refs.pop(old, None)
                if ref is not None:
                    gone[old] = ref
            elif c.type == _EXPIRE and c.handle:
                refs.pop(c.handle, None)     # marked dying in place: its answers change
            elif c.type == _FLUSHSA:
                gone.update(refs)
                refs.clear()
        if r < 0:
            if r == lib.IPSECCHAN_XIDX_ENOMEM:
                raise MemoryError("XFRM index: out of memory")
            raise IndexFormatError(r, self._bad[0], self._applied[0])
        return r, changes, n, gone

    def sa_ref(self, h: int) -> SARef:
        """The SARef of a current record (LookupError for a stale handle)."""
        ref = self._refs.get(h)
        if ref is not None:
            return ref
        info = self._info
        while True:
            if lib.ipsecchan_xidx_sa_info(self._x, h, info, self._prot, self._prot_cap) < 0:
                raise LookupError(f"SA handle {h:#x} is stale")
            if info.prot_len <= self._prot_cap:
                break
            self._prot_cap = 2 * info.prot_len
            self._prot = ffi.new("uint8_t[]", self._prot_cap)
        fam = info.family
        ref = _new(SARef)
        ref.handle = h
        ref.family = fam
        ref.dst = dst = _addr_text(fam, ffi.unpack(info.dst, 16))
        ref.src = _addr_text(fam, ffi.unpack(info.src, 16))
        ref.proto = proto = PROTO_NAMES.get(info.proto) or str(info.proto)
        ref.spi = spi = info.spi
        ref.key = (fam, dst, proto, spi)
        ref.reqid = info.reqid
        ref.mode = mode = MODE_NAMES.get(info.mode) or str(info.mode)
        ref.flags = info.flags
        ref.add_time = info.add_time
        ref.sel_other = bool(info.sel_other)
        pk = (proto, mode, ffi.buffer(self._prot, info.prot_len)[:], bool(info.encap))
        ref.prot_key = self._prot_keys.setdefault(pk, pk)
        ref._index = self
        ref._full = None
        refs = self._refs
        if len(refs) > 2 * lib.ipsecchan_xidx_sa_count(self._x) + 1024:
            refs.clear()                     # not expected (removals are reported): bound it
        if len(self._prot_keys) > 4096:
            self._prot_keys.clear()
        refs[h] = ref
        return ref

    # -- class tags and followed flows --
    # Revalidating thousands of latches after a rekey takes one C call: each latch's flow is
    # looked up and its SAs' class tags compared there, and only what C cannot settle comes
    # back to Python (ipsecchan_xfollow_revalidate; the latch engine keeps the Python
    # judgement as the reference and as the path for everything else).
    def set_tag(self, handle: int, tag: int) -> bool:
        """Label a current SA record with a class tag (False: the handle is stale)."""
        return lib.ipsecchan_xidx_sa_set_tag(self._x, handle, tag) == 0

    def clear_tags(self) -> None:
        lib.ipsecchan_xidx_clear_tags(self._x)

    def _follows(self):
        if self._follow is None:
            ptr = lib.ipsecchan_xfollow_new()
            if ptr == ffi.NULL:
                raise MemoryError("ipsecchan_xfollow_new")
            self._follow = ffi.gc(ptr, lib.ipsecchan_xfollow_free)
            self._entry = ffi.new("struct ipsecchan_xidx_follow *")
        return self._follow

    def follow(self, slot: int, flow: Flow, tag: int, out_key: tuple, out_reqid: int,
               in_keys) -> None:
        """Follow a flow in `slot`: its SAs must carry `tag`, and those carrying it now have
        these keys ((family, dst, proto, spi), as SARef.key). ValueError for what C cannot
        follow (more than FOLLOW_IN inbound SAs, an unknown protocol or family)."""
        table = self._follows()
        e = self._entry
        if len(in_keys) > lib.IPSECCHAN_XIDX_FOLLOW_IN:
            raise ValueError("too many inbound SAs to follow in C")
        f = e.flow
        f.local = _ADDRS.get(flow.local) or _addr16(flow.local)
        f.remote = _ADDRS.get(flow.remote) or _addr16(flow.remote)
        f.mark, f.if_id, f.ifindex = flow.mark, flow.if_id, flow.ifindex
        f.family, f.local_port, f.remote_port, f.proto = (flow.family, flow.local_port,
                                                         flow.remote_port, flow.proto)
        e.tag = tag
        e.nin = len(in_keys)
        self._key(e.out, out_key, out_reqid)
        ins = getattr(e, "in")                     # (a Python keyword)
        for i, k in enumerate(in_keys):
            self._key(ins[i], k, 0)
        r = lib.ipsecchan_xfollow_set(table, slot, e)
        if r == lib.IPSECCHAN_XIDX_ENOMEM:
            raise MemoryError("XFRM index: out of memory")
        if r < 0:
            raise ValueError(f"cannot follow slot {slot} (error {r})")

    @staticmethod
    def _key(k, key: tuple, reqid: int) -> None:
        family, dst, proto, spi = key
        num = _PROTO_NUMBERS.get(proto)
        if num is None or family not in (2, 10):
            raise ValueError(f"cannot follow SA {key!r} in C")
        k.dst = _ADDRS.get(dst) or _addr16(dst)
        k.spi, k.reqid, k.family, k.proto = spi, reqid, family, num

    def unfollow(self, slot: int) -> None:
        if self._follow is not None:
            lib.ipsecchan_xfollow_drop(self._follow, slot)

    def followed(self, slot: int) -> tuple | None:
        """(tag, OUT key, OUT reqid, IN keys) that slot follows now; None when none."""
        if self._follow is None:
            return None
        e = ffi.new("struct ipsecchan_xidx_follow *")
        if lib.ipsecchan_xfollow_get(self._follow, slot, e) < 0 or not e.tag:
            return None

        def key(k):
            value = int.from_bytes(ffi.unpack(k.dst, 16), "big")
            addr = ipaddress.IPv4Address(value) if k.family == 2 else \
                ipaddress.IPv6Address(value)
            return (k.family, str(addr), PROTO_NAMES.get(k.proto), k.spi)
        ins = getattr(e, "in")
        return (e.tag, key(e.out), e.out.reqid, tuple(key(ins[i]) for i in range(e.nin)))

    # -- watched flows --
    # Which latches a burst of SA notifications touched, marked by the index as it applies
    # them (ipsecchan_xidx_watch): no Python event per notification.
    def watch(self, slot: int, flow: Flow) -> None:
        """Watch `slot`'s flow: SA changes naming its peer mark it (see touched()).
        ValueError for a family the index does not know."""
        r = lib.ipsecchan_xidx_watch(self._x, slot, flow.family,
                                     _ADDRS.get(flow.remote) or _addr16(flow.remote))
        if r == lib.IPSECCHAN_XIDX_ENOMEM:
            raise MemoryError("XFRM index: out of memory")
        if r < 0:
            raise ValueError(f"cannot watch slot {slot} (family {flow.family})")
        if slot >= self._watch_top:
            self._watch_top = slot + 1

    def unwatch(self, slot: int) -> None:
        lib.ipsecchan_xidx_unwatch(self._x, slot)

    def touched(self) -> list[int] | None:
        """The watched slots SA changes marked since the last call (each once); None: every
        slot (a flush, a rebuild, many tunnel selectors)."""
        if len(self._touched) < self._watch_top:
            self._touched = ffi.new("uint32_t[]", max(self._watch_top, 2 * len(self._touched)))
        n = lib.ipsecchan_xidx_take_touched(self._x, self._touched, len(self._touched))
        return None if n < 0 else ffi.unpack(self._touched, n)

    def watch_memory_bytes(self) -> int:
        return lib.ipsecchan_xidx_watch_memory(self._x)

    def follow_memory_bytes(self) -> int:
        return 0 if self._follow is None else lib.ipsecchan_xfollow_memory(self._follow)

    def set_tags(self, handles: list[int], tags: list[int]) -> list[bool]:
        """set_tag for many records in one call."""
        n = len(handles)
        done = ffi.new("uint8_t[]", n)
        lib.ipsecchan_xidx_set_tags(self._x, handles, tags, n, done)
        return [bool(d) for d in ffi.unpack(done, n)]

    def revalidate(self, slots: list[int]) -> tuple[bytes, bytes, list[int]]:
        """Judge the followed flows of `slots` against the index now: (codes, nsas, handles)
        with, per slot i, its code (KEEP ... SLOW) and nsas[i] SA handles from
        handles[i * (1 + FOLLOW_IN)]."""
        table = self._follows()
        n = len(slots)
        stride = 1 + FOLLOW_IN
        if n > self._verdicts_cap:
            self._verdicts_cap = cap = max(n, 2 * self._verdicts_cap, 64)
            self._codes = ffi.new("uint8_t[]", cap)
            self._nsas = ffi.new("uint8_t[]", cap)
            self._vhandles = ffi.new("uint64_t[]", cap * stride)
        defaults = (_IN_BLOCK if self.default_in == "block" else 0) \
            | (_OUT_BLOCK if self.default_out == "block" else 0)
        lib.ipsecchan_xfollow_revalidate(table, self._x, ffi.new("uint32_t[]", slots), n,
                                         defaults, self._codes, self._nsas, self._vhandles)
        return (ffi.buffer(self._codes, n)[:], ffi.buffer(self._nsas, n)[:],
                ffi.unpack(self._vhandles, n * stride))

    def clear(self) -> None:
        lib.ipsecchan_xidx_clear(self._x)
        self._refs.clear()
        self._briefs.clear()
        self._paths.clear()
        self._answers.clear()
        self._sa_cache.clear()
        self._pol_cache.clear()

    # -- views --
    def _sa(self, h: int, strict: bool = False) -> SA:
        sa = self._sa_cache.get(h)
        if sa is None:
            ptr = lib.ipsecchan_xidx_sa_message(self._x, h, self._len)
            if strict and ptr == ffi.NULL:
                raise LookupError(f"SA handle {h:#x} is stale")
            sa = decode_sa(bytes(ffi.buffer(ptr, self._len[0])))
            if len(self._sa_cache) > 2 * lib.ipsecchan_xidx_sa_count(self._x) + 1024:
                self._sa_cache.clear()       # stale handles: start over
            self._sa_cache[h] = sa
        return sa

    def _policy(self, h: int) -> Policy:
        pol = self._pol_cache.get(h)
        if pol is None:
            ptr = lib.ipsecchan_xidx_policy_message(self._x, h, self._len)
            pol = decode_policy(bytes(ffi.buffer(ptr, self._len[0])))
            if len(self._pol_cache) > 2 * lib.ipsecchan_xidx_policy_count(self._x) + 1024:
                self._pol_cache.clear()
            self._pol_cache[h] = pol
        return pol

    def sas(self) -> list[SA]:
        """Every SA, in insertion order (an update keeps the SA's place)."""
        n = lib.ipsecchan_xidx_sa_count(self._x)
        buf = ffi.new("uint64_t[]", n + 1)
        n = lib.ipsecchan_xidx_sa_handles(self._x, buf, n + 1)
        return [self._sa(h) for h in ffi.unpack(buf, n)]

    def policies(self) -> list[Policy]:
        n = lib.ipsecchan_xidx_policy_count(self._x)
        buf = ffi.new("uint64_t[]", n + 1)
        n = lib.ipsecchan_xidx_policy_handles(self._x, buf, n + 1)
        return sorted((self._policy(h) for h in ffi.unpack(buf, n)),
                      key=lambda p: (p.dir, p.index))

    def __len__(self) -> int:
        return lib.ipsecchan_xidx_sa_count(self._x) + lib.ipsecchan_xidx_policy_count(self._x)

    def memory_bytes(self) -> int:
        """Bytes the C side holds (malloc'd blocks, with their headers)."""
        return lib.ipsecchan_xidx_memory(self._x)

    # -- lookup --
    def _sock(self, pol: Policy | None):
        if pol is None:
            return ffi.NULL, 0
        raw = self._sock_cache.get(pol)
        if raw is None:
            if len(self._sock_cache) > 1024:
                self._sock_cache.clear()
            raw = self._sock_cache[pol] = encode.encode_policy(pol)
        return raw, len(raw)

    def lookup(self, flow: Flow, socket_policies: Mapping[str, Policy] | None = None
               ) -> Lookup:
        if socket_policies:
            return self._lookup_sock(flow, socket_policies)
        # The common case, kept short: one C call, then the answer's words (handles name
        # immutable records) as the key of the cached pair of paths.
        n = self._words(flow)
        if n < 0 or n > self._cap:
            return self._lookup_sock(flow, None)
        key = self._outbuf[:n * 8]
        pair = self._answers.get(key)
        if pair is None:
            pair = self._pair(key, n)
        res = _new(Lookup)
        _set_flow(res, flow)
        _set_out(res, pair[0])
        _set_in(res, pair[1])
        return res

    def _words(self, flow: Flow) -> int:
        """The C lookup without per-socket policies, its answer in self._out; returns its
        length in words (more than self._cap: did not fit)."""
        local, remote = flow.local, flow.remote
        la = _ADDRS.get(local) or _addr16(local)
        ra = _ADDRS.get(remote) or _addr16(remote)
        defaults = (_IN_BLOCK if self.default_in == "block" else 0) \
            | (_OUT_BLOCK if self.default_out == "block" else 0)
        return _C_LOOKUP(self._x, flow.family, flow.proto, la, flow.local_port, ra,
                         flow.remote_port, flow.mark, flow.ifindex, flow.if_id, defaults,
                         self._out, self._cap)

    def lookup_brief(self, flow: Flow) -> tuple[str, tuple, str, tuple, bool]:
        """What latching reads of lookup(flow), without per-socket policies: (OUT verdict, OUT
        SAs, IN verdict, IN SAs, IN accepts cleartext), the SAs as SARefs. Latching asks it
        for every latch touched by a change; nothing is decoded and no PathResult is built."""
        n = self._words(flow)
        if n < 0 or n > self._cap:
            # More SAs than the answer buffer holds: the general path grows it.
            self._lookup_sock(flow, None)
            return self.lookup_brief(flow)
        key = self._outbuf[:n * 8]
        brief = self._briefs.get(key)
        if brief is None:
            briefs = self._briefs
            if len(briefs) >= 1024:
                # The cache serves the many latches sharing SAs within a round; a round over
                # thousands of SA pairs gains nothing from it and would only hold memory.
                briefs.clear()
            v = ffi.unpack(self._out, n)
            k = 4 + v[3]
            sa_ref = self.sa_ref
            brief = briefs[key] = (_VERDICTS[v[0]], tuple([sa_ref(h) for h in v[4:k]]),
                                   _VERDICTS[v[k]], tuple([sa_ref(h) for h in v[k + 4:]]),
                                   bool(v[k + 2] & 2))
        return brief

    def _pair(self, key: bytes, n: int) -> tuple[PathResult, PathResult]:
        """The paths of an answer (key: its words as bytes) not seen before as a whole."""
        if len(self._answers) > self._limit:
            # Stale handles accumulate: bound the caches by the index's size.
            self._limit = 4 * len(self) + 4096
            if len(self._answers) > self._limit:
                self._answers.clear()
        v = ffi.unpack(self._out, n)
        k = 4 + v[3]
        pair = self._answers[key] = (self._mkpath("out", v[:k]), self._mkpath("in", v[k:]))
        return pair

    def _mkpath(self, direction: str, words: list[int]) -> PathResult:
        verdict, ph, flags = words[0], words[1], words[2]
        res = _new(PathResult)
        _pr_direction(res, direction)
        _pr_verdict(res, _VERDICTS[verdict])
        _pr_policy(res, self._policy(ph) if ph else None)
        _pr_per_socket(res, bool(flags & 1))
        sa = self._sa
        _pr_sas(res, tuple([sa(h) for h in words[4:]]))
        _pr_cleartext(res, bool(flags & 2))
        return res

    def _lookup_sock(self, flow: Flow, socket_policies: Mapping[str, Policy] | None
                     ) -> Lookup:
        so = si = None
        so_raw = si_raw = ffi.NULL
        so_len = si_len = 0
        if socket_policies:
            so, si = socket_policies.get("out"), socket_policies.get("in")
            so_raw, so_len = self._sock(so)
            si_raw, si_len = self._sock(si)
        defaults = (lib.IPSECCHAN_XIDX_DEFAULT_IN_BLOCK if self.default_in == "block" else 0) \
            | (lib.IPSECCHAN_XIDX_DEFAULT_OUT_BLOCK if self.default_out == "block" else 0)
        while True:
            n = lib.ipsecchan_xidx_lookup(
                self._x, flow.family, flow.proto, _addr16(flow.local), flow.local_port,
                _addr16(flow.remote), flow.remote_port, flow.mark, flow.ifindex, flow.if_id,
                so_raw, so_len, si_raw, si_len, defaults, self._out, self._cap)
            if n < 0:
                if n == lib.IPSECCHAN_XIDX_ENOMEM:
                    raise MemoryError("XFRM index: out of memory")
                raise ValueError(f"malformed per-socket policy (error {n})")
            if n <= self._cap:
                break
            self._cap = max(n, 2 * self._cap)
            self._out = ffi.new("uint64_t[]", self._cap)
            self._outbuf = ffi.buffer(self._out)
        v = ffi.unpack(self._out, n)
        k = 4 + v[3]
        # A path is named by its answer words (handles name immutable records): cache it.
        paths = self._paths
        key_out = ("out", tuple(v[:k]), so if v[1] == 1 else None)
        key_in = ("in", tuple(v[k:]), si if v[k + 1] == 1 else None)
        out = paths.get(key_out)
        if out is None:
            out = self._path(key_out)
        inbound = paths.get(key_in)
        if inbound is None:
            inbound = self._path(key_in)
        return Lookup(flow, out, inbound)

    def _path(self, key) -> PathResult:
        direction, (verdict, ph, flags, n, *handles), sock = key
        pol = None if ph == 0 else sock if ph == lib.IPSECCHAN_XIDX_SOCKET_POLICY \
            else self._policy(ph)
        res = PathResult(direction, _VERDICTS[verdict], pol, bool(flags & 1),
                         tuple([self._sa(h) for h in handles]), bool(flags & 2))
        if len(self._paths) > 4 * len(self) + 4096:
            self._paths.clear()
        self._paths[key] = res
        return res

"""Netlink framing on top of the bounds-checked C walker (csrc/nlmsg.c).

Messages and attributes come back as views into the caller's buffer; nothing is copied and
no length field is trusted.
"""
from __future__ import annotations

from dataclasses import dataclass

from ipsecchan._native import ffi, lib

__all__ = ["NetlinkFormatError", "NetlinkMessage", "Attribute", "split_messages",
           "split_attributes"]

_ERRORS = {
    lib.IPSECCHAN_NL_ETRUNC: "truncated header",
    lib.IPSECCHAN_NL_ESHORT: "length field smaller than its header",
    lib.IPSECCHAN_NL_EOVER: "length field runs past the end of the buffer",
}


class NetlinkFormatError(ValueError):
    """A netlink buffer that does not parse; `offset` is where the bad header starts."""

    def __init__(self, what: str, offset: int, kind: str):
        super().__init__(f"malformed netlink {what} at offset {offset}: {kind}")
        self.offset = offset
        self.kind = kind


@dataclass(frozen=True, slots=True)
class NetlinkMessage:
    type: int
    flags: int
    seq: int
    pid: int
    payload: memoryview


@dataclass(frozen=True, slots=True)
class Attribute:
    type: int
    nested: bool
    net_byteorder: bool
    value: memoryview


def _split(fn, spantype: str, hdr_size: int, data, what: str):
    view = memoryview(data).cast("B")
    # Each item takes at least a header, so this many spans always suffice.
    capacity = max(1, len(view) // hdr_size)
    spans = ffi.new(f"{spantype}[]", capacity)
    bad = ffi.new("size_t *")
    n = fn(ffi.from_buffer(view), len(view), spans, capacity, bad)
    if n < 0:
        raise NetlinkFormatError(what, bad[0], _ERRORS.get(n, f"error {n}"))
    return view, spans, n


def split_messages(data) -> list[NetlinkMessage]:
    """Split a received netlink datagram into its messages."""
    hdr = ffi.sizeof("struct nlmsghdr")
    view, spans, n = _split(lib.ipsecchan_nl_split, "struct ipsecchan_nlspan", hdr, data,
                            "message")
    return [NetlinkMessage(s.type, s.flags, s.seq, s.pid,
                           view[s.offset + hdr:s.offset + s.len])
            for s in (spans[i] for i in range(n))]


def split_attributes(data) -> list[Attribute]:
    """Split a stream of netlink attributes (the tail of a message, or a nested attribute)."""
    view, spans, n = _split(lib.ipsecchan_nla_split, "struct ipsecchan_attrspan",
                            ffi.sizeof("struct nlattr"), data, "attribute")
    return [Attribute(s.type, bool(s.flags & 0x8000), bool(s.flags & 0x4000),
                      view[s.offset:s.offset + s.len])
            for s in (spans[i] for i in range(n))]

"""Netlink framing on top of the bounds-checked C walker (csrc/nlmsg.c).

Messages and attributes come back as views into the caller's buffer; nothing is copied and
no length field is trusted.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

from ipsecchan._native import ffi, lib

__all__ = ["NetlinkFormatError", "NetlinkMessage", "Attribute", "split_messages",
           "split_attributes", "dump"]

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


NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLM_F_DUMP_INTR = 0x10
NLMSG_ERROR = 2
NLMSG_DONE = 3
DUMP_RECV_BUFFER = 1 << 20
DUMP_RETRIES = 5


def dump(protocol: int, msg_type: int, request: bytes, expect: int,
         error: type[OSError] = OSError, what: str = "netlink") -> list[bytes]:
    """The payloads of every `expect` message a netlink dump answers, read whole or not at
    all: an error (in NLMSG_ERROR, or in NLMSG_DONE for a dump that fails part-way) raises
    `error(errno, text)`, and a dump the kernel marks interrupted (NLM_F_DUMP_INTR: the table
    changed under it) is taken again, up to DUMP_RETRIES times."""
    seq = 1
    for _attempt in range(DUMP_RETRIES):
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol) as s:
            s.bind((0, 0))
            s.send(struct.pack("=IHHII", 16 + len(request), msg_type,
                               NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + request)
            payloads, interrupted, done = [], False, False
            while not done:
                data = s.recv(DUMP_RECV_BUFFER)
                if not data:
                    raise error(errno.EIO, f"{what} socket closed during a dump")
                for m in split_messages(data):
                    if m.seq != seq:
                        continue
                    interrupted |= bool(m.flags & NLM_F_DUMP_INTR)
                    if m.type in (NLMSG_DONE, NLMSG_ERROR):
                        code = (-struct.unpack_from("=i", m.payload)[0]
                                if len(m.payload) >= 4
                                else (0 if m.type == NLMSG_DONE else errno.EIO))
                        if code:
                            raise error(code, f"{what} dump: {os.strerror(code)}")
                        if m.type == NLMSG_DONE:
                            done = True
                            break
                    elif m.type == expect:
                        payloads.append(bytes(m.payload))
        if not interrupted:
            return payloads
        seq += 1
    raise error(errno.EAGAIN, f"{what} dump interrupted {DUMP_RETRIES} times in a row")

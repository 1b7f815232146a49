"""The C netlink walker (csrc/nlmsg.c) through its Python wrapper."""
import struct

import pytest
from hypothesis import given, strategies as st

from ipsecchan._native import ffi
from ipsecchan.netlink import NetlinkFormatError, split_attributes, split_messages


def msg(mtype, payload, seq=1, pid=0, flags=0, pad=True):
    body = struct.pack("=IHHII", 16 + len(payload), mtype, flags, seq, pid) + payload
    return body + b"\0" * ((-len(body)) % 4 if pad else 0)


def attr(atype, value):
    body = struct.pack("=HH", 4 + len(value), atype) + value
    return body + b"\0" * ((-len(body)) % 4)


def test_xfrm_layouts_come_from_the_kernel_header():
    # Sizes the kernel ABI fixes (x86_64 and every 64-bit Linux): checked by the compiler
    # against <linux/xfrm.h>, so a hand-written mistake could not build.
    assert ffi.sizeof("struct xfrm_userpolicy_info") == 168
    assert ffi.sizeof("struct xfrm_user_tmpl") == 64
    assert ffi.sizeof("struct xfrm_usersa_info") == 224
    assert ffi.offsetof("struct xfrm_usersa_info", "reqid") == 208


def test_split_messages_and_attributes():
    payload = b"\x01\x02\x03" + attr(5, b"abcd") + attr(0x8000 | 7, attr(1, b"x"))
    data = msg(16, b"hello") + msg(17, payload, seq=9, pid=42)
    m1, m2 = split_messages(data)
    assert (m1.type, bytes(m1.payload)) == (16, b"hello")
    assert (m2.type, m2.seq, m2.pid, bytes(m2.payload)) == (17, 9, 42, payload)
    a, nested = split_attributes(bytes(m2.payload)[3:])
    assert (a.type, bytes(a.value), a.nested) == (5, b"abcd", False)
    assert (nested.type, nested.nested) == (7, True)
    (inner,) = split_attributes(nested.value)
    assert (inner.type, bytes(inner.value)) == (1, b"x")


def test_last_message_without_padding():
    (m,) = split_messages(msg(16, b"abc", pad=False))
    assert bytes(m.payload) == b"abc"


@pytest.mark.parametrize("data,kind,offset", [
    (b"\x10\x00\x00", "truncated header", 0),
    (struct.pack("=IHHII", 8, 1, 0, 0, 0), "smaller than its header", 0),
    (struct.pack("=IHHII", 64, 1, 0, 0, 0), "past the end", 0),
    (msg(1, b"ok") + struct.pack("=IHHII", 0xFFFFFFFF, 1, 0, 0, 0), "past the end", 20),
    (msg(1, b"ok") + b"\x01", "truncated header", 20),
])
def test_bad_messages_are_rejected_with_where_and_why(data, kind, offset):
    with pytest.raises(NetlinkFormatError, match=kind) as err:
        split_messages(data)
    assert err.value.offset == offset


def test_bad_attribute_lengths():
    with pytest.raises(NetlinkFormatError, match="past the end"):
        split_attributes(struct.pack("=HH", 200, 1) + b"x" * 8)
    with pytest.raises(NetlinkFormatError, match="smaller"):
        split_attributes(struct.pack("=HH", 2, 1))


@given(st.binary(max_size=512))
def test_garbage_never_yields_spans_outside_the_buffer(data):
    for split in (split_messages, split_attributes):
        try:
            items = split(data)
        except NetlinkFormatError:
            continue
        for item in items:
            view = getattr(item, "payload", None) or getattr(item, "value", None)
            # memoryview slices of the input: they cannot reach past it, check the lengths
            assert view is None or len(view) <= len(data)

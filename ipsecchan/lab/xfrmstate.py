"""The kernel's SAs as `ip -s xfrm state` prints them.

The lab reads the kernel through iproute2 on purpose: it is the oracle that ipsecchan's own
XFRM code is tested against, so it must not share that code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class XfrmState:
    src: str
    dst: str
    proto: str
    spi: int
    reqid: int
    mode: str
    bytes: int
    packets: int


_HEAD = re.compile(r"^src (\S+) dst (\S+)$")
_ID = re.compile(r"^proto (\S+) spi 0x([0-9a-f]+)(?:\(\d+\))? reqid (\d+)(?:\(0x[0-9a-f]+\))? "
                 r"mode (\S+)")
_CUR = re.compile(r"^(\d+)\(bytes\), (\d+)\(packets\)$")


def parse_xfrm_states(text: str) -> list[XfrmState]:
    """Parse `ip -s xfrm state` output. Raises ValueError on an SA block it cannot read."""
    blocks: list[list[str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if not raw[0].isspace():
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line)
    out = []
    for block in blocks:
        head = _HEAD.match(block[0])
        ident = next((m for m in map(_ID.match, block[1:]) if m), None)
        counters = None
        for i, line in enumerate(block):
            if line == "lifetime current:" and i + 1 < len(block):
                counters = _CUR.match(block[i + 1])
        if not (head and ident and counters):
            raise ValueError("cannot read this SA from `ip -s xfrm state`:\n" + "\n".join(block))
        out.append(XfrmState(src=head[1], dst=head[2], proto=ident[1], spi=int(ident[2], 16),
                             reqid=int(ident[3]), mode=ident[4], bytes=int(counters[1]),
                             packets=int(counters[2])))
    return out

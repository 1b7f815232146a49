"""Which latches an event can affect: indexed, so that an SA rekey on a gateway with many
connections re-checks the few latches it touches, not all of them.

Sans-IO like the machine: the caller registers each latch's flow and the SAs it is latched to,
and asks, for each XFRM or IKE event, which latches to observe again.

  SA added, updated, deleted, expiring  -> latches with the SA's peer address (either end of
                                           the SA: the SA's dst for OUT, its src for IN), and
                                           latches on that SA key
  policy added, updated, deleted        -> latches whose flow the policy's selector covers:
                                           checked once per peer address, not per latch
  SA or policy flush, resync            -> every latch
  IKE event naming SPIs                 -> latches on those SAs (and their peer addresses)
"""
from __future__ import annotations

import functools
import ipaddress
from collections import defaultdict
from dataclasses import dataclass
from typing import Hashable, Iterable

from ipsecchan.xfrm.lookup import Flow, prefix_match
from ipsecchan.xfrm.messages import Selector, XfrmEvent

ALL = "all"


@dataclass
class _Entry:
    flow: Flow
    sa_keys: frozenset


class LatchRegistry:
    def __init__(self) -> None:
        self._entries: dict[Hashable, _Entry] = {}
        self._by_peer: dict[tuple[int, str], set] = defaultdict(set)
        self._by_sa: dict[tuple, set] = defaultdict(set)
        self._by_spi: dict[int, set] = defaultdict(set)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, latch_id: Hashable, flow: Flow, sa_keys: Iterable[tuple] = ()) -> None:
        self.remove(latch_id)
        entry = _Entry(flow, frozenset(sa_keys))
        self._entries[latch_id] = entry
        self._by_peer[(flow.family, _norm(flow.remote))].add(latch_id)
        for key in entry.sa_keys:
            self._by_sa[key].add(latch_id)
            self._by_spi[key[3]].add(latch_id)

    def update_sas(self, latch_id: Hashable, sa_keys: Iterable[tuple]) -> None:
        """The latch moved to other SAs (a rekey)."""
        self.add(latch_id, self._entries[latch_id].flow, sa_keys)

    def remove(self, latch_id: Hashable) -> None:
        entry = self._entries.pop(latch_id, None)
        if entry is None:
            return
        peer = (entry.flow.family, _norm(entry.flow.remote))
        self._by_peer[peer].discard(latch_id)
        if not self._by_peer[peer]:
            del self._by_peer[peer]
        for key in entry.sa_keys:
            for table, k in ((self._by_sa, key), (self._by_spi, key[3])):
                table[k].discard(latch_id)
                if not table[k]:
                    del table[k]

    def ids(self) -> set:
        return set(self._entries)

    # -- what an event touches --
    def affected(self, event: XfrmEvent) -> set:
        kind = event.kind
        if kind in ("sa-flush", "policy-flush", "resync"):
            return self.ids()
        if kind.startswith("sa-"):
            out = set(self._by_sa.get(event.sa_key, ()))
            sa = event.sa
            family = event.sa_key[0]
            out |= self._by_peer.get((family, _norm(event.sa_key[1])), set())
            if sa is not None:
                out |= self._by_peer.get((family, _norm(sa.src)), set())
                if sa.selector.family:       # tunnel SAs name the inner addresses here
                    out |= self._covered(sa.selector)
            return out
        if kind.startswith("policy-"):
            if event.policy is None:         # a delete that did not carry the policy
                return self.ids()
            return self._covered(event.policy.selector)
        return set()

    def affected_by_spis(self, spis: Iterable[int]) -> set:
        """Latches on SAs with these SPIs (an IKE rekey or delete names SPIs, not keys)."""
        out = set()
        for spi in spis:
            out |= self._by_spi.get(spi, set())
        return out

    def _covered(self, sel: Selector) -> set:
        # A selector covers a latch when either of its address prefixes holds the peer (OUT
        # selectors name the peer as dst, IN selectors as src); ports and protocol are left to
        # the re-observation, which is exact.
        full = {2: 32, 10: 128}.get(sel.family)
        if full and sel.prefixlen_d == full and sel.prefixlen_s == full:
            # A host-to-host selector: two lookups, no scan.
            return (self._by_peer.get((sel.family, _norm(sel.dst)), set())
                    | self._by_peer.get((sel.family, _norm(sel.src)), set()))
        out = set()
        for (family, peer), ids in self._by_peer.items():
            if sel.family and sel.family != family:
                continue
            if prefix_match(family, peer, sel.dst, sel.prefixlen_d) or \
                    prefix_match(family, peer, sel.src, sel.prefixlen_s):
                out |= ids
        return out


@functools.lru_cache(maxsize=65536)
def _norm(addr: str) -> str:
    return str(ipaddress.ip_address(addr)) if addr else addr

"""Which latches an event can affect: indexed, so that an SA rekey on a gateway with many
connections re-checks the few latches it touches, not all of them.

Sans-IO like the machine: the caller registers each latch's flow and the SAs it is latched to,
and asks, for each XFRM or IKE event, which latches to observe again.

  SA added, updated, deleted, expiring  -> latches with the SA's peer address (either end of
                                           the SA: the SA's dst for OUT, its src for IN), and
                                           latches on that SA key
  policy added, updated, deleted        -> latches whose flow the policy's selector covers:
                                           checked once per peer address, not per latch
  SA or policy flush, resync, a change  -> every latch
  of the default policy
  IKE event naming SPIs                 -> latches on those SAs (and their peer addresses)
"""
from __future__ import annotations

import functools
import ipaddress
from typing import Hashable, Iterable

from ipsecchan.xfrm.index import SARef
from ipsecchan.xfrm.lookup import Flow, prefix_match
from ipsecchan.xfrm.messages import Selector, XfrmEvent

ALL = "all"
_FULL = {2: 32, 10: 128}         # a host prefix's length, by family


def _sel_other(sa, family: int, dst: str) -> bool:
    """The SA's selector names addresses other than its own two (SARef.sel_other)."""
    sel = sa.selector
    return bool(sel.family) and not (sel.family == family and sel.src == sa.src
                                     and sel.dst == dst
                                     and sel.prefixlen_s == sel.prefixlen_d == _FULL.get(family))


_NONE = object()


class _IdIndex(dict):
    """key -> latch ids. A key held by one latch maps to the id itself: most keys (an SA, an
    SPI, a peer) belong to one latch or a few, and a set costs some 200 bytes."""

    def add(self, key, latch_id) -> None:
        ids = self.get(key, _NONE)
        if ids is _NONE:
            self[key] = latch_id
        elif type(ids) is set:
            ids.add(latch_id)
        elif ids != latch_id:
            self[key] = {ids, latch_id}

    def discard(self, key, latch_id) -> None:
        ids = self.get(key, _NONE)
        if type(ids) is set:
            ids.discard(latch_id)
            if len(ids) == 1:
                self[key] = next(iter(ids))
        elif ids is not _NONE and ids == latch_id:
            del self[key]

    def ids(self, key) -> set | tuple:
        ids = self.get(key, _NONE)
        return () if ids is _NONE else ids if type(ids) is set else (ids,)


class LatchRegistry:
    def __init__(self) -> None:
        # latch id -> (peer, SA keys): the peer as (family, normalized address), the keys as a
        # tuple without repeats (a few per latch: a tuple is a quarter of a frozenset's size).
        self._entries: dict[Hashable, tuple[tuple[int, str], tuple]] = {}
        self._by_peer = _IdIndex()          # (family, address) -> ids
        self._by_sa = _IdIndex()            # SA key -> ids
        self._by_spi = _IdIndex()           # SPI -> SA keys (an SA's, not a latch's)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, latch_id: Hashable, flow: Flow, sa_keys: Iterable[tuple] = ()) -> None:
        self.remove(latch_id)
        peer = (flow.family, _norm(flow.remote))
        self._entries[latch_id] = (peer, ())
        self._by_peer.add(peer, latch_id)
        self._link(latch_id, tuple(dict.fromkeys(sa_keys)))

    def update_sas(self, latch_id: Hashable, sa_keys: Iterable[tuple]) -> None:
        """The latch moved to other SAs (a rekey)."""
        keys = tuple(dict.fromkeys(sa_keys))
        entry = self._entries[latch_id]
        old = entry[1]
        if keys == old:
            return
        peer = entry[0]
        # Only what changed is relinked (a rekey keeps some of a latch's SAs each time).
        for key in old:
            if key not in keys:
                self._by_sa.discard(key, latch_id)
                if key not in self._by_sa:
                    self._by_spi.discard(key[3], key)
        for key in keys:
            if key not in old:
                if key not in self._by_sa:
                    self._by_spi.add(key[3], key)
                self._by_sa.add(key, latch_id)
        self._entries[latch_id] = (peer, keys)

    def _link(self, latch_id: Hashable, keys: tuple) -> None:
        self._entries[latch_id] = (self._entries[latch_id][0], keys)
        for key in keys:
            if key not in self._by_sa:
                self._by_spi.add(key[3], key)
            self._by_sa.add(key, latch_id)

    def _unlink(self, latch_id: Hashable) -> None:
        for key in self._entries[latch_id][1]:
            self._by_sa.discard(key, latch_id)
            if key not in self._by_sa:
                self._by_spi.discard(key[3], key)

    def remove(self, latch_id: Hashable) -> None:
        if latch_id not in self._entries:
            return
        self._unlink(latch_id)
        self._by_peer.discard(self._entries.pop(latch_id)[0], latch_id)

    def ids(self) -> set:
        return set(self._entries)

    # -- what an event touches --
    def affected(self, event: XfrmEvent) -> set:
        out: set = set()
        self.collect(event, out)
        return out

    def collect(self, event: XfrmEvent, out: set) -> None:
        """affected(event), added to `out` (no set per event: a rekey of thousands of SAs
        is tens of thousands of events)."""
        kind = event.kind
        if kind in ("sa-flush", "policy-flush", "resync"):
            out.update(self._entries)
        elif kind.startswith("sa-"):
            # (The _IdIndex lookups inlined: this runs for every SA notification, tens of
            # thousands in a rekey burst.)
            key = event.sa_key
            by_peer = self._by_peer.get
            ids = self._by_sa.get(key)
            if ids is not None:
                out.update(ids) if type(ids) is set else out.add(ids)
            sa = event.sa
            family = key[0]
            ids = by_peer((family, _norm(key[1])))
            if ids is not None:
                out.update(ids) if type(ids) is set else out.add(ids)
            if sa is not None:
                ids = by_peer((family, _norm(sa.src)))
                if ids is not None:
                    out.update(ids) if type(ids) is set else out.add(ids)
                # Tunnel SAs name the inner addresses in their selector; a transport SA's
                # host-to-host selector names its own ends, just looked up.
                if sa.sel_other if type(sa) is SARef else _sel_other(sa, family, key[1]):
                    out |= self._covered(sa.selector)
        elif kind.startswith("policy-"):
            if event.policy is None:         # a delete that did not carry the policy
                out.update(self._entries)
            else:
                out |= self._covered(event.policy.selector)

    def affected_by_spis(self, spis: Iterable[int]) -> set:
        """Latches on SAs with these SPIs (an IKE rekey or delete names SPIs, not keys)."""
        out = set()
        for spi in spis:
            for key in self._by_spi.ids(spi):
                out.update(self._by_sa.ids(key))
        return out

    def _covered(self, sel: Selector) -> set:
        # A selector covers a latch when either of its address prefixes holds the peer (OUT
        # selectors name the peer as dst, IN selectors as src); ports and protocol are left to
        # the re-observation, which is exact.
        full = _FULL.get(sel.family)
        if full and sel.prefixlen_d == full and sel.prefixlen_s == full:
            # A host-to-host selector: two lookups, no scan.
            return (set(self._by_peer.ids((sel.family, _norm(sel.dst))))
                    | set(self._by_peer.ids((sel.family, _norm(sel.src)))))
        out = set()
        for family, peer in self._by_peer:
            if sel.family and sel.family != family:
                continue
            if prefix_match(family, peer, sel.dst, sel.prefixlen_d) or \
                    prefix_match(family, peer, sel.src, sel.prefixlen_s):
                out.update(self._by_peer.ids((family, peer)))
        return out


@functools.lru_cache(maxsize=65536)
def _norm(addr: str) -> str:
    return str(ipaddress.ip_address(addr)) if addr else addr

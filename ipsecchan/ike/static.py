"""Identities for manually keyed SAs, from local configuration.

    {"sas": [
        {"spi": "0x1234", "proto": "esp", "dst": "10.0.0.2", "local": "alice", "peer": "bob"},
        {"reqid": 1000, "local": "alice", "peer": "bob"},
        {"peer_addr": "10.0.0.3", "local": "alice", "peer": "carol"}
    ]}

A rule names its SAs by SPI (with proto and dst, the kernel's SA key), by reqid, or by the
peer's address (either end of the SA). Precedence: an SPI rule, then a reqid rule, then an
address rule; the first rule of that kind in the file wins. SAs no rule names: UNKNOWN.
Identities are reported with auth "manual" (keys were installed by hand; nothing
authenticated anyone), with an optional `pubkey_sha256` per end if the operator states one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from ipsecchan.ike.base import (AUTH_MANUAL, Identity, SAIdentity, State, norm_addr,
                                norm_proto, unknown)

SOURCE = "static"


class StaticConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    kind: str                     # "spi", "reqid" or "addr"
    local: Identity
    peer: Identity
    spi: int | None = None
    proto: str | None = None
    dst: str | None = None
    reqid: int | None = None
    peer_addr: str | None = None


def _ident(entry: dict, end: str) -> Identity:
    name = entry.get(end)
    if not isinstance(name, str) or not name:
        raise StaticConfigError(f"rule {entry!r}: {end!r} must name an identity")
    fp = entry.get(f"{end}_pubkey_sha256")
    return Identity(name, AUTH_MANUAL, fp.lower() if fp else None)


def _rule(entry: dict) -> Rule:
    if not isinstance(entry, dict):
        raise StaticConfigError(f"a rule must be an object, not {entry!r}")
    local, peer = _ident(entry, "local"), _ident(entry, "peer")
    if "spi" in entry:
        spi = entry["spi"]
        spi = int(spi, 0) if isinstance(spi, str) else int(spi)
        if "dst" not in entry:
            raise StaticConfigError(f"rule {entry!r}: an SPI rule needs dst (and proto)")
        return Rule("spi", local, peer, spi=spi, proto=norm_proto(entry.get("proto", "esp")),
                    dst=norm_addr(entry["dst"]))
    if "reqid" in entry:
        return Rule("reqid", local, peer, reqid=int(entry["reqid"]))
    if "peer_addr" in entry:
        return Rule("addr", local, peer, peer_addr=norm_addr(entry["peer_addr"]))
    raise StaticConfigError(f"rule {entry!r} names no SA: spi+dst, reqid or peer_addr")


class StaticSource:
    name = SOURCE
    epoch = 0           # its rules never change (a reload is a new source)

    def __init__(self, config: dict | list):
        entries = config.get("sas", []) if isinstance(config, dict) else config
        self.rules = [_rule(e) for e in entries]
        # Indexed (the first rule of a kind wins): a gateway may name thousands of SAs, and
        # every latch observation asks for each of its SAs.
        self._by_spi: dict[tuple, Rule] = {}
        self._by_reqid: dict[int, Rule] = {}
        self._by_addr: dict[str, tuple[int, Rule]] = {}
        for i, r in enumerate(self.rules):
            if r.kind == "spi":
                self._by_spi.setdefault((r.spi, r.proto, r.dst), r)
            elif r.kind == "reqid" and r.reqid:
                self._by_reqid.setdefault(r.reqid, r)
            elif r.kind == "addr":
                self._by_addr.setdefault(r.peer_addr, (i, r))
        # Answers, by what they are made of: a rekey of thousands of SAs under one rule asks
        # thousands of times for the same answer (an SAIdentity is immutable).
        self._answers: dict[tuple, SAIdentity] = {}

    @classmethod
    def from_file(cls, path: str) -> "StaticSource":
        with open(path) as f:
            return cls(json.load(f))

    def _find(self, sa, proto: str, src: str, dst: str) -> Rule | None:
        spi, reqid = int(sa.spi), int(getattr(sa, "reqid", 0) or 0)
        r = self._by_spi.get((spi, proto, dst)) if self._by_spi else None
        if r is None and reqid:
            r = self._by_reqid.get(reqid)
        if r is None and self._by_addr:
            hits = [h for h in (self._by_addr.get(src), self._by_addr.get(dst)) if h]
            r = min(hits, key=lambda h: h[0])[1] if hits else None
        return r

    def identify(self, sa) -> SAIdentity:
        proto, src, dst = norm_proto(sa.proto), norm_addr(sa.src), norm_addr(sa.dst)
        r = self._find(sa, proto, src, dst)
        if r is None:
            return unknown(SOURCE, "no static rule names this SA")
        # The direction of an SPI or reqid rule's SA is not known here (no local addresses
        # are configured); an address rule names the peer, so the other end is local.
        local_addr = remote_addr = None
        if r.kind == "addr":
            remote_addr, local_addr = r.peer_addr, (dst if r.peer_addr == src else src)
        reqid, mode = int(sa.reqid or 0) or None, getattr(sa, "mode", None)
        key = (id(r), reqid, proto, mode, local_addr, remote_addr)   # (rules live as long)
        ans = self._answers.get(key)
        if ans is None:
            if len(self._answers) >= 16384:
                self._answers.clear()
            ans = self._answers[key] = SAIdentity(
                State.VERIFIED, SOURCE, reason=f"static {r.kind} rule", local=r.local,
                peer=r.peer, reqid=reqid, proto=proto, mode=mode, local_addr=local_addr,
                remote_addr=remote_addr)
        return ans

    def snapshot(self) -> list[SAIdentity]:
        return []          # the static source knows rules, not SAs

    def next_event(self, timeout: float | None = None):
        return None

    def has_events(self) -> bool:
        return False

    def close(self) -> None:
        pass

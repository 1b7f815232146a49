"""Identities from IKE daemons (and static configuration) for kernel SAs.

    from ipsecchan.ike import ChainSource, StaticSource, StrongSwanSource
    src = ChainSource([StrongSwanSource("/var/run/charon.vici"), StaticSource(cfg)])
    answer = src.identify(sa)          # sa: an ipsecchan.xfrm.SA
    if answer.verified: answer.peer.id, answer.peer.auth, answer.peer.pubkey_sha256

Precedence in a ChainSource: sources are asked in order. The first VERIFIED answer wins.
An UNAVAILABLE answer stops the walk and is returned: a source of higher precedence that
cannot be asked might own the SA, so no lower source's answer may stand in for it (fail
closed). Only when every source answers UNKNOWN is the answer UNKNOWN.
"""
from __future__ import annotations

import time

from ipsecchan.ike.base import (AUTH_MANUAL, AUTH_PSK, AUTH_PUBKEY, AUTH_UNKNOWN,
                                EV_DAEMON_BACK, EV_DAEMON_LOST, EV_DOWN, EV_REKEY, EV_UP, Event,
                                Identity, IdentitySource, SAIdentity, SourceUnavailable, State,
                                events)
from ipsecchan.ike.static import StaticConfigError, StaticSource
from ipsecchan.ike.strongswan import StrongSwanSource

__all__ = ["AUTH_MANUAL", "AUTH_PSK", "AUTH_PUBKEY", "AUTH_UNKNOWN", "ChainSource",
           "EV_DAEMON_BACK", "EV_DAEMON_LOST", "EV_DOWN", "EV_REKEY", "EV_UP", "Event",
           "Identity", "IdentitySource", "SAIdentity", "SourceUnavailable", "State",
           "StaticConfigError", "StaticSource", "StrongSwanSource", "events"]


class ChainSource:
    name = "chain"

    def __init__(self, sources: list):
        if not sources:
            raise ValueError("a ChainSource needs at least one source")
        self.sources = list(sources)

    @property
    def epoch(self):
        """Changes when any source's does; None when any source has none."""
        epochs = tuple(getattr(src, "epoch", None) for src in self.sources)
        return None if None in epochs else epochs

    def identify(self, sa) -> SAIdentity:
        reasons = []
        for src in self.sources:
            ans = src.identify(sa)
            if ans.state is State.VERIFIED or ans.state is State.UNAVAILABLE:
                return ans
            reasons.append(f"{ans.source}: {ans.reason}")
        return SAIdentity(State.UNKNOWN, self.name, "; ".join(reasons))

    def snapshot(self) -> list[SAIdentity]:
        out = []
        for src in self.sources:
            out += src.snapshot()           # SourceUnavailable propagates
        return out

    def has_events(self) -> bool:
        """Whether a source may have events queued (one that cannot say: as if it had)."""
        for src in self.sources:
            has = getattr(src, "has_events", None)
            if has is None or has():
                return True
        return False

    def next_event(self, timeout: float | None = None) -> Event | None:
        deadline = None if not timeout else time.monotonic() + timeout
        while True:
            for src in self.sources:
                ev = src.next_event(0)
                if ev is not None:
                    return ev
            if timeout == 0 or (deadline is not None and time.monotonic() >= deadline):
                return None
            time.sleep(0.02)

    def close(self) -> None:
        for src in self.sources:
            src.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

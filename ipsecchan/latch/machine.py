"""The RFC 5660 latch as a sans-IO state machine.

No sockets, netlink or VICI in here: the caller observes the world (the kernel's lookup for
the connection and the IKE daemon's identities, gathered into an Observation), feeds the
observation to the latch, and carries out the effects the latch returns (pin the socket to
its SAs, block it, release it). The same machine therefore runs in-process, in the broker, and
in tests, where every transition is driven from a table.

States (RFC 5660 section 2.3) and this module's one addition:

    LISTENER     a listening socket's latch; accepted connections latch from it
    LATCHING     a connection latch between its first observation and its confirmation
                 (the socket is pinned to the observed SAs, then observed again: an SA replaced
                 in between, by another peer, must not end in a latch with the wrong peer)
    ESTABLISHED  the connection's SAs carry the latched identities and protection
    BROKEN       they do not (or the truth cannot be read): the connection's packets are
                 blocked, the owner is told; BROKEN -> ESTABLISHED when the latched
                 parameters return
    CLOSED       released; no transition leaves it

A rekey (new SAs, same identities, protection no weaker) keeps ESTABLISHED and moves the
latch to the new SAs. When the only news for an ESTABLISHED latch is that SAs were removed
(a rekey's old inbound SA, seconds later), inbound_gone() takes that in without a new
observation where the outcome follows from the latched SAs alone. Optional protection (RFC
5660 section 3.1, BTNS) lets a connection latch to cleartext, knowingly: such a latch reports
protected=False and promises nothing further, so no observation breaks it.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

from ipsecchan.latch.protection import Protection


class LatchState(enum.Enum):
    LISTENER = "LISTENER"
    LATCHING = "LATCHING"
    ESTABLISHED = "ESTABLISHED"
    BROKEN = "BROKEN"
    CLOSED = "CLOSED"


class Policy(enum.Enum):
    REQUIRE = "require"      # IPsec or nothing (the default)
    OPTIONAL = "optional"    # RFC 5660 3.1: may proceed in cleartext, reported as such


class Cause(str, enum.Enum):
    """Why a latch broke or was refused."""
    NOT_VERIFIED = "not-verified"          # the truth could not be read: fail closed
    CLEARTEXT = "cleartext"                # the flow would go or come in clear
    BLOCKED = "blocked"                    # a policy drops the flow
    NO_SA = "no-sa"                        # protection required, no SA carries the flow
    PEER_CHANGED = "peer-changed"          # another peer identity (or key) carries the flow
    LOCAL_CHANGED = "local-changed"        # another local identity
    PROTECTION_WEAKER = "protection-weaker"
    SAS_DISAGREE = "sas-disagree"          # the flow's SAs do not agree on IDs or protection
    PEER_NOT_REQUIRED = "peer-not-required"  # the peer is not the identity the caller named
    IDENTITY_UNKNOWN = "identity-unknown"    # no IKE daemon or static entry names the SA


class LatchProtocolError(RuntimeError):
    """An operation the latch's state does not allow (a bug in the caller)."""


class LatchRefused(ConnectionError):
    """A connection could not be latched; `cause` says why."""

    def __init__(self, cause: Cause, detail: str = ""):
        super().__init__(f"connection not latched: {cause.value}" + (f" ({detail})"
                                                                        if detail else ""))
        self.cause = cause
        self.detail = detail


# ---- what the caller observes ----

@dataclass(frozen=True, slots=True)
class Party:
    """An IKE identity as latching compares it: the ID, and the public key that
    authenticated it when one did (None: PSK, manual keying, or not known)."""
    id: str
    pubkey_sha256: str | None = None
    auth: str = "unknown"

    def same_as(self, latched: "Party") -> bool:
        # Same ID, and if a key authenticated the latched ID, the same key: in BTNS anyone can
        # claim an ID, the key is what holds.
        return self.id == latched.id and (latched.pubkey_sha256 is None
                                          or self.pubkey_sha256 == latched.pubkey_sha256)


@dataclass(frozen=True, slots=True)
class SAFacts:
    """One SA carrying the flow, with what the IKE daemon says of it."""
    key: tuple                     # (family, dst, proto, spi)
    reqid: int
    protection: Protection
    local: Party | None            # None: identity unknown to every identity source
    peer: Party | None
    src: str = ""                  # the SA's source address (tunnel-mode pins need it)


@dataclass(frozen=True, slots=True)
class Observation:
    """The kernel's and the IKE daemon's view of one connection at one moment.

    verified=False whenever part of the truth could not be read (IKE daemon unreachable,
    netlink error, an overrun not yet resynced): latches then fail closed.
    out_verdict / in_verdict are ipsecchan.xfrm.lookup verdicts; out_sas is the SA bundle the
    kernel sends through, in_sas the SAs it would accept the flow from."""
    verified: bool
    out_verdict: str = "no-policy"
    in_verdict: str = "no-policy"
    out_sas: tuple[SAFacts, ...] = ()
    in_sas: tuple[SAFacts, ...] = ()
    in_cleartext_accepted: bool = False
    reason: str = ""
    # An SA here is too new for the IKE daemon to have reported it yet (the kernel installs a
    # rekey's SAs before the daemon says so): no verdict until it does or a grace time ends.
    pending: bool = False


@dataclass(frozen=True, slots=True)
class Requirements:
    """What the caller asks of a latch before it exists (RFC 5660 CREATE_*_LATCH)."""
    policy: Policy = Policy.REQUIRE
    peer_id: str | None = None          # the connect fails unless the peer is this ID
    strict_algorithms: bool = False     # a rekey must keep the very same algorithms


@dataclass(frozen=True, slots=True)
class LatchParams:
    """What a connection is latched to."""
    protected: bool
    local: Party | None
    peer: Party | None
    protection: tuple[Protection, ...]      # per SA of the bundle, outermost last
    reqids: tuple[int, ...]
    out_sas: tuple[SAFacts, ...]             # the SAs carrying it now (the socket's pin)
    in_sas: tuple[SAFacts, ...]

    def sa_keys(self) -> tuple[tuple, tuple]:
        return tuple(s.key for s in self.out_sas), tuple(s.key for s in self.in_sas)


# Constructors of SAFacts and LatchParams that set the slots directly: half the cost of the
# generated __init__ of a frozen dataclass, and the engine makes these by the ten thousand
# in a rekey round. Same objects (fields in order, checked here).
_new = object.__new__
assert tuple(SAFacts.__dataclass_fields__) == ("key", "reqid", "protection", "local", "peer",
                                               "src")
assert tuple(LatchParams.__dataclass_fields__) == ("protected", "local", "peer", "protection",
                                                   "reqids", "out_sas", "in_sas")
_F = tuple(SAFacts.__dict__[f].__set__ for f in SAFacts.__dataclass_fields__)
_P = tuple(LatchParams.__dict__[f].__set__ for f in LatchParams.__dataclass_fields__)


def make_sa_facts(key, reqid, protection, local, peer, src, _f=_F) -> SAFacts:
    o = _new(SAFacts)
    _f[0](o, key), _f[1](o, reqid), _f[2](o, protection), _f[3](o, local), _f[4](o, peer)
    _f[5](o, src)
    return o


def make_latch_params(protected, local, peer, protection, reqids, out_sas, in_sas,
                      _p=_P) -> LatchParams:
    o = _new(LatchParams)
    _p[0](o, protected), _p[1](o, local), _p[2](o, peer), _p[3](o, protection)
    _p[4](o, reqids), _p[5](o, out_sas), _p[6](o, in_sas)
    return o


# ---- what the latch asks the caller to do ----

@dataclass(frozen=True, slots=True)
class Pin:
    """Install per-socket policies: OUT through exactly these SAs (by SPI), IN through SAs of
    their reqid, protocol and mode; a bypass pair when params.protected is False. (The IN pin
    takes the reqid, not the SPI, so that packets still in flight on the old SA of a rekey are
    not dropped; a foreign SA of the same reqid is the identity check's to catch.)"""
    params: LatchParams


@dataclass(frozen=True, slots=True)
class Block:
    """Install per-socket policies that drop the connection's packets both ways."""
    cause: Cause


@dataclass(frozen=True, slots=True)
class Release:
    """Remove the socket's per-socket policies."""


@dataclass(frozen=True, slots=True)
class Alert:
    """Tell the latch's owner: a state change (old -> new), with its cause, or a rekey."""
    old: LatchState
    new: LatchState
    cause: Cause | None = None
    detail: str = ""
    rekeyed: bool = False


Effect = Pin | Block | Release | Alert
# A rekey's alert (immutable, so one object serves every latch: a rekey of thousands of
# connections tells each of them).
_REKEYED = Alert(LatchState.ESTABLISHED, LatchState.ESTABLISHED, rekeyed=True)


# ---- the machine ----

def _bundle_params(sas: tuple[SAFacts, ...]) -> tuple[Party | None, Party | None,
                                                     tuple[Protection, ...], tuple[int, ...]]:
    first = sas[0]
    return first.local, first.peer, tuple(s.protection for s in sas), tuple(s.reqid for s in sas)


def _same_party(now: Party | None, latched: Party | None) -> bool:
    if now is latched:          # the engine shares one Party per identity: the common case
        return True
    if latched is None:
        return now is None
    return now is not None and now.same_as(latched)


def evaluate(obs: Observation, req: Requirements
             ) -> tuple[LatchParams | None, Cause | None, str]:
    """The parameters an observation offers a latch, or why it offers none."""
    if not obs.verified:
        return None, Cause.NOT_VERIFIED, obs.reason
    if "block" in (obs.out_verdict, obs.in_verdict):
        return None, Cause.BLOCKED, f"out {obs.out_verdict}, in {obs.in_verdict}"
    clear_out = obs.out_verdict in ("bypass", "no-policy")
    clear_in = obs.in_verdict in ("bypass", "no-policy")
    if clear_out and clear_in:
        if req.policy is Policy.OPTIONAL:
            return LatchParams(False, None, None, (), (), (), ()), None, "cleartext"
        return None, Cause.CLEARTEXT, "no IPsec policy protects the connection"
    if clear_out or clear_in:
        return None, Cause.CLEARTEXT, ("out" if clear_out else "in") + " goes in clear"
    if "no-sa" in (obs.out_verdict, obs.in_verdict) or not obs.out_sas or not obs.in_sas:
        return None, Cause.NO_SA, f"out {obs.out_verdict}, in {obs.in_verdict}"
    if obs.in_cleartext_accepted:
        return None, Cause.CLEARTEXT, "the inbound policy also accepts cleartext"
    local, peer, prot, reqids = _bundle_params(obs.out_sas)
    for sa in obs.out_sas + obs.in_sas:
        if not (_same_party(sa.peer, peer) and _same_party(sa.local, local)
                and (sa.peer is None) == (peer is None)):
            return None, Cause.SAS_DISAGREE, "the SAs carrying the flow name different IDs"
    # Every SA the kernel would accept inbound must be as strong as the outbound bundle:
    # otherwise the weakest of them is what protects the connection.
    for s in obs.in_sas:
        sp = s.protection
        # (`in` tries identity first: the engine shares one Protection per kind of SA.)
        if sp not in prot and not any(sp.at_least(p) for p in prot):
            return None, Cause.SAS_DISAGREE, \
                "an accepted inbound SA is weaker than the outbound"
    if peer is None or local is None:
        return None, Cause.IDENTITY_UNKNOWN, "no IKE daemon or static entry names the SAs"
    if req.peer_id is not None and peer.id != req.peer_id:
        return None, Cause.PEER_NOT_REQUIRED, f"peer is {peer.id!r}, required {req.peer_id!r}"
    return LatchParams(True, local, peer, prot, reqids, obs.out_sas, obs.in_sas), None, ""


# Judging is a pure function of the observation, the latched parameters and the requirements.
# Latches on the same SAs get the same objects (the engine shares one tuple of SAFacts per
# list of SAs; the parameters these functions return are shared through the memos): a round
# over the many connections of one SA pair judges once. Keyed by the objects' ids, with the
# objects held by the entry (so their ids stay theirs); bounded.
_MEMO_LIMIT = 4096
_EVALUATED: dict[tuple, tuple] = {}
_OUTCOMES: dict[tuple, tuple] = {}


def _obs_key(obs: Observation) -> tuple:
    return (obs.verified, obs.out_verdict, obs.in_verdict, id(obs.out_sas), id(obs.in_sas),
            obs.in_cleartext_accepted, obs.reason)


def _evaluated(obs: Observation, req: Requirements
               ) -> tuple[LatchParams | None, Cause | None, str]:
    """evaluate(obs, req), shared among latches whose observations show the same SAs."""
    key = (_obs_key(obs), req)
    hit = _EVALUATED.get(key)
    if hit is not None and hit[0] is obs.out_sas and hit[1] is obs.in_sas:
        return hit[2]
    res = evaluate(obs, req)
    if len(_EVALUATED) >= _MEMO_LIMIT:
        _EVALUATED.clear()
    _EVALUATED[key] = (obs.out_sas, obs.in_sas, res)
    return res


_GONE: dict[tuple, tuple] = {}


def _without(latched: LatchParams, keys) -> LatchParams | None:
    """The parameters of an ESTABLISHED latch once the SAs `keys` names are gone from the SAD,
    when they follow from that alone (Latch.inbound_gone); None when they do not. Memoized,
    so that latches sharing parameters go on sharing them."""
    key = (id(latched), frozenset(keys))
    hit = _GONE.get(key)
    if hit is not None and hit[0] is latched:
        return hit[1]
    res = _without_uncached(latched, key[1])
    if len(_GONE) >= _MEMO_LIMIT:
        _GONE.clear()
    _GONE[key] = (latched, res)
    return res


def _without_uncached(latched: LatchParams, keys) -> LatchParams | None:
    # The latched SAs are what the last observation showed. Removing SAs can change that
    # observation only by the SAs removed, unless one carried the connection out, or none of
    # the latch's kind is left inbound (the verdict would become no-sa); bundles of several
    # layers are left to a full observation.
    if not latched.protected or len(latched.out_sas) != 1:
        return None
    out = latched.out_sas[0]
    if out.key in keys:
        return None
    left = tuple(s for s in latched.in_sas if s.key not in keys)
    if len(left) == len(latched.in_sas):
        return latched                                 # none of its SAs: nothing changed
    kind = (out.reqid, out.protection.proto, out.protection.mode)
    if not any((s.reqid, s.protection.proto, s.protection.mode) == kind for s in left):
        return None
    return LatchParams(True, latched.local, latched.peer, latched.protection, latched.reqids,
                       latched.out_sas, left)


# What an observation does to an ESTABLISHED latch (_established_outcome).
_KEEP = ("keep", None, None, "")


def _established_outcome(obs: Observation, latched: LatchParams, req: Requirements
                         ) -> tuple[str, LatchParams | None, Cause | None, str]:
    """("keep"|"broken"|"moved"|"inbound", new params, cause, detail) of a non-pending
    observation for an ESTABLISHED latch: broken, rekeyed (moved: the OUT SAs or reqids
    changed), only its accepted inbound SAs changed, or nothing to do. Memoized."""
    key = (_obs_key(obs), id(latched), req)
    hit = _OUTCOMES.get(key)
    if hit is not None and hit[0] is obs.out_sas and hit[1] is obs.in_sas \
            and hit[2] is latched:
        return hit[3]
    params, cause, detail = _judge(obs, latched, req)
    if params is None and not latched.protected:
        res = _KEEP                 # latched to cleartext, knowingly: nothing to break
    elif cause is not None:
        res = ("broken", None, cause, detail)
    elif not latched.protected:
        res = _KEEP
    else:
        keys, old_keys = params.sa_keys(), latched.sa_keys()
        if keys == old_keys:
            res = _KEEP
        else:
            moved = (keys[0], params.reqids) != (old_keys[0], latched.reqids)
            # The latched identities and protection stay; the SAs carrying them are new.
            res = ("moved" if moved else "inbound",
                   LatchParams(True, latched.local, latched.peer, latched.protection,
                               params.reqids, params.out_sas, params.in_sas), None, "")
    if len(_OUTCOMES) >= _MEMO_LIMIT:
        _OUTCOMES.clear()
    _OUTCOMES[key] = (obs.out_sas, obs.in_sas, latched, res)
    return res


def _judge(obs: Observation, latched: LatchParams, req: Requirements
           ) -> tuple[LatchParams | None, Cause | None, str]:
    """An observation against a latch: new parameters (None if it offers none) and the cause
    that keeps them from carrying the connection (None if nothing does). A known other peer on
    any SA of the flow is named as such, before any disagreement among the SAs: while the old
    peer's SAs linger, the kernel already sends through, or accepts from, the newcomer's (a
    daemon installs the inbound SA first)."""
    if latched.protected and obs.verified:
        lpeer = latched.peer
        for sa in obs.out_sas + obs.in_sas:
            if sa.peer is not None and sa.peer is not lpeer and not sa.peer.same_as(lpeer):
                return None, Cause.PEER_CHANGED, f"{sa.peer.id!r} instead of " \
                                                 f"{latched.peer.id!r}"
    params, cause, detail = evaluate(obs, req)
    if params is not None:
        cause, detail = conflict(params, latched, req)
    return params, cause, detail


def conflict(now: LatchParams, latched: LatchParams, req: Requirements
             ) -> tuple[Cause | None, str]:
    """Why `now` may not carry a connection latched to `latched` (None: it may)."""
    if not latched.protected:
        return None, ""
    if not now.protected:
        return Cause.CLEARTEXT, ""
    if not _same_party(now.peer, latched.peer):
        return Cause.PEER_CHANGED, f"{now.peer.id if now.peer else None!r} instead of " \
                                   f"{latched.peer.id!r}"
    if not _same_party(now.local, latched.local):
        return Cause.LOCAL_CHANGED, ""
    if now.protection is not latched.protection and (
            len(now.protection) != len(latched.protection) or not all(
                n is o or n.at_least(o, strict=req.strict_algorithms)
                for n, o in zip(now.protection, latched.protection))):
        return Cause.PROTECTION_WEAKER, " / ".join(p.describe() for p in now.protection)
    return None, ""


_KEEPS: dict[tuple, tuple] = {}


def keeps(latched: LatchParams, sa: SAFacts, req: Requirements) -> bool:
    """Whether an observation whose SAs all carry `sa`'s identities and protection (the very
    Party and Protection objects), protected both ways with no cleartext accepted, one OUT
    SA, keeps a latch with these parameters ESTABLISHED. Such a judgement depends on nothing
    else (not on SPIs, reqids or addresses): this is what lets the caller settle it by a class
    tag per SA (the engine's revalidation in C) and feed the result in with carried()."""
    # (By the protections themselves, not their tuple: each latch has a tuple of its own.)
    held = (latched.local, latched.peer, *latched.protection, sa.local, sa.peer, sa.protection)
    key = (*map(id, held), req)
    hit = _KEEPS.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], held)):
        return hit[1]
    if not latched.protected or sa.local is None or sa.peer is None:
        res = False
    else:
        obs = Observation(True, "protected", "protected", (sa,), (sa,))
        res = _judge(obs, latched, req)[1] is None
    if len(_KEEPS) >= 1024:        # (one entry per class and latched parties: few)
        _KEEPS.clear()
    _KEEPS[key] = (held, res)       # held: so that the ids stay theirs
    return res


# Transitions a latch remembers for inquiry (the oldest are dropped): a latch that flaps for
# days must not grow without bound.
HISTORY_LIMIT = 32


def _unchanged(obs: Observation, latched: LatchParams) -> bool:
    """The observation shows exactly the SAs, identities and protection the latch holds now
    (SAFacts compare by value; the very same tuples, the common case, at once): nothing to
    judge again. Those facts passed the latch's checks when they were taken in, and a
    judgement depends on nothing else."""
    return (latched.protected and obs.verified and not obs.pending
            and obs.out_verdict == "protected" and obs.in_verdict == "protected"
            and not obs.in_cleartext_accepted
            and (obs.out_sas is latched.out_sas or obs.out_sas == latched.out_sas)
            and (obs.in_sas is latched.in_sas or obs.in_sas == latched.in_sas))


@dataclass(slots=True)
class Latch:
    """One latch. Build with Latch.listener(req) or Latch.connector(req); then feed it."""
    requirements: Requirements
    state: LatchState
    params: LatchParams | None = None
    cause: Cause | None = None
    detail: str = ""
    history: list = field(default_factory=list)    # (old, new, cause), the last HISTORY_LIMIT

    @classmethod
    def listener(cls, req: Requirements = Requirements()) -> "Latch":
        return cls(req, LatchState.LISTENER)

    @classmethod
    def connector(cls, req: Requirements = Requirements()) -> "Latch":
        return cls(req, LatchState.LATCHING)

    # -- the table: (state, input) -> handler --
    def handle(self, kind: str, arg: Any = None) -> list[Effect]:
        handler = _TABLE.get((self.state, kind))
        if handler is None:
            raise LatchProtocolError(f"{kind!r} is not allowed in state {self.state.value}")
        return handler(self, arg)

    def begin(self, obs: Observation) -> list[Effect]:
        """First observation of a connection: refuse it (LatchRefused) or pin it."""
        return self.handle("begin", obs)

    def confirm(self, obs: Observation) -> list[Effect]:
        """Observation after pinning: ESTABLISHED, or refused (the socket must be released)."""
        return self.handle("confirm", obs)

    def observe(self, obs: Observation) -> list[Effect]:
        """A later observation (an XFRM or IKE event touched the connection)."""
        return self.handle("observe", obs)

    def inbound_gone(self, keys) -> list[Effect] | None:
        """SAs named by `keys` were removed from the SAD, and nothing else reached the latch
        since its last observation (the caller's registry says so). When what an observation
        would show now follows from that alone, the latch takes it in: [] (no effect: the IN
        pin names a reqid, not SAs). None when it does not: observe instead."""
        return self.handle("inbound-gone", keys)

    def carried(self, params: LatchParams, moved: bool) -> list[Effect]:
        """The caller judged, without an Observation, that the connection is carried by
        `params`' SAs with the latched identities and protection (every SA of the flow of a
        class for which keeps() holds; params keep the latched local, peer and protection):
        moved=True when the OUT SA changed (a rekey: the pin moves), False when only the
        accepted inbound SAs did. The effects are those observe() gives for the same SAs."""
        return self.handle("carried", (params, moved))

    def accept(self, obs: Observation) -> tuple["Latch", list[Effect]]:
        """On a listener latch: the latch of an accepted connection (pinned at once: the
        kernel cloned the listener's policy into it, so its first packets were covered)."""
        self.handle("accept", obs)
        child = Latch(self.requirements, LatchState.LATCHING)
        return child, child.begin(obs)

    def close(self) -> list[Effect]:
        return self.handle("close")

    # -- handlers --
    def _move(self, new: LatchState, cause: Cause | None = None, detail: str = "",
              rekeyed: bool = False) -> Alert:
        alert = Alert(self.state, new, cause, detail, rekeyed)
        history = self.history
        history.append((self.state, new, cause))
        if len(history) > HISTORY_LIMIT:
            del history[0]
        self.state, self.cause, self.detail = new, cause, detail
        return alert

    def _begin(self, obs: Observation) -> list[Effect]:
        if self.params is not None:
            raise LatchProtocolError("begin: this latch has begun already")
        if obs.pending:
            raise LatchProtocolError("begin: wait until the observation is not pending")
        params, cause, detail = _evaluated(obs, self.requirements)
        if params is None:
            raise LatchRefused(cause, detail)
        self.params = params
        return [Pin(params)]

    def _confirm(self, obs: Observation) -> list[Effect]:
        if self.params is None:
            raise LatchProtocolError("confirm before begin")
        if obs.pending:
            raise LatchProtocolError("confirm: wait until the observation is not pending")
        if _unchanged(obs, self.params):
            return [self._move(LatchState.ESTABLISHED)]
        params, cause, detail = _judge(obs, self.params, self.requirements)
        if params is None or cause is not None:
            self._move(LatchState.CLOSED, cause, detail)
            raise LatchRefused(cause, "changed while latching" + (f": {detail}" if detail
                                                                   else ""))
        if params.sa_keys() != self.params.sa_keys():
            # Rekeyed between the two looks, same peer and protection: pin the new SAs.
            self.params = replace(self.params, out_sas=params.out_sas, in_sas=params.in_sas,
                                  reqids=params.reqids)
            return [Pin(self.params), self._move(LatchState.ESTABLISHED)]
        return [self._move(LatchState.ESTABLISHED)]

    def _observe_established(self, obs: Observation) -> list[Effect]:
        if obs.pending or _unchanged(obs, self.params):
            return []       # pending: the pin holds the connection on its SAs meanwhile
        kind, params, cause, detail = _established_outcome(obs, self.params,
                                                           self.requirements)
        if kind == "keep":
            return []
        if kind == "broken":
            return [self._move(LatchState.BROKEN, cause, detail), Block(cause)]
        self.params = params
        if kind == "inbound":
            # Only the set of accepted inbound SAs changed (a rekey's old inbound SA gone):
            # the IN pin (by reqid) stands, nothing to tell.
            return []
        # A rekey: the same identities and protection on new SAs. The pin moves to them.
        return [_REKEYED, Pin(params)]

    def _carried(self, arg) -> list[Effect]:
        params, moved = arg
        latched = self.params
        if not (params.protected and params.local is latched.local
                and params.peer is latched.peer and params.protection is latched.protection):
            raise LatchProtocolError("carried: not the latched identities and protection")
        self.params = params
        if not moved:
            return []
        return [_REKEYED, Pin(params)]

    def _inbound_gone(self, keys) -> list[Effect] | None:
        params = _without(self.params, keys)
        if params is None:
            return None
        self.params = params
        return []

    def _observe_broken(self, obs: Observation) -> list[Effect]:
        if obs.pending:
            return []
        params, cause, detail = _judge(obs, self.params, self.requirements)
        if cause is not None:
            self.cause, self.detail = cause, detail     # still broken, maybe for a new reason
            return []
        self.params = replace(self.params, out_sas=params.out_sas, in_sas=params.in_sas,
                              reqids=params.reqids)
        return [self._move(LatchState.ESTABLISHED, None, "resolved"), Pin(self.params)]

    def _accept(self, _obs: Observation) -> list[Effect]:
        return []

    def _close(self, _arg=None) -> list[Effect]:
        return [self._move(LatchState.CLOSED), Release()]

    def _close_latching(self, _arg=None) -> list[Effect]:
        self._move(LatchState.CLOSED)
        return [Release()]


_TABLE = {
    (LatchState.LISTENER, "accept"): Latch._accept,
    (LatchState.LISTENER, "close"): Latch._close,
    (LatchState.LATCHING, "begin"): Latch._begin,
    (LatchState.LATCHING, "confirm"): Latch._confirm,
    (LatchState.LATCHING, "close"): Latch._close_latching,
    (LatchState.ESTABLISHED, "observe"): Latch._observe_established,
    (LatchState.ESTABLISHED, "inbound-gone"): Latch._inbound_gone,
    (LatchState.ESTABLISHED, "carried"): Latch._carried,
    (LatchState.ESTABLISHED, "close"): Latch._close,
    (LatchState.BROKEN, "observe"): Latch._observe_broken,
    (LatchState.BROKEN, "close"): Latch._close,
}

INPUTS = ("begin", "confirm", "observe", "inbound-gone", "carried", "accept", "close")

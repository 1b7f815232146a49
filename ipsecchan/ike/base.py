"""What any IKE daemon adapter answers: who is behind a kernel SA.

The kernel knows SAs (SPI, addresses, reqid) but not identities; the IKE daemon that
negotiated an SA knows the identities it authenticated. An `IdentitySource` maps a kernel SA
to an `SAIdentity` in one of three states:

  VERIFIED     the source owns the SA and states the local and peer `Identity`;
  UNKNOWN      the source was asked and does not own this SA (e.g. a manually keyed SA);
  UNAVAILABLE  the source could not be asked (socket gone, timeout, protocol error).

Fail closed: UNAVAILABLE is never a guess and never becomes UNKNOWN on the way up.
"""
from __future__ import annotations

import enum
import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Iterator, Protocol, runtime_checkable

AUTH_PUBKEY = "pubkey"     # certificate or raw public key authentication
AUTH_PSK = "psk"
AUTH_MANUAL = "manual"     # manually keyed SA, identities from local configuration
AUTH_UNKNOWN = "unknown"
AUTH_KINDS = (AUTH_PUBKEY, AUTH_PSK, AUTH_MANUAL, AUTH_UNKNOWN)


class State(enum.Enum):
    VERIFIED = "verified"
    UNKNOWN = "unknown"
    UNAVAILABLE = "unavailable"


class SourceUnavailable(Exception):
    """The identity source cannot be asked now (raised by snapshot(); identify() answers
    UNAVAILABLE instead)."""


@dataclass(frozen=True)
class Identity:
    """One end's IKE identity, as the daemon reports it.

    id:            the identity string ("CN=alice", "alice.lab", ...)
    auth:          how it was authenticated: pubkey, psk, manual or unknown
    pubkey_sha256: hex SHA-256 of the DER SubjectPublicKeyInfo of the public key that
                   authenticated this end, or None when no key can be tied to it with certainty
    cert_sha256:   hex SHA-256 of the DER certificate, or None
    """

    id: str
    auth: str
    pubkey_sha256: str | None = None
    cert_sha256: str | None = None

    def __post_init__(self):
        if self.auth not in AUTH_KINDS:
            raise ValueError(f"unknown auth kind {self.auth!r}")


@dataclass(frozen=True)
class SAIdentity:
    """The answer for one kernel SA (or one CHILD_SA, in a snapshot)."""

    state: State
    source: str                          # which source answered ("strongswan", "static")
    reason: str = ""                     # why UNKNOWN / UNAVAILABLE, in words
    local: Identity | None = None
    peer: Identity | None = None
    ike_name: str | None = None
    ike_id: int | None = None            # the daemon's unique id of the IKE_SA
    child_name: str | None = None
    child_id: int | None = None          # the daemon's unique id of the CHILD_SA
    reqid: int | None = None
    spi_in: int | None = None            # inbound SA's SPI (its dst is the local address)
    spi_out: int | None = None
    proto: str | None = None             # "esp" / "ah"
    mode: str | None = None              # "transport" / "tunnel" / ...
    local_addr: str | None = None
    remote_addr: str | None = None

    @property
    def verified(self) -> bool:
        return self.state is State.VERIFIED


def unavailable(source: str, reason: str) -> SAIdentity:
    return SAIdentity(State.UNAVAILABLE, source, reason)


def unknown(source: str, reason: str) -> SAIdentity:
    return SAIdentity(State.UNKNOWN, source, reason)


# Event kinds
EV_UP = "up"
EV_DOWN = "down"
EV_REKEY = "rekey"
EV_DAEMON_LOST = "daemon-lost"
EV_DAEMON_BACK = "daemon-back"


@dataclass(frozen=True)
class Event:
    """A change the daemon reported.

    kind:  up, down, rekey, daemon-lost, daemon-back
    level: "ike" or "child" (None for daemon-lost/back)
    For child events `old` / `new` are the CHILD_SA answers (SPIs, reqid, identities);
    for a CHILD_SA up only `new`, for a down only `old`. For IKE events, old_ike_id /
    new_ike_id are the IKE_SA unique ids (a rekey moves the CHILD_SAs to the new IKE_SA).
    """

    kind: str
    source: str
    level: str | None = None
    ike_name: str | None = None
    old_ike_id: int | None = None
    new_ike_id: int | None = None
    old: SAIdentity | None = None
    new: SAIdentity | None = None
    reason: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def old_spis(self) -> tuple[int | None, int | None] | None:
        return None if self.old is None else (self.old.spi_in, self.old.spi_out)

    @property
    def new_spis(self) -> tuple[int | None, int | None] | None:
        return None if self.new is None else (self.new.spi_in, self.new.spi_out)


@runtime_checkable
class IdentitySource(Protocol):
    """name: the source's name in answers.

    epoch (optional): a value that changes whenever a VERIFIED answer this source gave might
    no longer be its answer for the same SA, i.e. when it loses or regains its daemon, or
    reloads its configuration (an SA's identities do not change during the SA's life). A
    source that cannot promise this (or does not know: no event session) has no epoch or
    None, and is asked again every time."""
    name: str

    def identify(self, sa) -> SAIdentity:
        """The answer for a kernel SA (anything with src, dst, proto, spi, reqid: e.g.
        ipsecchan.xfrm.SA). Never raises for daemon trouble: answers UNAVAILABLE."""

    def snapshot(self) -> list[SAIdentity]:
        """Every SA the source owns now (raises SourceUnavailable)."""

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after `timeout` seconds without one."""

    def close(self) -> None:
        ...


def events(source: IdentitySource, timeout: float | None = None) -> Iterator[Event]:
    """Events of `source` as a generator; ends after `timeout` seconds without one."""
    while (ev := source.next_event(timeout)) is not None:
        yield ev


@functools.lru_cache(maxsize=65536)
def norm_addr(addr) -> str:
    """An address in canonical text form (so that "fd00::1" and "fd00:0::1" compare equal).
    Cached: asked for every SA of every observation."""
    try:
        return str(ipaddress.ip_address(str(addr).split("%")[0]))
    except ValueError:
        return str(addr)


def norm_proto(proto) -> str:
    if isinstance(proto, int):
        return {50: "esp", 51: "ah", 108: "comp"}.get(proto, str(proto))
    return str(proto).lower()


def parse_spi(spi) -> int:
    if isinstance(spi, int):
        return spi
    text = spi.decode() if isinstance(spi, bytes) else str(spi)
    return int(text, 16) if not text.lower().startswith("0x") else int(text, 0)

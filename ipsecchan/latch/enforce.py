"""Carrying out a latch's effects on its socket, with per-socket XFRM policies.

A per-socket policy comes before the whole SPD for that socket's packets (the kernel looks
it up first), so a pinned connection is untouched by SPD changes: its packets leave only
through the latched SAs, whatever the SPD says, and are accepted only through SAs of the
latched kind. BROKEN swaps the pin for a block both ways: nothing of the connection leaves or
is accepted, in clear or otherwise. Closing the latch removes both policies.
"""
from __future__ import annotations

import _socket
import fcntl
import socket
import struct
import termios

from ipsecchan.latch.machine import Alert, Block, Effect, LatchParams, Pin, Release
from ipsecchan.xfrm import clear_socket_policies, socket_policy_bytes
from ipsecchan.xfrm.netlink_xfrm import policy_header, policy_level, template_bytes

_RAW_FAMILY = _socket.socket.family.__get__     # (the property converts to an enum)

_PINS_LIMIT = 256


def _level(sock) -> tuple[int, int]:
    """The setsockopt level and option of the socket's own family. It can differ from the
    family of the connection's packets, which the policy's selector and templates name: an
    IPv6 socket's IPv4 connection (a dual-stack listener's IPv4 client) takes IPV6_XFRM_POLICY
    with an IPv4 selector; an IPv6 selector would not apply to its packets at all."""
    return policy_level(_RAW_FAMILY(sock) if isinstance(sock, _socket.socket) else sock.family)


def _set(sock, family: int, direction: str, templates=(), action: str = "allow") -> None:
    """ipsecchan.xfrm.set_socket_policy, for packets of `family`."""
    sock.setsockopt(*_level(sock),
                    socket_policy_bytes(family, direction, templates, action=action))


def _pin(sock, family: int, params: LatchParams, in_set: bytes | None = None) -> bytes:
    """Pin the socket; returns the IN policy it has now. `in_set`: the IN policy a pin of
    this latch set on it last (None: not known): not set again when unchanged (a rekey moves
    the OUT pin to the new SA; the IN pin names the reqid, which stays)."""
    level = _level(sock)
    sock.setsockopt(level[0], level[1], _out_policy(family, params.out_sas))
    inbound = _in_policy(family, params)
    if inbound != in_set:
        sock.setsockopt(level[0], level[1], inbound)
    return inbound


# The policies of pins, by what they are made of (latches on the same SAs share the engine's
# SAFacts objects; the entry holds them, so that their ids stay theirs). Latches sharing SAs
# are made close together (connections to one peer, a rekey round): small tables serve them,
# and big ones would only hold memory.
_OUT_POLICIES: dict[tuple, tuple] = {}
_IN_POLICIES: dict[tuple, bytes] = {}


def _out_policy(family: int, out_sas) -> bytes:
    key = (family, *map(id, out_sas))
    hit = _OUT_POLICIES.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], out_sas)):
        return hit[1]
    if len(_OUT_POLICIES) >= _PINS_LIMIT:
        _OUT_POLICIES.clear()
    # (Packed from the templates' fields: a rekey re-pins every socket of the SAs it
    # replaces, each pin on a new SPI, so Template objects would be built only to pack.)
    b = policy_header(family, "out") + b"".join(
        [template_bytes(family, sa.src, sa.key[1], sa.protection.proto, sa.key[3], sa.reqid,
                        sa.protection.mode, False) for sa in out_sas])
    _OUT_POLICIES[key] = (out_sas, b)
    return b


def _in_policy(family: int, params: LatchParams) -> bytes:
    """The IN policy of a pin (pin_templates' IN half, packed), by the kinds of SA it names:
    one template per layer of the bundle (reqid, protocol, mode; a tunnel's endpoints)."""
    if len(params.out_sas) == 1 and params.in_sas:
        sa = params.in_sas[0]
        prot = sa.protection
        if prot.mode == "transport":
            # One transport layer (the common case), without building the general key.
            key = (family, sa.reqid, prot.proto)
            b = _IN_POLICIES.get(key)
            if b is None:
                if len(_IN_POLICIES) >= _PINS_LIMIT:
                    _IN_POLICIES.clear()
                b = _IN_POLICIES[key] = policy_header(family, "in") + template_bytes(
                    family, "", "", prot.proto, 0, sa.reqid, "transport", False)
            return b
    key = (family, *[(sa.reqid, sa.protection.proto, sa.protection.mode)
                     if sa.protection.mode == "transport" else
                     (sa.reqid, sa.protection.proto, sa.protection.mode, sa.src, sa.key[1])
                     for sa in _bundle(params.in_sas, len(params.out_sas))])
    b = _IN_POLICIES.get(key)
    if b is None:
        if len(_IN_POLICIES) >= _PINS_LIMIT:
            _IN_POLICIES.clear()
        b = _IN_POLICIES[key] = policy_header(family, "in") + b"".join(
            [template_bytes(*t) for t in pin_templates(params, family)[1]])
    return b


def pin_templates(params: LatchParams, family: int) -> tuple[list[tuple], list[tuple]]:
    """(OUT, IN) templates of a pin, as tuples of Template's fields: OUT by exact SA (SPI and
    destination), IN by reqid, protocol and mode (see machine.Pin for why)."""
    out = [(family, sa.src, sa.key[1], sa.protection.proto, sa.key[3], sa.reqid,
            sa.protection.mode, False) for sa in params.out_sas]
    inbound = [(family, "", "", sa.protection.proto, 0, sa.reqid, sa.protection.mode, False)
               if sa.protection.mode == "transport" else
               (family, sa.src, sa.key[1], sa.protection.proto, 0, sa.reqid, sa.protection.mode,
                False) for sa in _bundle(params.in_sas, len(params.out_sas))]
    return out, inbound


def _bundle(in_sas, depth: int):
    # The IN policy lists one template per layer of the bundle; several accepted SAs of one
    # layer (old and new during a rekey) share its reqid, protocol and mode.
    if depth <= 1:
        return in_sas[:1]           # (the common case: one layer, the first SA's kind)
    seen, layers = set(), []
    for sa in in_sas:
        kind = (sa.reqid, sa.protection.proto, sa.protection.mode)
        if kind not in seen:
            seen.add(kind)
            layers.append(sa)
    return layers[:max(depth, 1)]


def apply(sock: socket.socket, effect: Effect, family: int | None = None) -> None:
    """Carry out one effect on the socket (needs CAP_NET_ADMIN). Alerts are the owner's.
    `family`: the family of the connection's packets (its Flow's; an IPv6 socket carries
    IPv4 ones for an IPv4-mapped peer); None: the socket's own."""
    if family is None and isinstance(effect, (Pin, Block)):
        family = sock.family
    if isinstance(effect, Pin):
        if not effect.params.protected:
            # Latched to cleartext (optional protection): bypass both ways, so that a later SA
            # does not silently change what carries the connection.
            _set(sock, family, "out")
            _set(sock, family, "in")
            return
        _pin(sock, family, effect.params)
    elif isinstance(effect, Block):
        _set(sock, family, "out", action="block")
        _set(sock, family, "in", action="block")
    elif isinstance(effect, Release):
        clear_socket_policies(sock)
    elif not isinstance(effect, Alert):
        raise TypeError(f"not a latch effect: {effect!r}")


def apply_all(sock: socket.socket, effects, family: int | None = None) -> list[Alert]:
    """Carry out every effect in order; return the alerts for the owner."""
    alerts = []
    for e in effects:
        if isinstance(e, Alert):
            alerts.append(e)
        else:
            apply(sock, e, family)
    return alerts


def apply_tracked(sock, effects, family: int, holder) -> list[Alert]:
    """apply_all for a latch that keeps track of its socket's IN pin: holder.pin_in is the
    IN policy its last pin set (None: not known, or not a pin's), kept current here even
    when an effect fails."""
    alerts = []
    for e in effects:
        if isinstance(e, Alert):
            alerts.append(e)
        elif isinstance(e, Pin) and e.params.protected:
            last, holder.pin_in = holder.pin_in, None      # not known while being set
            holder.pin_in = _pin(sock, family, e.params, last)
        else:
            holder.pin_in = None
            apply(sock, e, family)
    return alerts


def unsent(sock) -> int:
    """Bytes in a TCP socket's send queue that its peer has not acknowledged (SIOCOUTQ):
    what a retransmission could still carry out once a block is lifted."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]

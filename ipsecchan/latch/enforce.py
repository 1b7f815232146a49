"""Carrying out a latch's effects on its socket, with per-socket XFRM policies.

A per-socket policy comes before the whole SPD for that socket's packets (the kernel looks
it up first), so a pinned connection is untouched by SPD changes: its packets leave only
through the latched SAs, whatever the SPD says, and are accepted only through SAs of the
latched kind. BROKEN swaps the pin for a block both ways: nothing of the connection leaves or
is accepted, in clear or otherwise. Closing the latch removes both policies.
"""
from __future__ import annotations

import socket

from ipsecchan.latch.machine import Alert, Block, Effect, LatchParams, Pin, Release
from ipsecchan.xfrm import Template, clear_socket_policies, set_socket_policy


def pin_templates(params: LatchParams, family: int
                  ) -> tuple[list[Template], list[Template]]:
    """(OUT, IN) templates of a pin: OUT by exact SA (SPI and destination), IN by reqid,
    protocol and mode (see machine.Pin for why)."""
    out = [Template(family, sa.src, sa.key[1], sa.protection.proto, sa.key[3], sa.reqid,
                    sa.protection.mode, False) for sa in params.out_sas]
    inbound = [Template(family, sa.src if sa.protection.mode != "transport" else "",
                        sa.key[1] if sa.protection.mode != "transport" else "",
                        sa.protection.proto, 0, sa.reqid, sa.protection.mode, False)
               for sa in _bundle(params.in_sas, len(params.out_sas))]
    return out, inbound


def _bundle(in_sas, depth: int):
    # The IN policy lists one template per layer of the bundle; several accepted SAs of one
    # layer (old and new during a rekey) share its reqid, protocol and mode.
    seen, layers = set(), []
    for sa in in_sas:
        kind = (sa.reqid, sa.protection.proto, sa.protection.mode)
        if kind not in seen:
            seen.add(kind)
            layers.append(sa)
    return layers[:max(depth, 1)]


def apply(sock: socket.socket, effect: Effect) -> None:
    """Carry out one effect on the socket (needs CAP_NET_ADMIN). Alerts are the owner's."""
    if isinstance(effect, Pin):
        if not effect.params.protected:
            # Latched to cleartext (optional protection): bypass both ways, so that a later SA
            # does not silently change what carries the connection.
            set_socket_policy(sock, "out")
            set_socket_policy(sock, "in")
            return
        out, inbound = pin_templates(effect.params, sock.family)
        set_socket_policy(sock, "out", out)
        set_socket_policy(sock, "in", inbound)
    elif isinstance(effect, Block):
        set_socket_policy(sock, "out", action="block")
        set_socket_policy(sock, "in", action="block")
    elif isinstance(effect, Release):
        clear_socket_policies(sock)
    elif not isinstance(effect, Alert):
        raise TypeError(f"not a latch effect: {effect!r}")


def apply_all(sock: socket.socket, effects) -> list[Alert]:
    """Carry out every effect in order; return the alerts for the owner."""
    alerts = []
    for e in effects:
        if isinstance(e, Alert):
            alerts.append(e)
        else:
            apply(sock, e)
    return alerts

"""Which policy and which SAs the kernel applies to a connection: the reference model.

This is the specification of the lookup, written for clarity, not speed. The C index
(ipsecchan.xfrm.index) must give the same answers; tests compare the two on random SPDs and
SADs, and compare both with the real kernel in the lab. It follows net/xfrm/xfrm_policy.c and
xfrm_state.c (Linux 6.x):

Policy (per direction, flow as the kernel sees it: OUT src=local dst=remote, IN src=remote
dst=local):
  1. The socket's own policy for that direction, if its selector family is the flow's and its
     selector, mark and if_id match (xfrm_sk_policy_lookup). Otherwise:
  2. The main SPD: among policies of that direction whose selector, mark and if_id match, the
     lowest priority value; at equal priority the older one (xfrm_policy_insert keeps equal
     priorities in insertion order; we take the lower policy index, which the kernel hands
     out in increasing order and keeps across updates).
  3. No policy: the namespace's default policy for that direction (XFRM_MSG_SETDEFAULT:
     accept unless set to block).
Selector match (xfrm_selector_match): both addresses under their prefix lengths, ports under
their masks, L4 protocol equal or 0 in the selector, ifindex equal or 0 in the selector.

OUT SAs (xfrm_tmpl_resolve_one, xfrm_state_find, xfrm_state_look_at): for each template in
order, SA endpoints are the flow's addresses in transport mode and the template's in tunnel and
BEET mode (a template without a source address takes the flow's source, standing in for the
route's). A candidate SA has the template's family, reqid (exactly, 0 included), mode and
protocol, the template's SPI unless that is 0, the policy's mark and if_id, not the WILDRECV
flag, dst equal and src equal (either side may be the wildcard address), is usable (SPI != 0;
larval ACQUIRE states have none), and, when its own selector names a family, that family and
a selector that matches the flow. The kernel takes the best candidate: not dying over dying,
then the newest add_time, then the one installed last. A template with no candidate is
skipped if optional; otherwise the connection has NO_SA (the kernel sends an ACQUIRE and holds
or drops the packet).

IN SAs (xfrm_state_ok, __xfrm_policy_check): the SAs the kernel would accept for the flow: for
each template, every usable SA with the template's protocol and mode, its SPI and reqid unless
0, dst = the flow's dst (transport) or the template's dst (tunnel), in tunnel mode the
template's source if it has one, the policy's if_id if it has one, and a selector matching the
flow (a zero selector matches every flow). Cleartext is accepted with no policy and the
default accepting, with an ALLOW policy without templates, or when every template is optional.
"""
from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from ipsecchan.netlink import split_messages
from ipsecchan.xfrm.messages import Policy, SA, Selector, Template, XfrmEvent, decode_event

XFRM_STATE_WILDRECV = 8
XFRM_INF = (1 << 64) - 1
IPSEC_PROTO_ANY = 255

# Verdicts, per direction.
PROTECTED = "protected"    # every packet goes through (OUT) / must come through (IN) the SAs
BYPASS = "bypass"          # a policy lets the flow through in clear
BLOCK = "block"            # a policy (or the default policy) drops the flow
NO_POLICY = "no-policy"    # no policy applies: cleartext, unprotected
NO_SA = "no-sa"            # a policy requires IPsec but no SA satisfies it (yet)


@dataclass(frozen=True, slots=True)
class Flow:
    """A connection as one of its ends sees it."""
    family: int
    proto: int                  # IPPROTO_TCP, IPPROTO_UDP, ...
    local: str
    local_port: int
    remote: str
    remote_port: int
    mark: int = 0               # the socket's SO_MARK
    ifindex: int = 0            # output interface if known (0: selectors naming one miss)
    if_id: int = 0              # xfrm interface id; 0 for ordinary routes

    def packet(self, direction: str) -> tuple[str, int, str, int]:
        """(src, sport, dst, dport) of this flow's packets in that direction."""
        if direction == "out":
            return self.local, self.local_port, self.remote, self.remote_port
        return self.remote, self.remote_port, self.local, self.local_port


@dataclass(frozen=True, slots=True)
class PathResult:
    """The kernel's treatment of one direction of a flow."""
    direction: str                  # "out" | "in"
    verdict: str
    policy: Policy | None
    per_socket: bool
    sas: tuple[SA, ...]             # OUT: the SA per template in use; IN: SAs accepted
    cleartext_accepted: bool = False    # IN only

    @property
    def protected(self) -> bool:
        return self.verdict == PROTECTED


@dataclass(frozen=True, slots=True)
class Lookup:
    flow: Flow
    out: PathResult
    inbound: PathResult

    @property
    def protected(self) -> bool:
        return self.out.protected and self.inbound.protected and \
            not self.inbound.cleartext_accepted


# ---- matching primitives, shared by the reference and the tests ----

def _addr_int(family: int, text: str) -> int:
    if not text:
        return 0
    return int(ipaddress.ip_address(text)) if family in (socket.AF_INET, socket.AF_INET6) \
        else 0


def _bits(family: int) -> int:
    return 32 if family == socket.AF_INET else 128


def prefix_match(family: int, addr: str, net: str, plen: int) -> bool:
    bits = _bits(family)
    if plen <= 0:
        return True
    plen = min(plen, bits)
    shift = bits - plen
    return (_addr_int(family, addr) >> shift) == (_addr_int(family, net) >> shift)


def selector_match(sel: Selector, family: int, flow: Flow, direction: str) -> bool:
    src, sport, dst, dport = flow.packet(direction)
    return (prefix_match(family, dst, sel.dst, sel.prefixlen_d)
            and prefix_match(family, src, sel.src, sel.prefixlen_s)
            and not ((dport ^ sel.dport) & sel.dport_mask)
            and not ((sport ^ sel.sport) & sel.sport_mask)
            and (sel.proto in (0, flow.proto))
            and (sel.ifindex in (0, flow.ifindex)))


def _mark_match(mark: tuple[int, int] | None, value: int) -> bool:
    v, m = mark or (0, 0)
    return (value & m) == v


def policy_matches(pol: Policy, flow: Flow, direction: str) -> bool:
    return (pol.selector.family == flow.family
            and (pol.if_id or 0) == flow.if_id
            and _mark_match(pol.mark, flow.mark)
            and selector_match(pol.selector, flow.family, flow, direction))


def _is_any(family: int, addr: str) -> bool:
    return _addr_int(family, addr) == 0


def _addr_eq(family: int, a: str, b: str) -> bool:
    return _addr_int(family, a) == _addr_int(family, b)


def sa_usable(sa: SA) -> bool:
    return sa.spi != 0


def soft_expired(sa: SA, now: float) -> bool:
    """Whether the kernel has marked the SA dying (its soft limit passed): dumps do not say, but
    the SA's own counters and limits do."""
    lt = sa.lifetime
    if lt is None:
        return False
    return ((lt.soft_bytes != XFRM_INF and sa.bytes >= lt.soft_bytes)
            or (lt.soft_packets != XFRM_INF and sa.packets >= lt.soft_packets)
            or (0 < lt.soft_add_seconds != XFRM_INF and sa.add_time
                and now >= sa.add_time + lt.soft_add_seconds))


def out_candidate(sa: SA, tmpl: Template, pol: Policy, flow: Flow, dst: str, src: str) -> bool:
    fam = tmpl.family
    pmark = pol.mark or (0, 0)
    return (sa.family == fam and sa.reqid == tmpl.reqid and sa.mode == tmpl.mode
            and sa.proto == tmpl.proto and (tmpl.spi == 0 or sa.spi == tmpl.spi)
            and _mark_match(sa.mark, pmark[0] & pmark[1])
            and (sa.if_id or 0) == (pol.if_id or 0)
            and not sa.flags & XFRM_STATE_WILDRECV
            and _addr_eq(fam, dst, sa.dst)
            and (_addr_eq(fam, src, sa.src) or _is_any(fam, src) or _is_any(fam, sa.src))
            and sa_usable(sa)
            and (sa.selector.family == 0 or (
                sa.selector.family == flow.family
                and selector_match(sa.selector, flow.family, flow, "out"))))


def in_accepts(sa: SA, tmpl: Template, pol: Policy, flow: Flow) -> bool:
    fam = tmpl.family
    if tmpl.mode == "transport":
        dst = flow.packet("in")[2]
        addr_ok = sa.family == flow.family and _addr_eq(fam, sa.dst, dst)
    else:
        addr_ok = (sa.family == fam and _addr_eq(fam, sa.dst, tmpl.dst)
                   and (_is_any(fam, tmpl.src) or _addr_eq(fam, tmpl.src, sa.src)))
    return (addr_ok and sa_usable(sa) and sa.proto == tmpl.proto and sa.mode == tmpl.mode
            and (tmpl.spi == 0 or sa.spi == tmpl.spi)
            and (tmpl.reqid == 0 or sa.reqid == tmpl.reqid)
            and ((pol.if_id or 0) == 0 or (sa.if_id or 0) == pol.if_id)
            and selector_match(sa.selector, flow.family, flow, "in"))


def template_endpoints(tmpl: Template, flow: Flow) -> tuple[str, str]:
    """(dst, src) of the SA an OUT template asks for."""
    src, _sp, dst, _dp = flow.packet("out")
    if tmpl.mode in ("tunnel", "beet"):
        return tmpl.dst, (src if _is_any(tmpl.family, tmpl.src) else tmpl.src)
    return dst, src


# ---- the reference index ----

@dataclass
class _Entry:
    sa: SA
    seq: int
    dying: bool


@dataclass
class ReferenceIndex:
    """The SAD and main SPD of one network namespace, and the kernel's lookup over them.

    Fed with netlink messages (dump parts or notifications) through apply(), or with records
    through the add_/remove_ methods. Per-socket policies in dumps are not kept: nothing in the
    kernel's answer says which socket holds them, so the caller passes a socket's own policies
    to lookup().
    """
    default_in: str = "accept"
    default_out: str = "accept"
    _sas: dict = field(default_factory=dict)       # key -> _Entry
    _policies: dict = field(default_factory=dict)  # (dir, index) -> Policy
    _seq: int = 0

    # -- mutation --
    def clear(self) -> None:
        self._sas.clear()
        self._policies.clear()

    def add_sa(self, sa: SA, *, dying: bool | None = None, now: float | None = None) -> None:
        self._seq += 1
        old = self._sas.get(sa.key)
        if dying is None:
            dying = (old.dying if old else False) or soft_expired(sa, now or time.time())
        # An update keeps the SA's place (the kernel updates it in place).
        self._sas[sa.key] = _Entry(sa, old.seq if old else self._seq, dying)

    def remove_sa(self, key) -> None:
        self._sas.pop(key, None)

    def mark_dying(self, key) -> None:
        if key in self._sas:
            self._sas[key].dying = True

    def flush_sas(self, proto: int = 0) -> None:
        names = {socket.IPPROTO_ESP: "esp", socket.IPPROTO_AH: "ah", 108: "comp"}
        if proto in (0, IPSEC_PROTO_ANY):
            self._sas.clear()
        else:
            name = names.get(proto, str(proto))
            for k in [k for k, e in self._sas.items() if e.sa.proto == name]:
                del self._sas[k]

    def add_policy(self, pol: Policy) -> None:
        if pol.per_socket:
            return
        self._policies[(pol.dir, pol.index)] = pol

    def remove_policy(self, key) -> None:
        self._policies.pop(key, None)

    def flush_policies(self) -> None:
        self._policies.clear()

    def apply_event(self, ev: XfrmEvent) -> None:
        k = ev.kind
        if k in ("sa-new", "sa-update"):
            self.add_sa(ev.sa)
        elif k == "sa-delete" or (k == "sa-expire" and ev.hard):
            self.remove_sa(ev.sa_key)
        elif k == "sa-expire":
            self.mark_dying(ev.sa_key)
        elif k == "sa-flush":
            self.flush_sas(ev.flush_proto)
        elif k in ("policy-new", "policy-update"):
            self.add_policy(ev.policy)
        elif k == "policy-delete" or (k == "policy-expire" and ev.hard):
            self.remove_policy(ev.policy_key)
        elif k == "policy-flush":
            self.flush_policies()

    def apply(self, data) -> int:
        """Apply a buffer of netlink messages; returns how many changed the index."""
        n = 0
        for m in split_messages(data):
            ev = decode_event(m.type, m.payload)
            if ev is not None and ev.kind != "acquire":
                self.apply_event(ev)
                n += 1
        return n

    def load(self, sas: Iterable[SA], policies: Iterable[Policy]) -> None:
        """Replace the whole view by a fresh dump."""
        self.clear()
        now = time.time()
        for sa in sas:
            self.add_sa(sa, now=now)
        for p in policies:
            self.add_policy(p)

    # -- views --
    def sas(self) -> list[SA]:
        return [e.sa for e in sorted(self._sas.values(), key=lambda e: e.seq)]

    def policies(self) -> list[Policy]:
        return sorted(self._policies.values(), key=lambda p: (p.dir, p.index))

    def __len__(self) -> int:
        return len(self._sas) + len(self._policies)

    # -- lookup --
    def find_policy(self, flow: Flow, direction: str,
                    socket_policies: Mapping[str, Policy] | None = None
                    ) -> tuple[Policy | None, bool]:
        sp = (socket_policies or {}).get(direction)
        if sp is not None and policy_matches(sp, flow, direction):
            return sp, True
        best = None
        for pol in self._policies.values():
            if pol.dir != direction or not policy_matches(pol, flow, direction):
                continue
            if best is None or (pol.priority, pol.index) < (best.priority, best.index):
                best = pol
        return best, False

    def lookup(self, flow: Flow, socket_policies: Mapping[str, Policy] | None = None) -> Lookup:
        return Lookup(flow, self._out(flow, socket_policies), self._in(flow, socket_policies))

    def _out(self, flow, socket_policies) -> PathResult:
        pol, per_socket = self.find_policy(flow, "out", socket_policies)
        if pol is None:
            verdict = BLOCK if self.default_out == "block" else NO_POLICY
            return PathResult("out", verdict, None, False, ())
        if pol.action == "block":
            return PathResult("out", BLOCK, pol, per_socket, ())
        chosen = []
        for tmpl in pol.templates:
            dst, src = template_endpoints(tmpl, flow)
            best = None
            for e in self._sas.values():
                if not out_candidate(e.sa, tmpl, pol, flow, dst, src):
                    continue
                rank = (not e.dying, e.sa.add_time, e.seq)
                if best is None or rank > best[0]:
                    best = (rank, e.sa)
            if best is None:
                if tmpl.optional:
                    continue
                return PathResult("out", NO_SA, pol, per_socket, ())
            chosen.append(best[1])
        verdict = PROTECTED if chosen else BYPASS
        return PathResult("out", verdict, pol, per_socket, tuple(chosen))

    def _in(self, flow, socket_policies) -> PathResult:
        pol, per_socket = self.find_policy(flow, "in", socket_policies)
        if pol is None:
            if self.default_in == "block":
                return PathResult("in", BLOCK, None, False, ())
            return PathResult("in", NO_POLICY, None, False, (), cleartext_accepted=True)
        if pol.action == "block":
            return PathResult("in", BLOCK, pol, per_socket, ())
        if not pol.templates:
            return PathResult("in", BYPASS, pol, per_socket, (), cleartext_accepted=True)
        accepted, missing = [], False
        for tmpl in pol.templates:
            these = [e for e in sorted(self._sas.values(), key=lambda e: e.seq)
                     if in_accepts(e.sa, tmpl, pol, flow)]
            accepted.extend(e.sa for e in these if e.sa not in accepted)
            missing |= not these and not tmpl.optional
        optional_only = all(t.optional for t in pol.templates)
        verdict = NO_SA if missing else PROTECTED
        return PathResult("in", verdict, pol, per_socket, tuple(accepted),
                          cleartext_accepted=optional_only)


def socket_policy(family: int, direction: str, templates=(), *, action: str = "allow",
                  priority: int = 0) -> Policy:
    """The Policy record a per-socket policy set by set_socket_policy() amounts to, to pass to
    lookup()."""
    sel = Selector(family, "", "", 0, 0, 0, 0, 0, 0, 0, 0)
    return Policy(direction + "-socket", action, priority, 0, sel, tuple(templates), None,
                  None, None)


__all__ = ["BLOCK", "BYPASS", "Flow", "Lookup", "NO_POLICY", "NO_SA", "PROTECTED",
           "PathResult", "ReferenceIndex", "socket_policy"]

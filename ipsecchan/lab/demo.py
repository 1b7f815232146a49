"""`ipsecchan lab demo`: two hosts with certificate identities, IKEv2 up, TCP over ESP.

Prints, for each side, the peer identity strongSwan reports and the kernel's ESP SA
counters before and after the exchange, then tears everything down.
"""
from __future__ import annotations

import time

from ipsecchan.lab.kernel import Kernel
from ipsecchan.lab.lab import Lab


def _counters(lab: Lab, host: str) -> dict[tuple[str, int], tuple[int, int]]:
    h = lab.host(host)
    return {("out" if s.src in (h.addr4, h.addr6) else "in", s.spi): (s.packets, s.bytes)
            for s in lab.xfrm_states(host) if s.proto == "esp"}


def run(kernel_mode: str = "auto", auth: str = "cert", family: int = 4, out=print) -> int:
    t0 = time.monotonic()
    with Kernel.start(kernel_mode) as kernel, Lab(kernel) as lab:
        out(f"lab kernel: {kernel.kind}, Linux {kernel.release} "
            f"({time.monotonic() - t0:.1f} s)")
        for name in ("alice", "bob"):
            h = lab.add_host(name)
            out(f"host {name}: {h.addr4} {h.addr6}, identity {h.identity.dn}")
        link = lab.ike("alice", "bob", auth=auth, family=family)
        out(f"IKEv2 up: {link.conn} ({auth}, IPv{family}) after {time.monotonic() - t0:.1f} s")
        before = {h: _counters(lab, h) for h in ("alice", "bob")}
        cli, srv = lab.tcp_exchange("alice", "bob", family=family)
        out(f"TCP alice -> bob: {cli.text.strip()}; bob {srv.text.strip().splitlines()[-1]}")
        for name in ("alice", "bob"):
            for child in lab.child_sas(name, link.conn):
                out(f"{name}: strongSwan reports peer {child['remote-id']} "
                    f"(local {child['local-id']}), CHILD_SA {child['protocol']} "
                    f"{child['mode'].lower()} {child['encr-alg']}-{child['encr-keysize']}")
            for (direction, spi), (pkts, nbytes) in sorted(_counters(lab, name).items()):
                p0, b0 = before[name].get((direction, spi), (0, 0))
                out(f"{name}:   ESP SA {direction:3} spi 0x{spi:08x}: {pkts} packets "
                    f"(+{pkts - p0}), {nbytes} bytes (+{nbytes - b0})")
    out(f"torn down; {time.monotonic() - t0:.1f} s in all")
    return 0

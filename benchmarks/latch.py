"""Latching cost in the lab (JSON to stdout): connect+latch against a bare connect, in the same
guest, as a ratio; memory per latch; and the floor (the per-socket policy syscalls alone).

    python benchmarks/latch.py [--count 200]

UML's syscalls are slow, so only ratios within one run mean anything. The server on bob
accepts without latching (its side of the latch comes with the socket API), so this is the
connector's cost.
"""
from __future__ import annotations

import argparse
import json
import sys

from ipsecchan.lab import Kernel, Lab

PROBE = r"""
import json, socket, statistics, sys, time, tracemalloc
from ipsecchan.ike.strongswan import StrongSwanSource
from ipsecchan.latch.engine import Latcher
from ipsecchan.xfrm import Template, clear_socket_policies, set_socket_policy

BOB, VICI, N = sys.argv[1], sys.argv[2], int(sys.argv[3])
src = StrongSwanSource(VICI)
src.wait_connected(10)
lat = Latcher(src)

def bare():
    t = time.perf_counter()
    s = socket.create_connection((BOB, 5000))
    dt = time.perf_counter() - t
    s.close()
    return dt

def latched():
    t = time.perf_counter()
    s = socket.create_connection((BOB, 5000))
    h = lat.latch(s)
    dt = time.perf_counter() - t
    lat.release(h)
    s.close()
    return dt

def floor():
    s = socket.create_connection((BOB, 5000))
    t = time.perf_counter()
    tm = Template(socket.AF_INET, "", BOB, "esp", 0, 1, "transport", False)
    set_socket_policy(s, "out", [tm])
    set_socket_policy(s, "in", [tm])
    clear_socket_policies(s)
    dt = time.perf_counter() - t
    s.close()
    return dt

for fn in (bare, latched):        # warm up
    fn()
res = {}
for name, fn in (("bare_connect", bare), ("connect_latch_release", latched),
                 ("policy_syscalls_floor", floor)):
    xs = sorted(fn() for _ in range(N))
    res[name] = {"median_us": round(statistics.median(xs) * 1e6, 1),
                 "p90_us": round(xs[int(len(xs) * 0.9)] * 1e6, 1)}
res["ratio_latched_to_bare"] = round(res["connect_latch_release"]["median_us"]
                                     / res["bare_connect"]["median_us"], 2)
# Memory per live latch: hold N of them.
tracemalloc.start()
socks = [socket.create_connection((BOB, 5000)) for _ in range(min(N, 300))]
base = tracemalloc.take_snapshot()
handles = [lat.latch(s) for s in socks]
after = tracemalloc.take_snapshot()
grown = sum(st.size_diff for st in after.compare_to(base, "filename"))
res["bytes_per_latch"] = int(grown / len(handles))
for h in handles:
    lat.release(h)
for s in socks:
    s.close()
print(json.dumps(res))
"""

SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5000))
s.listen(1024)
held = []
while True:
    c, _ = s.accept()
    held.append(c)
    if len(held) > 400:
        held.pop(0).close()
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=200)
    opts = ap.parse_args(argv)
    with Kernel.start() as kernel, Lab(kernel) as lab:
        lab.add_host("alice")
        lab.add_host("bob")
        lab.ike("alice", "bob")
        bob = lab.host("bob").addr(4)
        server = lab.spawn("bob", [kernel.python, "-c", SERVER, bob])
        lab.run("bob", ["sleep", "0.5"])
        out = lab.python("alice", PROBE, bob, lab.vici_socket("alice"), str(opts.count),
                         check=True, timeout=600).text
        server.stop()
    res = json.loads(out)
    res["count"] = opts.count
    json.dump(res, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

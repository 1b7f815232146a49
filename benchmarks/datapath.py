"""Data path cost of latched sockets in the lab (JSON to stdout): one-way throughput alice ->
bob over the same ESP SA, a latched ipsecchan socket (both ends) against a plain socket in
the same run, for bulk (64 KiB) and small (100 B) sends.

    python benchmarks/datapath.py [--mbytes 32] [--small 20000] [--rounds 5]

Rounds alternate plain and latched; the ratio is of medians (latched / plain throughput).
A healthy latched socket has no Python code on its data path (the class adds no send/recv),
so the ratio should be ~1.
"""
from __future__ import annotations

import argparse
import json
import sys

from ipsecchan.lab import Kernel, Lab

SERVER = r"""
import socket as std, sys, threading
from ipsecchan import socket as latched

def serve(mod, port):
    ls = mod.create_server((sys.argv[1], port), backlog=64)
    while True:
        c, _ = ls.accept()
        total = 0
        while data := c.recv(1 << 20):
            total += len(data)
        c.sendall(str(total).encode())
        c.close()

threading.Thread(target=serve, args=(std, 6000), daemon=True).start()
serve(latched, 6001)
"""

CLIENT = r"""
import json, socket as std, statistics, sys, time
from ipsecchan import socket as latched
BOB, MB, SMALL, ROUNDS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
BULK, TINY = b"b" * 65536, b"s" * 100

def run(mod, port, msg, count):
    s = mod.create_connection((BOB, port), timeout=60)
    t = time.perf_counter()
    for _ in range(count):
        s.sendall(msg)
    s.shutdown(std.SHUT_WR)
    got = int(s.recv(100))
    dt = time.perf_counter() - t
    assert got == len(msg) * count, got
    latch = getattr(s, "latch", None)
    state = latch.state if latch is not None else None
    s.close()
    return len(msg) * count / dt / 1e6, state

res = {}
for name, msg, count in (("bulk_64k", BULK, MB * 16), ("small_100b", TINY, SMALL)):
    plain, lat = [], []
    for _ in range(ROUNDS):
        plain.append(run(std, 6000, msg, count)[0])
        mbps, state = run(latched, 6001, msg, count)
        assert state == "ESTABLISHED", state
        lat.append(mbps)
    p, l = statistics.median(plain), statistics.median(lat)
    res[name] = {"plain_MBps": round(p, 2), "latched_MBps": round(l, 2),
                 "ratio": round(l / p, 3), "bytes_per_round": len(msg) * count}
print(json.dumps(res))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mbytes", type=int, default=32)
    ap.add_argument("--small", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    opts = ap.parse_args(argv)
    with Kernel.start() as kernel, Lab(kernel) as lab:
        lab.add_host("alice")
        lab.add_host("bob")
        lab.ike("alice", "bob")
        bob = lab.host("bob").addr(4)
        server = lab.spawn("bob", [kernel.python, "-c", SERVER, bob],
                           env={"IPSECCHAN_VICI": lab.vici_socket("bob")})
        lab.run("bob", ["sleep", "1"])
        out = lab.python("alice", CLIENT, bob, str(opts.mbytes), str(opts.small),
                         str(opts.rounds), env={"IPSECCHAN_VICI": lab.vici_socket("alice")},
                         check=True, timeout=1200).text
        server.stop()
    res = json.loads(out)
    res["rounds"] = opts.rounds
    json.dump(res, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

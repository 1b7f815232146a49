"""The C SAD/SPD index against the reference model and the naive way (JSON on stdout).

    python3 benchmarks/lookup.py [--quick]

Host only, no kernel. For 1k, 10k and 100k SAs (and as many policies), two shapes:
  host  a VPN gateway's transport SAs: per peer an OUT and an IN SA, and /32 host-to-host
        policies for each direction;
  mix   the same with wildcards: a quarter of the peers are site-to-site tunnels (/24 to /24,
        tunnel-mode SAs), a quarter have port-restricted policies (TCP/443 only).
Measured: building the index from dump bytes (apply), memory per SA, lookup latency from
Python through the wrapper (median, p99) and in a pure C loop, the pure-Python reference
(ReferenceIndex.lookup), and the naive way without an index: decoding the whole dump per
lookup, then a linear search ("per-lookup dump decode, no kernel": a real dump would add the
kernel's share on top).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import random
import socket
import statistics
import sys
import time

from ipsecchan._native import ffi, lib
from ipsecchan.netlink import split_messages
from ipsecchan.xfrm import encode
from ipsecchan.xfrm.index import Index
from ipsecchan.xfrm.lookup import Flow, ReferenceIndex
from ipsecchan.xfrm.messages import (Algorithm, Lifetime, Policy, SA, Selector, Template,
                                     decode_policy, decode_sa)

INF = (1 << 64) - 1
V4 = socket.AF_INET
GW = "192.0.2.1"
ZERO = Selector(0, "", "", 0, 0, 0, 0, 0, 0, 0, 0)
LT = Lifetime(INF, INF, INF, INF, 0, 0, 0, 0)
AEAD = (Algorithm("aead", "rfc4106(gcm(aes))", 288, 128),)
NOW = int(time.time())


def peer(i: int) -> str:
    return str(ipaddress.IPv4Address(0x0A000000 + i + 1))


def subnet(base: int, i: int) -> str:
    return str(ipaddress.IPv4Address(base + (i << 8)))


def world(n_sas: int, shape: str):
    """(SAs, policies, flows that hit them): n_sas SAs and as many policies."""
    sas, pols, flows = [], [], []
    for i in range(n_sas // 2):
        p, reqid = peer(i), i + 1
        kind = "host" if shape == "host" else ("tunnel", "port", "host", "host")[i % 4]
        mode = "tunnel" if kind == "tunnel" else "transport"
        for direction, src, dst, spi in (("out", GW, p, 0x10000000 + i),
                                         ("in", p, GW, 0x20000000 + i)):
            sas.append(SA(src, dst, V4, "esp", spi, reqid, mode, 0, 0, ZERO, 0, 0, NOW - 60, 0,
                          AEAD, None, None, None, True, None, LT, (0, 0), None))
            t = Template(V4, src if mode == "tunnel" else "0.0.0.0",
                         dst if mode == "tunnel" else "0.0.0.0", "esp", 0, reqid, mode, False)
            if kind == "tunnel":
                local, remote = subnet(0xAC100000, i), subnet(0x64400000, i)   # 172.16/100.64
                s, d = (local, remote) if direction == "out" else (remote, local)
                sel = Selector(V4, s, d, 24, 24, 0, 0, 0, 0, 0, 0)
            elif kind == "port":
                local_port = (0, 0) if direction == "out" else (443, 0xFFFF)
                remote_port = (443, 0xFFFF) if direction == "out" else (0, 0)
                sel = Selector(V4, src, dst, 32, 32, 6, local_port[0], local_port[1],
                               remote_port[0], remote_port[1], 0)
            else:
                sel = Selector(V4, src, dst, 32, 32, 0, 0, 0, 0, 0, 0)
            pols.append(Policy(direction, "allow", 1000 + (i % 7), 8 * (2 * i + 1) +
                               (0 if direction == "in" else 1), sel, (t,), None, None, None))
        if kind == "tunnel":
            flows.append(Flow(V4, 6, subnet(0xAC100000, i)[:-1] + "5", 40000,
                              subnet(0x64400000, i)[:-1] + "9", 443))
        else:
            flows.append(Flow(V4, 6, GW, 40000, p, 443))
    return sas, pols, flows


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def timed(fn, items):
    out = []
    for it in items:
        t0 = time.perf_counter_ns()
        fn(it)
        out.append(time.perf_counter_ns() - t0)
    return out


def c_loop(idx: Index, flows, rounds: int):
    arr = ffi.new("struct ipsecchan_xidx_flow[]", len(flows))
    for c, f in zip(arr, flows):
        ffi.memmove(c.local, int(ipaddress.ip_address(f.local)).to_bytes(16, "big"), 16)
        ffi.memmove(c.remote, int(ipaddress.ip_address(f.remote)).to_bytes(16, "big"), 16)
        c.family, c.proto, c.local_port, c.remote_port = f.family, f.proto, f.local_port, \
            f.remote_port
    ns = ffi.new("uint64_t[]", len(flows) * rounds)
    r = lib.ipsecchan_xidx_bench(idx._x, arr, len(flows), rounds, 0, ns)
    assert r > 0
    return list(ffi.unpack(ns, len(flows) * rounds))


def naive_lookup(dump: bytes, flow: Flow):
    """No index: decode the whole dump, then search it linearly (the reference's scan)."""
    sas, pols = [], []
    for m in split_messages(dump):
        if m.type == lib.XFRM_MSG_NEWSA:
            sas.append(decode_sa(m.payload))
        elif m.type == lib.XFRM_MSG_NEWPOLICY:
            pols.append(decode_policy(m.payload))
    ref = ReferenceIndex()
    ref.load(sas, pols)
    return ref.lookup(flow)


def bench(n: int, shape: str, quick: bool) -> dict:
    rnd = random.Random(n)
    sas, pols, flows = world(n, shape)
    dump = encode.dump(sas, pols)
    sa_dump = encode.dump(sas, [])

    idx = Index()
    empty = idx.memory_bytes()
    t0 = time.perf_counter()
    idx.apply(sa_dump)
    sa_only = idx.memory_bytes() - empty
    idx.clear()
    t0 = time.perf_counter()
    idx.apply(dump)
    build = time.perf_counter() - t0
    total = idx.memory_bytes() - empty

    sample = [rnd.choice(flows) for _ in range(2000 if quick else 20000)]
    cold_ns = timed(idx.lookup, sample[:200])     # first sight: records decoded, then cached
    for f in sample[:200]:
        assert idx.lookup(f).protected, f
    idx.sas(), idx.policies()                      # steady state: every record decoded once
    py_ns = timed(idx.lookup, sample)
    c_ns = c_loop(idx, sample[:5000], 5)

    ref = ReferenceIndex()
    ref.load(sas, pols)
    n_ref = {1000: 100, 10000: 10}.get(n, 3)
    ref_sample = sample[:n_ref]
    ref_ns = timed(ref.lookup, ref_sample)
    for f in ref_sample:
        assert ref.lookup(f) == idx.lookup(f)
    n_naive = {1000: 5, 10000: 2}.get(n, 1)
    naive_ns = timed(lambda f: naive_lookup(dump, f), sample[:n_naive])

    py_med, c_med = statistics.median(py_ns), statistics.median(c_ns)
    naive_med, ref_med = statistics.median(naive_ns), statistics.median(ref_ns)
    return {
        "sas": len(sas), "policies": len(pols), "shape": shape,
        "build_s": round(build, 4), "dump_bytes": len(dump),
        "memory_bytes": total, "memory_per_sa_bytes": round(sa_only / len(sas), 1),
        "memory_per_sa_and_policy_bytes": round(total / len(sas), 1),
        "lookup_python_ns": {"median": py_med, "p99": pct(py_ns, 0.99), "n": len(py_ns)},
        "lookup_python_first_sight_ns": {"median": statistics.median(cold_ns),
                                         "n": len(cold_ns)},
        "lookup_c_loop_ns": {"median": c_med, "p99": pct(c_ns, 0.99), "n": len(c_ns)},
        "reference_python_ns": {"median": ref_med, "n": len(ref_ns)},
        "per_lookup_dump_decode_no_kernel_ns": {"median": naive_med, "n": len(naive_ns)},
        "speedup_vs_per_lookup_dump_decode": {"python_wrapper": round(naive_med / py_med),
                                              "c_loop": round(naive_med / c_med)},
        "speedup_vs_reference": round(ref_med / py_med, 1),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1k and 5k only, fewer lookups")
    args = ap.parse_args(argv)
    sizes = [1000, 5000] if args.quick else [1000, 10000, 100000]
    runs = [bench(n, shape, args.quick) for shape in ("host", "mix") for n in sizes]
    growth = {}
    for shape in ("host", "mix"):
        r = [x for x in runs if x["shape"] == shape]
        growth[shape] = {
            "python_median": round(r[-1]["lookup_python_ns"]["median"]
                                   / r[0]["lookup_python_ns"]["median"], 2),
            "c_loop_median": round(r[-1]["lookup_c_loop_ns"]["median"]
                                   / r[0]["lookup_c_loop_ns"]["median"], 2)}
    json.dump({"benchmark": "xfrm index lookup", "python": sys.version.split()[0],
               "runs": runs, f"growth_{sizes[0]}_to_{sizes[-1]}": growth}, sys.stdout,
              indent=2)
    print()


if __name__ == "__main__":
    main()

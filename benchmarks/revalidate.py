"""Revalidating latches after a rekey of every SA pair, on the host (JSON to stdout).

    python3 benchmarks/revalidate.py [--latches 10000] [--sa-pairs N] [--rounds 5] [--profile]
                                      [--no-memory]

Issue 4's second figure: N latched connections on N SA pairs, then every pair rekeyed as
strongSwan does it (the new inbound SA, the new outbound SA with the same reqid and new SPIs,
the old outbound SA deleted; the old inbound SA deleted a few seconds later, charon's
delete_rekeyed_delay); timed: from the notifications being queued until `Latcher.poll()` has
revalidated every latch, for each of --rounds rekeys in a row (the median is the figure).
Checked: no latch BROKEN, every latch on its new SPIs, every socket's
OUT pin on the new SA.

Pure computation plus one setsockopt per pin, so it runs on the host, not in the lab: the
host kernel has XFRM but no ESP, so SAs cannot be installed. The Latcher gets a view whose
index is the real C Index and whose notifications are kernel-format XFRM messages
(ipsecchan.xfrm.encode) read through XfrmView.poll itself, from a queue of datagrams (one
message each, as the kernel multicasts them) instead of a netlink socket. Identities come from
ipsecchan.ike.static.StaticSource (one reqid rule per peer: each peer its own identity).
--sa-pairs N spreads the latches over N SA pairs (N peers), as on a server whose clients hold
many connections each; the default, one pair per latch, is the worst case and the target's.
Sockets are real connected UDP sockets in a fresh network namespace (the script re-executes
itself under `unshare --net`), so IP_XFRM_POLICY really runs; needs root.

Also reported: latching the N sockets (per latch, against the syscalls it cannot avoid on the
same sockets: getsockname, getpeername, SO_MARK, two IP_XFRM_POLICY, clearing), and Python
memory per live latch (tracemalloc): with an SA pair of its own (so its SA-derived state too:
index records, identity answers, facts), and among N/2 latches sharing one SA pair, made from
empty by a Latcher of their own (what a latch costs by itself, Python and the C index's
tables for it).
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import ipaddress
import json
import os
import pstats
import resource
import socket
import statistics
import subprocess
import sys
import time
import tracemalloc

from ipsecchan.ike.static import StaticSource
from ipsecchan.latch.engine import Latcher
from ipsecchan.latch.machine import LatchState
from ipsecchan.xfrm import Template, clear_socket_policies, dump_policies, set_socket_policy
from ipsecchan.xfrm import encode
from ipsecchan.xfrm.index import FOLLOW_ENTRY_BYTES, Index
from ipsecchan.xfrm.messages import Algorithm, Lifetime, Policy, SA, Selector
from ipsecchan.xfrm.monitor import XfrmView

V4 = socket.AF_INET
GW = "10.0.0.1"
PORT = 5000
INF = (1 << 64) - 1
LT = Lifetime(INF, INF, INF, INF, 0, 0, 0, 0)
AEAD = (Algorithm("aead", "rfc4106(gcm(aes))", 288, 128),)
NOW = int(time.time())


def peer(i: int) -> str:
    return str(ipaddress.IPv4Address(0x0A010000 + i))        # 10.1.0.0 + i


def host_sel(src: str, dst: str) -> Selector:
    return Selector(V4, src, dst, 32, 32, 0, 0, 0, 0, 0, 0)


def sa(src: str, dst: str, spi: int, reqid: int, add_time: int) -> SA:
    # strongSwan's transport SAs: a host-to-host selector, the CHILD_SA's reqid.
    return SA(src, dst, V4, "esp", spi, reqid, "transport", 0, 0, host_sel(src, dst), 0, 0,
              add_time, 0, AEAD, None, None, None, True, None, LT, (0, 0), None)


def pair(i: int, gen: int, add_time: int) -> tuple[SA, SA]:
    """(outbound, inbound) SA of peer i, generation gen (0: before the rekey)."""
    reqid = i + 1
    out = sa(GW, peer(i), 0x10000000 + (gen << 24) + i, reqid, add_time)
    inbound = sa(peer(i), GW, 0x40000000 + (gen << 24) + i, reqid, add_time)
    return out, inbound


def policies(i: int) -> list[Policy]:
    reqid, p = i + 1, peer(i)
    t = Template(V4, "", "", "esp", 0, reqid, "transport", False)
    return [Policy("out", "allow", 1000, 8 * (2 * i) + 1, host_sel(GW, p), (t,), None, None,
                   None),
            Policy("in", "allow", 1000, 8 * (2 * i + 1), host_sel(p, GW), (t,), None, None,
                   None)]


class FeedMonitor:
    """XfrmMonitor's read() over a queue of datagrams instead of a netlink socket."""

    def __init__(self) -> None:
        self.datagrams: collections.deque[bytes] = collections.deque()

    def read(self) -> bytes | None:
        return self.datagrams.popleft() if self.datagrams else None

    def close(self) -> None:
        pass


class FeedView(XfrmView):
    """XfrmView (its poll(): split, decode_event, index.apply) fed kernel-format bytes."""

    def __init__(self, index, dump: bytes) -> None:
        self.index = index
        self.light = True                # as the Latcher's own view
        self.resyncs = 0
        self.monitor = FeedMonitor()
        self.index.clear()
        self.index.apply(dump)
        self.loaded_at = time.monotonic()

    def feed(self, messages) -> None:
        self.monitor.datagrams.extend(messages)      # one message per datagram

    def poll(self, timeout: float = 0.0):
        t = time.perf_counter()
        try:
            return super().poll(timeout)
        finally:
            SPENT["view.poll (XFRM decode + index apply)"] += time.perf_counter() - t

    def wait(self, timeout: float) -> bool:
        return bool(self.monitor.datagrams)

    def resync(self) -> None:
        raise RuntimeError("a fed view cannot resync")


# Where revalidation time goes: the view (decoding notifications, applying them to the index),
# the index's lookups (first sight of a record decodes it), the identity source, and the rest
# (the engine: registry, observations, the latch machines, enforcement).
SPENT: dict[str, float] = collections.defaultdict(float)


class TimedIndex(Index):
    def lookup(self, flow, socket_policies=None):
        t = time.perf_counter()
        try:
            return super().lookup(flow, socket_policies)
        finally:
            SPENT["index.lookup"] += time.perf_counter() - t

    def lookup_brief(self, flow):
        t = time.perf_counter()
        try:
            return super().lookup_brief(flow)
        finally:
            SPENT["index.lookup"] += time.perf_counter() - t

    def revalidate(self, slots):
        t = time.perf_counter()
        try:
            return super().revalidate(slots)
        finally:
            SPENT["index.revalidate (C: followed latches)"] += time.perf_counter() - t


class TimedStaticSource(StaticSource):
    def identify(self, sa):
        t = time.perf_counter()
        try:
            return super().identify(sa)
        finally:
            SPENT["identity source"] += time.perf_counter() - t


def _stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median_us": round(statistics.median(xs) * 1e6, 2),
            "p90_us": round(xs[int(len(xs) * 0.9)] * 1e6, 2), "n": len(xs)}


def floor_syscalls(socks, pins) -> list[float]:
    """The syscalls a latch cannot avoid, per socket: addresses, mark, OUT+IN pin, clear."""
    out = []
    for s, (tout, tin) in zip(socks, pins):
        t = time.perf_counter()
        s.getsockname()
        s.getpeername()
        s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
        set_socket_policy(s, "out", [tout])
        set_socket_policy(s, "in", [tin])
        clear_socket_policies(s)
        out.append(time.perf_counter() - t)
    return out


def _memory(lat, socks, count: int) -> dict:
    """Python memory per live latch (tracemalloc): latching `socks` (each on an SA pair of its
    own)."""
    res: dict = {}
    tracemalloc.start(12)
    base = tracemalloc.take_snapshot()
    for s in socks:
        lat.latch(s)
    snap = tracemalloc.take_snapshot()
    tracemalloc.stop()
    diffs = snap.compare_to(base, "traceback")
    grown = sum(st.size_diff for st in diffs)
    res["bytes_per_live_latch"] = int(grown / count)
    # Outside Python's heap: the C index's table of followed latches (revalidation in C),
    # its slots allocated in doublings.
    res["c_follow_table_bytes_per_latch"] = int(lat.view.index.follow_memory_bytes()
                                                / len(lat.latches()))
    res["c_follow_entry_bytes"] = FOLLOW_ENTRY_BYTES
    # and its watch of every latch's peer (which latches SA notifications reach).
    res["c_watch_bytes_per_latch"] = int(lat.view.index.watch_memory_bytes()
                                         / len(lat.latches()))
    # By the package that allocated it: ipsecchan/latch is the latches' own; ipsecchan/xfrm
    # is the index's decoded records and answers, one set per SA (here each latch has an SA
    # pair of its own; latches that share SAs share these).
    by_part: dict[str, int] = collections.defaultdict(int)
    for st in diffs:
        # The innermost frame in ipsecchan says whose it is (a dataclass's generated
        # __init__, say, is its caller's).
        names = [f.filename for f in st.traceback if "ipsecchan/" in f.filename]
        name = names[-1] if names else "?"
        part = next((p for p in ("ipsecchan/latch", "ipsecchan/xfrm", "ipsecchan/ike")
                     if p in name), "other")
        by_part[part] += st.size_diff
    res["bytes_per_live_latch_by_part"] = {k: int(v / count)
                                           for k, v in sorted(by_part.items())}
    del snap, base
    return res


def _memory_sharing(count: int) -> dict:
    """What a latch costs by itself: `count` connections sharing one SA pair (the SA-derived
    state, index records, identities and facts, shared), latched by a Latcher of their own
    from empty, so that the growth of its tables is amortized over all of them (measured
    among thousands of earlier latches, one doubling of a table would fall on a few)."""
    old = pair(0, 0, NOW)
    view = FeedView(Index(), encode.dump(old, policies(0)))
    lat = Latcher(StaticSource({"sas": [{"reqid": 1, "local": "gw", "peer": "peer0"}]}), view)
    shared = []
    for _ in range(count + 1):
        s = socket.socket(V4, socket.SOCK_DGRAM)
        s.connect((peer(0), PORT))
        shared.append(s)
    lat.latch(shared[0])                 # the shared state exists before the measurement
    index = view.index
    c_before = index.follow_memory_bytes() + index.watch_memory_bytes()
    tracemalloc.start(1)
    base = tracemalloc.take_snapshot()
    for s in shared[1:]:
        lat.latch(s)
    snap = tracemalloc.take_snapshot()
    tracemalloc.stop()
    py = sum(st.size_diff for st in snap.compare_to(base, "filename")) / count
    c = (index.follow_memory_bytes() + index.watch_memory_bytes() - c_before) / count
    del snap, base
    lat.close()
    for s in shared:
        s.close()
    return {"bytes_per_live_latch_sharing_sas": int(py),
            "c_bytes_per_latch_sharing_sas": int(c),
            "latches_sharing_sas": count}


def run(n: int, profile: bool, memory: bool = True, peers: int | None = None,
        rounds: int = 5) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = n + n // 2 + 256              # the latches' sockets, the shared-SA ones, spare
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, need) if hard > 0 else need,
                                                    hard))
    npeers = min(peers or n, n)
    res: dict = {"benchmark": "latch revalidation after rekeys (host)", "latches": n,
                 "sa_pairs": npeers, "python": sys.version.split()[0]}
    # Latch i is on SA pair i % npeers (with as many pairs as latches, each has its own).
    old = [pair(i, 0, NOW - 3600) for i in range(npeers)]
    new = [pair(i, 1, NOW) for i in range(npeers)]
    pols = [p for i in range(npeers) for p in policies(i)]
    view = FeedView(TimedIndex(), encode.dump([s for p in old for s in p], pols))
    rules = [{"reqid": i + 1, "local": "gw", "peer": f"peer{i}"} for i in range(npeers)]
    lat = Latcher(TimedStaticSource({"sas": rules}), view)

    socks = []
    for i in range(n):
        s = socket.socket(V4, socket.SOCK_DGRAM)
        s.connect((peer(i % npeers), PORT))
        socks.append(s)

    # The floor, on these very sockets, pinned as their latches will be.
    pins = [(Template(V4, GW, peer(j), "esp", old[j][0].spi, j + 1, "transport", False),
             Template(V4, "", "", "esp", 0, j + 1, "transport", False))
            for j in (i % npeers for i in range(n))]
    res["floor_per_socket"] = _stats(floor_syscalls(socks, pins))

    # Latching: the first half timed, the second under tracemalloc (memory per live latch;
    # tracemalloc slows allocation down, so it times nothing).
    half = n // 2
    times = []
    for s in socks[:half]:
        t = time.perf_counter()
        lat.latch(s)
        times.append(time.perf_counter() - t)
    if not memory:
        for s in socks[half:]:
            lat.latch(s)
    else:
        res.update(_memory(lat, socks[half:], n - half))
    res["latch_per_socket"] = _stats(times)
    res["latch_over_floor"] = round(res["latch_per_socket"]["median_us"]
                                    / res["floor_per_socket"]["median_us"], 2)
    handles = lat.latches()
    assert len(handles) == n and all(h.state is LatchState.ESTABLISHED for h in handles)
    by_sock = {h.sock: h for h in handles}
    order = [by_sock[s] for s in socks]

    def until_done(view, messages, done) -> tuple[float, int]:
        # The time in poll() (the checks of the latches between polls are this script's).
        view.feed(messages)
        polls, spent = 0, 0.0
        while True:
            t = time.perf_counter()
            lat.poll()
            spent += time.perf_counter() - t
            polls += 1
            if done():
                return spent, polls
            if polls > 10:
                raise AssertionError("latches not revalidated after 10 polls")

    # `rounds` rekeys of every SA pair, one after the other (this machine's speed varies from
    # one second to the next: the median of the rounds is the figure). Each as charon does it
    # per CHILD_SA: new inbound SA, new outbound SA, old outbound deleted; the old inbound SA
    # only after delete_rekeyed_delay (phase 2).
    rounds_out = []
    prof = cProfile.Profile() if profile else None
    alerts_before = 0
    for r in range(rounds):
        old = [pair(i, r, NOW - 3600 + r) for i in range(npeers)]
        new = [pair(i, r + 1, NOW - 3600 + r + 1) for i in range(npeers)]
        phase1, phase2 = [], []
        for (o_out, o_in), (n_out, n_in) in zip(old, new):
            phase1 += [encode.newsa(n_in), encode.newsa(n_out), encode.delsa(o_out)]
            phase2.append(encode.delsa(o_in))

        def moved():
            return all(h.latch.params.out_sas[0].key[3] == new[i % npeers][0].spi
                       for i, h in enumerate(order))

        def only_new_inbound():
            return all([s.key[3] for s in h.latch.params.in_sas] == [new[i % npeers][1].spi]
                       for i, h in enumerate(order))

        SPENT.clear()
        if prof:
            prof.enable()
        t1, polls1 = until_done(view, phase1, moved)
        t2, polls2 = until_done(view, phase2, only_new_inbound)
        if prof:
            prof.disable()
        broken = sum(h.state is not LatchState.ESTABLISHED for h in order)
        alerts = sum(sum(1 for a in h.alerts if a.rekeyed) for h in order)
        rekey_alerts, alerts_before = alerts - alerts_before, alerts
        # Every socket's OUT pin is on its new SA (the kernel's own SPD dump says so).
        spis = {new[j][0].spi for j in range(npeers)}
        pinned_new = sum(1 for p in dump_policies() if p.dir == "out-socket" and p.templates
                         and p.templates[0].spi in spis)
        spent = {k: round(v, 3) for k, v in SPENT.items()}
        spent["engine (the rest)"] = round(t1 + t2 - sum(SPENT.values()), 3)
        rounds_out.append({
            "messages": len(phase1) + len(phase2),
            "rekey_s": round(t1, 3), "rekey_polls": polls1,
            "old_inbound_deleted_s": round(t2, 3), "old_inbound_polls": polls2,
            "total_s": round(t1 + t2, 3), "broken": broken, "rekey_alerts": rekey_alerts,
            "out_pins_on_new_sa": pinned_new, "time_s_by_part": spent})
        assert broken == 0, f"{broken} latches broken by a rekey"
        # (ALERTS_LIMIT bounds the alerts a handle keeps: count this round's rekeys only
        # while every one is kept.)
        assert pinned_new == n and (rekey_alerts == n or r >= 15), (rekey_alerts, pinned_new)
    if prof:
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    totals = sorted(x["total_s"] for x in rounds_out)
    median = statistics.median(totals)
    res["revalidate"] = {
        "rounds": rounds_out, "total_s_median": round(median, 3),
        "total_s_min": totals[0], "per_latch_us_median": round(median / n * 1e6, 1),
    }

    t = time.perf_counter()
    for h in order:
        lat.release(h)
    res["release_per_socket_us"] = round((time.perf_counter() - t) / n * 1e6, 2)
    for s in socks:
        s.close()
    res["targets"] = {"revalidate_s<=1 (median)": median <= 1.0}
    if memory:
        res.update(_memory_sharing(n - n // 2))
        res["targets"].update({
            "bytes_per_latch<=2048": res["bytes_per_live_latch"] <= 2048,
            "bytes_per_latch_sharing_sas (Python + C)<=2048":
                res["bytes_per_live_latch_sharing_sas"] + res["c_bytes_per_latch_sharing_sas"]
                <= 2048})
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latches", type=int, default=10000)
    ap.add_argument("--sa-pairs", type=int, default=None,
                    help="SA pairs the latches spread over (default: one per latch)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="rekeys of every SA pair, one after the other (the median counts)")
    ap.add_argument("--profile", action="store_true", help="cProfile to stderr")
    ap.add_argument("--no-memory", action="store_true",
                    help="skip the memory measurements (tracemalloc makes them slow)")
    ap.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    if not opts.in_netns:
        # A fresh network namespace: lo up with the gateway's address; peers routed to it.
        script = ("ip link set lo up && ip addr add 10.0.0.1/8 dev lo && "
                  'exec "$0" "$@"')
        argv = [sys.executable, os.path.abspath(__file__), "--in-netns",
                "--latches", str(opts.latches)] + (["--profile"] if opts.profile else []) \
            + (["--no-memory"] if opts.no_memory else []) \
            + (["--sa-pairs", str(opts.sa_pairs)] if opts.sa_pairs else []) \
            + ["--rounds", str(opts.rounds)]
        return subprocess.call(["unshare", "--net", "sh", "-c", script, *argv])
    json.dump(run(opts.latches, opts.profile, not opts.no_memory, opts.sa_pairs, opts.rounds),
              sys.stdout,
              indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

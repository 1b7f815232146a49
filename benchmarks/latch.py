"""Latching cost (issues 4 and 6), one JSON object on stdout: connect+accept+latch against a
bare connect+accept in the lab, in-process (root) and through the broker (uid nobody), with
the floor each mode cannot go below and memory per live latch; revalidation after rekeys on
the host (benchmarks/revalidate.py).

    python3 benchmarks/latch.py [--mode inproc|broker|both] [--count 100] [--hold 50]
                                [--host-latches 10000] [--no-lab] [--no-host] [--profile]

Lab part: user-mode-linux, hosts alice and bob, strongSwan with certificates, one ESP
transport CHILD_SA. Each mode boots its own guest (a freeze of one guest cannot take the
other mode's figures along, and each starts with a clean SPD). The guest has one CPU and
every system call costs tens of microseconds (a clock read too: UML gives its processes no
vDSO), so only ratios within one mode mean anything.

  inproc  alice and bob are root processes with their own ipsecchan.latch.engine.Latcher
          (identities from their charon over VICI).
  broker  `ipsecchan daemon` runs in each namespace (Lab.start_broker, which runs it with
          -v); alice and bob run as nobody with no capabilities (Lab.unprivileged) and
          latch through ipsecchan.broker.client.BrokerClient, which has the Latcher's
          interface.

--count rounds (after 5 warm-up ones), each a bare then a latched connection, with a 50 ms
pause every 20 rounds (a precaution: the guest can freeze after bursts of XFRM changes):

  bare     alice connects to a plain listener; bob accepts and sends 1 byte; alice receives
           it. Timed on alice from before connect() to the byte, so bob's accept is inside.
  latched  the same on a listener latched with listen(), alice calling latch(sock) right
           after connect() and bob accept(listener, conn) before sending the byte. Then each
           end times its own release(), and closes.
  floor    timed on the bare rounds' sockets after the timed window, on both ends. inproc:
           the system calls a latch cannot avoid (getsockname, getpeername, IP_XFRM_POLICY
           OUT and IN, clearing them). broker: one request/reply round trip with the
           broker, standing for the latch (a release of an unknown latch, on a connection
           of its own: the broker does nothing else; the client sends its releases without
           waiting for a reply); the in-process floor, which the broker pays as well, comes
           on top.

Reported per mode: median and p90 of each; ratio_latched_to_bare, the target's figure, is
(latched + both releases) / bare, also given without the releases; floor/bare; what remains
above the floor as a ratio to bare ((latched with releases - bare - floor) / bare); the cost
of one getppid() in that guest (mean of 200). Memory: tracemalloc growth per live latch in
the latching process while --hold latched connections are held (connectors on alice,
accepted ones on bob); in broker mode that is the client's share, and the broker's VmRSS
growth per latch is added (coarse: whole pages, and the broker reuses memory its earlier
latches freed).

--profile: cProfile of the latched rounds in the guest processes, to stderr. Its call counts
are exact; its times are inflated, since each of its clock reads is a system call there.

Host part: benchmarks/revalidate.py (10k latches on 10k SA pairs, every pair rekeyed, time
until poll() has revalidated them all; see there), run as a subprocess.

Sections "lab_inprocess", "lab_broker" and "host" are null when not run; "targets" holds
booleans (null when not measured): in-process latched/bare <= 1.25, broker <= 2, bytes per
in-process latch <= 2048, and revalidate.py's. A missed target is reported, not failed on;
the exit status is 1 only when a part could not be measured (its section then holds
"error"). Nothing waits without a timeout.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
import tracemalloc

# Ports on bob, per guest.
BARE, LATCHED, HELD, CONTROL = 5000, 5001, 5002, 5003
WARM_UP = 5
PAUSE_EVERY, PAUSE_S = 20, 0.05
# Seconds. A normal mode takes ~20 s after boot; these only bound a stuck one.
GUEST_TIMEOUT = 90          # a guest process still running then dumps its stacks and exits
CLIENT_TIMEOUT = GUEST_TIMEOUT + 10
MODE_BUDGET = 120           # one mode's lab from boot to its figures (tear-down excepted)
HOST_TIMEOUT = 900


# ---- in the guest: run as `python3 benchmarks/latch.py --guest-server|--guest-client ...`
# (the guest reads this file through its read-only hostfs root). Not as inline scripts: a
# request line of more than ~4 KiB wedges the lab agent's console channel for good. ----

def _guard() -> None:
    # A stuck guest process says where it is stuck, then exits (the controller reports it).
    import faulthandler
    faulthandler.dump_traceback_later(GUEST_TIMEOUT, exit=True)


def _backend(mode: str, where: str):
    """The latching backend: a Latcher over charon's VICI socket, or a broker client."""
    if mode == "broker":
        from ipsecchan.broker.client import BrokerClient
        return BrokerClient(where)
    from ipsecchan.ike.strongswan import StrongSwanSource
    from ipsecchan.latch.engine import Latcher
    src = StrongSwanSource(where)
    if not src.wait_connected(10):
        raise SystemExit(f"no VICI session at {where}")
    return Latcher(src)


class Floor:
    """What latching one end costs at least, timed on a connected socket (see the docstring)."""

    def __init__(self, mode: str, where: str, peer: str):
        from ipsecchan.broker import protocol
        from ipsecchan.xfrm import Template, clear_socket_policies, set_socket_policy
        self.protocol, self.set, self.clear = protocol, set_socket_policy, clear_socket_policies
        self.mode = mode
        self.out = [Template(socket.AF_INET, "", peer, "esp", 0, 0, "transport", False)]
        self.inbound = [Template(socket.AF_INET, "", "", "esp", 0, 0, "transport", False)]
        if mode == "broker":
            self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.conn.connect(where)

    def __call__(self, s: socket.socket) -> float:
        t = time.perf_counter()
        if self.mode == "broker":
            self._round_trip()
        else:
            s.getsockname()
            s.getpeername()
            self.set(s, "out", self.out)
            self.set(s, "in", self.inbound)
            self.clear(s)
        return time.perf_counter() - t

    def _round_trip(self) -> None:
        self.protocol.send(self.conn, {"op": "release", "id": 1, "latch": 0})
        reply, _ = self.protocol.recv(self.conn)
        if not reply or reply["ok"]:
            raise RuntimeError(f"the broker answered a release of no latch with {reply}")

    def broker_rss(self) -> int | None:
        """The broker's resident memory in bytes (broker mode), read from /proc."""
        if self.mode != "broker":
            return None
        pid = struct.unpack("3i", self.conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                       12))[0]
        with open(f"/proc/{pid}/status") as f:
            kb = next(line for line in f if line.startswith("VmRSS:")).split()[1]
        return int(kb) * 1024


def _recv_exact(s: socket.socket, n: int) -> bytes:
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("peer closed")
        b += c
    return b


def _profiler(on: str):
    import cProfile
    return cProfile.Profile() if on == "1" else None


@contextlib.contextmanager
def _profiled(prof):
    if prof is None:
        yield
        return
    prof.enable()
    try:
        yield
    finally:
        prof.disable()


def _print_profile(prof, title: str) -> None:
    if prof is not None:
        import pstats
        print(f"==== {title} ====", file=sys.stderr)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(30)


def guest_server(mode: str, addr: str, peer: str, where: str, profile: str) -> None:
    """bob: the bare, latched (listen()) and held listeners, and alice's control line."""
    _guard()
    lat = _backend(mode, where)
    floor = Floor(mode, where, peer)
    prof = _profiler(profile)

    def listening(port):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(128)
        return s

    bare, latched, hold, ctl_l = (listening(p) for p in (BARE, LATCHED, HELD, CONTROL))
    listener = lat.listen(latched)
    held, base, rss, latched_seen = [], None, None, 0
    print("ready", flush=True)
    ctl, _ = ctl_l.accept()
    while True:
        ready = select.select([bare, latched, hold, ctl], [], [])[0]
        if bare in ready:
            c, _ = bare.accept()
            c.send(b"x")
            _recv_exact(c, 1)                   # alice's timed window is over
            c.send(struct.pack("=d", floor(c)))
            c.close()
        if latched in ready:
            latched_seen += 1
            rounds_prof = prof if latched_seen > WARM_UP else None
            with _profiled(rounds_prof):
                c, _ = latched.accept()
                h = lat.accept(listener, c)
                c.send(b"x")
            if h.state.value != "ESTABLISHED":
                raise RuntimeError(f"accepted latch {h.state.value}")
            _recv_exact(c, 1)
            with _profiled(rounds_prof):
                t = time.perf_counter()
                lat.release(h)
                dt = time.perf_counter() - t
            c.send(struct.pack("=d", dt))
            c.close()
        if hold in ready:
            c, _ = hold.accept()
            held.append((c, lat.accept(listener, c)))
            c.send(b"x")
        if ctl in ready:
            cmd = ctl.recv(1)
            if cmd == b"H":
                rss = floor.broker_rss()
                tracemalloc.start()
                base = tracemalloc.take_snapshot()
                ctl.send(b"k")
            elif cmd == b"R":
                snap = tracemalloc.take_snapshot()
                tracemalloc.stop()
                grown = sum(st.size_diff for st in snap.compare_to(base, "filename"))
                rep = {"bytes_per_accepted_latch": int(grown / len(held)),
                       "held_accepted_states": sorted({h.state.value for _, h in held})}
                if rss is not None:
                    rep["broker_rss_bytes_per_accepted_latch"] = int(
                        (floor.broker_rss() - rss) / len(held))
                del snap, base
                for c, h in held:
                    lat.release(h)
                    c.close()
                held = []
                data = json.dumps(rep).encode()
                ctl.send(struct.pack("=I", len(data)) + data)
            else:
                break
    lat.release(listener)
    lat.close()
    _print_profile(prof, f"{mode}: bob, accept() + release() of the latched rounds")


def _st(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median_us": round(statistics.median(xs) * 1e6, 1),
            "p90_us": round(xs[int(len(xs) * 0.9)] * 1e6, 1)}


def guest_client(mode: str, bob: str, where: str, n: int, hold: int, profile: str) -> None:
    """alice: bare and latched rounds alternating, then the held latches' memory."""
    import ipsecchan
    _guard()
    lat = _backend(mode, where)
    floor = Floor(mode, where, bob)
    ctl = socket.create_connection((bob, CONTROL))

    def bare():
        t = time.perf_counter()
        s = socket.create_connection((bob, BARE))
        _recv_exact(s, 1)
        dt = time.perf_counter() - t
        mine = floor(s)
        s.send(b"d")
        theirs = struct.unpack("=d", _recv_exact(s, 8))[0]
        s.close()
        return dt, mine, theirs

    def latched(prof=None):
        with _profiled(prof):
            t = time.perf_counter()
            s = socket.create_connection((bob, LATCHED))
            h = lat.latch(s)
            _recv_exact(s, 1)
            dt = time.perf_counter() - t
            state = h.state.value
            t = time.perf_counter()
            lat.release(h)
            rel = time.perf_counter() - t
        if state != "ESTABLISHED":
            raise RuntimeError(f"connector latch {state}")
        s.send(b"d")
        rel_bob = struct.unpack("=d", _recv_exact(s, 8))[0]
        s.close()
        return dt, rel, rel_bob

    for _ in range(WARM_UP):           # identity caches, the listener, code paths
        bare()
        latched()
    prof = _profiler(profile)
    B, L = [], []
    for i in range(n):
        B.append(bare())
        L.append(latched(prof))
        if i % PAUSE_EVERY == PAUSE_EVERY - 1:
            time.sleep(PAUSE_S)
    _print_profile(prof, f"{mode}: alice, connect + latch() + release() of the latched rounds")

    # Lab.unprivileged's nobody may run another libpython than root does: said, not assumed.
    res = {"guest_ipsecchan": ipsecchan.__file__,
           "guest_python": f"{sys.version.split()[0]} ({sys.prefix})"}
    res["bare_connect_accept"] = _st([b[0] for b in B])
    res["latched_connect_accept"] = _st([x[0] for x in L])
    res["release_connector"] = _st([x[1] for x in L])
    res["release_accepted"] = _st([x[2] for x in L])
    res["latched_with_release"] = _st([sum(x) for x in L])
    res["floor_connector"] = _st([b[1] for b in B])
    res["floor_accepted"] = _st([b[2] for b in B])
    res["floor_both_ends"] = _st([b[1] + b[2] for b in B])
    bare_m = res["bare_connect_accept"]["median_us"]
    lat_m = res["latched_with_release"]["median_us"]
    floor_m = res["floor_both_ends"]["median_us"]
    res["ratio_latched_to_bare"] = round(lat_m / bare_m, 2)
    res["ratio_latched_to_bare_release_excluded"] = round(
        res["latched_connect_accept"]["median_us"] / bare_m, 2)
    res["ratio_floor_to_bare"] = round(floor_m / bare_m, 2)
    res["ratio_above_floor_to_bare"] = round((lat_m - bare_m - floor_m) / bare_m, 2)
    t = time.perf_counter()
    for _ in range(200):
        os.getppid()
    res["syscall_getppid_us"] = round((time.perf_counter() - t) / 200 * 1e6, 1)

    # Memory per live latch, both ends: `hold` latched connections at once.
    ctl.send(b"H")
    _recv_exact(ctl, 1)
    socks = [socket.create_connection((bob, HELD)) for _ in range(hold)]
    for s in socks:
        _recv_exact(s, 1)                       # accepted and latched on bob
    rss = floor.broker_rss()
    tracemalloc.start()
    base = tracemalloc.take_snapshot()
    handles = [lat.latch(s) for s in socks]
    snap = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(x.size_diff for x in snap.compare_to(base, "filename"))
    res["bytes_per_connector_latch"] = int(grown / hold)
    if rss is not None:
        res["broker_rss_bytes_per_connector_latch"] = int((floor.broker_rss() - rss) / hold)
    res["held_connector_states"] = sorted({h.state.value for h in handles})
    ctl.send(b"R")
    k = struct.unpack("=I", _recv_exact(ctl, 4))[0]
    res.update(json.loads(_recv_exact(ctl, k)))
    for h in handles:
        lat.release(h)
    for s in socks:
        s.close()
    ctl.send(b"Q")
    lat.close()
    res["count"], res["hold"] = n, hold
    print(json.dumps(res))


# ---- the controller ----

class LabStuck(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: int):
    """Raise LabStuck in the main thread after `seconds` (a frozen guest answers nothing,
    and every lab call would otherwise wait out its own timeout first)."""
    def expire(signum, frame):
        raise LabStuck(f"the lab did not finish within {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace").strip()


def lab_mode(mode: str, count: int, hold: int, profile: bool) -> dict:
    """One mode's figures, in a guest of its own; raises with the reason when it cannot."""
    from ipsecchan.lab import Kernel, Lab
    started = time.monotonic()
    print(f"latch.py: {mode}: starting a lab kernel", file=sys.stderr, flush=True)
    kernel = Kernel.start()
    lab = None
    try:
        with _deadline(MODE_BUDGET):
            lab = Lab(kernel)
            res = _measure(lab, mode, count, hold, profile)
    except (TimeoutError, LabStuck) as exc:
        console = "\n".join(kernel.console().splitlines()[-20:])
        raise LabStuck(f"{exc}; the guest's console ends:\n{console}") from None
    finally:
        if lab is not None:
            _close_lab(kernel, lab)
        kernel.close()          # kills the guest if it no longer answers
    print(f"latch.py: {mode}: done in {time.monotonic() - started:.0f} s", file=sys.stderr,
          flush=True)
    return res


def _close_lab(kernel, lab) -> None:
    # A frozen guest would make each of close()'s calls wait out its own timeout.
    try:
        kernel.call("ping", rpc_timeout=10)
    except Exception as exc:
        print(f"latch.py: the lab guest does not answer ({exc}); killing it", file=sys.stderr)
        return
    try:
        lab.close()
    except Exception as exc:
        print(f"latch.py: lab tear-down: {exc}", file=sys.stderr)


def _measure(lab, mode: str, count: int, hold: int, profile: bool) -> dict:
    import ipsecchan
    py, me = lab.kernel.python, os.path.abspath(__file__)
    lab.add_host("alice")
    lab.add_host("bob")
    lab.ike("alice", "bob", auth="cert")
    alice, bob = lab.host("alice").addr(4), lab.host("bob").addr(4)
    if mode == "broker":
        for h in ("alice", "bob"):
            lab.start_broker(h)
        where = {h: lab.broker_socket(h) for h in ("alice", "bob")}
        as_user = lab.unprivileged
    else:
        where = {h: lab.vici_socket(h) for h in ("alice", "bob")}
        as_user = list
    flag = "1" if profile else "0"
    server = lab.spawn("bob", as_user([py, me, "--guest-server", mode, bob, alice,
                                       where["bob"], flag]))
    deadline = time.monotonic() + 30
    while b"ready" not in (out := server.output()).stdout:
        if out.rc is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"bob's server did not start: {_text(out.stderr)}")
        time.sleep(0.1)
    r = lab.run("alice", as_user([py, me, "--guest-client", mode, bob, where["alice"],
                                  str(count), str(hold), flag]), timeout=CLIENT_TIMEOUT)
    srv = server.wait(30) if r.rc == 0 else server.stop()
    if profile:
        sys.stderr.write(_text(r.stderr) + "\n" + _text(srv.stderr) + "\n")
    if r.rc != 0 or srv.rc != 0:
        raise RuntimeError(f"alice's client exited with {r.rc}: {_text(r.stderr)[-3000:]}\n"
                           f"bob's server exited with {srv.rc}: {_text(srv.stderr)[-3000:]}")
    res = json.loads(r.text)
    if res["guest_ipsecchan"] != ipsecchan.__file__:
        raise RuntimeError(f"the guest imported {res['guest_ipsecchan']}, not "
                           f"{ipsecchan.__file__}: set PYTHONPATH to this checkout")
    return res


def host_part(latches: int, profile: bool) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, os.path.join(here, "revalidate.py"), "--latches",
                        str(latches)] + (["--profile"] if profile else []),
                       stdout=subprocess.PIPE, timeout=HOST_TIMEOUT, check=True)
    return json.loads(r.stdout)


def _attempt(what: str, fn, *args) -> dict:
    """fn's figures, or {"error": why} (also said on stderr) when it could not measure."""
    try:
        return fn(*args)
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"
        print(f"latch.py: {what}: {why}", file=sys.stderr)
        return {"error": why}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("inproc", "broker", "both"), default="both",
                    help="which lab measurement (default both)")
    ap.add_argument("--count", type=int, default=100, help="rounds of bare and latched")
    ap.add_argument("--hold", type=int, default=50, help="live latches for memory")
    ap.add_argument("--host-latches", type=int, default=10000)
    ap.add_argument("--no-lab", action="store_true")
    ap.add_argument("--no-host", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile (in the guest) to stderr")
    ap.add_argument("--guest-server", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--guest-client", nargs=6, help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    if opts.guest_server:
        guest_server(*opts.guest_server)
        return 0
    if opts.guest_client:
        mode, bob, where, n, hold, profile = opts.guest_client
        guest_client(mode, bob, where, int(n), int(hold), profile)
        return 0
    if not opts.no_lab and min(opts.count, opts.hold) < 1:
        ap.error("--count and --hold must be at least 1")
    res: dict = {"benchmark": "latch (issues 4 and 6)", "lab_inprocess": None,
                 "lab_broker": None, "host": None}
    for mode, key in (("inproc", "lab_inprocess"), ("broker", "lab_broker")):
        if not opts.no_lab and opts.mode in (mode, "both"):
            res[key] = _attempt(f"lab, {mode}", lab_mode, mode, opts.count, opts.hold,
                                opts.profile)
    if not opts.no_host:
        res["host"] = _attempt("host", host_part, opts.host_latches, opts.profile)
    inproc, broker, host = (s if s and "error" not in s else None
                            for s in (res["lab_inprocess"], res["lab_broker"], res["host"]))
    res["targets"] = {
        "inprocess_ratio_latched_to_bare<=1.25":
            inproc["ratio_latched_to_bare"] <= 1.25 if inproc else None,
        "broker_ratio_latched_to_bare<=2":
            broker["ratio_latched_to_bare"] <= 2 if broker else None,
        "inprocess_bytes_per_latch<=2048":
            max(inproc["bytes_per_connector_latch"], inproc["bytes_per_accepted_latch"])
            <= 2048 if inproc else None,
        "revalidate_s<=1 (median)":
            host["revalidate"]["total_s_median"] <= 1.0 if host else None,
        "revalidate_no_latch_broken":
            all(r["broken"] == 0 for r in host["revalidate"]["rounds"]) if host else None,
    }
    json.dump(res, sys.stdout, indent=2)
    print()
    failed = any(res[k] and "error" in res[k] for k in ("lab_inprocess", "lab_broker", "host"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

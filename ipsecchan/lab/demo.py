"""`ipsecchan lab demo`: two hosts with certificate identities, IKEv2 up, TCP over ESP; the
drop-in socket module on both ends (peer IDs, channel bindings); then a latched connection
that follows a CHILD_SA rekey and breaks when an impostor appears.

Part 1 prints, for each side, the peer identity strongSwan reports and the kernel's ESP SA
counters before and after the exchange. Part 2 latches a TCP connection alice -> bob (RFC
5660) and rekeys its CHILD_SA. Part 3 (`impostor`, also run by tests/test_lab_impostor.py):
bob leaves 10.0.0.2, mallory (own key, CN=mallory) takes the address and gets an SA with
alice; the latch must go BROKEN (peer-changed) and nothing of the connection may reach
mallory; then mallory leaves, bob comes back, and the held data reaches bob.

This module also runs, on lab hosts, the latching application (`app`) and the recording
echo server (`recorder`) those parts use:

    python -m ipsecchan.lab.demo recorder ADDR PORT
    python -m ipsecchan.lab.demo app ADDR PORT VICI_SOCKET COMMAND_DIR
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ipsecchan.lab.errors import LabError
from ipsecchan.lab.kernel import Kernel
from ipsecchan.lab.lab import IkeLink, Lab, Process

PORT = 5001
STEP_TIMEOUT = 15.0


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
        out("")
        out("-- the drop-in socket module: `from ipsecchan import socket`, nothing else "
            "changed --")
        problems = dropin(lab, link, out=out)
        if problems:
            out("FAILED:")
            for p in problems:
                out(f"  - {p}")
            return 1
        if auth == "psk" or family != 4:
            out("latching and the impostor run with keys over IPv4: --auth cert or rpk, "
                "--family 4")
        else:
            out("")
            out("-- latching (RFC 5660): a connection bound to bob's identity and key --")
            try:
                problems = impostor(lab, link, out=out, rekey=True).problems
            except LabError as exc:
                problems = [str(exc)]
            except Exception as exc:        # a newcomer's demo: a message, not a traceback
                problems = [f"{type(exc).__name__}: {exc}"]
            if problems:
                out("FAILED:")
                for p in problems:
                    out(f"  - {p}")
                out(f"torn down; {time.monotonic() - t0:.1f} s in all")
                return 1
            out("OK: the latch followed the rekey, refused the impostor, and came back to bob")
    out(f"torn down; {time.monotonic() - t0:.1f} s in all")
    return 0


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def dropin(lab: Lab, link: IkeLink, *, out=print) -> list[str]:
    """examples/echo_server.py on bob, examples/echo_client.py on alice: both latch, and each
    end reads its peer's IKE identity and the channel bindings, which must agree."""
    if not (EXAMPLES / "echo_server.py").exists():
        return [f"{EXAMPLES} not found: run the demo from a checkout"]
    a, b = lab.host(link.a), lab.host(link.b)
    addr = b.addr(link.family)
    py = lab.kernel.python
    server = lab.spawn(link.b, [py, str(EXAMPLES / "echo_server.py"), addr, str(PORT + 1),
                                "1"], env={"IPSECCHAN_VICI": lab.vici_socket(link.b)})
    deadline = time.monotonic() + STEP_TIMEOUT
    while b"listening" not in server.output().stdout:
        if time.monotonic() > deadline or not server.running():
            server.stop()
            return [f"echo server: {server.output().stderr.decode()[-500:]}"]
        time.sleep(0.05)
    res = lab.run(link.a, [py, str(EXAMPLES / "echo_client.py"), addr, str(PORT + 1),
                           "hello over an IPsec channel"],
                  env={"IPSECCHAN_VICI": lab.vici_socket(link.a)}, timeout=STEP_TIMEOUT)
    if res.rc != 0:
        server.stop()
        return [f"echo client: {res.stderr.decode()[-500:]}"]
    cli = json.loads(res.text)
    srv = json.loads(server.wait(STEP_TIMEOUT).stdout.decode().splitlines()[-1])
    cb_a, cb_b = cli["channel_binding"], srv["channel_binding"]
    out(f"{a.name}: connected to {addr}, peer {cli['peer_id']} (local {cli['local_id']}), "
        f"{cli['protection'][0]}; echo {cli['echo']!r}")
    out(f"{b.name}: accepted a connection from peer {srv['peer_id']} (local "
        f"{srv['local_id']})")
    out(f"{a.name}: channel binding ipsec-endpoint {cb_a or 'unavailable (no public keys)'}")
    out(f"{b.name}: channel binding ipsec-endpoint {cb_b or 'unavailable (no public keys)'}")
    problems = []
    if (cli["peer_id"], srv["peer_id"]) != (link.b_id, link.a_id):
        problems.append(f"peer IDs {cli['peer_id']!r}/{srv['peer_id']!r}, expected "
                        f"{link.b_id!r}/{link.a_id!r}")
    if cb_a != cb_b or (link.auth != "psk" and not cb_a):
        problems.append("the two ends' channel bindings differ")
    elif cb_a:
        out("OK: both ends latched, each knows the other's IKE identity, and the bindings "
            "agree")
    else:
        out("OK: both ends latched; no bindings with PSK (no public key authenticated)")
    return problems


# -- the scenario (controller side) --------------------------------------------------------
@dataclass
class ImpostorResult:
    latched: dict = field(default_factory=dict)          # the app's latch, first look
    rekeyed: dict | None = None
    first_break: dict = field(default_factory=dict)       # the latch when it broke
    broken: dict = field(default_factory=dict)            # ... once only mallory's SAs are left
    resolved: dict = field(default_factory=dict)
    history: list = field(default_factory=list)            # [old, new, cause] per alert
    bob_child: dict = field(default_factory=dict)          # alice's CHILD_SA with bob, first
    mallory_child: dict = field(default_factory=dict)      # alice's CHILD_SA with mallory
    mallory_sa_packets: int | None = None                  # alice's kernel: out SA to mallory
    mallory_received: dict = field(default_factory=dict)   # mallory's recorder's summary
    bob_received: dict = field(default_factory=dict)       # bob's recorder's summary
    app_sent: dict = field(default_factory=dict)           # bytes and sha256 the app sent
    held_echoed: bool | None = None                        # echo came back while BROKEN?
    capture: dict = field(default_factory=dict)            # packet counts on alice's eth0
    problems: list = field(default_factory=list)


class LatchApp:
    """The latching application on a lab host (`python -m ipsecchan.lab.demo app`), driven
    by numbered command files; it answers each with one JSON line on its stdout."""

    def __init__(self, lab: Lab, host: str, server: str, port: int, vici_socket: str):
        self.lab, self.host, self.n = lab, host, 0
        self.rel = f"{lab.dir}/app-{host}"
        lab.kernel.call("write_file", path=f"{self.rel}/.keep", data=b"")
        self.proc = lab.spawn(host, [lab.kernel.python, "-m", "ipsecchan.lab.demo", "app",
                                     server, str(port), vici_socket,
                                     f"{lab.kernel.state_dir}/{self.rel}"])

    def answer(self, n: int, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            out = self.proc.output()
            for line in out.stdout.decode("utf-8", "replace").splitlines():
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if msg.get("n") == n:
                    if "error" in msg:
                        raise LabError(f"latching app on {self.host}: {msg['error']}")
                    return msg
            if out.rc is not None:
                err = out.stderr.decode("utf-8", "replace").strip().splitlines()[-5:]
                raise LabError(f"latching app on {self.host} exited (status {out.rc}): "
                               + " / ".join(err))
            if time.monotonic() > deadline:
                raise LabError(f"latching app on {self.host}: no answer to step {n} within "
                               f"{timeout:.0f} s")
            time.sleep(0.05)

    def do(self, op: str, timeout: float = STEP_TIMEOUT, **args) -> dict:
        self.n += 1
        self.lab.kernel.call("write_file", path=f"{self.rel}/{self.n}.json",
                             data=json.dumps({"op": op, "timeout": timeout, **args}).encode())
        return self.answer(self.n, timeout + 10)


def _recorder(lab: Lab, host: str, addr: str) -> Process:
    proc = lab.spawn(host, [lab.kernel.python, "-m", "ipsecchan.lab.demo", "recorder", addr,
                            str(PORT)])
    deadline = time.monotonic() + 10
    while b"listening" not in (o := proc.output()).stdout:
        if o.rc is not None or time.monotonic() > deadline:
            raise LabError(f"recorder on {host} did not start: "
                           f"{o.stderr.decode(errors='replace').strip()[-300:]}")
        time.sleep(0.05)
    return proc


def _summary(proc: Process) -> dict:
    proc.stop()
    lines = [json.loads(x) for x in proc.wait(5).text.splitlines() if x.startswith("{")]
    return lines[-1] if lines else {}


def _drop_ike(lab: Lab, host: str, conn: str, timeout: float = 10) -> None:
    """Delete host's IKE_SAs of `conn` at once (force: no wait for the peer's answer)."""
    for ike in lab.ike_sas(host, conn):
        lab.vici(host, "terminate", {"ike-id": int(ike["uniqueid"]), "force": "yes",
                                     "timeout": -1})
    deadline = time.monotonic() + timeout
    while lab.ike_sas(host, conn):
        if time.monotonic() > deadline:
            raise LabError(f"{host} still holds an IKE_SA of {conn} {timeout:.0f} s after "
                           "terminating it")
        time.sleep(0.1)


def _spis(snap: dict) -> str:
    return (" ".join(f"0x{s:08x}" for s in snap["out_spis"]) + " / " +
            " ".join(f"0x{s:08x}" for s in snap["in_spis"]))


def _show(out, snap: dict) -> None:
    fp = snap["pubkey"]
    out(f"  state       {snap['state']}" + (f" (cause {snap['cause']})" if snap["cause"]
                                            else ""))
    out(f"  local ID    {snap['local']}")
    out(f"  peer ID     {snap['peer']} (auth {snap['auth']})")
    out("  peer key    " + (f"sha256:{fp[:16]}...{fp[-8:]}" if fp else "(not pinned)"))
    out(f"  protection  {snap['protection']}")
    out(f"  SPIs        out {_spis(snap)} in, reqid {','.join(map(str, snap['reqids']))}")


def impostor(lab: Lab, link: IkeLink, *, out=print, rekey: bool = False,
             mallory: str = "mallory") -> ImpostorResult:
    """Latch alice -> bob, (rekey,) bring an impostor to bob's address, then bob back.
    `link` is an IKE link already up between alice and bob (cert or rpk, initiated by
    alice). Returns what was seen; `problems` lists what went wrong (empty: all held)."""
    r = ImpostorResult()
    alice, bob = link.a, link.b
    bob_addr = lab.host(bob).addr(link.family)
    t0 = time.monotonic()

    def check(ok: bool, what: str) -> bool:
        if not ok:
            r.problems.append(what)
        return ok

    def say(text: str) -> None:
        out(f"[{time.monotonic() - t0:5.1f} s] {text}")

    # mallory's host and charon first: they take the longest, and change nothing yet.
    lab.add_host(mallory)
    m_link = lab.accept_peer(link, mallory)
    server = _recorder(lab, bob, bob_addr)
    app = LatchApp(lab, alice, bob_addr, PORT, lab.vici_socket(alice))
    r.bob_child = lab.child_sas(alice, link.conn)[0]
    r.latched = app.answer(0, 30)["latch"]
    say(f"latched a TCP connection {alice} -> {bob_addr}:{PORT}:")
    _show(out, r.latched)
    check(r.latched["state"] == "ESTABLISHED" and r.latched["peer"] == link.b_id,
          f"latch after connect: {r.latched['state']} with {r.latched['peer']}")
    ok = app.do("send", nbytes=4000, tag="one")["ok"]
    say(f"4000 bytes echoed over the latched connection: {'yes' if ok else 'NO'}")
    check(ok, "data did not flow over the fresh latch")

    if rekey:
        old = r.latched["out_spis"]
        lab.vici(alice, "rekey", {"child": link.child})
        snap = app.do("until", state="ESTABLISHED", not_out_spis=old)
        r.rekeyed = snap["latch"]
        sent = app.do("send", nbytes=4000, tag="two")["ok"]
        say(f"CHILD_SA rekeyed: latch {r.rekeyed['state']}, peer {r.rekeyed['peer']}")
        say(f"  SPIs now {_spis(r.rekeyed)} (old inbound SA still accepted)")
        say(f"  4000 bytes echoed over the new SAs: {'yes' if sent else 'NO'}")
        check(snap["ok"] and r.rekeyed["peer"] == link.b_id and sent,
              "the latch did not follow the rekey with data flowing")

    # -- the impostor --
    out("")
    out(f"-- an impostor: {mallory}, with its own key, at {bob}'s address --")
    cap = lab.capture(alice)
    lab.del_address(bob, bob_addr)
    lab.add_address(mallory, bob_addr)
    say(f"{bob} left {bob_addr}; {mallory} (own key, {m_link.a_id}) took the address")
    m_server = _recorder(lab, mallory, bob_addr)
    lab.initiate(m_link)
    r.mallory_child = lab.child_sas(alice, m_link.conn)[0]
    mc = r.mallory_child
    say(f"{mallory} has a CHILD_SA with {alice}: {alice} sees peer {mc['remote-id']}")
    say(f"  reqid {mc['reqid']} ({bob}'s was {r.bob_child['reqid']}), "
        f"SPIs 0x{mc['spi-out']} out / 0x{mc['spi-in']} in")
    snap = app.do("until", state="BROKEN")
    r.first_break = snap["latch"]
    say(f"latch {r.first_break['state']}, cause {r.first_break['cause']}: "
        f"{r.first_break['detail']}")
    check(snap["ok"], f"latch did not break: {r.first_break['state']}")
    # alice gives up bob's old IKE_SA, as dead-peer detection would (bob answers nothing):
    # now only mallory's SAs would carry the connection.
    _drop_ike(lab, alice, link.conn)
    snap = app.do("until", state="BROKEN", cause="peer-changed")
    r.broken = snap["latch"]
    say(f"{alice} dropped {bob}'s dead IKE_SA (as DPD would)")
    say(f"  latch {r.broken['state']}, cause {r.broken['cause']}: {r.broken['detail']}")
    check(snap["ok"], f"latch not BROKEN for peer-changed: {r.broken['state']} "
                      f"{r.broken['cause']}")
    held = app.do("send", nbytes=6000, tag="held", timeout=2)
    r.held_echoed = held["ok"]
    check(not held["ok"], "data sent while BROKEN came back (someone received it)")
    say(f"the application sent 6000 more bytes; echoed back while BROKEN: "
        f"{'YES' if held['ok'] else 'no'} (held)")
    mspi = int(mc["spi-out"], 16)
    r.mallory_sa_packets = sum(s.packets for s in lab.xfrm_states(alice) if s.spi == mspi)
    say(f"{alice}'s kernel: {r.mallory_sa_packets} packets sent on the SA to {mallory}")
    check(r.mallory_sa_packets == 0, "alice sent ESP packets to mallory")

    # -- mallory leaves, bob comes back --
    lab.vici(mallory, "terminate", {"ike": m_link.conn, "timeout": 5000})
    r.mallory_received = _summary(m_server)
    say(f"{mallory} left; its server on port {PORT} received "
        f"{r.mallory_received.get('bytes')} bytes "
        f"({r.mallory_received.get('connections')} connections)")
    check(r.mallory_received.get("bytes") == 0 and r.mallory_received.get("connections") == 0,
          f"mallory's server received data: {r.mallory_received}")
    lab.del_address(mallory, bob_addr)
    lab.add_address(bob, bob_addr)
    _drop_ike(lab, bob, link.conn)
    lab.initiate(IkeLink(bob, alice, link.conn, link.child, link.auth, link.family, link.b_id,
                         link.a_id))
    snap = app.do("until", state="ESTABLISHED", timeout=20)
    r.resolved = snap["latch"]
    say(f"{bob} is back with a new IKE_SA: latch {r.resolved['state']}, peer "
        f"{r.resolved['peer']}")
    say(f"  SPIs {_spis(r.resolved)}")
    check(snap["ok"] and r.resolved["peer"] == link.b_id, "the latch did not come back to bob")
    done = app.do("send", nbytes=2000, tag="after", timeout=20)
    check(done["ok"], f"held data not delivered to bob: {done}")
    fin = app.do("close")
    r.app_sent, r.history = fin["sent"], fin["history"]
    r.bob_received = _summary(server)
    same = r.bob_received.get("sha256") == r.app_sent["sha256"]
    say(f"{bob} received {r.bob_received.get('bytes')} bytes in all, held ones included")
    say(f"  SHA-256 {'matches' if same else 'DIFFERS from'} what the application sent "
        f"({r.app_sent['bytes']} bytes)")
    check(same and r.bob_received.get("bytes") == r.app_sent["bytes"],
          "bob did not receive exactly what the application sent")

    pkts = cap.stop()
    lp = r.latched["flow"]
    five = {(lp[0], lp[1], lp[2], lp[3]), (lp[2], lp[3], lp[0], lp[1])}
    new_out = set(r.resolved["out_spis"])
    r.capture = {
        "packets": len(pkts),
        "clear": sum(1 for p in pkts if p.proto == 6 and (p.src, p.sport, p.dst, p.dport) in five),
        "esp_to_mallory": sum(1 for p in pkts if p.proto == 50 and p.spi == mspi),
        "esp_from_mallory": sum(1 for p in pkts if p.proto == 50
                                and p.spi == int(mc["spi-in"], 16)),
        "ike": sum(1 for p in pkts if p.proto == 17 and 500 in (p.sport, p.dport)),
        "esp_to_bob_after": sum(1 for p in pkts if p.proto == 50 and p.spi in new_out),
    }
    c = r.capture
    say(f"capture on {alice}'s eth0 (tcpdump, from {mallory}'s arrival): {c['packets']} packets")
    say(f"  the connection in clear: {c['clear']}")
    say(f"  ESP on {mallory}'s SAs: {c['esp_to_mallory']} out, {c['esp_from_mallory']} in")
    say(f"  ESP to {bob}'s new SA: {c['esp_to_bob_after']}")
    check(c["clear"] == 0 and c["esp_to_mallory"] == 0 and c["esp_from_mallory"] == 0,
          f"the capture saw the connection leave unprotected or to mallory: {c}")
    check(c["esp_to_bob_after"] > 0, "the capture saw no ESP to bob's new SA (did it work?)")
    say("latch history:")
    for h in r.history:
        say(f"  {h[0]} -> {h[1]}" + (f" ({h[2]})" if h[2] else "")
            + (" (rekeyed)" if h[3:] else ""))
    return r


# -- on lab hosts ------------------------------------------------------------------------
def recorder(addr: str, port: int) -> int:
    """Echo server on addr:port that counts and hashes every byte it receives, from any
    number of connections; prints a JSON summary at each connection's end and on SIGTERM."""
    import select
    import socket

    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    lst = socket.socket(family, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((addr, port))
    lst.listen(4)
    stats = {"connections": 0, "bytes": 0}
    sha = hashlib.sha256()

    def summary(*_):
        print(json.dumps({**stats, "sha256": sha.hexdigest()}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (summary(), os._exit(0)))
    print("listening", flush=True)
    conns = []
    while True:
        ready, _, _ = select.select([lst, *conns], [], [])
        for s in ready:
            if s is lst:
                c, _ = lst.accept()
                stats["connections"] += 1
                conns.append(c)
                continue
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                conns.remove(s)
                s.close()
                summary()
                continue
            stats["bytes"] += len(data)
            sha.update(data)
            s.sendall(data)


def app(addr: str, port: int, vici_socket: str, cmd_dir: str) -> int:
    """Connect, latch, then carry out numbered commands from cmd_dir while following the
    latch (Latcher.poll); one JSON line per command on stdout."""
    import socket

    from ipsecchan.ike.strongswan import StrongSwanSource
    from ipsecchan.latch.engine import Latcher

    def emit(n, **kw):
        print(json.dumps({"n": n, **kw}), flush=True)

    src = StrongSwanSource(vici_socket)
    src.wait_connected(10)
    lat = Latcher(src)
    end = time.monotonic() + 10
    while True:
        try:
            s = socket.create_connection((addr, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)
    h = lat.latch(s)
    s.setblocking(False)
    flow = [s.getsockname()[0], s.getsockname()[1], s.getpeername()[0], s.getpeername()[1]]
    sha, sent, received, outbuf = hashlib.sha256(), 0, 0, b""

    def snap():
        p, lt = h.latch.params, h.latch
        return {"state": lt.state.value, "cause": lt.cause.value if lt.cause else None,
                "detail": lt.detail, "local": p.local.id if p.local else None,
                "peer": p.peer.id if p.peer else None,
                "auth": p.peer.auth if p.peer else None,
                "pubkey": p.peer.pubkey_sha256 if p.peer else None,
                "protection": " + ".join(x.describe() for x in p.protection),
                "out_spis": [x.key[3] for x in p.out_sas], "in_spis": [x.key[3] for x in p.in_sas],
                "reqids": list(p.reqids), "flow": flow, "time": time.time()}

    emit(0, latch=snap())
    n, cmd, deadline = 1, None, 0.0
    while True:
        lat.poll(0.05)
        try:
            while chunk := s.recv(65536):
                received += len(chunk)
        except (BlockingIOError, InterruptedError):
            pass
        if outbuf:
            try:
                outbuf = outbuf[s.send(outbuf):]
            except (BlockingIOError, InterruptedError):
                pass
        if cmd is None:
            try:
                with open(f"{cmd_dir}/{n}.json") as f:
                    cmd = json.load(f)
            except (OSError, ValueError):
                continue
            deadline = time.monotonic() + float(cmd.get("timeout", STEP_TIMEOUT))
            if cmd["op"] == "send":
                data = (cmd["tag"].encode() * cmd["nbytes"])[:cmd["nbytes"]]
                sha.update(data)
                sent += len(data)
                outbuf += data
            elif cmd["op"] == "close":
                lat.release(h)
                s.setblocking(True)
                s.sendall(outbuf)
                s.shutdown(socket.SHUT_WR)
                hist = [[a.old.value, a.new.value, a.cause.value if a.cause else None]
                        + (["rekeyed"] if a.rekeyed else []) for a in h.alerts]
                lat.close()
                s.close()
                emit(n, sent={"bytes": sent, "sha256": sha.hexdigest()}, history=hist)
                return 0
            elif cmd["op"] != "until":
                emit(n, error=f"unknown command {cmd['op']!r}")
                return 2
        if cmd["op"] == "send":
            ok = received == sent and not outbuf
        else:
            cause = h.latch.cause.value if h.latch.cause else None
            spis = {x.key[3] for x in h.latch.params.out_sas}
            ok = (h.state.value == cmd["state"] and cmd.get("cause") in (None, cause)
                  and not spis & set(cmd.get("not_out_spis") or ()))
        if ok or time.monotonic() > deadline:
            emit(n, ok=ok, sent=sent, received=received, latch=snap())
            n, cmd = n + 1, None


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "recorder":
        return recorder(argv[1], int(argv[2]))
    if len(argv) == 5 and argv[0] == "app":
        return app(argv[1], int(argv[2]), argv[3], argv[4])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

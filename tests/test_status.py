"""The latch status service on this host (no lab): real Latcher handles, real sockets.

In-process tests latch loopback connections with optional protection (RFC 5660 3.1: latched
to cleartext knowingly; only per-socket policies, no SPD change). The end-to-end test runs in
a fresh network namespace: real policies, SAs fed to the latcher's index as decoded records
(this kernel has no ESP), static identities; `ss` and `watch` run as commands there.
"""
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import traceback

import pytest

from ipsecchan.ike.static import StaticSource
from ipsecchan.latch import Policy, Requirements
from ipsecchan.latch.engine import Latcher
from ipsecchan.latch import status
from ipsecchan.latch.status import StatusServer

LOOP = "127.0.0.1"
OPTIONAL = Requirements(policy=Policy.OPTIONAL)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="latching needs CAP_NET_ADMIN")


@pytest.fixture
def latcher():
    lat = Latcher(StaticSource({}))
    yield lat
    lat.close()


@pytest.fixture
def server(latcher):
    srv = StatusServer(latcher).start()
    yield srv
    srv.close()


@pytest.fixture
def listener():
    lsn = socket.socket()
    lsn.bind((LOOP, 0))
    lsn.listen(64)
    yield lsn
    lsn.close()


def connect(lsn):
    c = socket.create_connection(lsn.getsockname(), timeout=5)
    s, _ = lsn.accept()
    for x in (c, s):
        # Close with a reset: hundreds of loopback connections must not leave TIME-WAIT
        # sockets on ports that other tests' connections get next.
        x.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return c, s


class Client:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""

    def send(self, data: bytes):
        self.sock.sendall(data)

    def line(self):
        """The next line as an object, or None at EOF."""
        while b"\n" not in self.buf:
            try:
                data = self.sock.recv(1 << 20)
            except ConnectionResetError:      # closed with our request unread: an end too
                data = b""
            if not data:
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def ask(self, obj):
        self.send(json.dumps(obj).encode() + b"\n")
        return self.line()

    def close(self):
        self.sock.close()


def ino(sock):
    return os.fstat(sock.fileno()).st_ino


def test_list_every_role_with_its_socket(latcher, server, listener):
    lh = latcher.listen(listener, OPTIONAL)
    c, s = connect(listener)
    ch = latcher.latch(c, OPTIONAL)
    ah = latcher.accept(lh, s)
    c_ino, s_ino, l_ino = ino(c), ino(s), ino(listener)
    cl = Client(server.path)
    r = cl.ask({"op": "list"})
    assert r["pid"] == os.getpid() and abs(r["time"] - time.time()) < 5
    by = {x["id"]: x for x in r["latches"]}
    assert set(by) == {lh.id, ch.id, ah.id}
    lport, cport = listener.getsockname()[1], c.getsockname()[1]
    assert by[lh.id] == {
        "id": lh.id, "role": "listener", "listener": None, "state": "LISTENER", "cause": None,
        "detail": "", "policy": "optional", "protected": None, "flow": None,
        "bound": {"proto": "tcp", "family": 4, "local": LOOP, "local_port": lport},
        "inode": l_ino, "local": None, "peer": None, "protection": [], "out_spis": [],
        "in_spis": [], "reqids": []}
    conn = by[ch.id]
    assert (conn["role"], conn["listener"], conn["state"], conn["protected"]) == \
        ("connector", None, "ESTABLISHED", False)
    assert conn["flow"] == {"proto": "tcp", "family": 4, "local": LOOP, "local_port": cport,
                            "peer": LOOP, "peer_port": lport}
    assert conn["bound"] is None and conn["inode"] == c_ino
    acc = by[ah.id]
    assert (acc["role"], acc["listener"], acc["inode"]) == ("accepted", lh.id, s_ino)
    assert acc["flow"]["local_port"] == lport and acc["flow"]["peer_port"] == cport

    # The inode was read when the latch was first seen: once the descriptor names another
    # socket (closed and reused), the listing still names the latched one.
    other = socket.socket()
    os.dup2(other.fileno(), c.fileno())
    assert ino(c) == ino(other) != c_ino
    r = cl.ask({"op": "list"})
    assert [x["inode"] for x in r["latches"] if x["id"] == ch.id] == [c_ino]
    other.close()
    cl.close()

    assert status.Server(server.path[1:], os.getpid()) in status.find_servers()
    (mine,) = [q for q in status.query_all() if q.server.pid == os.getpid()]
    assert mine.error is None and (mine.pid, mine.uid) == (os.getpid(), os.geteuid())
    assert {x["id"] for x in mine.reply["latches"]} == {lh.id, ch.id, ah.id}
    for h in (ch, ah, lh):
        latcher.release(h)
    c.close()
    s.close()


def test_follow_sends_the_list_then_each_alert(latcher, server, listener):
    c1, s1 = connect(listener)
    h1 = latcher.latch(c1, OPTIONAL)
    cl = Client(server.path)
    first = cl.ask({"op": "follow"})
    assert [x["id"] for x in first["latches"]] == [h1.id]
    c2, s2 = connect(listener)
    h2 = latcher.latch(c2, OPTIONAL)
    c2_ino = ino(c2)
    latcher.release(h2)
    c2.close()
    latcher.release(h1)
    got = [cl.line() for _ in range(3)]
    assert [(a["id"], a["old"], a["new"]) for a in got] == [
        (h2.id, "LATCHING", "ESTABLISHED"), (h2.id, "ESTABLISHED", "CLOSED"),
        (h1.id, "ESTABLISHED", "CLOSED")]
    a = got[0]
    assert a["pid"] == os.getpid() and a["cause"] is None and a["rekeyed"] is False
    assert a["latch"]["state"] == "ESTABLISHED" and a["latch"]["inode"] == c2_ino
    # Released, then its socket closed: the CLOSED alert still names its socket.
    assert got[1]["latch"]["state"] == "CLOSED" and got[1]["latch"]["inode"] == c2_ino
    cl.close()
    # The server notices the follower left and stops queueing for it.
    end = time.monotonic() + 5
    while server._followers and time.monotonic() < end:
        time.sleep(0.05)
    assert not server._followers
    for s in (c1, s1, s2):
        s.close()


def test_bad_requests_get_an_error_line_and_the_server_lives_on(latcher, server):
    cl = Client(server.path)
    for bad in (b"\xff\xfe not utf-8\n", b"not json\n", b"[1, 2]\n", b'{"op": "nope"}\n',
                b'{"op": 3}\n', b"[" * 50000 + b"\n"):      # the last: too deep to decode
        cl.send(bad)
        reply = cl.line()
        assert set(reply) == {"error"}, (bad[:20], reply)
    cl.send(b"\n")                                           # blank lines are skipped
    assert cl.ask({"op": "list"})["latches"] == []            # same connection, still served
    cl.send(b"x" * (status.MAX_LINE + 10))                  # no newline in sight
    assert "longer than" in cl.line()["error"]
    assert cl.line() is None                                 # and then closed
    cl.close()
    other = Client(server.path)
    assert other.ask({"op": "list"})["pid"] == os.getpid()
    other.close()


def _as_user(uid, fn):
    """fn() in a child process running as `uid`; returns what it returns (JSON-able)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setgid(uid)
            os.setuid(uid)
            os.write(w, json.dumps(fn()).encode())
            code = 0
        except BaseException:
            os.write(w, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == 0, out.decode()
    return json.loads(out)


def test_another_user_is_refused(latcher, server, listener):
    c, s = connect(listener)
    h = latcher.latch(c, OPTIONAL)

    def raw():
        cl = Client(server.path)
        try:
            cl.send(b'{"op": "list"}\n')
        except OSError:
            pass                          # the server may have closed already
        return [cl.line(), cl.line()]

    me = os.getpid()

    def via_query():
        q = status.query(status.Server(server.path[1:], me))
        return [q.reply, q.error, q.uid]

    refusal, after = _as_user(65534, raw)
    assert "not permitted: uid 65534" in refusal["error"] and set(refusal) == {"error"}
    assert after is None
    reply, error, uid = _as_user(65534, via_query)
    assert reply is None and error.startswith("refused: not permitted") and uid == 0
    latcher.release(h)
    c.close()
    s.close()


def test_the_servers_own_user_is_served(latcher):
    # A server running as uid 65534: that user may ask, another may not, root may.
    path = f"\0ipsecchan-test/{os.getpid()}"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            StatusServer(latcher, path).start()
            os.write(w, b"ready")
            os.close(w)
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            assert f.read(5) == b"ready"

        def ask():
            cl = Client(path)
            try:
                cl.send(b'{"op": "list"}\n')
            except OSError:
                pass
            return cl.line()
        assert _as_user(65534, ask)["latches"] == []
        assert "not permitted: uid 65533" in _as_user(65533, ask)["error"]
        assert ask()["pid"] == pid
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def test_a_follower_too_far_behind_is_dropped_then_lists_again(latcher, listener):
    srv = StatusServer(latcher, queue_limit=8).start()
    try:
        slow = Client(srv.path)
        assert slow.ask({"op": "follow"})["latches"] == []
        n = 0
        # The follower reads nothing: its socket buffer fills, then its queue.
        while n < 3000 and srv._followers:
            c, s = connect(listener)
            h = latcher.latch(c, OPTIONAL)
            latcher.release(h)
            c.close()
            s.close()
            n += 1
        assert not srv._followers, "the follower was never dropped"
        lines = []
        while (line := slow.line()) is not None:
            lines.append(line)
        assert lines[-1] == {"error": "overrun"}
        alerts = lines[:-1]
        assert 0 < len(alerts) < 2 * n
        # What did arrive is in order, with nothing left out before the overrun.
        expected = [(i, step) for i in range(alerts[0]["id"], alerts[0]["id"] + n)
                    for step in ("ESTABLISHED", "CLOSED")]
        assert [(a["id"], a["new"]) for a in alerts] == expected[:len(alerts)]
        # The client lists again: the truth now, not the last alert it saw.
        c, s = connect(listener)
        h = latcher.latch(c, OPTIONAL)
        again = Client(srv.path)
        assert [x["id"] for x in again.ask({"op": "follow"})["latches"]] == [h.id]
        latcher.release(h)
        assert again.line()["new"] == "CLOSED"
        again.close()
        slow.close()
        c.close()
        s.close()
    finally:
        srv.close()


def test_close_stops_serving_and_leaves_the_latcher(latcher):
    srv = StatusServer(latcher).start()
    name = srv.path[1:]
    follower = Client(srv.path)
    assert follower.ask({"op": "follow"})["latches"] == []
    assert len(latcher.observers) == 1
    srv.close()
    assert latcher.observers == []
    assert follower.line() is None
    assert name not in {s.name for s in status.find_servers()}
    srv.close()                                       # twice: harmless
    with StatusServer(latcher) as again:              # the name is free again
        assert Client(again.path).ask({"op": "list"})["latches"] == []


def test_find_servers_reads_listening_names(tmp_path):
    table = tmp_path / "unix"
    table.write_text(
        "Num       RefCount Protocol Flags    Type St Inode Path\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 111 @ipsecchan/latches/812\n"
        "0000000000000000: 00000003 00000000 00000000 0001 03 112 @ipsecchan/latches/812\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 113 @ipsecchan/latches/x\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 114 @other/latches/9\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 115 /run/ipsecchan/latches/7\n"
        "0000000000000000: 00000002 00000000 00000000 0002 01 116\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 117 @ipsecchan/latches/90\n")
    assert status.find_servers(str(table)) == [
        status.Server("ipsecchan/latches/90", 90), status.Server("ipsecchan/latches/812", 812),
        status.Server("ipsecchan/latches/x", None)]


def test_a_name_held_by_another_process_is_not_trusted():
    # Anyone may bind an abstract name: one claiming pid 1 but held by us is refused.
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("\0ipsecchan/latches/1")
    sock.listen(1)
    try:
        q = status.query(status.Server("ipsecchan/latches/1", 1))
        assert q.reply is None and "held by pid" in q.error and "not trusted" in q.error
        assert q.pid is None
    finally:
        sock.close()


# ---- watch, in-process against real services ----

def _watcher(server, **kw):
    from ipsecchan.watch import Watcher
    out = []
    me = status.Server(server.path[1:], int(server.path.rsplit("/", 1)[1]))
    parse = json.loads if kw.get("as_json") else str
    return Watcher(lambda text: out.append(parse(text)), find=lambda: [me], **kw), out


def _steps(w, out, until, seconds=10):
    end = time.monotonic() + seconds
    while not until(out) and time.monotonic() < end:
        w.step(0.1)
    return out


def test_watch_lists_again_after_an_overrun(latcher, listener):
    srv = StatusServer(latcher, queue_limit=8).start()
    w, out = _watcher(srv, as_json=True, all_states=True)
    try:
        c, s = connect(listener)
        h = latcher.latch(c, OPTIONAL)
        _steps(w, out, lambda o: o)
        assert [(x["type"], x["latch"]["id"]) for x in out] == [("current", h.id)]
        n = 0
        while n < 3000 and srv._followers:        # watch does not read meanwhile
            c2, s2 = connect(listener)
            latcher.release(latcher.latch(c2, OPTIONAL))
            c2.close()
            s2.close()
            n += 1
        assert not srv._followers
        _steps(w, out, lambda o: len(o) > 1 and o[-1]["type"] == "current")
        kinds = [x["type"] for x in out]
        i = kinds.index("service")
        assert out[i]["event"] == "overrun" and out[i]["pid"] == os.getpid()
        assert set(kinds[1:i]) == {"alert"}
        # After the gap: the one live latch, as it is now, and nothing stale as current.
        assert [(x["type"], x["latch"]["id"], x["latch"]["state"]) for x in out[i + 1:]] == \
            [("current", h.id, "ESTABLISHED")]
        latcher.release(h)
        _steps(w, out, lambda o: o[-1]["type"] == "alert")
        assert (out[-1]["id"], out[-1]["new"]) == (h.id, "CLOSED")
        c.close()
        s.close()
    finally:
        w.close()
        srv.close()


def test_watch_human_lines_and_the_default_selection(latcher, server, listener):
    w, out = _watcher(server)
    lh = latcher.listen(listener, OPTIONAL)
    c, s = connect(listener)
    h = latcher.latch(c, OPTIONAL)
    _steps(w, out, lambda o: o)
    w.step(0.2)
    # The listener's latch is left out by default; the connection's is shown as current.
    (line,) = out
    cport, lport = c.getsockname()[1], listener.getsockname()[1]
    assert re.fullmatch(rf"\d\d:\d\d:\d\d\.\d{{3}} pid {os.getpid()} latch {h.id} tcp "
                        rf"127\.0\.0\.1:{cport}->127\.0\.0\.1:{lport} current ESTABLISHED "
                        rf"cleartext \(optional protection\)", line), line
    a, b = connect(listener)
    latcher.release(latcher.latch(a, OPTIONAL))      # made and closed: routine, not shown
    latcher.release(h)
    w.step(0.5)
    assert len(out) == 1
    everything, seen = _watcher(server, all_states=True)
    _steps(everything, seen, lambda o: len(o) >= 1)
    assert [x.split(" ", 1)[1] for x in seen] == \
        [f"pid {os.getpid()} latch {lh.id} tcp listening 127.0.0.1:{lport} current LISTENER"]
    latcher.release(lh)
    _steps(everything, seen, lambda o: len(o) >= 2)
    assert seen[1].endswith(f"latch {lh.id} tcp listening 127.0.0.1:{lport} "
                            "LISTENER -> CLOSED")
    server.close()
    _steps(everything, seen, lambda o: len(o) >= 3)
    assert seen[2].endswith(f"pid {os.getpid()} status service gone")
    for x in (w, everything):
        x.close()
    for x in (c, s, a, b):
        x.close()


def test_watch_as_another_user_says_it_was_refused(latcher, server):
    def run():
        w, out = _watcher(server, as_json=True)
        _steps(w, out, lambda o: o, 5)
        for _ in range(3):
            w.step(0.4)               # retried every scan, said once
        w.close()
        return out
    (line,) = _as_user(65534, run)
    assert (line["type"], line["event"], line["pid"]) == ("service", "refused", os.getpid())
    assert line["error"].startswith("not permitted: uid 65534")


# ---- end to end, in a network namespace of its own ----

NETNS = r"""
import json, os, signal, socket, subprocess, sys, time
from ipsecchan.ike.static import StaticSource
from ipsecchan.latch.engine import Latcher
from ipsecchan.latch.status import StatusServer
from ipsecchan.xfrm import Algorithm, SA, Selector
from ipsecchan.xfrm.encode import newsa

A, B = "127.0.0.1", "127.0.0.2"
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
lsn = socket.socket()
lsn.bind((B, 5000))
lsn.listen(4)
c = socket.create_connection((B, 5000), timeout=5)
srv, _ = lsn.accept()
for d, src, dst in (("out", A, B), ("in", B, A)):
    subprocess.run(["ip", "xfrm", "policy", "add", "src", src, "dst", dst, "proto", "tcp",
                    "dir", d, "priority", "100", "tmpl", "src", src, "dst", dst, "proto", "esp",
                    "reqid", "7", "mode", "transport"], check=True)
zero = Selector(0, "", "", 0, 0, 0, 0, 0, 0, 0, 0)
gcm = Algorithm("aead", "rfc4106(gcm(aes))", 288, 128)

def sa(src, dst, spi):
    return SA(src, dst, socket.AF_INET, "esp", spi, 7, "transport", 0, 32, zero, 0, 0,
              int(time.time()), 0, (gcm,), None, None, None, False, None)

lat = Latcher(StaticSource({"sas": [{"reqid": 7, "local": "CN=alice", "peer": "CN=bob"}]}))
# This kernel cannot hold ESP SAs: the latcher's index gets them as the kernel would send them.
lat.view.index.apply(newsa(sa(A, B, 0x1001)) + newsa(sa(B, A, 0x1002)))
h = lat.latch(c)
server = StatusServer(lat).start()
r = {"pid": os.getpid(), "inode": os.fstat(c.fileno()).st_ino, "port": c.getsockname()[1],
     "id": h.id}
watch = subprocess.Popen([sys.executable, "-m", "ipsecchan", "watch", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
first = json.loads(watch.stdout.readline())           # connected: later events are seen

def poll_until(state):
    end = time.monotonic() + 10
    while time.monotonic() < end and h.state.value != state:
        lat.poll(0.1)
    return h.state.value

bypass = ["src", A, "dst", B, "proto", "tcp", "sport", str(r["port"]), "dir", "out"]
subprocess.run(["ip", "xfrm", "policy", "add", *bypass, "priority", "1"], check=True)
r["broken"] = poll_until("BROKEN")
ss = subprocess.run([sys.executable, "-m", "ipsecchan", "ss", "--json", "--no-ike"],
                    capture_output=True, text=True, check=True)
r["ss_broken"] = json.loads(ss.stdout)
subprocess.run(["ip", "xfrm", "policy", "delete", *bypass], check=True)
r["resolved"] = poll_until("ESTABLISHED")
ss = subprocess.run([sys.executable, "-m", "ipsecchan", "ss", "-n", "--no-ike"],
                    capture_output=True, text=True, check=True)
r["table"] = ss.stdout
time.sleep(0.5)
watch.send_signal(signal.SIGTERM)
out, err = watch.communicate(timeout=10)
r["watch"] = [first] + [json.loads(line) for line in out.splitlines()]
r["watch_rc"], r["watch_err"] = watch.returncode, err.decode()
lat.release(h)
server.close()
lat.close()
print(json.dumps(r))
"""


def test_ss_and_watch_see_a_latch_break_and_resolve():
    out = subprocess.run(["unshare", "--net", sys.executable, "-c", NETNS],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert (r["broken"], r["resolved"]) == ("BROKEN", "ESTABLISHED")

    (row,) = [x for x in r["ss_broken"] if x["local_port"] == r["port"]]
    latch = row["latch"]
    assert (latch["id"], latch["inode"], latch["state"], latch["cause"]) == \
        (r["id"], r["inode"], "BROKEN", "cleartext")
    assert latch["peer"] == {"id": "CN=bob", "auth": "manual", "pubkey_sha256": None}
    assert (latch["out_spis"], latch["in_spis"]) == (["0x00001001"], ["0x00001002"])
    # The other end of the loopback connection holds no latch.
    (peer_row,) = [x for x in r["ss_broken"] if x["peer_port"] == r["port"]]
    assert peer_row["latch"] is None

    (line,) = [ln for ln in r["table"].splitlines()
               if ln.split()[2] == f"127.0.0.1:{r['port']}"]
    assert line.split()[6] == "ESTABLISHED"          # the Latch column

    current, broke, back = r["watch"]
    assert current["type"] == "current" and current["pid"] == r["pid"]
    assert current["latch"]["state"] == "ESTABLISHED" and current["latch"]["id"] == r["id"]
    assert (broke["type"], broke["old"], broke["new"], broke["cause"]) == \
        ("alert", "ESTABLISHED", "BROKEN", "cleartext")
    assert (back["old"], back["new"], back["detail"]) == ("BROKEN", "ESTABLISHED", "resolved")
    assert back["latch"]["out_spis"] == ["0x00001001"] and back["pid"] == r["pid"]
    assert r["watch_rc"] == 0 and r["watch_err"] == ""

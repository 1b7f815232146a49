"""The broker under faults, with real strongSwan and ESP: clients run as unprivileged users
(no capabilities) on alice, bob runs a plain echo server.

A broker killed with SIGKILL while its client has latched connections carrying traffic: the
client's latches go BROKEN (not verified) at once and sending raises LatchBrokenError; the
kernel keeps the connections' pins meanwhile; a new broker starts on the same socket path,
the client library latches both connections again and data flows. A client killed while
holding latches leaves the broker as it was (descriptors, latches) and its policies go with
its sockets. Two users: neither can list, release or hear of the other's latches.
"""
import json
import re
import signal
import time

ECHO = r"""
import socketserver, sys
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)
class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = daemon_threads = True
with Server((sys.argv[1], int(sys.argv[2])), Echo) as s:
    print("listening", flush=True)
    s.serve_forever()
"""

COMMON = r"""
import json, sys, time
from ipsecchan import socket
from ipsecchan.socket import LatchBrokenError

def out(**kw):
    print(json.dumps(kw), flush=True)

def echo(c, n=100):
    msg = b"x" * n
    c.sendall(msg)
    got = b""
    while len(got) < n:
        chunk = c.recv(n - len(got))
        if not chunk:
            return False
        got += chunk
    return got == msg

def connect(n, bob, port):
    conns = [socket.create_connection((bob, port), timeout=30) for _ in range(n)]
    alerts = [[] for _ in conns]
    for i, c in enumerate(conns):
        c.add_latch_callback(lambda s, l, a, i=i: alerts[i].append(
            [a.old.value, a.new.value, a.cause.value if a.cause else None]))
    return conns, alerts
"""

# Holds two latched connections, one of them busy, through the broker's death and return.
THROUGH_RESTART = COMMON + r"""
conns, alerts = connect(2, sys.argv[1], int(sys.argv[2]))
out(phase="latched", states=[c.latch.state for c in conns],
    peers=[c.getpeerid() for c in conns], echo=[echo(c) for c in conns])
rounds, error, end = 0, None, time.monotonic() + 120
while error is None and time.monotonic() < end:
    try:
        echo(conns[0])
        rounds += 1
    except LatchBrokenError as exc:
        error = str(exc)
    time.sleep(0.05)
try:
    conns[1].sendall(b"y")
    idle_error = None
except LatchBrokenError as exc:
    idle_error = str(exc)
out(phase="broken", rounds=rounds, error=error, idle_error=idle_error,
    states=[c.latch.state for c in conns], causes=[c.latch.cause for c in conns])
end = time.monotonic() + 120
while any(c.latch.state != "ESTABLISHED" for c in conns) and time.monotonic() < end:
    time.sleep(0.05)
out(phase="back", states=[c.latch.state for c in conns], peers=[c.getpeerid() for c in conns],
    echo=[echo(c) for c in conns], alerts=alerts)
try:
    time.sleep(3600)              # until SIGINT: then an orderly close
except KeyboardInterrupt:
    pass
for c in conns:
    c.close()
out(phase="closed")
"""

HOLD = COMMON + r"""
conns, alerts = connect(int(sys.argv[3]), sys.argv[1], int(sys.argv[2]))
out(phase="ready", states=[c.latch.state for c in conns], echo=[echo(c) for c in conns])
end = time.monotonic() + float(sys.argv[4])
while time.monotonic() < end and not all(alerts):
    time.sleep(0.1)
out(phase="alerts", alerts=alerts)
time.sleep(3600)
"""

# Root's view of a broker: every latch, page by page.
LIST = r"""
import json, socket, sys
from ipsecchan.broker import protocol
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
latches, after = [], None
while True:
    protocol.send(s, {"op": "list", "id": 1, "after": after})
    r, _ = protocol.recv(s)
    latches += r["latches"]
    if r["next"] is None:
        break
    after = r["next"]
print(json.dumps(latches))
"""

# Another user, talking to the broker itself: its own latch, then every other id it can name.
OTHER_USER = r"""
import json, socket as std, sys, time
from ipsecchan.broker import protocol
bob, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
b = std.socket(std.AF_UNIX, std.SOCK_SEQPACKET)
b.connect(path)
events, ids = [], iter(range(1, 10**6))
def call(msg, sock=None):
    msg["id"] = next(ids)
    if sock is not None:
        msg["fd"] = sock.fileno()
    protocol.send(b, msg, sock.fileno() if sock is not None else None)
    while True:
        r, _ = protocol.recv(b)
        if "event" in r:
            events.append(r)
        elif r["id"] == msg["id"]:
            return r
mine = std.create_connection((bob, port), timeout=30)
own = call({"op": "latch", "policy": "require"}, mine)
oid = own["latch"]["id"]
res = {"own": own, "list": call({"op": "list"}),
       "release": {i: call({"op": "release", "latch": i})["errno"]
                   for i in range(1, oid + 6) if i != oid},
       "accept": {i: call({"op": "accept", "listener": i}, mine)["errno"]
                  for i in range(1, oid + 6)}}
print(json.dumps({"phase": "ready", **res}), flush=True)
b.settimeout(1)
end, first = time.monotonic() + 30, time.monotonic() if events else None
while time.monotonic() < end and not (first and time.monotonic() > first + 3):
    try:
        r, _ = protocol.recv(b)
    except TimeoutError:
        continue
    first = first or time.monotonic()
    events.append(r)
print(json.dumps({"phase": "events", "events": events}), flush=True)
"""


def _phase(proc, phase: str, timeout: float = 90) -> dict:
    """The JSON line a lab process printed for `phase`, once it has."""
    end = time.monotonic() + timeout
    while True:
        out = proc.output()
        for line in out.stdout.decode(errors="replace").splitlines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and msg.get("phase") == phase:
                return msg
        if out.rc is not None or time.monotonic() > end:
            raise AssertionError(f"no {phase!r} from {proc.argv[-4:]} (exit {out.rc}): "
                                 f"{out.stderr.decode(errors='replace')[-3000:]}")
        time.sleep(0.2)


def _socket_policies(lab, host: str) -> int:
    text = lab.run(host, ["ip", "xfrm", "policy"], check=True).text
    return len(re.findall(r"^\s+socket (?:in|out) ", text, re.M))


def _broker_pid(broker) -> int:
    return int(re.search(rb"\(pid (\d+)\)", broker.output().stdout).group(1))


def _fds(lab, pid: int) -> int:
    return len(lab.run(None, ["ls", f"/proc/{pid}/fd"], check=True).text.split())


def _latches(lab, host: str) -> list:
    r = lab.python(host, LIST, lab.broker_socket(host), check=True)
    return json.loads(r.text)


def _until(fn, want, timeout: float = 20):
    end = time.monotonic() + timeout
    while (got := fn()) != want and time.monotonic() < end:
        time.sleep(0.3)
    return got


def _steady(fn, timeout: float = 10):
    """fn()'s value once two looks a second apart agree."""
    end, last = time.monotonic() + timeout, fn()
    while (cur := fn()) != last and time.monotonic() < end:
        last = cur
        time.sleep(1)
    return cur


def _setup(lab):
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob", auth="cert")
    bob = lab.host("bob").addr(4)
    server = lab.spawn("bob", [lab.kernel.python, "-c", ECHO, bob, "5000"])
    end = time.monotonic() + 15
    while b"listening" not in server.output().stdout:
        assert time.monotonic() < end, server.output().stderr.decode(errors="replace")
        time.sleep(0.1)
    return link, bob


def _as_nobody(lab, code: str, *args: str, uid: int = 65534):
    return lab.spawn("alice", lab.unprivileged([lab.kernel.python, "-c", code, *args],
                                               uid=uid, gid=uid),
                     env={"IPSECCHAN_MODE": "broker",
                          "IPSECCHAN_BROKER": lab.broker_socket("alice")})


def test_a_killed_broker_breaks_its_clients_latches_until_a_new_one_latches_them(lab):
    link, bob = _setup(lab)
    broker = lab.start_broker("alice")
    base = _socket_policies(lab, "alice")          # charon's own IKE sockets
    client = _as_nobody(lab, THROUGH_RESTART, bob, "5000")
    latched = _phase(client, "latched")
    assert latched["states"] == ["ESTABLISHED"] * 2
    assert latched["peers"] == [link.b_id] * 2 and latched["echo"] == [True, True]
    assert _socket_policies(lab, "alice") == base + 4        # in and out, per connection

    broker.stop(signal.SIGKILL)
    broken = _phase(client, "broken")
    # Traffic flowed, then the next send failed: the latches are not verified any more.
    assert broken["rounds"] > 0
    assert broken["states"] == ["BROKEN"] * 2 and broken["causes"] == ["not-verified"] * 2
    assert "not-verified" in broken["error"] and "not-verified" in broken["idle_error"]
    # The kernel keeps the connections' pins meanwhile: nothing cleared, nothing added.
    time.sleep(2)
    assert _socket_policies(lab, "alice") == base + 4

    lab.start_broker("alice")                     # on the dead broker's socket path
    back = _phase(client, "back")
    assert back["states"] == ["ESTABLISHED"] * 2 and back["peers"] == [link.b_id] * 2
    assert back["echo"] == [True, True]
    # Each went BROKEN once and came back once; never ESTABLISHED in between.
    assert back["alerts"] == [[["ESTABLISHED", "BROKEN", "not-verified"],
                               ["BROKEN", "ESTABLISHED", None]]] * 2
    # The new broker holds exactly those two, and the kernel two policies each.
    listed = _latches(lab, "alice")
    assert [(x["state"], x["owner"]["uid"]) for x in listed] == [("ESTABLISHED", 65534)] * 2
    assert _socket_policies(lab, "alice") == base + 4
    client.stop(signal.SIGINT, timeout=30)
    _phase(client, "closed")
    assert _until(lambda: (_socket_policies(lab, "alice"), _latches(lab, "alice")),
                  (base, [])) == (base, [])


def test_a_killed_client_leaves_nothing_in_the_broker(lab):
    _, bob = _setup(lab)
    broker = lab.start_broker("alice")
    pid = _broker_pid(broker)
    warm = _as_nobody(lab, HOLD, bob, "5000", "1", "0")     # first use: lazy state settles
    _phase(warm, "ready")
    warm.stop(signal.SIGKILL)
    assert _until(lambda: _latches(lab, "alice"), []) == []
    base_policies = _socket_policies(lab, "alice")
    base_fds = _steady(lambda: _fds(lab, pid))

    holder = _as_nobody(lab, HOLD, bob, "5000", "3", "0")
    ready = _phase(holder, "ready")
    assert ready["states"] == ["ESTABLISHED"] * 3 and ready["echo"] == [True] * 3
    assert [x["owner"]["uid"] for x in _latches(lab, "alice")] == [65534] * 3
    assert _socket_policies(lab, "alice") == base_policies + 6
    # The broker holds the client's session and pidfd, no descriptor of its sockets.
    assert _until(lambda: _fds(lab, pid), base_fds + 2, 5) == base_fds + 2

    holder.stop(signal.SIGKILL)
    assert _until(lambda: _fds(lab, pid), base_fds) == base_fds
    assert _until(lambda: _latches(lab, "alice"), []) == []
    # The sockets go once bob has closed his ends too, and their policies with them.
    assert _until(lambda: _socket_policies(lab, "alice"), base_policies) == base_policies
    assert broker.running()


def test_users_cannot_see_or_touch_each_others_latches(lab):
    link, bob = _setup(lab)
    lab.start_broker("alice")
    first = _as_nobody(lab, HOLD, bob, "5000", "1", "60")            # uid 65534
    assert _phase(first, "ready")["states"] == ["ESTABLISHED"]
    other = _as_nobody(lab, OTHER_USER, bob, "5000", lab.broker_socket("alice"), uid=65533)
    ready = _phase(other, "ready")
    own = ready["own"]["latch"]
    assert own["state"] == "ESTABLISHED" and own["params"]["peer"]["id"] == link.b_id
    assert ready["list"]["errno"] == 1                               # EPERM
    assert set(ready["release"].values()) == {2}                     # ENOENT, every one
    assert set(ready["accept"].values()) == {2}
    # Root sees both, with their owners.
    listed = _latches(lab, "alice")
    assert sorted(x["owner"]["uid"] for x in listed) == [65533, 65534]
    assert all(x["state"] == "ESTABLISHED" for x in listed)
    # A rekey reaches both latches: each user hears of its own only.
    lab.vici("alice", "rekey", {"child": link.child})
    events = _phase(other, "events", 60)["events"]
    assert events and {e["latch"]["id"] for e in events} == {own["id"]}
    assert _phase(first, "alerts")["alerts"][0]          # the first user heard its own

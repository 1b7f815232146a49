"""IPSEC_REQUIRE_PEER_ID with real strongSwan and real ESP: a connect to a peer that is not
the required identity fails with LatchRefused, and not one application byte reaches the wire
(a capture on alice's link) or the server — even when the application ignores the refusal and
sends anyway. The control, the right identity, carries the same message."""
import json

SERVER = r"""
import json, socket, sys
ls = socket.create_server((sys.argv[1], 5000))
for _ in range(2):
    conn, _ = ls.accept()
    conn.settimeout(5)
    got = 0
    try:
        while data := conn.recv(65536):
            got += len(data)
    except OSError as exc:
        pass
    print(json.dumps({"received": got}), flush=True)
    conn.close()
"""

CLIENT = r"""
import json, sys, time
import socket as std
from ipsecchan import socket
BOB, REQUIRED = sys.argv[1], sys.argv[2].encode()
s = socket.socket()
s.settimeout(10)
s.setsockopt(socket.SOL_IPSEC, socket.IPSEC_REQUIRE_PEER_ID, REQUIRED)
r = {}
try:
    s.connect((BOB, 5000))
    r["connect"] = ["latched", s.getpeerid()]
except socket.LatchRefused as exc:
    r["connect"] = ["refused", exc.cause.value, exc.errno]
# The application sends anyway, around the latch (the plain method): the kernel must hold it.
try:
    r["sent"] = std.socket.send(s, b"X" * 1200)
except OSError as exc:
    r["sent"] = exc.errno
time.sleep(1.5)
s.close()
print(json.dumps(r))
"""


def test_require_peer_id_refuses_before_any_byte(lab, dropin):
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob", auth="cert")
    alice, bob = lab.host("alice").addr(4), lab.host("bob").addr(4)
    server = lab.spawn("bob", [lab.kernel.python, "-c", SERVER, bob])
    for _ in range(100):
        if ":5000 " in lab.run("bob", ["ss", "-ltn"]).text:
            break
        lab.run("bob", ["sleep", "0.1"])
    runs = []
    for required in ("CN=carol", link.b_id):
        cap = lab.capture("alice")
        r = json.loads(dropin.python("alice", CLIENT, bob, required, check=True,
                                     timeout=60).text)
        packets = cap.stop()
        big = [p for p in packets if p.src == alice and p.dst == bob and p.length > 1000]
        clear = [p for p in packets if p.proto == 6 and 5000 in (p.sport, p.dport)]
        runs.append((r, len(big), len(clear)))
    served = [json.loads(x) for x in server.wait(30).stdout.decode().splitlines()]

    (refused, big_refused, clear_refused), (ok, big_ok, clear_ok) = runs
    assert refused["connect"] == ["refused", "peer-not-required", 111]    # ECONNREFUSED
    assert big_refused == 0 and clear_refused == 0, "application bytes left alice"
    assert served[0] == {"received": 0}
    # The control: the required identity is bob's; the same send crosses, over ESP.
    assert ok["connect"] == ["latched", link.b_id] and ok["sent"] == 1200
    assert big_ok >= 1 and clear_ok == 0
    assert served[1] == {"received": 1200}

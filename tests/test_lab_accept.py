"""Latching on accept, with real strongSwan and real ESP: bob's listener latch gives each
accepted connection a latch with alice's identity, and the two ends' latches agree (IDs,
protection, SPIs crossed); the listener's own pin refuses a first SYN that comes in clear
even when the SPD would let it in."""
import json

SERVER = r"""
import json, socket, sys
from ipsecchan.ike.strongswan import StrongSwanSource
from ipsecchan.latch.engine import Latcher

ADDR, VICI, PORT, COUNT = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
src = StrongSwanSource(VICI)
src.wait_connected(10)
lat = Latcher(src)
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((ADDR, PORT))
ls.listen(8)
listener = lat.listen(ls)
pinned = [p.dir for p in __import__("ipsecchan.xfrm", fromlist=["x"]).dump_policies()
          if p.per_socket and p.templates]
print(json.dumps({"listening": listener.state.value, "socket_policies": pinned}), flush=True)
for _ in range(COUNT):
    conn, peer = ls.accept()
    h = lat.accept(listener, conn)
    p = h.latch.params
    data = conn.recv(100)
    conn.sendall(data.upper())
    print(json.dumps({"state": h.state.value, "local": p.local.id, "peer": p.peer.id,
                      "peer_key": p.peer.pubkey_sha256, "local_key": p.local.pubkey_sha256,
                      "out": [x.key[3] for x in p.out_sas], "in": [x.key[3] for x in p.in_sas],
                      "protection": [x.describe() for x in p.protection],
                      "flow": [h.flow.local, h.flow.local_port, h.flow.remote,
                               h.flow.remote_port], "listener": h.listener == listener.id}),
          flush=True)
    lat.release(h)
    conn.close()
lat.release(listener)
lat.close()
"""

CLIENT = r"""
import json, socket, sys
from ipsecchan.ike.strongswan import StrongSwanSource
from ipsecchan.latch.engine import Latcher

BOB, VICI, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
src = StrongSwanSource(VICI)
src.wait_connected(10)
lat = Latcher(src)
s = socket.create_connection((BOB, PORT), timeout=10)
h = lat.latch(s)
p = h.latch.params
s.sendall(b"hello")
echo = s.recv(100)
print(json.dumps({"state": h.state.value, "local": p.local.id, "peer": p.peer.id,
                  "peer_key": p.peer.pubkey_sha256, "local_key": p.local.pubkey_sha256,
                  "out": [x.key[3] for x in p.out_sas], "in": [x.key[3] for x in p.in_sas],
                  "protection": [x.describe() for x in p.protection],
                  "flow": [h.flow.local, h.flow.local_port, h.flow.remote, h.flow.remote_port],
                  "echo": echo.decode()}))
lat.release(h)
s.close()
lat.close()
"""

PLAIN_CONNECT = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print("connected")
except OSError as exc:
    print(type(exc).__name__)
"""


def _lines(proc):
    return [json.loads(x) for x in proc.wait(30).stdout.decode().splitlines() if x.strip()]


def _wait_listening(lab, host, port):
    for _ in range(100):
        if f":{port} " in lab.run(host, ["ss", "-ltn"]).text:
            return
        lab.run(host, ["sleep", "0.1"])
    raise AssertionError(f"nothing listens on {host}:{port}")


def test_latch_on_accept_matches_the_connector(lab):
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob", auth="cert")
    bob = lab.host("bob").addr(4)
    server = lab.spawn("bob", [lab.kernel.python, "-c", SERVER, bob, lab.vici_socket("bob"),
                               "5000", "1"])
    _wait_listening(lab, "bob", 5000)
    a = json.loads(lab.python("alice", CLIENT, bob, lab.vici_socket("alice"), "5000",
                              check=True, timeout=60).text)
    head, b = _lines(server)
    # The listener pin is one IN policy (cloned into accepted sockets); no OUT pin.
    assert head == {"listening": "LISTENER", "socket_policies": ["in-socket"]}
    assert a["state"] == b["state"] == "ESTABLISHED" and b["listener"]
    assert (a["local"], a["peer"]) == (link.a_id, link.b_id)
    assert (b["local"], b["peer"]) == (link.b_id, link.a_id)
    # Each end's keys are the other's, seen from the other side.
    assert a["peer_key"] and a["local_key"] and a["peer_key"] != a["local_key"]
    assert (b["peer_key"], b["local_key"]) == (a["local_key"], a["peer_key"])
    # The SPIs cross: what alice sends on is what bob accepts on, and back.
    assert a["out"] == b["in"] and b["out"] == a["in"]
    child = lab.child_sas("alice", link.conn)[0]
    assert a["out"] == [int(child["spi-out"], 16)] and a["in"] == [int(child["spi-in"], 16)]
    assert a["protection"] == b["protection"]
    assert a["protection"][0].startswith("esp transport rfc4106(gcm(aes))/256")
    assert b["flow"] == [a["flow"][2], a["flow"][3], a["flow"][0], a["flow"][1]]
    assert a["echo"] == "HELLO"


def _bypass(lab, port):
    # Policies that let this port's traffic pass in clear, both ways, on both hosts, before
    # the CHILD_SA's policies (a lower priority value wins).
    a, b = lab.host("alice").addr(4), lab.host("bob").addr(4)
    for host, d, sel in (("alice", "out", f"src {a} dst {b} proto tcp dport {port}"),
                         ("alice", "in", f"src {b} dst {a} proto tcp sport {port}"),
                         ("bob", "in", f"src {a} dst {b} proto tcp dport {port}"),
                         ("bob", "out", f"src {b} dst {a} proto tcp sport {port}")):
        lab.run(host, ["ip", "xfrm", "policy", "add", *sel.split(), "dir", d, "priority",
                       "10"], check=True)


def test_listener_pin_refuses_a_clear_first_syn(lab):
    lab.add_host("alice")
    lab.add_host("bob")
    lab.ike("alice", "bob", auth="cert")
    bob = lab.host("bob").addr(4)
    for port in (5001, 5002):
        _bypass(lab, port)
    # 5001: a latched listener; 5002: a plain one, the control (the SPD lets clear in).
    server = lab.spawn("bob", [lab.kernel.python, "-c", SERVER, bob, lab.vici_socket("bob"),
                               "5001", "1"])
    plain = lab.spawn("bob", [lab.kernel.python, "-m", "ipsecchan.lab.echo", "serve", bob,
                              "5002"])
    _wait_listening(lab, "bob", 5001)
    _wait_listening(lab, "bob", 5002)
    assert lab.python("alice", PLAIN_CONNECT, bob, "5002").text.strip() == "connected"
    assert lab.python("alice", PLAIN_CONNECT, bob, "5001").text.strip() == "TimeoutError"
    server.stop()
    plain.stop()
    assert server.output().stdout.decode().count("\n") == 1     # the header, no connection

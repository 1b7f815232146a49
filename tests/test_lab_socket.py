"""The drop-in socket module with real strongSwan and real ESP: the echo examples latch on
both ends with nothing but the import changed; socket options and accessors agree across the
two ends; channel bindings are equal at both ends of one channel and differ across channels;
IPSEC_REQUIRE_PEER_ID refuses a wrong peer before any application byte leaves; a broken latch
raises on the next send and a restored one carries data again.

Each test runs twice (the `dropin` fixture): in-process as root, and through the hosts'
brokers as nobody with no capabilities; privileged steps (flushing SAs, IKE) are the
harness's."""
import json
import re
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _wait_listening(lab, host, port, udp=False):
    for _ in range(100):
        if f":{port} " in lab.run(host, ["ss", "-lun" if udp else "-ltn"]).text:
            return
        lab.run(host, ["sleep", "0.1"])
    raise AssertionError(f"nothing listens on {host}:{port}")


def _json_lines(text):
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def _lines(proc, n, timeout=30):
    """Wait until a spawned process has printed n JSON lines (or ended); return them."""
    end = time.monotonic() + timeout
    while True:
        out = proc.output()
        lines = _json_lines(out.stdout.decode())
        if len(lines) >= n or out.rc is not None or time.monotonic() > end:
            assert len(lines) >= n, out.stderr.decode()[-3000:]
            return lines
        time.sleep(0.1)


def test_echo_examples_latch_both_ends(lab, dropin):
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob", auth="cert")
    bob = lab.host("bob").addr(4)
    server = dropin.spawn("bob", [lab.kernel.python, str(EXAMPLES / "echo_server.py"), bob,
                                  "5000", "2"])
    _wait_listening(lab, "bob", 5000)
    clients = [json.loads(dropin.run("alice", [lab.kernel.python,
                                               str(EXAMPLES / "echo_client.py"), bob, "5000",
                                               msg], check=True, timeout=60).text)
               for msg in ("first", "second")]
    served = _json_lines(server.wait(30).stdout.decode())[1:]
    for client, srv, msg in zip(clients, served, ("first", "second")):
        assert client["echo"] == msg
        assert (client["peer_id"], client["local_id"]) == (link.b_id, link.a_id)
        assert (srv["peer_id"], srv["local_id"]) == (link.a_id, link.b_id)
        assert client["protection"][0].startswith("esp transport rfc4106(gcm(aes))/256")
        # One channel, one binding, computed apart at each end.
        assert client["channel_binding"] and client["channel_binding"] == srv["channel_binding"]
    assert clients[0]["channel_binding"] != clients[1]["channel_binding"]


SERVER = r"""
import json, sys
from ipsecchan import socket
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print(json.dumps({"listening": srv.getsockopt(socket.SOL_IPSEC, socket.IPSEC_LATCH_STATE)}),
      flush=True)
while True:
    conn, peer = srv.accept()
    o = lambda opt, n=256: conn.getsockopt(socket.SOL_IPSEC, opt, n)
    got = b""
    conn.settimeout(30)
    try:
        while data := conn.recv(65536):
            got += data
            conn.sendall(data)
    except OSError as exc:
        pass
    print(json.dumps({"state": conn.getsockopt(socket.SOL_IPSEC, socket.IPSEC_LATCH_STATE),
                      "peer_id": o(socket.IPSEC_PEER_ID).decode(),
                      "local_id": o(socket.IPSEC_LOCAL_ID).decode(),
                      "peer_key": o(socket.IPSEC_PEER_KEY).hex(),
                      "protection": socket.decode_protection(o(socket.IPSEC_PROTECTION, 1024)),
                      "cb": o(socket.IPSEC_CHANNEL_BINDING).hex(), "received": len(got)}),
          flush=True)
    conn.close()
"""

CLIENT = r"""
import json, sys, time
from ipsecchan import socket
BOB = sys.argv[1]
r = {}
s = socket.create_connection((BOB, 5000), timeout=10)
o = lambda opt, n=256: s.getsockopt(socket.SOL_IPSEC, opt, n)
r["options"] = {"state": s.getsockopt(socket.SOL_IPSEC, socket.IPSEC_LATCH_STATE),
                "policy": s.getsockopt(socket.SOL_IPSEC, socket.IPSEC_POLICY),
                "peer_id": o(socket.IPSEC_PEER_ID).decode(),
                "local_id": o(socket.IPSEC_LOCAL_ID).decode(),
                "peer_key": o(socket.IPSEC_PEER_KEY).hex(),
                "protection": socket.decode_protection(o(socket.IPSEC_PROTECTION, 1024)),
                "cb": o(socket.IPSEC_CHANNEL_BINDING).hex(),
                "cause": o(socket.IPSEC_LATCH_CAUSE).decode()}
r["accessors"] = [s.getpeerid(), s.getlocalid(), s.get_channel_binding().hex(),
                  s.latch.state, list(s.latch.spis[0]), list(s.latch.spis[1])]
try:
    s.getsockopt(socket.SOL_IPSEC, 99, 16)
except OSError as exc:
    r["unknown_option"] = exc.errno
try:
    s.getsockopt(socket.SOL_IPSEC, socket.IPSEC_PEER_ID, 3)
except OSError as exc:
    r["short_buffer"] = exc.errno
try:
    s.setsockopt(socket.SOL_IPSEC, socket.IPSEC_POLICY, socket.IPSEC_POLICY_OPTIONAL)
except OSError as exc:
    r["set_after_connect"] = exc.errno
try:
    s.get_channel_binding("tls-unique")
except ValueError as exc:
    r["bad_cb_type"] = str(exc)
# The latch's pin may not be replaced (here: by a bypass; valid, and root may set it).
from ipsecchan.xfrm import socket_policy_bytes
try:
    s.setsockopt(socket.IPPROTO_IP, 17, socket_policy_bytes(socket.AF_INET, "out"))
    r["replace_pin"] = "set"
except OSError as exc:
    r["replace_pin"] = exc.errno
s.sendall(b"x" * 100)
got = s.recv(100)
r["echo"] = len(got)

# A break: the harness flushes the SAs; the next send raises, a callback heard it.
heard = []
s.add_latch_callback(lambda sock, info, alert: heard.append((alert.new.value,
                                                              info.cause)))
print(json.dumps(r), flush=True)
r = {}
end = time.monotonic() + 15
while time.monotonic() < end and s.latch.state != "BROKEN":
    time.sleep(0.05)
try:
    s.send(b"y")
    r["broken_send"] = "sent"
except socket.LatchBrokenError as exc:
    r["broken_send"] = [exc.cause, isinstance(exc, ConnectionError),
                        s.getsockopt(socket.SOL_IPSEC, socket.IPSEC_LATCH_STATE),
                        o(socket.IPSEC_LATCH_CAUSE).decode()]
r["heard"] = list(heard)
print(json.dumps(r), flush=True)
# The harness brings the IKE_SA back (a fresh one).
end = time.monotonic() + 20
while time.monotonic() < end and s.latch.state != "ESTABLISHED":
    time.sleep(0.05)
r = {"resolved": s.latch.state}
s.sendall(b"z" * 50)
r["after"] = len(s.recv(100))
r["heard_all"] = heard
s.close()
print(json.dumps(r), flush=True)
"""


def test_socket_options_break_and_resolve(lab, dropin):
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob", auth="cert")
    bob = lab.host("bob").addr(4)
    server = dropin.spawn("bob", [lab.kernel.python, "-c", SERVER, bob, "5000"])
    _wait_listening(lab, "bob", 5000)
    client = dropin.spawn("alice", [lab.kernel.python, "-c", CLIENT, bob])
    first = _lines(client, 1)[0]
    lab.run("alice", ["ip", "xfrm", "state", "flush"], check=True)
    broken = _lines(client, 2)[1]
    vici = ["--uri", "unix://" + lab.vici_socket("alice")]
    lab.run("alice", ["swanctl", "--terminate", "--ike", link.conn, *vici])
    lab.run("alice", ["swanctl", "--initiate", "--child", link.child, *vici], check=True)
    first.update(broken)
    first.update(_lines(client, 3)[2])
    child = lab.child_sas("bob", link.conn)
    o = first["options"]
    assert o["state"] == 3 and o["policy"] == 1          # ESTABLISHED, require
    assert (o["peer_id"], o["local_id"]) == (link.b_id, link.a_id)
    assert len(o["peer_key"]) == 64 and o["cause"] == ""
    prot = o["protection"]
    assert prot["protected"] and prot["confidential"] and len(prot["layers"]) == 1
    layer = prot["layers"][0]
    assert (layer["proto"], layer["mode"], layer["cipher"]) == ("esp", "transport",
                                                               "rfc4106(gcm(aes))")
    assert (layer["cipher_bits"], layer["icv_bits"]) == (256, 128)
    assert first["accessors"][:3] == [link.b_id, link.a_id, o["cb"]]
    assert first["accessors"][3] == "ESTABLISHED"
    assert first["unknown_option"] == 92 and first["short_buffer"] == 22     # ENOPROTOOPT, EINVAL
    assert first["set_after_connect"] == 106                                  # EISCONN
    assert "not implemented" in first["bad_cb_type"]
    assert first["replace_pin"] == 16                                         # EBUSY
    assert first["echo"] == 100
    assert first["broken_send"] == ["no-sa", True, 4, "no-sa"]
    assert ["BROKEN", "no-sa"] in first["heard"]
    assert first["resolved"] == "ESTABLISHED" and first["after"] == 50
    assert first["heard_all"][-2:] == [["ESTABLISHED", None], ["CLOSED", None]]
    # The SAs now are new ones (re-established), not those first latched.
    assert child and int(child[0]["spi-in"], 16) != layer["spi_out"]
    server.stop()
    srv = _json_lines(server.output().stdout.decode())
    assert srv[0] == {"listening": 1}                                          # LISTENER
    s = srv[1]
    assert (s["peer_id"], s["local_id"], s["cb"]) == (link.a_id, link.b_id, o["cb"])
    assert s["peer_key"] != o["peer_key"] and s["received"] == 150
    # bob's latch, read at the end, followed the re-established SAs (same peer).
    assert s["protection"]["layers"][0]["spi_out"] == int(child[0]["spi-out"], 16)
    assert s["protection"]["layers"][0]["spi_in"] == int(child[0]["spi-in"], 16)


OPTIONAL = r"""
import json, sys
from ipsecchan import socket
CAROL = sys.argv[1]
r = {}
try:
    socket.create_connection((CAROL, 5000), timeout=10)
    r["require"] = "latched"
except socket.LatchRefused as exc:
    r["require"] = exc.cause.value
s = socket.socket()
s.settimeout(10)
s.setsockopt(socket.SOL_IPSEC, socket.IPSEC_POLICY, socket.IPSEC_POLICY_OPTIONAL)
s.connect((CAROL, 5000))
s.sendall(b"in the clear, knowingly")
r["optional"] = {"state": s.latch.state, "protected": s.latch.protected,
                 "peer": s.getpeerid(), "cb": s.get_channel_binding(),
                 "protection": socket.decode_protection(
                     s.getsockopt(socket.SOL_IPSEC, socket.IPSEC_PROTECTION, 64)),
                 "echo": s.recv(100).decode()}
s.close()
print(json.dumps(r))
"""


PLAIN_ECHO = r"""
import socket, sys
ls = socket.create_server((sys.argv[1], 5000))
while True:
    c, _ = ls.accept()
    try:
        while data := c.recv(1000):
            c.sendall(data)
    except OSError:
        pass
    c.close()
"""


def test_optional_policy_latches_to_cleartext_knowingly(lab, dropin):
    # No IKE anywhere: carol is reached in clear. REQUIRE refuses; OPTIONAL (RFC 5660 3.1)
    # latches to cleartext and says so.
    lab.add_host("alice")
    lab.add_host("carol")
    carol = lab.host("carol").addr(4)
    server = lab.spawn("carol", [lab.kernel.python, "-c", PLAIN_ECHO, carol])
    _wait_listening(lab, "carol", 5000)
    r = json.loads(dropin.python("alice", OPTIONAL, carol, check=True, timeout=60).text)
    server.stop()
    assert r["require"] == "cleartext"
    o = r["optional"]
    assert (o["state"], o["protected"], o["peer"], o["cb"]) == ("ESTABLISHED", False, None,
                                                                None)
    assert o["protection"]["protected"] is False and o["protection"]["layers"] == []
    assert o["echo"] == "in the clear, knowingly"


ASYNC_BREAK = r"""
import asyncio, json, sys, time
from ipsecchan import socket
BOB = sys.argv[1]

async def main():
    s = socket.create_connection((BOB, 5000), timeout=10)
    s.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=s)
    writer.write(b"before\n")
    await writer.drain()
    r = {"before": (await reader.readline()).decode()}
    print("flush", flush=True)        # the harness flushes the SAs
    end = time.monotonic() + 15
    while time.monotonic() < end and s.latch.state != "BROKEN":
        await asyncio.sleep(0.05)
    r["state"] = s.latch.state
    writer.write(b"after\n")          # the transport's send raises: connection_lost(exc)
    try:
        await writer.drain()
        await reader.readline()
        r["after"] = "no error"
    except Exception as exc:
        r["after"] = [type(exc).__name__, getattr(exc, "cause", None)]
    try:
        await reader.readline()
    except Exception as exc:
        r["reader"] = [type(exc).__name__, getattr(exc, "cause", None)]
    r["closing"] = writer.transport.is_closing()
    print(json.dumps(r))

asyncio.run(main())
"""


def _plain_echo_at_bob(lab):
    """alice and bob with IKE between them, and a plain echo server on bob's port 5000:
    (bob's address, the server)."""
    lab.add_host("alice")
    lab.add_host("bob")
    lab.ike("alice", "bob", auth="cert")
    bob = lab.host("bob").addr(4)
    server = lab.spawn("bob", [lab.kernel.python, "-c", PLAIN_ECHO, bob])
    _wait_listening(lab, "bob", 5000)
    return bob, server


def test_asyncio_transport_ends_with_latch_broken(lab, dropin):
    bob, server = _plain_echo_at_bob(lab)
    client = dropin.spawn("alice", [lab.kernel.python, "-c", ASYNC_BREAK, bob])
    end = time.monotonic() + 30
    while b"flush" not in client.output().stdout and time.monotonic() < end:
        time.sleep(0.1)
    lab.run("alice", ["ip", "xfrm", "state", "flush"], check=True)
    r = json.loads(client.wait(30).stdout.decode().splitlines()[-1])
    server.stop()
    assert r["before"] == "before\n" and r["state"] == "BROKEN"
    assert r["reader"] == ["LatchBrokenError", "no-sa"] and r["closing"] is True
    assert r["after"][0] in ("LatchBrokenError", "ConnectionResetError"), r


ACCEPT_ONE = r"""
import json, sys
from ipsecchan import socket
srv = socket.create_server((sys.argv[1], 5000))
print(json.dumps({"listening": True}), flush=True)
conn, peer = srv.accept()             # carol's connection is refused inside; alice's returns
print(json.dumps({"peer": peer[0], "peer_id": conn.getpeerid()}), flush=True)
conn.sendall(b"welcome")
conn.close()
"""

TRY_CONNECT = r"""
import json, socket, sys
s = socket.create_connection((sys.argv[1], 5000), timeout=5)
try:
    print(json.dumps({"got": s.recv(100).decode()}))
except OSError as exc:
    print(json.dumps({"error": type(exc).__name__}))
"""


def test_accept_never_returns_a_connection_it_cannot_latch(lab, dropin):
    # carol reaches bob over a manually keyed SA that no identity source names: bob's
    # listener refuses it (identity-unknown) inside accept(); alice's IKE connection is the
    # one accept() returns.
    for h in ("alice", "bob", "carol"):
        lab.add_host(h)
    link = lab.ike("alice", "bob", auth="cert")
    lab.static_sa("carol", "bob")
    bob = lab.host("bob").addr(4)
    server = dropin.spawn("bob", [lab.kernel.python, "-c", ACCEPT_ONE, bob])
    _wait_listening(lab, "bob", 5000)
    carol = json.loads(lab.python("carol", TRY_CONNECT, bob, check=True, timeout=30).text)
    alice = json.loads(lab.python("alice", TRY_CONNECT, bob, check=True, timeout=30).text)
    out = _lines(server, 2)
    assert carol == {"error": "ConnectionResetError"}
    assert alice == {"got": "welcome"}
    assert out[1] == {"peer": lab.host("alice").addr(4), "peer_id": link.a_id}
    assert "refused a connection from" in server.output().stderr.decode()


FROMFD = r"""
import json, sys
from ipsecchan import socket
s = socket.create_connection((sys.argv[1], 5000), timeout=10)
twin = socket.fromfd(s.fileno(), s.family, s.type)
r = {"original": s.latch.state, "twin": twin.latch, "twin_peer": twin.getpeerid()}
twin.close()                          # closing the twin must not unpin the connection
s.sendall(b"still latched")
r["echo"] = s.recv(100).decode()
r["after"] = s.latch.state
s.close()
print(json.dumps(r))
"""


def test_fromfd_of_a_latched_connection_shares_it(lab, dropin):
    # One latch per connection: a second descriptor of it (fromfd) does not latch again,
    # and closing it leaves the original's latch and pins alone.
    lab.add_host("alice")
    lab.add_host("bob")
    lab.ike("alice", "bob", auth="cert")
    bob = lab.host("bob").addr(4)
    server = lab.spawn("bob", [lab.kernel.python, "-c", PLAIN_ECHO, bob])
    _wait_listening(lab, "bob", 5000)
    r = json.loads(dropin.python("alice", FROMFD, bob, check=True, timeout=60).text)
    server.stop()
    assert r["original"] == "ESTABLISHED" and r["twin"] is None and r["twin_peer"] is None
    assert r["echo"] == "still latched" and r["after"] == "ESTABLISHED"


DUAL_STACK_SERVER = r"""
import json, sys
from ipsecchan import socket
srv = socket.create_server(("::", 5000), family=socket.AF_INET6, dualstack_ipv6=True)
print(json.dumps({"listening": srv.latch.state}), flush=True)
conn, peer = srv.accept()
conn.settimeout(20)
data = conn.recv(100)
conn.sendall(data)
print(json.dumps({"peer": peer[0], "family": int(conn.family), "state": conn.latch.state,
                  "peer_id": conn.getpeerid(), "local_id": conn.getlocalid(),
                  "spis": [list(x) for x in conn.latch.spis],
                  "cb": conn.get_channel_binding().hex()}), flush=True)
conn.recv(10)                       # until the client closes
conn.close()
"""

CLIENT_TO_5000 = r"""
import json, sys
from ipsecchan import socket
s = socket.create_connection((sys.argv[1], 5000), timeout=20)
s.sendall(b"over IPv4 to an IPv6 socket")
echo = s.recv(100).decode()
print(json.dumps({"echo": echo, "state": s.latch.state, "peer_id": s.getpeerid(),
                  "spis": [list(x) for x in s.latch.spis],
                  "cb": s.get_channel_binding().hex()}), flush=True)
s.close()
"""


def test_a_dual_stack_server_latches_its_ipv4_clients(lab, dropin):
    # The accepted connection is an AF_INET6 socket whose peer is IPv4-mapped: its packets
    # are IPv4, carried by the IPv4 CHILD_SA, and it latches to it like an IPv4 socket (the
    # same binding as the client's, pins with an IPv4 selector).
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob", auth="cert")
    bob = lab.host("bob").addr(4)
    server = dropin.spawn("bob", [lab.kernel.python, "-c", DUAL_STACK_SERVER])
    _wait_listening(lab, "bob", 5000)
    client = json.loads(dropin.python("alice", CLIENT_TO_5000, bob, check=True, timeout=60).text)
    first, srv = _lines(server, 2)
    assert first == {"listening": "LISTENER"}
    assert srv["peer"].startswith("::ffff:") and srv["family"] == 10
    assert srv["state"] == client["state"] == "ESTABLISHED"
    assert client["echo"] == "over IPv4 to an IPv6 socket"
    assert (srv["peer_id"], srv["local_id"]) == (link.a_id, link.b_id)
    assert client["peer_id"] == link.b_id
    # One channel: the same SAs seen from both ends, and the same binding.
    assert srv["spis"] == client["spis"][::-1]
    assert srv["cb"] == client["cb"]


def test_ipv6_connections_latch_over_an_ipv6_child_sa(lab, dropin):
    # IKE and ESP over IPv6; the same dual-stack server, its client on IPv6 now: the pins
    # are IPv6 ones (IPV6_XFRM_POLICY, IPv6 selector and templates).
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob", auth="cert", family=6)
    bob = lab.host("bob").addr(6)
    server = dropin.spawn("bob", [lab.kernel.python, "-c", DUAL_STACK_SERVER])
    _wait_listening(lab, "bob", 5000)
    client = json.loads(dropin.python("alice", CLIENT_TO_5000, bob, check=True, timeout=60).text)
    _, srv = _lines(server, 2)
    assert srv["peer"] == lab.host("alice").addr(6) and srv["family"] == 10
    assert srv["state"] == client["state"] == "ESTABLISHED"
    assert (srv["peer_id"], srv["local_id"], client["peer_id"]) == (link.a_id, link.b_id,
                                                                    link.b_id)
    child = lab.child_sas("alice", link.conn)
    assert child and client["spis"] == [[int(child[0]["spi-out"], 16)],
                                         [int(child[0]["spi-in"], 16)]]
    assert srv["spis"] == client["spis"][::-1] and srv["cb"] == client["cb"]


COUNTING_SERVER = r"""
import socket, sys, threading
ls = socket.create_server((sys.argv[1], 5000))
def serve(c):
    got = 0
    try:
        while data := c.recv(1000):
            got += len(data)
            c.sendall(data)
    except OSError:
        pass
    print(got, flush=True)
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,)).start()
"""

FAST_OPEN = r"""
import json, sys
from ipsecchan import socket
r = {}
for name, addr in (("carol", sys.argv[1]), ("bob", sys.argv[2])):
    s = socket.socket()
    s.settimeout(20)
    try:
        r[name] = {"sent": s.sendto(b"data in the SYN", socket.MSG_FASTOPEN, (addr, 5000))}
        r[name].update(state=s.latch.state, peer=s.getpeerid(), echo=s.recv(100).decode())
    except socket.LatchRefused as exc:
        r[name] = {"refused": exc.cause.value}
    s.close()
# TCP_FASTOPEN_CONNECT: connect() returns before the SYN, which goes with the first send:
# the latch is made in between, before any packet.
s = socket.socket()
s.setsockopt(socket.IPPROTO_TCP, 30, 1)
s.settimeout(20)
s.connect((sys.argv[2], 5000))
s.sendall(b"fast open connect")
r["bob_connect"] = [s.latch.state, s.recv(100).decode()]
s.close()
print(json.dumps(r))
"""


def _bob_and_carol(lab, server: str, port: int, udp: bool = False):
    """alice with an IKE link (certificates) to bob, and carol reached in clear; the server
    code `server` (its address as argv[1]) listening on `port` on bob and on carol.
    Returns (link, bob's address, carol's, [bob's server, carol's])."""
    for name in ("alice", "bob", "carol"):
        lab.add_host(name)
    link = lab.ike("alice", "bob", auth="cert")
    bob, carol = lab.host("bob").addr(4), lab.host("carol").addr(4)
    servers = [lab.spawn(h, [lab.kernel.python, "-c", server, a])
               for h, a in (("bob", bob), ("carol", carol))]
    for h in ("bob", "carol"):
        _wait_listening(lab, h, port, udp)
    return link, bob, carol, servers


def test_a_fast_open_send_latches_before_its_data_leaves(lab, dropin):
    # sendto(MSG_FASTOPEN) connects without connect(): it is made a connect (and latch)
    # followed by the send. Carol (no IPsec) is refused before any byte reaches her.
    link, bob, carol, (bob_server, carol_server) = _bob_and_carol(lab, COUNTING_SERVER, 5000)
    servers = [carol_server, bob_server]
    r = json.loads(dropin.python("alice", FAST_OPEN, carol, bob, check=True, timeout=60).text)
    end = time.monotonic() + 15         # bob's server prints as each connection ends
    while len(servers[1].output().stdout.split()) < 2 and time.monotonic() < end:
        time.sleep(0.1)
    time.sleep(0.2)
    for s in servers:
        s.stop()
    assert r["carol"] == {"refused": "cleartext"}
    assert r["bob"] == {"sent": 15, "state": "ESTABLISHED", "peer": link.b_id,
                        "echo": "data in the SYN"}
    counts = [s.output().stdout.decode().split() for s in servers]
    assert counts[0] in ([], ["0"]), counts        # carol: no byte (at most a reset)
    assert counts[1] == ["15", "17"], counts
    assert r["bob_connect"] == ["ESTABLISHED", "fast open connect"]


ON_DEMAND = r"""
import json, sys, time
from ipsecchan import socket
r = {}
for name, addr in (("bob", sys.argv[1]), ("carol", sys.argv[2])):
    t = time.monotonic()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.connect((addr, 5001))       # sends nothing: the kernel asks IKE for the SAs
        r[name] = {"state": u.latch.state, "peer": u.getpeerid(),
                   "spis": [list(x) for x in u.latch.spis]}
    except socket.LatchRefused as exc:
        r[name] = {"refused": exc.cause.value}
    r[name]["seconds"] = time.monotonic() - t
    u.close()
print(json.dumps(r))
"""


def test_a_connected_udp_socket_waits_for_sas_negotiated_on_demand(lab, dropin):
    # start_action=trap: no CHILD_SA until traffic asks for one. A UDP connect() sends
    # nothing; its route lookup makes the kernel ask charon, and the latch waits for the SAs
    # (up to engine.SA_GRACE) instead of refusing at once. Carol: a policy asks for ESP but
    # no IKE config answers for her: refused (no-sa) once the wait is over.
    from ipsecchan.latch.engine import SA_GRACE
    lab.add_host("alice")
    lab.add_host("bob")
    lab.add_host("carol")
    link = lab.ike("alice", "bob", auth="cert", child_options={"start_action": "trap"},
                   initiate=False)
    alice, carol = lab.host("alice").addr(4), lab.host("carol").addr(4)
    assert not lab.child_sas("alice", link.conn)
    for d, src, dst in (("out", alice, carol), ("in", carol, alice)):
        lab.run("alice", ["ip", "xfrm", "policy", "add", "src", src, "dst", dst, "dir", d,
                          "tmpl", "proto", "esp", "reqid", "77", "mode", "transport"],
                check=True)
    r = json.loads(dropin.python("alice", ON_DEMAND, lab.host("bob").addr(4), carol,
                                 check=True, timeout=60).text)
    child = lab.child_sas("alice", link.conn)
    assert child, "the latch's wait did not see the on-demand CHILD_SA"
    assert (r["bob"]["state"], r["bob"]["peer"]) == ("ESTABLISHED", link.b_id), r
    assert r["bob"]["spis"] == [[int(child[0]["spi-out"], 16)], [int(child[0]["spi-in"], 16)]]
    assert r["bob"]["seconds"] < SA_GRACE
    assert r["carol"]["refused"] == "no-sa", r
    assert SA_GRACE - 0.5 <= r["carol"]["seconds"] < SA_GRACE + 3, r


UDP_ECHO = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((sys.argv[1], 5001))
while True:
    data, peer = u.recvfrom(2000)
    print(len(data), flush=True)
    u.sendto(data, peer)
"""

UDP_AGAIN = r"""
import json, sys
from ipsecchan import socket
bob, carol = sys.argv[1], sys.argv[2]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
r = {}
u.connect((bob, 5001))
u.send(b"to bob")
r["bob"] = [u.latch.state, u.getpeerid(), u.recv(100).decode()]
try:
    u.connect((carol, 5001))          # another connection: carol has no IPsec
    r["carol"] = ["latched", u.getpeerid()]
except socket.LatchRefused as exc:
    r["carol"] = ["refused", exc.cause.value, u.latch]
try:
    u.send(b"to carol, after the refusal")
    u.recv(100)
    r["carol_echo"] = "answered"
except OSError as exc:
    r["carol_echo"] = type(exc).__name__
u.connect((bob, 5001))                # and back: latched anew
u.send(b"to bob again")
r["bob_again"] = [u.latch.state, u.getpeerid(), u.recv(100).decode()]
u.close()
print(json.dumps(r))
"""


def test_a_udp_socket_connected_again_is_latched_again(lab, dropin):
    # RFC 5660 5.2: a connected UDP socket's connection is its 5-tuple; connect() again is
    # another one. The old latch (bob's) must not carry over to carol.
    link, bob, carol, servers = _bob_and_carol(lab, UDP_ECHO, 5001, udp=True)
    r = json.loads(dropin.python("alice", UDP_AGAIN, bob, carol, check=True, timeout=60).text)
    for s in servers:
        s.stop()
    assert r["bob"] == ["ESTABLISHED", link.b_id, "to bob"]
    assert r["carol"] == ["refused", "cleartext", None], r
    assert r["carol_echo"] == "PermissionError", r       # blocked (EPERM): nothing left
    assert r["bob_again"] == ["ESTABLISHED", link.b_id, "to bob again"]
    got = [s.output().stdout.decode().split() for s in servers]
    assert got == [["6", "12"], []], got                 # carol received nothing


FORKING_SERVER = r"""
import json, os, sys, time
from ipsecchan import socket
srv = socket.create_server((sys.argv[1], 5000))
out = lambda **kw: print(json.dumps(kw), flush=True)
pid = os.fork()
if pid == 0:
    # A pre-forked worker: it accepts through the inherited listener, with its own backend.
    conn, _ = srv.accept()
    conn.sendall(conn.recv(100))
    out(who="worker", state=conn.latch.state, peer=conn.getpeerid())
    conn.recv(10)
    conn.close()
    srv.close()             # its copy of the listener: the parent's pin must stay
    os._exit(0)
os.waitpid(pid, 0)
conn, _ = srv.accept()
out(who="parent", state=conn.latch.state, peer=conn.getpeerid(), listener=srv.latch.state)
pid = os.fork()
if pid == 0:
    # A forked handler (socketserver.ForkingMixIn): the parent closes its copy at once. The
    # handler adopts the inherited latch (its backend follows it from then on).
    time.sleep(0.5)
    conn.sendall(conn.recv(100))
    out(who="handler", state=conn.latch.state, peer=conn.getpeerid())
    end = time.monotonic() + 30
    while conn.latch.state != "BROKEN" and time.monotonic() < end:
        time.sleep(0.05)
    out(who="handler", followed=conn.latch.state, cause=conn.latch.cause)
    os._exit(0)
conn.close()                # the handler's connection must keep its pins
out(who="parent", handed=True)
time.sleep(60)
"""

TWO_CONNECTIONS = r"""
import json, sys, time
from ipsecchan import socket
r = {}
c1 = socket.create_connection((sys.argv[1], 5000), timeout=20)
c1.sendall(b"one")
r["one"] = c1.recv(10).decode()
c1.close()
c2 = socket.create_connection((sys.argv[1], 5000), timeout=20)
time.sleep(1)
c2.sendall(b"two")
r["two"] = c2.recv(10).decode()
print(json.dumps(r), flush=True)
time.sleep(30)
"""


FORKED_IO_HANDLER = r"""
import json, os, sys, time
from ipsecchan import socket
srv = socket.create_server((sys.argv[1], 5000))
conn, _ = srv.accept()
if os.fork() == 0:
    # A forked handler that only does I/O (socketserver's ForkingMixIn with a plain
    # StreamRequestHandler): it never reads the latch, so only its first data call can make
    # this process follow it.
    srv.close()
    while data := conn.recv(100):
        conn.sendall(data)
    os._exit(0)
conn.close()                # the parent lets go of the latch: nobody follows it here now
print(json.dumps({"handed": True}), flush=True)
time.sleep(120)
"""

ECHO_ACROSS_REKEY = r"""
import json, os, sys, time
from ipsecchan import socket
c = socket.create_connection((sys.argv[1], 5000), timeout=20)
c.sendall(b"before")
r = {"before": c.recv(100).decode()}
print(json.dumps(r), flush=True)
end = time.monotonic() + 90
while not os.path.exists(sys.argv[2]) and time.monotonic() < end:
    time.sleep(0.1)
c.sendall(b"after")
try:
    r["after"] = c.recv(100).decode()
except OSError as exc:
    r["after"] = repr(exc)
r["state"] = c.latch.state
print(json.dumps(r), flush=True)
time.sleep(30)
"""


def _spis(lab, host):
    return set(re.findall(r"spi (0x[0-9a-f]+)", lab.run(host, ["ip", "xfrm", "state"],
                                                         check=True).text))


def test_forked_handler_that_only_does_io_follows_rekeys(lab, dropin):
    # The parent hands an accepted connection to a forked child and closes its copy (it lets
    # go of the latch; the pins stay). The child never reads the latch: its first data call
    # adopts it, so the child follows the CHILD_SA rekey and moves the OUT pin to the new SA.
    # Unfollowed, the pin would stay on the old SA, deleted by the rekey: bob's replies
    # could not leave, and the connection would stall.
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob", auth="cert")
    bob = lab.host("bob").addr(4)
    flag = f"{lab.kernel.state_dir}/{lab.dir}/rekeyed-{dropin.mode}"
    server = dropin.spawn("bob", [lab.kernel.python, "-c", FORKED_IO_HANDLER, bob])
    _wait_listening(lab, "bob", 5000)
    client = dropin.spawn("alice", [lab.kernel.python, "-c", ECHO_ACROSS_REKEY, bob, flag])
    assert _lines(client, 1)[0] == {"before": "before"}
    assert _lines(server, 1)[0] == {"handed": True}
    old = _spis(lab, "bob")
    lab.vici("alice", "rekey", {"child": link.child})
    end = time.monotonic() + 30
    while old & _spis(lab, "bob"):          # until the rekey's old SAs are gone, both
        assert time.monotonic() < end, "the old SAs were not deleted after the rekey"
        time.sleep(0.2)
    lab.run(None, ["touch", flag], check=True)
    after = _lines(client, 2, timeout=40)[1]
    client.stop()
    server.stop()
    assert after == {"before": "before", "after": "after", "state": "ESTABLISHED"}, after


PASSING_CLIENT = r"""
import json, os, sys, time
from ipsecchan import socket
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
if os.fork() == 0:
    # The receiver: forked before the connection exists, so it gets it only through the
    # Unix socket, and latches it with its own backend when it makes a socket of it.
    a.close()
    _msg, fds, _flags, _addr = socket.recv_fds(b, 10, 1)
    c = socket.socket(fileno=fds[0])
    c.settimeout(20)         # (the descriptor is non-blocking: the sender's had a timeout)
    b.sendall(b"latched")
    b.recv(10)               # the sender has closed its copy
    c.sendall(b"after")
    print(json.dumps({"state": c.latch.state, "echo": c.recv(10).decode()}), flush=True)
    b.recv(10)
    c.close()
    os._exit(0)
b.close()
conn = socket.create_connection((sys.argv[1], 5000), timeout=20)
socket.send_fds(a, [b"x"], [conn.fileno()])
assert a.recv(10) == b"latched"
conn.close()                 # the sender lets go: the receiver's latch keeps its pins
print(json.dumps({"sender": "closed"}), flush=True)
end = time.monotonic() + 60
while not os.path.exists(sys.argv[2]) and time.monotonic() < end:
    time.sleep(0.1)
a.sendall(b"go")
time.sleep(3)
a.sendall(b"end")
os.wait()
time.sleep(30)
"""


def test_a_connection_passed_to_another_process_keeps_its_pins(lab, dropin):
    # A latched connection's descriptor passed over a Unix socket (SCM_RIGHTS) to another
    # process, whose socket(fileno=) latches it. In-process it latches with its own backend:
    # the sender closing its copy must not clear the pins the receiver's latch relies on (it
    # would still say ESTABLISHED with nothing pinned: whatever SA the SPD picks would carry
    # the connection), nor the receiver closing its copy the sender's. Through the broker,
    # which allows one latch per socket, the receiver shares the sender's latch, and holds it
    # alone once the sender has closed its copy.
    bob, server = _plain_echo_at_bob(lab)
    flag = f"{lab.kernel.state_dir}/{lab.dir}/passed"
    client = dropin.spawn("alice", [lab.kernel.python, "-c", PASSING_CLIENT, bob, flag])
    assert _lines(client, 1)[0] == {"sender": "closed"}
    pins = _pinned_sockets(lab, "alice")
    lab.run(None, ["touch", flag], check=True)
    after = _lines(client, 2)[1]
    client.stop()
    server.stop()
    assert pins == 1, pins            # the connection's IN pin, after the sender closed
    assert after == {"state": "ESTABLISHED", "echo": "after"}, after


def _pinned_sockets(lab, host):
    """Per-socket IN policies with a template on `host`: latch pins (listener or connection)."""
    text = lab.run(host, ["ip", "xfrm", "policy"], check=True).text
    entries = ["\n" + e for e in ("\n" + text).split("\nsrc ") if e.strip()]
    return sum(1 for e in entries if "socket in" in e and "tmpl" in e)


def test_forked_processes_keep_each_others_latches(lab, dropin):
    # After a fork each process has its own backend (the parent's netlink, VICI and broker
    # sockets are not the child's to read), and a socket latched before the fork is shared:
    # closing it in one process must not clear the pins the other relies on (a worker
    # closing its copy of the listener; a parent handing a connection to a forked handler).
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob", auth="cert")
    bob = lab.host("bob").addr(4)
    server = dropin.spawn("bob", [lab.kernel.python, "-c", FORKING_SERVER, bob])
    _wait_listening(lab, "bob", 5000)
    client = dropin.spawn("alice", [lab.kernel.python, "-c", TWO_CONNECTIONS, bob])
    assert _lines(client, 1)[0] == {"one": "one", "two": "two"}
    lines = _lines(server, 4)
    pins = _pinned_sockets(lab, "bob")
    lab.run("bob", ["ip", "xfrm", "state", "flush"], check=True)
    lines = _lines(server, 5)
    client.stop()
    server.stop()
    by = {(x["who"], "handed" in x or "followed" in x): x for x in lines}
    for who in ("worker", "parent", "handler"):
        assert (by[who, False]["state"], by[who, False]["peer"]) == ("ESTABLISHED",
                                                                     link.a_id), lines
    assert by["parent", False]["listener"] == "LISTENER"
    assert ("parent", True) in by
    # The handler follows the connection itself: the SAs flushed, its latch breaks.
    assert by["handler", True] == {"who": "handler", "followed": "BROKEN", "cause": "no-sa"}
    # The listener's pin and the handed-over connection's: neither cleared by a close in
    # the other process.
    assert pins == 2, pins

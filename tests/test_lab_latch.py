"""Latching with real strongSwan and real ESP: a connection latched alice -> bob carries
bob's IKE identity and key; a CHILD_SA rekey keeps it (the pin follows the new SAs, data
flows); flushing the SAs breaks it (no data moves); re-establishing resolves it; releasing
leaves no per-socket policy."""
import json

import pytest

LATCH = r"""
import json, socket, subprocess, sys, time
import vici
from ipsecchan.ike.strongswan import StrongSwanSource
from ipsecchan.latch.engine import Latcher
from ipsecchan.xfrm import dump_policies

BOB, VICI, CONN, CHILD = sys.argv[1:5]
r = {}
src = StrongSwanSource(VICI)
src.wait_connected(10)
lat = Latcher(src)
# What the C index settled (revalidation in C), and how many latches Python observed.
settled, observed = [], []
real_revalidate, real_observe = lat.view.index.revalidate, lat._observe
def revalidate(slots):
    codes, nsas, hs = real_revalidate(slots)
    settled.extend(codes)
    return codes, nsas, hs
def observe(*a, **k):
    observed.append(1)
    return real_observe(*a, **k)
lat.view.index.revalidate, lat._observe = revalidate, observe

def until(handle, pred, wait=10):
    end = time.monotonic() + wait
    while time.monotonic() < end and not pred(handle):
        lat.poll(0.1)
    return pred(handle)

from ipsecchan.lab.echo import EchoStream

s = socket.create_connection((BOB, 5000), timeout=10)
stream = EchoStream(s)
h = lat.latch(s)
p = h.latch.params
r["latched"] = [h.state.value, p.local.id, p.peer.id, p.peer.auth, p.peer.pubkey_sha256,
                [x.key[3] for x in p.out_sas], [x.key[3] for x in p.in_sas],
                p.protection[0].describe()]
r["one"] = stream.exchange(b"one" * 200, 5)

def session():
    c = socket.socket(socket.AF_UNIX)
    c.connect(VICI)
    return vici.Session(c)

old = [x.key[3] for x in p.out_sas]
r["followed"] = [h.slot >= 0]
del settled[:], observed[:]
session().rekey({"child": CHILD})
r["rekeyed"] = until(h, lambda h: [x.key[3] for x in h.latch.params.out_sas] != old)
# (charon deletes the old SAs a little later: those rounds are C's too)
until(h, lambda h: len(h.latch.params.in_sas) == 1, 5)
r["in_c"] = [h.slot >= 0, sorted(set(settled)), len(observed)]
r["after_rekey"] = [h.state.value, [a.rekeyed for a in h.alerts],
                    h.latch.params.peer.id, stream.exchange(b"two" * 200, 5)]

subprocess.run(["ip", "xfrm", "state", "flush"], check=True)
r["flushed"] = until(h, lambda h: h.state.value == "BROKEN")
r["broken"] = [h.state.value, h.latch.cause.value, stream.exchange(b"three" * 200, 2),
               h.slot >= 0]

# bob re-establishes: a fresh IKE_SA (charon still holds the flushed CHILD_SA otherwise).
list(session().terminate({"ike": CONN, "timeout": 10000}))
list(session().initiate({"ike": CONN, "child": CHILD, "timeout": 10000}))
r["resolved"] = until(h, lambda h: h.state.value == "ESTABLISHED", 15)
r["after_resolve"] = [h.latch.params.peer.id, stream.exchange(b"", 15), h.slot >= 0]

lat.release(h)
r["released"] = [pol.dir for pol in dump_policies() if pol.per_socket and pol.templates]
r["history"] = [(a.old.value, a.new.value, a.cause.value if a.cause else None)
                for a in h.alerts]
s.close()
lat.close()
print(json.dumps(r))
"""


@pytest.mark.parametrize("auth,mode", [("cert", "transport"), ("psk", "transport"),
                                       ("cert", "tunnel")])
def test_latch_rekey_break_resolve(lab, auth, mode):
    # (Tunnel SAs name their gateways, not the peer: the C index does not place their
    # notifications itself, it flags them, and the registry finds the latch by SA key.)
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob", auth=auth, child_options={"mode": mode})
    bob = lab.host("bob").addr(4)
    server = lab.spawn("bob", [lab.kernel.python, "-m", "ipsecchan.lab.echo", "serve", bob,
                               "5000"])
    lab.run("bob", ["sleep", "0.5"])
    child = lab.child_sas("alice", link.conn)[0]
    caps = {name: lab.capture(name) for name in ("alice", "bob")}
    r = json.loads(lab.python("alice", LATCH, bob, lab.vici_socket("alice"), link.conn,
                              link.child, check=True, timeout=120).text)
    packets = {name: cap.stop() for name, cap in caps.items()}
    server.stop()
    # Through the rekey, the flush (BROKEN) and the return: nothing of it in clear. What
    # each host sends is seen on its link after the kernel's IPsec output; what it receives
    # in tunnel mode is seen twice (the ESP packet, then its decapsulated inner packet, which
    # the kernel receives again on the same interface), so only sent packets count there.
    sent = [p for name in packets for p in packets[name]
            if mode == "transport" or p.src == lab.host(name).addr(4)]
    assert [p for p in sent if p.proto == 6 and 5000 in (p.sport, p.dport)] == []
    assert sum(p.proto == 50 for p in sent) >= 10
    state, local, peer, peer_auth, pubkey, out_spis, in_spis, prot = r["latched"]
    assert (state, local, peer) == ("ESTABLISHED", link.a_id, link.b_id)
    assert out_spis == [int(child["spi-out"], 16)] and in_spis == [int(child["spi-in"], 16)]
    assert prot.startswith(f"esp {mode} rfc4106(gcm(aes))/256")
    if auth == "cert":
        assert peer_auth == "pubkey" and pubkey and len(pubkey) == 64
    else:
        assert peer_auth == "psk" and pubkey is None
    assert r["one"]
    assert r["rekeyed"], "the latch did not follow the CHILD_SA rekey"
    assert r["after_rekey"] == ["ESTABLISHED", [False, True], link.b_id, True]
    # The latch is followed by the C index before and after the rekey, and the index
    # settled the rekey's last step itself (the old inbound SA gone). Its first step (the
    # new SAs) is C's too when charon has named them by then; if the kernel had them first,
    # the latch waited in Python for their identities (pending), as before.
    from ipsecchan.xfrm.index import INBOUND, MOVED
    followed, codes, observed = r["in_c"]
    assert r["followed"] == [True] and followed, r["in_c"]
    assert INBOUND in codes and (MOVED in codes or observed > 0), r["in_c"]
    assert r["flushed"] and r["broken"][:2] == ["BROKEN", "no-sa"] and r["broken"][2] is False
    assert r["broken"][3] is False                        # BROKEN: Python's, not followed
    assert r["resolved"], "the latch did not come back when bob's SAs returned"
    assert r["after_resolve"] == [link.b_id, True, True]  # followed in C again
    assert r["released"] == []
    assert r["history"] == [["LATCHING", "ESTABLISHED", None],
                            ["ESTABLISHED", "ESTABLISHED", None],
                            ["ESTABLISHED", "BROKEN", "no-sa"],
                            ["BROKEN", "ESTABLISHED", None],
                            ["ESTABLISHED", "CLOSED", None]]


FAULTS = r"""
import json, os, signal, socket, subprocess, sys, time
import vici
from ipsecchan.ike.strongswan import StrongSwanSource
from ipsecchan.latch.engine import Latcher

BOB, VICI, CONN, CHILD = sys.argv[1:5]
ME = "10.0.0.1"
r = {}
src = StrongSwanSource(VICI)
src.wait_connected(10)
lat = Latcher(src)

def until(h, state, wait=10):
    t0, end = time.monotonic(), time.monotonic() + wait
    while time.monotonic() < end and h.state.value != state:
        lat.poll(0.05)
    return [h.state.value, h.latch.cause.value if h.latch.cause else None,
            round(time.monotonic() - t0, 2)]

from ipsecchan.lab.echo import EchoStream

def ip_out():
    # IPv4 packets this namespace handed to the link layer (clear or ESP): the kernel counts
    # them in ip_output, which a packet refused by a policy never reaches.
    with open("/proc/net/snmp") as f:
        names, values = [line.split() for line in f if line.startswith("Ip:")][:2]
    return int(values[names.index("OutRequests")])

def blocked(s, msg):
    # While BROKEN nothing of the connection may leave: no echo, and not one IPv4 packet
    # from alice while the data waits (nothing else of alice's talks in that time).
    before = ip_out()
    ok = stream.exchange(msg, 2)
    return [ok, ip_out() - before]

def session():
    c = socket.socket(socket.AF_UNIX)
    c.connect(VICI)
    return vici.Session(c)

s = socket.create_connection((BOB, 5000), timeout=10)
stream = EchoStream(s)
h = lat.latch(s)
lport = s.getsockname()[1]
r["start"] = [h.state.value, stream.exchange(b"a" * 500, 5)]

# The SPD changed to let this flow out in clear.
bypass = ["src", ME, "dst", BOB, "proto", "tcp", "sport", str(lport), "dir", "out"]
subprocess.run(["ip", "xfrm", "policy", "add", *bypass, "priority", "1"], check=True)
r["bypass"] = until(h, "BROKEN") + blocked(s, b"b" * 500)
subprocess.run(["ip", "xfrm", "policy", "delete", *bypass], check=True)
r["bypass_undone"] = until(h, "ESTABLISHED") + [stream.exchange(b"", 15)]

# The IKE_SA deleted, nothing re-established.
list(session().terminate({"ike": CONN, "timeout": 10000}))
r["ike_deleted"] = until(h, "BROKEN") + blocked(s, b"c" * 500)
list(session().initiate({"ike": CONN, "child": CHILD, "timeout": 10000}))
r["reestablished"] = until(h, "ESTABLISHED", 15) + [stream.exchange(b"", 15)]

# charon killed: identities cannot be read any more -> not verified, never ESTABLISHED.
with open(os.path.join(os.path.dirname(VICI), "charon.pid")) as f:
    os.kill(int(f.read()), signal.SIGKILL)
r["charon_killed"] = until(h, "BROKEN") + blocked(s, b"d" * 500)
lat.poll(0.5)
r["still"] = [h.state.value, h.latch.cause.value]
lat.release(h)
s.close()
print(json.dumps(r))
"""


# Bob's end of the faults test, latched too: when the IKE_SA is deleted, charon removes bob's
# policies as well, and a plain server's next packet (a retransmitted echo, say) would go in
# clear: the SPD alone cannot keep that connection's packets off the link, its latch does.
LATCHED_ECHO = r"""
import json, select, socket, sys
from ipsecchan.ike.strongswan import StrongSwanSource
from ipsecchan.latch.engine import Latcher

ADDR, VICI = sys.argv[1:3]
src = StrongSwanSource(VICI)
src.wait_connected(10)
lat = Latcher(src)
history = []
srv = socket.create_server((ADDR, 5000))
print("listening", flush=True)
conn, _ = srv.accept()
h = lat.latch(conn, on_alert=lambda h, a: history.append([a.new.value,
                                                         a.cause.value if a.cause else None]))
while True:
    lat.poll(0.05)                       # follows the latch: breaks block, resolves lift
    if select.select([conn], [], [], 0)[0]:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
lat.release(h)
print(json.dumps(history), flush=True)
"""


def test_latch_faults_break_and_nothing_leaks(lab):
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob")
    bob = lab.host("bob").addr(4)
    server = lab.spawn("bob", [lab.kernel.python, "-c", LATCHED_ECHO, bob,
                               lab.vici_socket("bob")])
    lab.run("bob", ["sleep", "1"])
    cap = lab.capture("alice")
    r = json.loads(lab.python("alice", FAULTS, bob, lab.vici_socket("alice"), link.conn,
                              link.child, check=True, timeout=150).text)
    packets = cap.stop()
    out = server.wait(30).stdout.splitlines()
    # On the hosts' link, over the whole run (each fault, the breaks, the recoveries): not
    # one packet of the connection in clear, either way; it went as ESP whenever it went.
    assert [p for p in packets if p.proto == 6 and 5000 in (p.sport, p.dport)] == []
    # Bob's latch broke with the IKE_SA and came back with the new one (alice's other faults
    # are alice's own: her SPD, her charon).
    assert json.loads(out[-1]) == [["ESTABLISHED", None], ["BROKEN", "cleartext"],
                                   ["ESTABLISHED", None], ["CLOSED", None]], out
    assert sum(p.proto == 50 for p in packets) >= 10
    assert r["start"] == ["ESTABLISHED", True]
    # [state, cause, seconds to notice, echo came back, IPv4 packets alice sent while broken]
    assert r["bypass"][:2] == ["BROKEN", "cleartext"] and r["bypass"][3:] == [False, 0]
    assert r["bypass_undone"][0] == "ESTABLISHED" and r["bypass_undone"][3] is True
    # charon removes the CHILD_SA's policies with its SAs: the flow would go in clear.
    assert r["ike_deleted"][:2] == ["BROKEN", "cleartext"] and r["ike_deleted"][3:] == [False, 0]
    assert r["reestablished"][0] == "ESTABLISHED" and r["reestablished"][3] is True
    assert r["charon_killed"][:2] == ["BROKEN", "not-verified"]
    assert r["charon_killed"][3:] == [False, 0]
    assert r["still"] == ["BROKEN", "not-verified"]


MANY = r"""
import json, resource, socket, sys, time
from ipsecchan.ike.strongswan import StrongSwanSource
from ipsecchan.latch.engine import Latcher
from ipsecchan.xfrm import dump_policies

BOB, VICI, N = sys.argv[1], sys.argv[2], int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
src = StrongSwanSource(VICI)
src.wait_connected(10)
lat = Latcher(src)
r = {}

def ours():
    # Per-socket policies with templates: the latches' pins (charon's own are template-less).
    return sum(1 for p in dump_policies() if p.per_socket and p.templates)

# A connected UDP socket latches like a TCP connection (RFC 5660 5.2).
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.connect((BOB, 7000))
hu = lat.latch(u)
r["udp"] = [hu.state.value, hu.flow.proto, hu.latch.params.peer.id,
            [x.key[3] for x in hu.latch.params.out_sas]]
lat.release(hu)
u.close()

t0 = time.monotonic()
socks = [socket.create_connection((BOB, 5000)) for _ in range(N)]
handles = [lat.latch(s) for s in socks]
r["latched"] = [sum(h.state.value == "ESTABLISHED" for h in handles), ours()]
# Release, then close: a closed TCP socket's policies live on with the kernel's socket
# (FIN_WAIT, until the peer closes too), so closing a latched socket must release first.
for h, s in zip(handles, socks):
    lat.release(h)
    s.close()
r["after_close"] = ours()
r["seconds"] = round(time.monotonic() - t0, 1)
print(json.dumps(r))
"""

HOLDER = r"""
import resource, socket, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5000))
s.listen(2048)
held = []
while True:
    held.append(s.accept()[0])
"""


def test_udp_latch_and_a_thousand_connections_leave_no_policy(lab):
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob")
    bob = lab.host("bob").addr(4)
    server = lab.spawn("bob", [lab.kernel.python, "-c", HOLDER, bob])
    lab.run("bob", ["sleep", "0.5"])
    child = lab.child_sas("alice", link.conn)[0]
    r = json.loads(lab.python("alice", MANY, bob, lab.vici_socket("alice"), "1000",
                              check=True, timeout=300).text)
    server.stop()
    assert r["udp"] == ["ESTABLISHED", 17, link.b_id, [int(child["spi-out"], 16)]]
    assert r["latched"] == [1000, 2000]        # an IN and an OUT pin per connection
    assert r["after_close"] == 0


UNDER_TRAFFIC = r"""
import hashlib, json, os, socket, sys, time
import vici
from ipsecchan.ike.strongswan import StrongSwanSource
from ipsecchan.latch.engine import Latcher

BOB, VICI, CONN, CHILD = sys.argv[1:5]
src = StrongSwanSource(VICI)
src.wait_connected(10)
lat = Latcher(src)
s = socket.create_connection((BOB, 5000), timeout=10)
h = lat.latch(s)
s.setblocking(False)
sent, got = hashlib.sha256(), hashlib.sha256()
n_sent = n_got = 0

def pump(seconds):
    # Keep data flowing both ways while the latch follows events.
    global n_sent, n_got
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        chunk = os.urandom(1024)
        try:
            k = s.send(chunk)
            sent.update(chunk[:k])
            n_sent += k
        except BlockingIOError:
            pass
        lat.poll(0.01)
        while True:
            try:
                data = s.recv(65536)
            except BlockingIOError:
                break
            got.update(data)
            n_got += len(data)

def session():
    c = socket.socket(socket.AF_UNIX)
    c.connect(VICI)
    return vici.Session(c)

rekeys = []
for i in range(4):
    if i % 2 == 0:
        session().rekey({"child": CHILD})
    else:
        session().rekey({"ike": CONN})
    rekeys.append("child" if i % 2 == 0 else "ike")
    pump(2.0)
end = time.monotonic() + 15          # drain: everything sent comes back
while n_got < n_sent and time.monotonic() < end:
    lat.poll(0.01)
    try:
        data = s.recv(65536)
        got.update(data)
        n_got += len(data)
    except BlockingIOError:
        time.sleep(0.01)
print(json.dumps({"rekeys": rekeys, "state": h.state.value,
                  "alerts": [[a.new.value, a.rekeyed] for a in h.alerts],
                  "bytes": [n_sent, n_got], "same": sent.digest() == got.digest(),
                  "peer": h.latch.params.peer.id}))
lat.release(h)
"""


def test_rekeys_under_traffic_keep_the_latch_and_every_byte(lab):
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob")
    bob = lab.host("bob").addr(4)
    server = lab.spawn("bob", [lab.kernel.python, "-m", "ipsecchan.lab.echo", "serve", bob,
                               "5000"])
    lab.run("bob", ["sleep", "0.5"])
    r = json.loads(lab.python("alice", UNDER_TRAFFIC, bob, lab.vici_socket("alice"),
                              link.conn, link.child, check=True, timeout=120).text)
    server.stop()
    assert r["state"] == "ESTABLISHED" and r["peer"] == link.b_id
    assert not [a for a in r["alerts"] if a[0] != "ESTABLISHED"], r["alerts"]
    # Two CHILD_SA rekeys moved the pin; the IKE_SA rekeys left the SAs (and latch) alone.
    assert sum(rekeyed for _state, rekeyed in r["alerts"]) == 2, r["alerts"]
    n_sent, n_got = r["bytes"]
    assert n_sent > 50_000 and n_got == n_sent and r["same"]

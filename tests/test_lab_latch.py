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
end = time.monotonic() + 10
while not src.connected and time.monotonic() < end:
    time.sleep(0.05)
lat = Latcher(src)

def until(handle, pred, wait=10):
    end = time.monotonic() + wait
    while time.monotonic() < end and not pred(handle):
        lat.poll(0.1)
    return pred(handle)

sent = received = 0
def exchange(s, msg, wait):
    global sent, received
    if msg:
        s.sendall(msg)
        sent += len(msg)
    end = time.monotonic() + wait
    while received < sent and time.monotonic() < end:
        s.settimeout(max(0.01, end - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        received += len(chunk)
    return received == sent

s = socket.create_connection((BOB, 5000), timeout=10)
h = lat.latch(s)
p = h.latch.params
r["latched"] = [h.state.value, p.local.id, p.peer.id, p.peer.auth, p.peer.pubkey_sha256,
                [x.key[3] for x in p.out_sas], [x.key[3] for x in p.in_sas],
                p.protection[0].describe()]
r["one"] = exchange(s, b"one" * 200, 5)

def session():
    c = socket.socket(socket.AF_UNIX)
    c.connect(VICI)
    return vici.Session(c)

old = [x.key[3] for x in p.out_sas]
session().rekey({"child": CHILD})
r["rekeyed"] = until(h, lambda h: [x.key[3] for x in h.latch.params.out_sas] != old)
r["after_rekey"] = [h.state.value, [a.rekeyed for a in h.alerts],
                    h.latch.params.peer.id, exchange(s, b"two" * 200, 5)]

subprocess.run(["ip", "xfrm", "state", "flush"], check=True)
r["flushed"] = until(h, lambda h: h.state.value == "BROKEN")
r["broken"] = [h.state.value, h.latch.cause.value, exchange(s, b"three" * 200, 2)]

# bob re-establishes: a fresh IKE_SA (charon still holds the flushed CHILD_SA otherwise).
list(session().terminate({"ike": CONN, "timeout": 10000}))
list(session().initiate({"ike": CONN, "child": CHILD, "timeout": 10000}))
r["resolved"] = until(h, lambda h: h.state.value == "ESTABLISHED", 15)
r["after_resolve"] = [h.latch.params.peer.id, exchange(s, b"", 15)]

lat.release(h)
r["released"] = [pol.dir for pol in dump_policies() if pol.per_socket and pol.templates]
r["history"] = [(a.old.value, a.new.value, a.cause.value if a.cause else None)
                for a in h.alerts]
s.close()
lat.close()
print(json.dumps(r))
"""


@pytest.mark.parametrize("auth", ["cert", "psk"])
def test_latch_rekey_break_resolve(lab, auth):
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob", auth=auth)
    bob = lab.host("bob").addr(4)
    server = lab.spawn("bob", [lab.kernel.python, "-m", "ipsecchan.lab.echo", "serve", bob,
                               "5000"])
    lab.run("bob", ["sleep", "0.5"])
    child = lab.child_sas("alice", link.conn)[0]
    r = json.loads(lab.python("alice", LATCH, bob, lab.vici_socket("alice"), link.conn,
                              link.child, check=True, timeout=120).text)
    server.stop()
    state, local, peer, peer_auth, pubkey, out_spis, in_spis, prot = r["latched"]
    assert (state, local, peer) == ("ESTABLISHED", link.a_id, link.b_id)
    assert out_spis == [int(child["spi-out"], 16)] and in_spis == [int(child["spi-in"], 16)]
    assert prot.startswith("esp transport rfc4106(gcm(aes))/256")
    if auth == "cert":
        assert peer_auth == "pubkey" and pubkey and len(pubkey) == 64
    else:
        assert peer_auth == "psk" and pubkey is None
    assert r["one"]
    assert r["rekeyed"], "the latch did not follow the CHILD_SA rekey"
    assert r["after_rekey"] == ["ESTABLISHED", [False, True], link.b_id, True]
    assert r["flushed"] and r["broken"][:2] == ["BROKEN", "no-sa"] and r["broken"][2] is False
    assert r["resolved"], "the latch did not come back when bob's SAs returned"
    assert r["after_resolve"] == [link.b_id, True]
    assert r["released"] == []
    assert r["history"] == [["LATCHING", "ESTABLISHED", None],
                            ["ESTABLISHED", "ESTABLISHED", None],
                            ["ESTABLISHED", "BROKEN", "no-sa"],
                            ["BROKEN", "ESTABLISHED", None],
                            ["ESTABLISHED", "CLOSED", None]]

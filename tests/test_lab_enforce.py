"""Kernel enforcement of a latch, on a real ESP connection: pinned, the connection stays on
its SA when the SPD is flushed (an unpinned socket then goes out in clear); BROKEN blocks it
both ways (no byte leaves, the SA's counter stands still); resolved, the queued data flows;
released, the socket's policies are gone.

The identities here are stand-ins (the identity join is the IKE adapter's, tested with it):
this test is about what the kernel does with the latch's effects."""
import json

ENFORCE = r"""
import json, socket, subprocess, sys, time
from ipsecchan.xfrm import dump_policies, dump_sas
from ipsecchan.xfrm.index import Index
from ipsecchan.xfrm.lookup import Flow
from ipsecchan.latch import Latch, LatchState, Observation, Party, Protection, SAFacts
from ipsecchan.latch.enforce import apply_all

BOB = sys.argv[1]
r = {}

def observe(s):
    idx = Index()
    idx.load(dump_sas(), dump_policies())
    (la, lp), (ra, rp) = s.getsockname()[:2], s.getpeername()[:2]
    res = idx.lookup(Flow(s.family, socket.IPPROTO_TCP, la, lp, ra, rp))
    facts = lambda sa: SAFacts(sa.key, sa.reqid, Protection.of(sa), Party("CN=alice"),
                               Party("CN=bob"), sa.src)
    return Observation(True, res.out.verdict, res.inbound.verdict,
                       tuple(map(facts, res.out.sas)), tuple(map(facts, res.inbound.sas)),
                       res.inbound.cleartext_accepted)

def out_packets(spi):
    return next(sa.packets for sa in dump_sas() if sa.spi == spi)

from ipsecchan.lab.echo import EchoStream

s = socket.create_connection((BOB, 5000), timeout=10)
stream = EchoStream(s)
latch = Latch.connector()
apply_all(s, latch.begin(observe(s)))
r["confirm"] = [a.new.value for a in apply_all(s, latch.confirm(observe(s)))]
spi = latch.params.out_sas[0].key[3]
mine = [p for p in dump_policies() if p.per_socket and p.templates
        and p.templates[0].spi == spi]
r["pinned"] = [(p.dir, p.templates[0].reqid) for p in mine]
before = out_packets(spi)
r["one"] = stream.exchange(b"one" * 100, 5)
r["one_moved"] = out_packets(spi) > before

# BROKEN (here: the truth cannot be read) -> blocked both ways.
r["broken"] = [(a.new.value, a.cause.value) for a in
               apply_all(s, latch.observe(Observation(False, reason="test")))]
before = out_packets(spi)
r["blocked_echo"] = stream.exchange(b"two" * 100, 2)
r["blocked_moved"] = out_packets(spi) - before

# Resolved: the same SA pair is back in view -> pinned again, the held data flows.
r["resolved"] = [a.new.value for a in apply_all(s, latch.observe(observe(s)))]
r["after_resolve"] = stream.exchange(b"", 15)

# The SPD is flushed: an unpinned socket now sends its SYN in clear (bob drops it), the
# pinned connection keeps to its SA.
subprocess.run(["ip", "xfrm", "policy", "flush"], check=True)
before = out_packets(spi)
r["after_flush"] = stream.exchange(b"three" * 100, 5)
r["flush_moved"] = out_packets(spi) > before
try:
    socket.create_connection((BOB, 5001), timeout=2).close()
    r["control"] = "connected"
except OSError as exc:
    r["control"] = type(exc).__name__

apply_all(s, latch.close())
r["released"] = [p.dir for p in dump_policies() if p.per_socket and p.templates
                 and p.templates[0].spi == spi]
r["state"] = latch.state.value
s.close()
print(json.dumps(r))
"""


def test_pin_block_resolve_and_release(lab):
    lab.add_host("alice")
    lab.add_host("bob")
    lab.ike("alice", "bob")
    bob = lab.host("bob").addr(4)
    server = lab.spawn("bob", [lab.kernel.python, "-m", "ipsecchan.lab.echo", "serve", bob,
                               "5000"])
    lab.run("bob", ["sleep", "0.5"])
    r = json.loads(lab.python("alice", ENFORCE, bob, check=True, timeout=90).text)
    server.stop()
    assert r["confirm"] == ["ESTABLISHED"]
    assert sorted(d for d, _ in r["pinned"]) == ["out-socket"]   # IN pins by reqid, SPI 0
    assert r["one"] and r["one_moved"]
    assert r["broken"] == [["BROKEN", "not-verified"]]
    assert r["blocked_echo"] is False and r["blocked_moved"] == 0
    assert r["resolved"] == ["ESTABLISHED"] and r["after_resolve"]
    assert r["after_flush"] and r["flush_moved"]
    assert r["control"] in ("timeout", "TimeoutError")
    assert r["released"] == [] and r["state"] == "CLOSED"

"""ipsecchan.ike against real charon and real ESP in the lab: kernel SAs (ipsecchan.xfrm
dumps, in alice's namespace) mapped to IKE identities over alice's VICI socket."""
import hashlib
import json
import time

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

WATCH_TIMEOUT = 30

IDENTIFY = r"""
import json, sys, time
from ipsecchan.ike import ChainSource, StaticSource, StrongSwanSource
from ipsecchan.xfrm import dump_sas

def ident(a):
    end = lambda i: i and {"id": i.id, "auth": i.auth, "pk": i.pubkey_sha256,
                           "cert": i.cert_sha256}
    return {"state": a.state.value, "source": a.source, "local": end(a.local),
            "peer": end(a.peer), "spi_in": a.spi_in, "spi_out": a.spi_out, "reqid": a.reqid,
            "ike": a.ike_name, "ike_id": a.ike_id, "child": a.child_name, "mode": a.mode,
            "proto": a.proto}
"""

ONCE = IDENTIFY + r"""
ss = StrongSwanSource(sys.argv[1], retry=0.1)
deadline = time.monotonic() + 10
while not ss.connected and time.monotonic() < deadline:
    time.sleep(0.05)
src = ChainSource([ss, StaticSource(json.loads(sys.argv[2]))])
out = []
for sa in dump_sas():
    out.append({"sa": {"spi": sa.spi, "src": sa.src, "dst": sa.dst, "reqid": sa.reqid},
                "strongswan": ident(ss.identify(sa)), "chain": ident(src.identify(sa))})
src.close()
print(json.dumps(out))
"""

WATCH = IDENTIFY + r"""
src = StrongSwanSource(sys.argv[1], retry=0.1)
known = []
while True:
    ev = src.next_event(0.5)
    if ev is None:
        continue
    now = [sa for sa in dump_sas() if sa.proto == "esp"]
    known = now or known
    print(json.dumps({"kind": ev.kind, "level": ev.level, "old": ev.old_spis,
                      "new": ev.new_spis, "old_ike": ev.old_ike_id, "new_ike": ev.new_ike_id,
                      "sas": [dict(ident(src.identify(sa)), spi=sa.spi) for sa in known]}),
          flush=True)
"""


def fingerprint(lab, host):
    return hashlib.sha256(lab.host(host).identity.public_key_der()).hexdigest()


def identify_all(lab, host, static=None):
    r = lab.python(host, ONCE, lab.vici_socket(host), json.dumps(static or {"sas": []}),
                   timeout=60, check=True)
    return json.loads(r.stdout)


@pytest.mark.parametrize("auth", ["cert", "rpk", "psk"])
def test_kernel_sas_identified(lab, auth):
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob", auth=auth)
    [child] = lab.child_sas("alice", link.conn)
    spi_in, spi_out = int(child["spi-in"], 16), int(child["spi-out"], 16)
    out = identify_all(lab, "alice")
    assert {o["sa"]["spi"] for o in out} == {spi_in, spi_out}
    for o in out:
        ans = o["strongswan"]
        assert o["chain"] == ans
        assert ans["state"] == "verified", ans
        assert (ans["local"]["id"], ans["peer"]["id"]) == (link.a_id, link.b_id)
        assert ans["local"]["auth"] == ans["peer"]["auth"] == (
            "psk" if auth == "psk" else "pubkey")
        assert (ans["spi_in"], ans["spi_out"]) == (spi_in, spi_out)
        assert ans["reqid"] == o["sa"]["reqid"] == int(child["reqid"])
        assert (ans["ike"], ans["child"], ans["mode"], ans["proto"]) == (
            link.conn, link.child, "transport", "esp")
        if auth == "psk":
            assert ans["peer"]["pk"] is None and ans["local"]["pk"] is None
        else:
            assert ans["peer"]["pk"] == fingerprint(lab, "bob")
            assert ans["local"]["pk"] == fingerprint(lab, "alice")
        if auth == "cert":
            der = lab.host("bob").identity.cert.public_bytes(Encoding.DER)
            assert ans["peer"]["cert"] == hashlib.sha256(der).hexdigest()
        else:
            assert ans["peer"]["cert"] is None


def test_static_sa_unknown_to_strongswan(lab):
    lab.add_host("alice")
    lab.add_host("bob")
    lab.start_charon("alice")
    link = lab.static_sa("alice", "bob")
    static = {"sas": [{"reqid": link.reqid, "local": "alice-manual", "peer": "bob-manual"}]}
    out = identify_all(lab, "alice", static)
    assert {o["sa"]["spi"] for o in out} == {link.spi_ab, link.spi_ba}
    for o in out:
        assert o["strongswan"]["state"] == "unknown"
        chain = o["chain"]
        assert chain["state"] == "verified" and chain["source"] == "static"
        assert chain["peer"] == {"id": "bob-manual", "auth": "manual", "pk": None,
                                 "cert": None}


def _wait_line(proc, seen, pred, what):
    deadline = time.monotonic() + WATCH_TIMEOUT
    while time.monotonic() < deadline:
        out = proc.output()
        lines = [json.loads(x) for x in out.stdout.decode().splitlines() if x.startswith("{")]
        for rec in lines[seen[0]:]:
            seen[0] += 1
            if pred(rec):
                return rec
        if out.rc is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"no {what} event; watcher output:\n{out.stdout.decode()}\n"
                         f"{out.stderr.decode()}")


def test_events_rekey_and_daemon_restart(lab):
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob", auth="cert")
    watcher = lab.spawn("alice", [lab.kernel.python, "-u", "-c", WATCH,
                                  lab.vici_socket("alice")])
    seen = [0]
    _wait_line(watcher, seen, lambda r: r["kind"] == "daemon-back", "initial connection")
    bob_pk = fingerprint(lab, "bob")

    lab.vici("alice", "rekey", {"child": link.child})
    ev = _wait_line(watcher, seen, lambda r: r["kind"] == "rekey" and r["level"] == "child",
                    "CHILD_SA rekey")
    assert ev["old"] != ev["new"] and None not in ev["old"] + ev["new"]
    new = {s["spi"]: s for s in ev["sas"] if s["spi"] in ev["new"]}
    assert set(new) == set(ev["new"])
    for s in new.values():
        assert s["state"] == "verified" and s["peer"]["id"] == "CN=bob"
        assert s["peer"]["pk"] == bob_pk and [s["spi_in"], s["spi_out"]] == ev["new"]

    lab.vici("alice", "rekey", {"ike": link.conn})
    ev = _wait_line(watcher, seen, lambda r: r["kind"] == "rekey" and r["level"] == "ike",
                    "IKE_SA rekey")
    assert ev["old_ike"] != ev["new_ike"]
    # the CHILD_SAs now live under the new IKE_SA, with the same (inherited) identities
    deadline = time.monotonic() + 10
    while True:
        out = identify_all(lab, "alice")
        if out and all(o["strongswan"]["ike_id"] == ev["new_ike"] for o in out):
            break
        assert time.monotonic() < deadline, out
        time.sleep(0.3)
    for o in out:
        assert o["strongswan"]["peer"] == {"id": "CN=bob", "auth": "pubkey", "pk": bob_pk,
                                           "cert": o["strongswan"]["peer"]["cert"]}

    alice = lab.host("alice")
    alice.charon.stop()
    alice.charon = None
    ev = _wait_line(watcher, seen, lambda r: r["kind"] == "daemon-lost", "daemon-lost")
    assert ev["sas"] and all(s["state"] == "unavailable" for s in ev["sas"])

    lab.start_charon("alice")
    _wait_line(watcher, seen, lambda r: r["kind"] == "daemon-back", "daemon-back")
    watcher.stop()
    assert b"Traceback" not in watcher.output().stderr

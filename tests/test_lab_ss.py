"""`ipsecchan ss` in the lab: sockets over a real IKEv2/ESP CHILD_SA, and one without IPsec."""
import json
import time

import pytest

HOLD = r"""
import os, socket, sys, time
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
def connect(addr, port):
    deadline = time.monotonic() + 10
    while True:                      # the servers may not listen yet
        try:
            return socket.create_connection((addr, port), timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
bob = connect(sys.argv[1], 5000)
carol = connect(sys.argv[2], 5001)
udp = socket.socket(fam, socket.SOCK_DGRAM)
udp.connect((sys.argv[1], 5002))
lsn = socket.socket(fam)
lsn.bind(("", 6000))
lsn.listen(1)
print(bob.getsockname()[1], carol.getsockname()[1], udp.getsockname()[1], os.getpid(),
      bob.fileno(), flush=True)
time.sleep(120)
"""


def _ports(proc, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = proc.output()
        if out.stdout.strip():
            return [int(p) for p in out.stdout.split()]
        assert out.rc is None, out.stderr.decode(errors="replace")
        time.sleep(0.1)
    raise AssertionError("the client on alice did not connect")


def _ss(lab, *args):
    r = lab.run("alice", [lab.kernel.python, "-m", "ipsecchan", "ss", *args], check=True)
    return r


@pytest.mark.parametrize("family", [4, 6])
def test_ss_shows_the_child_sa_of_each_connection(lab, family):
    for name in ("alice", "bob", "carol"):
        lab.add_host(name)
    link = lab.ike("alice", "bob", family=family)          # carol: no IKE, no policy
    bob, carol = lab.host("bob").addr(family), lab.host("carol").addr(family)
    echo = [lab.kernel.python, "-m", "ipsecchan.lab.echo", "serve"]
    lab.spawn("bob", [*echo, bob, "5000"])
    lab.spawn("carol", [*echo, carol, "5001"])
    holder = lab.spawn("alice", [lab.kernel.python, "-c", HOLD, bob, carol])
    to_bob, to_carol, udp_port, pid, fd = _ports(holder)
    child = lab.child_sas("alice", link.conn)[0]
    spi_out, spi_in = int(child["spi-out"], 16), int(child["spi-in"], 16)

    vici = ("--vici", lab.vici_socket("alice"))
    r = _ss(lab, "--json", *vici)
    rows = json.loads(r.text)
    (b,) = [x for x in rows if x["proto"] == "tcp" and x["local_port"] == to_bob]
    assert (b["state"], b["peer"], b["peer_port"], b["family"]) == ("ESTAB", bob, 5000, family)
    assert [(x["pid"], x["fd"]) for x in b["users"]] == [(pid, fd)]
    v = b["ipsec"]
    assert v["status"] == "protected"
    ident = v["identity"]
    assert ident["state"] == "verified" and ident["peer"]["id"] == link.b_id
    assert ident["local"]["id"] == link.a_id and ident["peer"]["auth"] == "pubkey"
    assert len(ident["peer"]["pubkey_sha256"]) == 64
    assert [s["spi"] for s in v["out"]["sas"]] == [spi_out]
    assert [s["spi"] for s in v["in"]["sas"]] == [spi_in]
    assert v["out"]["sas"][0]["spi_hex"] == f"0x{spi_out:08x}"
    assert v["out"]["sas"][0]["mode"] == "transport"
    assert v["out"]["sas"][0]["algorithms"][0]["text"] == "rfc4106(gcm(aes)):256+32/128"
    assert v["out"]["policy"]["dir"] == "out" and v["in"]["policy"]["dir"] == "in"
    # charon's IKE sockets hold per-socket policies we cannot attribute: said on stderr.
    assert b"per-socket polic" in r.stderr
    # No process here latches (tests/test_lab_watch.py has one that does).
    assert all(x["latch"] is None for x in rows) and b"latches of pid" not in r.stderr

    # The connected UDP socket to bob is covered by the same host-to-host CHILD_SA.
    (u,) = [x for x in rows if x["proto"] == "udp" and x["local_port"] == udp_port]
    assert u["state"] == "ESTAB" and u["ipsec"]["status"] == "protected"
    assert [s["spi"] for s in u["ipsec"]["out"]["sas"]] == [spi_out]

    (c,) = [x for x in rows if x["proto"] == "tcp" and x["local_port"] == to_carol]
    assert c["peer"] == carol and c["ipsec"]["status"] == "unprotected"
    assert c["ipsec"]["out"]["verdict"] == c["ipsec"]["in"]["verdict"] == "no-policy"
    assert c["ipsec"]["out"]["sas"] == [] and c["ipsec"]["in"]["cleartext_accepted"]
    assert not [x for x in rows if x["state"] == "LISTEN"]       # like ss: no listeners

    table = _ss(lab, "-n", *vici).text
    (line_b,) = [ln for ln in table.splitlines() if f":{to_bob} " in ln and "tcp" in ln]
    assert f"esp:0x{spi_out:08x}" in line_b and f"esp:0x{spi_in:08x}" in line_b
    assert " protected " in line_b and f" {link.b_id} (key) " in line_b
    (line_c,) = [ln for ln in table.splitlines() if f":{to_carol} " in ln]
    assert " unprotected " in line_c and "no-policy" in line_c

    prot = json.loads(_ss(lab, "--json", "--protected", "-t").text)
    assert {x["local_port"] for x in prot} == {to_bob}
    unprot = json.loads(_ss(lab, "--json", "--unprotected").text)
    assert to_carol in {x["local_port"] for x in unprot}
    assert to_bob not in {x["local_port"] for x in unprot}
    lst = json.loads(_ss(lab, "--json", "-l", "-t", "--sport", "6000").text)
    assert [(x["state"], x["ipsec"]) for x in lst] == [("LISTEN", None)]

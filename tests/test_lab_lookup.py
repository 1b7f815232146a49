"""The index's answer against the kernel's own: for each flow, the SA the index predicts is the
SA whose kernel counters move when the flow sends (OUT, on the sender) and receives (IN, on
the receiver); BLOCK and bypass move no SA counter.

SPDs are installed with iproute2 (manual keying, so every SA and policy is ours to shape).
Each namespace holds at most 7 SAs and few policies: the lab's UML kernel can wedge when its
XFRM hash tables grow (see the lab notes in README.md).
"""
import json

import pytest

KEY = "0x" + "22" * 20

# Sends 5 UDP datagrams per flow, each flow from its own local port, and reports the index's
# prediction for it and which outbound SAs' packet counters moved.
PROBE = r"""
import json, socket, sys, time
from ipsecchan.xfrm import dump_policies, dump_sas, set_socket_policy, Template
from ipsecchan.xfrm.index import Index
from ipsecchan.xfrm.lookup import Flow, socket_policy

flows = json.loads(sys.argv[1])
send = sys.argv[2] == "send"
idx = Index()
idx.load(dump_sas(), dump_policies())

def counters(local):
    # Outbound SAs only: the peer's ICMP answers come back in through the others.
    return {f"{s.proto}:{s.spi:#x}": s.packets for s in dump_sas() if s.src == local}

out = []
for f in flows:
    fam = socket.AF_INET6 if ":" in f["remote"] else socket.AF_INET
    sp = {}
    if f.get("socket_spi"):
        t = Template(fam, f["local"], f["remote"], "esp", f["socket_spi"], f["socket_reqid"],
                     "transport", False)
        sp = {"out": socket_policy(fam, "out", [t])}
    flow = Flow(fam, socket.IPPROTO_UDP, f["local"], f["lport"], f["remote"], f["rport"])
    r = idx.lookup(flow, sp)
    before = counters(f["local"])
    err = None
    if send:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            if f.get("socket_spi"):
                set_socket_policy(s, "out", list(sp["out"].templates))
            s.bind((f["local"], f["lport"]))
            for _ in range(5):
                try:
                    s.sendto(b"x" * 64, (f["remote"], f["rport"]))
                except OSError as exc:
                    err = exc.errno
            time.sleep(0.3)
    after = counters(f["local"])
    out.append({"name": f["name"], "out": [r.out.verdict, [f"{s.proto}:{s.spi:#x}" for s in r.out.sas]],
                "in": [r.inbound.verdict, [f"{s.proto}:{s.spi:#x}" for s in r.inbound.sas]],
                "encap": [s.encap.dport if s.encap else None for s in r.out.sas],
                "moved": sorted(k for k in after if after[k] > before.get(k, 0)),
                "errno": err})
print(json.dumps(out))
"""


def state(src, dst, spi, reqid, *, proto="esp", mode="transport", extra=""):
    alg = (f"aead 'rfc4106(gcm(aes))' {KEY} 128" if proto == "esp"
           else "auth-trunc 'hmac(sha256)' 0x" + "33" * 32 + " 128")
    return (f"xfrm state add src {src} dst {dst} proto {proto} spi {spi:#x} reqid {reqid} "
            f"mode {mode} {alg} {extra}")


def policy(src, dst, d, prio, tmpl="", *, extra="", action=""):
    return f"xfrm policy add src {src} dst {dst} {extra} dir {d} priority {prio} {action} {tmpl}"


def install(lab, host, lines):
    lab.run(host, ["ip", "-batch", "-"], input="".join(l + "\n" for l in lines).encode()
            ).check()


def probe(lab, host, flows, send=True):
    res = lab.python(host, PROBE, json.dumps(flows), "send" if send else "look", check=True)
    return {r["name"]: r for r in json.loads(res.text)}


def test_priorities_overlap_socket_policy_block_and_bypass(lab):
    """IPv4 transport ESP: a host-to-host policy (reqid 1) under a wider, preferred /24
    policy for UDP port 7000 (reqid 2); a per-socket policy picking reqid 1's SA against the
    SPD; a BLOCK policy (port 7100) and a bypass (port 7200) above both."""
    lab.add_host("alice")
    lab.add_host("bob")
    a, b = "10.0.0.1", "10.0.0.2"
    sas = [state(a, b, 0x1001, 1), state(b, a, 0x1002, 1),
           state(a, b, 0x2001, 2), state(b, a, 0x2002, 2)]
    t1, t2 = ("tmpl proto esp reqid 1 mode transport", "tmpl proto esp reqid 2 mode transport")
    for me, peer in ((a, b), (b, a)):
        host = "alice" if me == a else "bob"
        # alice talks from any port to bob's 7000.
        udp_out, udp_in = (("proto udp dport 7000", "proto udp sport 7000") if me == a
                           else ("proto udp sport 7000", "proto udp dport 7000"))
        install(lab, host, sas + [
            policy(f"{me}/32", f"{peer}/32", "out", 100, t1),
            policy(f"{peer}/32", f"{me}/32", "in", 100, t1),
            policy("10.0.0.0/24", "10.0.0.0/24", "out", 50, t2, extra=udp_out),
            policy("10.0.0.0/24", "10.0.0.0/24", "in", 50, t2, extra=udp_in),
            policy(f"{me}/32", f"{peer}/32", "out", 10, extra="proto udp dport 7100",
                   action="action block"),
            policy(f"{me}/32", f"{peer}/32", "out", 10, extra="proto udp dport 7200"),
            policy(f"{peer}/32", f"{me}/32", "in", 10, extra="proto udp dport 7200"),
        ])
    flows = [dict(name="host", local=a, lport=6001, remote=b, rport=7001),
             dict(name="port7000", local=a, lport=6002, remote=b, rport=7000),
             dict(name="socket", local=a, lport=6003, remote=b, rport=7000, socket_spi=0x1001,
                  socket_reqid=1),
             dict(name="block", local=a, lport=6004, remote=b, rport=7100),
             dict(name="bypass", local=a, lport=6005, remote=b, rport=7200)]
    got = probe(lab, "alice", flows)
    assert got["host"]["out"] == ["protected", ["esp:0x1001"]]
    assert got["host"]["moved"] == ["esp:0x1001"]
    assert got["port7000"]["out"] == ["protected", ["esp:0x2001"]]
    assert got["port7000"]["moved"] == ["esp:0x2001"]
    assert got["socket"]["out"] == ["protected", ["esp:0x1001"]]     # the socket's, not SPD's
    assert got["socket"]["moved"] == ["esp:0x1001"]
    assert got["block"]["out"] == ["block", []]
    assert got["block"]["moved"] == [] and got["block"]["errno"] is not None
    assert got["bypass"]["out"] == ["bypass", []] and got["bypass"]["moved"] == []
    # The receiver: which SA the kernel accepts the flow through (bob sees alice's packets
    # arrive; its counters were read while alice sent, so probe again without sending).
    rev = [dict(name="host", local=b, lport=7001, remote=a, rport=6001),
           dict(name="port7000", local=b, lport=7000, remote=a, rport=6002)]
    bob = probe(lab, "bob", rev, send=False)
    assert bob["host"]["in"] == ["protected", ["esp:0x1001"]]
    assert bob["port7000"]["in"] == ["protected", ["esp:0x2001"]]
    counts = {s.spi: s.packets for s in lab.xfrm_states("bob")}
    assert counts[0x1001] >= 10 and counts[0x2001] == 5    # host + socket flows; port 7000


@pytest.mark.parametrize("case", ["tunnel6", "ah4", "natt4"])
def test_tunnel_ah_and_nat_t(lab, case):
    lab.add_host("alice")
    lab.add_host("bob")
    if case == "tunnel6":
        a, b, net = "fd00::1", "fd00::2", "fd00::/64"
        sas = [state(a, b, 0x3001, 3, mode="tunnel"), state(b, a, 0x3002, 3, mode="tunnel")]
        tmpl = lambda s, d: f"tmpl src {s} dst {d} proto esp reqid 3 mode tunnel"   # noqa: E731
        spi, proto = 0x3001, "esp"
    elif case == "ah4":
        a, b, net = "10.0.0.1", "10.0.0.2", None
        sas = [state(a, b, 0x4001, 4, proto="ah"), state(b, a, 0x4002, 4, proto="ah")]
        tmpl = lambda s, d: "tmpl proto ah reqid 4 mode transport"   # noqa: E731
        spi, proto = 0x4001, "ah"
    else:
        # NAT-T: strongSwan forced to encapsulate ESP in UDP (encap = yes), as behind a NAT;
        # it also sets up the receiving UDP socket the kernel decapsulates on.
        link = lab.ike("alice", "bob", ike_options={"encap": "yes"})
        spi = int(lab.child_sas("alice", link.conn)[0]["spi-out"], 16)
        a, b = "10.0.0.1", "10.0.0.2"
        got = probe(lab, "alice", [dict(name="f", local=a, lport=6001, remote=b, rport=7001)])
        assert got["f"]["out"] == ["protected", [f"esp:{spi:#x}"]]
        assert got["f"]["encap"] == [4500]
        assert got["f"]["moved"] == [f"esp:{spi:#x}"]
        bob = probe(lab, "bob", [dict(name="f", local=b, lport=7001, remote=a, rport=6001)],
                    send=False)
        assert bob["f"]["in"] == ["protected", [f"esp:{spi:#x}"]]
        assert {s.spi: s.packets for s in lab.xfrm_states("bob")}[spi] == 5
        return
    for me, peer in ((a, b), (b, a)):
        host = "alice" if me == a else "bob"
        src_sel, dst_sel = (f"{me}/{128 if ':' in me else 32}", f"{peer}/{128 if ':' in me else 32}")
        if net:
            src_sel = dst_sel = net
        install(lab, host, sas + [
            policy(src_sel, dst_sel, "out", 100, tmpl(me, peer), extra="proto udp"),
            policy(dst_sel if not net else net, src_sel if not net else net, "in", 100,
                   tmpl(peer, me), extra="proto udp"),
        ])
    got = probe(lab, "alice", [dict(name="f", local=a, lport=6001, remote=b, rport=7001)])
    assert got["f"]["out"] == ["protected", [f"{proto}:{spi:#x}"]]
    assert got["f"]["moved"] == [f"{proto}:{spi:#x}"]
    bob = probe(lab, "bob", [dict(name="f", local=b, lport=7001, remote=a, rport=6001)],
                send=False)
    assert bob["f"]["in"] == ["protected", [f"{proto}:{spi:#x}"]]
    counts = {s.spi: s.packets for s in lab.xfrm_states("bob")}
    assert counts[spi] == 5

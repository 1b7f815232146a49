"""IKEv2 between lab hosts with real strongSwan and real ESP in the lab kernel."""
import pytest

from ipsecchan.lab import LabError


def esp_counters(lab, host):
    """{spi: packets} of the ESP SAs in host's kernel, read with iproute2."""
    return {s.spi: s.packets for s in lab.xfrm_states(host) if s.proto == "esp"}


@pytest.mark.parametrize("auth,family", [("cert", 4), ("cert", 6), ("rpk", 4), ("rpk", 6),
                                         ("psk", 4), ("psk", 6)])
def test_tcp_over_ike_child_sa(lab, auth, family):
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob", auth=auth, family=family)

    # Both ends name the other's identity, as authenticated by IKE.
    expect = {"cert": ("CN=alice", "CN=bob"), "rpk": ("alice.lab", "bob.lab"),
              "psk": ("alice.lab", "bob.lab")}[auth]
    assert (link.a_id, link.b_id) == expect
    sas_a = lab.child_sas("alice", link.conn)
    sas_b = lab.child_sas("bob", link.conn)
    assert [(c["local-id"], c["remote-id"]) for c in sas_a] == [expect]
    assert [(c["local-id"], c["remote-id"]) for c in sas_b] == [expect[::-1]]
    child_a, child_b = sas_a[0], sas_b[0]
    assert child_a["mode"] == "TRANSPORT" and child_a["protocol"] == "ESP"
    # The SPIs strongSwan reports are the kernel's SAs, crossed between the two ends.
    assert child_a["spi-out"] == child_b["spi-in"] and child_a["spi-in"] == child_b["spi-out"]
    spis = {int(child_a["spi-in"], 16), int(child_a["spi-out"], 16)}

    before = {h: esp_counters(lab, h) for h in ("alice", "bob")}
    assert set(before["alice"]) == spis == set(before["bob"])
    cli, srv = lab.tcp_exchange("alice", "bob", family=family, count=10)
    assert "10 round trips" in cli.text
    assert srv.text.strip().endswith(lab.host("alice").addr(family))
    for host in ("alice", "bob"):
        after = esp_counters(lab, host)
        for spi in spis:       # both directions' SAs carried the exchange, on both hosts
            assert after[spi] >= before[host][spi] + 10, (host, hex(spi), before, after)


def test_tcp_over_static_sas_without_ike(lab):
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.static_sa("alice", "bob")
    assert all(h.charon is None for h in lab.hosts.values())
    assert lab.run(None, ["pgrep", "-x", "charon"]).rc == 1      # no IKE daemon at all
    lab.tcp_exchange("alice", "bob", count=5)
    for host in ("alice", "bob"):
        sas = {s.spi: s for s in lab.xfrm_states(host)}
        assert set(sas) == {link.spi_ab, link.spi_ba}
        assert all(s.reqid == link.reqid and s.mode == "transport" for s in sas.values())
        assert sas[link.spi_ab].packets >= 5 and sas[link.spi_ba].packets >= 5


def test_static_sas_ipv6(lab):
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.static_sa("alice", "bob", family=6)
    lab.tcp_exchange("bob", "alice", family=6, count=3)
    sas = {s.spi: s for s in lab.xfrm_states("bob")}
    assert sas[link.spi_ab].src == "fd00::1" and sas[link.spi_ab].packets >= 3
    assert sas[link.spi_ba].packets >= 3


def test_without_sas_traffic_is_cleartext(lab):
    # The control: with no SA and no policy, the same exchange moves no SA counter at all.
    lab.add_host("alice")
    lab.add_host("bob")
    lab.tcp_exchange("alice", "bob", count=2)
    assert lab.xfrm_states("alice") == [] and lab.xfrm_states("bob") == []


def test_ike_rejected_by_peer_identity(lab):
    lab.add_host("alice")
    lab.add_host("bob")
    lab.add_host("carol")
    # bob expects carol's identity on this connection: IKE_AUTH must fail, and say so.
    link = lab.ike("alice", "bob", auth="cert", initiate=False)
    bob = lab.host("bob")
    bob.connections[link.conn]["remote"]["id"] = "CN=carol"
    lab.load_swanctl("bob")
    with pytest.raises(LabError, match="IKE alice -> bob .* failed"):
        lab.initiate(link)
    assert lab.child_sas("alice") == [] and lab.child_sas("bob") == []
    assert [s for s in lab.xfrm_states("alice") if s.proto == "esp"] == []

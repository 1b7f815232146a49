"""RFC 5660's point, for real: another peer appearing behind a latched connection's address
must never silently carry it.

alice latches a TCP connection to bob (10.0.0.2, IKEv2, certificates). alice also accepts a
second identity at that address (a multi-peer configuration: a second connection pinning
mallory's certificate). bob leaves the address, mallory (own key, CN=mallory) takes it and
gets a CHILD_SA with alice. The latch must go BROKEN (peer-changed); the data the application
sends meanwhile must reach neither mallory's server nor the wire (a capture on alice's eth0:
the connection never in clear, no ESP on mallory's SAs). Then mallory leaves, bob returns and
re-establishes: the latch is ESTABLISHED again and bob receives every byte (checksummed).
The scenario is ipsecchan.lab.demo.impostor, which the lab demo runs too."""
import time

from ipsecchan.lab.demo import impostor


def test_impostor_breaks_the_latch_and_gets_nothing(lab):
    t0 = time.monotonic()
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob", auth="cert")
    lines = []
    try:
        r = impostor(lab, link, out=lines.append)
    except Exception:
        print("\n".join(lines))
        raise
    report = "\n".join(lines)
    assert r.problems == [], report

    # Latched to bob, by certificate, with bob's key pinned.
    assert r.latched["state"] == "ESTABLISHED" and r.latched["peer"] == "CN=bob", report
    assert r.latched["auth"] == "pubkey" and len(r.latched["pubkey"]) == 64
    bob_key = r.latched["pubkey"]
    assert r.latched["out_spis"] == [int(r.bob_child["spi-out"], 16)]

    # mallory's SAs on alice: IKE identity CN=mallory, same address, and strongSwan gives
    # them the reqid of bob's (same traffic selectors), so the kernel would carry the
    # connection on them if nothing stopped it.
    assert r.mallory_child["remote-id"] == "CN=mallory", r.mallory_child
    assert r.mallory_child["reqid"] == r.bob_child["reqid"], (r.mallory_child, r.bob_child)

    # The break. While alice still holds bob's old SAs, the kernel sends through mallory's
    # (the newest of the reqid) and accepts both: the latch names the newcomer at once
    # (peer-changed), and still does once alice drops bob's dead IKE_SA.
    assert r.first_break["state"] == "BROKEN", r.first_break
    assert r.first_break["cause"] == "peer-changed", r.first_break
    assert r.broken["state"] == "BROKEN" and r.broken["cause"] == "peer-changed", r.broken
    assert "CN=mallory" in r.broken["detail"]
    assert r.held_echoed is False
    assert r.mallory_sa_packets == 0
    assert r.mallory_received == {"connections": 0, "bytes": 0,
                                  "sha256": r.mallory_received["sha256"]}
    assert r.capture["clear"] == 0 and r.capture["esp_to_mallory"] == 0, r.capture
    assert r.capture["esp_from_mallory"] == 0, r.capture
    assert r.capture["ike"] > 0 and r.capture["esp_to_bob_after"] > 0, r.capture  # it saw

    # Resolved: bob again (same key), new SAs, every byte delivered in order.
    assert r.resolved["state"] == "ESTABLISHED" and r.resolved["peer"] == "CN=bob"
    assert r.resolved["pubkey"] == bob_key
    assert set(r.resolved["out_spis"]).isdisjoint(r.latched["out_spis"])
    assert r.bob_received["bytes"] == r.app_sent["bytes"] == 12000
    assert r.bob_received["sha256"] == r.app_sent["sha256"]
    assert r.history[0] == ["LATCHING", "ESTABLISHED", None]
    assert r.history[1] == ["ESTABLISHED", "BROKEN", r.first_break["cause"]]
    assert r.history[2:] == [["BROKEN", "ESTABLISHED", None], ["ESTABLISHED", "CLOSED", None]]
    assert time.monotonic() - t0 < 60, f"took {time.monotonic() - t0:.0f} s\n{report}"

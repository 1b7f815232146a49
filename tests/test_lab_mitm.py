"""Channel bindings against a man in the middle, with real strongSwan and real ESP: mallory
relays alice's connection to bob over two IPsec channels of her own (her own IKE identity on
each). Both of alice's and bob's connections are latched and protected, yet their channel
bindings differ — which is what lets their own authentication (GSS-API, SASL) catch her."""
import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

def _wait_listening(lab, host, port):
    for _ in range(100):
        if f":{port} " in lab.run(host, ["ss", "-ltn"]).text:
            return
        lab.run(host, ["sleep", "0.1"])
    raise AssertionError(f"nothing listens on {host}:{port}")


def test_relay_in_the_middle_changes_the_bindings(lab):
    for h in ("alice", "mallory", "bob"):
        lab.add_host(h)
    to_mallory = lab.ike("alice", "mallory", auth="cert")
    to_bob = lab.ike("mallory", "bob", auth="cert")
    mallory, bob = lab.host("mallory").addr(4), lab.host("bob").addr(4)
    py = lab.kernel.python
    server = lab.spawn("bob", [py, str(EXAMPLES / "echo_server.py"), bob, "5000", "1"],
                       env={"IPSECCHAN_VICI": lab.vici_socket("bob")})
    relay = lab.spawn("mallory", [py, "-m", "ipsecchan.lab.relay", mallory, "5000", bob, "5000"],
                      env={"IPSECCHAN_VICI": lab.vici_socket("mallory")})
    _wait_listening(lab, "bob", 5000)
    _wait_listening(lab, "mallory", 5000)
    client = json.loads(lab.run("alice", [py, str(EXAMPLES / "echo_client.py"), mallory,
                                          "5000", "through mallory"],
                                env={"IPSECCHAN_VICI": lab.vici_socket("alice")},
                                check=True, timeout=60).text)
    served = [json.loads(x) for x in server.wait(30).stdout.decode().splitlines()][1]
    relayed = json.loads(relay.wait(30).stdout.decode().splitlines()[-1])
    assert client["echo"] == "through mallory"          # the relay works
    # Each side sees mallory, authenticated, over ESP; each channel has its bindings...
    assert client["peer_id"] == to_mallory.b_id and served["peer_id"] == to_bob.a_id
    assert client["protection"][0].startswith("esp transport")
    assert client["channel_binding"] and served["channel_binding"]
    assert relayed["cb_down"] == client["channel_binding"]
    assert relayed["cb_up"] == served["channel_binding"]
    # ...and alice's and bob's differ: no relay can make them equal without both keys.
    assert client["channel_binding"] != served["channel_binding"]

"""The broker with real strongSwan and real ESP: processes running as nobody, with no
capabilities at all, latch through `ipsecchan daemon` and get the same latches, options and
channel bindings as privileged ones; without a broker they get a clear error."""
import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _wait_listening(lab, host, port):
    for _ in range(100):
        if f":{port} " in lab.run(host, ["ss", "-ltn"]).text:
            return
        lab.run(host, ["sleep", "0.1"])
    raise AssertionError(f"nothing listens on {host}:{port}")


def test_unprivileged_echo_through_the_broker(lab):
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob", auth="cert")
    bob = lab.host("bob").addr(4)
    py = lab.kernel.python
    brokers = [lab.start_broker(h) for h in ("alice", "bob")]
    server = lab.spawn("bob", lab.unprivileged([py, str(EXAMPLES / "echo_server.py"), bob,
                                                "5000", "1"]),
                       env={"IPSECCHAN_BROKER": lab.broker_socket("bob")})
    _wait_listening(lab, "bob", 5000)
    res = lab.run("alice", lab.unprivileged([py, str(EXAMPLES / "echo_client.py"), bob, "5000",
                                             "as nobody"]),
                  env={"IPSECCHAN_BROKER": lab.broker_socket("alice")}, timeout=60)
    assert res.rc == 0, res.stderr.decode()
    cli = json.loads(res.text)
    srv = [json.loads(x) for x in server.wait(30).stdout.decode().splitlines()][1]
    assert cli["echo"] == "as nobody"
    assert (cli["peer_id"], cli["local_id"]) == (link.b_id, link.a_id)
    assert (srv["peer_id"], srv["local_id"]) == (link.a_id, link.b_id)
    assert cli["protection"][0].startswith("esp transport rfc4106(gcm(aes))/256")
    assert cli["channel_binding"] and cli["channel_binding"] == srv["channel_binding"]
    # The brokers logged each latch with the client's credentials (uid 65534).
    for b in brokers:
        b.stop()
    logs = brokers[0].output().stderr.decode() + brokers[1].output().stderr.decode()
    assert logs.count("uid=65534") >= 3, logs     # alice's connect; bob's listen and accept

    # No broker and no CAP_NET_ADMIN: a clear error naming both ways out.
    lab.spawn("bob", [py, "-m", "ipsecchan.lab.echo", "serve", bob, "5001"])
    _wait_listening(lab, "bob", 5001)
    res = lab.run("alice", lab.unprivileged([py, str(EXAMPLES / "echo_client.py"), bob,
                                             "5001"]),
                  env={"IPSECCHAN_BROKER": lab.broker_socket("alice")}, timeout=60)
    assert res.rc != 0 and "ipsecchan daemon" in res.stderr.decode()
    assert "CAP_NET_ADMIN" in res.stderr.decode()

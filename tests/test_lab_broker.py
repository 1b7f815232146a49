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


HOLD = r"""
import json, sys, time
from ipsecchan import socket
s = socket.create_connection((sys.argv[1], 5000), timeout=10)
print(json.dumps({"port": s.getsockname()[1], "state": s.latch.state}), flush=True)
time.sleep(60)
"""


def test_operators_see_broker_latches_in_ss_and_watch(lab):
    # ss and watch, as root, show the latches the broker holds for an unprivileged process;
    # so does ss for an operator without CAP_NET_ADMIN (the broker answers for the kernel and
    # charon); an unprivileged user not in an operator group is told it may not see them.
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob", auth="cert")
    bob = lab.host("bob").addr(4)
    py = lab.kernel.python
    lab.start_broker("alice", "--operators", "4242")
    env = {"IPSECCHAN_BROKER": lab.broker_socket("alice")}
    lab.spawn("bob", [py, "-m", "ipsecchan.lab.echo", "serve", bob, "5000"])
    _wait_listening(lab, "bob", 5000)
    holder = lab.spawn("alice", lab.unprivileged([py, "-c", HOLD, bob]), env=env)
    for _ in range(100):
        if holder.output().stdout:
            break
        lab.run(None, ["sleep", "0.1"])
    port = json.loads(holder.output().stdout.decode().splitlines()[0])["port"]
    watch = lab.spawn("alice", [py, "-m", "ipsecchan", "watch", "--json"], env=env)
    rows = json.loads(lab.run("alice", [py, "-m", "ipsecchan", "ss", "--json", "--no-ike"],
                              env=env, check=True).text)
    row = next(r for r in rows if r["local_port"] == port and r["peer_port"] == 5000)
    assert row["latch"]["state"] == "ESTABLISHED" and row["latch"]["peer"]["id"] == link.b_id
    assert row["latch"]["owner"]["uid"] == 65534
    as_operator = lab.run("alice", lab.unprivileged([py, "-m", "ipsecchan", "ss", "--json"],
                                                    uid=65533, gid=4242), env=env)
    assert as_operator.rc == 0, as_operator.stderr.decode(errors="replace")
    seen = next(r for r in json.loads(as_operator.text)
                if r["local_port"] == port and r["peer_port"] == 5000)
    assert seen["ipsec"]["status"] == "protected"
    assert seen["ipsec"]["identity"]["peer"]["id"] == link.b_id
    assert seen["ipsec"]["out"]["sas"] and seen["ipsec"]["in"]["sas"]
    assert seen["latch"]["state"] == "ESTABLISHED" and seen["latch"]["owner"]["uid"] == 65534
    # nobody, in no operator group: watch is told so, and sees none of the latches.
    outsider = lab.spawn("alice", lab.unprivileged([py, "-m", "ipsecchan", "watch", "--json"]),
                         env=env)
    lab.run(None, ["sleep", "2"])
    outsider.stop()
    said = [json.loads(x) for x in outsider.output().stdout.decode().splitlines()]
    assert any(x.get("type") == "service" and x["event"] == "refused"
               and "operator" in x["error"] for x in said), said
    assert not any(x.get("type") in ("current", "alert") for x in said), said
    lab.run("alice", ["ip", "xfrm", "state", "flush"], check=True)
    seen = []
    for _ in range(100):
        seen = [json.loads(x) for x in watch.output().stdout.decode().splitlines()]
        if any(x.get("type") == "alert" and x["new"] == "BROKEN" for x in seen):
            break
        lab.run(None, ["sleep", "0.1"])
    watch.stop()
    holder.stop()
    current = [x for x in seen if x.get("type") == "current"]
    assert any(x["latch"]["flow"]["local_port"] == port for x in current), seen
    broke = [x for x in seen if x.get("type") == "alert" and x["new"] == "BROKEN"]
    assert broke and broke[0]["cause"] == "no-sa" and broke[0]["latch"]["owner"]["uid"] == 65534

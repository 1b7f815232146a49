"""`ipsecchan ss` and `ipsecchan watch` in the lab, with real strongSwan and real ESP: a process
on alice latches a connection to bob and publishes it on its status service; ss shows the
latch on that socket, watch shows it break when the SAs are flushed and come back when IKE
re-establishes them; another user is refused."""
import json
import signal
import time

HOLDER = r"""
import json, os, signal, socket, sys
from ipsecchan.ike.strongswan import StrongSwanSource
from ipsecchan.latch.engine import Latcher
from ipsecchan.latch.status import StatusServer

BOB, VICI = sys.argv[1:3]
src = StrongSwanSource(VICI)
src.wait_connected(10)
lat = Latcher(src)
server = StatusServer(lat).start()
s = socket.create_connection((BOB, 5000), timeout=10)
h = lat.latch(s)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
print(json.dumps({"pid": os.getpid(), "port": s.getsockname()[1], "id": h.id,
                  "inode": os.fstat(s.fileno()).st_ino}), flush=True)
while not stop:
    lat.poll(0.2)
lat.release(h)
s.close()
server.close()
lat.close()
"""

# Imports done as root; then another user asks every status service.
OTHER_USER = r"""
import json, os
from ipsecchan.latch import status
os.setgid(65534)
os.setuid(65534)
print(json.dumps([[q.server.pid, q.reply, q.error] for q in status.query_all()]))
"""


def _lines(proc, pred, what, timeout=30):
    """The process's JSON output lines once pred(lines) holds."""
    deadline = time.monotonic() + timeout
    while True:
        out = proc.output()
        lines = [json.loads(x) for x in out.stdout.decode().splitlines()]
        if pred(lines):
            return lines
        assert out.rc is None, f"{what}: exited {out.rc}: {out.stderr.decode()}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s: {lines}"
        time.sleep(0.2)


def test_ss_and_watch_follow_a_latch_over_ike(lab):
    lab.add_host("alice")
    lab.add_host("bob")
    link = lab.ike("alice", "bob")
    bob = lab.host("bob").addr(4)
    py = lab.kernel.python
    lab.spawn("bob", [py, "-m", "ipsecchan.lab.echo", "serve", bob, "5000"])
    lab.run("bob", ["sleep", "0.5"])
    vici = lab.vici_socket("alice")
    holder = lab.spawn("alice", [py, "-c", HOLDER, bob, vici])
    (info,) = _lines(holder, bool, "the latching process")
    child = lab.child_sas("alice", link.conn)[0]
    spi_out, spi_in = int(child["spi-out"], 16), int(child["spi-in"], 16)

    rows = json.loads(lab.run("alice", [py, "-m", "ipsecchan", "ss", "--json", "--vici", vici],
                              check=True).text)
    (row,) = [r for r in rows if r["proto"] == "tcp" and r["local_port"] == info["port"]]
    latch = row["latch"]
    assert (latch["id"], latch["inode"], latch["role"], latch["state"]) == \
        (info["id"], info["inode"], "connector", "ESTABLISHED")
    assert latch["peer"]["id"] == link.b_id and latch["local"]["id"] == link.a_id
    assert latch["peer"]["auth"] == "pubkey" and len(latch["peer"]["pubkey_sha256"]) == 64
    assert (latch["out_spis"], latch["in_spis"]) == ([f"0x{spi_out:08x}"], [f"0x{spi_in:08x}"])
    assert latch["flow"]["peer"] == bob and latch["flow"]["peer_port"] == 5000
    # The latch and the kernel's view of the socket agree.
    assert [s["spi"] for s in row["ipsec"]["out"]["sas"]] == [spi_out]

    watch = lab.spawn("alice", [py, "-m", "ipsecchan", "watch", "--json"])
    (current,) = _lines(watch, bool, "watch's listing")
    assert (current["type"], current["pid"], current["latch"]["id"]) == \
        ("current", info["pid"], info["id"])
    assert current["latch"]["state"] == "ESTABLISHED"

    lab.run("alice", ["ip", "xfrm", "state", "flush"], check=True)
    lines = _lines(watch, lambda ls: len(ls) >= 2, "the break")
    broke = lines[1]
    assert (broke["type"], broke["id"], broke["old"], broke["new"], broke["cause"]) == \
        ("alert", info["id"], "ESTABLISHED", "BROKEN", "no-sa")

    # A fresh IKE_SA (charon still holds the flushed CHILD_SA otherwise).
    lab.vici("alice", "terminate", {"ike": link.conn, "timeout": 10000})
    lab.initiate(link)
    lines = _lines(watch, lambda ls: any(x.get("new") == "ESTABLISHED" for x in ls[2:]),
                   "the resolution")
    back = lines[-1]
    assert (back["old"], back["new"], back["detail"]) == ("BROKEN", "ESTABLISHED", "resolved")
    child = lab.child_sas("alice", link.conn)[0]
    assert back["latch"]["out_spis"] == [f"0x{int(child['spi-out'], 16):08x}"]
    assert back["latch"]["peer"]["id"] == link.b_id

    (answer,) = json.loads(lab.python("alice", OTHER_USER, check=True).text)
    pid, reply, error = answer
    assert pid == info["pid"] and reply is None
    assert error.startswith("refused: not permitted: uid 65534"), error

    done = watch.stop(signal.SIGINT)
    assert done.rc == 0, done.stderr.decode()
    assert len(done.stdout.decode().splitlines()) == 3       # nothing more happened
    assert holder.stop().rc == 0

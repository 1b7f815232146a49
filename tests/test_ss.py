"""`ipsecchan ss` on this host (no lab): sock_diag, /proc scan, join, filters, output."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from ipsecchan import cli, ss
from ipsecchan.xfrm import Algorithm, Policy, SA, Selector, Template, XfrmError

LOOP = "127.0.0.1"


@pytest.fixture
def conn():
    """A listening TCP socket of this process and one loopback connection to it."""
    lsn = socket.socket()
    lsn.bind((LOOP, 0))
    lsn.listen(1)
    cli_sock = socket.create_connection(lsn.getsockname())
    srv, _ = lsn.accept()
    yield lsn, cli_sock, srv
    for s in (cli_sock, srv, lsn):
        s.close()


def opts(*argv):
    ap = cli.argparse.ArgumentParser()
    sub = ap.add_subparsers()
    ss.add_parser(sub)
    return ap.parse_args(["ss", *argv])


def find(rows, **kw):
    return [r for r in rows if all(r[k] == v for k, v in kw.items())]


def test_sock_diag_sees_own_listener_and_connection(conn):
    lsn, c, srv = conn
    lport, cport = lsn.getsockname()[1], c.getsockname()[1]
    socks = ss.list_sockets(["tcp"], [4], ss.ALL_STATES)
    by = {(s.state, s.local_port, s.peer_port): s for s in socks}
    listener = by[("LISTEN", lport, 0)]
    client = by[("ESTAB", cport, lport)]
    server = by[("ESTAB", lport, cport)]
    me = os.getpid()
    for s, sock in ((listener, lsn), (client, c), (server, srv)):
        assert s.proto == "tcp" and s.family == 4 and s.local == LOOP
        assert s.inode == os.fstat(sock.fileno()).st_ino
        assert s.uid == os.getuid()
        assert {"name": s.users[0]["name"], "pid": me, "fd": sock.fileno()} in s.users
    assert client.peer == LOOP and listener.peer == "0.0.0.0" and not listener.connected
    assert client.mark == 0                  # root: the kernel includes SO_MARK


def test_udp_and_ipv6_states():
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.bind(("::1", 0))
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.connect((LOOP, 9))
    try:
        socks = ss.list_sockets(["udp"], [4, 6], ss.ALL_STATES)
        unconn = [s for s in socks if s.local_port == u.getsockname()[1] and s.family == 6]
        connected = [s for s in socks if s.local_port == c.getsockname()[1] and s.family == 4]
        assert [(s.state, s.local, s.peer_port) for s in unconn] == [("UNCONN", "::1", 0)]
        assert [(s.state, s.peer, s.peer_port) for s in connected] == [("ESTAB", LOOP, 9)]
        assert connected[0].users[0]["fd"] == c.fileno()
    finally:
        u.close()
        c.close()


def test_proc_net_fallback_agrees_with_sock_diag(conn):
    lsn, c, _srv = conn
    fields = lambda s: (s.state, s.local, s.local_port, s.peer, s.peer_port, s.inode, s.uid)
    # TIME-WAIT remnants of earlier connections may share a port with ours (and come and go
    # between the two reads): only sockets with an inode are compared.
    diag = {fields(s) for s in ss.list_sockets(["tcp"], [4], ss.ALL_STATES, users=False)
            if s.inode}
    proc = {fields(s) for s in ss._proc_net("tcp", socket.AF_INET, ss.ALL_STATES) if s.inode}
    mine = {lsn.getsockname()[1], c.getsockname()[1]}
    assert {f for f in diag if f[2] in mine} == {f for f in proc if f[2] in mine}
    assert len({f for f in proc if f[2] in mine}) == 3


def test_socket_users_tolerates_vanished_and_unreadable(tmp_path):
    (tmp_path / "10" / "fd").mkdir(parents=True)
    (tmp_path / "10" / "comm").write_text("server\n")
    os.symlink("socket:[4242]", tmp_path / "10" / "fd" / "5")
    os.symlink("/dev/null", tmp_path / "10" / "fd" / "0")
    os.symlink("socket:[99]", tmp_path / "10" / "fd" / "6")
    (tmp_path / "11").mkdir()                # ended: no fd folder any more
    (tmp_path / "12" / "fd").mkdir(parents=True)
    os.symlink("socket:[4242]", tmp_path / "12" / "fd" / "3")   # no comm: ended mid-scan
    (tmp_path / "self").mkdir()
    got = ss.socket_users({4242}, proc=str(tmp_path))
    assert got == {4242: [{"name": "server", "pid": 10, "fd": 5},
                          {"name": "?", "pid": 12, "fd": 3}]}


def test_default_selection_and_filters(conn):
    lsn, c, _srv = conn
    lport, cport = lsn.getsockname()[1], c.getsockname()[1]
    empty = ss.make_index([], [])
    rows = ss.collect(opts("-t", "-4"), empty)
    assert not find(rows, state="LISTEN", local_port=lport)       # like ss: no listeners
    (row,) = find(rows, local_port=cport, peer_port=lport)
    assert row["ipsec"]["status"] == "unprotected"
    assert row["ipsec"]["out"]["verdict"] == row["ipsec"]["in"]["verdict"] == "no-policy"
    assert row["ipsec"]["in"]["cleartext_accepted"] is True

    listening = ss.collect(opts("-l", "-t"), empty)
    (lrow,) = find(listening, local_port=lport)
    assert lrow["state"] == "LISTEN" and lrow["ipsec"] is None
    assert all(r["state"] in ("LISTEN", "UNCONN") for r in listening)

    assert {r["local_port"] for r in ss.collect(opts("-a", "--sport", str(lport)), empty)} \
        == {lport}
    assert [r["local_port"] for r in ss.collect(opts("--dport", str(lport)), empty)] == [cport]
    assert find(ss.collect(opts("--src", "127.0.0.0/8", "--dst", LOOP), empty),
                local_port=cport)
    assert not ss.collect(opts("--dst", "192.0.2.0/24", "--sport", str(cport)), empty)
    assert find(ss.collect(opts("--unprotected", "--sport", str(cport)), empty),
                local_port=cport)
    assert not ss.collect(opts("--protected", "--sport", str(cport)), empty)
    assert not ss.collect(opts("-u", "--sport", str(cport)), empty)


def _loopback_ipsec():
    """An SPD and SAD that protect every TCP flow on 127.0.0.1 (transport mode ESP)."""
    fam = socket.AF_INET
    sel = Selector(fam, LOOP, LOOP, 32, 32, socket.IPPROTO_TCP, 0, 0, 0, 0, 0)
    tmpl = Template(fam, LOOP, LOOP, "esp", 0, 7, "transport", False)
    pols = [Policy(d, "allow", 100, i, sel, (tmpl,), None, None, None)
            for i, d in ((9, "out"), (16, "in"))]
    zero = Selector(0, "", "", 0, 0, 0, 0, 0, 0, 0, 0)
    gcm = Algorithm("aead", "rfc4106(gcm(aes))", 288, 128)
    sa = SA(LOOP, LOOP, fam, "esp", 0xC0FFEE01, 7, "transport", 0, 32, zero, 0, 0, 1, 0,
            (gcm,), None, None, None, False, None)
    return ss.make_index([sa], pols)


def test_protected_join_json_and_table(conn, capsys, monkeypatch):
    lsn, c, _srv = conn
    lport, cport = lsn.getsockname()[1], c.getsockname()[1]
    monkeypatch.setattr(ss, "read_kernel_view", lambda: (_loopback_ipsec(), 2))
    assert cli.main(["ss", "-t", "--json", "--sport", str(cport)]) == 0
    out, err = capsys.readouterr()
    (row,) = json.loads(out)
    assert set(row) == {"proto", "family", "state", "local", "local_port", "peer", "peer_port",
                        "inode", "uid", "mark", "users", "ipsec", "latch"}
    assert row["latch"] is None               # nothing in this process latches
    assert (row["peer_port"], row["users"][0]["pid"]) == (lport, os.getpid())
    v = row["ipsec"]
    assert set(v) == {"status", "identity", "out", "in"} and v["status"] == "protected"
    # No IKE daemon on this host: the identity is unavailable, never guessed.
    assert v["identity"]["state"] == "unavailable" and v["identity"]["peer"] is None
    assert v["out"]["policy"] == {"dir": "out", "index": 9, "priority": 100, "action": "allow"}
    (osa,) = v["out"]["sas"]
    assert osa == {"spi": 0xC0FFEE01, "spi_hex": "0xc0ffee01", "proto": "esp",
                   "mode": "transport", "src": LOOP, "dst": LOOP, "reqid": 7,
                   "algorithms": [{"kind": "aead", "name": "rfc4106(gcm(aes))",
                                   "key_bits": 256, "salt_bits": 32, "icv_bits": 128,
                                   "text": "rfc4106(gcm(aes)):256+32/128"}]}
    assert [s["spi"] for s in v["in"]["sas"]] == [0xC0FFEE01]
    assert v["in"]["cleartext_accepted"] is False
    assert "2 per-socket policies" in err

    assert cli.main(["ss", "-a", "-n", "--protected"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["Netid", "State", "Local", "Address:Port"]
    mine = [line for line in table if line.split()[2] == f"{LOOP}:{cport}"
            and line.split()[1] != "TIME-WAIT"]    # an earlier connection's, same port
    assert len(mine) == 1
    assert mine[0].split()[6] == "-"          # the Latch column
    for text in ("tcp", "ESTAB", f"{LOOP}:{lport}", "protected", "unavailable", "esp:0xc0ffee01",
                 "transport", "rfc4106(gcm(aes)):256+32/128", "out#9(100),in#16(100)",
                 f'users:(("{row["users"][0]["name"]}",pid={os.getpid()},fd={c.fileno()})'):
        assert text in mine[0]
    assert not [line for line in table[1:] if "LISTEN" in line]    # no peer: never protected
    # Columns line up: every row's Peer column starts where the header's does.
    col = table[0].index("Peer Address:Port")
    assert mine[0][col - 2:col] == "  " and mine[0][col] != " "


@pytest.mark.parametrize("alg,text", [
    (Algorithm("aead", "rfc4106(gcm(aes))", 160, 128), "rfc4106(gcm(aes)):128+32/128"),
    (Algorithm("aead", "rfc7539esp(chacha20,poly1305)", 288, 128),
     "rfc7539esp(chacha20,poly1305):256+32/128"),
    (Algorithm("aead", "rfc4309(ccm(aes))", 152, 64), "rfc4309(ccm(aes)):128+24/64"),
    (Algorithm("crypt", "cbc(aes)", 256), "cbc(aes):256"),
    (Algorithm("crypt", "rfc3686(ctr(aes))", 160), "rfc3686(ctr(aes)):128+32"),
    (Algorithm("auth_trunc", "hmac(sha256)", 256, 128), "hmac(sha256):256/128"),
    (Algorithm("auth", "hmac(sha1)", 160), "hmac(sha1):160"),
    (Algorithm("crypt", "ecb(cipher_null)", 0), "ecb(cipher_null)"),
    (Algorithm("comp", "deflate", 0), "deflate"),
])
def test_algorithm_notation(alg, text):
    assert ss.format_algorithm(alg) == text
    d = ss.algorithm_dict(alg)
    assert d["text"] == text and d["key_bits"] + d["salt_bits"] == alg.key_bits


def test_ipv4_mapped_peer_is_an_ipv4_flow():
    s = ss.Sock("tcp", 6, "ESTAB", "::ffff:10.0.0.1", 4000, "::ffff:10.0.0.2", 22, 1, 0)
    f = ss.flow_of(s)
    assert (f.family, f.local, f.remote, f.local_port, f.remote_port) == \
        (socket.AF_INET, "10.0.0.1", "10.0.0.2", 4000, 22)
    assert ss.flow_of(ss.Sock("udp", 4, "UNCONN", "0.0.0.0", 53, "0.0.0.0", 0, 1, 0)) is None


def test_without_spd_access_exit_2_and_no_table(monkeypatch, capsys):
    def denied():
        raise XfrmError(1, "XFRM dump: Operation not permitted")
    monkeypatch.setattr(ss, "read_kernel_view", denied)
    assert cli.main(["ss", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "CAP_NET_ADMIN" in err


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to drop CAP_NET_ADMIN")
def test_without_cap_net_admin_for_real():
    r = subprocess.run(["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin",
                        sys.executable, "-m", "ipsecchan", "ss", "-a"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stdout == ""
    assert "CAP_NET_ADMIN" in r.stderr and "unprotected" not in r.stderr


def test_bad_arguments():
    with pytest.raises(SystemExit) as e:
        cli.main(["ss", "--protected", "--unprotected"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["ss", "--src", "10.0.0.300"])
    with pytest.raises(SystemExit):
        cli.main(["ss", "--sport", "70000"])


def test_missing_diag_module_falls_back_to_proc_net(monkeypatch):
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.connect((LOOP, 9))
    real = ss._diag_dump

    def no_udp_diag(family, proto, states):
        if proto == socket.IPPROTO_UDP:     # what a kernel without udp_diag answers
            raise ss.SockDiagError(2, "sock_diag dump: No such file or directory")
        return real(family, proto, states)
    monkeypatch.setattr(ss, "_diag_dump", no_udp_diag)
    try:
        socks = ss.list_sockets(["udp"], [4], ss.ALL_STATES)
        (s,) = [s for s in socks if s.local_port == c.getsockname()[1]]
        assert (s.state, s.peer, s.peer_port, s.mark) == ("ESTAB", LOOP, 9, None)
        assert s.users[0]["fd"] == c.fileno()
    finally:
        c.close()


def test_other_sock_diag_errors_fail_closed(monkeypatch, capsys):
    def refused(family, proto, states):
        raise ss.SockDiagError(1, "sock_diag dump: Operation not permitted")
    monkeypatch.setattr(ss, "_diag_dump", refused)
    monkeypatch.setattr(ss, "read_kernel_view", lambda: (ss.make_index([], []), 0))
    assert cli.main(["ss"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "socket table" in err


# ---- the Latch column: joined with the status services of latching processes ----

@pytest.fixture
def latcher():
    from ipsecchan.ike.static import StaticSource
    from ipsecchan.latch.engine import Latcher
    lat = Latcher(StaticSource({}))
    yield lat
    lat.close()


def _optional():
    from ipsecchan.latch import Policy, Requirements
    return Requirements(policy=Policy.OPTIONAL)     # cleartext, knowingly: no SPD needed


@pytest.mark.skipif(os.geteuid() != 0, reason="latching needs CAP_NET_ADMIN")
def test_latch_column_from_the_status_service(conn, latcher, capsys, monkeypatch):
    from ipsecchan.latch.status import StatusServer
    lsn, c, srv = conn
    lh = latcher.listen(lsn, _optional())
    h = latcher.latch(c, _optional())
    monkeypatch.setattr(ss, "read_kernel_view", lambda: (ss.make_index([], []), 0))
    with StatusServer(latcher):
        assert cli.main(["ss", "-a", "-t", "--json", "--no-ike"]) == 0
        out, err = capsys.readouterr()
        rows = {r["inode"]: r for r in json.loads(out)}
        assert rows[os.fstat(c.fileno()).st_ino]["latch"]["id"] == h.id
        assert rows[os.fstat(c.fileno()).st_ino]["latch"]["state"] == "ESTABLISHED"
        assert rows[os.fstat(lsn.fileno()).st_ino]["latch"]["role"] == "listener"
        assert rows[os.fstat(srv.fileno()).st_ino]["latch"] is None      # not latched
        assert err == ""
        assert cli.main(["ss", "-a", "-t", "-n", "--no-ike"]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split()[8] == "Latch"
        latch_col = {line.split()[2] + " " + line.split()[3]: line.split()[6]
                     for line in table[1:]}
        cport, lport = c.getsockname()[1], lsn.getsockname()[1]
        assert latch_col[f"{LOOP}:{cport} {LOOP}:{lport}"] == "ESTABLISHED"
        assert latch_col[f"{LOOP}:{lport} {LOOP}:{cport}"] == "-"
        assert latch_col[f"{LOOP}:{lport} 0.0.0.0:*"] == "LISTENER"
    latcher.release(h)
    latcher.release(lh)


def test_an_unreadable_status_service_makes_its_sockets_unknown(conn, capsys, monkeypatch):
    # A service under this process's name that hangs up on every client.
    import threading
    lsn, c, _srv = conn
    bad = socket.socket(socket.AF_UNIX)
    bad.bind(f"\0ipsecchan/latches/{os.getpid()}")
    bad.listen(4)

    def hang_up():
        while True:
            try:
                bad.accept()[0].close()
            except OSError:
                return
    threading.Thread(target=hang_up, daemon=True).start()
    monkeypatch.setattr(ss, "read_kernel_view", lambda: (ss.make_index([], []), 0))
    try:
        assert cli.main(["ss", "-t", "--json", "--no-ike", "--sport",
                         str(c.getsockname()[1])]) == 0
    finally:
        bad.shutdown(socket.SHUT_RDWR)
        bad.close()
    out, err = capsys.readouterr()
    (row,) = json.loads(out)
    assert row["latch"]["state"] == "UNKNOWN" and "closed the connection" in \
        row["latch"]["reason"]
    assert f"latches of pid {os.getpid()} unknown" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="latching needs CAP_NET_ADMIN")
def test_a_latch_on_a_socket_its_process_does_not_hold_is_unknown(conn, latcher):
    from ipsecchan.latch.status import StatusServer
    lsn, c, srv = conn
    h = latcher.latch(c, _optional())
    c_ino = os.fstat(c.fileno()).st_ino
    holder = subprocess.Popen(["sleep", "60"], pass_fds=[c.fileno()])
    other = socket.socket()
    try:
        with StatusServer(latcher):
            # The socket goes to another process; our descriptor now names another socket.
            os.dup2(other.fileno(), c.fileno())
            rows = ss.collect(opts("-t", "-a"), ss.make_index([], []))
        (row,) = [r for r in rows if r["inode"] == c_ino]
        assert [u["pid"] for u in row["users"]] == [holder.pid]
        assert row["latch"] == {"state": "UNKNOWN", "reason": f"pid {os.getpid()} reports a "
                                "latch on a socket it does not hold"}
    finally:
        holder.kill()
        holder.wait()
        latcher.release(h)
        other.close()

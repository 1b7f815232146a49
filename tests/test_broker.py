"""The broker against bad input and attacks, on this machine's kernel.

Each scenario runs in network and pid namespaces of its own (this file re-run as a script
under `unshare`), with the broker in a thread of that process and its clients around it:
other threads, forked children (some as another user), other processes. XFRM policies need
no ESP, so per-socket policies, descriptor checks and latches to cleartext (policy
"optional") are all real here; for the one protected latch, the SAs this kernel cannot hold
are given to the broker's view by hand.

After every attack the broker still serves another client, and holds no more descriptors,
latches or per-socket policies than before.
"""
from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import pytest

from ipsecchan.broker import protocol, server
from ipsecchan.broker.server import Broker
from ipsecchan.ike.static import StaticSource

SCENARIOS = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


def run_scenario(name: str, timeout: float = 300) -> dict:
    # A pid namespace too: whatever a scenario starts ends with it, even when it fails.
    out = subprocess.run(["unshare", "--net", "--pid", "--fork", "--kill-child",
                          "--mount-proc", sys.executable, __file__, name],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-6000:]
    return json.loads(out.stdout.splitlines()[-1])


# ---- the bench: a broker in a thread, and clients ----

class Session:
    """A raw client connection to the broker."""

    def __init__(self, path: str):
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.conn.connect(path)
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.conn.close()

    def send_raw(self, data: bytes, fds=()) -> None:
        if fds:
            socket.send_fds(self.conn, [data], list(fds))
        else:
            self.conn.send(data)

    def request(self, msg: dict, sock=None, fds=None) -> dict:
        """Send (the socket's descriptor number goes in "fd"); returns the message sent."""
        msg = dict(msg)
        msg.setdefault("id", next(self.ids))
        if sock is not None:
            msg.setdefault("fd", sock.fileno())
            fds = [sock.fileno()]
        self.send_raw(json.dumps(msg).encode(), fds or ())
        return msg

    def read(self, timeout: float = 10) -> dict | None:
        self.conn.settimeout(timeout)
        try:
            msg, fds = protocol.recv(self.conn)
        except (socket.timeout, ConnectionError):
            return None
        assert not fds
        return msg

    def reply(self, rid, timeout: float = 10) -> dict:
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            msg = self.read(left)
            if msg is None:
                break
            if "event" in msg:
                self.events.append(msg)
            elif msg.get("id") == rid:
                return msg
        raise TimeoutError(f"no reply to request {rid}")

    def call(self, msg: dict, sock=None, fds=None, timeout: float = 10) -> dict:
        sent = self.request(msg, sock, fds)
        return self.reply(sent["id"] if type(sent["id"]) is int else None, timeout)


def udp(dst: str = "127.0.0.1") -> socket.socket:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.connect((dst, 9))
    return u


def abort(sock: socket.socket) -> None:
    """Close a TCP socket at once (RST): a socket left blocked would keep its policies while
    its FIN waits behind them."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    sock.close()


def socket_policies() -> list[str]:
    out = subprocess.run(["ip", "xfrm", "policy"], capture_output=True, text=True,
                         check=True).stdout
    return [line.strip() for line in out.splitlines() if re.match(r"\s+socket (in|out)", line)]


class Bench:
    def __init__(self, identities=None, **kw):
        self.dir = tempfile.mkdtemp(prefix="ipsecchan-broker-")
        os.chmod(self.dir, 0o755)
        self.path = os.path.join(self.dir, "broker.sock")
        self.broker = Broker(self.path, identities or StaticSource({"sas": []}), **kw)
        self.thread = threading.Thread(target=self.broker.serve_forever, daemon=True)
        self.thread.start()
        self.errors: list[str] = []
        server.log.addHandler(_Collect(self.errors))
        self.tcp_server = socket.create_server(("127.0.0.1", 0), backlog=4096)

    def close(self) -> None:
        self.broker.stop()
        self.thread.join(10)
        self.broker.close()
        self.tcp_server.close()
        os.rmdir(self.dir)

    def session(self) -> Session:
        return Session(self.path)

    def tcp_pair(self) -> tuple[socket.socket, socket.socket]:
        c = socket.create_connection(self.tcp_server.getsockname())
        s, _ = self.tcp_server.accept()
        return c, s

    def serves(self) -> float | None:
        """Seconds a fresh client took to latch a socket and release it; None if it failed."""
        t = time.monotonic()
        try:
            with self.session() as s, udp() as u:
                r = s.call({"op": "latch", "policy": "optional"}, u)
                if not r.get("ok") or r["latch"]["state"] != "ESTABLISHED":
                    return None
                if not s.call({"op": "release", "latch": r["latch"]["id"]}).get("ok"):
                    return None
        except (OSError, TimeoutError):
            return None
        return time.monotonic() - t

    def _snapshot(self) -> dict:
        b = self.broker
        return {"fds": len(os.listdir("/proc/self/fd")), "latches": len(b.latcher.handles),
                "owned": len(b.owner), "clients": len(b.clients),
                "policies": len(socket_policies())}

    def state(self, settle: float = 10.0) -> dict:
        """What the broker holds once its pending closes are done: this process's
        descriptors, latches, clients, and per-socket policies in the namespace."""
        end, last = time.monotonic() + settle, None
        while True:
            cur = self._snapshot()
            if (cur == last and server._closer.pending == 0) or time.monotonic() > end:
                return cur
            last = cur
            time.sleep(0.1)

    def wait_for(self, want: dict, timeout: float = 15) -> dict:
        """The state, once it has the values in `want` (or when time is up)."""
        end = time.monotonic() + timeout
        while True:
            cur = self.state(settle=1)
            if all(cur[k] == v for k, v in want.items()) or time.monotonic() > end:
                return cur
            time.sleep(0.2)


class _Collect(logging.Handler):
    """Keeps the broker's errors (its bugs, with their tracebacks)."""

    def __init__(self, out: list):
        super().__init__(logging.ERROR)
        self.out = out

    def emit(self, record):
        self.out.append(self.format(record))


def as_user(uid: int, fn, *, gid: int | None = None, groups=()):
    """fn() in a forked child running as `uid`; returns what it returns (JSON-able)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setgroups(list(groups))
            os.setgid(uid if gid is None else gid)
            os.setuid(uid)
            os.write(w, json.dumps(fn()).encode())
            code = 0
        except BaseException:
            os.write(w, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == 0, out.decode()
    return json.loads(out)


def _foreign_socket() -> socket.socket:
    """A connected UDP socket of another network namespace (made by a helper process)."""
    code = ("import socket, subprocess, sys\n"
            "subprocess.run(['ip', 'link', 'set', 'lo', 'up'], check=True)\n"
            "ch = socket.socket(fileno=int(sys.argv[1]))\n"
            "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "u.connect(('127.0.0.1', 9))\n"
            "socket.send_fds(ch, [b'x'], [u.fileno()])\n")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        subprocess.run(["unshare", "--net", sys.executable, "-c", code, str(b.fileno())],
                       pass_fds=[b.fileno()], check=True, timeout=30)
        _, (fd,), _, _ = socket.recv_fds(a, 16, 1)
    return socket.socket(fileno=fd)


# ---- bad input: one request each, then a well-formed one from another client ----

def _latch_with(s, sock, **kw):
    return s.call({"op": "latch", "policy": "optional", **kw}, sock)


def case_not_a_socket(bench, s):
    r, w = os.pipe()
    try:
        return s.call({"op": "latch", "fd": r}, fds=[r])
    finally:
        os.close(r)
        os.close(w)


def case_regular_file(bench, s):
    with open(__file__, "rb") as f:
        return s.call({"op": "latch", "fd": f.fileno()}, fds=[f.fileno()])


def case_unix_socket(bench, s):
    a, b = socket.socketpair()
    with a, b:
        return _latch_with(s, a)


def case_raw_socket(bench, s):
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as raw:
        raw.connect(("127.0.0.1", 0))
        return _latch_with(s, raw)


def case_udp_unconnected(bench, s):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind(("127.0.0.1", 0))
        return _latch_with(s, u)


def case_tcp_listening_for_latch(bench, s):
    with socket.create_server(("127.0.0.1", 0)) as lsn:
        return _latch_with(s, lsn)


def case_tcp_connected_for_listen(bench, s):
    c, p = bench.tcp_pair()
    with c, p:
        return s.call({"op": "listen", "policy": "optional"}, c)


def case_udp_for_listen(bench, s):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind(("127.0.0.1", 0))
        return s.call({"op": "listen", "policy": "optional"}, u)


def _tcp_state(sock) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def case_half_closed_by_peer(bench, s):
    c, p = bench.tcp_pair()
    with c, p:
        p.shutdown(socket.SHUT_WR)
        assert c.recv(1) == b""
        assert _tcp_state(c) == 8              # CLOSE_WAIT
        return _latch_with(s, c)


def case_half_closed_by_client(bench, s):
    c, p = bench.tcp_pair()
    with c, p:
        c.shutdown(socket.SHUT_WR)
        assert p.recv(1) == b""
        assert _tcp_state(c) in (4, 5)         # FIN_WAIT1, FIN_WAIT2
        return _latch_with(s, c)


def case_other_namespace(bench, s):
    with _foreign_socket() as u:
        return _latch_with(s, u)


def case_two_sockets(bench, s):
    with udp() as a, udp() as b:
        return s.call({"op": "latch", "policy": "optional", "fd": a.fileno()},
                      fds=[a.fileno(), b.fileno()])


def case_five_descriptors(bench, s):
    socks = [udp() for _ in range(5)]
    try:
        s.request({"op": "latch", "policy": "optional", "fd": socks[0].fileno()},
                  fds=[x.fileno() for x in socks])
        return s.reply(None)          # cut short by the kernel: not read as a request
    finally:
        for x in socks:
            x.close()


def case_fd_for_release(bench, s):
    # A release may carry the latch's socket; not another one (the latch stays).
    with udp() as u, udp() as other:
        lid = _latch_with(s, u)["latch"]["id"]
        reply = s.call({"op": "release", "latch": lid, "quiet": True}, fds=[other.fileno()])
        assert s.call({"op": "release", "latch": lid})["ok"] is True
        return reply


def case_fd_for_list(bench, s):
    with udp() as u:
        return s.call({"op": "list"}, fds=[u.fileno()])


def case_latch_without_socket(bench, s):
    return s.call({"op": "latch", "policy": "optional", "fd": 0})


def case_garbage(bench, s):
    s.send_raw(b"\xff\xfe\x00garbage{{{")
    return s.reply(None)


def case_garbage_with_socket(bench, s):
    with udp() as u:
        s.send_raw(b"not json at all", [u.fileno()])
        return s.reply(None)


def case_not_an_object(bench, s):
    s.send_raw(b"[1, 2, 3]")
    return s.reply(None)


def case_empty_message(bench, s):
    s.send_raw(b"")
    first = s.reply(None)
    # The session goes on: an empty message is not the end of the stream.
    with udp() as u:
        again = _latch_with(s, u)
        assert again["ok"], again
        assert s.call({"op": "release", "latch": again["latch"]["id"]})["ok"]
    return first


def case_oversized(bench, s):
    with udp() as u:
        s.request({"op": "latch", "policy": "optional", "pad": "x" * 100_000}, u)
        return s.reply(None)


def case_deep_nesting(bench, s):
    s.send_raw(b"[" * 30000 + b"]" * 30000)
    return s.reply(None)


def case_huge_number(bench, s):
    s.send_raw(b'{"op": "release", "id": 1, "latch": ' + b"9" * 20000 + b"}")
    return s.reply(None)


def case_huge_id(bench, s):
    s.request({"op": "release", "latch": 1, "id": "x" * 60000})
    return s.reply(None)


def case_list_id(bench, s):
    s.request({"op": "release", "latch": 1, "id": [1, 2]})
    return s.reply(None)


def case_huge_op(bench, s):
    return s.call({"op": "x" * 60000})


def case_unknown_op(bench, s):
    return s.call({"op": "frobnicate"})


def case_no_op(bench, s):
    return s.call({"latch": 1})


def case_bad_policy(bench, s):
    with udp() as u:
        return s.call({"op": "latch", "policy": "maybe"}, u)


def case_bad_peer_id(bench, s):
    with udp() as u:
        return s.call({"op": "latch", "policy": "optional", "peer_id": {"id": 1}}, u)


def case_long_peer_id(bench, s):
    with udp() as u:
        return s.call({"op": "latch", "policy": "optional", "peer_id": "CN=" + "x" * 5000}, u)


def case_release_unknown(bench, s):
    return s.call({"op": "release", "latch": 10**9})


def case_release_not_a_number(bench, s):
    return s.call({"op": "release", "latch": "1"})


def case_release_unhashable(bench, s):
    return s.call({"op": "release", "latch": {"a": 1}})


def case_accept_unknown_listener(bench, s):
    c, p = bench.tcp_pair()
    with c, p:
        return s.call({"op": "accept", "listener": 10**9}, c)


def case_fd_field_names_another(bench, s):
    with udp() as u, udp() as other:
        return s.call({"op": "latch", "policy": "optional", "fd": other.fileno()},
                      fds=[u.fileno()])


def case_fd_field_missing(bench, s):
    with udp() as u:
        return s.call({"op": "latch", "policy": "optional"}, fds=[u.fileno()])


def case_fd_field_not_a_number(bench, s):
    with udp() as u:
        return s.call({"op": "latch", "policy": "optional", "fd": str(u.fileno())},
                      fds=[u.fileno()])


def case_after_not_a_number(bench, s):
    return s.call({"op": "list", "after": "0"})


def case_latched_twice(bench, s):
    """The same socket again, from the client that latched it: refused, with nothing of the
    first. (From another client holding it, it shares the latch: test_broker's sharing.)"""
    with udp() as u:
        one = _latch_with(s, u)
        assert one["ok"], one
        try:
            return _latch_with(s, u)
        finally:
            assert s.call({"op": "release", "latch": one["latch"]["id"]})["ok"]


def case_require_without_ipsec(bench, s):
    """Refused for want of IPsec: the connection is blocked both ways (fail closed), until
    its owner asks for the block to go (to reset it)."""
    with udp() as u:
        r = s.call({"op": "latch", "policy": "require"}, u)
        r["blocked"] = socket_policies()
        r["abort"] = s.call({"op": "abort"}, fds=[u.fileno()])
        r["after_abort"] = socket_policies()
    return r


def case_abort_with_bytes_queued(bench, s):
    """Refused, the application writes anyway (held by the block): the block stays, since a
    retransmission would carry the bytes out once it is gone."""
    c, peer = bench.tcp_pair()
    try:
        r = s.call({"op": "latch", "policy": "require"}, c)
        assert r["errno"] == errno.ECONNREFUSED, r
        c.send(b"X" * 1200)
        r = s.call({"op": "abort"}, fds=[c.fileno()])
        r["blocked"] = socket_policies()
        return r
    finally:
        abort(c)                     # reset behind the block: gone at once, with its policies
        peer.close()


def case_abort_latched(bench, s):
    """A latched socket's policies cannot be cleared by whoever else holds it."""
    with udp() as u, bench.session() as owner:
        one = _latch_with(owner, u)
        try:
            r = s.call({"op": "abort"}, fds=[u.fileno()])
            r["pinned"] = socket_policies()
            return r
        finally:
            assert owner.call({"op": "release", "latch": one["latch"]["id"]})["ok"]


def case_abort_without_socket(bench, s):
    return s.call({"op": "abort"})


CASES = {name[5:].replace("_", "-"): fn for name, fn in globals().items()
         if name.startswith("case_")}


@scenario
def bad_input():
    bench = Bench()
    out = {"_errors": bench.errors}
    try:
        assert bench.serves() is not None
        for name, fn in CASES.items():
            before = bench.state()
            try:
                with bench.session() as s:
                    reply = fn(bench, s)
                    if name != "empty-message":
                        # Still this client's session: a second request is answered too.
                        follow = s.call({"op": "release", "latch": 10**9})
                        assert follow["errno"] == errno.ENOENT, (name, follow)
            except Exception:
                out[name] = {"failure": traceback.format_exc()}
                if not bench.thread.is_alive():       # the broker died: a new one goes on
                    out[name]["failure"] += "\nthe broker's thread is dead"
                    bench.close()
                    bench = Bench()
                continue
            served = bench.serves()
            out[name] = {"reply": reply, "served": served, "before": before,
                         "after": bench.wait_for(before)}
        return out
    finally:
        bench.close()


EXPECT = {
    "not-a-socket": errno.ENOTSOCK, "regular-file": errno.ENOTSOCK,
    "unix-socket": errno.EAFNOSUPPORT, "raw-socket": errno.ESOCKTNOSUPPORT,
    "udp-unconnected": errno.ENOTCONN, "tcp-listening-for-latch": errno.ENOTCONN,
    "tcp-connected-for-listen": errno.EINVAL, "udp-for-listen": errno.EINVAL,
    "half-closed-by-peer": errno.ENOTCONN, "half-closed-by-client": errno.ENOTCONN,
    "other-namespace": errno.EXDEV, "two-sockets": errno.EINVAL,
    "five-descriptors": errno.EINVAL, "fd-for-release": errno.EINVAL,
    "fd-for-list": errno.EINVAL, "latch-without-socket": errno.EINVAL,
    "garbage": errno.EINVAL, "garbage-with-socket": errno.EINVAL,
    "not-an-object": errno.EINVAL, "empty-message": errno.EINVAL,
    "oversized": errno.EINVAL, "deep-nesting": errno.EINVAL, "huge-number": errno.EINVAL,
    "huge-id": errno.EINVAL, "list-id": errno.EINVAL, "huge-op": errno.EINVAL,
    "unknown-op": errno.EINVAL, "no-op": errno.EINVAL, "bad-policy": errno.EINVAL,
    "bad-peer-id": errno.EINVAL, "long-peer-id": errno.EINVAL,
    "release-unknown": errno.ENOENT, "release-not-a-number": errno.EINVAL,
    "release-unhashable": errno.EINVAL, "accept-unknown-listener": errno.ENOENT,
    "fd-field-names-another": errno.EBADF, "fd-field-missing": errno.EINVAL,
    "fd-field-not-a-number": errno.EINVAL, "after-not-a-number": errno.EINVAL,
    "latched-twice": errno.EBUSY, "require-without-ipsec": errno.ECONNREFUSED,
    "abort-latched": errno.EBUSY, "abort-without-socket": errno.EINVAL,
    "abort-with-bytes-queued": errno.EBUSY,
}


@pytest.fixture(scope="module")
def bad_input_results():
    return run_scenario("bad_input")


def test_every_bad_input_case_is_checked():
    assert set(EXPECT) == set(CASES)


@pytest.mark.parametrize("case", sorted(EXPECT))
def test_bad_input_is_refused_and_the_broker_serves_on(bad_input_results, case):
    r = bad_input_results[case]
    assert "failure" not in r, r.get("failure")
    reply = r["reply"]
    assert reply["ok"] is False and reply["errno"] == EXPECT[case], reply
    assert reply["error"] and not reply["error"].startswith("internal error"), reply
    assert len(json.dumps(reply)) < 1000               # never an echo of the input
    assert r["served"] is not None and r["served"] < 2, r
    # Nothing held back: no descriptor, latch or policy more than before.
    assert r["after"] == r["before"], r
    assert r["before"]["latches"] == r["before"]["policies"] == 0


def test_bad_input_hits_no_bug_in_the_broker(bad_input_results):
    assert bad_input_results["_errors"] == []


def test_a_readable_id_is_answered_and_an_unreadable_one_is_null(bad_input_results):
    assert bad_input_results["unknown-op"]["reply"]["id"] == 1
    for case in ("garbage", "oversized", "deep-nesting", "huge-id", "list-id",
                 "five-descriptors"):
        assert bad_input_results[case]["reply"]["id"] is None, case


def test_a_socket_latched_by_another_client_reveals_nothing(bad_input_results):
    reply = bad_input_results["latched-twice"]["reply"]
    assert set(reply) == {"id", "ok", "error", "errno", "cause"}
    assert reply["error"] == "this socket is latched already"


def test_refused_for_want_of_ipsec_means_blocked(bad_input_results):
    reply = bad_input_results["require-without-ipsec"]["reply"]
    assert reply["cause"] == "cleartext"
    # The refusal's own words, for the client's LatchRefused (not its message wrapped again).
    assert reply["detail"] == "no IPsec policy protects the connection", reply
    assert reply["error"] == "connection not latched: cleartext (" + reply["detail"] + ")"
    assert sorted(reply["blocked"]) == ["socket in action block priority 0 ptype main",
                                        "socket out action block priority 0 ptype main"]
    assert reply["abort"]["ok"] is True and reply["after_abort"] == []


def test_a_refused_connection_with_bytes_queued_stays_blocked(bad_input_results):
    reply = bad_input_results["abort-with-bytes-queued"]["reply"]
    assert reply["error"].startswith("bytes are queued")
    assert sorted(reply["blocked"]) == ["socket in action block priority 0 ptype main",
                                        "socket out action block priority 0 ptype main"]


def test_a_latched_socket_cannot_be_set_free_by_abort(bad_input_results):
    reply = bad_input_results["abort-latched"]["reply"]
    assert reply["error"] == "the socket is latched: release it"
    assert sorted(reply["pinned"]) == ["socket in priority 0 ptype main",
                                       "socket out priority 0 ptype main"]


# ---- many clients, floods, clients that go away ----

@scenario
def many_clients():
    resource.setrlimit(resource.RLIMIT_NOFILE, (16384, resource.getrlimit(
        resource.RLIMIT_NOFILE)[1]))
    bench = Bench()
    n = 1000
    try:
        bench.serves()
        before = bench.state()
        sessions = [bench.session() for _ in range(n)]
        socks = [udp() for _ in range(n)]
        # All at once: every request is sent before any reply is read.
        sent = [s.request({"op": "latch", "policy": "optional"}, u)
                for s, u in zip(sessions, socks)]
        replies = [s.reply(m["id"], timeout=120) for s, m in zip(sessions, sent)]
        during = bench.state(settle=1)
        served = bench.serves()
        # Half close their socket first (then the session), half the other way round: a
        # session that ends while its socket lives on leaves that socket blocked.
        for s, u in zip(sessions[:n // 2], socks[:n // 2]):
            u.close()
            s.close()
        for s in sessions[n // 2:]:
            s.close()
        dropped = bench.wait_for({"latches": 0, "clients": 0})
        blocked = socket_policies()
        for u in socks[n // 2:]:
            u.close()
        after = bench.wait_for({"policies": 0})
        return {"n": n, "ok": sum(r["ok"] and r["latch"]["state"] == "ESTABLISHED"
                                  for r in replies),
                "before": before, "during": during, "served": served, "dropped": dropped,
                "blocked": blocked, "after": after, "errors": bench.errors}
    finally:
        bench.close()


def test_a_thousand_concurrent_clients():
    r = run_scenario("many_clients")
    n = r["n"]
    assert r["ok"] == n
    assert r["during"]["clients"] == n and r["during"]["latches"] == n
    assert r["during"]["policies"] == 2 * n             # each UDP socket pinned in and out
    assert r["served"] is not None and r["served"] < 2
    # Sessions that ended with their socket open: those sockets are blocked, not unpinned.
    assert r["dropped"]["latches"] == 0
    assert len(r["blocked"]) == 2 * (n // 2)
    assert all("action block" in p for p in r["blocked"])
    assert r["after"] == r["before"]
    assert r["errors"] == []


@scenario
def flood():
    bench = Bench()
    try:
        bench.serves()
        before = bench.state()
        n = 1000
        flooder = bench.session()
        socks = [udp() for _ in range(n // 2)]
        replies: list = []
        latencies: list = []
        done = threading.Event()

        def read_all():
            while len(replies) < n:
                msg = flooder.read(60)
                if msg is None:
                    break
                replies.append(msg)

        def probe():
            while not done.is_set():
                latencies.append(bench.serves())

        reader = threading.Thread(target=read_all)
        prober = threading.Thread(target=probe)
        reader.start()
        prober.start()
        # Latch requests and junk, interleaved, as fast as the socket takes them.
        for i in range(n):
            if i % 2:
                flooder.request({"op": "latch", "policy": "optional"}, socks[i // 2])
            else:
                flooder.send_raw(b"junk %d" % i)
        reader.join(120)
        done.set()
        prober.join(30)
        latched = [m for m in replies if m.get("ok")]

        # A client that sends and never reads: its requests wait until it does, and the
        # broker's queue for it stays bounded.
        mute = bench.session()
        mute.conn.setblocking(False)
        pushed = 0
        try:
            while pushed < 100_000:
                mute.conn.send(b'{"op": "release", "id": 1, "latch": 1}')
                pushed += 1
        except BlockingIOError:
            pass
        time.sleep(0.5)
        queued = max((len(c.queued) for c in list(bench.broker.clients)), default=0)
        served_while_mute = bench.serves()
        mute.close()
        flooder.close()
        for u in socks:
            u.close()
        after = bench.wait_for({"latches": 0, "clients": 0, "policies": 0})
        return {"n": n, "replies": len(replies), "latched": len(latched),
                "junk_refused": sum(m.get("errno") == errno.EINVAL for m in replies),
                "latencies": latencies, "pushed": pushed, "queued": queued,
                "served_while_mute": served_while_mute, "before": before, "after": after,
                "errors": bench.errors}
    finally:
        bench.close()


def test_a_flood_from_one_client_does_not_starve_others():
    r = run_scenario("flood")
    assert r["replies"] == r["n"]
    assert r["latched"] == r["n"] // 2 and r["junk_refused"] == r["n"] // 2
    lat = r["latencies"]
    assert lat and None not in lat and max(lat) < 2, lat
    # The mute client filled its socket, then the broker stopped reading it.
    assert 0 < r["pushed"] < 100_000
    assert r["queued"] <= server.MAX_QUEUED
    assert r["served_while_mute"] is not None and r["served_while_mute"] < 2
    assert r["after"] == r["before"]
    assert r["errors"] == []


CHILD = r"""
import json, os, socket, sys
path, how = sys.argv[1], sys.argv[2]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.connect(("127.0.0.1", 9))
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(path)
msg = json.dumps({"op": "latch", "id": 1, "policy": "optional", "fd": u.fileno()}).encode()
socket.send_fds(s, [msg], [u.fileno()])
if how == "exit":
    os._exit(0)
print("sent", flush=True)
sys.stdin.read()
"""


@scenario
def going_away():
    bench = Bench()
    try:
        bench.serves()
        before = bench.state()
        out = {"before": before}
        # In this process: the request sent, the session closed before the reply.
        u = udp()
        s = bench.session()
        s.request({"op": "latch", "policy": "optional"}, u)
        s.close()
        out["closed_session"] = bench.wait_for({"latches": 0, "clients": 0})
        out["closed_session_socket"] = socket_policies()    # blocked: it lives on
        u.close()
        out["closed_session_after"] = bench.wait_for({"policies": 0})
        # Processes that exit, or are killed, right after their request.
        for how in ["exit"] * 10 + ["kill"] * 10:
            p = subprocess.Popen([sys.executable, "-c", CHILD, bench.path, how],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            if how == "kill":
                p.stdout.readline()
                p.kill()
            p.wait(30)
            p.stdin.close()
            p.stdout.close()
        out["served"] = bench.serves()
        out["after"] = bench.wait_for(before)
        out["errors"] = bench.errors
        return out
    finally:
        bench.close()


@scenario
def listener_again():
    """A listener whose session ended is blocked; listening again (a client reconnecting)
    lets connections in."""
    bench = Bench()
    try:
        lsn = socket.create_server(("127.0.0.1", 0))
        with bench.session() as s:
            assert s.call({"op": "listen", "policy": "optional"}, lsn)["ok"]
        out = {"dropped": bench.wait_for({"clients": 0, "latches": 0})["policies"],
               "blocked": socket_policies()}
        with bench.session() as s:
            out["again"] = s.call({"op": "listen", "policy": "optional"}, lsn)["ok"]
            out["policies"] = socket_policies()
            try:
                c = socket.create_connection(lsn.getsockname(), timeout=3)
                conn, _ = lsn.accept()
                c.sendall(b"ok")
                out["connected"] = conn.recv(2) == b"ok"
                c.close()
                conn.close()
            except OSError as exc:
                out["connected"] = str(exc)
        lsn.close()
        out["errors"] = bench.errors
        return out
    finally:
        bench.close()


def test_a_listener_blocked_when_its_session_ended_listens_again():
    r = run_scenario("listener_again")
    assert r["dropped"] == 2 and all("action block" in p for p in r["blocked"])
    assert r["again"] is True and r["policies"] == []
    assert r["connected"] is True
    assert r["errors"] == []


def test_clients_that_go_away_mid_request_leave_nothing():
    r = run_scenario("going_away")
    assert r["closed_session"]["latches"] == 0 and r["closed_session"]["clients"] == 0
    assert sorted(r["closed_session_socket"]) == [
        "socket in action block priority 0 ptype main",
        "socket out action block priority 0 ptype main"]
    assert r["closed_session_after"] == r["before"]
    assert r["served"] is not None and r["served"] < 2
    assert r["after"] == r["before"]
    assert r["errors"] == []


HOLDER = r"""
import socket, sys, time
from ipsecchan.broker.client import BrokerClient
from ipsecchan.latch.machine import Policy, Requirements
bc = BrokerClient(sys.argv[1])
opt = Requirements(Policy.OPTIONAL)
socks = []
for _ in range(3):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.connect(("127.0.0.1", 9))
    socks.append(u)
t = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
socks.append(t)
handles = [bc.latch(x, opt) for x in socks]
print(" ".join(h.state.value for h in handles), flush=True)
time.sleep(3600)
"""


@scenario
def holder_killed():
    bench = Bench()
    try:
        bench.serves()
        before = bench.state()
        port = bench.tcp_server.getsockname()[1]
        p = subprocess.Popen([sys.executable, "-c", HOLDER, bench.path, str(port)],
                             stdout=subprocess.PIPE, text=True)
        states = p.stdout.readline().split()
        peer, _ = bench.tcp_server.accept()
        holding = bench.state(settle=1)
        p.kill()
        p.wait(30)
        p.stdout.close()
        # Its TCP connection ends once this end closes too (FIN_WAIT -> TIME_WAIT: the socket
        # and its policies go).
        assert peer.recv(1) == b""
        peer.close()
        after = bench.wait_for(before)
        return {"states": states, "before": before, "holding": holding, "after": after,
                "served": bench.serves(), "errors": bench.errors}
    finally:
        bench.close()


def test_a_killed_client_leaves_no_descriptor_latch_or_policy():
    r = run_scenario("holder_killed")
    assert r["states"] == ["ESTABLISHED"] * 4
    assert r["holding"]["latches"] == 4 and r["holding"]["policies"] == 8
    # The broker holds no descriptor of the sockets: only the session and its pidfd (the
    # other two: this end of the TCP connection, the pipe from the client).
    assert r["holding"]["fds"] - r["before"]["fds"] == 2 + 2
    assert r["after"] == r["before"]
    assert r["served"] is not None
    assert r["errors"] == []


LINGERER = r"""
import json, os, socket, struct, sys
path, port = sys.argv[1], int(sys.argv[2])
t = socket.create_connection(("127.0.0.1", port))
t.setblocking(False)
try:
    while True:                    # the peer never reads: data stays unsent
        t.send(b"x" * 65536)
except BlockingIOError:
    pass
t.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 60))
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(path)
msg = json.dumps({"op": "listen", "id": 1, "fd": t.fileno()}).encode()
socket.send_fds(s, [msg], [t.fileno()])
os.close(t.detach())               # the broker's copy is now the last
os._exit(0)
"""


@scenario
def lingering_socket():
    """A client hands over a socket whose last close would block for a minute."""
    bench = Bench()
    try:
        bench.serves()
        port = bench.tcp_server.getsockname()[1]
        # Keep the broker's loop from reading until the client has closed its copy.
        with bench.broker.latcher.lock:
            time.sleep(0.5)
            subprocess.run([sys.executable, "-c", LINGERER, bench.path, str(port)],
                           check=True, timeout=30)
            peer, _ = bench.tcp_server.accept()
        served = [bench.serves() for _ in range(3)]
        stuck = server._closer.pending
        abort(peer)                # the connection resets: the lingering close ends
        return {"served": served, "stuck": stuck, "errors": bench.errors}
    finally:
        bench.close()


def test_a_lingering_socket_cannot_stall_the_broker():
    r = run_scenario("lingering_socket")
    assert r["stuck"] >= 1          # its close is still waiting, in a helper thread
    assert None not in r["served"] and max(r["served"]) < 2, r["served"]
    assert r["errors"] == []


@scenario
def quiet_release():
    """The client library's release of a TCP connection, closed right after: its socket goes
    with the request, unanswered, and its policies are cleared before it closes."""
    from ipsecchan.broker.client import BrokerClient
    from ipsecchan.latch.machine import Policy, Requirements
    bench = Bench()
    try:
        bench.serves()
        before = bench.state()
        client = BrokerClient(bench.path)
        out = {"released": []}
        pairs = [bench.tcp_pair() for _ in range(3)]
        handles = [client.latch(c, Requirements(Policy.OPTIONAL)) for c, _ in pairs]
        out["policies_while_latched"] = len(socket_policies())
        # The broker is held up in each release (it needs the Latcher's lock): each socket
        # is closed here well before the broker has cleared its policies.
        with bench.broker.latcher.lock:
            for (c, _), h in zip(pairs, handles):
                t = time.monotonic()
                client.release(h)
                out["released"].append(time.monotonic() - t)
                c.send(b"unread by the peer")
                c.close()       # the peer has not closed: this one lives on, in FIN_WAIT
        out["after"] = bench.wait_for({"policies": 0, "latches": 0})
        out["ss"] = subprocess.run(["ss", "-tanH", "state", "fin-wait-1", "state",
                                    "fin-wait-2"], capture_output=True, text=True).stdout
        client.close()
        for _, p in pairs:
            abort(p)
        want = {k: before[k] for k in ("latches", "owned", "policies")}
        out["before"], out["final"] = before, bench.wait_for(want)
        out["errors"] = bench.errors
        return out
    finally:
        bench.close()


def test_a_release_sent_with_its_socket_clears_the_policies_before_it_closes():
    r = run_scenario("quiet_release")
    assert r["policies_while_latched"] == 6
    # Not waited for: the broker was held up meanwhile.
    assert max(r["released"]) < 0.5, r["released"]
    # Closed by the client, still in the kernel (the peer never closed), policies gone.
    assert len(r["ss"].strip().splitlines()) == 3, r
    assert r["after"]["policies"] == 0 and r["after"]["latches"] == 0, r
    assert all(r["final"][k] == r["before"][k] for k in ("latches", "owned", "policies",
                                                          "clients")), r
    assert r["errors"] == []


@scenario
def client_close():
    """BrokerClient.close() with latches live and its reader thread blocked reading: it
    releases them, as Latcher.close() does (the sockets live on, unlatched), and ends the
    session."""
    from ipsecchan.broker.client import BrokerClient
    from ipsecchan.latch.machine import Policy, Requirements
    bench = Bench()
    warnings: list[str] = []
    collect = _Collect(warnings)
    collect.setLevel(logging.WARNING)
    logging.getLogger("ipsecchan").addHandler(collect)
    try:
        bench.serves()
        before = bench.state()
        client = BrokerClient(bench.path)
        (c, p), u = bench.tcp_pair(), udp()
        alerts = []
        handles = [client.latch(s, Requirements(Policy.OPTIONAL),
                                on_alert=lambda h, a: alerts.append(a.new.value))
                   for s in (c, u)]
        out = {"latched": bench.state(settle=1)}
        time.sleep(0.2)                       # the reader is in recvmsg
        client.close()
        out["after"] = bench.wait_for({k: before[k] for k in ("clients", "latches",
                                                               "policies")}, timeout=5)
        out["before"], out["states"], out["alerts"] = before, [h.state.value for h in handles], \
            alerts
        client._thread.join(5)
        out["reader_alive"] = client._thread.is_alive()
        # Unlatched, not blocked: the connection still carries data.
        c.sendall(b"after close")
        p.settimeout(5)
        out["received"] = p.recv(64).decode()
        out["warnings"], out["errors"] = [w for w in warnings if "went away" in w], \
            bench.errors
        for s in (c, p, u):
            s.close()
        return out
    finally:
        bench.close()


def test_closing_the_client_releases_its_latches_and_ends_its_session():
    r = run_scenario("client_close")
    assert r["latched"]["latches"] == r["before"]["latches"] + 2, r
    assert r["latched"]["policies"] == 4, r
    assert all(r["after"][k] == r["before"][k] for k in ("clients", "latches", "policies")), r
    assert r["states"] == ["CLOSED", "CLOSED"] and r["alerts"] == ["CLOSED", "CLOSED"], r
    assert not r["reader_alive"], r
    assert r["received"] == "after close", r
    assert r["warnings"] == [] and r["errors"] == [], r


# ---- who may see what ----

A, B = "127.0.0.1", "127.0.0.2"
OPERATORS = 4242


def _spd() -> None:
    """The SPD's policies for UDP between A and B: ESP transport, reqid 7."""
    for d, src, dst in (("out", A, B), ("in", B, A)):
        subprocess.run(["ip", "xfrm", "policy", "add", "src", src, "dst", dst, "proto", "udp",
                        "dir", d, "priority", "100", "tmpl", "src", src, "dst", dst, "proto",
                        "esp", "reqid", "7", "mode", "transport"], check=True)


def _static(peer: str = "CN=bob") -> StaticSource:
    return StaticSource({"sas": [{"reqid": 7, "local": "CN=alice", "peer": peer}]})


def _give_sas(broker: Broker) -> None:
    """ESP SAs between A and B (reqid 7) in the broker's view. This kernel cannot hold them:
    the view gets them as the kernel would send them (under its lock: the broker's thread
    reads the view)."""
    from ipsecchan.xfrm import SA, Algorithm, Selector
    from ipsecchan.xfrm.encode import newsa
    zero = Selector(0, "", "", 0, 0, 0, 0, 0, 0, 0, 0)
    gcm = Algorithm("aead", "rfc4106(gcm(aes))", 288, 128)

    def sa(src, dst, spi):
        return SA(src, dst, socket.AF_INET, "esp", spi, 7, "transport", 0, 32, zero, 0, 0,
                  int(time.time()), 0, (gcm,), None, None, None, False, None)
    with broker.latcher.lock:
        broker.latcher.view.index.apply(newsa(sa(A, B, 0x1001)) + newsa(sa(B, A, 0x1002)))


def _protected_bench() -> Bench:
    """A broker that sees UDP between A and B carried by ESP SAs, peer CN=bob."""
    _spd()
    bench = Bench(_static(), operator_gids=[OPERATORS])
    _give_sas(bench.broker)
    return bench


@scenario
def isolation():
    bench = _protected_bench()
    try:
        out = {}
        owner = bench.session()
        u = udp(B)
        mine = owner.call({"op": "latch", "policy": "require"}, u)
        out["mine"] = mine
        lid = mine["latch"]["id"]
        # A listener of the owner's, for the other user to name.
        lsn = socket.create_server((A, 0))
        listener = owner.call({"op": "listen", "policy": "optional"}, lsn)
        lsn_id = listener["latch"]["id"]
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()

        def other_user():
            seen = []
            with bench.session() as s:
                def call(msg, sock=None):
                    r = s.call(msg, sock)
                    seen.append(r)
                    return r
                res = {
                    "list": call({"op": "list"}),
                    "release": call({"op": "release", "latch": lid}),
                    "accept": call({"op": "accept", "listener": lsn_id}, u),
                }
                # It holds the owner's socket (inherited): holding it entitles it to that
                # connection's latch (as to SO_PEERCRED), which it shares, then lets go of.
                # (Not in what it saw: the latch's parties are the connection's, its to see.)
                res["latch_it"] = s.call({"op": "latch", "policy": "optional"}, u)
                res["let_go"] = call({"op": "release", "latch": lid})
                os.write(ready_w, b"x")
                os.read(go_r, 1)
                while (m := s.read(2)) is not None:      # events for 2 s: none are its
                    seen.append(m)
                res["heard"] = s.events + [m for m in seen if "event" in m]
                res["everything"] = json.dumps(seen)
            return res

        result: dict = {}
        t = threading.Thread(target=lambda: result.update(as_user(65534, other_user)))
        t.start()
        os.read(ready_r, 1)
        # Break the owner's latch: a bypass policy for its flow, above the SPD's.
        port = u.getsockname()[1]
        bypass = ["src", A, "dst", B, "proto", "udp", "sport", str(port), "dir", "out"]
        subprocess.run(["ip", "xfrm", "policy", "add", *bypass, "priority", "1"], check=True)
        alert = owner.read(10)
        os.write(go_w, b"x")
        t.join(30)
        out["other"] = result
        out["alert"] = alert
        out["operator"] = as_user(65533, lambda: bench.session().call({"op": "list"}),
                                  groups=[OPERATORS])
        out["root"] = owner.call({"op": "list"})
        out["still_mine"] = owner.call({"op": "release", "latch": lid})
        subprocess.run(["ip", "xfrm", "policy", "delete", *bypass], check=True)
        owner.close()
        u.close()
        lsn.close()
        out["errors"] = bench.errors
        return out
    finally:
        bench.close()


def test_one_user_learns_nothing_of_another_users_latches():
    r = run_scenario("isolation")
    mine = r["mine"]["latch"]
    assert mine["state"] == "ESTABLISHED" and mine["params"]["peer"]["id"] == "CN=bob"
    other = r["other"]
    assert other["list"]["errno"] == errno.EPERM
    assert other["release"]["errno"] == errno.ENOENT      # not its latch: as if none
    assert other["accept"]["errno"] == errno.ENOENT       # not its listener
    assert other["latch_it"]["ok"] and other["latch_it"]["latch"]["id"] == mine["id"]
    assert other["let_go"]["ok"]
    # The owner heard its latch break; the other user heard nothing, and never saw the peer
    # but through the socket it holds.
    assert (r["alert"]["event"], r["alert"]["new"], r["alert"]["latch"]["id"]) == \
        ("alert", "BROKEN", mine["id"])
    assert other["heard"] == []
    assert "CN=bob" not in other["everything"] and "CN=alice" not in other["everything"]
    # Its failed release did not touch the latch: the owner releases it.
    assert r["still_mine"]["ok"] is True
    # Root and the operator group see every latch, with its owner.
    for who in ("root", "operator"):
        listed = {x["id"]: x for x in r[who]["latches"]}
        assert listed[mine["id"]]["owner"]["uid"] == 0, who
        assert listed[mine["id"]]["peer"]["id"] == "CN=bob"
    assert r["errors"] == []


@scenario
def list_pages():
    bench = Bench()
    try:
        socks = [udp() for _ in range(300)]
        with bench.session() as s:
            for u in socks:
                assert s.call({"op": "latch", "policy": "optional"}, u)["ok"]
            pages, after = [], None
            while True:
                r = s.call({"op": "list", "after": after})
                pages.append([x["id"] for x in r["latches"]])
                if r["next"] is None:
                    break
                after = r["next"]
        for u in socks:
            u.close()
        return {"pages": pages, "errors": bench.errors}
    finally:
        bench.close()


def test_list_comes_in_pages_that_fit_a_message():
    r = run_scenario("list_pages")
    ids = [i for page in r["pages"] for i in page]
    assert len(r["pages"]) > 1 and len(ids) == 300 and ids == sorted(set(ids))
    assert r["errors"] == []


# ---- `ipsecchan ss` through the broker, for operators without CAP_NET_ADMIN ----

@scenario
def operator_lookup():
    bench = _protected_bench()
    try:
        out = {}
        u = udp(B)
        port = u.getsockname()[1]

        def ss_rows():
            # `ipsecchan ss --json -u` as this user (the SAD/SPD dump is refused without the
            # capability, so the broker answers), its output parsed.
            import contextlib
            import io
            from ipsecchan import cli
            os.environ["IPSECCHAN_BROKER"] = bench.path
            buf, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
                code = cli.main(["ss", "--json", "-u"])
            rows = json.loads(buf.getvalue()) if code == 0 else None
            return {"code": code, "stderr": err.getvalue(),
                    "row": next((r for r in rows or [] if r["local_port"] == port), None)}

        out["operator"] = as_user(65533, ss_rows, groups=[OPERATORS])
        out["outsider"] = as_user(65534, ss_rows)
        with bench.session() as s:
            flow = [socket.AF_INET, socket.IPPROTO_UDP, A, port, B, 9, 0, 0]
            out["root"] = s.call({"op": "lookup", "flows": [flow, flow[:4] + [A, 9, 0, 0]],
                                  "ike": False})
            bad = {"short": [flow[:7]], "address": [flow[:4] + ["fd00::1"] + flow[5:]],
                   "port": [flow[:3] + [70000] + flow[4:]], "text": [flow[:2] + [7] + flow[3:]],
                   "many": [flow] * 65, "not_a_list": {"x": 1}}
            out["bad"] = {k: s.call({"op": "lookup", "flows": v}) for k, v in bad.items()}
            out["bad"]["ike"] = s.call({"op": "lookup", "flows": [flow], "ike": 1})
        out["serves"] = bench.serves()
        u.close()
        out["errors"] = bench.errors
        return out
    finally:
        bench.close()


def test_operators_without_the_capability_read_ipsec_state_through_the_broker():
    r = run_scenario("operator_lookup")
    op = r["operator"]
    assert op["code"] == 0, op["stderr"]
    ipsec = op["row"]["ipsec"]
    assert ipsec["status"] == "protected"
    assert [s["spi"] for s in ipsec["out"]["sas"]] == [0x1001]
    assert [s["spi"] for s in ipsec["in"]["sas"]] == [0x1002]
    assert ipsec["identity"]["state"] == "verified"
    assert ipsec["identity"]["peer"]["id"] == "CN=bob"
    # Not an operator: refused, and ss says why (no partial table).
    out = r["outsider"]
    assert out["code"] == 2 and out["row"] is None
    assert "CAP_NET_ADMIN" in out["stderr"] and "operator" in out["stderr"]
    # Root asks directly: two flows, the second covered by no policy; no identity asked.
    a, b = r["root"]["ipsec"]
    assert a["status"] == "protected" and a["identity"] is None
    assert b["status"] == "unprotected" and b["out"]["sas"] == []
    for name, reply in r["bad"].items():
        assert reply["ok"] is False and reply["errno"] == errno.EINVAL, name
    assert r["serves"] is not None and r["errors"] == []


# ---- latching again after a restart: only to what was latched ----

RELATCH_WAIT = 8.0


def _protected_broker(path: str, peer: str) -> subprocess.Popen:
    """A broker process (this namespace) whose view has the ESP SAs, the peer behind them
    named `peer`: killed, and another one started, as if another peer now held the SAs."""
    p = subprocess.Popen([sys.executable, __file__, "protected-broker", path, peer],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "listening"
    return p


@scenario
def relatch():
    from ipsecchan.broker.client import BrokerClient
    from ipsecchan.latch.machine import Requirements
    _spd()
    d = tempfile.mkdtemp(prefix="ipsecchan-relatch-")
    path = os.path.join(d, "broker.sock")
    out = {}
    brokers = [_protected_broker(path, "CN=bob")]
    raw, u1 = Session(path), udp(B)
    first = raw.call({"op": "latch"}, u1)
    expect = first["latch"]["params"]
    bc, u2, seen = BrokerClient(path), udp(B), []
    h = bc.latch(u2, Requirements(), lambda h, a: seen.append(
        [a.old.value, a.new.value, a.cause.value if a.cause else None]))
    out["first"] = [first["latch"]["state"], expect["peer"]["id"],
                    h.state.value, h.latch.params.peer.id]
    brokers[0].kill()
    brokers[0].wait()
    raw.close()
    end = time.monotonic() + 10
    while h.state.value != "BROKEN" and time.monotonic() < end:
        time.sleep(0.05)
    # Another peer behind the same SAs now.
    brokers.append(_protected_broker(path, "CN=mallory"))
    with Session(path) as s:
        out["again"] = s.call({"op": "latch", "expect": expect}, u1)
        out["again_blocked"] = socket_policies()
        out["bad_expect"] = s.call({"op": "latch", "expect": {"protected": True}}, u1)
    end = time.monotonic() + RELATCH_WAIT
    while len(seen) < 2 and time.monotonic() < end:
        time.sleep(0.05)
    out["client"] = [h.state.value, h.latch.cause.value if h.latch.cause else None,
                     h.latch.params.peer.id if h.latch.params.peer else None, seen]
    bc.close()
    # bob back: what was latched is latched again.
    brokers[1].kill()
    brokers[1].wait()
    brokers.append(_protected_broker(path, "CN=bob"))
    with Session(path) as s:
        out["bob_again"] = s.call({"op": "latch", "expect": expect}, u1)
    for p in brokers[2:]:
        p.kill()
        p.wait()
    for u in (u1, u2):
        u.close()
    os.unlink(path)
    os.rmdir(d)
    return out


@pytest.fixture(scope="module")
def relatch_results():
    return run_scenario("relatch")


def test_a_latch_made_again_after_a_restart_must_match_what_it_was(relatch_results):
    r = relatch_results
    assert r["first"] == ["ESTABLISHED", "CN=bob", "ESTABLISHED", "CN=bob"]
    again = r["again"]
    assert (again["ok"], again["errno"], again["cause"]) == \
        (False, errno.ECONNREFUSED, "peer-changed")
    assert "CN=mallory" in again["error"]
    # Blocked both ways (the client library's own re-latch of its socket, refused the same
    # way, may have blocked that one too by then).
    blocked = [p for p in r["again_blocked"] if "action block" in p]
    block_in, block_out = ("socket in action block priority 0 ptype main",
                           "socket out action block priority 0 ptype main")
    assert set(blocked) == {block_in, block_out}
    assert blocked.count(block_in) == blocked.count(block_out) in (1, 2)
    assert r["bad_expect"]["errno"] == errno.EINVAL
    bob = r["bob_again"]
    assert bob["ok"] and bob["latch"]["state"] == "ESTABLISHED"
    assert bob["latch"]["params"]["peer"]["id"] == "CN=bob"


def test_the_client_library_latches_again_only_to_the_same_peer(relatch_results):
    state, cause, peer, seen = relatch_results["client"]
    assert seen[0] == ["ESTABLISHED", "BROKEN", "not-verified"]
    assert (state, cause) == ("BROKEN", "peer-changed"), (state, cause, peer, seen)


# ---- the daemon: restarts on its path, socket activation ----

DAEMON = [sys.executable, "-m", "ipsecchan.broker.server"]
CLIENT = r"""
import json, socket, sys, time
from ipsecchan.broker.client import BrokerClient
from ipsecchan.latch.machine import Policy, Requirements
bc = BrokerClient(sys.argv[1])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.connect(("127.0.0.1", 9))
seen = []
h = bc.latch(u, Requirements(Policy.OPTIONAL),
             lambda h, a: seen.append([a.old.value, a.new.value,
                                       a.cause.value if a.cause else None]))
print(json.dumps(["latched", h.state.value]), flush=True)
for line in sys.stdin:
    print(json.dumps([h.state.value, h.latch.cause.value if h.latch.cause else None, seen]),
          flush=True)
"""


def _daemon(path: str, *, activated: int | None = None) -> subprocess.Popen:
    """`ipsecchan daemon` on `path`; `activated`: a listening socket of this process, passed
    as systemd does (descriptor 3, LISTEN_PID, LISTEN_FDS)."""
    env = {**os.environ, "IPSECCHAN_VICI": "/nonexistent/charon.vici"}
    argv, kw = [*DAEMON, "--socket", path], {}
    if activated is not None:
        # What systemd does between fork and exec.
        code = ("import os, sys\n"
                f"if {activated} != 3:\n"
                f"    os.dup2({activated}, 3)\n"
                f"    os.close({activated})\n"
                "os.set_inheritable(3, True)\n"
                "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
                "os.execv(sys.argv[1], sys.argv[1:])\n")
        argv = [sys.executable, "-c", code, *argv]
        kw["pass_fds"] = [activated]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, **kw)
    line = p.stdout.readline()
    if "listening on" not in line:
        p.kill()
        raise RuntimeError(f"the daemon did not start: {line} {p.stderr.read()}")
    return p


def _ask(client: subprocess.Popen) -> list:
    client.stdin.write("?\n")
    client.stdin.flush()
    return json.loads(client.stdout.readline())


def _until(client, want: str, timeout: float = 10) -> list:
    end = time.monotonic() + timeout
    while (r := _ask(client))[0] != want and time.monotonic() < end:
        time.sleep(0.1)
    return r


@scenario
def daemon_restart():
    d = tempfile.mkdtemp(prefix="ipsecchan-daemon-")
    path = os.path.join(d, "broker.sock")
    out = {}
    first = _daemon(path)
    client = subprocess.Popen([sys.executable, "-c", CLIENT, path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    out["latched"] = json.loads(client.stdout.readline())
    # A second daemon on a live broker's path refuses, and leaves it serving.
    second = subprocess.run([*DAEMON, "--socket", path], capture_output=True, text=True,
                            timeout=60)
    out["second"] = [second.returncode, second.stderr]
    with Session(path) as s:
        out["first_serves"] = s.call({"op": "list"})["ok"]
    first.kill()
    first.wait()
    out["left_behind"] = os.path.exists(path)
    out["broken"] = _until(client, "BROKEN")
    out["policies_while_down"] = socket_policies()
    third = _daemon(path)
    out["back"] = _until(client, "ESTABLISHED")
    with Session(path) as s:
        out["listed"] = [x["owner"]["pid"] == client.pid for x in
                         s.call({"op": "list"})["latches"]]
    out["policies"] = socket_policies()
    client.stdin.close()
    client.wait(10)
    third.terminate()
    out["third_rc"] = third.wait(10)
    out["unlinked"] = not os.path.exists(path)
    # Something that is not a socket at the path is left alone.
    with open(path, "w") as f:
        f.write("not a socket")
    notsock = subprocess.run([*DAEMON, "--socket", path], capture_output=True, text=True,
                             timeout=60)
    out["not_a_socket"] = [notsock.returncode, notsock.stderr, open(path).read()]
    os.unlink(path)
    os.rmdir(d)
    return out


@scenario
def socket_activation():
    d = tempfile.mkdtemp(prefix="ipsecchan-daemon-")
    act = os.path.join(d, "activated.sock")
    lsn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lsn.bind(act)
    lsn.listen()
    p = _daemon(os.path.join(d, "unused.sock"), activated=lsn.fileno())
    lsn.close()
    out = {}
    with Session(act) as s:
        out["serves"] = s.call({"op": "list"})["ok"]
    p.terminate()
    out["rc"] = p.wait(10)
    out["stderr"] = p.stderr.read()
    out["paths"] = sorted(os.listdir(d))
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)
    return out


def test_a_killed_daemon_is_replaced_on_its_path_and_clients_latch_again():
    r = run_scenario("daemon_restart")
    assert r["latched"] == ["latched", "ESTABLISHED"]
    assert r["second"][0] == 1 and "already serves" in r["second"][1]
    assert r["first_serves"] is True
    assert r["left_behind"] is True          # SIGKILL: the socket file stays
    # Its client: BROKEN, not verified, at once; never ESTABLISHED while no broker runs.
    state, cause, seen = r["broken"]
    assert (state, cause) == ("BROKEN", "not-verified")
    assert seen == [["ESTABLISHED", "BROKEN", "not-verified"]]
    # Meanwhile the kernel keeps the socket's pin: its two policies, nothing more.
    assert len(r["policies_while_down"]) == 2
    # The new broker starts on the same path; the client latches again.
    state, cause, seen = r["back"]
    assert state == "ESTABLISHED" and seen[-1][:2] == ["BROKEN", "ESTABLISHED"]
    assert r["listed"] == [True]
    assert len(r["policies"]) == 2
    assert r["third_rc"] == 0 and r["unlinked"] is True
    rc, err, content = r["not_a_socket"]
    assert rc == 1 and "not a socket" in err and content == "not a socket"


# What contrib/ipsecchan.service leaves it: root with CAP_NET_ADMIN and CAP_SYS_PTRACE only,
# no new privileges, no writable executable memory (prctl PR_SET_MDWE, as
# MemoryDenyWriteExecute=yes).
CONFINED = r"""
import ctypes, runpy, sys
assert ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) == 0      # PR_SET_MDWE, REFUSE_EXEC_GAIN
sys.argv = ["ipsecchan daemon", *sys.argv[1:]]
runpy.run_module("ipsecchan.broker.server", run_name="__main__")
"""
_CAPS = {"net_admin": 12, "sys_ptrace": 19}


def _confined(path: str, caps: str) -> subprocess.Popen | subprocess.CompletedProcess:
    argv = ["setpriv", "--no-new-privs", "--inh-caps=-all", f"--bounding-set=-all{caps}",
            "--", sys.executable, "-c", CONFINED, "--socket", path]
    env = {**os.environ, "IPSECCHAN_VICI": "/nonexistent/charon.vici"}
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env)
    if "listening on" not in p.stdout.readline():
        return subprocess.CompletedProcess(argv, p.wait(30), "", p.stderr.read())
    return p


def _closed_socket_forgotten(path: str) -> bool:
    """A user's latch whose socket it closes (keeping its session): does the broker see the
    socket gone and release the latch? It can only by looking into the client's descriptors
    (pidfd_getfd); else it keeps the descriptor it was passed, and the latch, meanwhile."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()

    def client():
        with Session(path) as s:
            u = udp()
            assert s.call({"op": "latch", "policy": "optional"}, u)["ok"]
            u.close()
            os.write(ready_w, b"x")
            os.read(go_r, 1)
        return True
    t = threading.Thread(target=as_user, args=(65534, client))
    t.start()
    os.read(ready_r, 1)
    end = time.monotonic() + 3 * server.SWEEP_EVERY
    with Session(path) as root:         # root may list
        while (left := len(root.call({"op": "list"})["latches"])) and \
                time.monotonic() < end:
            time.sleep(0.2)
    os.write(go_w, b"x")
    t.join(30)
    for fd in (ready_r, ready_w, go_r, go_w):
        os.close(fd)
    return left == 0


@scenario
def confined_daemon():
    d = tempfile.mkdtemp(prefix="ipsecchan-confined-")
    os.chmod(d, 0o755)
    out = {}
    for name, caps in (("unit", ",+net_admin,+sys_ptrace"), ("no_ptrace", ",+net_admin"),
                       ("no_net_admin", ",+sys_ptrace")):
        path = os.path.join(d, f"{name}.sock")
        p = _confined(path, caps)
        if isinstance(p, subprocess.CompletedProcess):
            out[name] = {"rc": p.returncode, "stderr": p.stderr}
            continue
        with open(f"/proc/{p.pid}/status") as f:
            status = dict(line.split(":\t", 1) for line in f.read().splitlines())
        eff = int(status["CapEff"], 16)
        out[name] = {"caps": sorted(c for c, bit in _CAPS.items() if eff >> bit & 1),
                     "other_caps": eff & ~sum(1 << b for b in _CAPS.values()),
                     "no_new_privs": status["NoNewPrivs"].strip(),
                     "forgotten": _closed_socket_forgotten(path)}
        p.terminate()
        out[name]["rc"] = p.wait(10)
    os.rmdir(d)
    return out


def test_the_daemon_works_with_what_its_unit_gives_it():
    r = run_scenario("confined_daemon")
    unit = r["unit"]
    assert unit["caps"] == ["net_admin", "sys_ptrace"] and unit["other_caps"] == 0
    assert unit["no_new_privs"] == "1" and unit["rc"] == 0
    # It reaches clients' descriptors: a socket the client closed is seen gone.
    assert unit["forgotten"] is True
    # Without CAP_SYS_PTRACE it cannot (it keeps what it was passed, fails no latch)...
    assert r["no_ptrace"]["forgotten"] is False and r["no_ptrace"]["rc"] == 0
    # ... and without CAP_NET_ADMIN it does not start.
    assert r["no_net_admin"]["rc"] == 1
    assert "needs CAP_NET_ADMIN" in r["no_net_admin"]["stderr"]


def test_socket_activation():
    r = run_scenario("socket_activation")
    assert r["serves"] is True and r["rc"] == 0, r["stderr"]
    # It served the socket it was given, and left the path to whoever made it.
    assert r["paths"] == ["activated.sock"]


@scenario
def waiting_latch():
    # A latch whose SAs no identity source names yet waits (the identity grace after a
    # rekey, IDENTITY_GRACE) before it is refused; meanwhile other clients are served.
    _spd()
    bench = Bench(StaticSource({"sas": []}))
    try:
        _give_sas(bench.broker)                 # new SAs (add time: now), reqid 7: unnamed
        out = {}
        waiting = bench.session()
        u = udp(B)
        t = time.monotonic()
        sent = waiting.request({"op": "latch", "policy": "require"}, u)
        time.sleep(0.5)                         # its latch is waiting now
        out["others"] = [bench.serves() for _ in range(3)]
        # The waiting client's own next request is answered after its latch, in order.
        second = waiting.request({"op": "list"})
        out["first"] = waiting.reply(sent["id"], timeout=15)
        out["first_took"] = time.monotonic() - t
        out["second"] = waiting.reply(second["id"], timeout=5)
        waiting.close()
        u.close()
        out["state"] = bench.wait_for({"latches": 0, "policies": 0})
        out["errors"] = bench.errors
        return out
    finally:
        bench.close()


def test_a_latch_waiting_for_its_identities_does_not_hold_up_other_clients():
    from ipsecchan.latch.engine import IDENTITY_GRACE
    r = run_scenario("waiting_latch")
    assert r["first"]["ok"] is False and r["first"]["cause"] == "identity-unknown"
    assert r["first_took"] >= IDENTITY_GRACE - 1.5        # it did wait for the daemon
    # Each other client latched and released in well under the waiting latch's time.
    assert all(x is not None and x < 1.0 for x in r["others"]), r["others"]
    assert r["second"]["ok"] is True                      # answered, after the first
    assert r["state"]["latches"] == 0 and r["state"]["policies"] == 0
    assert r["errors"] == []


@scenario
def sharing():
    """A connection held by two clients (a descriptor passed from one process to another):
    the second's latch request shares the first's latch, which lives until the last holder
    lets go; alerts go to both; a request the latch does not meet is refused unblocked."""
    bench = _protected_bench()
    out: dict = {}
    try:
        a, b, c = bench.session(), bench.session(), bench.session()
        u = udp(B)
        mine = socket.socket(fileno=os.dup(u.fileno()))     # b's own descriptor of it
        one = a.call({"op": "latch", "policy": "require"}, u)
        lid = one["latch"]["id"]
        pins = sorted(socket_policies())
        out["joined"] = b.call({"op": "latch", "policy": "require"}, mine)
        out["same_id"] = out["joined"]["latch"]["id"] == lid
        out["again"] = b.call({"op": "latch", "policy": "require"}, mine)
        out["other_peer"] = c.call({"op": "latch", "policy": "require",
                                    "peer_id": "CN=mallory"}, u)
        out["pins_kept"] = sorted(socket_policies()) == pins and len(pins) == 2
        out["listed"] = [(x["id"], x["owner"]["pid"], x["sharers"])
                         for x in c.call({"op": "list"})["latches"]]
        # The SPD's policy goes (cleartext), then comes back: both holders hear both.
        spd = ["src", A, "dst", B, "proto", "udp", "dir", "out"]
        subprocess.run(["ip", "xfrm", "policy", "delete", *spd], check=True)
        time.sleep(1)
        subprocess.run(["ip", "xfrm", "policy", "add", *spd, "priority", "100", "tmpl", "src",
                        A, "dst", B, "proto", "esp", "reqid", "7", "mode", "transport"],
                       check=True)
        time.sleep(1)
        for who, sess in (("a", a), ("b", b)):
            while (m := sess.read(1)) is not None:
                sess.events.append(m)
            out[f"alerts_{who}"] = [(e["old"], e["new"]) for e in sess.events
                                    if e.get("event") == "alert"]
        # The first holder's descriptor goes (closed without a release): the second holds
        # the latch from then on, its pins in place; its release ends it. (A pipe takes its
        # number: the broker, a thread of this process here, must not find there a copy of
        # its own, which pidfd_getfd may put at the lowest free number.)
        pipe_r, pipe_w = os.pipe()
        u_number = u.detach()
        os.dup2(pipe_r, u_number)
        end = time.monotonic() + 10                     # (the broker's next sweep)
        while lid in bench.broker.sharers and time.monotonic() < end:
            time.sleep(0.1)
        out["after_first_gone"] = bench.state(settle=1)
        out["pins_after_first_gone"] = sorted(socket_policies()) == pins
        owner = bench.broker.owner.get(lid)
        out["owner_is_b"] = lid not in bench.broker.sharers and owner is not None and \
            owner.latches.get(lid) is not None and \
            len([c for c in bench.broker.clients if lid in c.latches]) == 1
        out["release"] = b.call({"op": "release", "latch": lid})
        out["after_release"] = bench.wait_for({"latches": 0, "policies": 0})
        # A sharer whose session ends leaves the latch to the other, pinned, not blocked.
        u2 = udp(B)
        mine2 = socket.socket(fileno=os.dup(u2.fileno()))
        two = a.call({"op": "latch", "policy": "require"}, u2)
        pins2 = sorted(socket_policies())
        assert b.call({"op": "latch", "policy": "require"}, mine2)["ok"]
        b.close()
        end = time.monotonic() + 10
        while two["latch"]["id"] in bench.broker.sharers and time.monotonic() < end:
            time.sleep(0.1)
        out["after_sharer_gone"] = sorted(socket_policies()) == pins2 and \
            two["latch"]["id"] not in bench.broker.sharers
        out["still_a"] = a.call({"op": "release", "latch": two["latch"]["id"]})
        out["end"] = bench.wait_for({"latches": 0, "policies": 0})
        for x in (a, c, mine, u2, mine2):
            x.close()
        out["errors"] = bench.errors
        for fd in (pipe_r, pipe_w, u_number):
            os.close(fd)
        return out
    finally:
        bench.close()


def test_a_connection_two_clients_hold_shares_one_latch():
    r = run_scenario("sharing")
    assert r["joined"]["ok"] and r["same_id"], r
    assert r["joined"]["latch"]["state"] == "ESTABLISHED"
    assert r["joined"]["latch"]["params"]["peer"]["id"] == "CN=bob"
    assert r["again"]["errno"] == errno.EBUSY, r["again"]
    assert r["other_peer"]["ok"] is False, r
    assert r["other_peer"]["cause"] == "peer-not-required", r
    assert r["pins_kept"], r                    # refused, not blocked: still the pins
    # Listed once, with its sharer (the same process here, as a second client).
    assert len(r["listed"]) == 1 and r["listed"][0][2] == [{"pid": r["listed"][0][1],
                                                             "uid": 0}], r["listed"]
    broke = [["ESTABLISHED", "BROKEN"], ["BROKEN", "ESTABLISHED"]]
    assert r["alerts_a"] == broke and r["alerts_b"] == broke, r
    assert r["after_first_gone"]["owned"] == 1 and r["pins_after_first_gone"], r
    assert r["owner_is_b"], r
    assert r["release"]["ok"] and r["after_release"]["policies"] == 0, r
    assert r["after_sharer_gone"], r
    assert r["still_a"]["ok"] and r["end"]["latches"] == 0, r
    assert r["errors"] == []


if __name__ == "__main__":
    if sys.argv[1] == "protected-broker":           # PATH PEER, in the caller's namespace
        broker = Broker(sys.argv[2], _static(sys.argv[3]))
        _give_sas(broker)
        print("listening", flush=True)
        broker.serve_forever()
    else:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        print(json.dumps(SCENARIOS[sys.argv[1]]()))


"""Host-side parts of the drop-in socket module: the option encodings, channel-binding
arithmetic, bad input, and pass-through of sockets that do not latch (loopback, Unix)."""
import errno
import gc
import hashlib
import os
import socket as std
import struct

import pytest

from ipsecchan import socket
from ipsecchan import sockopt
from ipsecchan.channel import PREFIX, endpoint_binding
from ipsecchan.latch.machine import LatchParams, Party, SAFacts
from ipsecchan.latch.protection import Protection

KA, KB, KM = (hashlib.sha256(x).hexdigest() for x in (b"alice", b"bob", b"mallory"))
TCP = std.IPPROTO_TCP


def test_the_module_is_a_drop_in():
    for name in std.__all__:
        assert hasattr(socket, name), name
    assert issubclass(socket.socket, std.socket)
    assert socket.SOL_IPSEC not in (std.SOL_SOCKET, std.IPPROTO_IP, std.IPPROTO_TCP)
    assert socket.SOL_IPSEC > 0xFFFF


# -- channel bindings --

def test_binding_is_the_same_at_both_ends_and_versioned():
    a = endpoint_binding(std.AF_INET, TCP, ("10.0.0.1", 40000), ("10.0.0.2", 5000), KA, KB)
    b = endpoint_binding(std.AF_INET, TCP, ("10.0.0.2", 5000), ("10.0.0.1", 40000), KB, KA)
    assert a == b and a.startswith(PREFIX + b"\x01") and len(a) == len(PREFIX) + 33


def test_binding_differs_for_other_channels_and_a_man_in_the_middle():
    base = endpoint_binding(std.AF_INET, TCP, ("10.0.0.1", 40000), ("10.0.0.2", 5000), KA, KB)
    others = [
        endpoint_binding(std.AF_INET, TCP, ("10.0.0.1", 40001), ("10.0.0.2", 5000), KA, KB),
        endpoint_binding(std.AF_INET, std.IPPROTO_UDP, ("10.0.0.1", 40000),
                         ("10.0.0.2", 5000), KA, KB),
        # mallory in the middle: alice sees mallory's key, bob sees mallory's key as alice's
        endpoint_binding(std.AF_INET, TCP, ("10.0.0.1", 40000), ("10.0.0.2", 5000), KA, KM),
        endpoint_binding(std.AF_INET, TCP, ("10.0.0.2", 5000), ("10.0.0.1", 40000), KB, KM),
        # keys swapped between the endpoints
        endpoint_binding(std.AF_INET, TCP, ("10.0.0.1", 40000), ("10.0.0.2", 5000), KB, KA),
    ]
    assert base not in others and len(set(others)) == len(others)
    v6 = endpoint_binding(std.AF_INET6, TCP, ("fd00::1", 40000), ("fd00::2", 5000), KA, KB)
    assert v6 != base and v6 == endpoint_binding(std.AF_INET6, TCP, ("fd00::2", 5000),
                                                 ("fd00::1", 40000), KB, KA)


def test_no_binding_without_both_keys():
    assert endpoint_binding(std.AF_INET, TCP, ("10.0.0.1", 1), ("10.0.0.2", 2), KA, None) is None
    assert endpoint_binding(std.AF_INET, TCP, ("10.0.0.1", 1), ("10.0.0.2", 2), None, KB) is None
    with pytest.raises(ValueError):
        endpoint_binding(std.AF_INET, TCP, ("10.0.0.1", 1), ("10.0.0.2", 2), KA, "abcd")


# -- IPSEC_PROTECTION --

def _params(protected=True):
    if not protected:
        return LatchParams(False, None, None, (), (), (), ())
    prot = Protection("esp", "transport", True, "rfc4106(gcm(aes))", 256,
                      "rfc4106(gcm(aes))", 128)
    out = SAFacts((2, "10.0.0.2", 50, 0xc1), 7, prot, Party("CN=alice"), Party("CN=bob"))
    inn = SAFacts((2, "10.0.0.1", 50, 0xc2), 7, prot, Party("CN=alice"), Party("CN=bob"))
    return LatchParams(True, Party("CN=alice"), Party("CN=bob"), (prot,), (7,), (out,), (inn,))


def test_protection_round_trip():
    data = sockopt.encode_protection(_params())
    assert len(data) == 8 + 84
    d = sockopt.decode_protection(data)
    assert d["protected"] and d["confidential"] and not d["encapsulated"]
    assert d["layers"] == [{"proto": "esp", "mode": "transport", "confidential": True,
                            "cipher_bits": 256, "icv_bits": 128, "spi_out": 0xc1,
                            "spi_in": 0xc2, "reqid": 7, "cipher": "rfc4106(gcm(aes))",
                            "integrity": "rfc4106(gcm(aes))"}]
    clear = sockopt.decode_protection(sockopt.encode_protection(_params(False)))
    assert clear == {"version": 1, "protected": False, "confidential": False,
                     "encapsulated": False, "layers": []}


@pytest.mark.parametrize("bad", [b"", b"\x01\x01\x01", b"\x02" + bytes(7),
                                 b"\x01\x01\x01\x00" + bytes(4) + bytes(83)])
def test_protection_decoder_refuses_bad_bytes(bad):
    with pytest.raises(ValueError):
        sockopt.decode_protection(bad)


# -- option plumbing and bad input --

def test_reply_follows_the_kernel_rules():
    assert sockopt.reply(3, None) == 3
    assert sockopt.reply(3, 4) == struct.pack("=i", 3)
    assert sockopt.reply(b"CN=bob", 64) == b"CN=bob"
    for value, buflen, code in ((3, 2, errno.EINVAL), (b"CN=bob", 3, errno.EINVAL),
                                (b"CN=bob", None, errno.EINVAL)):
        with pytest.raises(OSError) as e:
            sockopt.reply(value, buflen)
        assert e.value.errno == code
    for buflen in (0, -1, 1025):
        with pytest.raises(OSError, match="out of range"):
            sockopt.reply(b"x", buflen)


def test_options_on_an_unconnected_socket():
    with socket.socket() as s:
        assert s.getsockopt(socket.SOL_IPSEC, socket.IPSEC_POLICY) == socket.IPSEC_POLICY_REQUIRE
        assert s.getsockopt(socket.SOL_IPSEC, socket.IPSEC_LATCH_STATE) == \
            socket.IPSEC_LATCH_NONE
        s.setsockopt(socket.SOL_IPSEC, socket.IPSEC_POLICY, socket.IPSEC_POLICY_OPTIONAL)
        assert s.getsockopt(socket.SOL_IPSEC, socket.IPSEC_POLICY) == 2
        s.setsockopt(socket.SOL_IPSEC, socket.IPSEC_POLICY, struct.pack("=i", 1))
        assert s.getsockopt(socket.SOL_IPSEC, socket.IPSEC_POLICY) == 1
        s.setsockopt(socket.SOL_IPSEC, socket.IPSEC_REQUIRE_PEER_ID, b"CN=bob")
        assert s.getsockopt(socket.SOL_IPSEC, socket.IPSEC_REQUIRE_PEER_ID, 64) == b"CN=bob"
        cases = [
            (lambda: s.getsockopt(socket.SOL_IPSEC, 1234), OSError, errno.ENOPROTOOPT),
            (lambda: s.setsockopt(socket.SOL_IPSEC, 1234, 1), OSError, errno.ENOPROTOOPT),
            (lambda: s.setsockopt(socket.SOL_IPSEC, socket.IPSEC_PEER_ID, b"x"), OSError,
             errno.ENOPROTOOPT),
            (lambda: s.setsockopt(socket.SOL_IPSEC, socket.IPSEC_POLICY, 7), OSError,
             errno.EINVAL),
            (lambda: s.setsockopt(socket.SOL_IPSEC, socket.IPSEC_POLICY, b"\1\0"), OSError,
             errno.EINVAL),
            (lambda: s.setsockopt(socket.SOL_IPSEC, socket.IPSEC_POLICY, None, 4), OSError,
             errno.EINVAL),
            (lambda: s.setsockopt(socket.SOL_IPSEC, socket.IPSEC_REQUIRE_PEER_ID, b"\xff"),
             OSError, errno.EINVAL),
            (lambda: s.setsockopt(socket.SOL_IPSEC, socket.IPSEC_REQUIRE_PEER_ID, "CN=bob"),
             TypeError, None),
            (lambda: s.setsockopt(socket.SOL_IPSEC, socket.IPSEC_POLICY, 1.5), TypeError, None),
            (lambda: s.getsockopt(socket.SOL_IPSEC, socket.IPSEC_PEER_ID, 64), OSError,
             errno.ENOTCONN),
            (lambda: s.get_channel_binding("tls-unique"), ValueError, None),
            (lambda: s.getpeerid(), OSError, errno.ENOTCONN),
        ]
        for fn, exc, code in cases:
            with pytest.raises(exc) as e:
                fn()
            if code is not None:
                assert e.value.errno == code
        # Kernel levels still reach the kernel.
        assert s.getsockopt(std.SOL_SOCKET, std.SO_TYPE) == std.SOCK_STREAM


def test_loopback_and_unix_sockets_pass_through():
    with socket.create_server(("127.0.0.1", 0)) as srv:
        assert srv.latch is None
        with socket.create_connection(srv.getsockname(), timeout=5) as c:
            conn, _ = srv.accept()
            with conn:
                assert isinstance(conn, socket.socket)
                c.sendall(b"ping")
                assert conn.recv(4) == b"ping"
                assert c.latch is None and conn.getpeerid() is None
                assert c.get_channel_binding() is None
                with pytest.raises(OSError) as e:
                    c.getsockopt(socket.SOL_IPSEC, socket.IPSEC_PEER_ID, 64)
                assert e.value.errno == errno.ENODATA
    a, b = socket.socketpair()
    with a, b:
        assert isinstance(a, socket.socket) and a.family == std.AF_UNIX
        a.sendall(b"x")
        assert b.recv(1) == b"x"


def test_install_makes_the_stdlib_hand_out_these_sockets():
    import socketserver
    import threading
    socket.install()
    try:
        assert std.socket is socket.socket and std.create_connection is socket.create_connection

        class Echo(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.sendall(type(self.request).__module__.encode())

        with socketserver.TCPServer(("127.0.0.1", 0), Echo) as srv:
            t = threading.Thread(target=srv.handle_request)
            t.start()
            with std.create_connection(srv.server_address, timeout=5) as c:
                assert c.recv(100) == b"ipsecchan.socket"
            t.join(5)
    finally:
        socket.uninstall()
    assert std.socket is not socket.socket


def test_default_policy():
    assert socket.getdefaultpolicy() == socket.IPSEC_POLICY_REQUIRE
    socket.setdefaultpolicy(socket.IPSEC_POLICY_OPTIONAL)
    try:
        with socket.socket() as s:
            assert s.getsockopt(socket.SOL_IPSEC, socket.IPSEC_POLICY) == 2
    finally:
        socket.setdefaultpolicy(socket.IPSEC_POLICY_REQUIRE)
    with pytest.raises(ValueError):
        socket.setdefaultpolicy(9)


def test_default_policy_from_the_environment():
    import os
    import subprocess
    import sys
    code = "from ipsecchan import socket; print(socket.getdefaultpolicy())"
    for value, expect in (("optional", "2"), ("BYPASS", "0"), ("require", "1")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "IPSECCHAN_POLICY": value}, check=True)
        assert out.stdout.strip() == expect
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "IPSECCHAN_POLICY": "maybe"})
    assert bad.returncode != 0 and "IPSECCHAN_POLICY='maybe'" in bad.stderr


def test_a_refused_connection_is_reset_without_lifting_its_block_over_queued_bytes(
        monkeypatch):
    # A refused connection's block is lifted for its reset only when nothing the application
    # wrote is queued: a retransmission in between would carry it out. Real sockets here: a
    # per-socket block policy holds the written bytes in the send queue.
    from ipsecchan import runtime
    from ipsecchan.latch.enforce import unsent
    from ipsecchan.xfrm import clear_socket_policies, set_socket_policy
    lifted = []

    class Backend:
        def abort(self, sock):                   # as the in-process runtime's
            lifted.append(sock.fileno())
            clear_socket_policies(sock)

    monkeypatch.setattr(runtime, "get", lambda: Backend())
    with socket.create_server(("127.0.0.1", 0)) as srv:
        quiet = socket.create_connection(srv.getsockname(), timeout=5)
        busy = socket.create_connection(srv.getsockname(), timeout=5)
        peers = [srv.accept()[0] for _ in range(2)]
        for s in (quiet, busy):
            set_socket_policy(s, "out", action="block")
            set_socket_policy(s, "in", action="block")
        std.socket.send(busy, b"X" * 1200)          # the application writes anyway
        assert unsent(busy) == 1200 and unsent(quiet) == 0
        fds = {quiet.fileno(): "quiet", busy.fileno(): "busy"}
        for s in (quiet, busy):
            s._ipsec.refused = True
            s.close()
        assert [fds[f] for f in lifted] == ["quiet"]
        # Both are gone at once (reset, no FIN_WAIT); the quiet one's peer heard the reset,
        # the busy one's got nothing.
        peers[0].settimeout(5)
        with pytest.raises(ConnectionResetError):
            peers[0].recv(10)
        peers[1].settimeout(0.5)
        with pytest.raises((TimeoutError, ConnectionResetError)):
            assert peers[1].recv(10) == b""
        for p in peers:
            p.close()


def test_the_application_cannot_replace_a_refused_connections_block():
    # A refused connection is blocked by per-socket policies: an application with
    # CAP_NET_ADMIN setting its own (a bypass) would let it leak. Another socket may.
    from ipsecchan.xfrm import set_socket_policy, socket_policy_bytes
    bypass = socket_policy_bytes(std.AF_INET, "out")
    with socket.create_server(("127.0.0.1", 0)) as srv:
        refused = socket.create_connection(srv.getsockname(), timeout=5)
        other = socket.create_connection(srv.getsockname(), timeout=5)
        peers = [srv.accept()[0] for _ in range(2)]
        set_socket_policy(refused, "out", action="block")
        refused._ipsec.refused = True
        with pytest.raises(OSError) as e:
            refused.setsockopt(socket.IPPROTO_IP, 17, bypass)
        assert e.value.errno == errno.EBUSY
        other.setsockopt(socket.IPPROTO_IP, 17, bypass)          # not latched: the kernel's
        other.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        refused.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)    # other options pass
        refused._ipsec.refused = False          # (closed as an ordinary socket)
        for s in [refused, other, *peers]:
            s.close()


def test_a_forked_child_makes_a_backend_of_its_own(monkeypatch):
    # The parent's backend holds its netlink, VICI and broker sockets: a child using it would
    # read the parent's notifications and replies. The child starts without one; both count
    # the fork (what was latched before it is shared).
    from ipsecchan import runtime
    parents = object()
    monkeypatch.setattr(runtime, "_runtime", parents)
    before = runtime.fork_generation()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        ok = runtime.current() is None and runtime.fork_generation() == before + 1
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        assert f.read() == b"1"
    assert runtime.current() is parents and runtime.fork_generation() == before + 1


def test_fast_open_is_caught_on_new_tcp_sockets_and_their_copies_only():
    # sendto/sendmsg with MSG_FASTOPEN connect a TCP socket without connect(): the latch
    # must come first (tests/test_lab_socket.py). Only unconnected TCP sockets (and their
    # dup()s) carry the catching wrappers; UDP and connected sockets send with no Python.
    def caught(s):
        return type(s.__dict__.get("sendto")).__name__ == "_FastOpenCall"
    s = socket.socket()
    d = s.dup()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # Descriptors from elsewhere too (socket(fileno=), fromfd()), as long as unconnected.
    given = [socket.socket(fileno=os.dup(s.fileno())),
             socket.fromfd(s.fileno(), socket.AF_INET, socket.SOCK_STREAM)]
    assert caught(s) and caught(d) and not caught(u) and all(map(caught, given))
    for x in given:
        x.close()
    with socket.create_server(("127.0.0.1", 0)) as srv:
        c = socket.create_connection(srv.getsockname(), timeout=5)
        conn, _ = srv.accept()
        c2 = c.dup()
        from ipsecchan import runtime
        before = runtime.current()
        c3 = socket.socket(fileno=os.dup(c.fileno()))
        s2 = socket.socket(fileno=os.dup(srv.fileno()))
        assert not any(map(caught, (srv, c, c2, conn, c3, s2)))
        assert runtime.current() is before      # (a loopback connection needs no backend)
        c3.close()
        s2.close()
        n = d.sendto(b"fast", socket.MSG_FASTOPEN, srv.getsockname())   # loopback: plain
        assert n == 4 and not caught(d)
        conn2, _ = srv.accept()
        assert conn2.recv(4) == b"fast"
        for x in (s, d, u, c, c2, conn, conn2):
            x.close()


def test_descriptors_from_elsewhere_are_latched_and_the_modules_own_are_not(monkeypatch):
    # socket(fileno=...) and fromfd() wrap a descriptor this module did not make (passed
    # over a Unix socket, inherited, handed over by inetd or systemd): a connection there is
    # latched as if connected here (the lab shows the latch). accept(), dup() and
    # socketpair() wrap descriptors of sockets this module made and latches itself.
    given = []
    monkeypatch.setattr(socket.socket, "_latch_given", lambda self: given.append(self))
    with socket.create_server(("127.0.0.1", 0)) as srv:
        c = socket.create_connection(srv.getsockname(), timeout=5)
        conn, _ = srv.accept()
        made = [conn, c.dup(), *socket.socketpair()]
        assert given == []
        wrapped = socket.socket(fileno=os.dup(c.fileno()))
        copied = socket.fromfd(c.fileno(), socket.AF_INET, socket.SOCK_STREAM)
        assert given == [wrapped, copied]
        assert wrapped.family == socket.AF_INET and wrapped.getpeername() == srv.getsockname()
        for x in (c, wrapped, copied, *made):
            x.close()


def test_a_descriptor_from_elsewhere_that_cannot_be_latched_stays_the_callers(monkeypatch):
    # socket(fileno=fd) raising (no backend here; a refusal alike) must not close the
    # caller's descriptor: the caller still owns it, and may close it itself.
    from ipsecchan import runtime

    def no_backend():
        raise OSError(errno.EPERM, "no broker and no CAP_NET_ADMIN")
    monkeypatch.setattr(runtime, "get", no_backend)
    with std.create_server(("127.0.0.1", 0)) as srv, \
            std.create_connection(srv.getsockname(), timeout=5) as c:
        monkeypatch.setattr(socket, "_is_loopback", lambda addr: False)
        fd = os.dup(c.fileno())
        open_before = len(os.listdir("/proc/self/fd"))
        for make in (lambda: socket.socket(fileno=fd),
                     lambda: socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)):
            with pytest.raises(OSError):
                make()
            gc.collect()                        # (a half-made socket object, collected)
            assert os.fstat(fd) and len(os.listdir("/proc/self/fd")) == open_before
        os.close(fd)


def test_unix_sockets_pass_descriptors_and_data_unchanged(tmp_path):
    # An AF_UNIX socket's sendmsg looks at the descriptors it passes (a latched connection's
    # is marked as held elsewhere too); what it sends is the stdlib's.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        assert socket.send_fds(a, [b"hello"], [w]) == 5
        msg, fds, _flags, _addr = socket.recv_fds(b, 10, 1)
        assert msg == b"hello" and len(fds) == 1
        os.write(fds[0], b"via the passed descriptor")
        # A connection of this process's latches whose descriptor is passed is marked as
        # held elsewhere too (its close must not clear the pins; the lab test shows why).
        conn, other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for c in (conn, other):
            socket._latched_connections.add(c)
        socket.send_fds(a, [b"x"], [w, conn.fileno()])
        for fd in socket.recv_fds(b, 10, 2)[1]:
            os.close(fd)
        assert (conn._ipsec.generation, other._ipsec.generation) == (socket._ELSEWHERE, 0)
        conn.close()
        other.close()
        assert os.read(r, 100) == b"via the passed descriptor"
        os.close(fds[0])
        # Datagram sockets with an address, and messages without ancillary data.
        path = str(tmp_path / "u.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        server.bind(path)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        assert client.sendmsg([b"dgram"], [], 0, path) == 5
        assert server.recv(10) == b"dgram"
        assert a.sendmsg([b"plain"]) == 5 and b.recv(10) == b"plain"
        server.close()
        client.close()
    finally:
        for s in (a, b):
            s.close()
        os.close(r)
        os.close(w)

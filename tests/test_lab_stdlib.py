"""Standard-library programs over latched sockets, with real strongSwan and real ESP:
socketserver, xmlrpc, selectors (a non-blocking connect, latched on first use), ssl wrapping,
http.server authorizing by the IPsec peer ID (alice allowed, carol refused), and asyncio."""
import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

SERVERS = r"""
import json, os, selectors, socketserver, ssl, sys, threading, xmlrpc.server
from ipsecchan import socket
socket.install()
ADDR = sys.argv[1]
seen = []

class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline()
        self.wfile.write(f"{self.request.getpeerid()}|{line.decode()}".encode())

class RPCHandler(xmlrpc.server.SimpleXMLRPCRequestHandler):
    def do_POST(self):
        local.peer = self.connection.getpeerid()
        super().do_POST()

local = threading.local()
rpc = xmlrpc.server.SimpleXMLRPCServer((ADDR, 5002), RPCHandler, logRequests=False)
rpc.register_function(lambda: local.peer, "whoami")

def selector_echo():
    sel = selectors.DefaultSelector()
    ls = socket.create_server((ADDR, 5003))
    ls.setblocking(False)
    sel.register(ls, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is ls:
                conn, _ = ls.accept()
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
            else:
                data = key.fileobj.recv(1000)
                if data:
                    key.fileobj.send(key.fileobj.getpeerid().encode() + b"|" + data)
                else:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()

def tls_echo():
    from ipsecchan.lab import pki
    ident = pki.make_identity("bob-tls")
    fd = os.memfd_create("tls")      # the guest's / is read-only: the key lives in memory
    os.write(fd, ident.key_pem + ident.cert_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    ls = socket.create_server((ADDR, 5004))
    while True:
        conn, _ = ls.accept()
        peer = conn.getpeerid()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(f"{peer}|{tls.recv(100).decode()}".encode())

srv = socketserver.ThreadingTCPServer((ADDR, 5001), Echo)
for fn in (srv.serve_forever, rpc.serve_forever, selector_echo, tls_echo):
    threading.Thread(target=fn, daemon=True).start()
print("up", flush=True)
threading.Event().wait()
"""

CLIENTS = r"""
import errno, json, selectors, ssl, sys, xmlrpc.client
from ipsecchan import socket
socket.install()
BOB = sys.argv[1]
r = {}
with socket.create_connection((BOB, 5001), timeout=10) as s:
    s.sendall(b"socketserver\n")
    r["socketserver"] = [s.recv(100).decode(), s.getpeerid()]
r["xmlrpc"] = xmlrpc.client.ServerProxy(f"http://{BOB}:5002/").whoami()

s = socket.socket()
s.setblocking(False)
rc = s.connect_ex((BOB, 5003))
sel = selectors.DefaultSelector()
sel.register(s, selectors.EVENT_WRITE)
sel.select(10)
r["selectors_connect"] = [errno.errorcode.get(rc, rc), s.getsockopt(socket.SOL_SOCKET,
                                                                    socket.SO_ERROR)]
s.send(b"selectors")             # the first use latches the non-blocking connection
sel.modify(s, selectors.EVENT_READ)
sel.select(10)
r["selectors"] = [s.recv(100).decode(), s.latch.state, s.getpeerid()]
s.close()

raw = socket.create_connection((BOB, 5004), timeout=10)
before = [raw.getpeerid(), raw.latch.state]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
with ctx.wrap_socket(raw) as tls:
    tls.sendall(b"tls")
    r["tls"] = [tls.recv(100).decode(), before, type(tls).__name__]
print(json.dumps(r))
"""


def _wait_listening(lab, host, *ports):
    for _ in range(150):
        text = lab.run(host, ["ss", "-ltn"]).text
        if all(f":{p} " in text for p in ports):
            return
        lab.run(host, ["sleep", "0.1"])
    raise AssertionError(f"not listening on {host}: {ports}")


def test_stdlib_programs_over_latched_sockets(lab, dropin):
    for h in ("alice", "bob", "carol"):
        lab.add_host(h)
    link = lab.ike("alice", "bob", auth="cert")
    carol_link = lab.ike("carol", "bob", auth="cert")
    bob = lab.host("bob").addr(4)
    py = lab.kernel.python
    servers = dropin.spawn("bob", [py, "-c", SERVERS, bob])
    http = dropin.spawn("bob", [py, str(EXAMPLES / "peer_authz_http.py"), "serve", bob,
                                "5005", link.a_id])
    aio = dropin.spawn("bob", [py, str(EXAMPLES / "asyncio_echo.py"), "serve", bob, "5006"])
    _wait_listening(lab, "bob", 5001, 5002, 5003, 5004, 5005, 5006)

    r = json.loads(dropin.python("alice", CLIENTS, bob, check=True, timeout=120).text)
    a, b = link.a_id, link.b_id
    assert r["socketserver"] == [f"{a}|socketserver\n", b]
    assert r["xmlrpc"] == a
    assert r["selectors_connect"] == ["EINPROGRESS", 0]
    assert r["selectors"] == [f"{a}|selectors", "ESTABLISHED", b]
    assert r["tls"] == [f"{a}|tls", [b, "ESTABLISHED"], "SSLSocket"]

    get = [py, str(EXAMPLES / "peer_authz_http.py"), "get", f"http://{bob}:5005/report"]
    ok = json.loads(dropin.run("alice", get, check=True).text)
    assert ok == {"status": 200, "server_id": b,
                  "body": {"peer_id": a, "path": "/report", "authorized": True}}
    denied = json.loads(dropin.run("carol", get, check=True).text)
    assert denied["status"] == 403 and denied["body"]["peer_id"] == carol_link.a_id
    assert denied["body"]["authorized"] is False

    echo = json.loads(dropin.run("alice", [py, str(EXAMPLES / "asyncio_echo.py"), "client",
                                           bob, "5006", "hi"], check=True).text)
    assert echo == {"server_id": b, "reply": f"{a} said hi"}
    for p in (servers, http, aio):
        assert p.running(), p.output().stderr.decode()[-2000:]
        p.stop()

"""An HTTP service without TLS or passwords that authorizes each request by the IPsec peer's
IKE identity — the identity the connection is latched to, so it cannot change under the
request (RFC 5660).

    python3 examples/peer_authz_http.py serve ADDR PORT ALLOWED_ID [ALLOWED_ID ...]
    python3 examples/peer_authz_http.py get http://ADDR:PORT/path

Unchanged http.server and http.client code: install() makes the standard socket module hand
out latched sockets, so the handler finds the peer on self.connection.
"""
import http.client
import http.server
import json
import sys
import urllib.parse

from ipsecchan import socket

socket.install()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        peer = self.connection.getpeerid()
        allowed = peer is not None and peer in self.server.allowed_ids
        body = json.dumps({"peer_id": peer, "path": self.path,
                           "authorized": allowed}).encode()
        self.send_response(200 if allowed else 403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        print(json.dumps({"request": fmt % args, "peer_id": self.connection.getpeerid()}),
              flush=True)


def serve(addr: str, port: int, allowed: list[str]) -> None:
    with http.server.ThreadingHTTPServer((addr, port), Handler) as srv:
        srv.allowed_ids = set(allowed)
        print(json.dumps({"listening": [addr, port]}), flush=True)
        srv.serve_forever()


def get(url: str) -> None:
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", u.path or "/")
    server_id = conn.sock.getpeerid()       # before the response: HTTP/1.0 closes after it
    resp = conn.getresponse()
    body = json.loads(resp.read())
    print(json.dumps({"status": resp.status, "body": body,
                      "server_id": server_id}))
    conn.close()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    else:
        get(sys.argv[2])

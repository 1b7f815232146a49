"""A TCP echo server and a checking client, run on lab hosts to push traffic through SAs.

    python -m ipsecchan.lab.echo serve ADDR PORT         # one connection, echo until EOF
    python -m ipsecchan.lab.echo client ADDR PORT COUNT  # COUNT round trips, each checked
"""
from __future__ import annotations

import socket
import sys
import time

CONNECT_TIMEOUT = 10.0


def serve(addr: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(1)
        print("listening", flush=True)
        conn, peer = s.accept()
        total = 0
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
                total += len(data)
        print(f"echoed {total} bytes to {peer[0]}", flush=True)


def client(addr: str, port: int, count: int) -> None:
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:     # the server may not be listening yet
        try:
            conn = socket.create_connection((addr, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with conn:
        for i in range(count):
            msg = b"ping %d " % i + b"x" * 1000
            conn.sendall(msg)
            got = b""
            while len(got) < len(msg):
                chunk = conn.recv(65536)
                if not chunk:
                    raise ConnectionError(f"server closed after {len(got)} bytes of round trip {i}")
                got += chunk
            if got != msg:
                raise ValueError(f"round trip {i} came back altered")
    print(f"{count} round trips of {len(msg)} bytes checked", flush=True)


class EchoStream:
    """A client's side of a connection to `serve`: what it sent and what came back, so that
    data held back (a latch BROKEN) is counted when it finally returns."""

    def __init__(self, sock: socket.socket):
        self.sock, self.sent, self.received = sock, 0, 0

    def exchange(self, msg: bytes, wait: float) -> bool:
        """Send msg (may be empty), then read echoes for up to `wait` seconds; True once
        everything sent so far has come back."""
        if msg:
            self.sock.sendall(msg)
            self.sent += len(msg)
        end = time.monotonic() + wait
        while self.received < self.sent and time.monotonic() < end:
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            self.received += len(chunk)
        return self.received == self.sent


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "serve":
        serve(argv[1], int(argv[2]))
    elif len(argv) == 4 and argv[0] == "client":
        client(argv[1], int(argv[2]), int(argv[3]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

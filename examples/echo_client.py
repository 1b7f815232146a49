"""An echo client whose only change from the plain one is the import line.

    IPSECCHAN_VICI=/var/run/charon.vici python3 examples/echo_client.py 10.0.0.2 5000 [MESSAGE]

Prints (as JSON) the server's IKE identity, the protection of the channel and its bindings,
and the echo.
"""
import json
import sys

from ipsecchan import socket        # instead of: import socket


def main() -> None:
    addr, port = sys.argv[1], int(sys.argv[2])
    message = (sys.argv[3] if len(sys.argv) > 3 else "hello").encode()
    with socket.create_connection((addr, port), timeout=10) as s:
        s.sendall(message)
        s.shutdown(socket.SHUT_WR)
        echo = b""
        while data := s.recv(65536):
            echo += data
        cb = s.get_channel_binding("ipsec-endpoint")
        print(json.dumps({"peer_id": s.getpeerid(), "local_id": s.getlocalid(),
                          "protection": [p.describe() for p in s.latch.protection],
                          "channel_binding": cb.hex() if cb else None,
                          "echo": echo.decode()}))


if __name__ == "__main__":
    main()

"""An echo server whose only change from the plain one is the import line.

    IPSECCHAN_VICI=/var/run/charon.vici python3 examples/echo_server.py 10.0.0.2 5000 [COUNT]

Each accepted connection is an IPsec channel: the server prints (as JSON) who the peer is,
as IKE authenticated it, and the channel's bindings, then echoes until the client closes.
"""
import json
import sys

from ipsecchan import socket        # instead of: import socket


def main() -> None:
    addr, port = sys.argv[1], int(sys.argv[2])
    count = int(sys.argv[3]) if len(sys.argv) > 3 else None
    with socket.create_server((addr, port)) as srv:
        print(json.dumps({"listening": [addr, port]}), flush=True)
        while count is None or count > 0:
            conn, peer = srv.accept()
            with conn:
                cb = conn.get_channel_binding("ipsec-endpoint")
                print(json.dumps({"peer": peer[:2], "peer_id": conn.getpeerid(),
                                  "local_id": conn.getlocalid(),
                                  "channel_binding": cb.hex() if cb else None}), flush=True)
                while data := conn.recv(65536):
                    conn.sendall(data)
            count = None if count is None else count - 1


if __name__ == "__main__":
    main()

"""A man in the middle for lab tests: accepts one connection and relays it, byte for byte, to
a target, over latched sockets of its own (its own IKE identity on each side).

    python -m ipsecchan.lab.relay LISTEN_ADDR PORT TARGET_ADDR TARGET_PORT

Prints "listening", then at the end one JSON line: the IKE identity on each side and the
channel bindings of each of its two channels (hex, or null).
"""
from __future__ import annotations

import json
import sys
import threading

from ipsecchan import socket


def _pump(src, dst) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def relay(listen: str, port: int, target: str, target_port: int) -> dict:
    with socket.create_server((listen, port)) as ls:
        print("listening", flush=True)
        down, _ = ls.accept()
    up = socket.create_connection((target, target_port), timeout=10)
    with down, up:
        t = threading.Thread(target=_pump, args=(down, up))
        t.start()
        _pump(up, down)
        t.join()
        cbs = [s.get_channel_binding() for s in (down, up)]
        return {"from": down.getpeerid(), "to": up.getpeerid(),
                "cb_down": cbs[0].hex() if cbs[0] else None,
                "cb_up": cbs[1].hex() if cbs[1] else None}


if __name__ == "__main__":
    a = sys.argv[1:]
    print(json.dumps(relay(a[0], int(a[1]), a[2], int(a[3]))), flush=True)

"""`ipsecchan watch`: the latches of this network namespace's processes, as they change.

Every process that latches publishes its latches on a status service
(ipsecchan.latch.status); watch follows all of them, looking for new ones about once a
second. Each one's latches are printed once when watch connects (marked "current"), then one
line per event:

    12:00:00.102 pid 812 latch 3 tcp 10.0.0.1:40000->10.0.0.2:5000 current ESTABLISHED peer CN=bob
    12:00:01.234 pid 812 latch 3 tcp 10.0.0.1:40000->10.0.0.2:5000 ESTABLISHED -> BROKEN peer-changed ('CN=mallory' instead of 'CN=bob')

By default: connection latches, and the events that change what protects a connection
(breaks, resolutions, rekeys, a broken latch closed). --all-states: also listening sockets'
latches, latches being made (LATCHING -> ESTABLISHED) and closed.

When a service drops watch for falling behind (overrun), watch says so and prints that
process's latches again as current: a state is never shown as current once events about it
were lost. A service that refuses watch (another user's process), cannot be read, or goes
away is said so too, on a line of its own.

JSON (`--json`), one object per line, with "type":

    current   {"type", "time", "pid", "latch": LATCH}
    alert     {"type", "time", "pid", "id", "old", "new", "cause", "detail", "rekeyed",
               "latch": LATCH}
    service   {"type", "time", "pid", "name", "event": "refused" | "unreadable" | "overrun" |
               "gone", "error"}   pid: the pid the service's name claims

LATCH and the alert fields are those of the status service (ipsecchan.latch.status).
"""
from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import sys
import time

RESCAN = 1.0
CONNECT_TIMEOUT = 2.0


class _Stop(Exception):
    pass


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def _hostport(addr: str, port: int, family: int) -> str:
    return f"[{addr}]:{port}" if family == 6 else f"{addr}:{port}"


def flow_text(latch: dict) -> str:
    f = latch.get("flow")
    if f is not None:
        return (f"{f['proto']} {_hostport(f['local'], f['local_port'], f['family'])}->"
                f"{_hostport(f['peer'], f['peer_port'], f['family'])}")
    b = latch.get("bound")
    if b is not None:
        return f"{b['proto']} listening {_hostport(b['local'], b['local_port'], b['family'])}"
    return "listening (socket closed)"


def _why(cause, detail) -> str:
    text = f" {cause}" if cause else ""
    return text + (f" ({detail})" if detail else "")


def current_text(pid: int, t: float, latch: dict) -> str:
    text = (f"{_clock(t)} pid {pid} latch {latch['id']} {flow_text(latch)} current "
            f"{latch['state']}{_why(latch['cause'], latch['detail'])}")
    if latch.get("peer"):
        text += f" peer {latch['peer']['id']}"
    elif latch.get("protected") is False:
        text += " cleartext (optional protection)"
    return text


def alert_text(pid: int, a: dict) -> str:
    text = (f"{_clock(a['time'])} pid {pid} latch {a['id']} {flow_text(a['latch'])} "
            f"{a['old']} -> {a['new']}{_why(a['cause'], a['detail'])}")
    if a["rekeyed"]:
        text += " rekeyed, now out " + ",".join(a["latch"]["out_spis"])
    return text


def routine(a: dict) -> bool:
    """An event --all-states shows and the default leaves out: a listener's, a latch being
    made, a latch that was not broken being closed."""
    if a["latch"]["role"] == "listener":
        return True
    if (a["old"], a["new"]) == ("LATCHING", "ESTABLISHED"):
        return True
    return a["new"] == "CLOSED" and a["old"] != "BROKEN"


class Watcher:
    """Follows every status service; step() does one round (a rescan when due)."""

    def __init__(self, write, *, as_json: bool = False, all_states: bool = False, find=None):
        from ipsecchan.latch import status     # here: the CLI imports this module for --help
        self.status = status
        self.write, self.as_json, self.all_states = write, as_json, all_states
        self.find = find or status.find_servers
        self.sel = selectors.DefaultSelector()
        self.conns: dict = {}                  # name -> status.Connection
        self.listed: set[str] = set()
        self.reported: dict[str, str] = {}     # name -> the last problem said about it
        self.next_scan = 0.0
        self.broker = None                     # OperatorFeed: the broker's latches, if any

    # -- output --
    def _service(self, server, event: str, error: str | None = None) -> None:
        msg = f"{event}: {error}" if error else event
        if self.reported.get(server.name) == msg:
            return          # said once since its last listing; retried quietly every scan
        self.reported[server.name] = msg
        t = time.time()
        if self.as_json:
            self.write(json.dumps({"type": "service", "time": t, "pid": server.pid,
                                   "name": server.name, "event": event, "error": error}))
        else:
            words = {"refused": "status service refused watch",
                     "unreadable": "status service cannot be read",
                     "overrun": "events lost (overrun): its latches again, as they are now",
                     "gone": "status service gone"}[event]
            self.write(f"{_clock(t)} pid {server.pid} {words}" + (f": {error}" if error else ""))

    def _current(self, pid: int, t: float, latch: dict) -> None:
        if not self.all_states and latch["role"] == "listener":
            return
        if self.as_json:
            self.write(json.dumps({"type": "current", "time": t, "pid": pid, "latch": latch}))
        else:
            self.write(current_text(pid, t, latch))

    def _alert(self, pid: int, a: dict) -> None:
        if not self.all_states and routine(a):
            return
        if self.as_json:
            self.write(json.dumps({"type": "alert", **a, "pid": pid}))
        else:
            self.write(alert_text(pid, a))

    # -- connections --
    def scan(self) -> None:
        try:
            servers = self.find()
        except OSError as exc:
            print(f"ipsecchan watch: cannot list the status services: {exc}", file=sys.stderr)
            return
        names = {s.name for s in servers}
        for name in [n for n in self.reported if n not in names and n not in self.conns]:
            del self.reported[name]
        for server in servers:
            if server.name not in self.conns:
                self._connect(server)
        if self.broker is None:
            self._connect_broker()

    def _connect_broker(self) -> None:
        # The broker holds the latches of its (unprivileged) clients: root and its operator
        # groups may follow them.
        from ipsecchan.broker.client import OperatorFeed, broker_path
        path = broker_path()
        if not os.path.exists(path):
            return
        server = self.status.Server(f"broker:{path}", None)
        try:
            feed = OperatorFeed(path, CONNECT_TIMEOUT)
        except OSError as exc:
            self._service(server, "unreadable", str(exc))
            return
        server = self.status.Server(f"broker:{path}", feed.pid)
        try:
            latches = feed.follow()
        except (OSError, ValueError) as exc:
            feed.close()
            self._service(server, "refused", str(exc))
            return
        self.reported.pop(server.name, None)
        self.broker, self.broker_server = feed, server
        t = time.time()
        for latch in latches:
            self._current((latch.get("owner") or {}).get("pid"), t, latch)
        for a in feed.events:
            self._alert(a["pid"], a)
        feed.events = []
        self.sel.register(feed.sock, selectors.EVENT_READ, "broker")

    def _read_broker(self) -> None:
        try:
            events = self.broker.read_events()
        except (EOFError, OSError, ValueError) as exc:
            self.sel.unregister(self.broker.sock)
            self.broker.close()
            self.broker = None
            self._service(self.broker_server, "gone" if isinstance(exc, EOFError)
                          else "unreadable", None if isinstance(exc, EOFError) else str(exc))
            return
        for a in events:
            self._alert(a["pid"], a)

    def _connect(self, server) -> None:
        try:
            conn = self.status.Connection(server, CONNECT_TIMEOUT)
        except OSError as exc:
            self._service(server, "unreadable", self.status.error_text(exc))
            return
        conn.send({"op": "follow"})
        conn.sock.setblocking(False)
        self.conns[server.name] = conn
        self.sel.register(conn.sock, selectors.EVENT_READ, conn)

    def _drop(self, conn) -> None:
        if self.conns.get(conn.server.name) is not conn:
            return                                  # dropped already
        self.sel.unregister(conn.sock)
        conn.close()
        del self.conns[conn.server.name]
        self.listed.discard(conn.server.name)

    def _read(self, conn) -> None:
        server = conn.server
        try:
            lines = conn.lines()
        except EOFError:
            self._drop(conn)
            self._service(server, "gone")
            return
        except OSError as exc:
            self._drop(conn)
            self._service(server, "unreadable", self.status.error_text(exc))
            return
        for obj in lines:
            try:
                done = self._line(conn, obj)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                self._drop(conn)
                self._service(server, "unreadable", f"malformed line ({exc!r}): {obj!r:.80}")
                return
            if done:
                return

    def _line(self, conn, obj: dict) -> bool:
        """Handle one line of a service; True when the connection ended with it."""
        server = conn.server
        if "error" in obj:
            was_listed = server.name in self.listed
            self._drop(conn)
            if obj["error"] == "overrun":
                self._service(server, "overrun")
                self._connect(server)
            else:
                self._service(server, "unreadable" if was_listed else "refused",
                              str(obj["error"]))
            return True
        if "latches" in obj:
            self.listed.add(server.name)
            self.reported.pop(server.name, None)
            for latch in obj["latches"]:
                self._current(conn.pid, obj.get("time", time.time()), latch)
        elif "new" in obj and server.name in self.listed:
            self._alert(conn.pid, obj)
        else:
            self._drop(conn)
            self._service(server, "unreadable", f"unexpected line {obj!r:.80}")
            return True
        return False

    def step(self, timeout: float) -> None:
        now = time.monotonic()
        if now >= self.next_scan:
            self.scan()
            self.next_scan = now + RESCAN
        wait = max(0.0, min(timeout, self.next_scan - time.monotonic()))
        for key, _ in self.sel.select(wait):
            if key.data == "broker":
                if self.broker is not None:
                    self._read_broker()
            elif self.conns.get(key.data.server.name) is key.data:  # not dropped meanwhile
                self._read(key.data)

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._drop(conn)
        if self.broker is not None:
            self.broker.close()
        self.sel.close()


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("watch", help="latch events of every latching process, as they happen",
                       description="Follow the latches of every process of this network "
                                   "namespace that latches (their status services): their "
                                   "current states, then one line per event.",
                       epilog=_json_doc(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--all-states", action="store_true",
                   help="also listeners' latches, latches being made and closed")
    p.set_defaults(func=run)
    return p


def _json_doc() -> str:
    doc = __doc__ or ""          # None under python -OO
    i = doc.find("By default")
    return doc[i:].rstrip() if i >= 0 else ""


def _raise_stop(_sig, _frame):
    raise _Stop


def run(opts) -> int:
    def write(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    watcher = Watcher(write, as_json=opts.json, all_states=opts.all_states)
    try:
        while True:
            watcher.step(RESCAN)
    except _Stop:
        return 0
    except BrokenPipeError:
        # The reader left (watch | head): nothing more to say, and nowhere to say it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        watcher.close()
        for s, handler in old.items():
            signal.signal(s, handler)

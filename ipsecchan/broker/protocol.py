"""The broker's wire: JSON messages on a Unix SOCK_SEQPACKET socket, a socket passed along
with SCM_RIGHTS where an operation takes one.

SEQPACKET keeps message boundaries (no framing to get wrong) and carries each descriptor with
the message it belongs to. A message is one UTF-8 JSON object of at most MAX_MESSAGE bytes.

Client -> broker (each request has an integer "id" the reply repeats; "fd" is the passed
socket's descriptor number in the client, through which the broker reaches it later):

    {"op": "latch",  "id": n, "fd": d, "policy": "require"|"optional", "peer_id": str|null,
     "expect": PARAMS|null}                                                                  + fd
    {"op": "listen", "id": n, "fd": d, "policy": ..., "peer_id": ...}                        + fd
    {"op": "accept", "id": n, "fd": d, "listener": L}                                         + fd
    {"op": "release", "id": n, "latch": L, "quiet": bool}                       [+ fd]
                                      with the latch's socket passed along, the broker's
                                      copy keeps the socket open until its policies are
                                      cleared: its owner may close it without waiting.
                                      "quiet": no reply when it succeeds
    {"op": "abort", "id": n}  + fd    clear the block of a socket whose latch was refused,
                                      before its owner resets it (the reset must get out);
                                      EBUSY while bytes are queued on it
    {"op": "list", "id": n, "after": L|null}    root and the broker's operator group only
    {"op": "follow", "id": n}   the same: from then on every latch's alerts, for `ipsecchan
                                watch` (status ALERT format, with "event": "alert")
    {"op": "lookup", "id": n, "flows": [[family, proto, local, local_port, remote,
     remote_port, mark, ifindex]...], "ike": bool}    the same (at most 64 flows): what the
                                broker's kernel view (and, "ike", its IKE daemon) says of
                                each flow, for `ipsecchan ss` without CAP_NET_ADMIN

Broker -> client:

    {"id": n, "ok": true, "latch": LATCH}
    {"id": n, "ok": true, "latches": [...], "next": L|null}   each latch in the status
                                     services' LATCH format (ipsecchan.latch.status) with
                                     "owner": {"pid", "uid"}, "sharers": [{"pid", "uid"}...]
                                     (the other clients holding it: see below)
                                     list: as many as fit in a message; "next" to ask for more
    {"id": n, "ok": true, "ipsec": [...]}   lookup: one object per flow, as many as fit in a
                                     message, each in `ipsecchan ss --json`'s "ipsec" format
    {"id": n, "ok": false, "error": "...", "errno": e|null, "cause": c|null[, "detail": "..."]}
    {"event": "alert", "latch": LATCH, "old": s, "new": s, "cause": c|null, "detail": "...",
     "rekeyed": bool}                pushed to the clients that hold the latch, and only to them

"expect" latches a socket again (after a broker restart) only to the parameters it had: the
same peer (and key), no weaker protection; else it is refused like any latch, and blocked.
A request that cannot be read (not JSON, too long, no integer id) is answered with "id": null.
One latch per socket: two would undo each other's policies. A connection that another client
has latched ("latch" from a process it was passed to, or that inherited it) shares that
latch: the reply is that latch (its id), its alerts go to every client holding it, and it
lasts until the last of them releases it (or its descriptor is gone); it is refused
(ECONNREFUSED, not blocked: the other's latch still pins it) when it does not meet the
request's requirements or "expect", and a socket latched already by the asking client, a
listener or a socket being latched is refused (EBUSY).

LATCH: {"id", "role": connector|listener|accepted, "state", "cause", "detail", "flow": null |
{"family", "proto", "local", "local_port", "remote", "remote_port"}, "params": null | PARAMS}
PARAMS: {"protected", "local": PARTY|null, "peer": PARTY|null, "protection": [PROT...],
"reqids": [...], "out_sas": [SAF...], "in_sas": [SAF...]}, PARTY {"id", "pubkey_sha256",
"auth"}, PROT: the fields of latch.protection.Protection, SAF {"key": [family, dst, proto,
spi], "reqid", "protection": PROT, "src", "local": PARTY|null, "peer": PARTY|null}, an SA's
"local" and "peer" only when they are not the latch's (absent: the same).
"""
from __future__ import annotations

import array
import json
import os
import select
import _socket
import socket
from dataclasses import fields

from ipsecchan.latch.machine import LatchParams, Party, SAFacts
from ipsecchan.latch.protection import Protection
from ipsecchan.xfrm.lookup import Flow

MAX_MESSAGE = 64 * 1024
MAX_FDS = 4                     # more in one message: refused (each request takes one)
_FDS_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)
DEFAULT_PATH = "/run/ipsecchan/broker.sock"


class ProtocolError(ValueError):
    pass


def send(sock: socket.socket, msg: dict, fd: int | None = None) -> None:
    data = encode(msg)
    if fd is None:
        sock.send(data)
    else:
        # The C method itself (what socket.send_fds calls): with socket.install(), the
        # client's Unix socket is an ipsecchan one, whose sendmsg would take the socket
        # handed to the broker for one passed to another process (ipsecchan.socket's
        # _mark_passed); the broker holds its copy only to act on this client's requests.
        _socket.socket.sendmsg(sock, [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               array.array("i", [fd]))])


def encode(msg: dict) -> bytes:
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def recv(sock: socket.socket, dispose=None) -> tuple[dict | None, list[int]]:
    """One message and the descriptors that came with it; (None, []) at end of stream.
    Raises ProtocolError for a truncated, empty or malformed message, after handing its
    descriptors to `dispose` (default: closed here)."""
    data, anc, flags, _ = sock.recvmsg(MAX_MESSAGE + 1, _FDS_SPACE, socket.MSG_CMSG_CLOEXEC)
    fds = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += array.array("i", payload[:len(payload) - len(payload) % 4])
    if not data and not fds and _hung_up(sock):
        return None, []
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_MESSAGE:
            raise ProtocolError(f"message longer than {MAX_MESSAGE} bytes, or more than "
                                f"{MAX_FDS} descriptors")
        if not data:
            raise ProtocolError("empty message")
        try:
            msg = json.loads(data)
        except (ValueError, RecursionError) as exc:
            # ValueError covers bad UTF-8 and integers past Python's digit limit; nesting
            # deep enough to exhaust the parser's recursion is RecursionError.
            raise ProtocolError(f"not JSON: {str(exc)[:200]}") from None
        if not isinstance(msg, dict):
            raise ProtocolError("a message must be a JSON object")
        return msg, fds
    except ProtocolError:
        for fd in fds:
            (dispose or _close)(fd)
        raise


def _hung_up(sock: socket.socket) -> bool:
    # A zero-length read is either a zero-length message or the end of the stream; only the
    # socket's state tells them apart.
    fd = sock.fileno()
    if fd < 0:
        return True             # closed here meanwhile (by another thread)
    p = select.poll()
    p.register(fd, select.POLLRDHUP | select.POLLHUP)
    return bool(p.poll(0))


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


# ---- latches as JSON and back ----

def _party(p: Party | None) -> dict | None:
    return None if p is None else {"id": p.id, "pubkey_sha256": p.pubkey_sha256, "auth": p.auth}


_PROT_FIELDS = tuple(f.name for f in fields(Protection))
_PROTS: dict = {}       # Protection -> its JSON object (shared: only ever encoded)


def _prot(p: Protection) -> dict:
    # dataclasses.asdict deep-copies every field: a good part of a latch's reply time.
    d = _PROTS.get(p)
    if d is None:
        if len(_PROTS) >= 256:
            _PROTS.clear()
        d = _PROTS[p] = {name: getattr(p, name) for name in _PROT_FIELDS}
    return d


def _saf(s: SAFacts, local: Party | None, peer: Party | None) -> dict:
    # An SA's parties are the latch's as a rule: only those that differ are spelled out.
    d = {"key": list(s.key), "reqid": s.reqid, "protection": _prot(s.protection),
         "src": s.src}
    if s.local is not local and s.local != local:
        d["local"] = _party(s.local)
    if s.peer is not peer and s.peer != peer:
        d["peer"] = _party(s.peer)
    return d


def params_json(p: LatchParams | None) -> dict | None:
    if p is None:
        return None
    return {"protected": p.protected, "local": _party(p.local), "peer": _party(p.peer),
            "protection": [_prot(x) for x in p.protection], "reqids": list(p.reqids),
            "out_sas": [_saf(s, p.local, p.peer) for s in p.out_sas],
            "in_sas": [_saf(s, p.local, p.peer) for s in p.in_sas]}


def flow_json(f: Flow | None) -> dict | None:
    if f is None:
        return None
    return {"family": f.family, "proto": f.proto, "local": f.local, "local_port": f.local_port,
            "remote": f.remote, "remote_port": f.remote_port, "mark": f.mark}


def latch_json(handle) -> dict:
    latch = handle.latch
    role = "listener" if handle.flow is None else (
        "accepted" if handle.listener is not None else "connector")
    return {"id": handle.id, "role": role, "state": latch.state.value,
            "cause": latch.cause.value if latch.cause else None, "detail": latch.detail,
            "flow": flow_json(handle.flow), "params": params_json(latch.params)}


def _party_of(d: dict | None) -> Party | None:
    if d is None:
        return None
    return Party(str(d["id"]), d.get("pubkey_sha256"), str(d.get("auth", "unknown")))


def _prot_of(d: dict) -> Protection:
    return Protection(**d)


def params_of(d: dict | None) -> LatchParams | None:
    """LatchParams from params_json (on the client side of the broker)."""
    if d is None:
        return None

    local, peer = _party_of(d["local"]), _party_of(d["peer"])
    prots: dict = {}

    def prot(x):
        # The latch's protections and its SAs' are mostly one: made once (hashable fields).
        key = tuple(x.items())
        p = prots.get(key)
        if p is None:
            p = prots[key] = _prot_of(x)
        return p

    def saf(x):
        k = x["key"]
        return SAFacts((int(k[0]), str(k[1]), str(k[2]), int(k[3])), int(x["reqid"]),
                       prot(x["protection"]),
                       _party_of(x["local"]) if "local" in x else local,
                       _party_of(x["peer"]) if "peer" in x else peer, str(x.get("src", "")))
    return LatchParams(bool(d["protected"]), local, peer,
                       tuple(prot(x) for x in d["protection"]),
                       tuple(int(r) for r in d["reqids"]),
                       tuple(saf(x) for x in d["out_sas"]), tuple(saf(x) for x in d["in_sas"]))


def flow_of(d: dict | None) -> Flow | None:
    if d is None:
        return None
    return Flow(int(d["family"]), int(d["proto"]), str(d["local"]), int(d["local_port"]),
                str(d["remote"]), int(d["remote_port"]), int(d.get("mark", 0)))

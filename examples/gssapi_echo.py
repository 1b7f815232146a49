#!/usr/bin/env python3
"""Kerberos (GSS-API) mutual authentication bound to the IPsec channel, then one wrapped echo.

    python examples/gssapi_echo.py serve ADDR PORT [--once]      # KRB5_KTNAME: the keytab
    python examples/gssapi_echo.py client ADDR PORT [--message M] # KRB5CCNAME: a TGT

The channel bindings are the connection's "ipsec-endpoint" binding from ipsecchan's socket
module: the same at both ends of one IPsec channel and different on any other, so a token a
man in the middle relays onto another channel is refused. --cb-hex HEX gives the bindings
explicitly instead. With neither, the program refuses to run: it never authenticates without
bindings.

The server requires bindings from the client. MIT Kerberos accepts an initiator that sent
none (the acceptor's bindings are then ignored; only GSS_C_CHANNEL_BOUND_FLAG is left
unset), so the server checks that flag and refuses an unbound client before it sends its
mutual-authentication token and before it reads any message.

Wire: frames of a 4-byte big-endian length, then a kind byte (T a GSS token, W a wrapped
message, E a refusal in UTF-8) and the body. Each side prints a JSON line per connection.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import socket
import struct
import sys
import time

import gssapi
import gssapi.raw as gss

SERVICE = "echo/bob.lab@LAB.TEST"
CB_TYPE = "ipsec-endpoint"
TOKEN, WRAPPED, REFUSAL = b"T", b"W", b"E"
MAX_FRAME = 1 << 20
CONNECT_TIMEOUT = 10.0
FLAGS = (gssapi.RequirementFlag.mutual_authentication | gssapi.RequirementFlag.integrity
         | gssapi.RequirementFlag.confidentiality | gssapi.RequirementFlag.replay_detection
         | gssapi.RequirementFlag.out_of_sequence_detection)


class ProtocolError(Exception):
    pass


# -- framing ----------------------------------------------------------------------------------
def send_frame(sock: socket.socket, kind: bytes, body: bytes) -> None:
    sock.sendall(struct.pack("!I", 1 + len(body)) + kind + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProtocolError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def recv_frame(sock: socket.socket) -> tuple[bytes, bytes]:
    (length,) = struct.unpack("!I", _recv_exact(sock, 4))
    if not 1 <= length <= MAX_FRAME:
        raise ProtocolError(f"bad frame length {length}")
    frame = _recv_exact(sock, length)
    return frame[:1], frame[1:]


def refuse(sock: socket.socket, why: str) -> None:
    try:
        send_frame(sock, REFUSAL, why.encode())
    except OSError:
        pass


# -- channel bindings -------------------------------------------------------------------------
def socket_module():
    """ipsecchan's socket module (latched connections with channel bindings), or None."""
    try:
        from ipsecchan import socket as ipsec_socket
    except ImportError:
        return None
    return ipsec_socket


def connection_binding(sock: socket.socket) -> bytes | None:
    get = getattr(sock, "get_channel_binding", None)
    return get(CB_TYPE) if get is not None else None


def bindings(cb: bytes) -> gss.ChannelBindings:
    return gss.ChannelBindings(application_data=cb)


def describe(exc: gss.GSSError) -> str:
    return f"{type(exc).__name__}: {exc.gen_message()}"


# -- server -----------------------------------------------------------------------------------
def accept_one(conn: socket.socket, creds: gssapi.Credentials, cb: bytes | None) -> dict:
    """Authenticate one client (bound to `cb`), then echo one wrapped message."""
    result: dict = {"ok": False}
    if cb is None:
        result.update(stage="bindings", error="no channel bindings for this connection")
        refuse(conn, result["error"])
        return result
    result["cb_sha256"] = hashlib.sha256(cb).hexdigest()[:16]
    ctx = None
    try:
        while True:
            kind, body = recv_frame(conn)
            if kind != TOKEN:
                raise ProtocolError(f"expected a GSS token, got a frame of kind {kind!r}")
            res = gss.accept_sec_context(body, creds, ctx, bindings(cb))
            ctx = res.context
            if not res.more_steps:
                break
            send_frame(conn, TOKEN, res.token)
    except gss.GSSError as exc:      # BadChannelBindingsError: another channel's token
        result.update(stage="accept", error=describe(exc))
        refuse(conn, result["error"])
        return result
    result["client"] = str(gssapi.Name(res.initiator_name))
    result["channel_bound"] = gssapi.RequirementFlag.channel_bound in res.flags
    if not result["channel_bound"]:
        result.update(stage="bindings", error="the client sent no channel bindings")
        refuse(conn, result["error"])
        return result
    if res.token:       # the AP-REP: mutual authentication, for a bound client only
        send_frame(conn, TOKEN, res.token)
    sec = gssapi.SecurityContext(base=ctx)
    kind, body = recv_frame(conn)
    if kind != WRAPPED:
        raise ProtocolError(f"expected a wrapped message, got a frame of kind {kind!r}")
    msg = sec.unwrap(body)
    if not msg.encrypted:
        result.update(stage="message", error="the message was not encrypted")
        refuse(conn, result["error"])
        return result
    send_frame(conn, WRAPPED, sec.wrap(msg.message, encrypt=True).message)
    result.update(ok=True, message=msg.message.decode("utf-8", "replace"))
    return result


def serve(sockets, addr: str, port: int, cb: bytes | None, service: str, once: bool) -> int:
    # The service's key from the keytab (KRB5_KTNAME), read before listening.
    creds = gssapi.Credentials(name=gssapi.Name(service, gssapi.NameType.kerberos_principal),
                               usage="accept")
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with sockets.create_server((addr, port), family=family) as listener:
        print(json.dumps({"listening": [addr, port], "service": service}), flush=True)
        while True:
            conn, peer = listener.accept()
            with conn:
                try:
                    result = accept_one(conn, creds, cb if cb is not None
                                        else connection_binding(conn))
                except (OSError, ProtocolError, gss.GSSError) as exc:
                    result = {"ok": False, "stage": "message", "error": str(exc)}
            print(json.dumps({"peer": peer[0], **result}), flush=True)
            if once:
                return 0 if result["ok"] else 1


# -- client -----------------------------------------------------------------------------------
def connect(sockets, addr: str, port: int) -> socket.socket:
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:     # the server may not be listening yet
        try:
            return sockets.create_connection((addr, port), timeout=10)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def authenticate(sock: socket.socket, service: str, cb: bytes) -> tuple[dict, object]:
    """Mutual authentication bound to `cb`: (result, security context or None)."""
    target = gssapi.Name(service, gssapi.NameType.kerberos_principal)
    ctx, token = None, None
    try:
        while True:
            res = gss.init_sec_context(target, context=ctx, mech=gssapi.MechType.kerberos,
                                       flags=FLAGS, channel_bindings=bindings(cb),
                                       input_token=token)
            ctx = res.context
            if res.token:
                send_frame(sock, TOKEN, res.token)
            if not res.more_steps:
                break
            kind, token = recv_frame(sock)
            if kind == REFUSAL:
                return {"ok": False, "stage": "auth",
                        "error": "refused by the server: " + token.decode("utf-8", "replace")}, None
            if kind != TOKEN:
                raise ProtocolError(f"expected a GSS token, got a frame of kind {kind!r}")
    except gss.GSSError as exc:
        return {"ok": False, "stage": "auth", "error": describe(exc)}, None
    sec = gssapi.SecurityContext(base=ctx)
    if gssapi.RequirementFlag.mutual_authentication not in sec.actual_flags:
        return {"ok": False, "stage": "auth", "error": "no mutual authentication"}, None
    return {"ok": True, "client": str(sec.initiator_name), "service": str(sec.target_name)}, sec


def client(sockets, addr: str, port: int, cb: bytes | None, service: str, message: str) -> int:
    with connect(sockets, addr, port) as sock:
        if cb is None:
            cb = connection_binding(sock)
        if cb is None:
            result = {"ok": False, "stage": "bindings",
                      "error": "no channel bindings for this connection"}
        else:
            try:
                result = echo(sock, service, cb, message)
            except (OSError, ProtocolError, gss.GSSError) as exc:
                result = {"ok": False, "stage": "message", "error": str(exc)}
            result["cb_sha256"] = hashlib.sha256(cb).hexdigest()[:16]
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


def echo(sock: socket.socket, service: str, cb: bytes, message: str) -> dict:
    result, sec = authenticate(sock, service, cb)
    if sec is None:
        return result
    send_frame(sock, WRAPPED, sec.wrap(message.encode(), encrypt=True).message)
    kind, body = recv_frame(sock)
    if kind != WRAPPED:
        raise ProtocolError(f"expected the wrapped echo, got {kind!r}: {body!r}")
    reply = sec.unwrap(body)
    result.update(sent=message, echo=reply.message.decode("utf-8", "replace"),
                  encrypted=reply.encrypted)
    result["ok"] = reply.encrypted and reply.message == message.encode()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("serve", "client"):
        s = sub.add_parser(name)
        s.add_argument("addr")
        s.add_argument("port", type=int)
        s.add_argument("--service", default=SERVICE, help="the service's Kerberos principal")
        s.add_argument("--cb-hex", help="channel bindings (hex) instead of the connection's "
                                        f"{CB_TYPE} binding")
    sub.choices["serve"].add_argument("--once", action="store_true",
                                      help="exit after one client (status 0 if it was served)")
    sub.choices["client"].add_argument("--message", default="hello over a bound channel")
    args = p.parse_args(argv)

    if args.cb_hex is not None:
        cb, sockets = bytes.fromhex(args.cb_hex), socket
        if not cb:
            p.error("--cb-hex: empty channel bindings bind nothing")
    else:
        cb, sockets = None, socket_module()
        if sockets is None:
            p.exit(2, f"{p.prog}: no channel bindings: ipsecchan.socket is not available and "
                      "--cb-hex was not given; refusing to authenticate without them\n")
    if args.command == "serve":
        return serve(sockets, args.addr, args.port, cb, args.service, args.once)
    return client(sockets, args.addr, args.port, cb, args.service, args.message)


if __name__ == "__main__":
    sys.exit(main())

"""The IPsec socket options: numbers, values and their byte encodings.

Level SOL_IPSEC is 0x49505343 ("IPSC"): far above every kernel level (SOL_SOCKET is 1, the
IPPROTO_* levels stay below 300, the SOL_* ones below 300 too), so it can never name a kernel
option; ipsecchan.socket answers it itself and passes every other level to the kernel.

Read with getsockopt(SOL_IPSEC, opt) -> int, or getsockopt(SOL_IPSEC, opt, buflen) -> bytes:

  IPSEC_LATCH_STATE     int  IPSEC_LATCH_NONE (not latched: loopback, non-IP, bypass, not
                             connected), _LISTENER, _LATCHING, _ESTABLISHED, _BROKEN, _CLOSED
  IPSEC_POLICY          int  the socket's policy (below)
  IPSEC_PEER_ID         bytes  the peer's IKE identity, UTF-8 (e.g. b"CN=bob")
  IPSEC_LOCAL_ID        bytes  this end's IKE identity
  IPSEC_PEER_KEY        bytes  SHA-256 (32 bytes) of the peer's authenticated public key
                             (DER SubjectPublicKeyInfo); ENODATA when no key authenticated it
  IPSEC_LATCH_CAUSE     bytes  why the latch is BROKEN (e.g. b"peer-changed"); b"" otherwise
  IPSEC_PROTECTION      bytes  the encoding below
  IPSEC_CHANNEL_BINDING bytes  the "ipsec-endpoint" channel binding (ipsecchan.channel);
                             ENODATA when unavailable

Set with setsockopt(SOL_IPSEC, opt, value) before connect() or listen() (EISCONN after):

  IPSEC_POLICY          int  IPSEC_POLICY_REQUIRE (IPsec or no connection: the default),
                             IPSEC_POLICY_OPTIONAL (RFC 5660 3.1: may latch to cleartext,
                             knowingly, reported as such), IPSEC_POLICY_BYPASS (no latch)
  IPSEC_REQUIRE_PEER_ID bytes  connect() fails, before any application byte is sent, unless
                             the latched peer is this identity; b"" clears it

Errors are the kernel's: ENOPROTOOPT for an unknown option (or setting a read-only one),
EINVAL for a buffer too small or a bad value, ENOTCONN when a connection is needed and there
is none, ENODATA when the connection has no such property (not latched, or no key).

IPSEC_PROTECTION, version 1, all integers in network byte order:

    header   u8 version (1) | u8 flags | u8 layers | u8 reserved | u32 reserved
             flags: 0x01 protected (0: latched to cleartext, optional policy)
                    0x02 every layer confidential   0x04 UDP-encapsulated (NAT-T)
    layer    u8 proto (50 ESP, 51 AH) | u8 mode (0 transport, 1 tunnel, 4 beet: XFRM_MODE_*)
             | u8 confidential | u8 reserved | u16 cipher key bits (salt excluded)
             | u16 integrity tag bits | u32 outbound SPI | u32 inbound SPI | u32 reqid
             | char cipher[32] | char integrity[32]  (kernel algorithm names, NUL-padded)
    one layer per SA of the bundle, innermost first; 8 + 84 * layers bytes.
"""
from __future__ import annotations

import errno
import os
import struct

SOL_IPSEC = 0x49505343

IPSEC_LATCH_STATE = 1
IPSEC_POLICY = 2
IPSEC_PEER_ID = 3
IPSEC_LOCAL_ID = 4
IPSEC_PEER_KEY = 5
IPSEC_LATCH_CAUSE = 6
IPSEC_PROTECTION = 7
IPSEC_CHANNEL_BINDING = 8
IPSEC_REQUIRE_PEER_ID = 9

IPSEC_POLICY_BYPASS = 0
IPSEC_POLICY_REQUIRE = 1
IPSEC_POLICY_OPTIONAL = 2

IPSEC_LATCH_NONE = 0
IPSEC_LATCH_LISTENER = 1
IPSEC_LATCH_LATCHING = 2
IPSEC_LATCH_ESTABLISHED = 3
IPSEC_LATCH_BROKEN = 4
IPSEC_LATCH_CLOSED = 5

LATCH_STATES = {"LISTENER": IPSEC_LATCH_LISTENER, "LATCHING": IPSEC_LATCH_LATCHING,
                "ESTABLISHED": IPSEC_LATCH_ESTABLISHED, "BROKEN": IPSEC_LATCH_BROKEN,
                "CLOSED": IPSEC_LATCH_CLOSED}
POLICY_NAMES = {"bypass": IPSEC_POLICY_BYPASS, "require": IPSEC_POLICY_REQUIRE,
                "optional": IPSEC_POLICY_OPTIONAL}

INT_OPTIONS = (IPSEC_LATCH_STATE, IPSEC_POLICY)
BYTES_OPTIONS = (IPSEC_PEER_ID, IPSEC_LOCAL_ID, IPSEC_PEER_KEY, IPSEC_LATCH_CAUSE,
                 IPSEC_PROTECTION, IPSEC_CHANNEL_BINDING, IPSEC_REQUIRE_PEER_ID)
SETTABLE = (IPSEC_POLICY, IPSEC_REQUIRE_PEER_ID)

PROTECTION_VERSION = 1
_HEADER = struct.Struct("!BBBBI")
_LAYER = struct.Struct("!BBBBHHIII32s32s")
_PROTO = {"esp": 50, "ah": 51, "comp": 108}
_MODE = {"transport": 0, "tunnel": 1, "beet": 4}
F_PROTECTED, F_CONFIDENTIAL, F_ENCAP = 0x01, 0x02, 0x04


def oserror(code: int, what: str = "") -> OSError:
    msg = os.strerror(code) + (f": {what}" if what else "")
    return OSError(code, msg)


def _name(text: str | None) -> bytes:
    raw = (text or "").encode()
    if len(raw) > 31:
        raise ValueError(f"algorithm name longer than 31 bytes: {text!r}")
    return raw


def encode_protection(params) -> bytes:
    """IPSEC_PROTECTION for a latch's parameters (machine.LatchParams)."""
    layers = []
    for i, prot in enumerate(params.protection):
        out = params.out_sas[i] if i < len(params.out_sas) else None
        inn = next((s for s in params.in_sas if out is not None and s.reqid == out.reqid
                    and s.protection.proto == prot.proto), None)
        layers.append(_LAYER.pack(_PROTO[prot.proto], _MODE[prot.mode], int(prot.confidential),
                                  0, prot.cipher_bits, prot.icv_bits,
                                  out.key[3] if out else 0, inn.key[3] if inn else 0,
                                  params.reqids[i] if i < len(params.reqids) else 0,
                                  _name(prot.cipher), _name(prot.integrity)))
    flags = 0
    if params.protected:
        flags |= F_PROTECTED
        if all(p.confidential for p in params.protection):
            flags |= F_CONFIDENTIAL
        if any(p.encapsulated for p in params.protection):
            flags |= F_ENCAP
    return _HEADER.pack(PROTECTION_VERSION, flags, len(layers), 0, 0) + b"".join(layers)


def decode_protection(data: bytes) -> dict:
    """IPSEC_PROTECTION bytes back to a dict (for applications and tests)."""
    if len(data) < _HEADER.size:
        raise ValueError("IPSEC_PROTECTION: shorter than its header")
    version, flags, n, _, _ = _HEADER.unpack_from(data)
    if version != PROTECTION_VERSION:
        raise ValueError(f"IPSEC_PROTECTION: unknown version {version}")
    if len(data) != _HEADER.size + n * _LAYER.size:
        raise ValueError("IPSEC_PROTECTION: length does not match its layer count")
    modes = {v: k for k, v in _MODE.items()}
    protos = {v: k for k, v in _PROTO.items()}
    layers = []
    for i in range(n):
        (proto, mode, conf, _, cbits, icv, spi_out, spi_in, reqid, cipher,
         integ) = _LAYER.unpack_from(data, _HEADER.size + i * _LAYER.size)
        layers.append({"proto": protos.get(proto, proto), "mode": modes.get(mode, mode),
                       "confidential": bool(conf), "cipher_bits": cbits, "icv_bits": icv,
                       "spi_out": spi_out, "spi_in": spi_in, "reqid": reqid,
                       "cipher": cipher.rstrip(b"\0").decode(),
                       "integrity": integ.rstrip(b"\0").decode()})
    return {"version": version, "protected": bool(flags & F_PROTECTED),
            "confidential": bool(flags & F_CONFIDENTIAL),
            "encapsulated": bool(flags & F_ENCAP), "layers": layers}


def int_value(value) -> int:
    """An int option's value as setsockopt takes it: an int, or 4 bytes in host order."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) != 4:
            raise oserror(errno.EINVAL, "an int option takes 4 bytes")
        return struct.unpack("=i", bytes(value))[0]
    raise TypeError(f"a bytes-like object or int is required, not {type(value).__name__!r}")


def reply(value: int | bytes, buflen: int | None) -> int | bytes:
    """What getsockopt returns for a value, given the caller's buflen (the kernel's rules:
    no buflen asks for an int; a buffer too small for the value is EINVAL)."""
    if buflen is not None and not 0 < buflen <= 1024:
        raise OSError("getsockopt buflen out of range")
    if isinstance(value, int):
        if buflen is None:
            return value
        if buflen < 4:
            raise oserror(errno.EINVAL, "buffer shorter than an int")
        return struct.pack("=i", value)
    if buflen is None:
        raise oserror(errno.EINVAL, "this option is bytes: pass a buflen")
    if buflen < len(value):
        raise oserror(errno.EINVAL, f"needs a buffer of {len(value)} bytes")
    return value

"""Channel bindings (RFC 5056) for latched IPsec connections.

A latched connection is an IPsec channel: for its whole life it runs over SAs between the two
IKE peers it was latched to. Its end-point channel bindings name that channel so that an
authentication run over it (GSS-API, SASL) can check, at both ends, that it is the same
channel — which a man in the middle of a leap-of-faith (BTNS) IPsec connection cannot make
true, because he holds neither end's key.

Type "ipsec-endpoint", format version 1 (what get_channel_binding returns):

    b"ipsec-endpoint:" || 0x01 || SHA-256(
        b"ipsecchan ipsec-endpoint v1\\0"
        || u8 IP protocol (6 TCP, 17 UDP) || u8 IP version (4 or 6)
        || endpoint A || endpoint B )

    endpoint = address (4 or 16 bytes) || u16 port (network order)
               || SHA-256 of the DER SubjectPublicKeyInfo of the key that
                  authenticated that end in IKE (32 bytes)

The two endpoints are the connection's two (address, port) pairs, each with its own end's
key, in ascending order of (address bytes, port): both ends compute the same bytes without
knowing which end connected. Built from the public keys, not the ID strings (in BTNS anyone
can claim an ID; the keys are what IKE authenticated), and from the connection, so that two
connections between the same peers have different bindings.

Unavailable (None) when either end's key is unknown: pre-shared keys, manual keying, a peer
trusted through a CA whose key strongSwan does not show (only its ID is known), or a latch
to cleartext. There is no weaker fallback type: a binding that does not name both keys would
not catch the man in the middle, so none is offered.

Known limit: the addresses are each end's own view of the connection; across NAT they
differ, the bindings do not match, and authentication fails (closed, not open).
"""
from __future__ import annotations

import hashlib
import ipaddress
import socket
import struct

CB_ENDPOINT = "ipsec-endpoint"
CHANNEL_BINDING_TYPES = [CB_ENDPOINT]
VERSION = 1
PREFIX = CB_ENDPOINT.encode() + b":"
_LABEL = b"ipsecchan ipsec-endpoint v1\0"


def _endpoint(addr: str, port: int, key_sha256_hex: str) -> bytes:
    key = bytes.fromhex(key_sha256_hex)
    if len(key) != 32:
        raise ValueError(f"not a SHA-256 fingerprint: {key_sha256_hex!r}")
    return ipaddress.ip_address(addr).packed + struct.pack("!H", port) + key


def endpoint_binding(family: int, proto: int, local: tuple[str, int], peer: tuple[str, int],
                     local_key: str | None, peer_key: str | None) -> bytes | None:
    """The "ipsec-endpoint" binding of a connection, or None when a key is unknown.
    local/peer: (address, port) as this end sees them; keys: hex SHA-256 of each end's SPKI."""
    if not local_key or not peer_key:
        return None
    ends = sorted([_endpoint(*local, local_key), _endpoint(*peer, peer_key)],
                  key=lambda e: (e[:-34], e[-34:-32]))
    version = {socket.AF_INET: 4, socket.AF_INET6: 6}[family]
    digest = hashlib.sha256(_LABEL + bytes([proto, version]) + ends[0] + ends[1]).digest()
    return PREFIX + bytes([VERSION]) + digest

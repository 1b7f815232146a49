"""Quality of protection: what an SA gives a connection, and when one is at least another.

RFC 5660 latches a connection to its "type and quality of protection". Here that is the IPsec
protocol (ESP or AH), the mode, and the algorithms with their strength: whether the data is
kept confidential, the cipher's key bits (without the salt or nonce bits the kernel counts in
AEAD keys), and the integrity tag bits. A rekey may change algorithms; it keeps a latch only
if nothing gets weaker (or, with strict=True, only if nothing changes at all).
"""
from __future__ import annotations

from dataclasses import dataclass

from ipsecchan.xfrm.messages import SA

# Bits of an algorithm's kernel key that are salt/nonce, not key (RFC 4106, 4309, 4543,
# 7539 for AEAD; RFC 3686 for AES-CTR).
_SALT_BITS = {"rfc4106": 32, "rfc4543": 32, "rfc7539esp": 32, "rfc7539": 32, "rfc4309": 24,
              "rfc3686": 32}
# Algorithms that transform nothing: the kernel's "null" cipher, and RFC 4543 (GMAC: AEAD
# name, integrity only).
_NO_CONFIDENTIALITY = ("ecb(cipher_null)", "cipher_null")


def _salt(name: str) -> int:
    return _SALT_BITS.get(name.split("(", 1)[0], 0)


@dataclass(frozen=True, slots=True)
class Protection:
    """The protection of one SA, reduced to what latching compares."""
    proto: str                 # "esp" | "ah"
    mode: str                  # "transport" | "tunnel" | "beet"
    confidential: bool
    cipher: str | None         # kernel name of the cipher or AEAD, None for AH / ESP-null
    cipher_bits: int           # effective key bits (salt excluded)
    integrity: str | None      # kernel name of the integrity algorithm (the AEAD's own too)
    icv_bits: int              # integrity tag bits
    encapsulated: bool = False  # UDP-encapsulated (NAT-T): noted, not a strength

    @classmethod
    def of(cls, sa: SA) -> "Protection":
        cipher = integrity = None
        cipher_bits = icv_bits = 0
        confidential = False
        for alg in sa.algorithms:
            if alg.kind == "aead":
                integrity, icv_bits = alg.name, alg.icv_bits
                if not alg.name.startswith("rfc4543"):
                    cipher, cipher_bits = alg.name, max(0, alg.key_bits - _salt(alg.name))
                    confidential = True
            elif alg.kind == "crypt":
                if alg.name not in _NO_CONFIDENTIALITY:
                    cipher, cipher_bits = alg.name, max(0, alg.key_bits - _salt(alg.name))
                    confidential = True
            elif alg.kind == "auth_trunc":
                integrity, icv_bits = alg.name, alg.icv_bits
            elif alg.kind == "auth" and integrity is None:
                integrity, icv_bits = alg.name, 96   # RFC 2404 truncation, the kernel default
        return cls(sa.proto, sa.mode, confidential, cipher, cipher_bits, integrity, icv_bits,
                   sa.encap is not None)

    def at_least(self, other: "Protection", *, strict: bool = False) -> bool:
        """True when this protection is no weaker than `other` (the latched one): same
        protocol and mode, confidentiality kept, no fewer key bits, no shorter tag."""
        if strict:
            return self == other
        return (self.proto == other.proto and self.mode == other.mode
                and (self.confidential or not other.confidential)
                and self.cipher_bits >= other.cipher_bits
                and (self.integrity is not None or other.integrity is None)
                and self.icv_bits >= other.icv_bits)

    def describe(self) -> str:
        parts = [self.proto, self.mode]
        if self.cipher:
            parts.append(f"{self.cipher}/{self.cipher_bits}")
        if self.integrity and self.integrity != self.cipher:
            parts.append(f"{self.integrity}/{self.icv_bits}")
        elif self.integrity:
            parts.append(f"icv{self.icv_bits}")
        if self.encapsulated:
            parts.append("udp-encap")
        return " ".join(parts)

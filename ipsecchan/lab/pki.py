"""Credentials for lab hosts: Ed25519 keys, self-signed certificates with distinct DNs, raw
public keys and pre-shared keys, made with `cryptography` (nothing is read from disk)."""
from __future__ import annotations

import datetime
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

LAB_DOMAIN = "lab"


@dataclass(frozen=True)
class Identity:
    """One host's credentials. `dn` names it in certificate auth, `fqdn` with raw keys/PSK."""

    name: str
    key_pem: bytes       # PKCS#8 private key
    cert_pem: bytes      # self-signed X.509 certificate, subject CN=<name>, SAN <name>.lab
    pubkey_pem: bytes    # SubjectPublicKeyInfo of the same key (the "raw public key")

    @property
    def dn(self) -> str:
        return f"CN={self.name}"

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{LAB_DOMAIN}"

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    def public_key_der(self) -> bytes:
        return serialization.load_pem_public_key(self.pubkey_pem).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def make_identity(name: str, lifetime_days: int = 3650) -> Identity:
    key = ed25519.Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=lifetime_days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"{name}.{LAB_DOMAIN}")]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, None)   # Ed25519 signs without a separate hash
    )
    return Identity(
        name=name,
        key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        pubkey_pem=key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo),
    )


def make_psk(nbytes: int = 32) -> bytes:
    return secrets.token_bytes(nbytes)


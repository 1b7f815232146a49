"""ipsecchan: IPsec channels (RFC 5660 connection latching) for Linux."""

__version__ = "0.1.0"

"""Errors of the lab. Every message says what failed and, where it can, why."""


class LabError(Exception):
    """Something in the lab failed (bad input, a daemon that did not start, IKE that failed)."""


class LabUnavailable(LabError):
    """No kernel with real IPsec can be had on this machine (the reason says what is missing)."""

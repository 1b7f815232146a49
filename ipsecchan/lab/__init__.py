"""The ipsecchan lab: hosts with real IPsec and strongSwan on one machine.

Kernel.start() finds or boots a kernel with ESP (user-mode-linux when the running kernel has
none); Lab(kernel) makes hosts in it. See ipsecchan.lab.lab for the API.

Names are imported on first use: the guest's init imports ipsecchan.lab.guest, and under
user-mode-linux every module it does not need (cryptography above all) costs boot time.
"""
import importlib

_EXPORTS = {
    "LabError": "errors", "LabUnavailable": "errors",
    "EspProbe": "kernel", "Kernel": "kernel", "probe_esp": "kernel",
    "Host": "lab", "IkeLink": "lab", "Lab": "lab", "Process": "lab", "Result": "lab",
    "StaticLink": "lab",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ipsecchan.lab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ipsecchan.lab.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value

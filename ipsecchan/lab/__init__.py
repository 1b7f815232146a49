"""The ipsecchan lab: hosts with real IPsec and strongSwan on one machine.

Kernel.start() finds or boots a kernel with ESP (user-mode-linux when the running kernel has
none); Lab(kernel) makes hosts in it. See ipsecchan.lab.lab for the API.
"""
from ipsecchan.lab.errors import LabError, LabUnavailable
from ipsecchan.lab.kernel import EspProbe, Kernel, probe_esp
from ipsecchan.lab.lab import Host, IkeLink, Lab, Process, Result, StaticLink

__all__ = ["EspProbe", "Host", "IkeLink", "Kernel", "Lab", "LabError", "LabUnavailable",
           "Process", "Result", "StaticLink", "probe_esp"]

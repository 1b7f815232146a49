"""The kernel's IPsec state (SAD/SPD) over XFRM netlink."""
from ipsecchan.xfrm.messages import (Algorithm, Encap, Policy, SA, Selector, Template,
                                     XfrmDecodeError, decode_policy, decode_sa)
from ipsecchan.xfrm.netlink_xfrm import (XfrmError, clear_socket_policies, dump_policies,
                                         dump_sas, set_socket_policy, socket_policy_bytes)

__all__ = ["Algorithm", "Encap", "Policy", "SA", "Selector", "Template", "XfrmDecodeError",
           "XfrmError", "clear_socket_policies", "decode_policy", "decode_sa", "dump_policies",
           "dump_sas", "set_socket_policy", "socket_policy_bytes"]

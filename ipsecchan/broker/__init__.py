"""The broker (`ipsecchan daemon`): latching for processes without CAP_NET_ADMIN."""

"""strongSwan configuration for lab hosts: strongswan.conf and swanctl.conf as text.

Both files use strongSwan's settings syntax (nested `name { ... }` sections and
`key = value` lines), rendered from plain dicts by `settings_text`.
"""
from __future__ import annotations

import re
from typing import Any

CHARON = "/usr/lib/ipsec/charon"
SWANCTL = "swanctl"

# Explicit plugin list: Debian's own strongswan.conf loads every plugin, `resolve` among
# them, which rewrites /etc/resolv.conf (under user-mode-linux: the host's file). Not
# loaded either: updown (runs scripts), stroke (fixed paths under /var/run and /etc).
# kdf is needed since 5.9.8 for prf+ once plugins are listed explicitly.
CHARON_PLUGINS = ("random nonce openssl pem pkcs1 pkcs8 x509 pubkey constraints sha1 sha2 "
                  "hmac kdf aes gcm kernel-netlink socket-default vici")
SWANCTL_PLUGINS = "random pem pkcs1 pkcs8 x509 pubkey openssl"

IKE_PROPOSALS = "aes256gcm16-prfsha256-x25519"
ESP_PROPOSALS = "aes256gcm16"

_BARE = re.compile(r"^[A-Za-z0-9_.:/@,+*%-]+$")


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v)
    text = str(v)
    if _BARE.match(text):
        return text
    if '"' in text or "\n" in text or "\\" in text:
        raise ValueError(f"cannot write {text!r} as a strongSwan setting value")
    return f'"{text}"'


def settings_text(tree: dict[str, Any], indent: int = 0) -> str:
    """Render a nested dict in strongSwan's settings syntax."""
    pad = "    " * indent
    out = []
    for key, val in tree.items():
        if not _BARE.match(str(key)) or "," in str(key):
            raise ValueError(f"bad strongSwan setting name {key!r}")
        if isinstance(val, dict):
            out.append(f"{pad}{key} {{\n{settings_text(val, indent + 1)}{pad}}}\n")
        elif val is not None:
            out.append(f"{pad}{key} = {_value(val)}\n")
    return "".join(out)


def strongswan_conf(vici_socket: str, log_file: str, plugins: str = CHARON_PLUGINS) -> str:
    return settings_text({
        "charon": {
            "load": plugins,
            "install_routes": False,      # transport mode needs no routing table 220
            "install_virtual_ip": False,
            "port": 500,
            "port_nat_t": 4500,
            "plugins": {"vici": {"socket": f"unix://{vici_socket}"}},
            # Logs go to the host's tmpfs folder; the guest has no syslog.
            "filelog": {"lab": {"path": log_file, "time_format": "%H:%M:%S", "ike_name": True,
                                "append": False, "flush_line": True, "default": 1, "ike": 1,
                                "cfg": 1, "knl": 1}},
            "syslog": {"daemon": {"default": -1}},
        },
        "swanctl": {"load": SWANCTL_PLUGINS},
    })


def auth_section(auth: str, ident: str, cred_file: str | None) -> dict[str, Any]:
    """One end's `local`/`remote` section. auth: cert, rpk (raw public key) or psk."""
    if auth == "cert":
        return {"auth": "pubkey", "id": ident, "certs": cred_file}
    if auth == "rpk":
        return {"auth": "pubkey", "id": ident, "pubkeys": cred_file}
    if auth == "psk":
        return {"auth": "psk", "id": ident}
    raise ValueError(f"unknown auth {auth!r}: cert, rpk or psk")


def connection(local_addr: str, remote_addr: str, local: dict, remote: dict, child: str,
               child_options: dict[str, Any] | None = None,
               ike_options: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "version": 2,
        "local_addrs": local_addr,
        "remote_addrs": remote_addr,
        "proposals": IKE_PROPOSALS,
        "rekey_time": "4h",
        "dpd_delay": 0,
        "mobike": False,     # veth link changes would otherwise float IKE to port 4500
        **(ike_options or {}),
        "local": local,
        "remote": remote,
        "children": {child: {"mode": "transport", "esp_proposals": ESP_PROPOSALS,
                             "start_action": "none", "rekey_time": "1h",
                             **(child_options or {})}},
    }

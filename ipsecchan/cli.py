"""Command line: `ipsecchan lab ...`, `ipsecchan ss`, `ipsecchan watch`."""
from __future__ import annotations

import argparse
import sys


def _lab(opts: argparse.Namespace) -> int:
    from ipsecchan.lab.errors import LabError
    from ipsecchan.lab.kernel import probe_esp

    if opts.lab_cmd == "probe":
        probe = probe_esp()
        print(probe.reason)
        return 0 if probe.available else 1
    from ipsecchan.lab import demo
    try:
        return demo.run(opts.kernel, opts.auth, opts.family)
    except LabError as exc:
        print(f"ipsecchan lab: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ipsecchan", description="IPsec channels for Linux")
    sub = ap.add_subparsers(dest="cmd", required=True)
    lab = sub.add_parser("lab", help="hosts with real IPsec and strongSwan on this machine")
    lab_sub = lab.add_subparsers(dest="lab_cmd", required=True)
    lab_sub.add_parser("probe", help="can this kernel carry ESP? (exit 0 if so)")
    demo = lab_sub.add_parser("demo", help="alice and bob: IKEv2 with certificates, TCP "
                                           "over ESP, identities and SA counters")
    demo.add_argument("--kernel", choices=("auto", "uml", "direct"), default="auto",
                      help="auto: this kernel if it has ESP, else user-mode-linux")
    demo.add_argument("--auth", choices=("cert", "rpk", "psk"), default="cert")
    demo.add_argument("--family", type=int, choices=(4, 6), default=4)
    lab.set_defaults(func=_lab)
    from ipsecchan import ss, watch
    ss.add_parser(sub)
    watch.add_parser(sub)
    daemon = sub.add_parser("daemon", help="the broker: latching for processes without "
                                           "CAP_NET_ADMIN")
    from ipsecchan.broker import server
    server.add_arguments(daemon)
    daemon.set_defaults(func=server.run)
    opts = ap.parse_args(argv)
    return opts.func(opts)


if __name__ == "__main__":
    sys.exit(main())

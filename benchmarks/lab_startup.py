"""Time from nothing to two lab hosts with IKE established (JSON on stdout).

    python benchmarks/lab_startup.py [--runs N] [--kernel auto|uml|direct]

Each run starts a lab kernel (user-mode-linux when this kernel has no ESP), makes hosts
alice and bob, starts their charons and brings up an IKEv2 CHILD_SA with certificates; then
tears everything down (not counted). Reports the median and each run's phases.
"""
import argparse
import json
import statistics
import time

from ipsecchan.lab import Kernel, Lab


def one_run(mode: str) -> dict:
    t0 = time.perf_counter()
    kernel = Kernel.start(mode)
    t_kernel = time.perf_counter()
    try:
        with Lab(kernel) as lab:
            lab.add_host("alice")
            lab.add_host("bob")
            t_hosts = time.perf_counter()
            lab.start_charon("alice", "bob")
            t_charon = time.perf_counter()
            lab.ike("alice", "bob", auth="cert")
            t_ike = time.perf_counter()
            kind = kernel.kind
    finally:
        kernel.close()
    t_down = time.perf_counter()
    return {"total_s": t_ike - t0, "kernel_s": t_kernel - t0, "hosts_s": t_hosts - t_kernel,
            "charon_s": t_charon - t_hosts, "ike_s": t_ike - t_charon,
            "teardown_s": t_down - t_ike, "kernel": kind}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kernel", default="auto", choices=("auto", "uml", "direct"))
    opts = ap.parse_args()
    runs = [one_run(opts.kernel) for _ in range(opts.runs)]
    phases = [k for k in runs[0] if k.endswith("_s")]
    print(json.dumps({
        "benchmark": "lab_startup",
        "what": "nothing -> two hosts with an IKEv2 CHILD_SA (certificates)",
        "kernel": runs[0]["kernel"],
        "runs": opts.runs,
        "median": {k: round(statistics.median(r[k] for r in runs), 3) for k in phases},
        "target_total_s": 5.0,
        "each": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                 for r in runs],
    }, indent=2))


if __name__ == "__main__":
    main()

"""Ask the autoscaler for GPU workers and wait until the cluster has them.

A cluster started by `ray up cluster.yaml` (or cluster/fake_multinode.yaml) begins with the
CPU-only head and no workers; GPU workers appear only when something asks for GPUs.
orchestrator.sweep decides at start whether trials get GPUs from the GPUs the cluster has at that
moment (none: it runs the trials on CPUs), so start one GPU worker first:

    python cluster/wait_for_gpus.py --address auto --gpus 1
    python -m orchestrator.sweep --address auto ...

The request (ray.autoscaler.sdk.request_resources) is withdrawn once the GPUs are there, so the
workers are then kept only while trials use them (idle_timeout_minutes). Exit code 0 when the
GPUs joined, 1 on timeout, 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python cluster/wait_for_gpus.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default="auto", help="the cluster's GCS address (default: auto, on the head)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the cluster must have")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait (cloud launches take minutes)")
    args = p.parse_args(argv)
    if args.gpus < 1:
        print("wait_for_gpus: error: --gpus must be at least 1", file=sys.stderr)
        return 2

    import ray
    from ray.autoscaler.sdk import request_resources

    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    try:
        have = ray.cluster_resources().get("GPU", 0)
        if have >= args.gpus:
            print(f"the cluster has {have:g} GPUs")
            return 0
        request_resources(bundles=[{"GPU": 1}] * args.gpus)
        deadline = time.monotonic() + args.timeout
        while True:
            have = ray.cluster_resources().get("GPU", 0)
            if have >= args.gpus:
                print(f"the cluster has {have:g} GPUs")
                return 0
            if time.monotonic() > deadline:
                print(f"wait_for_gpus: error: only {have:g} of {args.gpus} GPUs after {args.timeout:g} s "
                      f"(see `ray status` and the autoscaler log: /tmp/ray/session_latest/logs/monitor.*)",
                      file=sys.stderr)
                return 1
            time.sleep(2)
    finally:
        request_resources(bundles=[])     # withdraw: idle workers may go again
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())

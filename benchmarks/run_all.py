"""Run every benchmark in turn (`make bench`): training, aggregation, transport, simulator scale, Flower.

Each runs as its own process (`python -m benchmarks.bench_x`), so one failing benchmark does not stop the rest;
`--quick` is passed through (smoke run, < 1 min each once bundles are cached). Results: benchmarks/results/*.json.
Exit status: the number of benchmarks that failed.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from benchmarks.common import ROOT, machine, wait_for_quiet

BENCHES = ("bench_training", "bench_aggregation", "bench_transport", "bench_simulator", "bench_flower")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset")
    p.add_argument("--wait-quiet", type=float, default=600.0,
                   help="wait up to S s for a quiet machine before each benchmark (0: do not wait)")
    args = p.parse_args()
    m = machine()
    print(f"machine: {m['cpu_model']}, {m['nproc']} cores, {m['ram_gib']} GiB, load {m['loadavg'][0]:.2f}")
    failed = []
    for name in [b for b in args.only.split(",") if b]:
        if args.wait_quiet:
            wait_for_quiet(args.wait_quiet)
        print(f"\n=== {name} ===", flush=True)
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *(["--quick"] if args.quick else [])]
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        print(f"=== {name}: {'ok' if rc == 0 else f'FAILED (rc {rc})'} in {time.monotonic() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark 4: simulator scale - wall time per round and memory for fleets of 100 ... 10,000 registered devices.

Each configuration runs in its own child process through the simulator's API (`simulator.run.simulate`, the
code behind `fedatt simulate`) against a real Mosquitto started by the child (tests/mosquitto.py, loopback,
`max_connections -1`) with RLIMIT_NOFILE raised: every registered device is a real EdgeClient with its own MQTT
connection, state dir, privacy ledger and outbox, driven by the simulator's selector loop; training runs on the
simulator's 2-process pool (ORT), so idle devices hold no ORT session. Data: the three_clients generator with
enough samples, re-partitioned IID into N devices of ~8 examples (zoo MLP, 1,474 parameters); fedatt,
1 local epoch, batch 32, z = 0.1.

Measured: setup (dataset + export + N clients connected + round 1 announced: the time until round 1's wall
clock starts), wall time per round (announcement of a round to its close, from the round records, and the
simulator's own wall-clock per round), peak RSS of the whole process tree (simulator process + training
workers + Mosquitto, sampled every 0.2 s) and of the simulator process alone (VmHWM).

Run: python -m benchmarks.bench_simulator [--quick] [--configs 100:10,1000:100,10000:100] [--rounds 3]
"""
from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (base_parser, peak_rss_mib, run_child, table, wait_for_quiet, write_result,
                               TreeMemorySampler)

PER_DEVICE = 8


def raise_nofile(want: int) -> tuple[int, int]:
    """Raise the fd limit (root may raise the hard limit too, up to fs.nr_open); returns the new limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    except OSError:
        nr_open = hard
    target = max(soft, want)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, nr_open), max(hard, min(target, nr_open))))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def child(n: int, cohort: int, rounds: int, workers: int) -> dict[str, Any]:
    import logging

    logging.basicConfig(level=logging.ERROR)
    limits = raise_nofile(4 * n + 1024)
    from simulator.fleet import DatasetSpec
    from simulator.run import SimConfig, simulate
    from tests.mosquitto import Mosquitto

    class Cfg(SimConfig):
        def dataset_spec(self) -> DatasetSpec:  # three_clients, enough samples for n devices, IID
            per_client = max(100, math.ceil(n * PER_DEVICE / 3))
            return DatasetSpec(name="three_clients", seed=self.seed, num_clients=n, partition="iid",
                               options=(("samples_per_client", per_client),))

    out: dict[str, Any] = {"devices": n, "cohort": cohort, "rounds": rounds, "nofile": list(limits)}
    with tempfile.TemporaryDirectory(prefix="fedatt-bench-sim-") as tmp, \
            TreeMemorySampler(os.getpid()) as tree:
        broker = Mosquitto(Path(tmp) / "mq", extra_config="allow_anonymous true\nmax_connections -1\n"
                           "max_queued_messages 1000\nmax_inflight_messages 20\n", persistence=False).start()
        try:
            cfg = Cfg(dataset="three_clients", devices=n, rounds=rounds, cohort=cohort, quorum=cohort,
                      round_timeout=120.0, strategies=("fedatt",), noise_multiplier=0.1, broker_url=broker.url,
                      workers=workers, out=Path(tmp) / "run", progress=False, seed=0)
            t0 = time.monotonic()
            res = simulate(cfg)
            wall = time.monotonic() - t0
            doc = json.loads((Path(tmp) / "run" / "fedatt" / "metrics.json").read_text())
            broker_peak = peak_rss_mib(broker.proc.pid)
        finally:
            broker.stop()
    extras = doc["round_extras"]
    walls = [e["wall_s"] for e in extras]
    per_round_wall = [b - a for a, b in zip(walls, walls[1:])]
    round_times = [r["round_time_s"] for r in doc["rounds"]]
    out.update({
        "total_wall_s": wall, "strategy_wall_s": doc["wall_s"], "setup_s": wall - doc["wall_s"] + walls[0] - round_times[0],
        "round_time_s": round_times, "round_time_median_s": statistics.median(round_times),
        "wall_between_closes_s": per_round_wall,
        "participants": [r["participants"] for r in doc["rounds"]],
        "accuracy": [r["accuracy"] for r in doc["rounds"]],
        "jobs": doc["jobs"], "sim_process_peak_rss_mib": peak_rss_mib(), "tree_peak_rss_mib": tree.peak_mib,
        "tree_peak_procs": tree.peak_procs, "broker_peak_rss_mib": broker_peak,
        "torch_in_sim_process": "torch" in sys.modules,
    })
    return out


def _child_main(argv: list[str]) -> None:
    print(json.dumps(child(int(argv[0]), int(argv[1]), int(argv[2]), int(argv[3]))))


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--configs", default=None, help="N:COHORT,... (default 100:10,100:100,1000:100,10000:100)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per configuration (default 3, quick 2)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800, help="per configuration, seconds")
    args = p.parse_args()
    configs = args.configs or ("100:10" if args.quick else "100:10,100:100,1000:100,10000:100")
    rounds = args.rounds or (2 if args.quick else 3)
    quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet else wait_for_quiet(0, quiet=True)
    results, failures = [], []
    for item in configs.split(","):
        n, c = (int(x) for x in item.split(":"))
        t0 = time.monotonic()
        try:
            r = run_child(["-c", "import sys; from benchmarks.bench_simulator import _child_main; "
                           "_child_main(sys.argv[1:])", str(n), str(c), str(rounds), str(args.workers)],
                          timeout=args.timeout)
        except Exception as exc:  # record what blocks a scale and go on
            failures.append({"devices": n, "cohort": c, "error": str(exc)[-1500:], "after_s": time.monotonic() - t0})
            print(f"  N={n} cohort={c}: FAILED after {time.monotonic() - t0:.0f} s: {str(exc)[-400:]}", flush=True)
            continue
        results.append(r)
        print(f"  N={n} cohort={c}: setup {r['setup_s']:.1f} s, round median {r['round_time_median_s']:.2f} s, "
              f"tree peak {r['tree_peak_rss_mib']:.0f} MiB", flush=True)
    print()
    print(table(["registered", "cohort", "rounds", "setup s", "round time s (median)", "round times s",
                 "sim proc peak MiB", "tree peak MiB", "Mosquitto peak MiB", "participants"],
                [[r["devices"], r["cohort"], r["rounds"], r["setup_s"], r["round_time_median_s"],
                  " ".join(f"{x:.2f}" for x in r["round_time_s"]), r["sim_process_peak_rss_mib"],
                  r["tree_peak_rss_mib"], r["broker_peak_rss_mib"], " ".join(map(str, r["participants"]))]
                 for r in results]))
    for f in failures:
        print(f"\nFAILED N={f['devices']} cohort={f['cohort']}: {f['error'][-600:]}")
    largest = max((r["devices"] for r in results), default=0)
    target_met = any(r["devices"] >= 10_000 and r["cohort"] >= 100 for r in results)
    print(f"\nlargest fleet that ran: {largest:,} registered devices; target 10,000 with 100-device cohorts: "
          f"{'met' if target_met else 'NOT met'}")
    path = write_result("bench_simulator", {"results": results, "failures": failures, "quiet": quiet,
                                            "largest_fleet": largest, "target_10000x100_met": target_met},
                        quick=args.quick)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

"""`fedatt simulate`: run a fleet of virtual devices (real EdgeClients) against a real broker and aggregator.

Registered by the `fedatt` dispatcher (edge_sdk/cli.py). Nothing heavy is imported at module import time
(torch, amqtt, matplotlib load only when the command runs), so `fedatt --help` stays fast and torch-free.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

STRATEGIES = ("fedatt", "fedatt-noise-aware", "fedavg", "median", "trimmed_mean")
DATASETS = ("three_clients", "heart", "shakespeare", "fashion_mnist")


def _round_count(text: str) -> tuple[int, int]:
    try:
        r, c = text.split(":")
        rnd, count = int(r), int(c)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROUND:COUNT, got {text!r}") from None
    if rnd < 0 or count < 1:
        raise argparse.ArgumentTypeError(f"ROUND must be >= 0 and COUNT >= 1, got {text!r}")
    return rnd, count


def _prob(text: str) -> float:
    v = float(text)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text}")
    return v


def _strategies(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in STRATEGIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown strategy {bad}: choose from {', '.join(STRATEGIES)}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    """All `fedatt simulate` options (also used by `python -m simulator.demo --help`-style wrappers)."""
    d = p.add_argument_group("data and fleet")
    d.add_argument("--dataset", choices=DATASETS, default="three_clients", help="offline dataset (docs/DATASETS.md)")
    d.add_argument("--devices", type=int, default=None, metavar="N",
                   help="number of virtual devices (natural split: keep the first N clients; dirichlet/iid: "
                        "split into N; default: the dataset's own count, fashion_mnist 10)")
    d.add_argument("--partition", choices=("natural", "dirichlet", "iid"), default=None,
                   help="how data is split over devices (default: natural; fashion_mnist: dirichlet)")
    d.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller = more skewed)")
    d.add_argument("--max-samples-per-client", type=int, default=None, metavar="K",
                   help="cap each device's training examples (seeded subset)")
    d.add_argument("--max-test-samples", type=int, default=None, metavar="K",
                   help="fashion_mnist: evaluate on a seeded subset of the 10k test images")
    r = p.add_argument_group("rounds and aggregation")
    r.add_argument("--rounds", type=int, default=5, metavar="R", help="rounds to run per strategy")
    r.add_argument("--cohort", type=int, default=None, metavar="K",
                   help="devices invited per round (default: every online device)")
    r.add_argument("--quorum", type=int, default=None, metavar="Q",
                   help="accepted updates needed to close a round (default: ceil(0.8 x cohort))")
    r.add_argument("--round-timeout", type=float, default=30.0, metavar="S",
                   help="seconds from announcement to deadline (each attempt)")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--strategy", choices=STRATEGIES, default="fedatt", help="aggregation rule (docs/STRATEGIES.md)")
    g.add_argument("--compare", type=_strategies, default=None, metavar="S1,S2,...",
                   help="run these strategies one after another on the same fleet, seeds and initial model")
    t = p.add_argument_group("local training and privacy")
    t.add_argument("--epochs", type=int, default=1, metavar="E", help="local epochs per round")
    t.add_argument("--batch-size", type=int, default=32, metavar="B", help="local batch size")
    t.add_argument("--lr", type=float, default=None, help="local learning rate (default: the bundle's, AdamW 1e-3)")
    t.add_argument("--clip-norm", type=float, default=1.0, metavar="C", help="L2 clip of each device's update")
    t.add_argument("--noise-multiplier", type=float, default=0.1, metavar="z",
                   help="device-side Gaussian noise std = z x C (must be > 0: the ledger refuses z = 0)")
    t.add_argument("--epsilon-budget", type=float, default=1e12, metavar="EPS",
                   help="per-device ε budget; a device whose next release would exceed it stops taking part "
                        "(default: effectively unlimited)")
    t.add_argument("--delta", type=float, default=1e-5, help="δ of the per-device (ε, δ) accounting")
    t.add_argument("--encoding", choices=("f32", "int8"), default="f32", help="update encoding on the wire")
    h = p.add_argument_group("heterogeneity and faults (seeded per device and round)")
    h.add_argument("--dropout", type=_prob, default=0.0, metavar="p",
                   help="probability per round that a device is ineligible and skips it")
    h.add_argument("--speed-spread", type=float, default=0.0, metavar="s",
                   help="slowest device waits s seconds after training before publishing (device d: s x u_d, "
                        "u_d uniform in [0, 1))")
    h.add_argument("--late-prob", type=_prob, default=0.0, metavar="p",
                   help="probability per round that a device's uplink stalls after it published, so its "
                        "update reaches the aggregator after the deadline (counted late)")
    h.add_argument("--late-delay", type=float, default=1.0, metavar="S",
                   help="a late update is delivered S seconds after the round's deadline")
    h.add_argument("--eligible-fraction", type=float, default=1.0, metavar="F",
                   help="eligibility window: each device is eligible in a contiguous F share of every "
                        "--window-period rounds (per-device phase)")
    h.add_argument("--window-period", type=int, default=10, metavar="R", help="period of the eligibility window")
    h.add_argument("--join-at", type=_round_count, action="append", default=[], metavar="ROUND:COUNT",
                   help="COUNT devices (the last ones) start offline and connect after ROUND closes; repeatable")
    h.add_argument("--leave-at", type=_round_count, action="append", default=[], metavar="ROUND:COUNT",
                   help="COUNT online devices (seeded choice) disconnect after ROUND closes; repeatable")
    h.add_argument("--broker-restart-at", type=int, action="append", default=[], metavar="ROUND",
                   help="restart the embedded broker after ROUND closes (retained messages are lost; the "
                        "aggregator re-publishes them); repeatable")
    h.add_argument("--byzantine", default=None, metavar="FRACTION:KIND[:SCALE]",
                   help="a seeded FRACTION of devices replace their local training result before the SDK's clip "
                        "and noise: KIND flip (-Δ) or random (Gaussian direction), given norm SCALE x clip norm "
                        "(default 1; SCALE > 1 = a modified SDK that skips the clip)")
    o = p.add_argument_group("run")
    o.add_argument("--broker", default=None, metavar="URL",
                   help="mqtt://host:port of an external broker, e.g. Mosquitto (default: embedded amqtt on 127.0.0.1)")
    o.add_argument("--seed", type=int, default=0, help="seed of partitions, model init, cohorts, shuffles, noise, faults")
    o.add_argument("--workers", type=int, default=2, metavar="W", help="training worker processes")
    o.add_argument("--out", type=Path, default=None, metavar="DIR", help="run directory (default: runs/<dataset>)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> Any:
    from simulator.run import SimConfig

    return SimConfig(
        dataset=args.dataset, devices=args.devices, partition=args.partition, alpha=args.alpha,
        max_samples_per_client=args.max_samples_per_client, max_test_samples=args.max_test_samples,
        rounds=args.rounds, cohort=args.cohort, quorum=args.quorum, round_timeout=args.round_timeout,
        strategies=args.compare or (args.strategy,), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        clip_norm=args.clip_norm, noise_multiplier=args.noise_multiplier, epsilon_budget=args.epsilon_budget,
        delta=args.delta, encoding=args.encoding, broker_url=args.broker, seed=args.seed, workers=args.workers,
        dropout=args.dropout, speed_spread=args.speed_spread, late_prob=args.late_prob, late_delay=args.late_delay,
        eligible_fraction=args.eligible_fraction, window_period=args.window_period,
        join_at=tuple(args.join_at), leave_at=tuple(args.leave_at), broker_restart_at=tuple(args.broker_restart_at),
        byzantine=args.byzantine,
        out=args.out or Path("runs") / args.dataset, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    from simulator.run import SimulationError, print_summary, simulate

    try:
        cfg = config_from_args(args)
        if cfg.broker_restart_at and cfg.broker_url is not None:
            raise SimulationError("--broker-restart-at works with the embedded broker only")
        result = simulate(cfg)
    except SimulationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_summary(result)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("simulate", help="simulate a fleet of devices (real EdgeClients, broker and aggregator)",
                       description="Run N virtual devices - each the real EdgeClient with its own identity, data "
                                   "partition and privacy ledger - against a real MQTT broker and the real "
                                   "aggregator; write metrics, plots and a report. See docs/SIMULATOR.md.")
    add_arguments(p)
    p.set_defaults(func=run)

"""`fedatt aggregate` (run the aggregator beside an MQTT broker) and `fedatt add-device` (device credentials)."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("aggregate", help="run the aggregator for one fleet next to an MQTT broker",
                       description="Run federated rounds for one fleet: announce round tasks, validate and aggregate "
                       "device updates, checkpoint after every round, publish the retained global model. "
                       "Safe to kill at any moment: a restart resumes from the last checkpoint in --state.")
    conn = p.add_argument_group("broker connection")
    conn.add_argument("--broker", required=True, metavar="URL", help="mqtt://host[:port] or mqtts://host[:port]")
    conn.add_argument("--username", help="MQTT username (deploy/: fedatt-aggregator)")
    conn.add_argument("--password-file", type=Path, help="file whose first line is the MQTT password")
    conn.add_argument("--ca", help="CA certificate for mqtts:// (default: system trust store)")
    conn.add_argument("--cert", help="client certificate (mutual TLS)")
    conn.add_argument("--key", help="client private key (mutual TLS)")
    conn.add_argument("--tls-insecure", action="store_true", help="skip the TLS hostname check (test rigs only)")
    p.add_argument("--bundle", required=True, type=Path, help="bundle directory made by `fedatt export`")
    p.add_argument("--state", required=True, type=Path, help="state directory (checkpoints); created if missing")
    p.add_argument("--fleet", default="fleet-1", help="fleet id: the topic tree fedatt/<fleet>/... (default fleet-1)")
    agg = p.add_argument_group("aggregation")
    agg.add_argument("--strategy", default="fedatt-noise-aware",
                     choices=["fedatt", "fedatt-noise-aware", "fedavg", "median", "trimmed_mean"],
                     help="aggregation rule, see docs/STRATEGIES.md (default fedatt-noise-aware)")
    agg.add_argument("--strategy-param", action="append", default=[], metavar="KEY=VALUE",
                     help="strategy parameter, value parsed as JSON (e.g. eps=1.0, beta=0.1); repeatable")
    rnd = p.add_argument_group("rounds")
    rnd.add_argument("--quorum", type=int, default=2, help="accepted updates needed to close a round (default 2)")
    rnd.add_argument("--over-selection", type=float, default=1.5,
                     help="cohort = ceil(quorum × this), to absorb dropouts (default 1.5)")
    rnd.add_argument("--min-online", type=int, help="devices online before a round starts (default: quorum)")
    rnd.add_argument("--round-timeout", type=float, default=120.0, help="seconds until a round's deadline (default 120)")
    rnd.add_argument("--max-attempts", type=int, help="re-announcements before a round is abandoned (default: never)")
    rnd.add_argument("--max-rounds", type=int,
                     help="stop after this many more rounds, announcing none beyond them (default: run until stopped)")
    tr = p.add_argument_group("local training (announced to devices)")
    tr.add_argument("--epochs", type=int, default=1, help="local epochs per round (default 1)")
    tr.add_argument("--batch-size", type=int, default=32, help="local batch size (default 32)")
    tr.add_argument("--lr", type=float, help="local learning rate (default: the bundle's)")
    pv = p.add_argument_group("privacy (announced to devices; each device enforces its own budget)")
    pv.add_argument("--clip-norm", type=float, default=1.0, help="L2 clipping bound C of an update (default 1.0)")
    pv.add_argument("--noise-multiplier", type=float, default=1.0, help="Gaussian noise std = z·C (default z=1.0)")
    pv.add_argument("--adjacency", choices=["add_remove", "replace_one"], default="add_remove",
                    help="neighbouring relation devices account for (default add_remove)")
    pv.add_argument("--delta", type=float, default=1e-5, help="δ of the (ε, δ) guarantee (default 1e-5)")
    p.add_argument("--encodings", default="f32,int8", help="update encodings accepted (default f32,int8)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on 127.0.0.1:PORT")
    p.add_argument("--log-format", choices=["text", "json"], default="text", help="log lines as text or JSON")
    p.set_defaults(func=run_aggregate)

    a = sub.add_parser("add-device", help="create MQTT credentials for a device (Mosquitto password file)",
                       description="Add DEVICE_ID to a Mosquitto password file with a fresh random password "
                       "(hashed by mosquitto_passwd). Send SIGHUP to mosquitto afterwards to reload it.")
    a.add_argument("device_id", metavar="DEVICE_ID")
    a.add_argument("--passwd-file", required=True, type=Path, help="Mosquitto password_file (created if missing)")
    a.add_argument("--credentials-dir", type=Path,
                   help="also write DIR/DEVICE_ID.password (mode 0600) for provisioning; else print the password")
    a.set_defaults(func=run_add_device)


def _strategy_params(items: list[str]) -> dict:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --strategy-param needs KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def run_aggregate(args: argparse.Namespace) -> int:
    from edge_sdk._ort import block_torch

    block_torch()  # before anything imports onnxruntime (Bundle.initial_parameters): saves ~230 MiB of torch
    from broker.rounds import ConfigError, EngineConfig
    from broker.service import AggregatorService, JsonLogFormatter, MqttSettings
    from broker.state import CheckpointError
    from edge_sdk import wire
    from edge_sdk.bundle import Bundle, BundleError
    from edge_sdk.connection import read_secret

    if args.log_format == "json":
        for h in logging.getLogger().handlers:
            h.setFormatter(JsonLogFormatter())
    logging.getLogger("fedatt").setLevel(logging.INFO)
    try:
        bundle = Bundle.load(args.bundle)
    except BundleError as exc:
        print(f"error: bundle {args.bundle}: {exc}", file=sys.stderr)
        return 2
    try:
        config = EngineConfig(
            fleet=args.fleet, model_id=bundle.model_id, strategy=args.strategy,
            strategy_params=_strategy_params(args.strategy_param), quorum=args.quorum,
            over_selection=args.over_selection, min_online=args.min_online, round_timeout_s=args.round_timeout,
            max_attempts=args.max_attempts,
            train=wire.TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr),
            privacy=wire.PrivacySettings(clip_norm=args.clip_norm, noise_multiplier=args.noise_multiplier,
                                         adjacency=args.adjacency, delta=args.delta),
            encodings=tuple(e.strip() for e in args.encodings.split(",") if e.strip()))
        password = read_secret(args.password_file) if args.password_file else None
        service = AggregatorService(
            config, bundle, args.state,
            MqttSettings(url=args.broker, username=args.username, password=password, ca_file=args.ca,
                         cert_file=args.cert, key_file=args.key, tls_insecure=args.tls_insecure),
            metrics_port=args.metrics_port, max_rounds=args.max_rounds)
    except (ConfigError, CheckpointError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"aggregating fleet {args.fleet!r} with {args.strategy} on {args.broker}; model {bundle.model_id[:19]}…; "
          f"{'resuming after round ' + str(service.resumed_from) if service.resumed_from is not None else 'fresh start'}",
          flush=True)
    try:
        service.start()
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    try:
        while not stop.is_set():
            if service.wait(timeout=0.5):
                break
    except CheckpointError as exc:
        print(f"fatal: {exc}; the previous checkpoint is intact, restart to resume", file=sys.stderr)
        return 4
    finally:
        service.stop()
    print(f"stopped after round {service.model_round}", flush=True)
    return 0


def run_add_device(args: argparse.Namespace) -> int:
    from broker.credentials import CredentialError, add_device

    try:
        password = add_device(args.passwd_file, args.device_id, credentials_dir=args.credentials_dir)
    except CredentialError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.credentials_dir:
        print(f"added {args.device_id}; password in {args.credentials_dir / (args.device_id + '.password')}")
    else:
        print(f"added {args.device_id}; password: {password}")
    print("reload mosquitto to apply: kill -HUP $(pidof mosquitto)")
    return 0

"""Device-side subcommands of `fedatt`: `fedatt inspect BUNDLE` and `fedatt device` (run one real device).

Torch-free; imports only edge_sdk.bundle (json/hashlib/numpy) at import time; `fedatt device` loads the
client (paho, ORT) when it runs.
"""
from __future__ import annotations

import argparse
import json
import sys

from edge_sdk.bundle import Bundle, BundleError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a bundle's manifest and verify its content hash",
                       description="Print a bundle's manifest (parameters, inputs, loss, optimizer, checks) and "
                                   "verify every file digest and the model_id. Exit status 1 if verification fails.")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON instead of tables")
    p.set_defaults(func=inspect_command)
    _register_device(sub)


def _shape(shape: list) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def format_manifest(m: dict) -> str:
    """A human-readable rendering of a manifest."""
    lines = [f"model      {m.get('name')}",
             f"model_id   {m.get('model_id')}",
             f"versions   " + ", ".join(f"{k} {v}" for k, v in sorted(m.get("versions", {}).items())),
             f"opset      {m.get('opset')} (IR version {m.get('ir_version')})"]
    for key in ("inputs", "labels", "outputs"):
        for t in m.get(key, []):
            lines.append(f"{key[:-1]:<10} {t['name']} {_shape(t['shape'])} {t['dtype']}")
    loss = m.get("loss", {})
    lines.append(f"loss       {loss.get('name')} on `{loss.get('logits_output')}` (reduction {loss.get('reduction')}, "
                 f"class axis {loss.get('class_axis')})")
    opt = m.get("optimizer", {})
    hyper = ", ".join(f"{k}={v}" for k, v in sorted(opt.get("hyperparameters", {}).items()))
    lines.append(f"optimizer  {opt.get('name')} lr={opt.get('lr')} ({opt.get('ort_op')}: {hyper})")
    bn = m.get("batchnorm", {})
    if bn.get("layers"):
        lines.append(f"batchnorm  {', '.join(bn['layers'])}: {bn.get('note')}")
    params = m.get("parameters", [])
    lines.append("")
    lines.append(f"parameters ({m.get('num_trainable', 0):,} trainable of {m.get('num_parameters', 0):,}):")
    width = max([len(p["name"]) for p in params] + [4])
    lines.append(f"  {'name':<{width}}  {'shape':<16} {'dtype':<8} {'offset':>9} {'size':>9}  kind")
    for p in params:
        offset = "frozen" if p["offset"] is None else str(p["offset"])
        lines.append(f"  {p['name']:<{width}}  {_shape(p['shape']):<16} {p['dtype']:<8} {offset:>9} "
                     f"{p['size']:>9}  {p.get('kind', 'parameter')}")
    lines.append("")
    lines.append("files:")
    for role, f in sorted(m.get("files", {}).items()):
        lines.append(f"  {role:<16} {f['path']:<22} {f['bytes']:>10,} B  sha256:{f['sha256'][:16]}…")
    checks = m.get("checks", {})
    if checks:
        lines.append("")
        lines.append("export checks:")
        for key in ("eval_forward", "inference_forward", "gradient", "training"):
            if key in checks:
                lines.append(f"  {key:<18} " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                          for k, v in checks[key].items()))
    return "\n".join(lines)


def inspect_command(args: argparse.Namespace) -> int:
    try:
        bundle = Bundle.load(args.bundle)
        failure = None
    except BundleError as exc:
        failure = exc
        try:  # still show what the (untrusted) manifest claims, then fail
            bundle = Bundle.load(args.bundle, verify=False)
        except BundleError:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(bundle.manifest, indent=2, sort_keys=True) if args.json else format_manifest(bundle.manifest))
    if failure is not None:
        print(f"\nVERIFICATION FAILED ({failure.reason}): {failure.detail}", file=sys.stderr)
        return 1
    print("\nverified: all file digests and the model_id match")
    return 0


# ------------------------------------------------------------------------------------------ fedatt device
def _register_device(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "device", help="run one device: follow rounds, train locally, publish privatised updates",
        description="Run one real device until Ctrl-C: follow the fleet's retained round task and global model, "
                    "train on local data with ONNX Runtime, clip + noise the update (local DP), track the privacy "
                    "budget in STATE_DIR and publish with MQTT QoS 1. Logs one line per round.")
    p.add_argument("--bundle", required=True, metavar="DIR", help="bundle directory (from `fedatt export`)")
    p.add_argument("--data", required=True, metavar="FILE.npz", help="local data: arrays `x` and `y` (no pickle)")
    p.add_argument("--broker", required=True, metavar="URL", help="mqtt://host[:port] or mqtts://host[:port]")
    p.add_argument("--device-id", required=True, help="device id (also the MQTT client id and username)")
    p.add_argument("--fleet", required=True, help="fleet id")
    p.add_argument("--state-dir", required=True, metavar="DIR", help="privacy ledger and outbox (keep it!)")
    p.add_argument("--username", help="MQTT username (default: the device id when a password is given)")
    p.add_argument("--password-file", metavar="FILE", help="file holding the MQTT password (first line)")
    p.add_argument("--ca", metavar="FILE", help="CA certificate(s) for mqtts:// (default: system trust store)")
    p.add_argument("--cert", metavar="FILE", help="client certificate for mutual TLS")
    p.add_argument("--key", metavar="FILE", help="client private key for mutual TLS")
    p.add_argument("--tls-insecure", action="store_true", help="skip TLS hostname checks (test rigs only)")
    p.add_argument("--epsilon-budget", type=float, default=8.0, help="privacy budget ε (default 8)")
    p.add_argument("--delta", type=float, default=1e-5, help="δ of the accounting (default 1e-5)")
    p.add_argument("--adjacency", choices=("add_remove", "replace_one"), default="add_remove")
    p.add_argument("--encoding", choices=("f32", "int8"), default="f32", help="preferred update encoding")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads for training")
    p.add_argument("--keep-retrying", action="store_true",
                   help="keep reconnecting when the broker refuses the credentials (default: exit with status 3)")
    p.set_defaults(func=device_command)


def load_npz(path: str) -> tuple:
    """x, y from an .npz file, never unpickling anything."""
    import numpy as np

    with np.load(path, allow_pickle=False) as f:
        missing = {"x", "y"} - set(f.files)
        if missing:
            raise ValueError(f"{path} must hold arrays x and y; missing {sorted(missing)} (has {f.files})")
        x, y = f["x"], f["y"]
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"{path}: x has {len(x)} rows and y {len(y)}; need the same, non-zero number")
    return x, y


def device_command(args: argparse.Namespace) -> int:
    import faulthandler
    import signal
    import threading

    from edge_sdk.client import EdgeClient
    from edge_sdk.config import ClientConfig, ConfigError
    from edge_sdk.connection import read_secret

    try:
        password = read_secret(args.password_file) if args.password_file else None
    except (OSError, ValueError) as exc:
        print(f"error: --password-file: {exc}", file=sys.stderr)
        return 2
    username = args.username or (args.device_id if password is not None else None)
    try:
        bundle = Bundle.load(args.bundle)
        data = load_npz(args.data)
        config = ClientConfig(
            device_id=args.device_id, fleet=args.fleet, broker=args.broker, state_dir=args.state_dir,
            username=username, password=password, ca_file=args.ca, cert_file=args.cert, key_file=args.key,
            tls_insecure=args.tls_insecure, threads=args.threads, epsilon_budget=args.epsilon_budget,
            delta=args.delta, adjacency=args.adjacency, encoding=args.encoding)
    except (BundleError, ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def show(r) -> None:
        eps = "n/a" if r.epsilon is None else f"{r.epsilon:.4g}/{config.epsilon_budget:g}"
        if r.status == "published":
            loss = "n/a" if r.train_loss is None else f"{r.train_loss:.4f}"
            print(f"round {r.round} (attempt {r.attempt}): published{' (resent)' if r.detail else ''} "
                  f"update {r.update_id} examples={r.num_examples} loss={loss} bytes={r.bytes} ε={eps}", flush=True)
        else:
            print(f"round {r.round} (attempt {r.attempt}): skipped ({r.reason}{': ' + r.detail if r.detail else ''}) "
                  f"ε={eps}", flush=True)

    stop = threading.Event()
    # Ctrl-C and SIGTERM (systemd, container runtimes) both end the loop below and stop the client cleanly. SIGINT
    # gets an explicit handler, like `fedatt aggregate`'s: a process started from a non-interactive shell's
    # background job inherits SIGINT as ignored, and Python then installs no KeyboardInterrupt for it; such a
    # device ignored Ctrl-C (seen in a fresh-clone test run started with `&`, thread stacks via SIGUSR1).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # `kill -USR1 <pid>` prints every thread's stack to stderr: how to see where a device that does not stop is
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        client = EdgeClient(config, bundle, data, on_round_result=show)
    except Exception as exc:  # ledger mismatch/corruption, state_dir in use, ...
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"device {config.device_id} in fleet {config.fleet}: model {bundle.model_id[:19]}…, "
          f"{len(data[0])} examples, ε spent {client.ledger.epsilon:.4g} of {config.epsilon_budget:g}; "
          f"connecting to {config.broker} (Ctrl-C to stop)", flush=True)
    client.start()
    refused = None
    try:
        while not stop.wait(0.5):
            # A wrong password does not fix itself: retrying forever would only hide the mistake in a log.
            if client.auth_refused and not args.keep_retrying:
                refused = client.auth_refused
                break
    finally:
        client.stop()
    if refused:
        print(f"error: the broker refused the credentials of {username or 'an anonymous client'}: {refused} "
              f"(check --device-id/--username and --password-file; --keep-retrying to wait for a fix)",
              file=sys.stderr)
        return 3
    print("stopped", flush=True)
    return 0

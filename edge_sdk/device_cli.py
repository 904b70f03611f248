"""Device-side subcommands of `fedatt`: `fedatt inspect BUNDLE` (the lead adds `fedatt device`).

Torch-free; imports only edge_sdk.bundle (json/hashlib/numpy).
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

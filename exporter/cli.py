"""`fedatt export`: export a PyTorch model factory to an ORT on-device training bundle.

Imports nothing heavy at import time (the `fedatt` dispatcher loads this on torch-free devices too);
torch and onnx are imported inside the command.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Callable

_EPILOG = """\
examples:
  fedatt export exporter.zoo:mlp --example-input 1x10 --loss cross_entropy --out bundles/mlp
  fedatt export exporter.zoo:char_transformer --example-input 1x32,int64 --loss cross_entropy --out bundles/chars
  fedatt export my_model.py:build --example-input 1x3x32x32 --loss cross_entropy --freeze 'features.*' --out b/

checks before success: ORT eval/inference forward == torch eval forward (max abs diff <= 1e-4 x max(1, max|out|)),
ORT gradients == torch's (deterministic models; <= 1e-3 x max|grad| + 1e-6), a few ORT steps lower the loss.
BatchNorm is exported with frozen running statistics (its weight/bias still train).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a PyTorch model to an on-device training bundle",
                       description=__doc__.splitlines()[0], epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("factory", metavar="MODULE:FACTORY",
                   help="a function returning the torch.nn.Module: an importable module (exporter.zoo:mlp) "
                        "or a path to a .py file (./model.py:build)")
    p.add_argument("--example-input", required=True, metavar="SHAPE[,DTYPE]",
                   help="example input, batch first: 1x10 or 16x32,int64 (dtype default float32); the batch "
                        "axis is exported symbolic, the other axes are fixed")
    p.add_argument("--loss", required=True, choices=("cross_entropy", "mse", "bce"),
                   help="loss on the model's single output: cross_entropy (labels int64, class axis last: "
                        "[B,C] or [B,T,V]), mse or bce (labels float, same shape as the output)")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"),
                   help="ORT optimizer (default adamw: ORT's AdamW uses eps 1e-6 and weight decay 0, recorded "
                        "in the manifest)")
    p.add_argument("--lr", type=float, default=1e-3, help="default learning rate stored in the manifest (1e-3)")
    p.add_argument("--freeze", nargs="+", default=[], metavar="PATTERN",
                   help="fnmatch patterns of parameter names to keep frozen, e.g. 'features.*' (frozen "
                        "parameters never change and are not part of updates)")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE", dest="factory_args",
                   help="keyword argument for the factory, VALUE parsed as JSON (e.g. --arg num_classes=5)")
    p.add_argument("--name", help="model name recorded in the manifest (default: the factory name)")
    p.add_argument("--out", required=True, metavar="DIR", help="bundle directory to create (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--check-steps", type=int, default=5, help="ORT training steps the loss check runs (5)")
    p.add_argument("--no-speed-rewrites", action="store_true",
                   help="export the graph as torch wrote it (no Dropout(0) removal, no Gather -> Split/Slice/OneHot "
                        "rewrites that avoid ORT's slow GatherGrad, no GELU rewrite that avoids its slow GeluGrad; "
                        "see docs/PERFORMANCE.md)")
    p.set_defaults(func=run)


def load_factory(spec: str) -> Callable[..., Any]:
    """`package.module:function` or `path/to/file.py:function` -> the function."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"{spec!r} is not MODULE:FACTORY (e.g. exporter.zoo:mlp or model.py:build)")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"model file {path} does not exist")
        name = "fedatt_user_model_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # e.g. dataclasses in the user's file look their module up
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{target} has no callable {attr!r}")
    return factory


def _factory_kwargs(pairs: list[str]) -> dict[str, Any]:
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--arg {pair!r} is not KEY=VALUE")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value  # a bare string
    return kwargs


def run(args: argparse.Namespace) -> int:
    from exporter.checks import ExportCheckError
    from exporter.export import export_bundle, parse_input_spec
    from exporter.ops import UnsupportedModelError

    try:
        example = parse_input_spec(args.example_input)
        factory = load_factory(args.factory)
        model = factory(**_factory_kwargs(args.factory_args))
        bundle = export_bundle(model, example, args.out, loss=args.loss, optimizer=args.optimizer, lr=args.lr,
                               freeze=args.freeze, name=args.name or args.factory.rpartition(":")[2],
                               overwrite=args.overwrite, check_steps=args.check_steps,
                               speed_rewrites=not args.no_speed_rewrites)
    except (UnsupportedModelError, ExportCheckError, ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("no bundle was written", file=sys.stderr)
        return 2
    m = bundle.manifest
    c = m["checks"]
    frozen = sum(p["size"] for p in m["parameters"] if not p["trainable"])
    print(f"bundle    {bundle.path}")
    print(f"model_id  {bundle.model_id}")
    print(f"params    {bundle.num_trainable:,} trainable, {frozen:,} frozen ({len(m['parameters'])} tensors)")
    print(f"forward   ORT vs torch max abs diff {c['eval_forward']['max_abs_diff']:.2e} "
          f"(tolerance {c['eval_forward']['tolerance']:.1e})")
    g = c["gradient"]
    print("gradient  " + (f"skipped: {g['skipped']}" if "skipped" in g else
                          f"ORT vs torch max abs diff {g['max_abs_diff']:.2e} (tolerance {g['tolerance']:.1e})"))
    t = c["training"]
    print(f"training  loss {t['loss_before']:.4f} -> {t['loss_after']:.4f} after {t['steps']} ORT steps")
    if m["batchnorm"]["layers"]:
        print(f"note      BatchNorm {', '.join(m['batchnorm']['layers'])}: {m['batchnorm']['note']}")
    return 0

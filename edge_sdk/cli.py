"""The `fedatt` command: one entry point, one subcommand per component.

The dispatcher lives in edge_sdk because edge_sdk is the one package every install has (the device install
has no torch). Each component registers its subcommands from a `cli` module that must not import heavy
dependencies at import time, so `fedatt --help` and `fedatt device` work on a torch-free device, and a
subcommand whose extra is missing says which extra to install.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

# (module, human name of the extra that provides its dependencies)
_COMPONENTS: tuple[tuple[str, str], ...] = (
    ("exporter.cli", "export"),
    ("edge_sdk.device_cli", "edge"),
    ("broker.cli", "broker"),
    ("simulator.cli", "sim"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedatt",
        description="Federated learning on edge devices with ONNX Runtime training, device-side "
        "differential privacy and MQTT. Run `fedatt COMMAND --help` for each command.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name, _extra in _COMPONENTS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a component not yet present in this install
            logging.getLogger(__name__).debug("skipping %s: %s", module_name, exc)
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fedatt inspect B | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error while flushing at exit
        return 0
    except ModuleNotFoundError as exc:
        extra = {"torch": "export", "onnx": "export", "matplotlib": "sim", "amqtt": "sim",
                 "prometheus_client": "broker", "tqdm": "sim"}.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"error: `fedatt {args.command}` needs {exc.name!r}: pip install 'fedatt[{extra}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Torch-free access to onnxruntime.training.api (the on-device training runtime).

`onnxruntime/training/__init__.py` imports torch-dependent modules (ortmodule, artifacts) although the
`api` subpackage needs only the C extension and numpy. We register a bare package module for
`onnxruntime.training` whose `__path__` points at the installed folder, then import `api` from it: the
package __init__ never runs, so a phone-like install without torch (and without onnx) can train.

`onnxruntime/__init__.py` itself (1.19.2) still tries `onnxruntime.training.ortmodule`, which imports torch (and
onnx) when they are installed: ~240 MiB more per process (VmHWM 286 -> 44 MiB for `training_api()` alone).
`block_torch()` makes torch unimportable in processes that never need it (training workers, the aggregator);
ORT then finds no ortmodule and works unchanged.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import types
from types import ModuleType
from typing import Any

_TRAINING = "onnxruntime.training"


class TorchBlocked(importlib.abc.MetaPathFinder):
    """A meta-path finder that makes `torch` unimportable (ModuleNotFoundError, as if it were not installed)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"{name} is blocked in this process (edge_sdk._ort.block_torch): it does not "
                                      "need torch, and importing it costs ~240 MiB", name=name)
        return None


def block_torch() -> bool:
    """Make torch unimportable in this process, before onnxruntime is imported; True if it is blocked now.

    A no-op returning False if torch is already imported (the process needs it, e.g. the simulator's main
    process that exported the model). Idempotent. Use it as a process-pool initializer or first thing in an
    entry point that never uses torch.
    """
    if "torch" in sys.modules:
        return False
    if not any(isinstance(f, TorchBlocked) for f in sys.meta_path):
        sys.meta_path.insert(0, TorchBlocked())
    return True


def training_api() -> ModuleType:
    """Return `onnxruntime.training.api` without importing torch."""
    api = sys.modules.get(_TRAINING + ".api")
    if api is not None:
        return api
    if _TRAINING not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("onnxruntime is not installed: pip install onnxruntime-training-cpu==1.19.2")
        folder = os.path.join(list(spec.submodule_search_locations)[0], "training")
        if not os.path.isdir(os.path.join(folder, "api")):
            raise ImportError(
                "the installed onnxruntime has no training API: install onnxruntime-training-cpu==1.19.2 "
                "(and not mainline onnxruntime, which shares the package folder and breaks it)")
        bare = types.ModuleType(_TRAINING)
        bare.__path__ = [folder]
        bare.__package__ = _TRAINING
        sys.modules[_TRAINING] = bare
    return importlib.import_module(_TRAINING + ".api")


def ort_value(array):
    """Wrap a numpy array as the C-level OrtValue that `Module.copy_buffer_to_parameters` takes."""
    import onnxruntime

    return onnxruntime.OrtValue.ortvalue_from_numpy(array)._ortvalue


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def session_options(threads: int | None = None, *, quiet: bool = True):
    """SessionOptions with `threads` intra-op threads (None: ORT's default) and one inter-op thread.

    On small CPUs ORT's thread pool can slow training down (shared/notes/ort-training.md), hence a
    setting. `quiet` raises the log threshold to errors: ORT warns about every unused constant.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    if quiet:
        options.log_severity_level = 3
    return options

"""Predictor: inference with the execution providers an app names (NPU/GPU), CPU as the fallback.

Training runs on CPU only; inference may run anywhere ORT has an execution provider. Requested providers
that this onnxruntime build does not offer are skipped with a warning, and CPUExecutionProvider is always
appended, so a model always runs; `.provider` says which one actually serves the session.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

from edge_sdk._ort import session_options
from edge_sdk.bundle import Bundle

log = logging.getLogger(__name__)
CPU = "CPUExecutionProvider"


class Predictor:
    """Run an inference model (a path, or a Bundle's inference_model) with the named providers."""

    def __init__(self, model: str | os.PathLike | Bundle, providers: Sequence[str] = (CPU,),
                 threads: int | None = None) -> None:
        import onnxruntime

        path = model.file("inference_model") if isinstance(model, Bundle) else model
        available = set(onnxruntime.get_available_providers())
        self.unavailable = [p for p in providers if p not in available]
        for p in self.unavailable:
            log.warning("execution provider %s is not available in this onnxruntime build (available: %s); "
                        "falling back", p, ", ".join(sorted(available)))
        chosen = [p for p in providers if p in available]
        if CPU not in chosen:
            chosen.append(CPU)
        self._session = onnxruntime.InferenceSession(os.fspath(path), session_options(threads), providers=chosen)
        self.providers = list(self._session.get_providers())
        self.input_name = self._session.get_inputs()[0].name
        self.output_names = [o.name for o in self._session.get_outputs()]
        self._input_type = self._session.get_inputs()[0].type  # e.g. "tensor(float)"

    @property
    def provider(self) -> str:
        """The execution provider that serves this session (the first one ORT accepted)."""
        return self.providers[0]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The model's first output (logits) for input batch `x`."""
        dtype = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
                 "tensor(double)": np.float64, "tensor(float16)": np.float16}.get(self._input_type)
        x = np.ascontiguousarray(x, dtype=dtype) if dtype is not None else np.ascontiguousarray(x)
        return self._session.run(self.output_names[:1], {self.input_name: x})[0]

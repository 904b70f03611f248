"""LocalTrainer: on-device training and evaluation of a bundle with ONNX Runtime (CPU), torch-free.

The trainer owns the current trainable flat vector (`get_parameters`/`set_parameters`, manifest order).
Every `train()` call starts from fresh optimizer state: it reloads the bundle's checkpoint, builds a new
ORT Module + Optimizer and copies the current parameters in. (A new Optimizer on the same checkpoint
state would keep the previous round's AdamW moments; federated rounds must not leak them.) `close()`
drops the ORT session so idle virtual devices hold no memory; the next call reopens it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from edge_sdk._ort import ort_value, session_options, training_api
from edge_sdk.bundle import Bundle

Batch = tuple[np.ndarray, np.ndarray]

# ORT session config entry: flush denormals to zero (FTZ/DAZ) in ORT's kernels. A Softmax over a causal
# mask evaluates exp(-inf - max) through MLAS's clamped exp, whose results are denormal floats that cost
# x86 cores ~100x per element: the zoo char_transformer's attention Softmax took 0.35-0.45 ms instead of
# 0.05 ms per call (docs/PERFORMANCE.md section 1). Values below 1.2e-38 become 0; nothing a training
# step can see. But ORT applies it to its pool threads *and to the calling thread*, once per process (the
# first ORT session created decides: onnxruntime/core/session/inference_session.cc, call_once), and that
# thread's numpy/math then flush subnormals too — global processor state, like -ffast-math (hypothesis
# refuses to run under it). So it is opt-in (`flush_denormals`): EdgeClient turns it on for training on
# threads/processes the SDK owns (ClientConfig.flush_denormals), never on a caller's thread by default.
DENORMAL_AS_ZERO = "session.set_denormal_as_zero"
# With threads > 1, ORT's pool threads busy-wait between kernels by default. On a small CPU shared with other
# work (a phone's app, the 2-core test machine) that stole the cores the step needed: zoo char_transformer at 2
# threads 41 ms/step spinning vs 17 ms not spinning, side by side under load (docs/PERFORMANCE.md section 1).
# No effect at one thread (no pool).
ALLOW_SPINNING = "session.intra_op.allow_spinning"


def training_session_options(threads: int | None = 1, *, flush_denormals: bool = False):
    """session_options(threads) plus no pool spinning (and flush-to-zero if asked), for ORT training sessions."""
    options = session_options(threads)
    if flush_denormals:
        options.add_session_config_entry(DENORMAL_AS_ZERO, "1")
    options.add_session_config_entry(ALLOW_SPINNING, "0")
    return options


@dataclass(frozen=True)
class TrainResult:
    num_examples: int
    steps: int
    mean_loss: float
    first_loss: float
    last_loss: float
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float | None  # None for mse (no notion of a correct prediction)
    num_examples: int
    scores: np.ndarray  # the model's logits, batch-concatenated, for recall/precision/AUC


class LocalTrainer:
    """Train/evaluate a bundle on CPU. `threads`: ORT intra-op threads (None = ORT default).

    `flush_denormals=True` is faster for masked attention but sets flush-to-zero on the calling thread for the
    rest of the process (see DENORMAL_AS_ZERO): use it only on a thread that does nothing else.
    """

    def __init__(self, bundle: Bundle, threads: int | None = 1, *, flush_denormals: bool = False) -> None:
        self.bundle = bundle
        self.threads = threads
        # validates threads early
        self._options = training_session_options(threads, flush_denormals=flush_denormals)
        self._params: np.ndarray | None = None  # loaded from the checkpoint on first use
        self._session: tuple[Any, Any, Any] | None = None  # (state, module, optimizer)
        self._session_params_current = False
        spec = bundle.inputs[0]
        self._x_dtype = np.dtype(spec.dtype)
        self._x_shape = tuple(spec.shape[1:])
        # token ids the exported graph accepts (exporter: embeddings trained as OneHot @ W select a zero row
        # for an id outside it where a Gather would have failed, so the range is checked here)
        bounds = bundle.manifest["inputs"][0].get("index_range")
        self._x_range = (int(bounds[0]), int(bounds[1])) if bounds else None
        label = bundle.labels[0]
        self._y_dtype = np.dtype(label.dtype)
        self._y_shape = tuple(label.shape[1:])
        self._loss = bundle.loss["name"]
        self.lr = float(bundle.manifest["optimizer"]["lr"])

    # --- parameters -----------------------------------------------------------------------------------
    def get_parameters(self) -> np.ndarray:
        """The current trainable flat vector (float32 copy, manifest order)."""
        return self._current().copy()

    def _current(self) -> np.ndarray:
        if self._params is None:  # lazily: a round usually calls set_parameters first
            self._params = self.bundle.initial_parameters()
        return self._params

    def set_parameters(self, flat: np.ndarray) -> None:
        flat = np.asarray(flat)
        if flat.shape != (self.bundle.num_trainable,):
            raise ValueError(f"parameter vector has shape {flat.shape}, expected ({self.bundle.num_trainable},)")
        if not np.all(np.isfinite(flat)):
            raise ValueError("parameter vector contains NaN or infinity")
        self._params = flat.astype(np.float32, copy=True)
        self._session_params_current = False

    # --- session --------------------------------------------------------------------------------------
    def _open(self, fresh: bool) -> tuple[Any, Any, Any]:
        if self._session is None or fresh:
            self.close()
            api = training_api()
            b = self.bundle
            state = api.CheckpointState.load_checkpoint(str(b.file("checkpoint")))
            module = api.Module(str(b.file("training_model")), state, str(b.file("eval_model")), device="cpu",
                                session_options=self._options)
            optimizer = api.Optimizer(str(b.file("optimizer_model")), module)
            self._session = (state, module, optimizer)
            self._session_params_current = False
        state, module, optimizer = self._session
        if not self._session_params_current:
            module.copy_buffer_to_parameters(ort_value(self._current()), trainable_only=True)
            self._session_params_current = True
        return self._session

    def close(self) -> None:
        """Drop the ORT session (parameters are kept in memory)."""
        self._session = None
        self._session_params_current = False

    # --- data -----------------------------------------------------------------------------------------
    def _check(self, x: np.ndarray, y: np.ndarray) -> Batch:
        x = np.ascontiguousarray(x, dtype=self._x_dtype)
        y = np.ascontiguousarray(y, dtype=self._y_dtype)
        if tuple(x.shape[1:]) != self._x_shape:
            raise ValueError(f"inputs have shape {x.shape}, the model expects (batch, {', '.join(map(str, self._x_shape))})")
        if tuple(y.shape[1:]) != self._y_shape or y.shape[0] != x.shape[0]:
            raise ValueError(f"labels have shape {y.shape}, expected ({x.shape[0]}"
                             + "".join(f", {d}" for d in self._y_shape) + ")")
        if x.shape[0] == 0:
            raise ValueError("empty batch")
        if self._x_range is not None and x.size and (x.min() < self._x_range[0] or x.max() > self._x_range[1]):
            raise ValueError(f"input ids must lie in [{self._x_range[0]}, {self._x_range[1]}] (the embedding's rows); "
                             f"got min {x.min()}, max {x.max()}")
        return x, y

    def _batches(self, data: Any, batch_size: int, rng: np.random.Generator | None) -> Iterable[Batch]:
        if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], np.ndarray):
            x, y = self._check(*data)
            order = rng.permutation(len(x)) if rng is not None else np.arange(len(x))
            for start in range(0, len(x), batch_size):
                idx = order[start:start + batch_size]
                yield x[idx], y[idx]
        else:
            for bx, by in data:
                yield self._check(bx, by)

    # --- training -------------------------------------------------------------------------------------
    def train(self, data: Any, *, epochs: int = 1, batch_size: int = 32, lr: float | None = None,
              seed: int | None = None) -> TrainResult:
        """Train `epochs` passes over `data` ((x, y) arrays, shuffled; or a re-iterable of (x, y) batches)."""
        if epochs < 1 or batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not isinstance(data, tuple) and iter(data) is data and epochs > 1:
            raise ValueError("an iterator of batches can be consumed once: pass a list for epochs > 1")
        lr = self.lr if lr is None else float(lr)
        if not (lr > 0 and np.isfinite(lr)):
            raise ValueError(f"learning rate must be positive, got {lr}")
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        _, module, optimizer = self._open(fresh=True)  # fresh optimizer state every call
        optimizer.set_learning_rate(lr)
        module.train()
        losses: list[float] = []
        examples = 0
        for _ in range(epochs):
            for x, y in self._batches(data, batch_size, rng):
                loss = float(module(x, y)[0])
                optimizer.step()
                module.lazy_reset_grad()
                if not np.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss} at step {len(losses) + 1}; lower the lr")
                losses.append(loss)
                examples += len(x)
        if not losses:
            raise ValueError("no training data")
        self._params = module.get_contiguous_parameters(trainable_only=True).numpy().copy()
        return TrainResult(num_examples=examples, steps=len(losses), mean_loss=float(np.mean(losses)),
                           first_loss=losses[0], last_loss=losses[-1], seconds=time.perf_counter() - start)

    def evaluate(self, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256) -> EvalResult:
        """Mean loss, accuracy (argmax over the class axis; logit > 0 for bce) and the logits."""
        x, y = self._check(x, y)
        _, module, _ = self._open(fresh=False)
        module.eval()
        total, correct, scores = 0.0, 0, []
        for start in range(0, len(x), batch_size):
            bx, by = x[start:start + batch_size], y[start:start + batch_size]
            loss, logits = module(bx, by)[:2]
            total += float(loss) * len(bx)  # losses are batch means: weight by batch size
            scores.append(np.asarray(logits))
            if self._loss == "cross_entropy":
                correct += int(np.sum(np.argmax(logits, axis=-1) == by))
            elif self._loss == "bce":
                correct += int(np.sum((logits > 0) == (by > 0.5)))
        n = len(x)
        per_example = int(np.prod(self._y_shape)) if self._y_shape else 1
        accuracy = None if self._loss == "mse" else correct / (n * per_example)
        return EvalResult(loss=total / n, accuracy=accuracy, num_examples=n, scores=np.concatenate(scores))

    def export_inference(self, path: str | os.PathLike) -> None:
        """Write an inference model (logits output) holding the current parameters."""
        _, module, _ = self._open(fresh=False)
        tmp = f"{os.fspath(path)}.tmp"
        module.export_model_for_inferencing(tmp, [self.bundle.logits_output])
        os.replace(tmp, path)  # atomic: a reader never sees a half-written model

    def __enter__(self) -> "LocalTrainer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Checks a freshly generated bundle must pass before the exporter reports success.

All checks run the real ORT artifacts (the same runtime path a device uses) against torch:
- forward: ORT eval model and inference model vs torch `model.eval()` on a random batch of a different
  batch size than the export example (exercises the symbolic batch axis).
  Tolerance: max |ort - torch| <= FORWARD_RTOL * max(1, max |torch|).
- gradient: after one ORT train step without optimizer step, every trainable parameter's gradient vs
  torch autograd on the same batch and loss. Tolerance: max |g_ort - g_torch| <= GRAD_RTOL * max |g_torch|
  + GRAD_ATOL. Only when the training graph is deterministic (no active dropout); otherwise skipped with
  the reason recorded.
- training: `steps` ORT AdamW/SGD steps on the batch must lower the (deterministic, eval-mode) loss.
- layout: ORT's flat trainable vector equals the manifest-order concatenation of the named parameters.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_sdk._ort import training_api
from edge_sdk.trainer import training_session_options  # never with flush_denormals: this is the caller's thread

FORWARD_RTOL = 1e-4
GRAD_RTOL = 1e-3
GRAD_ATOL = 1e-6


class ExportCheckError(RuntimeError):
    """The generated artifacts disagree with torch or do not train; the bundle is not written."""


def torch_loss(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """The torch equivalent of exporter.losses (mean reduction, class axis last)."""
    if loss == "cross_entropy":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    if loss == "mse":
        return F.mse_loss(logits, labels)
    return F.binary_cross_entropy_with_logits(logits, labels)


def random_batch(model: nn.Module, example: torch.Tensor, out_shape: tuple[int, ...], loss: str,
                 batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random inputs (token ids below the smallest Embedding size for integer inputs) and labels."""
    rng = np.random.default_rng(seed)
    shape = (batch, *example.shape[1:])
    if example.dtype.is_floating_point:
        x = rng.standard_normal(shape).astype(str(example.dtype).replace("torch.", ""))
    else:
        sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
        x = rng.integers(0, min(sizes) if sizes else 2, size=shape).astype(str(example.dtype).replace("torch.", ""))
    if loss == "cross_entropy":
        y = rng.integers(0, out_shape[-1], size=(batch, *out_shape[1:-1])).astype(np.int64)
    elif loss == "mse":
        y = rng.standard_normal((batch, *out_shape[1:])).astype(np.float32)
    else:
        y = rng.integers(0, 2, size=(batch, *out_shape[1:])).astype(np.float32)
    return x, y


def has_active_dropout(model: nn.Module) -> bool:
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        if isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
            return True
    return False


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def _check_forward(what: str, ort_out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    if ort_out.shape != ref.shape:
        raise ExportCheckError(f"{what}: output shape {ort_out.shape} != torch {ref.shape}")
    diff, scale = _max_diff(ort_out, ref), max(1.0, float(np.max(np.abs(ref))))
    tol = FORWARD_RTOL * scale
    if not diff <= tol:
        raise ExportCheckError(f"{what}: ORT output differs from torch by {diff:.3g} (tolerance {tol:.3g})")
    return {"max_abs_diff": diff, "tolerance": tol}


def run_checks(directory: Path, *, reference: nn.Module, trained: nn.Module, x: np.ndarray, y: np.ndarray,
               loss: str, lr: float, logits_name: str, trainable: list[str], steps: int) -> dict[str, Any]:
    """Run every check on the artifacts in `directory` (writes inference_model.onnx); return measurements."""
    api = training_api()
    import onnxruntime

    files = {k: str(directory / f) for k, f in (("train", "training_model.onnx"), ("eval", "eval_model.onnx"),
                                                ("opt", "optimizer_model.onnx"), ("ckpt", "checkpoint"))}
    report: dict[str, Any] = {"check_batch": int(x.shape[0]), "forward_rtol": FORWARD_RTOL}

    with torch.no_grad():
        reference.eval()
        ref_logits = reference(torch.from_numpy(x)).numpy()

    state = api.CheckpointState.load_checkpoint(files["ckpt"])
    module = api.Module(files["train"], state, files["eval"], device="cpu", session_options=training_session_options(None))
    # layout: ORT's flat vector must be the manifest-order concatenation (the order every update uses)
    flat = module.get_contiguous_parameters(trainable_only=True).numpy()
    mine = np.concatenate([np.asarray(state.parameters[n].data).reshape(-1) for n in trainable])
    if flat.shape != mine.shape or not np.array_equal(flat, mine):
        raise ExportCheckError("ORT's flat trainable vector is not in the manifest's parameter order")

    # forward, eval model
    module.eval()
    loss0, logits = module(x, y)
    report["eval_forward"] = _check_forward("eval model forward", logits, ref_logits)
    # forward, inference model (written into the bundle)
    inference_path = directory / "inference_model.onnx"
    module.export_model_for_inferencing(str(inference_path), [logits_name])
    session = onnxruntime.InferenceSession(str(inference_path), training_session_options(None),
                                           providers=["CPUExecutionProvider"])
    report["inference_forward"] = _check_forward("inference model forward", session.run(None, {session.get_inputs()[0].name: x})[0], ref_logits)

    # gradients (deterministic graphs only)
    if has_active_dropout(trained):
        report["gradient"] = {"skipped": "model has active dropout: ORT and torch draw different masks"}
    else:
        trained.train()
        trained.zero_grad(set_to_none=True)
        out = trained(torch.from_numpy(x))
        t_loss = torch_loss(out, torch.from_numpy(y), loss)
        t_loss.backward()
        module.train()
        o_loss, _ = module(x, y)
        params = dict(trained.named_parameters())
        worst, worst_name, gmax = 0.0, "", 0.0
        for name in trainable:
            g_ref = params[name].grad
            g_ref = np.zeros(params[name].shape, np.float32) if g_ref is None else g_ref.numpy()
            d = _max_diff(np.asarray(state.parameters[name].grad), g_ref)
            gmax = max(gmax, float(np.max(np.abs(g_ref))) if g_ref.size else 0.0)
            if d >= worst:
                worst, worst_name = d, name
        tol = GRAD_RTOL * gmax + GRAD_ATOL
        if not worst <= tol:
            raise ExportCheckError(f"ORT gradient of {worst_name} differs from torch by {worst:.3g} "
                                   f"(tolerance {tol:.3g})")
        t_loss_value = t_loss.item()
        if abs(float(o_loss) - t_loss_value) > FORWARD_RTOL * max(1.0, abs(t_loss_value)):
            raise ExportCheckError(f"ORT training loss {float(o_loss):.6g} != torch {t_loss_value:.6g}")
        report["gradient"] = {"max_abs_diff": worst, "tolerance": tol, "max_abs_grad": gmax,
                              "worst_parameter": worst_name}
        module.lazy_reset_grad()

    # training lowers the loss (measured in eval mode, so dropout noise cannot fake it)
    optimizer = api.Optimizer(files["opt"], module)
    optimizer.set_learning_rate(lr)
    module.train()
    for _ in range(steps):
        module(x, y)
        optimizer.step()
        module.lazy_reset_grad()
    module.eval()
    loss1, _ = module(x, y)
    before, after = float(loss0), float(loss1)
    if not (np.isfinite(after) and after < before):
        raise ExportCheckError(f"{steps} ORT training steps did not lower the loss ({before:.6g} -> {after:.6g}); "
                               f"check the learning rate ({lr}) and the loss")
    report["training"] = {"steps": steps, "lr": lr, "loss_before": before, "loss_after": after}
    del optimizer, module, state
    return report

"""export_bundle(): PyTorch module -> verified, atomically written ORT training bundle.

Pipeline (nothing touches the target until every check passed):
  reject unsupported layers -> freeze BatchNorm statistics -> TorchScript ONNX export in memory (opset 17,
  training mode, symbolic batch axis) -> reject unsupported ONNX ops -> patch optional outputs ->
  generate_artifacts into a temp dir next to the target -> clamp IR versions -> checks (exporter/checks.py)
  -> manifest with digests and model_id -> Bundle.load verification -> rename onto the target.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from edge_sdk.bundle import FORMAT, FORMAT_VERSION, Bundle, seal_manifest
from exporter import checks, graph, ops
from exporter.losses import LABELS, LOSSES, make_loss_block

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
INPUT, LOGITS, BATCH = "input", "logits", "batch"
DEFAULT_OPSET = 17
# Embedding tables with at most this many rows train through OneHot @ W instead of Gather (graph.py).
ONEHOT_MAX_ROWS = 256
_OPTIMIZER_OPS = {"adamw": "AdamWOptimizer", "sgd": "SGDOptimizerV2"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64,
           "int64": torch.int64, "int32": torch.int32}


def parse_input_spec(spec: str) -> tuple[tuple[int, ...], str]:
    """`1x10` -> ((1, 10), "float32"); `16x32,int64` -> ((16, 32), "int64")."""
    shape_text, _, dtype = spec.strip().partition(",")
    dtype = dtype.strip() or "float32"
    if not re.fullmatch(r"\d+(x\d+)*", shape_text.strip()):
        raise ValueError(f"example input shape {shape_text!r} is not like 1x10 or 16x32 (batch first)")
    if dtype not in _DTYPES:
        raise ValueError(f"example input dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    shape = tuple(int(d) for d in shape_text.strip().split("x"))
    if any(d <= 0 for d in shape):
        raise ValueError(f"example input shape {shape_text!r} has a zero dimension")
    return shape, dtype


def example_tensor(example: torch.Tensor | str | tuple) -> torch.Tensor:
    """A tensor from a tensor, a `1x10[,dtype]` string or a (shape, dtype) tuple."""
    if isinstance(example, torch.Tensor):
        return example.detach()
    if isinstance(example, str):
        shape, dtype = parse_input_spec(example)
    else:
        shape, dtype = tuple(example[0]), str(example[1])
    return torch.zeros(shape, dtype=_DTYPES[dtype])


def _versions() -> dict[str, str]:
    import importlib.metadata

    import onnx
    import onnxruntime

    try:
        fedatt = importlib.metadata.version("fedatt")
    except importlib.metadata.PackageNotFoundError:
        fedatt = "0+unknown"
    return {"fedatt": fedatt, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def _select_trainable(model: nn.Module, freeze: Sequence[str]) -> tuple[list[str], list[str]]:
    """(trainable, frozen) parameter names: frozen if requires_grad is False or a pattern matches."""
    names = [n for n, _ in model.named_parameters()]
    for pattern in freeze:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"--freeze pattern {pattern!r} matches no parameter; parameters are: "
                             + ", ".join(names[:20]) + (" …" if len(names) > 20 else ""))
    trainable, frozen = [], []
    for name, p in model.named_parameters():
        hit = any(fnmatch.fnmatchcase(name, pat) for pat in freeze)
        (frozen if hit or not p.requires_grad else trainable).append(name)
    if not trainable:
        raise ValueError("every parameter is frozen: nothing would train")
    return trainable, frozen


def _to_onnx(model: nn.Module, example: torch.Tensor, opset: int):
    """TorchScript export in training mode (dynamo renames/folds parameters: unusable for training)."""
    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and tracer chatter
        torch.onnx.export(model, (example,), buf, dynamo=False, training=torch.onnx.TrainingMode.TRAINING,
                          do_constant_folding=False, opset_version=opset, export_params=True,
                          input_names=[INPUT], output_names=[LOGITS],
                          dynamic_axes={INPUT: {0: BATCH}, LOGITS: {0: BATCH}})
    return onnx.load_from_string(buf.getvalue())


@contextlib.contextmanager
def _native_stderr_quiet() -> Iterator[None]:
    """Silence C++ writes to fd 2 (ORT's gradient builder logs every graph pass at INFO with a logger
    that ignores set_default_logger_severity); replay them if the block fails, so errors keep context."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace")[-20000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _hyperparameters(attrs: dict[str, object]) -> dict[str, object]:
    """ORT's optimizer-node attributes under torch-like names (ORT calls beta1/beta2 `alpha`/`beta`)."""
    names = {"alpha": "beta1", "beta": "beta2", "epsilon": "eps", "weight_decay": "weight_decay",
             "correct_bias": "bias_correction", "adam_mode": "adam_mode"}
    out: dict[str, object] = {}
    for key, value in attrs.items():
        if isinstance(value, float):
            value = float(f"{value:.7g}")  # float32 attribute -> the decimal it was written from
        out[names.get(key, key)] = value
    return out


def _speed_rewrites(proto, example: torch.Tensor, trainable: set[str]) -> dict[str, Any]:
    """Exact rewrites of the forward graph so ORT 1.19.2 generates faster training kernels (graph.py).

    Measured on the zoo char_transformer at one thread (docs/PERFORMANCE.md section 1): ORT differentiates
    Gather with GatherGrad, which takes a mutex per element; torch's MultiheadAttention (q/k/v = proj[i])
    and every nn.Embedding produce Gathers. Dropout(p=0) is removed. Exact GELU is kept out of ORT's Gelu
    fusion, whose gradient kernel does not vectorise erf. The export checks then compare the
    rewritten graph with torch (forward and gradients) like any other.
    """
    feed = example.numpy()
    feeds = [{INPUT: feed}, {INPUT: np.concatenate([feed, feed])}]  # two batch sizes: static axes only
    dropout = graph.remove_noop_dropout(proto)
    gathers = graph.split_constant_gathers(proto, feeds)
    onehot = graph.embeddings_as_onehot_matmul(proto, trainable, ONEHOT_MAX_ROWS)
    gelus = graph.gelu_as_erf_chain(proto)
    graph.remove_unused_constants(proto)
    rows = [e["rows"] for e in onehot if e["ids"] == INPUT]
    return {
        "enabled": True,
        "dropout_removed": len(dropout),
        "gathers_split": gathers,
        "gelu_unfused": gelus,
        "embeddings_onehot": sorted({e["table"] for e in onehot}),
        "onehot_max_rows": ONEHOT_MAX_ROWS,
        # ids outside this range selected a zero row instead of failing: devices check it (LocalTrainer)
        "input_index_range": [-min(rows), min(rows) - 1] if rows else None,
    }


def _install(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished bundle onto out_dir (rename; an old bundle is swapped out, then deleted)."""
    if out_dir.exists():
        if not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise FileExistsError(f"{out_dir} exists and is not empty (use overwrite=True / --overwrite)")
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        os.replace(out_dir, old / "b")
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            os.replace(old / "b", out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def export_bundle(model: nn.Module, example_input: torch.Tensor | str | tuple, out_dir: str | os.PathLike, *,
                  loss: str, optimizer: str = "adamw", lr: float = 1e-3, freeze: Sequence[str] = (),
                  name: str | None = None, opset: int = DEFAULT_OPSET, overwrite: bool = False,
                  check_steps: int = 5, check_batch: int = 8, seed: int = 0, speed_rewrites: bool = True) -> Bundle:
    """Export `model` to a verified bundle at `out_dir` and return it loaded.

    example_input: a tensor, "1x10[,dtype]" or ((1, 10), "float32"); axis 0 is the (symbolic) batch axis.
    loss: cross_entropy | mse | bce (on the model's single output, class axis last for cross_entropy).
    freeze: fnmatch patterns on parameter names (e.g. "features.*") kept frozen; they get offset null.
    speed_rewrites: exact graph rewrites that make ORT's training step faster (see _speed_rewrites); the
    checks below verify the rewritten graph against torch like any other.
    Raises UnsupportedModelError / ValueError before anything is written, ExportCheckError if the
    artifacts disagree with torch or do not train; on any failure no (partial) bundle is left behind.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss {loss!r} is not one of {', '.join(LOSSES)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if not (lr > 0 and np.isfinite(lr)):
        raise ValueError(f"learning rate must be a positive number, got {lr}")
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty (use overwrite=True / --overwrite)")
    example = example_tensor(example_input)

    ops.check_layers(model)  # guard 1: before any export work or file
    reference = copy.deepcopy(model)
    export_model, frozen_bn = ops.freeze_batchnorm(model)
    if frozen_bn:
        log.warning("BatchNorm layers %s are exported with frozen running statistics (affine weight/bias "
                    "still train)", ", ".join(frozen_bn))
    export_model.train()
    trainable, frozen = _select_trainable(export_model, freeze)
    with torch.no_grad():
        out = export_model.eval()(example)
    export_model.train()
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the model must return one tensor (logits); it returned {type(out).__name__}")
    out_shape = tuple(out.shape)

    proto = _to_onnx(export_model, example, opset)
    ops.check_graph(proto)  # guard 2: functional calls the module walk cannot see
    buffers = {n for n, _ in export_model.named_buffers()}
    initializers = {i.name: i for i in proto.graph.initializer}
    known = set(trainable) | set(frozen) | buffers
    ordered = [n for n in initializers if n in known]  # ORT's flat order = ONNX initializer order
    unused = sorted(set(trainable) - set(ordered))
    if unused:
        log.warning("parameters not used by forward(), left out of the bundle: %s", ", ".join(unused))
    trainable_set = set(trainable) & set(ordered)
    rewrites = _speed_rewrites(proto, example, trainable_set) if speed_rewrites else {"enabled": False}
    graph.add_optional_outputs(proto)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        import onnx
        import onnxruntime
        from onnxruntime.training import artifacts

        onnxruntime.set_default_logger_severity(3)
        with warnings.catch_warnings(), _native_stderr_quiet():
            warnings.simplefilter("ignore")
            artifacts.generate_artifacts(
                proto, requires_grad=[n for n in ordered if n in trainable_set],
                frozen_params=[n for n in ordered if n not in trainable_set],
                loss=make_loss_block(loss, len(out_shape)),
                optimizer={"adamw": artifacts.OptimType.AdamW, "sgd": artifacts.OptimType.SGD}[optimizer],
                artifact_directory=str(tmp), additional_output_names=[LOGITS])
        for f in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
            graph.clamp_ir_version(tmp / f)
        hyper = _hyperparameters(graph.node_attributes(onnx.load(str(tmp / "optimizer_model.onnx")),
                                                       _OPTIMIZER_OPS[optimizer]))

        x, y = checks.random_batch(reference, example, out_shape, loss, check_batch, seed)
        params_in_order = [n for n in ordered if n in trainable_set]
        report = checks.run_checks(tmp, reference=reference, trained=export_model, x=x, y=y, loss=loss, lr=lr,
                                   logits_name=LOGITS, trainable=params_in_order, steps=check_steps)
        ir = graph.clamp_ir_version(tmp / "inference_model.onnx")

        manifest = _manifest(name=name or type(model).__name__, export_model=export_model, ordered=ordered,
                             initializers=initializers, trainable_set=trainable_set, buffers=buffers,
                             example=example, out_shape=out_shape, loss=loss, optimizer=optimizer, lr=lr,
                             hyper=hyper, opset=opset, ir=ir, frozen_bn=frozen_bn, freeze=list(freeze),
                             unused=unused, report=report, rewrites=rewrites)
        seal_manifest(tmp, manifest)
        Bundle.load(tmp)  # the same verification a device runs
        _install(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle.load(out_dir)


def _manifest(*, name: str, export_model: nn.Module, ordered: list[str], initializers: dict, trainable_set: set,
              buffers: set, example: torch.Tensor, out_shape: tuple, loss: str, optimizer: str, lr: float,
              hyper: dict, opset: int, ir: int, frozen_bn: list[str], freeze: list[str], unused: list[str],
              report: dict, rewrites: dict) -> dict[str, Any]:
    import onnx

    params, offset = [], 0
    for n in ordered:
        init = initializers[n]
        shape = [int(d) for d in init.dims]
        size = int(np.prod(shape)) if shape else 1
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
        trainable = n in trainable_set
        params.append({"name": n, "shape": shape, "dtype": dtype, "trainable": trainable,
                       "offset": offset if trainable else None, "size": size,
                       "kind": "buffer" if n in buffers else "parameter"})
        offset += size if trainable else 0
    in_dtype = str(example.dtype).replace("torch.", "")
    label = ({"name": LABELS, "shape": [BATCH, *out_shape[1:-1]], "dtype": "int64"} if loss == "cross_entropy"
             else {"name": LABELS, "shape": [BATCH, *out_shape[1:]], "dtype": "float32"})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "versions": _versions(),
        "opset": opset,
        "ir_version": ir,
        "inputs": [{"name": INPUT, "shape": [BATCH, *example.shape[1:]], "dtype": in_dtype,
                    **({"index_range": rewrites["input_index_range"]} if rewrites.get("input_index_range") else {})}],
        "outputs": [{"name": LOGITS, "shape": [BATCH, *out_shape[1:]], "dtype": "float32"}],
        "labels": [label],
        "loss": {"name": loss, "logits_output": LOGITS, "labels": LABELS, "reduction": "mean",
                 "class_axis": -1 if loss == "cross_entropy" else None},
        # ORT training/eval models output [loss, logits] in this order
        "artifact_outputs": ["loss", LOGITS],
        "optimizer": {"name": optimizer, "lr": lr, "ort_op": _OPTIMIZER_OPS[optimizer], "hyperparameters": hyper},
        "parameters": params,
        "num_trainable": offset,
        "num_parameters": sum(p["size"] for p in params),
        "freeze_patterns": freeze,
        "batchnorm": {"policy": "frozen_statistics" if frozen_bn else "none", "layers": frozen_bn,
                      "note": ("BatchNorm normalises with the running statistics stored at export, in training "
                               "and evaluation; its weight/bias train unless frozen") if frozen_bn else ""},
        "unused_parameters": unused,
        "graph_rewrites": rewrites,
        "checks": report,
    }

"""ONNX graph surgery the ORT 1.19.2 training-artifact generator needs, and IR-version clamping.

Kept apart from export.py because each function fixes one measured ORT quirk (shared/notes/ort-training.md)
and can be tested on a bare ModelProto.
"""
from __future__ import annotations

import os

import onnx

# ORT 1.19.2 refuses models with IR version > 10 ("Unsupported model IR version").
MAX_IR_VERSION = 10


def add_optional_outputs(model: onnx.ModelProto) -> int:
    """Give LayerNormalization its Mean/InvStdDev outputs and Dropout its mask output; return nodes patched.

    The TorchScript exporter omits these optional outputs at opset >= 17, and ORT's gradient builder then
    fails (LayerNormalizationGrad and DropoutGrad consume them). Naming them fixes the gradient graph;
    gradients then equal torch's (measured ~1e-6).
    """
    patched = 0
    for node in model.graph.node:
        base = node.output[0]
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            node.output.extend([base + "_mean", base + "_inv_std_dev"])
            patched += 1
        elif node.op_type == "Dropout" and len(node.output) == 1:
            node.output.append(base + "_mask")
            patched += 1
    return patched


def clamp_ir_version(path: str | os.PathLike, max_ir: int = MAX_IR_VERSION) -> int:
    """Rewrite the model at `path` with ir_version <= max_ir; return the resulting version."""
    model = onnx.load(os.fspath(path))
    if model.ir_version > max_ir:
        model.ir_version = max_ir
        onnx.save(model, os.fspath(path))
    return model.ir_version


def node_attributes(model: onnx.ModelProto, op_type: str) -> dict[str, object]:
    """Attributes of the first node of `op_type` (e.g. the optimizer's hyperparameters), JSON-friendly."""
    for node in model.graph.node:
        if node.op_type == op_type:
            out: dict[str, object] = {}
            for attr in node.attribute:
                value = onnx.helper.get_attribute_value(attr)
                out[attr.name] = value.decode() if isinstance(value, bytes) else value
            return out
    return {}


def op_types(model: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in model.graph.node}

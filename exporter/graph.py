"""ONNX graph surgery the ORT 1.19.2 training-artifact generator needs, and IR-version clamping.

Kept apart from export.py because each function fixes one measured ORT quirk (shared/notes/ort-training.md)
and can be tested on a bare ModelProto.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

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


# ---------------------------------------------------------------------------------------------------
# Speed rewrites of the forward graph (before generate_artifacts). Each one is exact: it changes which ORT
# kernels run (and so which gradient kernels ORT generates), never the function the graph computes.
# Measured on the zoo char_transformer (docs/PERFORMANCE.md, section 1).

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16}


def constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Values of initializers and of Constant nodes' `value` outputs, by tensor name."""
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def _consumed(model: onnx.ModelProto) -> set[str]:
    names = {o.name for o in model.graph.output}
    for node in model.graph.node:
        names.update(node.input)
    return names


def _has_subgraphs(model: onnx.ModelProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for node in model.graph.node for a in node.attribute)


def _copied(node: onnx.NodeProto) -> onnx.NodeProto:
    # a copy, because clearing graph.node below would free the protos it holds
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _set_nodes(model: onnx.ModelProto, nodes: Iterable[onnx.NodeProto]) -> None:
    nodes = list(nodes)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _bypass(model: onnx.ModelProto, node: onnx.NodeProto) -> onnx.NodeProto | None:
    """Let consumers of node.output[0] read node.input[0]; an Identity keeps a graph-output name alive."""
    old, new = node.output[0], node.input[0]
    if any(o.name == old for o in model.graph.output):
        return helper.make_node("Identity", [new], [old], name=node.name)
    for other in model.graph.node:
        for i, name in enumerate(other.input):
            if name == old:
                other.input[i] = new
    return None


def remove_noop_dropout(model: onnx.ModelProto) -> list[str]:
    """Drop Dropout nodes whose ratio is the constant 0 (nn.Dropout(0), Transformer layers with dropout=0).

    With ratio 0 a Dropout is the identity in training and in inference; in the training graph ORT would
    still run it and its DropoutGrad (a mask multiply) every step. Nodes whose mask output is used are kept.
    Returns the names of the removed nodes.
    """
    if _has_subgraphs(model):
        return []  # consumers inside If/Loop bodies would need renaming too: leave such graphs alone
    values = constant_values(model)
    used = _consumed(model)
    kept, removed = [], []
    for node in model.graph.node:
        if node.op_type == "Dropout" and node.domain in ("", "ai.onnx"):
            ratio = values.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            mask_used = len(node.output) > 1 and node.output[1] and node.output[1] in used
            if ratio is not None and ratio.size == 1 and float(ratio.reshape(())) == 0.0 and not mask_used:
                replacement = _bypass(model, node)
                if replacement is not None:
                    kept.append(replacement)
                removed.append(node.name or node.output[0])
                continue
        kept.append(_copied(node))
    _set_nodes(model, kept)
    return removed


def remove_unused_constants(model: onnx.ModelProto) -> int:
    """Drop Constant nodes nobody reads (left behind by the rewrites above); return how many."""
    if _has_subgraphs(model):
        return 0  # names read inside If/Loop bodies are not in _consumed(): keep everything
    removed = 0
    while True:
        used = _consumed(model)
        keep = [n for n in model.graph.node
                if not (n.op_type == "Constant" and n.domain in ("", "ai.onnx") and not set(n.output) & used)]
        if len(keep) == len(model.graph.node):
            return removed
        removed += len(model.graph.node) - len(keep)
        _set_nodes(model, [_copied(n) for n in keep])


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is best effort; unknown types are left alone
        inferred = model
    types = {i.name: i.data_type for i in model.graph.initializer}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def probe_shapes(model: onnx.ModelProto, names: Iterable[str], feeds: Sequence[Mapping[str, np.ndarray]],
                 elem_types: Mapping[str, int]) -> list[dict[str, tuple[int, ...]]]:
    """Concrete shapes of intermediate tensors, one dict per feed (runs the forward graph in ORT on CPU).

    Returns [] if the graph cannot run as an inference session (the caller falls back to shape-free code).
    """
    import onnxruntime

    names = [n for n in dict.fromkeys(names) if n in elem_types]
    if not names:
        return []
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n, elem_types[n], None) for n in names if n not in present)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    # No flush-to-zero here (edge_sdk.trainer.DENORMAL_AS_ZERO): this runs on the exporting caller's thread.
    try:
        session = onnxruntime.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return [dict(zip(names, (tuple(a.shape) for a in session.run(names, dict(feed))))) for feed in feeds]
    except Exception:  # noqa: BLE001 - any failure: no shapes, the rewrite uses Slice
        return []


def split_constant_gathers(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]] = ()) -> int:
    """Rewrite Gather(x, constant scalar index) on float activations as Split/Slice + Squeeze.

    torch's MultiheadAttention exports `q, k, v = proj[0], proj[1], proj[2]` as three such Gathers. ORT
    1.19.2 differentiates every Gather with GatherGrad, a scatter-add that takes a mutex per element
    (~26 ns/element at one thread and far worse with two threads contending): in the zoo char_transformer
    these three nodes per layer were a third of the training step. When the Gathers of one tensor take
    indices 0..n-1 of an axis of static size n (checked by running the graph on `feeds`, which should
    differ in batch size), they become one Split (gradient: a Concat); otherwise each becomes Slice +
    Squeeze (gradient: SliceGrad). Returns the number of Gather nodes rewritten.
    """
    values = constant_values(model)
    initializers = {i.name for i in model.graph.initializer}
    types = _elem_types(model)
    groups: dict[tuple[str, int], list[tuple[int, onnx.NodeProto, int]]] = {}
    for position, node in enumerate(model.graph.node):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        data, index = node.input
        idx = values.get(index)
        if data in initializers or types.get(data) not in _FLOAT_TYPES or idx is None or idx.ndim != 0 \
                or idx.dtype.kind not in "iu":
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        groups.setdefault((data, axis), []).append((position, node, int(idx)))
    if not groups:
        return 0

    shapes = probe_shapes(model, [d for d, _ in groups], feeds, types) if feeds else []

    def static_dim(data: str, axis: int) -> int | None:
        dims = {s[data][axis] if -len(s[data]) <= axis < len(s[data]) else None for s in shapes if data in s}
        return dims.pop() if len(dims) == 1 and None not in dims and len(shapes) == len(feeds) else None

    replacement: dict[int, list[onnx.NodeProto]] = {}  # position of the group's first Gather -> new nodes
    dropped: set[int] = set()
    count = 0
    for (data, axis), members in groups.items():
        base = f"{data}_gather_rw_axis{axis}"
        new: list[onnx.NodeProto] = []
        axes = f"{base}_axes"
        new.append(helper.make_node("Constant", [], [axes], name=axes,
                                    value=numpy_helper.from_array(np.array([axis], np.int64))))
        dim = static_dim(data, axis)
        indices = [i for _, _, i in members]
        if dim is not None and sorted(i % dim for i in indices) == list(range(dim)):
            parts = [f"{base}_split{i}" for i in range(dim)]
            new.append(helper.make_node("Split", [data], parts, name=f"{base}_Split", axis=axis))
            for _, node, i in members:
                new.append(helper.make_node("Squeeze", [parts[i % dim], axes], [node.output[0]], name=node.name))
        else:
            for k, (_, node, i) in enumerate(members):
                starts, ends, sliced = f"{base}_{k}_starts", f"{base}_{k}_ends", f"{base}_{k}_slice"
                end = i + 1 if i != -1 else np.iinfo(np.int64).max
                new.append(helper.make_node("Constant", [], [starts], name=starts,
                                            value=numpy_helper.from_array(np.array([i], np.int64))))
                new.append(helper.make_node("Constant", [], [ends], name=ends,
                                            value=numpy_helper.from_array(np.array([end], np.int64))))
                new.append(helper.make_node("Slice", [data, starts, ends, axes], [sliced], name=f"{node.name}_slice"))
                new.append(helper.make_node("Squeeze", [sliced, axes], [node.output[0]], name=node.name))
        replacement[members[0][0]] = new
        dropped.update(position for position, _, _ in members)
        count += len(members)
    nodes: list[onnx.NodeProto] = []
    for position, node in enumerate(model.graph.node):
        if position in dropped:
            # all new nodes go where the group's first Gather was: `data` is already computed there, and
            # every Gather output is produced no later than before, so the order stays topological
            nodes.extend(replacement.pop(position, []))
            continue
        nodes.append(_copied(node))
    _set_nodes(model, nodes)
    return count


def embeddings_as_onehot_matmul(model: onnx.ModelProto, trainable: Iterable[str], max_rows: int) -> list[dict]:
    """Rewrite Gather(W, ids) of a trainable 2-D table W with at most `max_rows` rows as OneHot(ids) @ W.

    Forward values are identical (one product by 1, the others by 0). The gradient becomes a MatMul
    onehot^T @ dY instead of GatherGrad (a mutex per element, see split_constant_gathers); each row's
    gradient sums the same terms, possibly in another order (float rounding). The cost grows with the
    number of rows (measured break-even near 256 rows), hence `max_rows`.
    Only ids that are a graph input or a constant are rewritten: Gather fails on an id outside
    [-rows, rows) while OneHot would select a zero row, so the caller records the range for the graph
    input and the device checks it (edge_sdk LocalTrainer). Returns [{"table", "ids", "rows"}] per rewrite.
    """
    trainable = set(trainable)
    tables = {i.name: i for i in model.graph.initializer if i.name in trainable and len(i.dims) == 2
              and i.dims[0] <= max_rows and i.data_type in _FLOAT_TYPES}
    allowed_ids = {i.name for i in model.graph.input} | set(constant_values(model))
    nodes: list[onnx.NodeProto] = []
    rewritten: list[dict] = []
    for node in model.graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and len(node.input) == 2 \
                and node.input[0] in tables and axis == 0 and node.input[1] in allowed_ids:
            table = tables[node.input[0]]
            rows = int(table.dims[0])
            base = f"{node.output[0]}_onehot"
            depth, onoff = f"{base}_depth", f"{base}_values"
            dtype = onnx.helper.tensor_dtype_to_np_dtype(table.data_type)
            nodes.append(helper.make_node("Constant", [], [depth], name=depth,
                                          value=numpy_helper.from_array(np.array(rows, np.int64))))
            nodes.append(helper.make_node("Constant", [], [onoff], name=onoff,
                                          value=numpy_helper.from_array(np.array([0, 1], dtype))))
            nodes.append(helper.make_node("OneHot", [node.input[1], depth, onoff], [base], name=f"{node.name}_OneHot",
                                          axis=-1))
            nodes.append(helper.make_node("MatMul", [base, node.input[0]], [node.output[0]], name=node.name))
            rewritten.append({"table": node.input[0], "ids": node.input[1], "rows": rows})
            continue
        nodes.append(_copied(node))
    _set_nodes(model, nodes)
    return rewritten


def _scalar(values: Mapping[str, np.ndarray], name: str) -> float | None:
    v = values.get(name)
    return float(v.reshape(())) if v is not None and v.size == 1 and v.dtype.kind == "f" else None


def gelu_as_erf_chain(model: onnx.ModelProto) -> int:
    """Rewrite the exact GELU TorchScript emits below opset 20 so ORT does not fuse it into com.microsoft Gelu.

    TorchScript writes nn.GELU() as `Mul(Mul(x, Add(Erf(Div(x, √2)), 1)), 0.5)`; generate_artifacts fuses that
    into Gelu, whose gradient kernel GeluGrad (ORT 1.19.2, CPU) evaluates erf element by element without
    vectorising: 0.75 ms per call for the zoo char_transformer's 16×32×256 activations (5.7 ns/element, 14 % of
    its training step). Written as `Mul(x, Add(Mul(Erf(Mul(x, 1/√2)), 0.5), 0.5))` the pattern no longer
    matches ORT's GeluFusion, and the generated gradient is made of vectorised Mul/Exp/Neg/Add kernels
    (both bundles side by side in one process: 3–14 % less CPU per step in five A/B runs, docs/PERFORMANCE.md §1).
    The function is the same (each rewritten operation rounds differently by at most an ulp); the export
    checks then compare forward and gradients with torch as for any graph. Returns the number of GELUs rewritten.
    """
    if _has_subgraphs(model):
        return 0
    values = constant_values(model)
    outputs = {o.name for o in model.graph.output}
    # one list of the node objects for every pass below: the id()s that mark the pattern's nodes stay valid
    graph_nodes = list(model.graph.node)
    producer = {o: n for n in graph_nodes for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph_nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def only(name: str, op: str) -> onnx.NodeProto | None:
        users = consumers.get(name, [])
        ok = len(users) == 1 and users[0].op_type == op and users[0].domain in ("", "ai.onnx") and name not in outputs
        return users[0] if ok else None

    def other(node: onnx.NodeProto, name: str) -> str | None:
        rest = [i for i in node.input if i != name]
        return rest[0] if len(node.input) == 2 and len(rest) == 1 else None

    replace: dict[int, list[onnx.NodeProto]] = {}  # id of the pattern's last node -> the new chain
    dropped: set[int] = set()
    for erf in graph_nodes:
        if erf.op_type != "Erf" or erf.domain not in ("", "ai.onnx"):
            continue
        div = producer.get(erf.input[0])
        if div is None or div.op_type != "Div" or len(div.input) != 2 or only(div.output[0], "Erf") is not erf:
            continue
        x, root2 = div.input
        c = _scalar(values, root2)
        if c is None or not math.isclose(c, math.sqrt(2.0), rel_tol=1e-6):
            continue
        add = only(erf.output[0], "Add")
        mul_x = add is not None and only(add.output[0], "Mul")
        mul_half = mul_x and only(mul_x.output[0], "Mul")
        if not mul_half or _scalar(values, other(add, erf.output[0]) or "") != 1.0 \
                or other(mul_x, add.output[0]) != x or _scalar(values, other(mul_half, mul_x.output[0]) or "") != 0.5:
            continue
        dtype = values[root2].dtype
        base = f"{erf.name or erf.output[0]}_gelu_chain"
        inv, half = f"{base}_inv_sqrt2", f"{base}_half"
        replace[id(mul_half)] = [
            helper.make_node("Constant", [], [inv], name=inv,
                             value=numpy_helper.from_array(np.array(1.0 / math.sqrt(2.0), dtype))),
            helper.make_node("Constant", [], [half], name=half, value=numpy_helper.from_array(np.array(0.5, dtype))),
            helper.make_node("Mul", [x, inv], [f"{base}_scaled"], name=f"{base}_scale"),
            helper.make_node("Erf", [f"{base}_scaled"], [f"{base}_erf"], name=f"{base}_erf"),
            helper.make_node("Mul", [f"{base}_erf", half], [f"{base}_halved"], name=f"{base}_halve"),
            helper.make_node("Add", [f"{base}_halved", half], [f"{base}_cdf"], name=f"{base}_cdf"),
            helper.make_node("Mul", [x, f"{base}_cdf"], [mul_half.output[0]], name=mul_half.name or f"{base}_out"),
        ]
        dropped.update(id(n) for n in (div, erf, add, mul_x, mul_half))
    if not replace:
        return 0
    nodes: list[onnx.NodeProto] = []
    for node in graph_nodes:
        if id(node) in dropped:
            # the chain goes where the pattern's last node was: x is computed before it, and nothing between
            # the pattern's nodes reads their (single-consumer) intermediates
            nodes.extend(replace.get(id(node), []))
            continue
        nodes.append(_copied(node))
    _set_nodes(model, nodes)
    return len(replace)


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

"""Exporter: the three zoo models, frozen parameters, early rejection, atomic writes, CLI and inspect."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edge_sdk.bundle import ARTIFACTS, Bundle, BundleError
from edge_sdk.cli import main as fedatt
from exporter import checks, export_bundle, zoo
from exporter.export import parse_input_spec
from exporter.ops import UnsupportedModelError


def _export(name: str, out: Path, **kw) -> Bundle:
    e = zoo.ZOO[name]
    torch.manual_seed(0)
    return export_bundle(e.factory(), (e.input_shape, e.input_dtype), out, loss=e.loss, **kw)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Bundle]:
    root = tmp_path_factory.mktemp("bundles")
    return {name: _export(name, root / name) for name in zoo.ZOO}


def _assert_checks_passed(b: Bundle) -> None:
    c = b.manifest["checks"]
    for key in ("eval_forward", "inference_forward"):
        assert c[key]["max_abs_diff"] <= c[key]["tolerance"]
        assert c[key]["tolerance"] >= 1e-4  # 1e-4 x max(1, output scale)
    assert c["training"]["loss_after"] < c["training"]["loss_before"]


def test_mlp_manifest_layout_and_checks(bundles):
    b = bundles["mlp"]
    m = b.manifest
    assert [p["name"] for p in m["parameters"]] == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert [p["offset"] for p in m["parameters"]] == [0, 320, 352, 1376, 1408, 1472]
    assert b.num_trainable == m["num_trainable"] == 10 * 32 + 32 + 32 * 32 + 32 + 32 * 2 + 2
    assert m["inputs"] == [{"name": "input", "shape": ["batch", 10], "dtype": "float32"}]
    assert m["labels"] == [{"name": "labels", "shape": ["batch"], "dtype": "int64"}]
    assert m["outputs"][0]["shape"] == ["batch", 2]
    assert m["loss"]["name"] == "cross_entropy" and m["loss"]["logits_output"] == "logits"
    assert m["optimizer"]["name"] == "adamw" and m["optimizer"]["lr"] == 1e-3
    assert m["optimizer"]["hyperparameters"]["eps"] == 1e-6  # ORT's AdamW default, not torch's 1e-8
    assert m["optimizer"]["hyperparameters"]["weight_decay"] == 0.0
    assert m["opset"] == 17 and set(m["versions"]) == {"fedatt", "torch", "onnx", "onnxruntime"}
    assert m["versions"]["onnxruntime"] == "1.19.2"
    assert b.model_id.startswith("sha256:") and len(b.model_id) == 7 + 64
    assert set(m["files"]) == set(ARTIFACTS)
    _assert_checks_passed(b)
    g = m["checks"]["gradient"]
    assert g["max_abs_diff"] <= g["tolerance"]


def test_every_artifact_has_ir_version_at_most_10(bundles):
    for b in bundles.values():
        for role in ("training_model", "eval_model", "optimizer_model", "inference_model"):
            assert onnx.load(str(b.file(role))).ir_version <= 10, (b.path, role)


def test_cnn_batchnorm_frozen_statistics(bundles):
    b = bundles["cnn"]
    m = b.manifest
    assert m["batchnorm"]["policy"] == "frozen_statistics" and m["batchnorm"]["layers"] == ["1"]
    by_name = {p["name"]: p for p in m["parameters"]}
    for stat in ("1.running_mean", "1.running_var"):
        assert by_name[stat]["trainable"] is False and by_name[stat]["offset"] is None
        assert by_name[stat]["kind"] == "buffer"
    assert by_name["1.weight"]["trainable"] and by_name["1.bias"]["trainable"]  # affine still trains
    assert m["inputs"][0]["shape"] == ["batch", 1, 28, 28]
    assert "dropout" in m["checks"]["gradient"]["skipped"]
    _assert_checks_passed(b)


def test_char_transformer_gradients_match_torch(bundles):
    b = bundles["char_transformer"]
    m = b.manifest
    assert 100_000 <= b.num_trainable <= 150_000
    # the embeddings train as OneHot @ W (graph.embeddings_as_onehot_matmul): devices check the id range
    assert m["inputs"][0] == {"name": "input", "shape": ["batch", 32], "dtype": "int64", "index_range": [-80, 79]}
    assert m["labels"][0] == {"name": "labels", "shape": ["batch", 32], "dtype": "int64"}
    assert m["outputs"][0]["shape"] == ["batch", 32, 80] and m["loss"]["class_axis"] == -1
    g = m["checks"]["gradient"]
    assert g["max_abs_diff"] <= g["tolerance"] and g["max_abs_grad"] > 0
    _assert_checks_passed(b)


def test_freeze_patterns_train_only_the_head(tmp_path):
    b = _export("mlp", tmp_path / "head", freeze=["0.*", "2.*"])
    params = b.manifest["parameters"]
    assert [p.name for p in b.trainable] == ["4.weight", "4.bias"]
    assert [p.offset for p in b.trainable] == [0, 64]
    assert all(p["offset"] is None for p in params if p["name"][0] in "02")
    assert b.num_trainable == 66 and b.manifest["num_parameters"] == 1474
    _assert_checks_passed(b)


def test_freeze_pattern_matching_nothing_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="matches no parameter"):
        _export("mlp", tmp_path / "x", freeze=["nope.*"])
    assert not (tmp_path / "x").exists()


class _WithGroupNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def _no_leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir()]


def test_unsupported_layer_rejected_before_anything_is_written(tmp_path):
    with pytest.raises(UnsupportedModelError) as err:
        export_bundle(_WithGroupNorm(), "1x1x8x8", tmp_path / "bad", loss="cross_entropy")
    message = str(err.value)
    assert "features.3" in message and "GroupNorm" in message and "LayerNorm" in message
    assert _no_leftovers(tmp_path) == []


def test_functional_op_rejected_by_graph_scan(tmp_path):
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return F.elu(self.fc(x))

    with pytest.raises(UnsupportedModelError, match=r"node `[^`]+` \(op Elu\): use ReLU or SiLU"):
        export_bundle(Functional(), "1x4", tmp_path / "bad", loss="mse")
    assert _no_leftovers(tmp_path) == []


def test_failed_check_leaves_no_partial_bundle(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise checks.ExportCheckError("simulated mismatch")

    monkeypatch.setattr(checks, "run_checks", fail)
    with pytest.raises(checks.ExportCheckError, match="simulated"):
        _export("mlp", tmp_path / "b")
    assert _no_leftovers(tmp_path) == []


def test_existing_bundle_needs_overwrite(tmp_path, bundles):
    out = tmp_path / "b"
    first = _export("mlp", out)
    with pytest.raises(FileExistsError):
        _export("mlp", out)
    second = _export("mlp", out, overwrite=True)
    assert Bundle.load(out).model_id == second.model_id
    assert sorted(_no_leftovers(tmp_path)) == ["b"] and first.path == second.path


def test_input_spec_parsing():
    assert parse_input_spec("1x10") == ((1, 10), "float32")
    assert parse_input_spec("16x32,int64") == ((16, 32), "int64")
    for bad in ("10x", "1x10,complex64", "ax3", "0x3"):
        with pytest.raises(ValueError):
            parse_input_spec(bad)


USER_MODEL = '''
from torch import nn

def build(width=8):
    return nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, 1))
'''


def test_cli_exports_a_users_own_file(tmp_path, capsys):
    model_file = tmp_path / "my_model.py"
    model_file.write_text(USER_MODEL)
    out = tmp_path / "bundle"
    rc = fedatt(["export", f"{model_file}:build", "--example-input", "4x3", "--loss", "mse", "--optimizer", "sgd",
                 "--lr", "0.05", "--arg", "width=6", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    b = Bundle.load(out)
    assert b.num_trainable == 3 * 6 + 6 + 6 + 1
    assert b.manifest["optimizer"]["name"] == "sgd" and b.manifest["optimizer"]["lr"] == 0.05
    assert b.manifest["labels"][0] == {"name": "labels", "shape": ["batch", 1], "dtype": "float32"}
    assert b.model_id in printed and "training  loss" in printed


def test_cli_reports_unsupported_layer(tmp_path, capsys):
    model_file = tmp_path / "bad.py"
    model_file.write_text("from torch import nn\ndef build():\n    return nn.Sequential(nn.Linear(3, 3), nn.PReLU())\n")
    rc = fedatt(["export", f"{model_file}:build", "--example-input", "1x3", "--loss", "mse",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "layer `1` (PReLU" in err and "no bundle was written" in err
    assert not (tmp_path / "out").exists()


def test_export_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        fedatt(["export", "--help"])
    text = capsys.readouterr().out
    for option in ("--example-input", "--loss", "--optimizer", "--freeze", "--lr", "--out", "MODULE:FACTORY",
                   "--no-speed-rewrites"):
        assert option in text


def test_inspect_verifies_and_detects_tampering(tmp_path, bundles, capsys):
    src = bundles["mlp"].path
    assert fedatt(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "4.weight" in out and bundles["mlp"].model_id in out and "[2, 32]" in out

    tampered = tmp_path / "tampered"
    shutil.copytree(src, tampered)
    data = bytearray((tampered / "eval_model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (tampered / "eval_model.onnx").write_bytes(bytes(data))
    assert fedatt(["inspect", str(tampered)]) == 1
    assert "digest_mismatch" in capsys.readouterr().err
    with pytest.raises(BundleError) as err:
        Bundle.load(tampered)
    assert err.value.reason == "digest_mismatch" and "eval_model.onnx" in str(err.value)

    edited = tmp_path / "edited"
    shutil.copytree(src, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["optimizer"]["lr"] = 0.5
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError) as err:
        Bundle.load(edited)
    assert err.value.reason == "model_id_mismatch"
    assert fedatt(["inspect", str(edited)]) == 1

    os.remove(edited / "checkpoint")
    with pytest.raises(BundleError, match="missing_file"):
        Bundle.load(edited)


def test_bundle_initial_parameters_equal_torch_state(tmp_path):
    torch.manual_seed(3)
    model = zoo.mlp()
    b = export_bundle(model, "1x10", tmp_path / "b", loss="cross_entropy")
    named = b.split(b.initial_parameters())
    for name, tensor in model.state_dict().items():
        np.testing.assert_array_equal(named[name], tensor.numpy())


def _op_types(b: Bundle, role: str) -> set[str]:
    return {n.op_type for n in onnx.load(str(b.file(role))).graph.node}


def test_speed_rewrites_on_the_transformer(bundles):
    """Dropout(0) removed, q/k/v Gathers split, embeddings as OneHot @ W, GELU unfused: no GatherGrad/DropoutGrad/
    GeluGrad left."""
    b = bundles["char_transformer"]
    rw = b.manifest["graph_rewrites"]
    assert rw["enabled"] and rw["dropout_removed"] == 6 and rw["gathers_split"] == 6  # 2 layers x (3 dropouts, q/k/v)
    assert rw["embeddings_onehot"] == ["position.weight", "token.weight"]
    assert rw["input_index_range"] == [-80, 79]
    assert rw["gelu_unfused"] == 2  # one GELU per encoder layer
    ops = _op_types(b, "training_model")
    assert not ops & {"GatherGrad", "Dropout", "DropoutGrad", "Gelu", "GeluGrad"}
    assert {"Split", "OneHot", "Erf"} <= ops
    assert "Dropout" in _op_types(bundles["cnn"], "training_model")  # p=0.25 is kept
    assert bundles["cnn"].manifest["graph_rewrites"]["dropout_removed"] == 0


def test_speed_rewrites_compute_the_same_function(tmp_path, bundles):
    """The rewritten bundle and one exported without rewrites give the same logits and the same gradients."""
    plain = _export("char_transformer", tmp_path / "plain", speed_rewrites=False)
    assert plain.manifest["graph_rewrites"] == {"enabled": False}
    assert {"GatherGrad", "GeluGrad"} <= _op_types(plain, "training_model")
    from edge_sdk._ort import training_api

    api = training_api()
    rng = np.random.default_rng(5)
    x = rng.integers(0, 80, size=(3, 32)).astype(np.int64)
    y = rng.integers(0, 80, size=(3, 32)).astype(np.int64)
    out = {}
    for key, b in (("fast", bundles["char_transformer"]), ("plain", plain)):
        state = api.CheckpointState.load_checkpoint(str(b.file("checkpoint")))
        module = api.Module(str(b.file("training_model")), state, str(b.file("eval_model")), device="cpu")
        module.train()
        loss, logits = module(x, y)
        grads = {p.name: np.asarray(state.parameters[p.name].grad).copy() for p in b.trainable}
        out[key] = (float(loss), logits, grads)
    assert out["fast"][0] == pytest.approx(out["plain"][0], rel=1e-6)
    np.testing.assert_allclose(out["fast"][1], out["plain"][1], rtol=0, atol=1e-5)
    for name, g in out["plain"][2].items():
        np.testing.assert_allclose(out["fast"][2][name], g, rtol=0, atol=1e-6 + 1e-4 * float(np.abs(g).max()),
                                   err_msg=name)


class _PickTwo(nn.Module):
    """x[:, 0] * x[:, 2] after a Linear: constant-index Gathers that do not cover their axis (Slice path)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return self.head(h[:, 0] * h[:, 2])


def test_constant_gathers_that_do_not_cover_the_axis_become_slices(tmp_path):
    torch.manual_seed(0)
    b = export_bundle(_PickTwo(), "1x3x8", tmp_path / "pick", loss="cross_entropy")
    assert b.manifest["graph_rewrites"]["gathers_split"] == 2
    ops = _op_types(b, "training_model")
    assert "GatherGrad" not in ops and "Slice" in ops and "Split" not in ops
    g = b.manifest["checks"]["gradient"]
    assert g["max_abs_diff"] <= g["tolerance"]


def _gelu_graph(divisor: float, one: float = 1.0) -> onnx.ModelProto:
    """The exact GELU as TorchScript writes it below opset 20, x·(1 + erf(x / divisor))·0.5, on a [2, 5] input."""
    from onnx import TensorProto, helper, numpy_helper

    consts = {"c_div": divisor, "c_one": one, "c_half": 0.5}
    nodes = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(np.array(v, np.float32)))
             for k, v in consts.items()]
    nodes += [helper.make_node("Div", ["x", "c_div"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
              helper.make_node("Add", ["e", "c_one"], ["a"]), helper.make_node("Mul", ["x", "a"], ["m"]),
              helper.make_node("Mul", ["m", "c_half"], ["y"])]
    g = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_gelu_rewrite_is_the_same_function_and_only_matches_exact_gelu():
    import onnxruntime

    from exporter import graph

    x = np.linspace(-6, 6, 10, dtype=np.float32).reshape(2, 5)

    def run(m: onnx.ModelProto) -> np.ndarray:
        sess = onnxruntime.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})[0]

    m = _gelu_graph(float(np.sqrt(2.0)))
    before = run(m)
    assert graph.gelu_as_erf_chain(m) == 1
    graph.remove_unused_constants(m)
    onnx.checker.check_model(m)
    assert [n.op_type for n in m.graph.node if n.op_type != "Constant"] == ["Mul", "Erf", "Mul", "Add", "Mul"]
    after = run(m)
    np.testing.assert_allclose(after, before, rtol=2e-7, atol=1e-7)
    exact = 0.5 * x.astype(np.float64) * (1 + np.vectorize(math.erf)(x.astype(np.float64) / math.sqrt(2)))
    np.testing.assert_allclose(after, exact, rtol=1e-6, atol=1e-7)
    # not GELU (another divisor, another constant): left alone
    assert graph.gelu_as_erf_chain(_gelu_graph(2.0)) == 0
    assert graph.gelu_as_erf_chain(_gelu_graph(float(np.sqrt(2.0)), one=2.0)) == 0

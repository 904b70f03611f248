"""Bundle views, LocalTrainer (training, fresh optimizer state, evaluation) and Predictor on real bundles."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from edge_sdk.bundle import Bundle
from edge_sdk.predictor import Predictor
from edge_sdk.trainer import LocalTrainer
from exporter import export_bundle, zoo


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory) -> Bundle:
    torch.manual_seed(0)
    return export_bundle(zoo.mlp(), "1x10", tmp_path_factory.mktemp("b") / "mlp", loss="cross_entropy", lr=0.01)


@pytest.fixture(scope="module")
def transformer_bundle(tmp_path_factory) -> Bundle:
    torch.manual_seed(0)
    return export_bundle(zoo.char_transformer(), "1x32,int64", tmp_path_factory.mktemp("b") / "chars",
                         loss="cross_entropy", lr=3e-3)


def _separable(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 10)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    return x, y


def test_split_join_round_trip(mlp_bundle):
    flat = np.random.default_rng(1).standard_normal(mlp_bundle.num_trainable).astype(np.float32)
    named = mlp_bundle.split(flat)
    assert list(named) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert named["0.weight"].shape == (32, 10) and named["4.bias"].shape == (2,)
    np.testing.assert_array_equal(named["0.bias"], flat[320:352])
    np.testing.assert_array_equal(mlp_bundle.join(named), flat)
    as64 = mlp_bundle.split(flat.astype(np.float64))  # e.g. a DP-noised delta
    assert as64["4.weight"].dtype == np.float32
    with pytest.raises(ValueError, match="dtype"):
        mlp_bundle.split(flat.astype(np.int64))
    with pytest.raises(ValueError, match="expected"):
        mlp_bundle.split(flat[:-1])
    with pytest.raises(ValueError, match="missing"):
        mlp_bundle.join({k: v for k, v in named.items() if k != "0.bias"})
    with pytest.raises(ValueError, match="shape"):
        mlp_bundle.join({**named, "4.bias": np.zeros(3, np.float32)})


def test_train_lowers_loss_and_improves_accuracy(mlp_bundle):
    x, y = _separable()
    with LocalTrainer(mlp_bundle, threads=1) as t:
        before = t.evaluate(x, y)
        r = t.train((x, y), epochs=5, batch_size=16, seed=0)
        after = t.evaluate(x, y)
    assert r.num_examples == 5 * 200 and r.steps == 5 * 13
    assert r.last_loss < r.first_loss
    assert after.loss < before.loss * 0.8
    assert after.accuracy > 0.85 and after.accuracy > before.accuracy
    assert after.scores.shape == (200, 2)
    assert after.accuracy == pytest.approx(float(np.mean(after.scores.argmax(1) == y)))


def test_every_train_call_starts_with_fresh_optimizer_state(mlp_bundle):
    x, y = _separable(64)
    t = LocalTrainer(mlp_bundle)
    start = t.get_parameters()
    t.train((x, y), epochs=2, batch_size=16, seed=5)
    first = t.get_parameters()
    assert not np.array_equal(first, start)
    # Same start, same data, same seed: identical result only if AdamW moments/step were reset.
    t.set_parameters(start)
    t.train((x, y), epochs=2, batch_size=16, seed=5)
    np.testing.assert_array_equal(t.get_parameters(), first)
    t.close()


def test_set_parameters_is_what_trains_and_evaluates(mlp_bundle):
    x, y = _separable(50)
    t = LocalTrainer(mlp_bundle)
    zeros = np.zeros(mlp_bundle.num_trainable, np.float32)
    t.set_parameters(zeros)
    e = t.evaluate(x, y)
    assert e.loss == pytest.approx(np.log(2), abs=1e-6)  # all-zero logits
    np.testing.assert_array_equal(e.scores, 0)
    with pytest.raises(ValueError):
        t.set_parameters(zeros[:-1])
    with pytest.raises(ValueError, match="NaN"):
        t.set_parameters(np.full(mlp_bundle.num_trainable, np.nan, np.float32))
    with pytest.raises(ValueError, match="inputs have shape"):
        t.evaluate(np.zeros((3, 9), np.float32), np.zeros(3))


def test_iterable_batches_and_close_reopens(mlp_bundle):
    x, y = _separable(64)
    t = LocalTrainer(mlp_bundle, threads=2)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    r = t.train(batches, epochs=2)
    assert r.steps == 8 and r.num_examples == 128
    t.close()
    assert t.evaluate(x, y).num_examples == 64  # reopens a session after close()
    with pytest.raises(ValueError, match="iterator"):
        t.train(iter(batches), epochs=2)
    with pytest.raises(ValueError):
        LocalTrainer(mlp_bundle, threads=0)


def test_export_inference_and_predictor(mlp_bundle, tmp_path, caplog):
    x, y = _separable(40)
    t = LocalTrainer(mlp_bundle)
    t.train((x, y), epochs=1, batch_size=8, seed=0)
    path = tmp_path / "trained.onnx"
    t.export_inference(path)
    scores = t.evaluate(x, y).scores
    with caplog.at_level(logging.WARNING, logger="edge_sdk.predictor"):
        p = Predictor(path, providers=["NoSuchNPUExecutionProvider", "CPUExecutionProvider"])
    assert p.provider == "CPUExecutionProvider"
    assert p.unavailable == ["NoSuchNPUExecutionProvider"]
    assert "NoSuchNPUExecutionProvider is not available" in caplog.text
    np.testing.assert_allclose(p.predict(x), scores, atol=1e-5)
    # the bundle's own inference model holds the initial parameters
    initial = Predictor(mlp_bundle).predict(x)
    assert not np.allclose(initial, scores)


def test_transformer_train_and_evaluate(transformer_bundle):
    rng = np.random.default_rng(0)
    text = np.tile(np.arange(10), 40)  # a repeating "sentence": next char is predictable
    starts = rng.integers(0, len(text) - 33, size=32)
    x = np.stack([text[s:s + 32] for s in starts]).astype(np.int64)
    y = np.stack([text[s + 1:s + 33] for s in starts]).astype(np.int64)
    t = LocalTrainer(transformer_bundle)
    before = t.evaluate(x, y, batch_size=16)
    assert before.scores.shape == (32, 32, 80) and 0.0 <= before.accuracy <= 1.0
    r = t.train((x, y), epochs=3, batch_size=16, seed=0)
    after = t.evaluate(x, y, batch_size=16)
    assert r.steps == 6 and after.loss < before.loss - 0.5
    assert after.accuracy == pytest.approx(float(np.mean(after.scores.argmax(-1) == y)))


def test_transformer_rejects_ids_outside_the_embedding(transformer_bundle):
    """Embeddings train as OneHot @ W, which would map a bad id to a zero row: LocalTrainer refuses it."""
    assert transformer_bundle.manifest["inputs"][0]["index_range"] == [-80, 79]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 80, size=(4, 32)).astype(np.int64)
    y = rng.integers(0, 80, size=(4, 32)).astype(np.int64)
    with LocalTrainer(transformer_bundle) as t:
        t.train((x, y), batch_size=4)
        bad = x.copy()
        bad[1, 3] = 80
        with pytest.raises(ValueError, match=r"ids must lie in \[-80, 79\]"):
            t.train((bad, y), batch_size=4)
        with pytest.raises(ValueError, match="ids must lie"):
            t.evaluate(bad, y)


def _subnormal_survives() -> bool:
    tiny = np.finfo(np.float32).smallest_subnormal
    return bool(np.float32(tiny) * np.float32(1.0) != 0)


def test_flush_to_zero_is_opt_in_and_stays_off_the_callers_thread(transformer_bundle):
    """DENORMAL_AS_ZERO sets FTZ on the thread that creates the first session: never by default."""
    import threading

    rng = np.random.default_rng(1)
    x = rng.integers(0, 80, size=(4, 32)).astype(np.int64)
    y = rng.integers(0, 80, size=(4, 32)).astype(np.int64)
    with LocalTrainer(transformer_bundle) as t:
        t.train((x, y), batch_size=4)
    assert _subnormal_survives(), "a default LocalTrainer changed the caller's floating-point mode"
    seen: dict[str, object] = {}

    def job() -> None:  # what EdgeClient does on its own worker thread (ClientConfig.flush_denormals)
        try:
            with LocalTrainer(transformer_bundle, flush_denormals=True) as t2:
                seen["loss"] = t2.train((x, y), batch_size=4).mean_loss
        except Exception as exc:  # surfaced below
            seen["error"] = exc

    th = threading.Thread(target=job)
    th.start()
    th.join(120)
    assert "error" not in seen and np.isfinite(seen["loss"]), seen
    assert _subnormal_survives(), "flush-to-zero leaked from a worker thread into the caller's"

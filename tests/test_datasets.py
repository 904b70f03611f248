"""Tests for the offline federated datasets (simulator/datasets.py) and partitioners (simulator/partition.py).

Fast by design: small slices (one play, capped clients/samples); Fashion-MNIST is skipped only when the
Debian package is absent.
"""
from __future__ import annotations

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simulator import partition as part
from simulator.datasets import (
    CLIENT_ID_RE,
    SHAKESPEARE_UNK_ID,
    SHAKESPEARE_VOCAB,
    DatasetError,
    decode_chars,
    encode_chars,
    fashion_mnist_available,
    load_dataset,
    majority_baseline,
    parse_play,
    read_idx,
)

ROOT = Path(__file__).resolve().parents[1]


def _same(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


# ------------------------------------------------------------------------------------------ partition


def _covers_once(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert allidx.dtype == np.int64
    assert len(allidx) == n
    assert np.array_equal(np.sort(allidx), np.arange(n))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "natural"])
def test_partitions_cover_every_index_once_and_are_deterministic(kind: str) -> None:
    labels = np.random.default_rng(0).integers(0, 10, size=5000)
    groups = np.random.default_rng(1).choice(["a", "b", "c", "d"], size=5000)

    def make(seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        if kind == "iid":
            return part.iid(labels, 7, rng)
        if kind == "dirichlet":
            return part.dirichlet(labels, 7, 0.3, rng, min_size=20)
        return part.natural(groups)

    parts = make(0)
    _covers_once(parts, len(labels))
    assert all(np.array_equal(a, b) for a, b in zip(parts, make(0)))
    if kind == "iid":
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    if kind == "dirichlet":
        assert min(map(len, parts)) >= 20
        assert not all(np.array_equal(a, b) for a, b in zip(parts, make(1)))
    if kind == "natural":
        assert [set(groups[p]) for p in parts] == [{"a"}, {"b"}, {"c"}, {"d"}]


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels = np.repeat(np.arange(10), 600)
    skew = {}
    for alpha in (100.0, 1.0, 0.1):
        vals = [part.label_skew(labels, part.dirichlet(labels, 10, alpha, np.random.default_rng(s), min_size=5))
                for s in range(3)]
        skew[alpha] = float(np.mean(vals))
    assert skew[100.0] < 0.1 < skew[1.0] < skew[0.1], skew
    assert part.label_skew(labels, part.iid(labels, 10, np.random.default_rng(0))) < 0.1


def test_dirichlet_gives_a_clear_error_when_min_size_cannot_be_met() -> None:
    labels = np.repeat(np.arange(10), 10)
    with pytest.raises(part.PartitionError, match="min_size"):
        part.dirichlet(labels, 10, 0.01, np.random.default_rng(0), min_size=9, max_attempts=5)
    with pytest.raises(part.PartitionError, match="exceeds"):
        part.dirichlet(labels, 10, 1.0, np.random.default_rng(0), min_size=11)


# -------------------------------------------------------------------------------------- three_clients


def test_three_clients_shapes_ratios_and_baseline() -> None:
    ds = load_dataset("three_clients", seed=0)
    assert ds.client_ids == ["client0", "client1", "client2"]
    for cid, rate in zip(ds.client_ids, (0.5, 0.3, 0.2)):
        x, y = ds.clients[cid]
        assert x.shape == (100, 10) and x.dtype == np.float32
        assert y.dtype == np.int64 and set(np.unique(y)) <= {0, 1}
        assert y.mean() == rate  # exact, not approximate
        assert 0 < y[:50].sum() < y.sum() or rate == 0.5  # shuffled, not all positives first
    xt, yt = ds.test
    assert xt.shape == (300, 10) and yt.mean() == 0.5
    assert ds.majority_baseline == 0.5 == majority_baseline(yt)
    assert ds.model == ("mlp", {"in_features": 10, "num_classes": 2})
    xp, _ = ds.pooled_train()
    np.testing.assert_allclose(xp.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(xp.std(axis=0), 1, atol=1e-4)


def test_three_clients_is_deterministic_and_learnable() -> None:
    a, b, c = (load_dataset("three_clients", seed=s) for s in (0, 0, 1))
    assert all(_same(a.clients[k], b.clients[k]) for k in a.clients) and _same(a.test, b.test)
    assert not _same(a.clients["client0"], c.clients["client0"])
    # Learnable but not trivial: least-squares linear classifier on the pooled training data.
    x, y = a.pooled_train()
    xb = np.c_[x, np.ones(len(x))]
    w, *_ = np.linalg.lstsq(xb, 2.0 * y - 1, rcond=None)
    acc = float(((np.c_[a.test[0], np.ones(len(a.test[0]))] @ w > 0) == a.test[1]).mean())
    assert 0.65 < acc < 0.97, acc


# ---------------------------------------------------------------------------------------- shakespeare


def test_vocab_and_encode_decode_round_trip() -> None:
    assert len(SHAKESPEARE_VOCAB) == 80 == len(set(SHAKESPEARE_VOCAB))
    text = "To be, or not to be: that is the question.\nHAMLET? [Aside] & 'tis}"
    ids = encode_chars(text)
    assert ids.dtype == np.int64 and ids.max() < 80
    assert decode_chars(ids) == text
    assert list(encode_chars("a—é")) == [SHAKESPEARE_VOCAB.index("a"), SHAKESPEARE_UNK_ID, SHAKESPEARE_UNK_ID]
    assert decode_chars([SHAKESPEARE_UNK_ID]) == "\ufffd"


def test_parse_play_drops_headings_and_stage_directions() -> None:
    md = "\n".join([
        "# A Play", "", "## ACT I", "", "### SCENE I. A room.", "", "_Enter HAMLET and two",
        "others_", "", "**HAMLET**  ", "To be, or not to be\\--  ", "_\\[Aside]_  ", "that _\\[Reads]_ is it.",
        "", "_Exit_", "", "Still me.", "", "**First Gravedigger**", "*[Digs.]*", "Is she to be buried?",
        "", "### SCENE II.", "", "Nobody says this.",
    ])
    assert parse_play(md) == [
        ("HAMLET", "To be, or not to be--\nthat  is it.\nStill me."),
        ("FIRST GRAVEDIGGER", "Is she to be buried?"),
    ]


def test_shakespeare_clients_are_roles_with_shifted_windows() -> None:
    ds = load_dataset("shakespeare", plays=["hamlet", "macbeth"], max_clients=6, max_samples_per_client=40)
    assert len(ds.clients) == 6
    assert "hamlet.hamlet" in ds.clients and "macbeth.macbeth" in ds.clients
    assert ds.info["client_names"]["hamlet.hamlet"] == ["hamlet", "HAMLET"]
    assert ds.task == "next_char" and ds.input_shape == (32,)
    assert ds.model == ("char_transformer", {"vocab_size": 81, "seq_len": 32})
    for cid, (x, y) in ds.clients.items():
        assert x.shape == y.shape == (40, 32) and x.dtype == y.dtype == np.int64
        assert np.array_equal(y[:, :-1], x[:, 1:])        # next character at every position
        assert np.array_equal(y[:-1, -1], x[1:, 0])       # consecutive windows are contiguous text
        xt, yt = ds.client_tests[cid]
        assert 1 <= len(xt) <= 10 and np.array_equal(yt[:, :-1], xt[:, 1:])
    text = decode_chars(ds.clients["hamlet.hamlet"][0][:2].reshape(-1))
    assert text.startswith("A little more than kin, and less than kind.")
    assert 0 < ds.majority_baseline < 0.3 and ds.majority_baseline == majority_baseline(ds.test[1])


def test_shakespeare_test_windows_come_after_train_text() -> None:
    ds = load_dataset("shakespeare", plays=["hamlet"], max_clients=1, test_fraction=0.25)
    (x, y), (xt, yt) = ds.clients["hamlet.hamlet"], ds.client_tests["hamlet.hamlet"]
    train_text = decode_chars(np.r_[x.reshape(-1), y[-1, -1]])
    test_text = decode_chars(np.r_[xt.reshape(-1), yt[-1, -1]])
    assert 3 * len(xt) - 3 <= len(x) <= 3 * len(xt) + 3
    from simulator.datasets import _shakespeare_roles
    full = _shakespeare_roles(["hamlet"])[("hamlet", "HAMLET")]
    cut = int(len(full) * 0.75)
    assert full.startswith(train_text) and len(train_text) <= cut
    assert full.find(test_text, cut) == cut  # test text starts exactly at the cut, no overlap


# ---------------------------------------------------------------------------------------------- heart


def test_heart_hospitals_counts_imputation_and_baselines() -> None:
    ds = load_dataset("heart", seed=0)
    counts = {"cleveland": 304, "hungary": 293, "switzerland": 123, "va-long-beach": 200}
    assert ds.info["patients"] == counts
    assert ds.client_ids == list(counts)
    for cid, n in counts.items():
        (x, y), (xt, yt) = ds.clients[cid], ds.client_tests[cid]
        assert len(y) + len(yt) == n
        assert abs(len(yt) - 0.2 * n) <= 2
        assert abs(yt.mean() - ds.info["positive_rate"][cid]) < 0.05  # stratified
        assert np.isfinite(x).all() and np.isfinite(xt).all()
        assert ds.info["client_majority_baseline"][cid] == majority_baseline(yt)
    xp, yp = ds.pooled_train()
    assert xp.shape == (736, 35) and len(ds.test[1]) == 184
    assert ds.model == ("mlp", {"in_features": 35, "num_classes": 2})
    assert ds.majority_baseline == majority_baseline(ds.test[1]) == max(ds.test[1].mean(), 1 - ds.test[1].mean())
    # Statistics come from the training split only: train numerics are exactly standardised, test not.
    np.testing.assert_allclose(xp[:, :6].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(xp[:, :6].std(axis=0), 1, atol=1e-4)
    assert np.abs(ds.test[0][:, :6].mean(axis=0)).max() > 1e-3
    # Switzerland never records cholesterol (0 in the source): imputed, flagged missing.
    chol_missing = ds.info["feature_names"].index("chol_missing")
    assert ds.clients["switzerland"][0][:, chol_missing].min() == 1.0


def test_heart_split_depends_on_seed_and_repartition_works() -> None:
    a, b, c = (load_dataset("heart", seed=s) for s in (0, 0, 1))
    assert _same(a.clients["hungary"], b.clients["hungary"])
    assert not _same(a.clients["hungary"], c.clients["hungary"])
    iid = load_dataset("heart", partition="iid", num_clients=8, max_samples_per_client=50)
    assert len(iid.clients) == 8 and iid.client_tests is None
    assert all(len(y) == 50 for _, y in iid.clients.values())
    two = load_dataset("heart", max_clients=2)
    assert two.client_ids == ["cleveland", "hungary"] and len(two.test[1]) == sum(len(y) for _, y in two.client_tests.values())


# -------------------------------------------------------------------------------------- fashion_mnist


@pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
def test_fashion_mnist_dirichlet_small_slice() -> None:
    ds = load_dataset("fashion_mnist", seed=0, num_clients=20, alpha=0.1, max_samples_per_client=64,
                      max_test_samples=500)
    assert len(ds.clients) == 20
    for x, y in ds.clients.values():
        assert x.dtype == np.float32 and x.shape[1:] == (1, 28, 28) and 10 <= len(y) <= 64
        assert 0.0 <= x.min() and x.max() <= 1.0
    assert ds.test[0].shape == (500, 1, 28, 28)
    assert ds.info["label_skew_tv"] > load_dataset("fashion_mnist", partition="iid", max_samples_per_client=8,
                                                   max_test_samples=10).info["label_skew_tv"]
    assert 0.05 < ds.majority_baseline < 0.2


def test_fashion_mnist_missing_package_error_names_install_command(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", root=tmp_path)
    with pytest.raises(DatasetError, match="no natural split"):
        load_dataset("fashion_mnist", partition="natural")


def test_idx_reader_rejects_bad_files(tmp_path: Path) -> None:
    good = tmp_path / "good.gz"
    good.write_bytes(gzip.compress(struct.pack(">BBBBI", 0, 0, 8, 1, 3) + bytes([1, 2, 3])))
    assert list(read_idx(good, (3,))) == [1, 2, 3]
    cases = {
        "magic": struct.pack(">BBBBI", 0, 0, 9, 1, 3) + bytes(3),
        "shape": struct.pack(">BBBBI", 0, 0, 8, 1, 4) + bytes(4),
        "data bytes": struct.pack(">BBBBI", 0, 0, 8, 1, 3) + bytes(5),
    }
    for match, payload in cases.items():
        bad = tmp_path / f"bad-{match.replace(' ', '_')}.gz"
        bad.write_bytes(gzip.compress(payload))
        with pytest.raises(DatasetError, match=match) as err:
            read_idx(bad, (3,))
        assert str(bad) in str(err.value)
    notgz = tmp_path / "plain.gz"
    notgz.write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="gzip"):
        read_idx(notgz, (3,))
    with pytest.raises(DatasetError, match="more than"):
        read_idx(good, (3,), max_compressed=4)


# ---------------------------------------------------------------------------------------------- misc


def test_loader_errors_are_clear() -> None:
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("mnist3d")
    with pytest.raises(DatasetError, match="only partition='natural'"):
        load_dataset("shakespeare", partition="dirichlet")
    with pytest.raises(DatasetError, match="num_clients is fixed"):
        load_dataset("three_clients", num_clients=5)
    with pytest.raises(DatasetError, match="unknown plays"):
        load_dataset("shakespeare", plays=["hamlet-2"])


def test_client_ids_are_valid_device_ids() -> None:
    ds = load_dataset("shakespeare", min_chars=5000)
    assert len(ds.clients) > 100
    assert all(CLIENT_ID_RE.match(cid) for cid in ds.clients)


def test_datasets_import_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "import simulator.datasets, simulator.partition\n"
            "simulator.datasets.load_dataset('three_clients')\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)

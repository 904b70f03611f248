"""The simulator's byzantine devices (`--byzantine FRACTION:KIND[:SCALE]`): parsing, the seeded choice of
attackers, and what `run_byzantine_job` actually releases, checked numerically on a real exported bundle with
the real SDK training job (ONNX Runtime training, clip + noise, wire encoding)."""
from __future__ import annotations

import random

import numpy as np
import pytest

import edge_sdk.client as ec
import edge_sdk.privacy
from edge_sdk import wire
from edge_sdk.cli import main as fedatt_main
from edge_sdk.client import TrainJob, run_training_job
from edge_sdk.follower import RoundSpec
from simulator.fleet import Byzantine, run_byzantine_job
from simulator.run import SimConfig, SimulationError, parse_byzantine

IDS = [f"client{i}" for i in range(10)]


# ------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, want", [
    ("0.2:flip", Byzantine(0.2, "flip", 1.0)),
    ("0.1:random", Byzantine(0.1, "random", 1.0)),
    ("0.2:flip:10", Byzantine(0.2, "flip", 10.0)),
    ("0:random:0.5", Byzantine(0.0, "random", 0.5)),
])
def test_parse_byzantine_accepts(text, want):
    assert parse_byzantine(text) == want


@pytest.mark.parametrize("text", [None, ""])
def test_parse_byzantine_none(text):
    assert parse_byzantine(text) is None


@pytest.mark.parametrize("text, fragment", [
    ("0.2", "expected FRACTION:KIND[:SCALE]"),
    ("0.2:flip:1:2", "expected FRACTION:KIND[:SCALE]"),
    ("flip:0.2", "could not convert string to float: 'flip'"),
    ("0.2:flip:big", "could not convert string to float: 'big'"),
    ("1:flip", "fraction must be in [0, 1), got 1.0"),
    ("-0.1:flip", "fraction must be in [0, 1), got -0.1"),
    ("nan:flip", "fraction must be in [0, 1)"),
    ("0.2:sign", "kind must be one of ('flip', 'random'), got 'sign'"),
    ("0.2:Flip", "kind must be one of"),
    ("0.2:flip:0", "scale must be > 0"),
    ("0.2:flip:-3", "scale must be > 0"),
    ("0.2:random:nan", "scale must be > 0"),
    ("0.2:flip:inf", "scale must be > 0 and finite"),
])
def test_parse_byzantine_errors_name_the_option_and_the_problem(text, fragment):
    with pytest.raises(SimulationError) as ei:
        parse_byzantine(text)
    msg = str(ei.value)
    assert msg.startswith(f"--byzantine {text!r}: ")
    assert fragment in msg


def test_bad_byzantine_fails_before_anything_starts(tmp_path, capsys):
    with pytest.raises(SimulationError, match="--byzantine '0.3:spam'"):
        SimConfig(byzantine="0.3:spam", out=tmp_path / "never")
    rc = fedatt_main(["simulate", "--byzantine", "0.2", "--out", str(tmp_path / "never"), "--no-progress"])
    assert rc == 1
    assert "error: --byzantine '0.2': expected FRACTION:KIND[:SCALE]" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()  # nothing was started or written


# ------------------------------------------------------------------------------------ choice of attackers
@pytest.mark.parametrize("fraction, k", [(0.1, 1), (0.2, 2), (0.25, 3), (0.3, 3), (0.35, 4), (0.5, 5), (0.9, 9),
                                        (0.01, 1), (0.0, 0)])
def test_choice_has_the_requested_fraction(fraction, k):
    for seed in range(5):
        bad = Byzantine(fraction, "flip").choose(IDS, seed)
        assert len(bad) == k and len(set(bad)) == k and set(bad) <= set(IDS)
        assert bad == sorted(bad)


def test_choice_is_seeded_and_independent_of_order():
    b = Byzantine(0.2, "random")
    shuffled = IDS[:]
    random.Random(1).shuffle(shuffled)
    for seed in range(20):
        first = b.choose(IDS, seed)
        assert b.choose(IDS, seed) == first == b.choose(shuffled, seed) == b.choose(IDS[::-1], seed)
        # the kind does not change who attacks; a smaller fraction picks a subset of a larger one
        assert Byzantine(0.2, "flip").choose(IDS, seed) == first
        assert set(Byzantine(0.1, "flip").choose(IDS, seed)) <= set(first)
    picks = [tuple(b.choose(IDS, seed)) for seed in range(50)]
    assert len(set(picks)) > 10  # the seed matters ...
    assert set().union(*picks) == set(IDS)  # ... and no device is never (or always) the attacker


# --------------------------------------------------------------------------- what an attacker releases
UID = "0123456789abcdef" * 2
C = 10.0  # large enough that the honest update is never clipped (checked), so its Δ is recoverable


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    import exporter
    from exporter import zoo

    return exporter.export_bundle(zoo.mlp(in_features=10), "1x10", tmp_path_factory.mktemp("b") / "mlp",
                                  loss="cross_entropy", lr=0.05)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 10)).astype(np.float32)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)


def job(bundle, data, z: float, seed: int = 123, clip: float = C) -> TrainJob:
    spec = RoundSpec(key=f"{bundle.model_id}:1", model_id=bundle.model_id, round=1, attempt=1, model_round=0,
                     update_id=UID, device_id="client3", topic="fedatt/f/updates/client3",
                     global_tensors=bundle.split(bundle.initial_parameters()),
                     train=wire.TrainSettings(epochs=1, batch_size=16),
                     privacy=wire.PrivacySettings(clip_norm=clip, noise_multiplier=z), encoding=wire.ENCODING_F32)
    return TrainJob(spec=spec, bundle_dir=str(bundle.path), data=data, seed=seed)


def released(bundle, outcome) -> np.ndarray:
    msg = wire.decode_update(outcome.payload)
    # the attacker's message claims exactly what an honest one claims
    assert (msg.device_id, msg.round, msg.update_id, msg.clip_norm) == ("client3", 1, UID, C)
    return bundle.join(msg.tensors).astype(np.float64)


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_flip_and_random_replace_delta_before_clip_and_noise(bundle, data):
    z0 = 1e-7  # noise std 1e-6 per coordinate: the released vector is the pre-noise one to ~1e-6
    honest_out = run_training_job(job(bundle, data, z0))
    assert not honest_out.clipped
    delta = released(bundle, honest_out)  # the honest Δ (deterministic: same seed, same shuffle)
    norm = np.linalg.norm(delta)
    assert 1e-3 < norm < C
    assert np.allclose(released(bundle, run_training_job(job(bundle, data, z0))), delta, atol=1e-5)

    # flip: −Δ, rescaled to SCALE·C (SCALE = 1: exactly the clip norm; SCALE = 3: a clip-skipping SDK)
    for scale in (1.0, 3.0):
        flip = released(bundle, run_byzantine_job(job(bundle, data, z0), "flip", scale))
        assert np.linalg.norm(flip) == pytest.approx(scale * C, rel=1e-5)
        assert np.allclose(flip, -scale * C * unit(delta), atol=1e-4)
    # the wrapper is gone afterwards: an honest job in the same process is honest again
    assert ec.privatize is edge_sdk.privacy.privatize
    assert np.allclose(released(bundle, run_training_job(job(bundle, data, z0))), delta, atol=1e-5)

    # random: a direction unrelated to Δ, norm SCALE·C, fixed by the job seed
    for scale in (1.0, 3.0):
        rnd = released(bundle, run_byzantine_job(job(bundle, data, z0), "random", scale))
        assert np.linalg.norm(rnd) == pytest.approx(scale * C, rel=1e-5)
        assert abs(unit(rnd) @ unit(delta)) < 0.15  # d = 1,474: a random direction has |cos| ~ 0.03
    r1 = released(bundle, run_byzantine_job(job(bundle, data, z0, seed=5), "random", 1.0))
    r1b = released(bundle, run_byzantine_job(job(bundle, data, z0, seed=5), "random", 1.0))
    r2 = released(bundle, run_byzantine_job(job(bundle, data, z0, seed=6), "random", 1.0))
    assert np.allclose(r1, r1b, atol=1e-5)
    assert abs(unit(r1) @ unit(r2)) < 0.15


def test_attacker_noise_is_the_sdk_noise_with_std_zC(bundle, data):
    """Same job seed: honest and attacker draw the same noise vector n. With z = 0.02 (std 0.2 per coordinate,
    far above Δ's coordinates) both carry n, and the attacker's n keeps std z·C even when SCALE > 1."""
    z0, z = 1e-7, 0.02
    delta = released(bundle, run_training_job(job(bundle, data, z0)))
    honest = released(bundle, run_training_job(job(bundle, data, z)))
    n = honest - delta
    assert np.std(n) == pytest.approx(z * C, rel=0.1)
    assert abs(np.mean(n)) < 4 * z * C / np.sqrt(n.size)
    for kind, scale in (("flip", 1.0), ("flip", 10.0), ("random", 1.0), ("random", 10.0)):
        pre = released(bundle, run_byzantine_job(job(bundle, data, z0), kind, scale))
        noised = released(bundle, run_byzantine_job(job(bundle, data, z), kind, scale))
        assert np.allclose(noised - pre, n, atol=1e-4), (kind, scale)  # same n: std zC, not scale·zC

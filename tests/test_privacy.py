"""Tests for edge_sdk.privacy: clipping, noise, the dependency-free accountant (against dp-accounting), ledger."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edge_sdk import privacy
from edge_sdk.privacy import (
    BudgetExceeded, DuplicateRelease, LedgerCorrupt, LedgerError, LedgerMismatch, PrivacyLedger, clip_l2,
    epsilon_for, max_releases, os_standard_normal, privatize, secure_rng,
)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- clipping

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, st.integers(0, 300), elements=finite), st.floats(1e-3, 1e3))
def test_clip_l2_bounds_norm_and_keeps_direction(x, c):
    out, norm = clip_l2(x, c)
    assert out.dtype == np.float32 and out.shape == x.shape
    x64 = x.astype(np.float64)
    assert norm == pytest.approx(float(np.linalg.norm(x64)), rel=1e-12)
    out_norm = float(np.linalg.norm(out.astype(np.float64)))
    assert out_norm <= c  # the guarantee, exactly
    if norm <= c:
        np.testing.assert_array_equal(out, x)
    else:
        assert out_norm == pytest.approx(c, rel=1e-5)
        # Same direction: out is a non-negative multiple of x.
        np.testing.assert_allclose(out.astype(np.float64), x64 * (out_norm / norm), rtol=1e-5,
                                   atol=1e-6 * c)


def test_clip_l2_is_over_the_whole_update_not_per_layer():
    x = np.ones((4, 25), dtype=np.float32)  # norm 10
    out, norm = clip_l2(x, 1.0)
    assert norm == pytest.approx(10.0)
    np.testing.assert_allclose(out, 0.1, rtol=1e-6)


@pytest.mark.parametrize("bad", [np.array([1.0, np.nan]), np.array([np.inf]), np.array(["a"])])
def test_clip_l2_rejects_non_finite_or_non_numeric(bad):
    with pytest.raises(ValueError):
        clip_l2(bad, 1.0)


@pytest.mark.parametrize("c", [0.0, -1.0, math.nan, math.inf, True, "1"])
def test_clip_norm_must_be_positive_finite(c):
    with pytest.raises(ValueError, match="clip_norm"):
        clip_l2(np.ones(3), c)
    with pytest.raises(ValueError, match="clip_norm"):
        privatize(np.ones(3), c, 1.0)


@pytest.mark.parametrize("z", [-0.1, math.nan, math.inf])
def test_noise_multiplier_must_be_finite_non_negative(z):
    with pytest.raises(ValueError, match="noise_multiplier"):
        privatize(np.ones(3), 1.0, z)


def test_privatize_rejects_non_finite_update_and_bad_rng():
    with pytest.raises(ValueError, match="NaN"):
        privatize(np.array([1.0, np.nan], dtype=np.float32), 1.0, 1.0)
    with pytest.raises(ValueError, match="rng"):
        privatize(np.ones(3), 1.0, 1.0, rng=np.random.RandomState(0))


# ---------------------------------------------------------------------------------------------- noise

D = 200_000


@pytest.mark.parametrize("source", ["os", "secure_rng"])
def test_noise_is_gaussian_with_std_z_times_c(source):
    """Measured noise std within 1% of zC for d=200k (SE of the sample std is σ/√(2d) ≈ 0.16%: 6 SE)."""
    c, z = 0.5, 3.0
    rng = None if source == "os" else secure_rng()
    noised, info = privatize(np.zeros(D, dtype=np.float32), c, z, rng=rng)
    assert noised.dtype == np.float32 and noised.shape == (D,)
    assert info.noise_std == pytest.approx(z * c) and not info.clipped and info.original_norm == 0.0
    n = noised.astype(np.float64) / (z * c)
    assert abs(n.std() - 1.0) < 0.01
    assert abs(n.mean()) < 6 / math.sqrt(D)
    # Shape of the distribution, not just its width: kurtosis (SE √(24/d) ≈ 0.011) and the 2σ tail mass
    # (binomial SE ≈ 4.7e-4), each within ~6 SE.
    assert abs(np.mean(n**4) - 3.0) < 0.07
    assert abs(np.mean(np.abs(n) > 2.0) - 0.0455) < 0.003


@pytest.mark.parametrize("n", [0, 1, 2, 7, (1 << 20) + 3])
def test_os_standard_normal_sizes(n):
    x = os_standard_normal(n)
    assert x.shape == (n,) and x.dtype == np.float64 and np.all(np.isfinite(x))
    if n > 1000:
        assert abs(x.std() - 1.0) < 0.01
        # The two Box-Muller halves (cos and sin) are independent: no correlation across the split.
        half = n // 2
        assert abs(np.corrcoef(x[:half - 10], x[half:2 * half - 10])[0, 1]) < 0.01


def test_privatize_clips_then_adds_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=D).astype(np.float32) * 0.1  # norm ≈ 44.7
    c, z = 2.0, 1.0
    noised, info = privatize(x, c, z, rng=np.random.default_rng(1))
    assert info.clipped and info.original_norm == pytest.approx(np.linalg.norm(x.astype(np.float64)))
    noise = np.random.default_rng(1).standard_normal(D) * (z * c)
    clipped = x.astype(np.float64) * (c / info.original_norm)
    np.testing.assert_allclose(noised, (clipped + noise).astype(np.float32), rtol=1e-6, atol=1e-6)


def test_privatize_with_zero_noise_is_just_clipping_and_keeps_shape():
    x = np.full((3, 4), 2.0, dtype=np.float32)
    noised, info = privatize(x, 1.0, 0.0)
    assert noised.shape == (3, 4) and info.noise_std == 0.0
    assert float(np.linalg.norm(noised.astype(np.float64))) <= 1.0
    assert float(np.linalg.norm(noised)) == pytest.approx(1.0, rel=1e-6)


def test_secure_rngs_and_os_noise_give_different_streams():
    a, b = secure_rng().integers(0, 2**63, size=8), secure_rng().integers(0, 2**63, size=8)
    assert not np.array_equal(a, b)
    assert not np.array_equal(os_standard_normal(8), os_standard_normal(8))
    n1, _ = privatize(np.zeros(16), 1.0, 1.0)
    n2, _ = privatize(np.zeros(16), 1.0, 1.0)
    assert not np.array_equal(n1, n2)


def test_edge_sdk_privacy_imports_neither_dp_accounting_nor_scipy_nor_torch():
    code = ("import sys\n"
            "for m in ('torch', 'dp_accounting', 'scipy'): sys.modules[m] = None\n"
            "import edge_sdk.privacy, edge_sdk.compression\n"
            "assert edge_sdk.privacy.epsilon_for([10.0]*100, 1e-5) > 4\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


# ---------------------------------------------------------------------------------------------- accountant

@pytest.mark.parametrize("z, adjacency, expected, half_unit", [
    (10.0, "add_remove", 4.38, 0.005), (10.0, "replace_one", 10.0, 0.05), (1.0, "add_remove", 91.8, 0.05),
    (20.0, "add_remove", 1.99, 0.005),
])
def test_reference_values_from_notes(z, adjacency, expected, half_unit):
    """notes/privacy.md, δ=1e-5, T=100; within half a unit of the last digit quoted there."""
    assert epsilon_for([z] * 100, 1e-5, adjacency) == pytest.approx(expected, abs=half_unit)


def test_edge_cases():
    assert epsilon_for([], 1e-5) == 0.0
    assert epsilon_for([10.0, 0.0], 1e-5) == math.inf
    assert epsilon_for([math.inf] * 5, 1e-5) == 0.0
    assert epsilon_for([10.0, math.inf], 1e-5) == epsilon_for([10.0], 1e-5)
    assert epsilon_for([1e7], 1e-5) == 0.0  # so much noise that (0, δ)-DP already holds
    for bad in [0.0, 1.0, -1e-5, math.nan]:
        with pytest.raises(ValueError, match="delta"):
            epsilon_for([1.0], bad)
    with pytest.raises(ValueError, match="adjacency"):
        epsilon_for([1.0], 1e-5, "replace")
    with pytest.raises(ValueError, match="noise multipliers"):
        epsilon_for([-1.0], 1e-5)
    with pytest.raises(ValueError, match="noise multipliers"):
        epsilon_for([math.nan], 1e-5)


def test_log_ndtr_matches_scipy_including_far_tails():
    from scipy.special import log_ndtr  # test-only reference

    xs = np.concatenate([np.linspace(-60.0, 40.0, 4001), [-1e4, -1e3, -20.0, -20.0 + 1e-9]])
    for x in xs:
        ref = float(log_ndtr(x))
        if ref != 0.0:
            assert privacy._log_ndtr(float(x)) == pytest.approx(ref, rel=1e-11, abs=1e-300)


# The grid runs in ~3 s. PLD is discretised; its ε error grows with ε (tail truncation), measured at most
# 1.0e-3 relative on this grid with value_discretization_interval = max(1e-4, 1e-4·ε). Stated tolerance: 1%.
PLD_RTOL = 0.01
# get_epsilon_gaussian solves the same equation with scipy (brentq, xtol 1e-12): agreement to 1e-9.
EXACT_RTOL = 1e-9
GRID = [(z, t, d) for z in (0.8, 3.0, 10.0, 30.0) for t in (1, 10, 100, 1000) for d in (1e-5, 1e-9)]


@pytest.mark.parametrize("adjacency", ["add_remove", "replace_one"])
def test_matches_dp_accounting_on_a_grid(adjacency):
    dp = pytest.importorskip("dp_accounting")
    from dp_accounting.pld import PLDAccountant

    relation = {"add_remove": dp.NeighboringRelation.ADD_OR_REMOVE_ONE,
                "replace_one": dp.NeighboringRelation.REPLACE_ONE}[adjacency]
    worst_pld = 0.0
    for z, t, d in GRID:
        ours = epsilon_for([z] * t, d, adjacency)
        sigma = z / math.sqrt(t) / (2.0 if adjacency == "replace_one" else 1.0)
        assert ours == pytest.approx(dp.get_epsilon_gaussian(sigma, d), rel=EXACT_RTOL), (z, t, d)
        acc = PLDAccountant(relation, value_discretization_interval=max(1e-4, 1e-4 * ours))
        acc.compose(dp.SelfComposedDpEvent(dp.GaussianDpEvent(z), t))
        ref = acc.get_epsilon(d)
        worst_pld = max(worst_pld, abs(ref - ours) / ours)
        assert ours == pytest.approx(ref, rel=PLD_RTOL), (z, t, d)
    assert worst_pld < 2e-3  # what we measured; a jump means something changed upstream or here


@pytest.mark.parametrize("adjacency", ["add_remove", "replace_one"])
def test_heterogeneous_multipliers_compose_exactly_like_pld_composition(adjacency):
    """PLD composes the distinct Gaussian events by FFT: an independent check of (Σ 1/z_i²)^(-1/2)."""
    dp = pytest.importorskip("dp_accounting")
    from dp_accounting.pld import PLDAccountant

    relation = {"add_remove": dp.NeighboringRelation.ADD_OR_REMOVE_ONE,
                "replace_one": dp.NeighboringRelation.REPLACE_ONE}[adjacency]
    zs = [4.0, 8.0, 12.0, 6.0, 20.0, 5.0] * 3
    acc = PLDAccountant(relation, value_discretization_interval=1e-4)
    acc.compose(dp.ComposedDpEvent([dp.GaussianDpEvent(z) for z in zs]))
    for d in (1e-5, 1e-8):
        # Measured agreement: 5e-8 relative. 1e-4 leaves room for PLD discretisation, not for a wrong formula.
        assert epsilon_for(zs, d, adjacency) == pytest.approx(acc.get_epsilon(d), rel=1e-4)


@pytest.mark.parametrize("sigma", [1e-3, 0.01, 0.05, 0.3, 1.0, 5.0, 100.0])
@pytest.mark.parametrize("delta", [0.5, 1e-5, 1e-20, 1e-100, 1e-300])
def test_large_epsilon_and_tiny_delta_stay_accurate(sigma, delta):
    dp = pytest.importorskip("dp_accounting")
    ours = epsilon_for([sigma], delta)
    assert ours == pytest.approx(dp.get_epsilon_gaussian(sigma, delta), rel=EXACT_RTOL)


@settings(max_examples=60, deadline=None)
@given(st.floats(0.3, 100.0), st.integers(1, 500), st.floats(1e-12, 1e-2),
       st.sampled_from(["add_remove", "replace_one"]))
def test_epsilon_monotone(z, t, delta, adjacency):
    e = epsilon_for([z] * t, delta, adjacency)
    assert epsilon_for([z] * (t + 1), delta, adjacency) >= e  # more releases cost more
    assert epsilon_for([z * 1.1] * t, delta, adjacency) <= e  # more noise costs less
    assert epsilon_for([z] * t, delta * 2, adjacency) <= e  # larger δ, smaller ε
    if adjacency == "add_remove":
        assert epsilon_for([z] * t, delta, "replace_one") >= e  # replace-one is the stronger notion


@settings(max_examples=40, deadline=None)
@given(st.floats(0.5, 50.0), st.floats(0.05, 50.0), st.sampled_from(["add_remove", "replace_one"]))
def test_max_releases_is_the_exact_boundary(z, budget, adjacency):
    n = max_releases(z, budget, 1e-5, adjacency)
    if n > 0:
        assert epsilon_for([z] * n, 1e-5, adjacency) <= budget
    assert epsilon_for([z] * (n + 1), 1e-5, adjacency) > budget


def test_max_releases_reference_and_extremes():
    assert max_releases(10.0, 4.38, 1e-5) == 100  # ε(100) ≈ 4.3772 <= 4.38 < ε(101)
    assert max_releases(0.0, 10.0, 1e-5) == 0
    assert max_releases(0.5, 0.1, 1e-5) == 0
    assert max_releases(1e4, 1.0, 1e-5) > 1_000_000  # huge n: closed form, still fast


# ---------------------------------------------------------------------------------------------- ledger

def _open(path, **kw):
    args = dict(epsilon_budget=2.0, delta=1e-5, adjacency="add_remove")
    args.update(kw)
    return PrivacyLedger.open(path, **args)


def test_ledger_records_persists_and_survives_restart_in_another_process(tmp_path):
    path = tmp_path / "state" / "ledger.json"
    led = _open(path)
    assert path.exists() and led.epsilon == 0.0 and led.releases == []
    led.record_release("m:1", 10.0, 1.0, digest="sha256:" + "0" * 64)
    led.record_release("m:2", 12.0, 1.0)
    assert led.has_release("m:1") and not led.has_release("m:3")
    eps = led.epsilon
    assert eps == epsilon_for([10.0, 12.0], 1e-5)

    code = ("import sys, json\n"
            "from edge_sdk.privacy import PrivacyLedger\n"
            f"l = PrivacyLedger.open({str(path)!r}, epsilon_budget=2.0, delta=1e-5, adjacency='add_remove')\n"
            "print(json.dumps({'eps': l.epsilon, 'keys': [r.key for r in l.releases],\n"
            "                  'digest': l.releases[0].info['digest']}))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    got = json.loads(out.stdout)
    assert got["eps"] == eps and got["keys"] == ["m:1", "m:2"] and got["digest"].startswith("sha256:")
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no temp files left


def test_ledger_refuses_duplicates_and_over_budget_and_the_block_persists(tmp_path):
    path = tmp_path / "ledger.json"
    led = _open(path)
    n = led.remaining_releases(10.0)
    assert n == max_releases(10.0, 2.0, 1e-5) and n > 0
    for i in range(n):
        assert led.can_release(10.0)
        led.record_release(f"m:{i}", 10.0, 1.0)
    assert led.epsilon <= 2.0 and led.remaining_releases(10.0) == 0
    assert not led.can_release(10.0)
    with pytest.raises(BudgetExceeded):
        led.record_release(f"m:{n}", 10.0, 1.0)
    with pytest.raises(DuplicateRelease):
        led.record_release("m:0", 1e6, 1.0)  # a duplicate is refused even when it would be free
    assert len(led.releases) == n

    again = _open(path)  # restart: same ε, still blocked, still no duplicate
    assert again.epsilon == led.epsilon and len(again.releases) == n
    assert not again.can_release(10.0)
    with pytest.raises(BudgetExceeded):
        again.record_release(f"m:{n}", 10.0, 1.0)
    with pytest.raises(DuplicateRelease):
        again.record_release("m:1", 10.0, 1.0)
    assert again.can_release(1e9)  # ~free releases still fit
    with pytest.raises(BudgetExceeded):
        again.record_release("m:z0", 0.0, 1.0)  # z = 0 is ε = ∞


def test_mixed_multipliers_and_remaining_releases_agree_with_can_release(tmp_path):
    led = _open(tmp_path / "l.json", epsilon_budget=5.0, adjacency="replace_one")
    for i, z in enumerate([8.0, 15.0, 30.0]):
        led.record_release(f"k{i}", z, 0.5)
    assert led.epsilon == epsilon_for([8.0, 15.0, 30.0], 1e-5, "replace_one")
    n = led.remaining_releases(20.0)
    assert led.epsilon_after(20.0) <= 5.0
    for i in range(n):
        led.record_release(f"x{i}", 20.0, 0.5)
    assert not led.can_release(20.0)


def test_ledger_mismatch_is_an_error_and_budget_change_is_explicit(tmp_path):
    path = tmp_path / "l.json"
    _open(path).record_release("a", 10.0, 1.0)
    for kw in (dict(adjacency="replace_one"), dict(delta=1e-6), dict(epsilon_budget=3.0)):
        with pytest.raises(LedgerMismatch):
            _open(path, **kw)
    led = _open(path)
    led.set_epsilon_budget(3.0)
    assert _open(path, epsilon_budget=3.0).epsilon_budget == 3.0
    with pytest.raises(ValueError):
        led.set_epsilon_budget(0.0)


@pytest.mark.parametrize("kw", [dict(epsilon_budget=0.0), dict(epsilon_budget=math.inf), dict(delta=1.0),
                                dict(delta=0.0), dict(adjacency="bounded")])
def test_ledger_open_validates_settings(tmp_path, kw):
    with pytest.raises(ValueError):
        _open(tmp_path / "l.json", **kw)
    assert not (tmp_path / "l.json").exists()


def test_record_release_validates_arguments(tmp_path):
    led = _open(tmp_path / "l.json")
    for key in ("", "x" * 257, 5, "a\nb"):
        with pytest.raises(ValueError):
            led.record_release(key, 10.0, 1.0)
    with pytest.raises(ValueError):
        led.record_release("k", 10.0, 0.0)
    with pytest.raises(ValueError):
        led.record_release("k", 10.0, 1.0, blob=b"bytes")
    with pytest.raises(ValueError):
        led.record_release("k", 10.0, 1.0, x=math.nan)
    with pytest.raises(ValueError):
        led.record_release("k", 10.0, 1.0, s="y" * 600)
    assert led.releases == []


def _valid_doc(tmp_path) -> tuple[Path, dict]:
    path = tmp_path / "l.json"
    led = _open(path)
    led.record_release("a", 10.0, 1.0, note="x")
    return path, json.loads(path.read_text())


def _rewrite(path: Path, doc: dict, fix_checksum: bool = True) -> None:
    if fix_checksum:
        body = {k: v for k, v in doc.items() if k != "checksum"}
        doc = dict(body, checksum=privacy._body_checksum(body))
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda d: d["releases"].append(dict(d["releases"][0])), id="duplicate-key"),
    pytest.param(lambda d: d["releases"][0].__setitem__("noise_multiplier", -1.0), id="negative-z"),
    pytest.param(lambda d: d["releases"][0].__setitem__("noise_multiplier", 0), id="zero-z"),
    pytest.param(lambda d: d["releases"][0].__setitem__("clip_norm", "1.0"), id="string-number"),
    pytest.param(lambda d: d["releases"][0].__setitem__("extra", 1), id="extra-field"),
    pytest.param(lambda d: d["releases"][0].pop("time"), id="missing-field"),
    pytest.param(lambda d: d["releases"][0]["info"].__setitem__("deep", {"a": 1}), id="nested-info"),
    pytest.param(lambda d: d["accounting"].__setitem__("adjacency", "other"), id="bad-adjacency"),
    pytest.param(lambda d: d["accounting"].__setitem__("delta", 1.5), id="bad-delta"),
    pytest.param(lambda d: d["accounting"].__setitem__("mechanism", "laplace"), id="bad-mechanism"),
    pytest.param(lambda d: d.__setitem__("version", 0), id="old-version"),
    pytest.param(lambda d: d.__setitem__("releases", {"a": 1}), id="releases-not-list"),
    pytest.param(lambda d: d.__setitem__("format", "other"), id="bad-format"),
])
def test_corrupt_ledger_is_refused_not_reset(tmp_path, mutate):
    path, doc = _valid_doc(tmp_path)
    mutate(doc)
    _rewrite(path, doc)
    before = path.read_bytes()
    with pytest.raises(LedgerCorrupt, match="l.json"):
        _open(path)
    assert path.read_bytes() == before  # untouched


def test_corrupt_ledger_raw_bytes_variants(tmp_path):
    path, doc = _valid_doc(tmp_path)
    good = path.read_bytes()
    variants = {
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "garbage": b"\x00\xff\x13garbage",
        "not-object": b"[1, 2, 3]",
        "nan": good.replace(b'"noise_multiplier": 10.0', b'"noise_multiplier": NaN'),
        "duplicate-json-key": good.replace(b'"clip_norm": 1.0', b'"clip_norm": 1.0, "clip_norm": 2.0'),
        "checksum-mismatch": good.replace(b'"noise_multiplier": 10.0', b'"noise_multiplier": 11.0'),
    }
    assert variants["nan"] != good and variants["checksum-mismatch"] != good
    for name, data in variants.items():
        path.write_bytes(data)
        with pytest.raises(LedgerCorrupt):
            _open(path)
        assert path.read_bytes() == data, name


def test_newer_version_asks_for_upgrade(tmp_path):
    path, doc = _valid_doc(tmp_path)
    doc["version"] = 2
    _rewrite(path, doc)
    with pytest.raises(LedgerCorrupt, match="newer SDK"):
        _open(path)


def test_size_and_entry_limits(tmp_path, monkeypatch):
    path, doc = _valid_doc(tmp_path)
    monkeypatch.setattr(privacy, "MAX_LEDGER_BYTES", len(path.read_bytes()) - 1)
    with pytest.raises(LedgerCorrupt, match="larger than"):
        _open(path)
    monkeypatch.undo()

    doc["releases"] = [dict(doc["releases"][0], key=f"k{i}") for i in range(5)]
    _rewrite(path, doc)
    monkeypatch.setattr(privacy, "MAX_RELEASES", 4)
    with pytest.raises(LedgerCorrupt, match="limit"):
        _open(path)
    monkeypatch.setattr(privacy, "MAX_RELEASES", 5)
    led = _open(path)
    assert not led.can_release(1e9) and led.remaining_releases(1e9) == 0
    with pytest.raises(LedgerError, match="maximum"):
        led.record_release("k9", 1e9, 1.0)


def test_failed_write_records_nothing(tmp_path, monkeypatch):
    led = _open(tmp_path / "l.json")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(privacy.os, "replace", boom)
    with pytest.raises(OSError):
        led.record_release("a", 10.0, 1.0)
    monkeypatch.undo()
    assert led.releases == [] and not led.has_release("a")
    assert [p.name for p in tmp_path.iterdir()] == ["l.json"]  # temp file cleaned up
    led.record_release("a", 10.0, 1.0)  # and the ledger still works
    assert _open(tmp_path / "l.json").has_release("a")


def test_ledger_file_is_plain_json_with_stated_accounting(tmp_path):
    path = tmp_path / "l.json"
    _open(path, adjacency="replace_one").record_release("m:1", 10.0, 1.0)
    doc = json.loads(path.read_text())
    assert doc["format"] == "fedatt-privacy-ledger" and doc["version"] == 1
    assert doc["accounting"] == {"mechanism": "gaussian", "adjacency": "replace_one", "delta": 1e-5,
                                 "epsilon_budget": 2.0}
    assert doc["releases"][0]["key"] == "m:1" and doc["checksum"].startswith("sha256:")
    assert os.path.getsize(path) < 4096

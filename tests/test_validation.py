"""Update validation (broker/validation.py): every rejection reason, the norm bound, int8, late vs stale."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from broker.validation import (RoundContext, Rejection, norm_bound, quantization_allowance, validate_update)
from edge_sdk import wire
from edge_sdk.compression import quantize_int8

MID = "sha256:" + "ab" * 32
OTHER_MID = "sha256:" + "cd" * 32
SHAPES = {"w": (4, 3), "b": (3,)}
DIM = 15


def honest(rng: np.random.Generator, clip: float = 1.0, z: float = 0.0, norm: float | None = None
           ) -> dict[str, np.ndarray]:
    """An update a compliant device sends: Δ clipped to C (here: scaled to `norm` ≤ C), plus N(0, (zC)²)."""
    raw = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    n = math.sqrt(sum(float((v ** 2).sum()) for v in raw.values()))
    target = clip if norm is None else norm
    return {k: (v * target / n + z * clip * rng.standard_normal(v.shape)).astype(np.float32) for k, v in raw.items()}


def payload(device: str = "d1", rnd: int = 1, tensors=None, *, model_id: str = MID, clip: float = 1.0,
            z: float = 0.0, encoding: str = "f32", update_id: str = "0" * 32, num_examples: int = 10,
            seed: int = 0) -> bytes:
    if tensors is None:
        tensors = honest(np.random.default_rng(seed), clip, z)
    msg = wire.UpdateMessage(model_id=model_id, round=rnd, device_id=device, update_id=update_id,
                             num_examples=num_examples, clip_norm=clip, noise_multiplier=z, encoding=encoding,
                             tensors=tensors)
    quantized = None
    if encoding == "int8":
        qrng = np.random.default_rng(seed + 1)
        quantized = {k: quantize_int8(v, qrng) for k, v in tensors.items()}
    return wire.encode_update(msg, quantized)


def ctx(**kw) -> RoundContext:
    base = dict(model_id=MID, expected=SHAPES, open_round=1, last_closed_round=0, cohort=frozenset({"d1", "d2"}),
                accepted={}, clip_norm=1.0, noise_multiplier=0.0)
    base.update(kw)
    return RoundContext(**base)


def reason(topic_device: str, data: bytes, c: RoundContext) -> Rejection:
    with pytest.raises(Rejection) as e:
        validate_update(topic_device, data, c)
    return e.value


def test_honest_update_is_accepted():
    acc = validate_update("d1", payload(), ctx())
    assert acc.device_id == "d1" and acc.message.round == 1
    assert set(acc.tensors) == set(SHAPES)
    assert acc.norm == pytest.approx(1.0, rel=1e-5)
    assert acc.nbytes == len(payload())


@pytest.mark.parametrize("case, expected", [
    (lambda: ("d1", b"\x00" * 3000, ctx(max_update_bytes=2048)), "too_large"),
    (lambda: ("d1", b"garbage", ctx()), "bad_container"),
    (lambda: ("d1", payload("d2"), ctx()), "device_mismatch"),
    (lambda: ("d1", payload(model_id=OTHER_MID), ctx()), "wrong_model"),
    (lambda: ("d1", payload(rnd=3), ctx()), "stale_round"),
    (lambda: ("d1", payload(rnd=2), ctx(open_round=None, last_closed_round=1)), "no_round"),
    (lambda: ("d3", payload("d3"), ctx()), "not_in_cohort"),
    (lambda: ("d1", payload(), ctx(accepted={"d1": "f" * 32})), "duplicate"),
    (lambda: ("d1", payload(encoding="int8"), ctx(encodings=("f32",))), "bad_encoding"),
    (lambda: ("d1", payload(clip=2.0), ctx()), "bad_privacy"),
    (lambda: ("d1", payload(z=0.5), ctx()), "bad_privacy"),
    (lambda: ("d1", payload(num_examples=0), ctx()), "bad_field"),
    (lambda: ("d1", payload(tensors={"w": np.zeros((4, 3), np.float32)}), ctx()), "wrong_tensors"),
    (lambda: ("d1", payload(tensors={"w": np.zeros((3, 4), np.float32), "b": np.zeros(3, np.float32)}), ctx()),
     "bad_shape"),
    (lambda: ("d1", payload(tensors={"w": np.full((4, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)}),
              ctx()), "non_finite"),
    (lambda: ("d1", payload(tensors=honest(np.random.default_rng(0), norm=1.01)), ctx()), "norm_bound"),
])
def test_each_rejection_reason(case, expected):
    topic_device, data, c = case()
    assert reason(topic_device, data, c).reason == expected


def test_late_versus_stale():
    late = reason("d1", payload(rnd=1), ctx(open_round=2, last_closed_round=1))
    assert (late.reason, late.late) == ("stale_round", True)
    future = reason("d1", payload(rnd=3), ctx(open_round=2, last_closed_round=1))
    assert (future.reason, future.late) == ("stale_round", False)
    closed = reason("d1", payload(rnd=1), ctx(open_round=None, last_closed_round=1))
    assert (closed.reason, closed.late) == ("stale_round", True)


def test_duplicate_detail_tells_resend_from_second_update():
    data = payload(update_id="a" * 32)
    assert "identical re-send" in reason("d1", data, ctx(accepted={"d1": "a" * 32})).detail
    assert "different update_id" in reason("d1", data, ctx(accepted={"d1": "b" * 32})).detail


def test_size_limit_is_checked_before_parsing():
    # A syntactically broken payload over the limit is `too_large`, not `bad_container`: nothing was parsed.
    assert reason("d1", b"\xff" * 5000, ctx(max_update_bytes=4096)).reason == "too_large"


def test_norm_bound_formula():
    assert norm_bound(1.0, 0.0, 100) == 1.0
    assert norm_bound(2.0, 1.5, 100, t=8.0) == pytest.approx(2.0 + 3.0 * (10 + 8))
    assert quantization_allowance({"w": 0.5, "b": 0.1}, SHAPES) == pytest.approx(math.sqrt(0.25 * 12 + 0.01 * 3))


@pytest.mark.parametrize("z", [0.0, 0.5, 2.0, 10.0])
def test_honest_noised_updates_pass_the_bound(z):
    # 300 honest draws each, clipped exactly at C (the worst case), f32 and int8: none rejected.
    rng = np.random.default_rng(42)
    c = ctx(clip_norm=0.7, noise_multiplier=z)
    for i in range(300):
        enc = "int8" if i % 2 else "f32"
        t = honest(rng, clip=0.7, z=z)
        acc = validate_update("d1", payload(tensors=t, clip=0.7, z=z, encoding=enc, seed=i), c)
        assert acc.norm <= acc.bound


def test_bound_is_not_vacuous_under_noise():
    # With z = 2 the honest norm concentrates near zC√d ≈ 7.7 while the bound is C + zC(√d + 8) ≈ 24.7;
    # an update three times the typical honest length must fail.
    z, rng = 2.0, np.random.default_rng(1)
    t = honest(rng, clip=1.0, z=z)
    big = {k: v * 3.3 for k, v in t.items()}
    r = reason("d1", payload(tensors=big, z=z), ctx(noise_multiplier=z))
    assert r.reason == "norm_bound"
    assert norm_bound(1.0, z, DIM) == pytest.approx(1 + 2 * (math.sqrt(DIM) + 8))


def test_int8_scale_cannot_inflate_the_allowance():
    # An attacker picks a huge scale with tiny int8 values: the scale cap rejects it before the allowance counts.
    bound = norm_bound(1.0, 0.0, DIM)
    q = {"w": np.ones((4, 3), np.int8), "b": np.zeros(3, np.int8)}
    s = 10 * bound / 127
    msg = wire.UpdateMessage(model_id=MID, round=1, device_id="d1", update_id="0" * 32, num_examples=1,
                             clip_norm=1.0, noise_multiplier=0.0, encoding="int8",
                             tensors={k: v.astype(np.float32) * s for k, v in q.items()})
    data = wire.encode_update(msg, {k: (v, s) for k, v in q.items()})
    r = reason("d1", data, ctx())
    assert r.reason == "norm_bound" and "scale" in r.detail


def test_int8_honest_update_with_quantisation_error_passes():
    # Clipped exactly at C with z = 0: the dequantised norm may exceed C by the rounding error; still accepted.
    rng = np.random.default_rng(3)
    for seed in range(100):
        acc = validate_update("d1", payload(tensors=honest(rng), encoding="int8", seed=seed), ctx())
        assert acc.message.encoding == "int8"


def test_rejection_reasons_in_broker_are_documented():
    # tests/test_wire.py checks this for the whole tree; repeated here so this module fails on its own too.
    doc = (Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md").read_text()
    documented = set(re.findall(r"^\| ([a-z_0-9]+) \|", doc.split("## Rejection reasons")[1], re.M))
    root = Path(__file__).resolve().parents[1] / "broker"
    used = set()
    for name in ("validation.py", "rounds.py", "state.py"):
        used |= set(re.findall(r'(?:Rejection|reject)\(\s*"([a-z_0-9]+)"', (root / name).read_text()))
    assert used and used <= documented, used - documented

"""Every check an update passes before it touches the global model (pure functions, no I/O, no clock).

`validate_update(topic_device_id, payload, ctx)` returns an `AcceptedUpdate` or raises `Rejection(reason,
detail)`; `reason` is one of the codes in docs/PROTOCOL.md's "Rejection reasons" table and is what the round
engine counts. The checks run cheapest-first and the size limit runs before any parsing:

  too_large                    payload longer than the round's max_update_bytes (before decoding)
  (wire codes)                 edge_sdk.wire.decode_update: container, header, version, kind, fields, dtypes,
                               int8 layout, finite values
  device_mismatch              metadata device_id differs from the topic's (the topic is what the broker ACL
                               authenticated, so it is the identity we trust)
  wrong_model                  model_id is not the bundle this aggregator serves
  no_round / stale_round       see "late versus stale" below
  not_in_cohort                the device was not invited to the open round
  duplicate                    the device already has an accepted update in this round
  bad_encoding                 encoding valid in the protocol but not announced for this round
  bad_privacy                  clip_norm / noise_multiplier differ from the round's
  bad_field                    num_examples = 0 (nothing to weight; strategies need a positive count)
  wrong_tensors / bad_shape    tensor names/shapes differ from the manifest's trainable parameters
  non_finite                   NaN/Inf (wire checks it; repeated here because the model must never see one)
  norm_bound                   ‖Δ̃‖ larger than clipping at C plus noise at z can produce (derivation below)

Late versus stale (decision)
----------------------------
Both are rejected with the documented code `stale_round` ("update for a round other than the open one").
An update for a round *older* than the open one (or, with no round open, not newer than the last closed one)
is additionally flagged `late=True`: an honest device that was too slow. The engine counts those in the round
summary's `late` field. An update for a round *newer* than any announced one cannot come from an honest
device (rounds are announced only after they are checkpointed), so it is `stale_round` but not late. With no
round open at all and a newer round number, the code is `no_round`.
A device may re-send the identical bytes after a restart (same update_id): that is still a `duplicate` (it is
dropped, harmlessly) and the rejection's `detail` says "identical re-send" so operators can tell it from a
device that produced two different updates for one round.

Norm bound (derivation)
-----------------------
An honest device sends Δ̃ = clip(Δ, C) + n with ‖clip(Δ, C)‖ ≤ C and n ~ N(0, σ² I_d), σ = zC, d the number
of trainable coordinates. x ↦ ‖x‖ is 1-Lipschitz, so Gaussian concentration (Borell–TIS / Tsirelson–
Ibragimov–Sudakov) gives P(‖n‖ ≥ E‖n‖ + σt) ≤ exp(−t²/2), and E‖n‖ ≤ √(E‖n‖²) = σ√d by Jensen. Hence
    P(‖n‖ > σ(√d + t)) ≤ exp(−t²/2),
and by the triangle inequality ‖Δ̃‖ ≤ C + zC(√d + t) except with that probability. We take t = 8:
exp(−32) ≈ 1.3e−14 false rejections per honest update, while a malicious update can be at most about
C + zC(√d + 8) long (it is then clipped in effect; the strategies still weight it, see docs/STRATEGIES.md).

int8 (edge_sdk/compression.py): the device quantises x = Δ̃ per tensor l with scale s_l and unbiased
stochastic rounding, so every coordinate moves by less than one step: |x̂ − x| < s_l elementwise, hence
‖x̂_l − x_l‖ ≤ s_l√d_l and, the layers being orthogonal blocks, ‖x̂ − x‖ ≤ √(Σ_l s_l² d_l) ≤ Σ_l s_l√d_l.
So ‖x̂‖ ≤ B + √(Σ_l s_l² d_l) with B the f32 bound above. Because the device picks s_l, we also cap it:
an honest scale covers max|x_l| ≤ ‖x‖ ≤ B with 127 steps, so s_l ≤ B/127 (times float32 slack); a larger
scale is rejected as norm_bound, otherwise an attacker could inflate the allowance at will.
A relative slack of 1e−5 absorbs float32 rounding of the (float64-clipped) update.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from edge_sdk import wire

DEFAULT_NORM_T = 8.0
FLOAT_SLACK = 1e-5  # relative: float32 rounding of an update whose float64 norm is within the bound


class Rejection(Exception):
    """An update refused before it touched the model. `reason` is a PROTOCOL.md code; `late` see module doc."""

    def __init__(self, reason: str, detail: str, *, late: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.late = late


@dataclass(frozen=True)
class RoundContext:
    """What an update is checked against: the open round (or none) and the bundle's trainable parameters."""

    model_id: str
    expected: Mapping[str, tuple[int, ...]]  # manifest trainable parameter name -> shape, in manifest order
    open_round: int | None  # None: no round is open
    last_closed_round: int  # the global model's round (0 = initial parameters)
    cohort: frozenset[str] = frozenset()
    accepted: Mapping[str, str] = field(default_factory=dict)  # device -> update_id accepted this round
    clip_norm: float = 1.0
    noise_multiplier: float = 0.0
    encodings: tuple[str, ...] = wire.ENCODINGS
    max_update_bytes: int = wire.DEFAULT_LIMITS.max_tensor_message_bytes
    norm_t: float = DEFAULT_NORM_T


@dataclass(frozen=True)
class AcceptedUpdate:
    """An update that passed every check; `tensors` are float32, named and shaped as in the manifest."""

    message: wire.UpdateMessage
    norm: float
    bound: float
    nbytes: int

    @property
    def device_id(self) -> str:
        return self.message.device_id

    @property
    def tensors(self) -> dict[str, np.ndarray]:
        return self.message.tensors


def norm_bound(clip_norm: float, noise_multiplier: float, dim: int, t: float = DEFAULT_NORM_T) -> float:
    """Largest ‖Δ̃‖ an honest f32 update reaches except with probability exp(−t²/2): C + zC(√d + t)."""
    return clip_norm + noise_multiplier * clip_norm * (math.sqrt(dim) + t)


def quantization_allowance(scales: Mapping[str, float], expected: Mapping[str, tuple[int, ...]]) -> float:
    """Upper bound on ‖x̂ − x‖ for int8 with per-tensor scales s_l: √(Σ_l s_l² d_l) (≤ Σ_l s_l √d_l)."""
    return math.sqrt(sum(float(s) ** 2 * _size(expected[name]) for name, s in scales.items() if name in expected))


def validate_update(topic_device_id: str, payload: bytes, ctx: RoundContext,
                    limits: wire.Limits = wire.DEFAULT_LIMITS) -> AcceptedUpdate:
    """Run every check of the module docstring; return the accepted update or raise Rejection."""
    nbytes = len(payload)
    if nbytes > ctx.max_update_bytes:
        raise Rejection("too_large", f"{nbytes} bytes > round limit {ctx.max_update_bytes}")
    try:
        msg = wire.decode_update(payload, limits)
    except wire.WireError as exc:
        raise Rejection(exc.reason, exc.detail) from None
    if msg.device_id != topic_device_id:
        raise Rejection("device_mismatch", f"payload device_id {msg.device_id!r} != topic's {topic_device_id!r}")
    if msg.model_id != ctx.model_id:
        raise Rejection("wrong_model", f"model_id {msg.model_id[:20]}… is not this aggregator's {ctx.model_id[:20]}…")
    _check_round(msg.round, ctx)
    if topic_device_id not in ctx.cohort:
        raise Rejection("not_in_cohort", f"{topic_device_id} was not invited to round {ctx.open_round}")
    previous = ctx.accepted.get(topic_device_id)
    if previous is not None:
        kind = "identical re-send" if previous == msg.update_id else f"different update_id (first {previous})"
        raise Rejection("duplicate", f"{topic_device_id} already has an accepted update in round "
                                     f"{ctx.open_round}: {kind}")
    if msg.encoding not in ctx.encodings:
        raise Rejection("bad_encoding", f"encoding {msg.encoding!r} not announced for this round ({ctx.encodings})")
    if not (math.isclose(msg.clip_norm, ctx.clip_norm, rel_tol=1e-9)
            and math.isclose(msg.noise_multiplier, ctx.noise_multiplier, rel_tol=1e-9, abs_tol=1e-12)):
        raise Rejection("bad_privacy", f"clip_norm={msg.clip_norm} noise_multiplier={msg.noise_multiplier}, round "
                                       f"announced {ctx.clip_norm} and {ctx.noise_multiplier}")
    if msg.num_examples < 1:
        raise Rejection("bad_field", "num_examples must be >= 1 for an update to be aggregated")
    try:
        wire.check_tensors(msg.tensors, ctx.expected)
    except wire.WireError as exc:
        raise Rejection(exc.reason, exc.detail) from None
    sq = 0.0
    for name, arr in msg.tensors.items():
        a = np.asarray(arr, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(a)):
            raise Rejection("non_finite", f"tensor {name!r} has NaN or Inf")
        sq += float(np.dot(a, a))
    norm = math.sqrt(sq)
    dim = sum(_size(s) for s in ctx.expected.values())
    bound = norm_bound(ctx.clip_norm, ctx.noise_multiplier, dim, ctx.norm_t)
    if msg.encoding == wire.ENCODING_INT8:
        scales = int8_scales(payload)
        cap = bound / 127.0 * (1.0 + FLOAT_SLACK)
        too_big = {n: s for n, s in scales.items() if s > cap}
        if too_big:
            name, s = next(iter(too_big.items()))
            raise Rejection("norm_bound", f"int8 scale of {name!r} is {s:.6g} > {cap:.6g} = bound/127")
        bound += quantization_allowance(scales, ctx.expected)
    bound *= 1.0 + FLOAT_SLACK
    if not norm <= bound:
        raise Rejection("norm_bound", f"‖update‖ = {norm:.6g} > {bound:.6g} allowed by C={ctx.clip_norm}, "
                                      f"z={ctx.noise_multiplier}, d={dim}, t={ctx.norm_t}")
    return AcceptedUpdate(message=msg, norm=norm, bound=bound, nbytes=nbytes)


def _check_round(r: int, ctx: RoundContext) -> None:
    if ctx.open_round is None:
        if r <= ctx.last_closed_round:
            raise Rejection("stale_round", f"update for round {r}, already closed (no round open)", late=True)
        raise Rejection("no_round", f"update for round {r} but no round is open (last closed "
                                    f"{ctx.last_closed_round})")
    if r < ctx.open_round:
        raise Rejection("stale_round", f"update for round {r}, which has closed (open round {ctx.open_round})",
                        late=True)
    if r > ctx.open_round:
        raise Rejection("stale_round", f"update for round {r}, never announced (open round {ctx.open_round})")


def int8_scales(payload: bytes) -> dict[str, float]:
    """The per-tensor scales of an int8 update, read from the container (wire.decode_update already checked it)."""
    (header_len,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8:8 + header_len].decode("utf-8"))
    base = 8 + header_len
    out = {}
    for name, entry in header.items():
        if name == "__metadata__" or not name.endswith(wire.SCALE_SUFFIX):
            continue
        begin, _end = entry["data_offsets"]
        (scale,) = struct.unpack("<f", payload[base + begin:base + begin + 4])
        out[name[:-len(wire.SCALE_SUFFIX)]] = float(scale)
    return out


def _size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1

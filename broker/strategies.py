"""Aggregation strategies: fold one round's updates into a new global model (pure numerics, no I/O).

An update is `dict[str, np.ndarray]`, Δ_k = θ_k − θ per trainable layer. `make_aggregator(name, global_named,
**params)` returns an aggregator for one round; `add()` folds updates in as they arrive, `merge()` combines
partial aggregates of several shards, `finalize()` returns the new global model and an AggregationReport.

  fedatt              the paper's per-layer attention (broker/attention.py), streaming, O(model) memory
  fedatt-noise-aware  attention calibrated to each update's DP noise std, streaming, O(model) memory
  fedavg              example-weighted mean, streaming, O(model) memory
  median              coordinate-wise median: holds all K updates, O(K·model) memory
  trimmed_mean        coordinate-wise mean after trimming a fraction β per side: O(K·model) memory

Sums are float64 across blocks of ≤ 8 float32 updates (attention.BlockedSum); models come back float32.
Formulas and defaults: docs/STRATEGIES.md.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker.attention import (BlockedSum, OnlineSoftmax, noise_aware_score, normalized_entropy, paper_score,
                              sum_squares, unit_directions)

Named = Mapping[str, np.ndarray]

STRATEGIES = ("fedatt", "fedatt-noise-aware", "fedavg", "median", "trimmed_mean")
STATE_VERSION = 1


class AggregationError(ValueError):
    """An update or an aggregator operation was refused; the message says why."""


@dataclass
class AggregationReport:
    """What a round's aggregation did: per-device per-layer weights and summary statistics (JSON-able)."""

    strategy: str
    num_updates: int
    # {device_id: {layer: weight}}; empty for the coordinate-wise rules (no per-device weight exists).
    weights: dict[str, dict[str, float]]
    # Per layer: entropy of the weights / log m (1 = uniform) and the largest weight.
    layer_entropy: dict[str, float] = field(default_factory=dict)
    layer_max_weight: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return {"strategy": self.strategy, "num_updates": self.num_updates, "weights": self.weights,
                "layer_entropy": self.layer_entropy, "layer_max_weight": self.layer_max_weight,
                "params": self.params, "extra": self.extra}


# --------------------------------------------------------------------------------------------- pure rules
def fedavg_direct(global_named: Named, updates: Sequence[Named], num_examples: Sequence[int]
                  ) -> dict[str, np.ndarray]:
    """Example-weighted mean: θ + Σ n_k·Δ_k / Σ n_k."""
    total = float(sum(num_examples))
    return {name: (np.asarray(theta, np.float64) + sum(
        n * np.asarray(u[name], np.float64) for n, u in zip(num_examples, updates)) / total).astype(np.float32)
        for name, theta in global_named.items()}


def median_direct(global_named: Named, updates: Sequence[Named]) -> dict[str, np.ndarray]:
    """Coordinate-wise median: θ + median_k(Δ_k)."""
    return {name: (np.asarray(theta, np.float64) + np.median(
        np.stack([np.asarray(u[name], np.float64) for u in updates]), axis=0)).astype(np.float32)
        for name, theta in global_named.items()}


def trim_count(m: int, beta: float) -> int:
    """How many values trimmed_mean drops from each side of m: ⌊β·m⌋ (scipy.stats.trim_mean's convention)."""
    return int(math.floor(beta * m + 1e-12))


def trimmed_mean_direct(global_named: Named, updates: Sequence[Named], beta: float) -> dict[str, np.ndarray]:
    """Coordinate-wise trimmed mean: drop the ⌊β·m⌋ smallest and largest values per coordinate, average the rest."""
    m = len(updates)
    t = trim_count(m, beta)
    if m - 2 * t < 1:
        raise AggregationError(f"trimmed_mean: beta={beta} trims all {m} updates")
    out = {}
    for name, theta in global_named.items():
        s = np.sort(np.stack([np.asarray(u[name], np.float64) for u in updates]), axis=0)
        out[name] = (np.asarray(theta, np.float64) + s[t:m - t].mean(axis=0)).astype(np.float32)
    return out


# ------------------------------------------------------------------------------------------- aggregators
class Aggregator:
    """One round's aggregation: add updates as they arrive, merge shards, finalize once."""

    name = ""
    # Rules that score by ‖Δ‖ get each layer's Σ Δ² from the validation pass (see _check_update); the others
    # check finiteness with np.isfinite, which is ~3× cheaper than a float64 sum of squares.
    _wants_norms = False

    def __init__(self, global_named: Named) -> None:
        if not global_named:
            raise AggregationError("global model has no trainable layers")
        self._global: dict[str, np.ndarray] = {}
        for k, v in global_named.items():
            a = np.asarray(v)
            if not np.issubdtype(a.dtype, np.floating):
                raise AggregationError(f"global layer {k!r} has non-float dtype {a.dtype}")
            # A copy (the caller may reuse its buffers) in its own dtype: finalize adds the float64 step to it in
            # float64 anyway, and a float64 copy of a float32 model cost 8 bytes per parameter for nothing.
            self._global[k] = np.array(a)
        # device ids in arrival order; a dict so membership is O(1) (a 1,000-device round searched a list per add)
        self._devices: dict[str, None] = {}
        self._finalized = False

    # -- public API
    @property
    def count(self) -> int:
        """Number of updates folded in (including merged shards)."""
        return len(self._devices)

    def add(self, device_id: str, update: Named, *, num_examples: int, noise_std: float = 0.0) -> None:
        """Fold in one device's update Δ (validated against the global model's layers and shapes)."""
        if self._finalized:
            raise AggregationError("aggregator already finalized")
        if not isinstance(device_id, str) or not device_id:
            raise AggregationError("device_id must be a non-empty string")
        if device_id in self._devices:
            raise AggregationError(f"device {device_id!r} already added this round")
        if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples <= 0:
            raise AggregationError(f"num_examples must be a positive integer, got {num_examples!r}")
        sigma = float(noise_std)
        if not math.isfinite(sigma) or sigma < 0:
            raise AggregationError(f"noise_std must be finite and >= 0, got {noise_std!r}")
        checked, sumsq = self._check_update(device_id, update)
        self._add(device_id, checked, sumsq, int(num_examples), sigma)
        self._devices[device_id] = None

    def merge(self, other: Aggregator) -> None:
        """Fold in another shard's partial aggregate (same strategy, parameters and global; disjoint devices)."""
        if self._finalized or other._finalized:
            raise AggregationError("cannot merge a finalized aggregator")
        if type(other) is not type(self) or other._params() != self._params():
            raise AggregationError(f"cannot merge {other.name} {other._params()} into {self.name} {self._params()}")
        if {k: v.shape for k, v in other._global.items()} != {k: v.shape for k, v in self._global.items()}:
            raise AggregationError("cannot merge aggregators built on different global models")
        overlap = self._devices.keys() & other._devices.keys()
        if overlap:
            raise AggregationError(f"devices present in both shards: {sorted(overlap)}")
        self._merge(other)
        self._devices.update(other._devices)

    def finalize(self) -> tuple[dict[str, np.ndarray], AggregationReport]:
        """New global model (float32) and the report; refuses an empty round."""
        if not self._devices:
            raise AggregationError(f"{self.name}: no updates to aggregate (finalize called with zero updates)")
        self._finalized = True
        step, weights, extra = self._finalize()
        # θ + step computed in float64, rounded once into the float32 result: one pass, no float64 temporary
        new = {k: np.add(theta, step[k], out=np.empty(theta.shape, np.float32), casting="same_kind")
               for k, theta in self._global.items()}
        self._after_finalize(step)
        report = AggregationReport(strategy=self.name, num_updates=self.count, weights=weights,
                                   params=self._params(), extra=extra)
        if weights:
            for layer in self._global:
                alpha = np.array([weights[d][layer] for d in self._devices])
                report.layer_entropy[layer] = normalized_entropy(alpha)
                report.layer_max_weight[layer] = float(alpha.max())
        return new, report

    def state_dict(self) -> dict[str, Any]:
        """Cross-round strategy state (numpy arrays + JSON-able scalars, no pickle); {} if the rule has none."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore cross-round state before any update is added."""
        if state:
            raise AggregationError(f"{self.name} keeps no cross-round state")

    # -- helpers for subclasses
    def _check_update(self, device_id: str, update: Named) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        # Exact names and shapes, floats, finite values: numpy must never broadcast a wrong shape silently.
        # Returns the arrays and each layer's Σ Δ² (0 for rules without norms): for the attention rules one pass
        # both proves every value finite (a float32 square cannot overflow a float64 sum) and gives their scores.
        if not isinstance(update, Mapping):
            raise AggregationError(f"{device_id}: update must be a mapping of layer name to array")
        missing = self._global.keys() - update.keys()
        unknown = update.keys() - self._global.keys()
        if missing or unknown:
            raise AggregationError(f"{device_id}: layers do not match the global model "
                                   f"(missing {sorted(missing)}, unknown {sorted(unknown)})")
        out, sumsq = {}, {}
        for name, ref in self._global.items():
            a = np.asarray(update[name])
            if a.shape != ref.shape:
                raise AggregationError(f"{device_id}: layer {name!r} has shape {a.shape}, expected {ref.shape}")
            if not np.issubdtype(a.dtype, np.floating):
                raise AggregationError(f"{device_id}: layer {name!r} has non-float dtype {a.dtype}")
            if self._wants_norms:
                ss = sum_squares(a)
                finite = math.isfinite(ss) or bool(np.isfinite(a).all())  # the second test only to say which
                if finite and not math.isfinite(ss):
                    raise AggregationError(f"{device_id}: layer {name!r} has a norm beyond float64 range")
            else:
                ss, finite = 0.0, bool(np.isfinite(a).all())
            if not finite:
                raise AggregationError(f"{device_id}: layer {name!r} contains NaN or Inf")
            out[name], sumsq[name] = a, ss
        return out, sumsq

    def _params(self) -> dict[str, Any]:
        return {}

    def _after_finalize(self, step: dict[str, np.ndarray]) -> None:
        pass

    def _add(self, device_id: str, update: dict[str, np.ndarray], sumsq: dict[str, float], n: int,
             sigma: float) -> None:
        raise NotImplementedError

    def _merge(self, other: Any) -> None:
        raise NotImplementedError

    def _finalize(self) -> tuple[dict[str, np.ndarray], dict[str, dict[str, float]], dict[str, Any]]:
        raise NotImplementedError


class FedAvgAggregator(Aggregator):
    """fedavg: θ + Σ n_k·Δ_k / Σ n_k, streaming (running Σ n_k·Δ_k and Σ n_k)."""

    name = "fedavg"

    def __init__(self, global_named: Named) -> None:
        super().__init__(global_named)
        self._sum = {k: BlockedSum(v.shape) for k, v in self._global.items()}
        self._n: dict[str, int] = {}

    def _add(self, device_id, update, sumsq, n, sigma):
        for k, a in update.items():
            self._sum[k].add(a, float(n))
        self._n[device_id] = n

    def _merge(self, other):
        for k, acc in self._sum.items():
            acc.add(other._sum[k].result())
        self._n.update(other._n)

    def _finalize(self):
        total = float(sum(self._n.values()))
        step = {k: s.result() / total for k, s in self._sum.items()}
        weights = {d: {layer: n / total for layer in self._global} for d, n in self._n.items()}
        return step, weights, {"total_examples": int(total)}


class FedAttAggregator(Aggregator):
    """fedatt (Ji et al. 2019): per layer θ + ε·Σ_k softmax_k(‖Δ_k‖)·Δ_k, streaming via an online softmax."""

    name = "fedatt"
    _wants_norms = True
    _plain_sum = False  # the noise-aware subclass also needs Σ Δ_k, folded in the same pass

    def __init__(self, global_named: Named, *, eps: float = 1.0) -> None:
        super().__init__(global_named)
        if not (math.isfinite(eps) and eps > 0):
            raise AggregationError(f"eps must be > 0, got {eps}")
        self.eps = float(eps)
        self._acc = {k: OnlineSoftmax(v.shape, plain_sum=self._plain_sum) for k, v in self._global.items()}
        # Only per-device scalar scores are kept, to report the final weights: O(K·layers), not O(K·model).
        self._scores: dict[str, dict[str, float]] = {}
        self._sigmas: dict[str, float] = {}

    def _params(self):
        return {"eps": self.eps}

    def _score(self, name: str, delta: np.ndarray, sumsq: float, sigma: float) -> float:
        # The paper's rule ignores noise_std on purpose: it is the baseline the noise-aware rule is measured against.
        return paper_score(delta, sumsq=sumsq)

    def _add(self, device_id, update, sumsq, n, sigma):
        # Every score before any fold: a refused update must leave no partial trace in the running sums.
        scores = {k: self._score(k, a, sumsq[k], sigma) for k, a in update.items()}
        bad = sorted(k for k, s in scores.items() if not math.isfinite(s))
        if bad:
            raise AggregationError(f"{device_id}: attention score is not finite for layers {bad}")
        for k, a in update.items():
            self._acc[k].add(scores[k], a)
        self._scores[device_id] = scores
        self._sigmas[device_id] = sigma

    def _merge(self, other):
        for k, acc in self._acc.items():
            acc.merge(other._acc[k])
        self._scores.update(other._scores)
        self._sigmas.update(other._sigmas)

    def _finalize(self):
        weights = {d: {k: self._acc[k].weight(s[k]) for k in self._global} for d, s in self._scores.items()}
        step = {}
        for k, acc in self._acc.items():
            s = acc.mean()  # a fresh array: scaled in place instead of a second full-size temporary
            if self.eps != 1.0:
                s *= self.eps
            step[k] = s
        return step, weights, {"scores": self._scores}


class NoiseAwareAggregator(FedAttAggregator):
    """fedatt-noise-aware: bias-corrected, noise-calibrated scores, uniform floor λ, optional direction term γ."""

    name = "fedatt-noise-aware"
    _plain_sum = True

    def __init__(self, global_named: Named, *, eps: float = 1.0, temperature: float = 1.0,
                 noise_scale: float = 1.0, floor: float = 0.1, direction_weight: float = 0.0,
                 direction_decay: float = 0.9, state: Mapping[str, Any] | None = None) -> None:
        super().__init__(global_named, eps=eps)
        checks = {"temperature": (temperature, temperature > 0), "noise_scale": (noise_scale, noise_scale >= 0),
                  "floor": (floor, 0 <= floor <= 1), "direction_weight": (direction_weight, 0 <= direction_weight <= 1),
                  "direction_decay": (direction_decay, 0 <= direction_decay < 1)}
        for key, (value, ok) in checks.items():
            if not ok:
                raise AggregationError(f"{key} out of range: {value}")
        self.temperature, self.noise_scale, self.floor = float(temperature), float(noise_scale), float(floor)
        self.direction_weight, self.direction_decay = float(direction_weight), float(direction_decay)
        self._ema: dict[str, np.ndarray] = {}   # smoothed global step g (state carried across rounds)
        self._rounds = 0
        self._dirs: dict[str, np.ndarray | None] = {}
        if state:
            self.load_state_dict(state)

    def _params(self):
        return {"eps": self.eps, "temperature": self.temperature, "noise_scale": self.noise_scale,
                "floor": self.floor, "direction_weight": self.direction_weight,
                "direction_decay": self.direction_decay}

    def _score(self, name, delta, sumsq, sigma):
        return noise_aware_score(delta, sigma, temperature=self.temperature, noise_scale=self.noise_scale,
                                 direction_weight=self.direction_weight, direction=self._dirs.get(name),
                                 sumsq=sumsq)

    def _merge(self, other):
        if other._rounds != self._rounds or other._ema.keys() != self._ema.keys() or any(
                not np.array_equal(other._ema[k], self._ema[k]) for k in self._ema):
            raise AggregationError("cannot merge shards that started from different strategy state")
        super()._merge(other)

    def _finalize(self):
        m = self.count
        lam = self.floor
        weights = {d: {k: (1 - lam) * self._acc[k].weight(s[k]) + lam / m for k in self._global}
                   for d, s in self._scores.items()}
        # The floor mixes in the plain mean Σ Δ_k / m, which each OnlineSoftmax kept (plain_sum) in the same pass.
        step = {}
        for k, acc in self._acc.items():
            s = acc.mean()  # ε·((1−λ)·mean + λ·total/m) with one full-size temporary
            s *= self.eps * (1 - lam)
            s += (self.eps * lam / m) * acc.plain_total()
            step[k] = s
        extra = {"scores": self._scores, "noise_std": self._sigmas,
                 "direction_used": sorted(k for k, g in self._dirs.items() if g is not None)}
        return step, weights, extra

    def _after_finalize(self, step):
        # g ← β·g + (1−β)·step: public (post-processing of already-noised updates), so free of privacy cost.
        b = self.direction_decay
        for k, s in step.items():
            self._ema[k] = (b * self._ema[k] + (1 - b) * s) if k in self._ema else s.copy()
        self._rounds += 1

    def state_dict(self) -> dict[str, Any]:
        """{"version", "rounds", "direction_decay", "direction/<layer>": float32 array}: the smoothed step g."""
        out: dict[str, Any] = {"version": STATE_VERSION, "rounds": self._rounds,
                               "direction_decay": self.direction_decay}
        for k, g in self._ema.items():
            out[f"direction/{k}"] = g.astype(np.float32)
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self._devices:
            raise AggregationError("load_state_dict must come before the first update (scores depend on it)")
        if int(state.get("version", -1)) != STATE_VERSION:
            raise AggregationError(f"unsupported strategy state version {state.get('version')!r}")
        ema = {}
        for key, val in state.items():
            if not key.startswith("direction/"):
                continue
            name = key[len("direction/"):]
            a = np.asarray(val)
            if name not in self._global or a.shape != self._global[name].shape:
                raise AggregationError(f"state layer {name!r} does not match the global model")
            if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
                raise AggregationError(f"state layer {name!r} is not a finite float array")
            ema[name] = a.astype(np.float64)
        self._ema = ema
        self._rounds = int(state.get("rounds", 0))
        self._dirs = unit_directions(ema)


class _Holding(Aggregator):
    """Base of the coordinate-wise rules: they need every update at once, so they keep all K of them."""

    def __init__(self, global_named: Named) -> None:
        super().__init__(global_named)
        self._updates: dict[str, dict[str, np.ndarray]] = {}

    def _add(self, device_id, update, sumsq, n, sigma):
        # A private copy (float32 halves the O(K·model) footprint; it is the wire's precision anyway).
        self._updates[device_id] = {k: np.array(a, dtype=np.float32) for k, a in update.items()}

    def _merge(self, other):
        self._updates.update(other._updates)

    def _ordered(self) -> list[dict[str, np.ndarray]]:
        # Sorted by device id so the float64 sums are identical whatever the arrival order or shard split.
        return [self._updates[d] for d in sorted(self._updates)]


class MedianAggregator(_Holding):
    """median: θ + coordinate-wise median of the updates (O(K·model) memory)."""

    name = "median"

    def _finalize(self):
        ups = self._ordered()
        step = {k: np.median(np.stack([u[k].astype(np.float64) for u in ups]), axis=0) for k in self._global}
        return step, {}, {}


class TrimmedMeanAggregator(_Holding):
    """trimmed_mean: θ + coordinate-wise mean after dropping ⌊β·m⌋ values per side (O(K·model) memory)."""

    name = "trimmed_mean"

    def __init__(self, global_named: Named, *, beta: float = 0.1) -> None:
        super().__init__(global_named)
        if not 0 <= beta < 0.5:
            raise AggregationError(f"beta must be in [0, 0.5), got {beta}")
        self.beta = float(beta)

    def _params(self):
        return {"beta": self.beta}

    def _finalize(self):
        ups = self._ordered()
        t = trim_count(len(ups), self.beta)
        if len(ups) - 2 * t < 1:
            raise AggregationError(f"trimmed_mean: beta={self.beta} trims all {len(ups)} updates")
        step = {}
        for k in self._global:
            s = np.sort(np.stack([u[k].astype(np.float64) for u in ups]), axis=0)
            step[k] = s[t:len(ups) - t].mean(axis=0)
        return step, {}, {"trimmed_per_side": t}


_CLASSES: dict[str, type[Aggregator]] = {
    "fedatt": FedAttAggregator, "fedatt-noise-aware": NoiseAwareAggregator, "fedavg": FedAvgAggregator,
    "median": MedianAggregator, "trimmed_mean": TrimmedMeanAggregator,
}


def make_aggregator(name: str, global_named: Named, **params: Any) -> Aggregator:
    """A fresh aggregator for one round of strategy `name` (one of STRATEGIES) on `global_named`."""
    cls = _CLASSES.get(name)
    if cls is None:
        raise AggregationError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    try:
        return cls(global_named, **params)
    except TypeError as e:  # an unknown keyword: say which strategy refused it
        raise AggregationError(f"{name}: bad parameters {sorted(params)}: {e}") from None

"""Attention scores for the fedatt rules, the online (streaming) softmax that folds them in, and direct forms.

Pure numerics over per-layer numpy arrays (Flower's aggregate.py style): no I/O, no broker state. The
aggregator classes in broker/strategies.py decide *when* to call these; docs/STRATEGIES.md gives the
formulas and the measurements behind the defaults.

Two scores, both per device k and layer l, both computable from one update alone (what streaming needs):
  * paper (FedAtt, Ji et al. 2019):   s = ‖Δ_k^l‖                      (Frobenius norm of the layer's update)
  * noise-aware:                      s = (1-γ)·shrink(ŝ, σ·(2d)^¼) + γ·shrink(⟨Δ̃, ĝ⟩, σ)
    with ŝ = sgn(u)·√|u|, u = ‖Δ̃‖² − d·σ² (unbiased for ‖Δ‖²), ĝ a unit direction carried across rounds, and
    shrink(x, n) = x·τ/(τ² + κ²n²): x/τ without noise (the paper's logit at temperature τ), → 0 as the noise
    scale n of x grows, so weights tend to uniform exactly when the scores stop carrying information.
The weights are α_k^l = softmax_k(s_k^l); the noise-aware rule then mixes in a uniform floor λ.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

Named = Mapping[str, np.ndarray]


def layer_norm(delta: np.ndarray) -> float:
    """Frobenius (Euclidean over all entries) norm of one layer's update, accumulated in float64."""
    flat = np.asarray(delta, dtype=np.float64).ravel()
    return math.sqrt(float(np.dot(flat, flat)))


def paper_score(delta: np.ndarray) -> float:
    """FedAtt's score s = ‖θ − θ_k‖ = ‖Δ_k‖ for one layer (the client furthest away scores highest)."""
    return layer_norm(delta)


def shrink(x: float, noise: float, temperature: float, noise_scale: float) -> float:
    """Logit of a score x whose noise has std-like scale `noise`: x·τ/(τ² + κ²·noise²)."""
    # Posterior-mean style shrinkage: without noise this is x/τ; pure noise (x ~ noise) gives logits at most
    # 1/(2κ) in size (reached at κ·noise = τ) and shrinking like τ/(κ²·noise) beyond: a large σ cannot
    # concentrate the softmax on one random device, it flattens it towards the uniform mean instead.
    return x * temperature / (temperature * temperature + (noise_scale * noise) ** 2)


def noise_aware_score(delta: np.ndarray, noise_std: float, *, temperature: float = 1.0,
                      noise_scale: float = 1.0, direction_weight: float = 0.0,
                      direction: np.ndarray | None = None) -> float:
    """Noise-calibrated attention logit of one layer's noised update (see the module docstring)."""
    flat = np.asarray(delta, dtype=np.float64).ravel()
    d = flat.size
    sigma = float(noise_std)
    # u is unbiased for the true ‖Δ‖²: the noise adds d·σ² in expectation, whoever the device is. Without this
    # correction the device with the largest σ (the *noisiest* one) would always score highest.
    u = float(np.dot(flat, flat)) - d * sigma * sigma
    # Signed square root: back in the paper's units (a norm) and monotone in u, so no information is lost.
    s_norm = math.copysign(math.sqrt(abs(u)), u)
    # u's noise has std σ²·√(2d) (when Δ = 0), so s_norm's noise scale is σ·(2d)^¼.
    logit = (1.0 - direction_weight) * shrink(s_norm, sigma * (2.0 * d) ** 0.25, temperature, noise_scale)
    if direction_weight and direction is not None:
        # ⟨Δ̃, ĝ⟩ carries noise N(0, σ²) whatever d is: a √d better signal-to-noise ratio than the norm.
        proj = float(np.dot(flat, np.asarray(direction, dtype=np.float64).ravel()))
        logit += direction_weight * shrink(proj, sigma, temperature, noise_scale)
    return logit


def softmax(scores: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over a 1-D array of scores (float64)."""
    s = np.asarray(scores, dtype=np.float64)
    e = np.exp(s - s.max())
    return e / e.sum()


def with_floor(alpha: np.ndarray, floor: float) -> np.ndarray:
    """Uniform floor α ← (1−λ)·α + λ/m: no device's weight drops below λ/m nor rises above 1−λ+λ/m."""
    return (1.0 - floor) * alpha + floor / alpha.size


def normalized_entropy(alpha: np.ndarray) -> float:
    """Entropy of a weight vector divided by log m (1 = uniform, 0 = all weight on one device)."""
    a = np.asarray(alpha, dtype=np.float64)
    if a.size <= 1:
        return 1.0
    nz = a[a > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(a.size))


def unit_directions(direction_ema: Named) -> dict[str, np.ndarray | None]:
    """Per-layer unit vectors ĝ = g/‖g‖ of the smoothed global step (None where g is zero)."""
    out: dict[str, np.ndarray | None] = {}
    for name, g in direction_ema.items():
        n = layer_norm(g)
        out[name] = (np.asarray(g, dtype=np.float64) / n) if n > 0 and math.isfinite(n) else None
    return out


class OnlineSoftmax:
    """Streaming Σ_k softmax_k(s_k)·Δ_k for one layer: running max, denominator and numerator, O(layer) memory.

    Invariant: den = Σ e^(s_k − mx), num = Σ e^(s_k − mx)·Δ_k over the updates folded in so far. When a larger
    score arrives both are rescaled by e^(mx_old − mx_new), so nothing overflows and the result equals the
    all-in-memory softmax up to float rounding, in any order and across merged shards.
    """

    __slots__ = ("mx", "den", "num")

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.mx = -math.inf
        self.den = 0.0
        self.num = np.zeros(shape, dtype=np.float64)

    def add(self, score: float, delta: np.ndarray) -> None:
        """Fold in one update with its score."""
        if score > self.mx:
            self._rescale(score)
        w = math.exp(score - self.mx)
        self.den += w
        self.num += w * np.asarray(delta, dtype=np.float64)

    def merge(self, other: OnlineSoftmax) -> None:
        """Fold in another shard's partial sums (the same layer, disjoint devices)."""
        if other.den == 0.0:
            return
        if other.mx > self.mx:
            self._rescale(other.mx)
        w = math.exp(other.mx - self.mx)
        self.den += w * other.den
        self.num += w * other.num

    def _rescale(self, new_max: float) -> None:
        # From -inf (nothing folded in yet) there is nothing to rescale; exp(-inf - x) would be 0 anyway, but
        # multiplying a zero array is a wasted O(d) pass.
        if self.den != 0.0:
            scale = math.exp(self.mx - new_max)
            self.den *= scale
            self.num *= scale
        self.mx = new_max

    def weight(self, score: float) -> float:
        """Final softmax weight of a device that was folded in with `score`."""
        return math.exp(score - self.mx) / self.den

    def mean(self) -> np.ndarray:
        """Σ_k α_k·Δ_k (float64)."""
        return self.num / self.den


def _stack_scores(updates: Sequence[Named], name: str, score) -> np.ndarray:
    return np.array([score(k, u[name]) for k, u in enumerate(updates)], dtype=np.float64)


def fedatt_direct(global_named: Named, updates: Sequence[Named], eps: float = 1.0
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The paper's rule with every update in memory: θ^l + ε·Σ_k softmax_k(‖Δ_k^l‖)·Δ_k^l; returns (θ', α per layer)."""
    new, alphas = {}, {}
    for name, theta in global_named.items():
        alpha = softmax(_stack_scores(updates, name, lambda k, d: paper_score(d)))
        step = sum(a * np.asarray(u[name], dtype=np.float64) for a, u in zip(alpha, updates))
        new[name] = (np.asarray(theta, dtype=np.float64) + eps * step).astype(np.float32)
        alphas[name] = alpha
    return new, alphas


def noise_aware_direct(global_named: Named, updates: Sequence[Named], noise_stds: Sequence[float], *,
                       eps: float = 1.0, temperature: float = 1.0, noise_scale: float = 1.0,
                       floor: float = 0.1, direction_weight: float = 0.0,
                       directions: Mapping[str, np.ndarray | None] | None = None
                       ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The noise-aware rule with every update in memory: θ^l + ε·Σ_k ((1−λ)α_k^l + λ/m)·Δ̃_k^l; returns (θ', α)."""
    new, alphas = {}, {}
    for name, theta in global_named.items():
        g = (directions or {}).get(name)
        scores = _stack_scores(updates, name, lambda k, d: noise_aware_score(
            d, noise_stds[k], temperature=temperature, noise_scale=noise_scale,
            direction_weight=direction_weight, direction=g))
        alpha = with_floor(softmax(scores), floor)
        step = sum(a * np.asarray(u[name], dtype=np.float64) for a, u in zip(alpha, updates))
        new[name] = (np.asarray(theta, dtype=np.float64) + eps * step).astype(np.float32)
        alphas[name] = alpha
    return new, alphas

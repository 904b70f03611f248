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


# Streaming numerics work on chunks of this many elements: scratch buffers of 128–256 KiB stay in L2 (no full-size
# temporaries, which cost 6–8 memory passes per update in the first version), and a chunk is long enough that the
# per-call overhead of numpy stays small (measured at P = 1e5, K = 1000: 8,192 made fedatt ~1.3× slower, 4,096 ~2.2×);
# it also bounds the float32 partial sums of sum_squares.
CHUNK = 1 << 15


def _flat(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).reshape(-1)


def sum_squares(delta: np.ndarray) -> float:
    """Σ x² over all entries, chunk sums added in float64 (inf if an entry is non-finite or the sum overflows).

    float32 input (what the wire carries) is summed in float32 per chunk of CHUNK elements (einsum's SIMD
    sum of products, several partial sums), and the chunk sums are added in float64. Relative error measured
    ≤ 5e-7 over 200 chunks of varied scale and mean; converting every element to float64 first cost ~3× as
    much (docs/PERFORMANCE.md §2). That rounding is far below what the scores resolve: the noise-aware score's
    u = Σx² − dσ² has an inherent noise std of σ²√(2d), ~10⁴ times larger for the updates we see. A chunk
    whose float32 squares or sum overflow (|x| ≳ 1e17) is redone in float64. Other dtypes go through float64.
    """
    # einsum, not np.dot: np.dot hands the work to OpenBLAS, whose thread pool cost milliseconds per call on a
    # busy 2-core machine (profiled: 5 ms vs 45 µs for 60k elements); einsum's own loop is single-threaded.
    flat = _flat(delta)
    if flat.dtype == np.float64 and flat.size <= CHUNK:
        return float(np.einsum("i,i->", flat, flat))
    total = 0.0
    if flat.dtype == np.float32:
        for i in range(0, flat.size, CHUNK):
            chunk = flat[i:i + CHUNK]
            part = float(np.einsum("i,i->", chunk, chunk))
            if math.isinf(part):  # float32 overflow (or a real inf, which float64 keeps): redo in float64
                wide = chunk.astype(np.float64)
                part = float(np.einsum("i,i->", wide, wide))
            total += part
        return total
    buf = np.empty(min(flat.size, CHUNK), dtype=np.float64)
    for i in range(0, flat.size, CHUNK):
        b = buf[:min(CHUNK, flat.size - i)]
        np.copyto(b, flat[i:i + CHUNK])
        total += float(np.einsum("i,i->", b, b))
    return total


def dot64(delta: np.ndarray, other: np.ndarray) -> float:
    """⟨delta, other⟩ over all entries in float64, chunked like sum_squares (no BLAS, no full-size temporary)."""
    x, y = _flat(delta), _flat(other)
    buf = np.empty(min(x.size, CHUNK), dtype=np.float64)
    total = 0.0
    for i in range(0, x.size, CHUNK):
        b = buf[:min(CHUNK, x.size - i)]
        np.copyto(b, x[i:i + CHUNK])
        total += float(np.einsum("i,i->", b, np.asarray(y[i:i + CHUNK], dtype=np.float64)))
    return total


def fold_scaled(dst: np.ndarray, src: np.ndarray, weight: float) -> None:
    """dst += weight·src into a float64 dst, chunked.

    The product weight·src is formed in src's precision (float32 on the wire) and accumulated in float64: its
    rounding (≤ 2⁻²⁴ relative) is that of the float32 input itself, and skipping the float64 cast of every
    element before the multiply measured 15–25 % faster at every size from 1e2 to 1e6 elements.
    """
    d, x = dst.reshape(-1), _flat(src)
    for i in range(0, x.size, CHUNK):
        xs = x[i:i + CHUNK]
        d[i:i + CHUNK] += xs if weight == 1.0 else weight * xs


# How many float32 updates BlockedSum adds up in float32 before it folds them into its float64 sum.
BLOCK = 8


class BlockedSum:
    """A float64 running sum Σ w_k·x_k that adds float32 updates in float32 blocks of at most BLOCK, then in float64.

    Why: on the aggregator every update arrives as float32, and casting each element to float64 was the largest
    cost of streaming aggregation (0.4 ns/element here, more than a float64 add; docs/PERFORMANCE.md §2). Here
    the products w·x and the sum of at most BLOCK of them are float32 (relative error ≤ (BLOCK−1)·2⁻²⁴ ≈ 4e-7
    of the block's Σ|w·x|: a few ulps of the inputs' own float32 rounding), and blocks are added in float64, so
    the error does not grow with the number of updates the way a plain float32 accumulator's (K·2⁻²⁴) would.
    Memory: one float32 copy of the layer beside the float64 sum, whatever K is. Inputs of any other dtype
    (float64 in tests and shard merges) go straight into the float64 sum, exactly as before.
    """

    __slots__ = ("value", "_part", "_pending")

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.value = np.zeros(shape, dtype=np.float64)
        self._part: np.ndarray | None = None  # float32 partial sum of the pending updates
        self._pending = 0

    def add(self, x: np.ndarray, weight: float = 1.0) -> None:
        """value += weight·x (x of the sum's shape)."""
        x = np.asarray(x)
        if x.dtype != np.float32:
            fold_scaled(self.value, x, weight)
            return
        if self._part is None:
            self._part = np.empty(self.value.shape, dtype=np.float32)
        part, w = self._part.reshape(-1), np.float32(weight)
        flat = _flat(x)
        if self._pending == 0:
            np.multiply(flat, w, out=part)
        elif weight == 1.0:
            np.add(part, flat, out=part)
        else:
            scratch = np.empty(min(flat.size, CHUNK), dtype=np.float32)  # L2-sized: no full-size temporary
            for i in range(0, flat.size, CHUNK):
                t = scratch[:min(CHUNK, flat.size - i)]
                np.multiply(flat[i:i + CHUNK], w, out=t)
                np.add(part[i:i + CHUNK], t, out=part[i:i + CHUNK])
        self._pending += 1
        if self._pending == BLOCK:
            self.flush()

    def flush(self) -> None:
        """Fold the pending float32 block into the float64 sum."""
        if self._pending:
            np.add(self.value, self._part, out=self.value)
            self._pending = 0

    def scale(self, factor: float) -> None:
        """value *= factor (the pending block first, so it is scaled too)."""
        self.flush()
        self.value *= factor

    def result(self) -> np.ndarray:
        """The float64 sum of everything added so far (the array itself: callers must not keep adding to it)."""
        self.flush()
        return self.value


def layer_norm(delta: np.ndarray) -> float:
    """Frobenius (Euclidean over all entries) norm of one layer's update, accumulated in float64."""
    return math.sqrt(sum_squares(delta))


def paper_score(delta: np.ndarray, *, sumsq: float | None = None) -> float:
    """FedAtt's score s = ‖θ − θ_k‖ = ‖Δ_k‖ for one layer (the client furthest away scores highest).

    `sumsq` (Σ Δ², if the caller already has it) saves a pass over the update.
    """
    return math.sqrt(sum_squares(delta) if sumsq is None else sumsq)


def shrink(x: float, noise: float, temperature: float, noise_scale: float) -> float:
    """Logit of a score x whose noise has std-like scale `noise`: x·τ/(τ² + κ²·noise²)."""
    # Posterior-mean style shrinkage: without noise this is x/τ; pure noise (x ~ noise) gives logits at most
    # 1/(2κ) in size (reached at κ·noise = τ) and shrinking like τ/(κ²·noise) beyond: a large σ cannot
    # concentrate the softmax on one random device, it flattens it towards the uniform mean instead.
    return x * temperature / (temperature * temperature + (noise_scale * noise) ** 2)


def noise_aware_score(delta: np.ndarray, noise_std: float, *, temperature: float = 1.0,
                      noise_scale: float = 1.0, direction_weight: float = 0.0,
                      direction: np.ndarray | None = None, sumsq: float | None = None) -> float:
    """Noise-calibrated attention logit of one layer's noised update (see the module docstring).

    `sumsq` (Σ Δ̃², if the caller already has it) saves a pass over the update.
    """
    d = int(np.asarray(delta).size)
    sigma = float(noise_std)
    # u is unbiased for the true ‖Δ‖²: the noise adds d·σ² in expectation, whoever the device is. Without this
    # correction the device with the largest σ (the *noisiest* one) would always score highest.
    u = (sum_squares(delta) if sumsq is None else sumsq) - d * sigma * sigma
    # Signed square root: back in the paper's units (a norm) and monotone in u, so no information is lost.
    s_norm = math.copysign(math.sqrt(abs(u)), u)
    # u's noise has std σ²·√(2d) (when Δ = 0), so s_norm's noise scale is σ·(2d)^¼.
    logit = (1.0 - direction_weight) * shrink(s_norm, sigma * (2.0 * d) ** 0.25, temperature, noise_scale)
    if direction_weight and direction is not None:
        # ⟨Δ̃, ĝ⟩ carries noise N(0, σ²) whatever d is: a √d better signal-to-noise ratio than the norm.
        proj = dot64(delta, direction)
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
        g64 = np.asarray(g, dtype=np.float64)  # once per round: exact float64 whatever dtype the state was stored in
        n = layer_norm(g64)
        out[name] = (g64 / n) if n > 0 and math.isfinite(n) else None
    return out


class OnlineSoftmax:
    """Streaming Σ_k softmax_k(s_k)·Δ_k for one layer: running max, denominator and numerator, O(layer) memory.

    Invariant: den = Σ e^(s_k − mx), num = Σ e^(s_k − mx)·Δ_k over the updates folded in so far. When a larger
    score arrives both are rescaled by e^(mx_old − mx_new), so nothing overflows and the result equals the
    all-in-memory softmax up to float rounding, in any order and across merged shards. With `plain_sum` it also
    keeps total = Σ Δ_k (the noise-aware rule's uniform floor). Both sums are BlockedSums (float32 blocks of
    float32 updates, float64 across blocks).
    """

    __slots__ = ("mx", "den", "_num", "_total")

    def __init__(self, shape: tuple[int, ...], *, plain_sum: bool = False) -> None:
        self.mx = -math.inf
        self.den = 0.0
        self._num = BlockedSum(shape)
        self._total = BlockedSum(shape) if plain_sum else None

    def add(self, score: float, delta: np.ndarray) -> None:
        """Fold in one update with its score."""
        if not math.isfinite(score):
            raise ValueError(f"attention score must be finite, got {score}")
        if score > self.mx:
            self._rescale(score)
        w = math.exp(score - self.mx)
        self.den += w
        self._num.add(delta, w)
        if self._total is not None:
            self._total.add(delta)

    def merge(self, other: OnlineSoftmax) -> None:
        """Fold in another shard's partial sums (the same layer, disjoint devices)."""
        if other.den == 0.0:
            return
        if other.mx > self.mx:
            self._rescale(other.mx)
        w = math.exp(other.mx - self.mx)
        self.den += w * other.den
        self._num.add(other._num.result(), w)
        if self._total is not None and other._total is not None:
            self._total.add(other._total.result())

    def _rescale(self, new_max: float) -> None:
        # From -inf (nothing folded in yet) there is nothing to rescale; exp(-inf - x) would be 0 anyway, but
        # multiplying a zero array is a wasted O(d) pass.
        if self.den != 0.0:
            scale = math.exp(self.mx - new_max)
            self.den *= scale
            self._num.scale(scale)
        self.mx = new_max

    def weight(self, score: float) -> float:
        """Final softmax weight of a device that was folded in with `score`."""
        return math.exp(score - self.mx) / self.den

    def mean(self) -> np.ndarray:
        """Σ_k α_k·Δ_k (float64)."""
        return self._num.result() / self.den

    def plain_total(self) -> np.ndarray:
        """Σ_k Δ_k (float64); only with plain_sum=True."""
        if self._total is None:
            raise ValueError("this OnlineSoftmax keeps no plain sum (plain_sum=False)")
        return self._total.result()


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

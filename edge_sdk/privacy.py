"""Device-side differential privacy: clip an update, add Gaussian noise, account for it, keep a ledger.

What a device guarantees (local, user-level DP; see ../shared/notes/privacy.md): every release is the whole
flat update Δ clipped to L2 norm C plus N(0, (zC)² I). This module holds

* `clip_l2`, `privatize`        -- the mechanism itself;
* `secure_rng`, `os_standard_normal` -- where the randomness comes from (see "Randomness" below);
* `epsilon_for`, `max_releases` -- an exact, dependency-free accountant (numpy and `math` only: no scipy, no
  dp-accounting on a phone; tests check it against dp-accounting);
* `PrivacyLedger`               -- the device's persistent record of what it has released, which refuses a
  release that would exceed the budget or repeat a round.

Accounting. T Gaussian releases with multipliers z_1..z_T of the same sensitivity compose *exactly* to one
Gaussian mechanism with multiplier (Σ 1/z_i²)^(-1/2) (the privacy-loss distributions are Gaussians whose
means and variances add). ε then follows from the analytic Gaussian mechanism (Balle & Wang 2018, Thm. 8):
    δ(ε) = Φ(Δ/2σ − εσ/Δ) − e^ε Φ(−Δ/2σ − εσ/Δ),
solved for ε by bisection in log space. Adjacency: "add_remove" (this device's data vs none) has sensitivity
C; "replace_one" has 2C, i.e. the effective multiplier is halved. There is no amplification by subsampling:
the broker sees who published.

Not covered by the guarantee (privatise it or don't send it): example counts, losses, per-layer norms,
participation times, ids, message sizes; and `PrivatizeInfo.original_norm` / `.clipped` are raw data-dependent
values that must stay on the device.

Randomness. `privatize(..., rng=None)` draws its noise from the operating system's CSPRNG (`os.urandom`,
ChaCha20/AES-CTR-DRBG in current kernels) through a Box-Muller transform, so no predictable generator state
exists in the process and earlier releases say nothing about the next noise draw. numpy's bit generators
(PCG64, PCG64DXSM, Philox, SFC64) are fast statistical generators, not CSPRNGs: seed recovery from raw PCG
outputs has been demonstrated (Bouillaguet et al. 2020). Using them with a cryptographic seed is the accepted
practice in DP-SGD libraries (TF Privacy, Opacus outside secure_mode) because an observer sees noise *plus*
data rounded to float32, never the raw 64-bit outputs, and no practical attack is known in that setting; but
"no known attack" is weaker than a CSPRNG, and the OS path costs ~70 ns per coordinate (≈70 ms for a
1M-parameter update, small next to local training), so the device uses it by default. An explicit `rng`
(e.g. `secure_rng()` or a seeded generator) is accepted for simulations and reproducible tests.
Known floating-point caveats, shared by every float implementation of the Gaussian mechanism (Mironov 2012;
Jin et al. 2022): the noise is a float64 sample from a finite set (Box-Muller with 53-bit uniforms reaches
±8.57σ; the probability of exceeding that is ~1e-17 per coordinate) and is rounded to float32 on output.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from edge_sdk.durable import atomic_write as _atomic_write

__all__ = [
    "ADJACENCIES", "PrivatizeInfo", "clip_l2", "privatize", "secure_rng", "os_standard_normal",
    "epsilon_for", "max_releases", "PrivacyLedger", "Release", "LedgerError", "LedgerCorrupt",
    "LedgerMismatch", "BudgetExceeded", "DuplicateRelease",
]

ADJACENCIES = ("add_remove", "replace_one")


# --------------------------------------------------------------------------------------------------------
# Randomness
# --------------------------------------------------------------------------------------------------------

def secure_rng() -> np.random.Generator:
    """A numpy Generator (PCG64DXSM) seeded with 256 bits from the OS CSPRNG.

    The seed is unpredictable; the stream is not cryptographic (see the module docstring). PCG64DXSM is
    numpy's recommended successor to PCG64 (stronger output permutation), at the same speed. Good for
    post-processing randomness (stochastic rounding, cohort shuffles in simulations); `privatize` defaults
    to `os_standard_normal` instead.
    """
    return np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence(secrets.randbits(256))))


_OS_CHUNK = 1 << 20  # normals per os.urandom call: bounds the temporary memory to ~40 MB


def os_standard_normal(n: int) -> np.ndarray:
    """`n` float64 N(0, 1) samples computed from `os.urandom` bytes (Box-Muller, 53-bit uniforms)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = np.empty(n, dtype=np.float64)
    two_pi = 2.0 * math.pi
    for start in range(0, n, _OS_CHUNK):
        k = min(_OS_CHUNK, n - start)
        pairs = (k + 1) // 2
        raw = np.frombuffer(os.urandom(16 * pairs), dtype="<u8")
        shift = np.uint64(11)  # keep the top 53 bits: exactly representable as float64
        u1 = ((raw[0::2] >> shift).astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]: log(u1) is finite
        u2 = (raw[1::2] >> shift).astype(np.float64) * 2.0**-53  # [0, 1)
        r = np.sqrt(-2.0 * np.log(u1))
        theta = two_pi * u2
        out[start:start + pairs] = r * np.cos(theta)
        out[start + pairs:start + k] = (r * np.sin(theta))[:k - pairs]
    return out


# --------------------------------------------------------------------------------------------------------
# The mechanism: clip + Gaussian noise
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrivatizeInfo:
    """What `privatize` did. `original_norm` and `clipped` depend on raw data: keep them on the device."""
    original_norm: float
    clipped: bool
    noise_std: float


def _positive_finite(name: str, value: float, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return v


def _as_float64(delta: Any) -> np.ndarray:
    arr = np.asarray(delta)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"update must be a real numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=True)
    if not np.all(np.isfinite(arr)):
        raise ValueError("update contains NaN or infinite values")
    return arr


def _l2(x: np.ndarray) -> float:
    # float64 dot: float32 accumulation over millions of coordinates loses ~1e-4 relative accuracy.
    flat = x.reshape(-1)
    return math.sqrt(float(np.dot(flat, flat)))


def _clip64(x: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float, bool]:
    """Scale float64 `x` in place so its L2 norm is <= clip_norm; return (x, original norm, clipped)."""
    norm = _l2(x)
    if norm <= clip_norm:
        return x, norm, False
    x *= clip_norm / norm
    # Rounding can leave the norm a few ulps above C; the guarantee is "<= C", so shrink until it holds.
    while (n := _l2(x)) > clip_norm:
        x *= (clip_norm / n) * (1.0 - 2.0**-50)
    return x, norm, True


def clip_l2(delta: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """Scale the whole update (all elements, any shape) to L2 norm <= clip_norm.

    Returns (clipped array in the input's float dtype -- float64 for integer input, original L2 norm).
    The returned array's norm is <= clip_norm when computed in float64.
    """
    c = _positive_finite("clip_norm", clip_norm)
    src = np.asarray(delta)
    out_dtype = src.dtype if src.dtype.kind == "f" else np.dtype(np.float64)
    x, norm, clipped = _clip64(_as_float64(src), c)
    out = x.astype(out_dtype)
    if clipped:
        # Casting to float32 rounds each element, which can again nudge the norm above C.
        while _l2(out.astype(np.float64)) > c:
            out = (out.astype(np.float64) * (1.0 - 2.0**-20)).astype(out_dtype)
    return out, norm


def privatize(delta: np.ndarray, clip_norm: float, noise_multiplier: float,
              rng: np.random.Generator | None = None) -> tuple[np.ndarray, PrivatizeInfo]:
    """Clip `delta` (whole update) to L2 norm C and add N(0, (zC)²) to every coordinate; float32 out.

    rng=None draws the noise from the OS CSPRNG (`os_standard_normal`); pass a Generator only for
    simulations or reproducible tests. z = 0 adds no noise (ε = ∞; the ledger will refuse to record it).
    """
    c = _positive_finite("clip_norm", clip_norm)
    z = _positive_finite("noise_multiplier", noise_multiplier, allow_zero=True)
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy Generator or None, got {type(rng).__name__}")
    x, norm, clipped = _clip64(_as_float64(delta), c)
    std = z * c
    if std > 0:
        noise = os_standard_normal(x.size) if rng is None else rng.standard_normal(x.size)
        x += std * noise.reshape(x.shape)
    out = x.astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"noised update overflows float32 (noise std {std:g} too large)")
    return out, PrivatizeInfo(original_norm=norm, clipped=clipped, noise_std=std)


# --------------------------------------------------------------------------------------------------------
# Accountant: exact composition + analytic Gaussian mechanism, numpy/math only
# --------------------------------------------------------------------------------------------------------

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _log_ndtr(x: float) -> float:
    """log Φ(x), accurate in the far left tail where Φ(x) underflows."""
    if x > 0.0:
        # Φ(x) = 1 − Φ(−x): log1p keeps the tiny Φ(−x) instead of rounding 1 − Φ(−x) to 1.
        return math.log1p(-0.5 * math.erfc(x / math.sqrt(2.0)))
    if x > -20.0:
        # erfc keeps full relative accuracy here (no 1 − small cancellation), so the log is accurate.
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    # Asymptotic series: Φ(x) = φ(x)/|x| · (1 − 1/x² + 3/x⁴ − 15/x⁶ + …). For x <= −20 the terms fall
    # below 1e-17 long before they would start to grow again.
    x2 = x * x
    term, total, k = 1.0, 1.0, 1
    while True:
        term *= -(2 * k - 1) / x2
        if abs(term) < 1e-17:
            break
        total += term
        k += 1
    return -0.5 * x2 - math.log(-x) - _LOG_SQRT_2PI + math.log(total)


def _log_delta(sigma: float, eps: float) -> float:
    """log δ(ε) of the Gaussian mechanism with sensitivity 1 and noise std sigma (Balle & Wang, Thm. 8)."""
    a = 0.5 / sigma - eps * sigma
    b = -0.5 / sigma - eps * sigma
    log_pa = _log_ndtr(a)
    t = eps + _log_ndtr(b) - log_pa  # log of the ratio of the two terms; < 0 for every σ > 0, ε >= 0
    if t >= 0.0:
        return -math.inf
    # log(1 − e^t) without cancellation: log(−expm1(t)) near 0, log1p(−e^t) far from it.
    return log_pa + (math.log(-math.expm1(t)) if t > -0.693 else math.log1p(-math.exp(t)))


def _epsilon_gaussian(sigma: float, delta: float) -> float:
    """Smallest ε (up to 1e-12 relative, rounded up) with δ(ε) <= delta, for sensitivity 1 and std sigma."""
    if sigma == 0.0:
        return math.inf
    if math.isinf(sigma):
        return 0.0
    target = math.log(delta)
    if _log_delta(sigma, 0.0) <= target:
        return 0.0
    lo, hi = 0.0, 1.0
    while _log_delta(sigma, hi) > target:  # δ(ε) is decreasing in ε: bracket by doubling
        lo, hi = hi, hi * 2.0
        if hi > 1e300:
            return math.inf
    while hi - lo > 1e-12 * hi:
        mid = 0.5 * (lo + hi)
        if _log_delta(sigma, mid) > target:
            lo = mid
        else:
            hi = mid
    return hi  # the upper end of the bracket: a valid (conservative) ε


def _check_accounting(delta: float, adjacency: str) -> float:
    if adjacency not in ADJACENCIES:
        raise ValueError(f"adjacency must be one of {ADJACENCIES}, got {adjacency!r}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float, np.integer, np.floating)):
        raise ValueError(f"delta must be a number, got {type(delta).__name__}")
    d = float(delta)
    if not (0.0 < d < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return d


def _precision(noise_multipliers: Iterable[float]) -> float:
    """Σ 1/z_i² (the inverse squared effective multiplier); inf if any z_i is 0."""
    terms = []
    for z in noise_multipliers:
        if isinstance(z, bool) or not isinstance(z, (int, float, np.integer, np.floating)):
            raise ValueError(f"noise multipliers must be numbers, got {type(z).__name__}")
        zf = float(z)
        if math.isnan(zf) or zf < 0:
            raise ValueError(f"noise multipliers must be >= 0 (inf allowed), got {z!r}")
        if zf == 0.0:
            return math.inf
        terms.append(1.0 / (zf * zf))  # z = inf contributes 0
    return math.fsum(terms)


def _epsilon_from_precision(rho: float, delta: float, adjacency: str) -> float:
    if rho == 0.0:
        return 0.0
    if math.isinf(rho):
        return math.inf
    sigma = 1.0 / math.sqrt(rho)
    if adjacency == "replace_one":
        sigma *= 0.5  # sensitivity 2C: the same noise is half as many sensitivities wide
    return _epsilon_gaussian(sigma, delta)


def epsilon_for(noise_multipliers: Sequence[float], delta: float, adjacency: str = "add_remove") -> float:
    """ε after releases at the given noise multipliers (one per release), at `delta`, for `adjacency`.

    0 releases -> 0.0; any z = 0 -> inf; z = inf costs nothing.
    """
    d = _check_accounting(delta, adjacency)
    return _epsilon_from_precision(_precision(noise_multipliers), d, adjacency)


def _remaining(history: Sequence[float], z: float, epsilon_budget: float, delta: float, adjacency: str) -> int:
    """Largest n >= 0 with epsilon_for(history + [z]*n) <= budget, computed consistently with epsilon_for."""
    zf = _positive_finite("noise_multiplier", z, allow_zero=True)
    budget = _positive_finite("epsilon_budget", epsilon_budget, allow_zero=True)
    d = _check_accounting(delta, adjacency)

    def fits(n: int) -> bool:
        return epsilon_for(itertools.chain(history, itertools.repeat(zf, n)), d, adjacency) <= budget

    if zf == 0.0 or not fits(0) or not fits(1):
        return 0
    # Search on the closed form Σ1/z² = base + n/z² (O(1) per step; n can be astronomically large for huge
    # z), then settle the boundary with the exact summation epsilon_for uses, so that the answer agrees
    # with can_release/record_release to the last bit. Beyond 2^20 releases the boundary is left to the
    # closed form (the O(n) sum would be slow and the last-bit question is moot).
    base = _precision(history)
    step = 1.0 / (zf * zf)

    def fits_closed(n: int) -> bool:
        return _epsilon_from_precision(base + n * step, d, adjacency) <= budget

    lo, hi = 1, 2
    while fits_closed(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 62:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits_closed(mid):
            lo = mid
        else:
            hi = mid
    if lo <= (1 << 20):
        while lo > 1 and not fits(lo):
            lo -= 1
        while fits(lo + 1):
            lo += 1
    return lo


def max_releases(noise_multiplier: float, epsilon_budget: float, delta: float,
                 adjacency: str = "add_remove") -> int:
    """How many releases at `noise_multiplier` keep ε <= epsilon_budget (at `delta`, `adjacency`)."""
    return _remaining((), noise_multiplier, epsilon_budget, delta, adjacency)


# --------------------------------------------------------------------------------------------------------
# Ledger
# --------------------------------------------------------------------------------------------------------

class LedgerError(Exception):
    """Base class of every ledger error; the message says what is wrong and with which file."""


class LedgerCorrupt(LedgerError):
    """The ledger file exists but cannot be trusted. Never reset it: that would reset the budget."""


class LedgerMismatch(LedgerError):
    """The ledger was created for a different δ, adjacency or budget than the caller asked for."""


class BudgetExceeded(LedgerError):
    """Recording this release would take ε past the budget."""


class DuplicateRelease(LedgerError):
    """A release with this key (e.g. '<model_id>:<round>') is already recorded."""


LEDGER_FORMAT = "fedatt-privacy-ledger"
LEDGER_VERSION = 1
MAX_LEDGER_BYTES = 16 * 1024 * 1024
MAX_RELEASES = 50_000  # one release a day for >100 years; keeps load time and file size bounded
MAX_KEY_CHARS = 256
MAX_INFO_ITEMS = 16
MAX_INFO_STRING = 512
_TOP_KEYS = {"format", "version", "accounting", "created", "releases", "checksum"}
_ACCOUNTING_KEYS = {"mechanism", "adjacency", "delta", "epsilon_budget"}
_RELEASE_KEYS = {"key", "noise_multiplier", "clip_norm", "time", "info"}
_MAX_NUMBER = 1e12


@dataclass(frozen=True)
class Release:
    """One recorded release. `info` holds optional JSON scalars (e.g. an update digest)."""
    key: str
    noise_multiplier: float
    clip_norm: float
    time: float
    info: Mapping[str, str | int | float | bool | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
                "time": self.time, "info": dict(self.info)}


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not (0 < len(key) <= MAX_KEY_CHARS) or not key.isprintable():
        raise ValueError(f"release key must be a printable string of 1..{MAX_KEY_CHARS} characters, got {key!r}")
    return key


def _check_info(info: Any) -> dict[str, str | int | float | bool | None]:
    if not isinstance(info, dict):
        raise ValueError("info must be an object")
    if len(info) > MAX_INFO_ITEMS:
        raise ValueError(f"info has {len(info)} items > limit {MAX_INFO_ITEMS}")
    out: dict[str, str | int | float | bool | None] = {}
    for k, v in info.items():
        if not isinstance(k, str) or not (0 < len(k) <= 64):
            raise ValueError(f"info keys must be strings of 1..64 characters, got {k!r}")
        if isinstance(v, str):
            if len(v) > MAX_INFO_STRING:
                raise ValueError(f"info[{k!r}] is longer than {MAX_INFO_STRING} characters")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError(f"info[{k!r}] must be finite")
        elif not (v is None or isinstance(v, (bool, int))):
            raise ValueError(f"info[{k!r}] must be a JSON scalar (str, int, float, bool, None), "
                             f"got {type(v).__name__}")
        elif isinstance(v, int) and not isinstance(v, bool) and abs(v) > 2**53:
            raise ValueError(f"info[{k!r}] is too large to round-trip through JSON")
        out[k] = v
    return out


def _body_checksum(body: Mapping[str, Any]) -> str:
    # Canonical JSON of everything but the checksum: catches bit rot and hand edits that forget to update it
    # (not a security boundary: whoever can write the file can recompute it).
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return "sha256:" + hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} is not allowed")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate JSON key {k!r}")
        out[k] = v
    return out


def _number(obj: Mapping[str, Any], name: str, lo: float, hi: float, *, strict_low: bool = False) -> float:
    v = obj.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a number")
    v = float(v)
    if not math.isfinite(v) or v < lo or v > hi or (strict_low and v == lo):
        raise ValueError(f"{name}={v!r} is outside {'(' if strict_low else '['}{lo}, {hi}]")
    return v


class PrivacyLedger:
    """The device's persistent record of DP releases and its (ε, δ) budget for one stated adjacency.

    File format (JSON, UTF-8, version 1)::

        {"format": "fedatt-privacy-ledger", "version": 1, "created": <unix time>,
         "accounting": {"mechanism": "gaussian", "adjacency": "add_remove", "delta": 1e-05,
                        "epsilon_budget": 8.0},
         "releases": [{"key": "<model_id>:<round>", "noise_multiplier": 10.0, "clip_norm": 1.0,
                       "time": <unix time>, "info": {"digest": "sha256:..."}}],
         "checksum": "sha256:<hex of the canonical JSON of all other fields>"}

    The ledger stores the raw multipliers, not ε, so ε for any (δ, adjacency) can always be recomputed.
    Reopening with a different δ, adjacency or budget raises `LedgerMismatch` (choosing a larger δ later
    would quietly shrink the reported ε); `set_epsilon_budget` is the one explicit way to change the budget.
    A missing file creates a new ledger; an unreadable, oversized, malformed, or checksum-failing file raises
    `LedgerCorrupt` and is never reset. Newer versions are refused rather than guessed at.

    Call `record_release` *before* publishing: a crash in between then over-counts (safe), never under-counts.
    One process owns a ledger file (writes are atomic, but two writers would lose each other's releases);
    within the process, methods are thread-safe. Deleting the file resets the budget: keep it in app-private
    storage that is not restored from backups of another install.
    """

    def __init__(self, path: Path, *, epsilon_budget: float, delta: float, adjacency: str, created: float,
                 releases: Sequence[Release]) -> None:
        # Use PrivacyLedger.open(); the constructor trusts its (already validated) arguments.
        self._path = path
        self._budget = epsilon_budget
        self._delta = delta
        self._adjacency = adjacency
        self._created = created
        self._releases: list[Release] = list(releases)
        self._keys = {r.key for r in self._releases}
        self._lock = threading.RLock()

    # ---- opening / persisting ----

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, epsilon_budget: float, delta: float,
             adjacency: str) -> "PrivacyLedger":
        """Load the ledger at `path`, or create it (and its directory) if the file does not exist."""
        p = Path(path)
        budget = _positive_finite("epsilon_budget", epsilon_budget)
        d = _check_accounting(delta, adjacency)
        if p.exists():
            ledger = cls._load(p)
            wanted = {"adjacency": adjacency, "delta": d, "epsilon_budget": budget}
            have = {"adjacency": ledger._adjacency, "delta": ledger._delta, "epsilon_budget": ledger._budget}
            diff = [f"{k}: file has {have[k]!r}, caller asked for {wanted[k]!r}" for k in wanted
                    if have[k] != wanted[k]]
            if diff:
                raise LedgerMismatch(f"{p}: ledger was created with other accounting settings ("
                                     + "; ".join(diff) + "); use set_epsilon_budget() to change the budget "
                                     "explicitly, and a new ledger for a different delta/adjacency")
            return ledger
        p.parent.mkdir(parents=True, exist_ok=True)
        ledger = cls(p, epsilon_budget=budget, delta=d, adjacency=adjacency, created=time.time(), releases=())
        ledger._persist(ledger._releases, budget)
        return ledger

    @classmethod
    def _load(cls, path: Path) -> "PrivacyLedger":
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_LEDGER_BYTES + 1)
        except OSError as e:
            raise LedgerCorrupt(f"{path}: cannot read privacy ledger: {e}") from e
        if len(data) > MAX_LEDGER_BYTES:
            raise LedgerCorrupt(f"{path}: privacy ledger is larger than {MAX_LEDGER_BYTES} bytes")
        try:
            obj = json.loads(data.decode("utf-8"), parse_constant=_reject_constant,
                             object_pairs_hook=_no_duplicate_keys)
            return cls._from_json(path, obj)
        except LedgerError:
            raise
        except (ValueError, TypeError, UnicodeDecodeError, RecursionError) as e:
            raise LedgerCorrupt(f"{path}: privacy ledger is corrupt ({e}); refusing to reset it, "
                                "because that would reset the privacy budget") from e

    @classmethod
    def _from_json(cls, path: Path, obj: Any) -> "PrivacyLedger":
        if not isinstance(obj, dict):
            raise ValueError("top level must be an object")
        if obj.get("format") != LEDGER_FORMAT:
            raise ValueError(f"format must be {LEDGER_FORMAT!r}")
        version = obj.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version > LEDGER_VERSION:
            raise LedgerCorrupt(f"{path}: ledger version {version} was written by a newer SDK "
                                f"(this one reads version {LEDGER_VERSION}); upgrade instead of resetting")
        if version != LEDGER_VERSION:
            raise ValueError(f"version must be {LEDGER_VERSION}")
        if set(obj) != _TOP_KEYS:
            raise ValueError(f"fields must be exactly {sorted(_TOP_KEYS)}, got {sorted(obj)}")
        body = {k: v for k, v in obj.items() if k != "checksum"}
        if obj["checksum"] != _body_checksum(body):
            raise ValueError("checksum does not match the contents")
        acc = obj["accounting"]
        if not isinstance(acc, dict) or set(acc) != _ACCOUNTING_KEYS:
            raise ValueError(f"accounting must have exactly the fields {sorted(_ACCOUNTING_KEYS)}")
        if acc["mechanism"] != "gaussian":
            raise ValueError("accounting.mechanism must be 'gaussian'")
        if acc["adjacency"] not in ADJACENCIES:
            raise ValueError(f"accounting.adjacency must be one of {ADJACENCIES}")
        delta = _number(acc, "delta", 0.0, 1.0, strict_low=True)
        if delta >= 1.0:
            raise ValueError("accounting.delta must be < 1")
        budget = _number(acc, "epsilon_budget", 0.0, _MAX_NUMBER, strict_low=True)
        created = _number(obj, "created", 0.0, _MAX_NUMBER)
        raw = obj["releases"]
        if not isinstance(raw, list):
            raise ValueError("releases must be a list")
        if len(raw) > MAX_RELEASES:
            raise ValueError(f"{len(raw)} releases > limit {MAX_RELEASES}")
        releases, keys = [], set()
        for i, r in enumerate(raw):
            if not isinstance(r, dict) or set(r) != _RELEASE_KEYS:
                raise ValueError(f"releases[{i}] must have exactly the fields {sorted(_RELEASE_KEYS)}")
            key = _check_key(r["key"])
            if key in keys:
                raise ValueError(f"releases[{i}]: duplicate key {key!r}")
            keys.add(key)
            releases.append(Release(
                key=key, noise_multiplier=_number(r, "noise_multiplier", 0.0, _MAX_NUMBER, strict_low=True),
                clip_norm=_number(r, "clip_norm", 0.0, _MAX_NUMBER, strict_low=True),
                time=_number(r, "time", 0.0, _MAX_NUMBER), info=_check_info(r["info"])))
        return cls(path, epsilon_budget=budget, delta=delta, adjacency=acc["adjacency"], created=created,
                   releases=releases)

    def _persist(self, releases: Sequence[Release], budget: float) -> None:
        body = {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "created": self._created,
                "accounting": {"mechanism": "gaussian", "adjacency": self._adjacency, "delta": self._delta,
                               "epsilon_budget": budget},
                "releases": [r.to_json() for r in releases]}
        doc = dict(body, checksum=_body_checksum(body))
        data = json.dumps(doc, indent=1, allow_nan=False).encode("utf-8")
        if len(data) > MAX_LEDGER_BYTES:
            raise LedgerError(f"{self._path}: ledger would exceed {MAX_LEDGER_BYTES} bytes")
        _atomic_write(self._path, data)

    # ---- queries ----

    @property
    def path(self) -> Path:
        return self._path

    @property
    def epsilon_budget(self) -> float:
        return self._budget

    @property
    def delta(self) -> float:
        return self._delta

    @property
    def adjacency(self) -> str:
        return self._adjacency

    @property
    def releases(self) -> list[Release]:
        """A copy of the recorded releases, oldest first."""
        with self._lock:
            return list(self._releases)

    def _multipliers(self) -> list[float]:
        return [r.noise_multiplier for r in self._releases]

    @property
    def epsilon(self) -> float:
        """ε spent so far, at this ledger's δ and adjacency."""
        with self._lock:
            return epsilon_for(self._multipliers(), self._delta, self._adjacency)

    def epsilon_after(self, noise_multiplier: float) -> float:
        """ε if one more release at `noise_multiplier` were recorded."""
        z = _positive_finite("noise_multiplier", noise_multiplier, allow_zero=True)
        with self._lock:
            return epsilon_for(self._multipliers() + [z], self._delta, self._adjacency)

    def can_release(self, noise_multiplier: float) -> bool:
        """Would ε after one more release at `noise_multiplier` stay within the budget?"""
        with self._lock:
            return len(self._releases) < MAX_RELEASES and self.epsilon_after(noise_multiplier) <= self._budget

    def remaining_releases(self, noise_multiplier: float) -> int:
        """How many more releases at `noise_multiplier` fit in the budget (consistent with can_release)."""
        with self._lock:
            n = _remaining(self._multipliers(), noise_multiplier, self._budget, self._delta, self._adjacency)
            return min(n, MAX_RELEASES - len(self._releases))

    def has_release(self, key: str) -> bool:
        with self._lock:
            return key in self._keys

    # ---- changes (persisted before they take effect in memory) ----

    def record_release(self, key: str, noise_multiplier: float, clip_norm: float, **info: Any) -> Release:
        """Record one release durably; raises DuplicateRelease / BudgetExceeded / LedgerError and records nothing."""
        k = _check_key(key)
        z = _positive_finite("noise_multiplier", noise_multiplier, allow_zero=True)
        c = _positive_finite("clip_norm", clip_norm)
        extra = _check_info(info)
        with self._lock:
            if k in self._keys:
                raise DuplicateRelease(f"{self._path}: a release with key {k!r} is already recorded")
            if len(self._releases) >= MAX_RELEASES:
                raise LedgerError(f"{self._path}: ledger holds the maximum of {MAX_RELEASES} releases")
            eps = epsilon_for(self._multipliers() + [z], self._delta, self._adjacency)
            if not eps <= self._budget:
                raise BudgetExceeded(f"{self._path}: a release at z={z:g} would bring ε to {eps:.4g} > budget "
                                     f"{self._budget:g} (δ={self._delta:g}, {self._adjacency})")
            release = Release(key=k, noise_multiplier=z, clip_norm=c, time=time.time(), info=extra)
            new = self._releases + [release]
            self._persist(new, self._budget)
            self._releases = new
            self._keys.add(k)
            return release

    def set_epsilon_budget(self, epsilon_budget: float) -> None:
        """Change the budget explicitly (an operator decision, persisted). Spent ε is unaffected."""
        budget = _positive_finite("epsilon_budget", epsilon_budget)
        with self._lock:
            self._persist(self._releases, budget)
            self._budget = budget

    def __repr__(self) -> str:
        return (f"PrivacyLedger({str(self._path)!r}, releases={len(self._releases)}, ε={self.epsilon:.4g}/"
                f"{self._budget:g}, δ={self._delta:g}, {self._adjacency})")

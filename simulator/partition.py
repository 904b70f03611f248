"""Partitioners: split one dataset's sample indices among federated clients (natural, IID, Dirichlet).

Every function returns `list[np.ndarray]` of int64 index arrays, one per client, sorted ascending inside each
client (so a partition is easy to compare and to store as text), and every index appears exactly once.
Randomness comes only from the `numpy.random.Generator` passed in: the same seed gives the same partition.
These are pure numpy functions (no torch, no I/O) so they can be tested alone and reused by any loader.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["PartitionError", "iid", "dirichlet", "natural", "label_skew"]


class PartitionError(ValueError):
    """A partition that cannot be made as asked (too few samples, Dirichlet retries exhausted, ...)."""


def _labels(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise PartitionError(f"labels must be 1-D, got shape {arr.shape}")
    return arr


def _check_num_clients(num_clients: int, n: int) -> None:
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise PartitionError(f"num_clients must be a positive integer, got {num_clients!r}")
    if num_clients > n:
        raise PartitionError(f"cannot give {num_clients} clients at least one sample each from {n} samples")


def iid(labels: np.ndarray | Sequence[int], num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Uniformly random split into `num_clients` parts whose sizes differ by at most one."""
    n = len(_labels(labels))
    _check_num_clients(num_clients, n)
    perm = rng.permutation(n).astype(np.int64)
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


def dirichlet(
    labels: np.ndarray | Sequence[int],
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_size: int = 10,
    max_attempts: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split: for each class, client shares ~ Dirichlet(alpha * 1); smaller alpha, more skew.

    This is the per-class scheme of Hsu et al. 2019 ("Measuring the effects of non-identical data
    distribution") used by most FL benchmarks. Small alpha can leave a client (nearly) empty, which breaks
    training on it, so the whole draw is repeated until every client has >= `min_size` samples; after
    `max_attempts` draws a PartitionError says which knob to turn. No balancing tricks are applied, so
    client sizes vary too (that is part of the heterogeneity being simulated).
    """
    y = _labels(labels)
    n = len(y)
    _check_num_clients(num_clients, n)
    if not (np.isfinite(alpha) and alpha > 0):
        raise PartitionError(f"alpha must be a positive finite number, got {alpha!r}")
    if min_size < 0 or min_size * num_clients > n:
        raise PartitionError(f"min_size={min_size} x {num_clients} clients exceeds the {n} samples available")
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    smallest = 0
    for _ in range(max_attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            shares = rng.dirichlet(np.full(num_clients, float(alpha)))
            # Cumulative share -> cut points; rounding down keeps every index in exactly one slice.
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        smallest = min(len(p) for p in out)
        if smallest >= min_size:
            return out
    raise PartitionError(
        f"Dirichlet(alpha={alpha}) split of {n} samples over {num_clients} clients left a client with "
        f"{smallest} < min_size={min_size} samples in all {max_attempts} attempts; "
        "raise alpha, lower min_size or use fewer clients"
    )


def natural(groups: np.ndarray | Sequence[object]) -> list[np.ndarray]:
    """One client per distinct group value (hospital, speaking role, ...), in `np.unique(groups)` order."""
    g = np.asarray(groups)
    if g.ndim != 1 or len(g) == 0:
        raise PartitionError(f"groups must be a non-empty 1-D sequence, got shape {g.shape}")
    _, inverse = np.unique(g, return_inverse=True)
    inverse = inverse.reshape(-1)
    # A stable argsort keeps each client's indices in ascending order.
    order = np.argsort(inverse, kind="stable").astype(np.int64)
    counts = np.bincount(inverse)
    return np.split(order, np.cumsum(counts)[:-1])


def label_skew(labels: np.ndarray | Sequence[int], parts: Sequence[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label distribution and the global one.

    0 means every client sees the global class mix; values near 1 mean clients hold disjoint classes.
    Used to measure (not assume) how heterogeneous a partition is.
    """
    y = _labels(labels)
    classes, y_idx = np.unique(y, return_inverse=True)
    k = len(classes)
    glob = np.bincount(y_idx, minlength=k) / len(y)
    dists = []
    for p in parts:
        if len(p) == 0:
            continue
        local = np.bincount(y_idx[p], minlength=k) / len(p)
        dists.append(0.5 * np.abs(local - glob).sum())
    return float(np.mean(dists)) if dists else 0.0

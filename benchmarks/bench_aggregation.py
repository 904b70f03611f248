"""Benchmark 2: aggregation time and peak memory per strategy vs a numpy lower bound, for K updates of P params.

Every (strategy, K, P) runs in its own child process, so ru_maxrss/VmHWM is that configuration's alone. The
child builds a global model of P float32 parameters in 4 layers (60/30/9.9/0.1 % of P, like a model whose
weight matrices dominate) and a pool of 4 distinct float32 updates (std 0.01), then feeds K updates to
`make_aggregator(strategy, global).add(...)` cycling through the pool - updates are never all in memory unless
the strategy keeps them (median, trimmed_mean copy every update: O(K·P)). Timed: all K `add` calls plus
`finalize()`, repeated in the child (7 times for K·P ≤ 1e8, 3 up to 1e9, else once) and reported as the median
run: single runs of the small configurations scattered by ±50 % on the shared 2-core VM. Memory: growth =
VmHWM at the end - VmRSS just before the first aggregator was created (the pool and the global model are
excluded, they are the same for every K).

Lower bounds (same loop, same pool): `acc64 += u` per layer into a float64 accumulator (the precision the
strategies promise: "accumulation is float64") and `acc32 += u` (float32, the least possible one pass).
Target: streaming attention (fedatt, fedatt-noise-aware) within 3x of the float64 bound, memory independent of K.
`NAME@blas1` rows (on request) run the same strategy with OPENBLAS_NUM_THREADS=1. This benchmark found that the
attention score's float64 np.dot went through OpenBLAS' thread pool (milliseconds per call on a busy 2-core
machine); the strategies now compute norms with a chunked einsum and no BLAS, so the variant should match.

Run: python -m benchmarks.bench_aggregation [--quick] [--max-gib 8] [--max-elements 2e9]
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any

from benchmarks.common import base_parser, run_child, table, wait_for_quiet, write_result

STRATEGIES = ("fedatt", "fedatt-noise-aware", "fedavg", "median", "trimmed_mean")
BOUNDS = ("numpy-acc64", "numpy-acc32")
STREAMING = ("fedatt", "fedatt-noise-aware", "fedavg")
FRACTIONS = (0.6, 0.3, 0.099, 0.001)
POOL = 4


def layer_sizes(p: int) -> list[int]:
    sizes = [max(1, int(p * f)) for f in FRACTIONS[:-1]]
    sizes.append(max(1, p - sum(sizes)))
    return sizes


def estimate_gib(strategy: str, k: int, p: int) -> float:
    """Rough peak bytes of a child: pool + global copies, plus O(K·P) for the holding rules."""
    base = POOL * p * 4 + p * 4 + p * 8 * 3  # pool, global f32, aggregator's f64 global + accumulators
    if strategy in ("median", "trimmed_mean"):
        largest = max(layer_sizes(p))
        base += k * p * 4 + 3 * k * largest * 8  # kept f32 copies + finalize's f64 stack/sort of a layer
    return base / 2**30


# ------------------------------------------------------------------------------------------ child
def repeats_for(k: int, p: int) -> int:
    """Timed repetitions of one configuration: more for the short ones, whose single runs scatter most here."""
    n = k * p
    return 7 if n <= 1e8 else 3 if n <= 1e9 else 1


def child(strategy: str, k: int, p: int) -> dict[str, Any]:
    import numpy as np

    from benchmarks.common import peak_rss_mib, rss_mib

    rng = np.random.default_rng(0)
    sizes = layer_sizes(p)
    names = [f"layer{i}" for i in range(len(sizes))]
    global_named = {n: rng.standard_normal(s, dtype=np.float32) for n, s in zip(names, sizes)}
    pool = [{n: rng.standard_normal(s, dtype=np.float32) * np.float32(0.01) for n, s in zip(names, sizes)}
            for _ in range(POOL)]

    def once() -> tuple[float, float]:
        if strategy.startswith("numpy"):
            dt = np.float64 if strategy == "numpy-acc64" else np.float32
            t0 = time.perf_counter()
            acc = {n: np.zeros(s, dtype=dt) for n, s in zip(names, sizes)}
            for i in range(k):
                u = pool[i % POOL]
                for n in names:
                    acc[n] += u[n]
            t_add = time.perf_counter() - t0
            t1 = time.perf_counter()
            _ = {n: (global_named[n] + acc[n] / k).astype(np.float32) for n in names}
            return t_add, time.perf_counter() - t1
        t0 = time.perf_counter()
        agg = make_aggregator(strategy, global_named)
        for i in range(k):
            agg.add(f"d{i}", pool[i % POOL], num_examples=10 + i % 7, noise_std=0.01)
        t_add = time.perf_counter() - t0
        t1 = time.perf_counter()
        agg.finalize()
        return t_add, time.perf_counter() - t1

    from broker.strategies import make_aggregator  # before the baseline RSS, like numpy itself

    base = rss_mib()
    runs = sorted((once() for _ in range(repeats_for(k, p))), key=sum)
    t_add, t_fin = runs[len(runs) // 2]  # the median run (by total time)
    total = t_add + t_fin
    peak = peak_rss_mib()
    return {"strategy": strategy, "K": k, "P": p, "add_s": t_add, "finalize_s": t_fin, "total_s": total,
            "repeats": len(runs), "total_s_runs": [a + f for a, f in runs],
            "ns_per_element": total / (k * p) * 1e9, "rss_before_mib": base, "peak_rss_mib": peak,
            "growth_mib": peak - base, "model_mib_f32": p * 4 / 2**20}


def _child_main(argv: list[str]) -> None:
    print(json.dumps(child(argv[0], int(argv[1]), int(float(argv[2])))))


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--max-gib", type=float, default=8.0, help="skip configurations estimated above this peak")
    p.add_argument("--max-elements", type=float, default=2e9,
                   help="skip configurations with K*P above this (time budget: ~1-10 ns per element)")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help="strategies; NAME@blas1 runs NAME with OPENBLAS_NUM_THREADS=1 (see docs/PERFORMANCE.md)")
    args = p.parse_args()
    ks = (10, 100) if args.quick else (10, 100, 1000)
    ps = (100_000, 1_000_000) if args.quick else (100_000, 1_000_000, 10_000_000)
    strategies = [s for s in args.strategies.split(",") if s]
    quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet else wait_for_quiet(0, quiet=True)
    results, skipped = [], []
    for pp in ps:
        for k in ks:
            for s in (*BOUNDS, *strategies):
                est = estimate_gib(s.partition("@")[0], k, pp)
                if est > args.max_gib:
                    skipped.append({"strategy": s, "K": k, "P": pp, "reason": f"estimated peak {est:.1f} GiB > "
                                    f"{args.max_gib:g} GiB (O(K*P) memory)"})
                    continue
                if k * pp > args.max_elements:
                    skipped.append({"strategy": s, "K": k, "P": pp, "reason": f"K*P = {k * pp:.0e} > --max-elements "
                                    f"{args.max_elements:.0e} (time budget)"})
                    continue
                name, _, variant = s.partition("@")
                env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"} if variant == "blas1" else None
                r = run_child(["-c", "import sys; from benchmarks.bench_aggregation import _child_main; "
                               "_child_main(sys.argv[1:])", name, str(k), str(pp)], timeout=1800, env=env)
                r["strategy"] = s
                results.append(r)
                print(f"  P={pp:.0e} K={k:<5} {s:<19} {r['total_s']:8.3f} s  {r['ns_per_element']:6.2f} ns/elem  "
                      f"growth {r['growth_mib']:8.1f} MiB", flush=True)
    # ratios to the float64 bound and K-independence of memory
    bound = {(r["K"], r["P"]): r["total_s"] for r in results if r["strategy"] == "numpy-acc64"}
    bound32 = {(r["K"], r["P"]): r["total_s"] for r in results if r["strategy"] == "numpy-acc32"}
    rows = []
    for r in results:
        b = bound.get((r["K"], r["P"]))
        r["x_bound64"] = r["total_s"] / b if b else None
        b32 = bound32.get((r["K"], r["P"]))
        r["x_bound32"] = r["total_s"] / b32 if b32 else None
        rows.append([f"{r['P']:.0e}", r["K"], r["strategy"], r["total_s"], r["add_s"], r["finalize_s"],
                     r["ns_per_element"], r["x_bound64"], r["x_bound32"], r["growth_mib"], r["peak_rss_mib"]])
    print()
    print(table(["P", "K", "strategy", "total s", "add s", "finalize s", "ns/elem", "x acc64 bound",
                 "x acc32 bound", "mem growth MiB", "peak RSS MiB"], rows))
    if skipped:
        print("\nskipped:")
        for s in skipped:
            print(f"  {s['strategy']} K={s['K']} P={s['P']:.0e}: {s['reason']}")
    # targets
    targets: dict[str, Any] = {}
    for s in ("fedatt", "fedatt-noise-aware", "fedatt@blas1", "fedatt-noise-aware@blas1"):
        mine = [r for r in results if r["strategy"] == s]
        if not mine:
            continue
        worst = max(r["x_bound64"] for r in mine if r["x_bound64"] is not None)
        mem = {}
        for pp in sorted({r["P"] for r in mine}):
            g = [r["growth_mib"] for r in mine if r["P"] == pp]
            mem[str(pp)] = {"min_growth_mib": min(g), "max_growth_mib": max(g),
                            "Ks": sorted(r["K"] for r in mine if r["P"] == pp)}
        # "independent of K": growth at the largest K within 10% (+16 MiB allocator slack) of the smallest K
        indep = all(v["max_growth_mib"] <= 1.1 * v["min_growth_mib"] + 16 for v in mem.values())
        targets[s] = {"worst_x_bound64": worst, "within_3x": worst <= 3.0, "memory_by_P": mem,
                      "memory_independent_of_K": indep}
        print(f"\ntarget {s}: worst {worst:.2f}x the float64 numpy bound ({'met' if worst <= 3 else 'MISSED'}); "
              f"memory independent of K: {'yes' if indep else 'NO'} "
              + "; ".join(f"P={int(pp):.0e}: {v['min_growth_mib']:.0f}-{v['max_growth_mib']:.0f} MiB"
                          for pp, v in mem.items()))
    path = write_result("bench_aggregation", {
        "method": __doc__.split("\n\n")[1].strip(), "layers": list(FRACTIONS), "pool": POOL, "quiet": quiet,
        "results": results, "skipped": skipped, "targets": targets}, quick=args.quick)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

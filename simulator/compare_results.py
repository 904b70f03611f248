"""Compare two study result files (docs/results/NAME.json) number by number: did a re-run reproduce a figure?

`python -m simulator.compare_results OLD.json NEW.json [--tol 0.01]` walks both JSON trees in parallel and, for
every numeric leaf present in both, takes |new − old|. It prints, per metric name (the last non-index key on the
leaf's path: accuracy, auc, max_weight, epsilon, …), how many values were compared, the largest difference and
where it is, and the leaves present in only one file. ε and other values that span orders of magnitude are
compared relatively (|new − old| / max(|old|, 1e-12)). Exit status 1 if any accuracy-like metric (accuracy,
auc, recall, loss, …) differs by more than --tol, or a plotted number (accuracy-like, ε) of the old file is missing
from the new one. Tolerated, and listed: numbers only in the new file and renamed settings (a later study version
records more), and a value the new file holds as a one-element list where the old one held it bare (the study's
writer now keeps one list entry per seed; a single-seed run then reads [x] where it used to read x).

Why a tool and not eyeballing: RESULTS.md quotes hundreds of numbers; "reproduced" should be a check anyone
can repeat from a fresh clone (`python -m simulator.study NAME`, then this against the committed file).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Compared relatively: privacy budgets and byte counts grow by orders of magnitude across settings.
RELATIVE = ("epsilon", "eps", "eps_max", "bytes", "delta")
# Checked against --tol (absolute): the figures' y axes.
CHECKED = ("accuracy", "acc", "auc", "recall", "precision", "loss", "max_weight", "entropy", "weight")

Leaf = tuple[tuple[str, ...], float]


def leaves(node: Any, path: tuple[str, ...] = ()) -> Iterator[Leaf]:
    """(path, value) for every int/float leaf (bools and strings skipped)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaves(v, (*path, f"[{i}]"))
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, float(node)


def metric_of(path: tuple[str, ...]) -> str:
    """The last key of the path that is not a list index: the metric a figure plots."""
    for part in reversed(path):
        if not part.startswith("["):
            return part
    return "value"


def _kind(metric: str) -> str:
    m = metric.lower()
    if any(m == r or m.startswith(r + "_") or m.endswith("_" + r) for r in RELATIVE):
        return "relative"
    if any(c in m for c in CHECKED):
        return "checked"
    return "other"


def align(old: Any, new: Any) -> Any:
    """`new` with one-element lists unwrapped wherever `old` holds a bare value (single-seed results)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {k: align(old[k], v) if k in old else v for k, v in new.items()}
    if isinstance(old, list) and isinstance(new, list):
        if len(new) == 1 and isinstance(new[0], list) and not (old and isinstance(old[0], list)):
            return align(old, new[0])  # [[x0, x1, ...]] (one seed) where the old file had [x0, x1, ...]
        return [align(o, n) for o, n in zip(old, new)] + new[len(old):]
    if not isinstance(old, list) and isinstance(new, list) and len(new) == 1:
        return align(old, new[0])
    return new


def compare(old: Any, new: Any) -> dict[str, Any]:
    """Per-metric comparison summary of two result documents (see the module docstring)."""
    a, b = dict(leaves(old)), dict(leaves(align(old, new)))
    per: dict[str, dict[str, Any]] = {}
    for path in a.keys() & b.keys():
        metric = metric_of(path)
        kind = _kind(metric)
        x, y = a[path], b[path]
        if math.isnan(x) and math.isnan(y):
            diff = 0.0
        elif kind == "relative":
            diff = abs(y - x) / max(abs(x), 1e-12)
        else:
            diff = abs(y - x)
        slot = per.setdefault(metric, {"kind": kind, "n": 0, "max_diff": 0.0, "where": None})
        slot["n"] += 1
        if diff > slot["max_diff"] or (math.isnan(diff) and not math.isnan(slot["max_diff"])):
            slot["max_diff"], slot["where"] = diff, "/".join(path)
    gone = a.keys() - b.keys()
    return {"metrics": per, "only_old": sorted("/".join(p) for p in gone),
            "only_new": sorted("/".join(p) for p in b.keys() - a.keys()),
            # plotted numbers (accuracy-like, ε) of the old file that the new one does not have
            "lost": sorted("/".join(p) for p in gone if _kind(metric_of(p)) != "other")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulator.compare_results",
                                description=__doc__.splitlines()[0])
    p.add_argument("old", type=Path, help="the committed result (e.g. docs/results/heart.json)")
    p.add_argument("new", type=Path, help="the re-run's result")
    p.add_argument("--tol", type=float, default=0.01,
                   help="largest accepted absolute difference of accuracy-like metrics (default 0.01)")
    args = p.parse_args(argv)
    try:
        old, new = (json.loads(f.read_text()) for f in (args.old, args.new))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    res = compare(old, new)
    worst_checked = 0.0
    print(f"{'metric':<28} {'kind':<9} {'values':>7} {'max |diff|':>12}  where")
    for metric, s in sorted(res["metrics"].items()):
        if s["kind"] == "checked":
            worst_checked = max(worst_checked, s["max_diff"]) if not math.isnan(s["max_diff"]) else math.inf
        diff = f"{s['max_diff']:.3g}" + (" rel" if s["kind"] == "relative" else "")
        print(f"{metric:<28} {s['kind']:<9} {s['n']:>7} {diff:>12}  {s['where'] or '-'}")
    for side in ("only_old", "only_new"):
        if res[side]:
            print(f"{side}: {len(res[side])} leaves, e.g. {res[side][:3]}")
    ok = worst_checked <= args.tol and not res["lost"]
    print(f"{'REPRODUCED' if ok else 'DIFFERENT'}: accuracy-like metrics within {worst_checked:.3g} "
          f"(tolerance {args.tol:g}){'' if ok else '; see above'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

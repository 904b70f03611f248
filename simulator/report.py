"""Run reports: per-round metrics to JSON/CSV, PNG plots, and a summary table/markdown for a simulation run.

Layout of a run directory (one subdirectory per strategy compared on the same fleet and seeds):

    runs/<run>/config.json
    runs/<run>/<strategy>/metrics.json   {"strategy", "dataset", "majority_baseline", "rounds": [RoundRecord...],
                                          "epsilon": {device: ε}, ...}
    runs/<run>/<strategy>/metrics.csv    one row per round (scalar fields only)
    runs/<run>/plots/*.png               accuracy.png, loss.png, attention_<strategy>.png, epsilon.png, bytes.png
    runs/<run>/report.md                 the summary table and where everything is
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from edge_sdk.durable import atomic_write


@dataclass
class RoundRecord:
    """Everything measured about one closed round (all computed, none assumed)."""

    round: int
    accuracy: float
    loss: float
    participants: int
    round_time_s: float
    bytes_up: int = 0
    bytes_down: int = 0
    precision: float | None = None
    recall: float | None = None
    auc: float | None = None
    rejections: dict[str, int] = field(default_factory=dict)
    eps_max: float = 0.0
    eps_median: float = 0.0
    attempts: int = 1
    weights: dict[str, dict[str, float]] = field(default_factory=dict)  # device -> layer -> weight
    attention_entropy: float | None = None


SCALAR_FIELDS = ("round", "accuracy", "loss", "precision", "recall", "auc", "participants", "round_time_s",
                 "bytes_up", "bytes_down", "eps_max", "eps_median", "attempts", "attention_entropy", "rejected")


def write_strategy_metrics(run_dir: Path, strategy: str, meta: dict[str, Any], rounds: Sequence[RoundRecord],
                           epsilon: dict[str, float]) -> Path:
    """Write `<run>/<strategy>/metrics.json` and `metrics.csv`; returns the strategy directory."""
    out = Path(run_dir) / strategy
    out.mkdir(parents=True, exist_ok=True)
    doc = {**meta, "strategy": strategy, "rounds": [asdict(r) for r in rounds], "epsilon": epsilon}
    atomic_write(out / "metrics.json", json.dumps(doc, indent=1, allow_nan=False, default=_json_default))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SCALAR_FIELDS)
    for r in rounds:
        row = asdict(r)
        row["rejected"] = sum(r.rejections.values())
        w.writerow(["" if row.get(k) is None else row.get(k) for k in SCALAR_FIELDS])
    atomic_write(out / "metrics.csv", buf.getvalue())
    return out


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_run(run_dir: Path) -> dict[str, dict[str, Any]]:
    """strategy -> metrics.json document, for every strategy directory in the run."""
    runs = {}
    for p in sorted(Path(run_dir).glob("*/metrics.json")):
        runs[p.parent.name] = json.loads(p.read_text())
    if not runs:
        raise FileNotFoundError(f"no */metrics.json under {run_dir}")
    return runs


def make_plots(run_dir: Path) -> list[Path]:
    """Draw the run's PNG plots; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    import numpy as np

    runs = load_run(run_dir)
    plots = Path(run_dir) / "plots"
    plots.mkdir(exist_ok=True)
    written: list[Path] = []

    def per_round(metric: str, ylabel: str, fname: str, baseline: float | None = None) -> None:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, doc in runs.items():
            xs = [r["round"] for r in doc["rounds"]]
            ys = [r.get(metric) for r in doc["rounds"]]
            if any(y is not None for y in ys):
                ax.plot(xs, [math.nan if y is None else y for y in ys], marker="o", ms=3, label=name)
        if baseline is not None:
            ax.axhline(baseline, color="grey", ls="--", lw=1, label=f"majority class ({baseline:.3f})")
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{ylabel} per round — {next(iter(runs.values())).get('dataset', '')}")
        fig.tight_layout()
        fig.savefig(plots / fname, dpi=110)
        plt.close(fig)
        written.append(plots / fname)

    first = next(iter(runs.values()))
    per_round("accuracy", "held-out accuracy", "accuracy.png", first.get("majority_baseline"))
    per_round("loss", "held-out loss", "loss.png")
    if any(r.get("recall") is not None for d in runs.values() for r in d["rounds"]):
        per_round("recall", "held-out recall (positive class)", "recall.png")
    per_round("bytes_up", "bytes uploaded per round", "bytes.png")

    for name, doc in runs.items():
        devices = sorted({d for r in doc["rounds"] for d in r.get("weights", {})})
        if not devices or not doc["rounds"]:
            continue
        # Mean weight over layers per (device, round); NaN where the device did not take part.
        grid = np.full((len(devices), len(doc["rounds"])), np.nan)
        for j, r in enumerate(doc["rounds"]):
            for i, d in enumerate(devices):
                w = r.get("weights", {}).get(d)
                if w:
                    grid[i, j] = float(np.mean(list(w.values())))
        shown = devices[:60]  # a heatmap with thousands of rows says nothing; show the first 60
        fig, ax = plt.subplots(figsize=(7, max(2.5, 0.18 * len(shown) + 1.2)))
        im = ax.imshow(grid[: len(shown)], aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(shown)), shown, fontsize=6)
        ax.set_xticks(range(len(doc["rounds"])), [r["round"] for r in doc["rounds"]], fontsize=6)
        ax.set_xlabel("round")
        ax.set_title(f"aggregation weight per device (mean over layers) — {name}")
        fig.colorbar(im, ax=ax, fraction=0.03)
        fig.tight_layout()
        fname = f"attention_{name}.png"
        fig.savefig(plots / fname, dpi=110)
        plt.close(fig)
        written.append(plots / fname)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, doc in runs.items():
        eps = sorted(doc.get("epsilon", {}).values(), reverse=True)
        if eps:
            ax.plot(range(len(eps)), eps, marker=".", label=name)
    ax.set_xlabel("device (sorted by ε spent)")
    ax.set_ylabel("ε spent (device-level, δ from config)")
    ax.set_title("privacy spent per device at the end of the run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plots / "epsilon.png", dpi=110)
    plt.close(fig)
    written.append(plots / "epsilon.png")
    return written


def summary_rows(run_dir: Path) -> list[dict[str, Any]]:
    """One row per strategy: final/best accuracy, rounds, ε, bytes, time."""
    rows = []
    for name, doc in load_run(run_dir).items():
        rs = doc["rounds"]
        eps = list(doc.get("epsilon", {}).values())
        rows.append({
            "strategy": name,
            "rounds": len(rs),
            "final_acc": rs[-1]["accuracy"] if rs else math.nan,
            "best_acc": max((r["accuracy"] for r in rs), default=math.nan),
            "final_loss": rs[-1]["loss"] if rs else math.nan,
            "final_recall": rs[-1].get("recall") if rs else None,
            "majority": doc.get("majority_baseline"),
            "eps_max": max(eps, default=0.0),
            "MB_up": sum(r["bytes_up"] for r in rs) / 1e6,
            "s_per_round": (sum(r["round_time_s"] for r in rs) / len(rs)) if rs else math.nan,
            "rejected": sum(sum(r.get("rejections", {}).values()) for r in rs),
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table (also readable on a terminal)."""
    if not rows:
        return "(no results)"
    cols = list(rows[0])

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_report(run_dir: Path, title: str, notes: Sequence[str] = ()) -> Path:
    """Plots + report.md with the summary table; returns the report path."""
    run_dir = Path(run_dir)
    plots = make_plots(run_dir)
    rows = summary_rows(run_dir)
    parts = [f"# {title}", "", format_table(rows), ""]
    parts += [f"- {n}" for n in notes]
    parts += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    path = run_dir / "report.md"
    atomic_write(path, "\n".join(parts) + "\n")
    return path

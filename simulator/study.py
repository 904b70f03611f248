"""Named experiments behind docs/RESULTS.md: `python -m simulator.study NAME`.

Every experiment runs `simulator.run.simulate(SimConfig(...))` — the code path of `fedatt simulate` — once per
(seed, setting), into runs/study/<NAME>/<setting>/, then reads the runs' metrics.json (and, for `heart`, the
aggregator's final checkpoint) and writes docs/results/<NAME>.png and docs/results/<NAME>.json (the numbers in
the tables). Names: three_clients, heart, robustness, attention, shakespeare.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from simulator.run import SimConfig, simulate

ROOT = Path("runs/study")
FIGS = Path("docs/results")
ATT3 = ("fedatt", "fedatt-noise-aware", "fedavg")
ALL5 = ("fedavg", "fedatt", "fedatt-noise-aware", "median", "trimmed_mean")
REUSE = False  # --reuse: skip a setting whose run directory holds a finished run of the identical config
Z0 = 0.001  # "no noise": the ledger refuses z = 0 (ε infinite); z = 0.001 is noise std 0.001·C


def _run(name: str, setting: str, **kw: Any) -> Path:
    out = ROOT / name / setting
    cfg = SimConfig(out=out, progress=False, **kw)
    done = out / "config.json"
    if REUSE and done.exists():
        old = json.loads(done.read_text()).get("config")
        if old == json.loads(json.dumps(cfg.to_json(), default=str)) and all(
                (out / st / "metrics.json").exists() for st in cfg.strategies):
            print(f"reusing {out}")
            return out
    simulate(cfg)
    return out


def _metrics(run: Path, strategy: str) -> dict[str, Any]:
    return json.loads((run / strategy / "metrics.json").read_text())


def _series(m: dict[str, Any], key: str) -> np.ndarray:
    return np.array([r[key] if r.get(key) is not None else np.nan for r in m["rounds"]], dtype=float)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, name: str, data: dict[str, Any]) -> None:
    FIGS.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(FIGS / f"{name}.png", dpi=80)
    (FIGS / f"{name}.json").write_text(json.dumps(data, indent=1, default=float))
    print(f"wrote {FIGS / name}.png and .json")


def _ms(v: list[float]) -> str:
    a = np.asarray(v, dtype=float)
    return f"{a.mean():.3f} ± {a.std(ddof=1) if len(a) > 1 else 0:.3f}"


# ------------------------------------------------------------------------------------------ 1
def three_clients(seeds: tuple[int, ...] = (0, 1, 2), zs: tuple[float, ...] = (Z0, 0.5, 2.0), rounds: int = 20,
                  clip: float = 1.0, name: str = "three_clients") -> None:
    data: dict[str, Any] = {}
    for z in zs:
        for s in seeds:
            run = _run(name, f"z{z}_s{s}", dataset="three_clients", strategies=ATT3, rounds=rounds,
                       noise_multiplier=z, seed=s, clip_norm=clip)
            for st in ATT3:
                m = _metrics(run, st)
                d = data.setdefault(f"{z}", {}).setdefault(st, {"acc": [], "recall": [], "eps": []})
                d["acc"].append(_series(m, "accuracy").tolist())
                d["recall"].append(_series(m, "recall").tolist())
                d["eps"].append(max(m["epsilon"].values()))
    plt = _plt()
    fig, ax = plt.subplots(2, len(zs), figsize=(4 * len(zs), 6), sharey="row")
    print("| z | strategy | final acc (mean ± sd) | final recall | ε per device |")
    print("|---|---|---|---|---|")
    for j, z in enumerate(zs):
        for st in ATT3:
            d = data[f"{z}"][st]
            for i, key in enumerate(("acc", "recall")):
                a = np.array(d[key])
                x = np.arange(1, a.shape[1] + 1)
                ax[i, j].plot(x, a.mean(0), label=st)
                ax[i, j].fill_between(x, a.min(0), a.max(0), alpha=0.2)
                ax[i, j].set_title(f"C = {clip}, z = {z}: {'accuracy' if key == 'acc' else 'recall'}")
                ax[i, j].set_xlabel("round")
            print(f"| {z} | {st} | {_ms([a[-1] for a in d['acc']])} | {_ms([a[-1] for a in d['recall']])} "
                  f"| {d['eps'][0]:.4g} |")
    ax[0, 0].legend(fontsize=8)
    _save(fig, name, {"seeds": seeds, "rounds": rounds, "clip": clip, "data": data})


# ------------------------------------------------------------------------------------------ 2
def heart(seeds: tuple[int, ...] = (0, 1, 2), z: float = 0.01, rounds: int = 20) -> None:
    from broker.state import CheckpointStore
    from edge_sdk.bundle import Bundle
    from edge_sdk.trainer import LocalTrainer
    from simulator.datasets import load_dataset
    from simulator.run import evaluate_metrics

    rows: dict[str, dict[str, dict[str, list[float]]]] = {}

    def add(model: str, where: str, ev: dict[str, Any]) -> None:
        d = rows.setdefault(model, {}).setdefault(where, {"acc": [], "auc": []})
        d["acc"].append(ev["accuracy"])
        d["auc"].append(ev["auc"] if ev["auc"] is not None else np.nan)

    eps: list[float] = []
    for s in seeds:
        run = _run("heart", f"s{s}", dataset="heart", strategies=ATT3, rounds=rounds, noise_multiplier=z, seed=s)
        ds = load_dataset("heart", seed=s)
        bundle = Bundle.load(run / "bundle")
        tr = LocalTrainer(bundle)
        tests = {"overall": ds.test, **ds.client_tests}

        def eval_all(model: str, named: dict[str, np.ndarray]) -> None:
            for where, t in tests.items():
                add(model, where, evaluate_metrics(tr, bundle, named, t, "binary"))

        for st in ATT3:
            ck = CheckpointStore(run / st / "aggregator" / "checkpoints").load()
            eval_all(f"federated {st}", ck.model)
            eps.append(max(_metrics(run, st)["epsilon"].values()))
        init = bundle.initial_parameters()
        # same budget as the federation: `rounds` rounds x 1 local epoch = `rounds` epochs, batch 32, no DP
        for where, data in [("pooled", ds.pooled_train()), *[(h, ds.clients[h]) for h in ds.client_ids]]:
            tr.set_parameters(init)
            tr.train(data, epochs=rounds, batch_size=32, seed=s)
            named = bundle.split(tr.get_parameters())
            if where == "pooled":
                eval_all("centralised (pooled, no DP)", named)
            else:  # a hospital alone: its own test set, and the pooled test set
                add("hospital alone (no DP)", where, evaluate_metrics(tr, bundle, named, ds.client_tests[where], "binary"))
                add("hospital alone (no DP)", f"overall[{where}]", evaluate_metrics(tr, bundle, named, ds.test, "binary"))
        tr.close()
    wheres = ["overall", *ds.client_ids]
    print(f"ε per device (federated, z = {z}, {rounds} releases): {max(eps):.4g}")
    print("| model | " + " | ".join(f"{w} acc / AUC" for w in wheres) + " |")
    print("|---|" + "---|" * len(wheres))
    for model, d in rows.items():
        cells = []
        for w in wheres:
            if w in d:
                cells.append(f"{np.mean(d[w]['acc']):.3f} / {np.nanmean(d[w]['auc']):.3f}")
            else:
                cells.append("–")
        print(f"| {model} | " + " | ".join(cells) + " |")
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    models = list(rows)
    wd = 0.8 / len(models)
    for i, model in enumerate(models):
        for k, key in enumerate(("acc", "auc")):
            vals = [np.nanmean(rows[model][w][key]) if w in rows[model] else np.nan for w in wheres]
            errs = [np.nanstd(rows[model][w][key]) if w in rows[model] else 0 for w in wheres]
            ax[k].bar(np.arange(len(wheres)) + i * wd, vals, wd, yerr=errs, label=model)
    for k, key in enumerate(("accuracy", "ROC AUC")):
        ax[k].set_xticks(np.arange(len(wheres)) + 0.4 - wd / 2, wheres, fontsize=8)
        ax[k].set_ylim(0.4, 1.0)
        ax[k].set_title(f"heart: {key} by test set (mean over seeds {list(seeds)})")
    ax[0].legend(fontsize=7)
    _save(fig, "heart", {"seeds": seeds, "z": z, "rounds": rounds, "eps_max": max(eps), "rows": rows})


# ------------------------------------------------------------------------------------------ 3
def robustness(seed: int = 0, z: float = 0.01, rounds: int = 20,
               attacks: tuple[str, ...] = ("none", "0.2:flip", "0.2:random", "0.2:flip:10"),
               clip: float = 1.0, name: str = "robustness") -> None:
    data: dict[str, Any] = {}
    for atk in attacks:
        run = _run(name, atk.replace(":", "_"), dataset="heart", partition="iid", devices=10,
                   strategies=ALL5, rounds=rounds, noise_multiplier=z, seed=seed, clip_norm=clip,
                   byzantine=None if atk == "none" else atk)
        for st in ALL5:
            m = _metrics(run, st)
            data.setdefault(atk, {})[st] = {"acc": _series(m, "accuracy").tolist(), "auc": _series(m, "auc").tolist()}
    print("| attack | " + " | ".join(ALL5) + " |")
    print("|---|" + "---|" * len(ALL5))
    for atk in attacks:
        print(f"| {atk} | " + " | ".join(f"{data[atk][st]['acc'][-1]:.3f} / {data[atk][st]['auc'][-1]:.3f}"
                                         for st in ALL5) + " |")
    plt = _plt()
    fig, ax = plt.subplots(1, len(attacks), figsize=(4 * len(attacks), 3.5), sharey=True)
    for j, atk in enumerate(attacks):
        for st in ALL5:
            ax[j].plot(range(1, rounds + 1), data[atk][st]["acc"], label=st)
        ax[j].set_title(f"heart iid×10, C={clip}, byzantine {atk}", fontsize=9)
        ax[j].set_xlabel("round")
    ax[0].set_ylabel("pooled test accuracy")
    ax[0].legend(fontsize=7)
    _save(fig, name, {"seed": seed, "z": z, "clip": clip, "rounds": rounds, "data": data})


# ------------------------------------------------------------------------------------------ 4
def attention(seed: int = 0, zs: tuple[float, ...] = (Z0, 0.1, 1.0, 10.0), rounds: int = 10,
              dataset: str = "heart", devices: int = 12) -> None:
    strategies = ("fedatt", "fedatt-noise-aware", "fedavg")
    data: dict[str, Any] = {}
    for z in zs:
        run = _run("attention", f"z{z}", dataset=dataset, partition="iid" if dataset == "heart" else "dirichlet",
                   devices=devices, strategies=strategies, rounds=rounds, noise_multiplier=z, seed=seed)
        for st in strategies:
            m = _metrics(run, st)
            ent, mx, acc = [], [], _series(m, "accuracy").tolist()
            for r in m["rounds"]:
                w = r.get("weights") or {}
                devs = list(w)
                layers = list(w[devs[0]]) if devs else []
                W = np.array([[w[d][l] for d in devs] for l in layers])  # layers x devices
                mcount = W.shape[1]
                H = -(W * np.log(np.clip(W, 1e-300, None))).sum(1) / math.log(mcount)
                ent.append(float(H.mean()))
                mx.append(float(W.max(1).mean()))
            data.setdefault(f"{z}", {})[st] = {"entropy": ent, "max_weight": mx, "acc": acc,
                                               "eps": max(m["epsilon"].values()), "m": mcount}
    print("| z | ε per device | strategy | mean entropy (1 = uniform) | mean max weight (uniform 1/m) | worst-round max weight | final acc |")
    print("|---|---|---|---|---|---|---|")
    for z in zs:
        for st in strategies:
            d = data[f"{z}"][st]
            print(f"| {z} | {d['eps']:.4g} | {st} | {np.mean(d['entropy']):.3f} | {np.mean(d['max_weight']):.3f} "
                  f"(1/m = {1 / d['m']:.3f}) | {max(d['max_weight']):.3f} | {d['acc'][-1]:.3f} |")
    plt = _plt()
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for k, st in enumerate(("fedatt", "fedatt-noise-aware")):
        for z in zs:
            ax[k].plot(range(1, rounds + 1), data[f"{z}"][st]["max_weight"], label=f"z={z}")
        ax[k].axhline(1 / data[f"{zs[0]}"][st]["m"], color="k", ls=":", lw=1)
        ax[k].set_title(f"{st}: max weight per round (mean over layers)", fontsize=9)
        ax[k].set_xlabel("round")
        ax[k].set_ylim(0, 1)
    ax[0].legend(fontsize=8)
    for st in strategies:
        ax[2].plot([str(z) for z in zs], [data[f"{z}"][st]["acc"][-1] for z in zs], marker="o", label=st)
    ax[2].set_title("final accuracy vs z", fontsize=9)
    ax[2].set_xlabel("noise multiplier z")
    ax[2].legend(fontsize=8)
    _save(fig, "attention", {"seed": seed, "rounds": rounds, "dataset": dataset, "devices": devices, "data": data})


# ------------------------------------------------------------------------------------------ 5
def shakespeare(seed: int = 0, zs: tuple[float, ...] = (Z0, 0.01, 0.05, 0.5), rounds: int = 8, devices: int = 20,
                max_samples: int = 64, epochs: int = 4) -> None:
    data: dict[str, Any] = {}
    for z in zs:
        run = _run("shakespeare", f"z{z}", dataset="shakespeare", devices=devices,
                   max_samples_per_client=max_samples, strategies=ATT3, rounds=rounds, noise_multiplier=z,
                   seed=seed, round_timeout=120.0, epochs=epochs)
        for st in ATT3:
            m = _metrics(run, st)
            data.setdefault(f"{z}", {})[st] = {"acc": _series(m, "accuracy").tolist(),
                                               "eps": max(m["epsilon"].values()),
                                               "initial": m["initial_accuracy"]}
    print("| z | ε per device | " + " | ".join(ATT3) + " |")
    print("|---|---|" + "---|" * len(ATT3))
    for z in zs:
        d = data[f"{z}"]
        print(f"| {z} | {d[ATT3[0]]['eps']:.4g} | " + " | ".join(f"{d[st]['acc'][-1]:.3f}" for st in ATT3) + " |")
    plt = _plt()
    fig, ax = plt.subplots(1, 1, figsize=(5, 3.6))
    for st in ATT3:
        ax.plot([data[f"{z}"][st]["eps"] for z in zs], [data[f"{z}"][st]["acc"][-1] for z in zs], marker="o", label=st)
    ax.set_xscale("log")
    ax.set_xlabel("ε per device (δ = 1e-5, add/remove)")
    ax.set_ylabel("next-character accuracy")
    ax.axhline(data[f"{zs[0]}"][ATT3[0]]["initial"], color="k", ls=":", lw=1)
    ax.set_title(f"shakespeare, {devices} roles, {rounds} rounds x {epochs} epochs (dotted: initial)", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, "shakespeare", {"seed": seed, "rounds": rounds, "epochs": epochs, "devices": devices,
                               "max_samples": max_samples, "data": data})


EXPERIMENTS = {
    "three_clients": three_clients,
    # same z, so the same ε per device, but C = 0.1 (about the honest update norm): 10x less noise
    "three_clients_tight": lambda: three_clients(clip=0.1, name="three_clients_tight"),
    "heart": heart,
    "robustness": robustness,
    # C = 0.1: an SDK-obeying attacker is bounded to ~1x the honest norm instead of ~11x; same ε
    "robustness_tight": lambda: robustness(clip=0.1, name="robustness_tight"),
    "attention": attention,
    "shakespeare": shakespeare,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulator.study", description=__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(EXPERIMENTS))
    p.add_argument("--reuse", action="store_true",
                   help="skip settings whose run directory already holds a finished run of the same config")
    args = p.parse_args(argv)
    global REUSE
    REUSE = args.reuse
    EXPERIMENTS[args.name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())

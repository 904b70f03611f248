"""Benchmark 5: fedatt's simulator side by side with Flower's Ray simulation on the same task.

Task: UCI heart (simulator/datasets.py), natural split = 4 hospitals, zoo MLP (35-32-32-2, 2,338 parameters),
every client in every round (cohort 4), 1 local epoch, batch 32, AdamW lr 1e-3 (eps 1e-6, no weight decay: the
bundle's hyperparameters), FedAvg, the same number of rounds, global test-set evaluation after every round.
The data is loaded in the project venv and handed to Flower as .npz files (no pickle).

* Flower: a separate venv (~/.cache/fedatt-bench/flower-venv: `pip install torch==2.13.0 "flwr[simulation]"`,
  created on first use; skipped with a message if that fails), `flwr.simulation.run_simulation` with the Ray
  backend, PyTorch NumPyClients, `client_resources={"num_cpus": 1}` on 2 CPUs.
* fedatt: `fedatt simulate --dataset heart --strategy fedavg` (embedded amqtt broker, 2 ORT training workers,
  real EdgeClients with device-side DP at clip 1, z = 0.01 - the simulator refuses z = 0 - so fedatt does a bit
  more work per round than Flower: clipping, noise, privacy ledger, MQTT transport, checkpoints).

Measured per framework (each a child process whose whole process tree is sampled for RSS every 0.2 s): total wall
time, steady-state wall time per round (median interval between consecutive round closes), peak summed RSS of the
process tree. Ratio = Flower / fedatt (> 1: fedatt is faster / leaner).

Run: python -m benchmarks.bench_flower [--quick] [--rounds R]
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, TreeMemorySampler, base_parser, table, wait_for_quiet, write_result

VENV = Path(os.environ.get("FEDATT_BENCH_CACHE", Path.home() / ".cache" / "fedatt-bench")) / "flower-venv"

FLOWER_APP = r'''
"""Flower side of benchmarks/bench_flower.py (runs in the Flower venv): Ray simulation, PyTorch clients."""
import json, sys, time
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from flwr.client import ClientApp, NumPyClient
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.common import ndarrays_to_parameters
from flwr.simulation import run_simulation

data_dir, rounds, epochs, batch, lr, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
meta = json.load(open(f"{data_dir}/meta.json"))
torch.set_num_threads(1)

def model():
    torch.manual_seed(0)
    f = meta["in_features"]
    return nn.Sequential(nn.Linear(f, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))

def get(m): return [p.detach().numpy().copy() for p in m.state_dict().values()]
def put(m, ps): m.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in zip(m.state_dict().keys(), ps)})

class Client(NumPyClient):
    def __init__(self, cid):
        d = np.load(f"{data_dir}/client{cid}.npz")
        self.x, self.y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
        self.m = model()
    def fit(self, parameters, config):
        put(self.m, parameters)
        opt = torch.optim.AdamW(self.m.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
        self.m.train()
        g = torch.Generator().manual_seed(int(config.get("round", 0)))
        for _ in range(epochs):
            perm = torch.randperm(len(self.y), generator=g)
            for s in range(0, len(perm), batch):
                idx = perm[s:s + batch]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(self.m(self.x[idx]), self.y[idx])
                loss.backward()
                opt.step()
        return get(self.m), len(self.y), {}

def client_fn(context):
    return Client(int(context.node_config["partition-id"])).to_client()

test = np.load(f"{data_dir}/test.npz")
tx, ty = torch.from_numpy(test["x"]), torch.from_numpy(test["y"])
closes = []
def evaluate(server_round, parameters, config):
    m = model(); put(m, parameters); m.eval()
    with torch.no_grad():
        logits = m(tx)
        loss = float(F.cross_entropy(logits, ty)); acc = float((logits.argmax(1) == ty).float().mean())
    closes.append({"round": server_round, "t": time.time(), "accuracy": acc, "loss": loss})
    return loss, {"accuracy": acc}

n = meta["clients"]
def server_fn(context):
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_evaluate_clients=0,
                      min_available_clients=n, evaluate_fn=evaluate, on_fit_config_fn=lambda r: {"round": r},
                      initial_parameters=ndarrays_to_parameters(get(model())))
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

t0 = time.time()
run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
               num_supernodes=n, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                                 "init_args": {"num_cpus": 2, "include_dashboard": False}})
json.dump({"t0": t0, "t_end": time.time(), "closes": closes}, open(out_path, "w"))
'''


def ensure_flower_venv() -> tuple[Path | None, str]:
    py = VENV / "bin" / "python"
    check = [str(py), "-c", "import flwr, ray, torch; print(flwr.__version__, ray.__version__, torch.__version__)"]
    if py.exists():
        r = subprocess.run(check, capture_output=True, text=True, timeout=300)
        if r.returncode == 0:
            return py, r.stdout.strip()
    try:
        VENV.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["python3", "-m", "venv", str(VENV)], check=True, timeout=300)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0", "flwr[simulation]"], check=True,
                       timeout=1800)
        r = subprocess.run(check, capture_output=True, text=True, timeout=300, check=True)
        return py, r.stdout.strip()
    except (subprocess.SubprocessError, OSError) as exc:
        return None, f"could not create the Flower venv at {VENV}: {exc}"


def write_data(d: Path) -> dict[str, Any]:
    import numpy as np

    from simulator.datasets import load_dataset

    ds = load_dataset("heart", seed=0)
    d.mkdir(parents=True, exist_ok=True)
    sizes = []
    for i, (cid, (x, y)) in enumerate(ds.clients.items()):
        np.savez(d / f"client{i}.npz", x=x.astype(np.float32), y=y.astype(np.int64))
        sizes.append(len(y))
    np.savez(d / "test.npz", x=ds.test[0].astype(np.float32), y=ds.test[1].astype(np.int64))
    meta = {"clients": len(ds.clients), "in_features": int(ds.input_shape[0]), "sizes": sizes,
            "client_ids": list(ds.clients)}
    (d / "meta.json").write_text(json.dumps(meta))
    return meta


def run_tree(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[float, float, int, subprocess.CompletedProcess]:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreeMemorySampler(proc.pid, 0.2) as tree:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    wall = time.monotonic() - t0
    return wall, tree.peak_mib, tree.peak_procs, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 10, quick 3)")
    args = p.parse_args()
    rounds = args.rounds or (3 if args.quick else 10)
    epochs, batch, lr = 1, 32, 1e-3
    py, versions = ensure_flower_venv()
    quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet else wait_for_quiet(0, quiet=True)
    results: dict[str, Any] = {"rounds": rounds, "epochs": epochs, "batch": batch, "lr": lr, "quiet": quiet}
    with tempfile.TemporaryDirectory(prefix="fedatt-bench-flower-") as tmp:
        tmp_p = Path(tmp)
        meta = write_data(tmp_p / "data")
        results["data"] = meta
        # ---- fedatt
        out = tmp_p / "fedatt"
        cmd = [sys.executable, "-m", "edge_sdk.cli", "simulate", "--dataset", "heart", "--strategy", "fedavg",
               "--rounds", str(rounds), "--epochs", str(epochs), "--batch-size", str(batch), "--lr", str(lr),
               "--cohort", str(meta["clients"]), "--quorum", str(meta["clients"]), "--clip-norm", "1",
               "--noise-multiplier", "0.01", "--workers", "2", "--no-progress", "--out", str(out)]
        wall, peak, procs, cp = run_tree(cmd, {**os.environ, "PYTHONPATH": str(ROOT)}, 1200)
        if cp.returncode != 0:
            raise SystemExit(f"fedatt simulate failed:\n{cp.stderr[-3000:]}")
        doc = json.loads((out / "fedavg" / "metrics.json").read_text())
        walls = [e["wall_s"] for e in doc["round_extras"]]
        ours = {"command": " ".join(cmd[1:]).replace(str(out), "<tmp>"), "total_wall_s": wall,
                "per_round_s": statistics.median([b - a for a, b in zip(walls, walls[1:])]) if len(walls) > 1 else walls[0],
                "round_time_s": [r["round_time_s"] for r in doc["rounds"]],
                "setup_s": wall - (walls[-1] - walls[0]) - statistics.median([b - a for a, b in zip(walls, walls[1:])] or [0]),
                "tree_peak_rss_mib": peak, "tree_procs": procs,
                "final_accuracy": doc["rounds"][-1]["accuracy"], "accuracy": [r["accuracy"] for r in doc["rounds"]]}
        results["fedatt"] = ours
        print(f"  fedatt: {wall:.1f} s total, {ours['per_round_s']:.3f} s/round, tree peak {peak:.0f} MiB, "
              f"final accuracy {ours['final_accuracy']:.3f}", flush=True)
        # ---- Flower
        if py is None:
            print(f"  Flower: SKIPPED - {versions}")
            results["flower"] = {"skipped": versions}
        else:
            app = tmp_p / "flower_app.py"
            app.write_text(FLOWER_APP)
            fout = tmp_p / "flower.json"
            fcmd = [str(py), str(app), str(tmp_p / "data"), str(rounds), str(epochs), str(batch), str(lr), str(fout)]
            env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
            env.update({"RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0"})
            wall, peak, procs, cp = run_tree(fcmd, env, 1800)
            if cp.returncode != 0 or not fout.exists():
                print(f"  Flower: FAILED (rc {cp.returncode}):\n{cp.stderr[-3000:]}")
                results["flower"] = {"failed": cp.stderr[-3000:]}
            else:
                fd = json.loads(fout.read_text())
                ts = [c["t"] for c in fd["closes"] if c["round"] > 0]
                per_round = statistics.median([b - a for a, b in zip(ts, ts[1:])]) if len(ts) > 1 else float("nan")
                results["flower"] = {"versions": versions, "total_wall_s": wall, "per_round_s": per_round,
                                     "setup_s": wall - (ts[-1] - ts[0]) - per_round if ts else None,
                                     "tree_peak_rss_mib": peak, "tree_procs": procs,
                                     "final_accuracy": fd["closes"][-1]["accuracy"],
                                     "accuracy": [c["accuracy"] for c in fd["closes"] if c["round"] > 0]}
                print(f"  Flower {versions}: {wall:.1f} s total, {per_round:.3f} s/round, tree peak {peak:.0f} MiB, "
                      f"final accuracy {results['flower']['final_accuracy']:.3f}", flush=True)
    fl = results.get("flower", {})
    rows = [["fedatt (ORT, MQTT, DP)", ours["total_wall_s"], ours["setup_s"], ours["per_round_s"],
             ours["tree_peak_rss_mib"], ours["tree_procs"], ours["final_accuracy"]]]
    if "total_wall_s" in fl:
        rows.append([f"Flower {fl['versions'].split()[0]} (Ray, torch)", fl["total_wall_s"], fl["setup_s"],
                     fl["per_round_s"], fl["tree_peak_rss_mib"], fl["tree_procs"], fl["final_accuracy"]])
        results["ratios"] = {"total_wall_flower_over_fedatt": fl["total_wall_s"] / ours["total_wall_s"],
                             "per_round_flower_over_fedatt": fl["per_round_s"] / ours["per_round_s"],
                             "peak_rss_flower_over_fedatt": fl["tree_peak_rss_mib"] / ours["tree_peak_rss_mib"]}
    print()
    print(table(["framework", "total wall s", "setup s", "s / round (median)", "tree peak RSS MiB", "procs at peak",
                 "final test accuracy"], rows))
    if "ratios" in results:
        r = results["ratios"]
        print(f"\nFlower / fedatt: total wall {r['total_wall_flower_over_fedatt']:.2f}x, per round "
              f"{r['per_round_flower_over_fedatt']:.2f}x, peak memory {r['peak_rss_flower_over_fedatt']:.2f}x")
    path = write_result("bench_flower", results, quick=args.quick)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

"""Benchmark 1: on-device training speed, ONNX Runtime (the device path) vs PyTorch eager, and device memory.

For each zoo model (plus an MNIST-sized MLP) and 1/2 threads, in separate child processes so thread settings
and imports cannot leak between measurements:
  * ORT: the bundle's ORT training Module + Optimizer driven directly in a loop - exactly LocalTrainer.train's
    inner step (`loss = float(module(x, y)[0]); optimizer.step(); module.lazy_reset_grad()`) with LocalTrainer's
    session options (edge_sdk.trainer.training_session_options, flush_denormals=True as EdgeClient's jobs use) - in a process where torch and onnx are blocked
    from importing (as on a phone). intra_op threads = T, inter_op = 1.
  * torch eager: the same model (for the CNN: the exported, frozen-BatchNorm copy), the same batch, AdamW with
    the bundle's hyperparameters (lr, betas, eps, weight_decay), `zero_grad; loss = CE(model(x), y);
    loss.backward(); opt.step(); loss.item()`; torch.set_num_threads(T), one inter-op thread.
  * LocalTrainer.train (threads=1): end-to-end steps/s including batching/shuffling and the fresh optimizer state
    a round starts with, and the device process' peak RSS (VmHWM) - torch blocked, `'torch' in sys.modules`
    checked False.
ORT and torch are measured side by side: both children start, warm up, then take turns (ABBA order) of a fixed
number of steps, so load from other work on the machine falls on both alike. Figures are medians over the turns
of wall time per step; per-step process CPU time is recorded too (less sensitive to other load at one thread).

Run: python -m benchmarks.bench_training [--quick] [--wait-quiet S]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (ROOT, base_parser, machine, median, run_child, table, wait_for_quiet, write_result)

CACHE = Path(os.environ.get("FEDATT_BENCH_CACHE", Path.home() / ".cache" / "fedatt-bench"))

# name -> (zoo factory, kwargs, example input shape (batch 1), dtype, batch size, label shape suffix)
MODELS: dict[str, dict[str, Any]] = {
    "mlp": {"zoo": "mlp", "kwargs": {}, "shape": (10,), "batch": 32,
            "note": "zoo default 10-32-32-2 (three_clients/heart size)"},
    "mlp784": {"zoo": "mlp", "kwargs": {"in_features": 784, "hidden": 256, "num_classes": 10}, "shape": (784,),
               "batch": 64, "note": "zoo mlp 784-256-256-10 (MNIST size)"},
    "cnn": {"zoo": "cnn", "kwargs": {}, "shape": (1, 28, 28), "batch": 32, "note": "zoo cnn (Fashion-MNIST)"},
    "char_transformer": {"zoo": "char_transformer", "kwargs": {}, "shape": (32,), "batch": 16,
                         "note": "zoo char_transformer (seq 32, vocab 80)"},
}

BLOCK_TORCH = '''
import sys
class _Blocker:
    """Make torch and onnx unimportable, as on a phone (tests/test_torch_free.py does the same)."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx"):
            raise ImportError(f"{name} is blocked on this device")
        return None
sys.meta_path.insert(0, _Blocker())
'''


# ------------------------------------------------------------------------------------------- bundles
def _exporter_digest() -> str:
    """sha256 over exporter/*.py: a cached bundle is re-exported when the exporter changed."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((ROOT / "exporter").glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def bundle_dir(name: str) -> Path:
    """Export (once per exporter version, cached under ~/.cache/fedatt-bench/bundles) benchmark model `name`."""
    out = CACHE / "bundles" / name
    stamp = CACHE / "bundles" / f"{name}.exporter-sha256"
    digest = _exporter_digest()
    if (out / "manifest.json").exists() and stamp.exists() and stamp.read_text().strip() == digest:
        from edge_sdk.bundle import Bundle, BundleError

        try:
            Bundle.load(out)
            return out
        except BundleError:
            pass
    import torch

    from exporter import export_bundle, zoo

    spec = MODELS[name]
    torch.manual_seed(0)
    entry = zoo.ZOO[spec["zoo"]]
    model = entry.factory(**spec["kwargs"])
    export_bundle(model, ((1, *spec["shape"]), entry.input_dtype), out, loss=entry.loss, overwrite=True)
    stamp.write_text(digest + "\n")
    return out


def make_batch(name: str, batch: int, seed: int = 0):
    import numpy as np

    spec = MODELS[name]
    rng = np.random.default_rng(seed)
    if spec["zoo"] == "char_transformer":
        x = rng.integers(0, 80, size=(batch, *spec["shape"])).astype(np.int64)
        y = rng.integers(0, 80, size=(batch, *spec["shape"])).astype(np.int64)
    else:
        x = rng.standard_normal((batch, *spec["shape"])).astype(np.float32)
        classes = spec["kwargs"].get("num_classes", 2 if spec["zoo"] == "mlp" else 10)
        y = rng.integers(0, classes, size=(batch,)).astype(np.int64)
    return x, y


# --------------------------------------------------------------------------------------- children
def ort_step(name: str, path: str, threads: int):
    """ORT Module + Optimizer step exactly as LocalTrainer.train runs it (torch must be blocked by the caller)."""
    from edge_sdk._ort import training_api
    from edge_sdk.bundle import Bundle
    from edge_sdk.trainer import training_session_options

    api = training_api()
    b = Bundle.load(path)
    state = api.CheckpointState.load_checkpoint(str(b.file("checkpoint")))
    module = api.Module(str(b.file("training_model")), state, str(b.file("eval_model")), device="cpu",
                        session_options=training_session_options(threads, flush_denormals=True))
    opt = api.Optimizer(str(b.file("optimizer_model")), module)
    opt.set_learning_rate(float(b.manifest["optimizer"]["lr"]))
    module.train()
    x, y = make_batch(name, MODELS[name]["batch"])

    def step() -> float:
        loss = float(module(x, y)[0])
        opt.step()
        module.lazy_reset_grad()
        return loss

    return step, {"torch_imported": "torch" in sys.modules}


def _serve(kind: str, name: str, path: str, threads: int, warmup: int) -> None:
    """Child side of a side-by-side measurement: warm up, then run `N` steps per stdin line, reply with times."""
    step, info = (ort_step if kind == "ort" else torch_step)(name, path, threads)
    for _ in range(warmup):
        step()
    print(json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        n = int(line)
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            step()
        print(json.dumps({"wall_ms": (time.perf_counter() - w0) * 1000 / n,
                          "cpu_ms": (time.process_time() - c0) * 1000 / n, **info}), flush=True)


def child_device(name: str, path: str, threads: int, warmup: int, steps: int, repeats: int) -> dict[str, Any]:
    """LocalTrainer.train end to end (fresh optimizer state per call) and the device process' peak RSS."""
    import numpy as np

    from benchmarks.common import peak_rss_mib, rss_mib

    base = rss_mib()  # python + numpy + benchmarks.common
    from edge_sdk._ort import training_api
    from edge_sdk.bundle import Bundle
    from edge_sdk.trainer import LocalTrainer

    training_api()
    after_import = rss_mib()
    b = Bundle.load(path)
    batch = MODELS[name]["batch"]
    x, y = make_batch(name, batch * steps)
    trainer = LocalTrainer(b, threads=threads, flush_denormals=True)  # as EdgeClient runs it (ClientConfig)
    trainer.train((x[:batch * warmup], y[:batch * warmup]), batch_size=batch, seed=0)
    rates = []
    for r in range(repeats):
        res = trainer.train((x, y), batch_size=batch, seed=r)
        rates.append(res.steps / res.seconds)
    trainer.close()
    return {"steps_per_s": median(rates), "rates": rates, "rss_base_mib": base, "rss_after_import_mib": after_import,
            "peak_rss_mib": peak_rss_mib(), "torch_imported": "torch" in sys.modules,
            "onnx_imported": "onnx" in sys.modules, "num_trainable": b.num_trainable}


def torch_step(name: str, path: str, threads: int):
    """PyTorch eager step with the same model, batch, loss and AdamW hyperparameters."""
    import torch
    import torch.nn.functional as F

    from edge_sdk.bundle import Bundle
    from exporter import ops, zoo

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    b = Bundle.load(path)
    hp = b.manifest["optimizer"]["hyperparameters"]
    spec = MODELS[name]
    torch.manual_seed(0)
    model, _ = ops.freeze_batchnorm(zoo.ZOO[spec["zoo"]].factory(**spec["kwargs"]))  # what the bundle trains
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=float(b.manifest["optimizer"]["lr"]),
                            betas=(float(hp["beta1"]), float(hp["beta2"])), eps=float(hp["eps"]),
                            weight_decay=float(hp["weight_decay"]))
    xn, yn = make_batch(name, spec["batch"])
    x, y = torch.from_numpy(xn), torch.from_numpy(yn)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        return loss.item()

    return step, {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}


CHILDREN = {"device": child_device}


def _child_main(argv: list[str]) -> None:
    if argv[0] == "serve":
        _, kind, name, path, threads, warmup = argv
        _serve(kind, name, path, int(threads), int(warmup))
        return
    kind, name, path, threads, warmup, steps, repeats = argv
    out = CHILDREN[kind](name, path, int(threads), int(warmup), int(steps), int(repeats))
    print(json.dumps(out))


def _loadavg() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return []


def side_by_side(name: str, path: Path, threads: int, warmup: int, steps: int, turns: int) -> dict[str, Any]:
    """ORT and torch children alive at once, taking turns of `steps` steps (ABBA order) `turns` times each."""
    code = ("import sys; sys.argv = sys.argv[:1] + sys.argv[2:]; from benchmarks.bench_training import _child_main; "
            "_child_main(sys.argv[1:])")
    # torch keeps its defaults (OpenMP threads spin between kernels); ORT runs with the device's session options
    # (edge_sdk.trainer.training_session_options: pool threads do not spin). At one thread neither has a pool.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    procs: dict[str, subprocess.Popen] = {}
    try:
        for kind in ("ort", "torch"):
            procs[kind] = subprocess.Popen(
                [sys.executable, "-c", (BLOCK_TORCH + code) if kind == "ort" else code, "--", "serve", kind, name,
                 str(path), str(threads), str(warmup)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        info = {}
        for kind, proc in procs.items():
            line = proc.stdout.readline()
            if not line.startswith("{"):
                raise RuntimeError(f"{kind} child for {name} failed:\n{proc.stderr.read()[-3000:]}")
            info[kind] = json.loads(line)
        load_start = _loadavg()
        runs: dict[str, list[dict[str, float]]] = {"ort": [], "torch": []}
        for t in range(turns):
            for kind in (("ort", "torch") if t % 2 == 0 else ("torch", "ort")):
                proc = procs[kind]
                proc.stdin.write(f"{steps}\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line.startswith("{"):
                    raise RuntimeError(f"{kind} child for {name} died:\n{proc.stderr.read()[-3000:]}")
                runs[kind].append(json.loads(line))
        load_end = _loadavg()
    finally:
        for proc in procs.values():
            if proc.stdin:
                proc.stdin.close()
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    out: dict[str, Any] = {"loadavg_start": load_start, "loadavg_end": load_end, "turns": turns, "steps_per_turn": steps}
    for kind, rs in runs.items():
        wall = [r["wall_ms"] for r in rs]
        cpu = [r["cpu_ms"] for r in rs]
        out[kind] = {"ms_per_step": median(wall), "cpu_ms_per_step": median(cpu), "wall_ms_turns": wall,
                     "cpu_ms_turns": cpu, **{k: v for k, v in info[kind].items() if k != "ready"}}
    return out


def _spawn(kind: str, name: str, path: Path, threads: int, warmup: int, steps: int, repeats: int) -> dict[str, Any]:
    code = ("import sys; sys.argv = sys.argv[:1] + sys.argv[2:]; from benchmarks.bench_training import _child_main; "
            "_child_main(sys.argv[1:])")
    if kind in ("ort", "device"):
        code = BLOCK_TORCH + code
    env = {"OMP_NUM_THREADS": str(threads)}
    return run_child(["-c", code, "--", kind, name, str(path), str(threads), str(warmup), str(steps), str(repeats)],
                     timeout=900, env=env)


# ----------------------------------------------------------------------------------------- main
def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument("--turns", type=int, default=15, help="ORT/torch turns each (side by side), default 15")
    args = p.parse_args()
    names = [m for m in args.models.split(",") if m]
    threads_list = [1] if args.quick else [1, 2]
    warmup, repeats, turns = (3, 3, 4) if args.quick else (20, 7, args.turns)
    # steps per turn: ~0.2-0.4 s of work per turn on this machine class
    steps = {"mlp": 200, "mlp784": 100, "cnn": 30, "char_transformer": 30}
    if args.quick:
        steps = {k: max(5, v // 10) for k, v in steps.items()}
    paths = {n: bundle_dir(n) for n in names}
    quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet else wait_for_quiet(0, quiet=True)
    rows, results = [], []
    for n in names:
        for t in threads_list:
            sbs = side_by_side(n, paths[n], t, warmup, steps[n], turns)
            ort, tch = sbs["ort"], sbs["torch"]
            dev = _spawn("device", n, paths[n], t, 2, max(5, steps[n] // 2), repeats) if t == 1 else None
            ratio = tch["ms_per_step"] / ort["ms_per_step"]
            rec = {"model": n, "note": MODELS[n]["note"], "batch": MODELS[n]["batch"], "threads": t,
                   "ort_steps_per_s": 1000 / ort["ms_per_step"], "torch_steps_per_s": 1000 / tch["ms_per_step"],
                   "ort_over_torch": ratio, "ort_ms_per_step": ort["ms_per_step"],
                   "torch_ms_per_step": tch["ms_per_step"], "ort_cpu_ms_per_step": ort["cpu_ms_per_step"],
                   "torch_cpu_ms_per_step": tch["cpu_ms_per_step"],
                   "ort_over_torch_cpu": tch["cpu_ms_per_step"] / ort["cpu_ms_per_step"],
                   "ort_torch_imported": ort["torch_imported"], "ort_wall_ms_turns": ort["wall_ms_turns"],
                   "torch_wall_ms_turns": tch["wall_ms_turns"], "ort_cpu_ms_turns": ort["cpu_ms_turns"],
                   "torch_cpu_ms_turns": tch["cpu_ms_turns"], "loadavg_start": sbs["loadavg_start"],
                   "loadavg_end": sbs["loadavg_end"], "turns": turns, "steps_per_turn": steps[n],
                   "torch_version": tch["torch"]}
            if dev is not None:
                rec.update({"localtrainer_steps_per_s": dev["steps_per_s"], "device_peak_rss_mib": dev["peak_rss_mib"],
                            "device_rss_base_mib": dev["rss_base_mib"],
                            "device_rss_after_import_mib": dev["rss_after_import_mib"],
                            "device_torch_imported": dev["torch_imported"], "num_trainable": dev["num_trainable"]})
            results.append(rec)
            rows.append([n, MODELS[n]["batch"], t, rec["ort_ms_per_step"], rec["torch_ms_per_step"],
                         f"{ratio:.2f}x", f"{rec['ort_over_torch_cpu']:.2f}x",
                         rec.get("localtrainer_steps_per_s"), rec.get("device_peak_rss_mib"),
                         rec.get("device_torch_imported")])
            print(f"  {n} threads={t}: ORT {ort['ms_per_step']:.2f} ms/step, torch {tch['ms_per_step']:.2f} ms/step "
                  f"-> {ratio:.2f}x (CPU time {rec['ort_over_torch_cpu']:.2f}x; load {sbs['loadavg_start'][:1]}"
                  f"->{sbs['loadavg_end'][:1]})", flush=True)
    print()
    print(table(["model", "batch", "thr", "ORT ms/step", "torch ms/step", "torch/ORT", "torch/ORT CPU time",
                 "LocalTrainer steps/s", "device peak RSS MiB", "torch imported"], rows))
    targets = {}
    for n in ("mlp", "mlp784", "char_transformer"):
        r = next((r for r in results if r["model"] == n and r["threads"] == 1), None)
        if r is not None:
            targets[n] = {"target": ">= 1.3x at 1 thread", "achieved": round(r["ort_over_torch"], 2),
                          "met": r["ort_over_torch"] >= 1.3}
    print("\ntarget ORT >= 1.3x torch eager at 1 thread: "
          + ", ".join(f"{k} {v['achieved']}x ({'met' if v['met'] else 'MISSED'})" for k, v in targets.items()))
    path = write_result("bench_training", {
        "method": "ORT Module+Optimizer loop (LocalTrainer's step and session options) in a torch-blocked child "
                  "and torch eager AdamW (torch defaults) in another child, both alive, taking turns of steps_per_turn steps (ABBA); "
                  "medians over turns of wall (and process CPU) time per step after warm-up; LocalTrainer.train "
                  "end to end (median of repeats) and device VmHWM in a torch-blocked child",
        "warmup_steps": warmup, "turns": turns, "repeats": repeats, "steps_per_turn": steps, "quiet": quiet,
        "results": results, "targets": targets}, quick=args.quick)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

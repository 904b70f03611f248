"""Shared helpers of the benchmarks: timing, peak memory from /proc, machine description, quiet-machine check,
tables and the JSON result writer. Standard library only (no psutil), so it runs in every venv and subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from edge_sdk.durable import atomic_write

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------------------------------- timing
def time_repeats(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls of fn after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# ------------------------------------------------------------------------------------------- memory
def _status_kib(pid: int | str, keys: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            out[key] = int(value.split()[0])
    return out


def rss_mib(pid: int | str = "self") -> float:
    """Current resident set size (VmRSS) in MiB."""
    return _status_kib(pid, ("VmRSS",)).get("VmRSS", 0) / 1024


def peak_rss_mib(pid: int | str = "self") -> float:
    """Peak resident set size (VmHWM, = ru_maxrss for self) in MiB."""
    return _status_kib(pid, ("VmHWM",)).get("VmHWM", 0) / 1024


def maxrss_mib() -> float:
    """ru_maxrss of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (walks /proc/*/stat parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the command name may contain spaces/parentheses: the ppid is the 2nd field after the last ')'
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


class TreeMemorySampler:
    """Samples the summed RSS of a process and all its descendants every `interval` s; `peak_mib` is the
    largest sum seen (a lower bound of the true peak: short spikes between samples are missed)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_mib = 0.0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tree-rss")

    def _sample(self) -> None:
        pids = [self.pid, *descendants(self.pid)]
        total = sum(rss_mib(p) for p in pids)
        if total > self.peak_mib:
            self.peak_mib, self.peak_procs = total, len(pids)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# ------------------------------------------------------------------------------------------ machine
def machine() -> dict[str, Any]:
    """CPU model, core count, RAM, load average now, OS and Python: recorded with every result."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = _meminfo().get("MemTotal", 0)
    return {"cpu_model": model, "nproc": os.cpu_count(), "ram_gib": round(mem_kib / 2**20, 1),
            "loadavg": list(os.getloadavg()), "kernel": platform.release(), "python": platform.python_version(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def available_mib() -> float:
    return _meminfo().get("MemAvailable", 0) / 1024


def other_pytest_running() -> list[str]:
    """Command lines of pytest processes not started by us (other engineers' test runs)."""
    try:
        out = subprocess.run(["pgrep", "-af", "pytest"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    mine = {os.getpid(), *descendants(os.getpid())}
    return [line for line in out.splitlines() if line and int(line.split()[0]) not in mine]


def wait_for_quiet(max_wait: float, *, load: float = 0.5, poll: float = 10.0, quiet: bool = False) -> dict[str, Any]:
    """Wait (at most max_wait s) until the 1-min load is < `load` and no other pytest runs.

    Returns {"quiet": bool, "waited_s", "loadavg", "pytest": [...]}: measurements go ahead either way, and
    the record says whether the machine was quiet.
    """
    t0 = time.monotonic()
    while True:
        la = os.getloadavg()
        tests = other_pytest_running()
        ok = la[0] < load and not tests
        if ok or time.monotonic() - t0 >= max_wait:
            info = {"quiet": ok, "waited_s": round(time.monotonic() - t0, 1), "loadavg": list(la),
                    "pytest": tests[:3]}
            if not ok and not quiet:
                print(f"warning: machine not quiet after {info['waited_s']} s: load {la[0]:.2f}, "
                      f"{len(tests)} other pytest process(es); measuring anyway", file=sys.stderr)
            return info
        time.sleep(min(poll, max(0.5, max_wait - (time.monotonic() - t0))))


# --------------------------------------------------------------------------------------- reporting
def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table (also valid Markdown)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v:  # NaN
                return "-"
            if abs(v) >= 1000:
                return f"{v:,.0f}"
            if abs(v) >= 10:
                return f"{v:.1f}"
            return f"{v:.3g}"
        return "-" if v is None else str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join([line, sep, *body])


def write_result(name: str, data: dict[str, Any], *, quick: bool) -> Path:
    """benchmarks/results/<name>.json (or <name>.quick.json for smoke runs), with machine and command."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (f"{name}.quick.json" if quick else f"{name}.json")
    doc = {"benchmark": name, "quick": quick,
           "command": " ".join([Path(sys.executable).name, "-m", f"benchmarks.{name}", *sys.argv[1:]]),
           "machine": machine(), **data}
    atomic_write(path, json.dumps(doc, indent=1, default=_json_default) + "\n")
    return path


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fast smoke run (< 1 min), results in <name>.quick.json")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="wait up to S s for a quiet machine (1-min load < 0.5, no other pytest) before measuring")
    return p


def run_child(args: Sequence[str], *, timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a child python process that prints one JSON object on its last stdout line; return it."""
    # Own session, so a timeout kills the child's whole tree (e.g. the Mosquitto a simulator child started).
    child = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                             start_new_session=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import signal

        os.killpg(child.pid, signal.SIGKILL)
        out, err = child.communicate()
        raise RuntimeError(f"child {' '.join(args[-4:])} timed out after {timeout:.0f} s:\n{err[-3000:]}") from None
    proc = subprocess.CompletedProcess(child.args, child.returncode, out, err)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {' '.join(args)} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])

"""One simulation (a strategy on a fleet) and comparisons (several strategies on the same fleet, seeds, model).

`simulate(SimConfig)` does everything `fedatt simulate` does:
  1. load the dataset and its partitions (seeded), export the model ONCE (torch.manual_seed(seed)) into
     `<out>/bundle`, shared by every device and every strategy, so all strategies start from the same model;
  2. start the broker (embedded amqtt on 127.0.0.1, or `broker_url`) and one process pool for training;
  3. per strategy, sequentially: fresh device state dirs (ledgers) and a fresh aggregator state, the real
     `AggregatorService` (cohorts from a `random.Random` seeded from the run seed) and N real EdgeClients;
     after every closed round evaluate the new global model on the held-out test set and record a RoundRecord;
  4. write metrics JSON/CSV per strategy, PNG plots, report.md, and print a summary table.
Everything is stopped in finally blocks: broker, aggregator, devices, worker processes.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import math
import multiprocessing as mp
import queue
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from simulator.fleet import DatasetSpec, Fleet, Heterogeneity, unit_draw
from simulator.report import RoundRecord, format_table, summary_rows, write_report, write_strategy_metrics

__all__ = ["SimConfig", "simulate", "run_strategy", "export_model", "evaluate_metrics", "SimulationError",
           "plan_membership", "training_pool"]

log = logging.getLogger("fedatt.simulator")


class SimulationError(RuntimeError):
    """A simulation could not complete (stalled, aggregator failed, bad option); the message says why."""


@dataclass
class SimConfig:
    """Every option of `fedatt simulate` (see docs/SIMULATOR.md)."""

    dataset: str = "three_clients"
    devices: int | None = None  # None: the dataset's natural client count (fashion_mnist: 10)
    partition: str | None = None  # natural | dirichlet | iid (None: the dataset's default)
    alpha: float = 0.5
    max_samples_per_client: int | None = None
    max_test_samples: int | None = None  # fashion_mnist only: seeded subset of the 10k test images
    rounds: int = 5
    cohort: int | None = None  # invited per round (None: all online devices, capped by the quorum rule)
    quorum: int | None = None  # None: max(1, ceil(0.8 × cohort))
    round_timeout: float = 30.0
    strategies: tuple[str, ...] = ("fedatt",)
    strategy_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    epochs: int = 1
    batch_size: int = 32
    lr: float | None = None
    clip_norm: float = 1.0
    noise_multiplier: float = 0.1
    epsilon_budget: float = 1e12  # effectively unlimited unless the user sets one
    delta: float = 1e-5
    encoding: str = "f32"
    broker_url: str | None = None  # None: embedded broker
    seed: int = 0
    workers: int = 2
    dropout: float = 0.0
    speed_spread: float = 0.0
    late_prob: float = 0.0
    late_delay: float = 1.0
    eligible_fraction: float = 1.0
    window_period: int = 10
    join_at: tuple[tuple[int, int], ...] = ()  # (after round, count)
    leave_at: tuple[tuple[int, int], ...] = ()
    broker_restart_at: tuple[int, ...] = ()
    byzantine: str | None = None  # "FRACTION:KIND[:SCALE]" (simulator/fleet.py Byzantine)
    out: Path = Path("runs/sim")
    progress: bool = True
    title: str | None = None
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.strategies = tuple(self.strategies)
        if not self.strategies:
            raise SimulationError("no strategy given")
        if len(set(self.strategies)) != len(self.strategies):
            raise SimulationError("a strategy is listed twice")
        if self.rounds < 1:
            raise SimulationError("rounds must be >= 1")
        if not self.noise_multiplier > 0:
            raise SimulationError("noise_multiplier must be > 0: with z = 0, ε is infinite and every device's "
                                  "privacy ledger refuses to release (that is the SDK's rule, not a simulator one)")
        if self.workers < 1:
            raise SimulationError("workers must be >= 1")
        if self.encoding not in ("f32", "int8"):
            raise SimulationError("encoding must be f32 or int8")
        parse_byzantine(self.byzantine)  # fail before anything starts

    def hetero(self) -> Heterogeneity:
        return Heterogeneity(dropout=self.dropout, speed_spread=self.speed_spread, late_prob=self.late_prob,
                             late_delay=self.late_delay, eligible_fraction=self.eligible_fraction,
                             window_period=self.window_period)

    def dataset_spec(self) -> DatasetSpec:
        options: dict[str, Any] = {}
        if self.max_test_samples is not None:
            if self.dataset != "fashion_mnist":
                raise SimulationError("max_test_samples applies to fashion_mnist only")
            options["max_test_samples"] = self.max_test_samples
        natural = self.partition in (None, "natural") and self.dataset != "fashion_mnist"
        return DatasetSpec(name=self.dataset, seed=self.seed,
                           num_clients=None if natural else self.devices,
                           partition=self.partition, alpha=self.alpha,
                           max_clients=self.devices if natural else None,
                           max_samples_per_client=self.max_samples_per_client,
                           options=tuple(sorted(options.items())))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


# ------------------------------------------------------------------------------------------ model
def export_model(ds: Any, out_dir: Path, seed: int) -> Path:
    """Export the dataset's zoo model once, seeded, into `out_dir` (reused if already there)."""
    from edge_sdk.bundle import Bundle, BundleError

    out_dir = Path(out_dir)
    if (out_dir / "manifest.json").exists():
        try:
            Bundle.load(out_dir)
            return out_dir
        except BundleError:
            pass  # damaged: export again
    import torch  # heavy: only the main process, only here

    import exporter
    from exporter import zoo

    name, kwargs = ds.model
    torch.manual_seed(seed)
    model = zoo.ZOO[name].factory(**kwargs)
    example = ((1, *ds.input_shape), ds.x_dtype)
    exporter.export_bundle(model, example, out_dir, loss=zoo.ZOO[name].loss, overwrite=True, seed=seed)
    return out_dir


# ----------------------------------------------------------------------------------- evaluation
def _auc(scores: np.ndarray, y: np.ndarray) -> float | None:
    """ROC AUC by the rank statistic (Mann-Whitney U with mid-ranks for ties); None if one class is absent."""
    pos, neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # mid-ranks for ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def evaluate_metrics(trainer: Any, bundle: Any, named: dict[str, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                     task: str) -> dict[str, float | None]:
    """Accuracy and loss of a global model on the test set; precision/recall/AUC for binary tasks."""
    trainer.set_parameters(bundle.join(named))
    x, y = test
    r = trainer.evaluate(x, y, batch_size=512)
    out: dict[str, float | None] = {"accuracy": float(r.accuracy), "loss": float(r.loss),
                                    "precision": None, "recall": None, "auc": None}
    if task == "binary":
        logits = np.asarray(r.scores, dtype=np.float64)
        score = logits[:, 1] - logits[:, 0] if logits.ndim == 2 and logits.shape[1] == 2 else logits.reshape(-1)
        pred = (score > 0).astype(np.int64)
        tp = int(np.sum((pred == 1) & (y == 1)))
        fp = int(np.sum((pred == 1) & (y == 0)))
        fn = int(np.sum((pred == 0) & (y == 1)))
        out["precision"] = tp / (tp + fp) if tp + fp else 0.0
        out["recall"] = tp / (tp + fn) if tp + fn else 0.0
        out["auc"] = _auc(score, y)
    return out


# --------------------------------------------------------------------------------------- membership
def plan_membership(device_ids: Sequence[str], cfg: SimConfig) -> tuple[list[str], dict[int, list[str]],
                                                                         dict[int, list[str]]]:
    """(initially online, joiners by round, leavers by round). Joiners are the last devices in the list;
    leavers are drawn (seeded) among the devices online at that point. Same for every strategy."""
    ids = list(device_ids)
    n_join = sum(c for _, c in cfg.join_at)
    if n_join >= len(ids):
        raise SimulationError(f"--join-at adds {n_join} devices but the fleet has only {len(ids)}")
    initial = ids[:len(ids) - n_join]
    pending = ids[len(ids) - n_join:]
    joins: dict[int, list[str]] = {}
    for rnd, count in sorted(cfg.join_at):
        joins.setdefault(rnd, []).extend(pending[:count])
        pending = pending[count:]
    leaves: dict[int, list[str]] = {}
    online = list(initial)
    for rnd in sorted({r for r, _ in cfg.join_at} | {r for r, _ in cfg.leave_at}):
        online += joins.get(rnd, [])
        count = sum(c for r, c in cfg.leave_at if r == rnd)
        if count:
            if count > len(online):
                raise SimulationError(f"--leave-at {rnd}:{count}: only {len(online)} devices online then")
            chosen = sorted(online, key=lambda d: unit_draw(cfg.seed, "leave", d, rnd))[:count]
            leaves[rnd] = chosen
            online = [d for d in online if d not in chosen]
    return initial, joins, leaves


def _quorum_and_cohort(cfg: SimConfig, n_online: int, min_online_possible: int) -> tuple[int, float]:
    cohort = cfg.cohort or n_online
    cohort = max(1, min(cohort, n_online))
    quorum = cfg.quorum or max(1, math.ceil(0.8 * cohort))
    if quorum > cohort:
        raise SimulationError(f"quorum {quorum} > cohort {cohort}")
    if quorum > min_online_possible:
        raise SimulationError(f"quorum {quorum} exceeds the {min_online_possible} devices online after leaves")
    return quorum, cohort / quorum


# ------------------------------------------------------------------------------------ one strategy
def parse_byzantine(text: str | None) -> Any:
    """"FRACTION:KIND[:SCALE]" -> fleet.Byzantine (None: no byzantine devices)."""
    from simulator.fleet import Byzantine

    if not text:
        return None
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError("expected FRACTION:KIND[:SCALE]")
        return Byzantine(fraction=float(parts[0]), kind=parts[1], scale=float(parts[2]) if len(parts) == 3 else 1.0)
    except ValueError as exc:
        raise SimulationError(f"--byzantine {text!r}: {exc}") from None


def run_strategy(cfg: SimConfig, strategy: str, ds: Any, spec: DatasetSpec, bundle_dir: Path, broker_url: str,
                 pool: cf.Executor, restart_broker: Callable[[], None] | None = None,
                 fleet_name: str | None = None) -> list[RoundRecord]:
    """Run `cfg.rounds` rounds of `strategy` with fresh device and aggregator state; write its metrics."""
    from broker.rounds import EngineConfig
    from broker.service import AggregatorService, MqttSettings
    from edge_sdk import wire
    from edge_sdk.bundle import Bundle
    from edge_sdk.trainer import LocalTrainer

    bundle = Bundle.load(bundle_dir)
    sdir = cfg.out / strategy
    if sdir.exists():
        import shutil

        shutil.rmtree(sdir)  # fresh ledgers and aggregator state for every strategy run
    sdir.mkdir(parents=True)
    initial, joins, leaves = plan_membership(ds.client_ids, cfg)
    min_possible = len(initial) - sum(len(v) for v in leaves.values())
    quorum, over = _quorum_and_cohort(cfg, len(initial), max(1, min_possible))
    fleet_name = fleet_name or f"sim-{strategy}"
    # min_online: every initial device, unless some leave later (then the fewest that stay): with all of
    # them online before round 1 is drawn, the first cohort does not depend on connection timing.
    min_online = max(quorum, min(len(initial), min_possible))
    engine = EngineConfig(
        fleet=fleet_name, model_id=bundle.model_id, strategy=strategy,
        strategy_params=cfg.strategy_params.get(strategy, {}), quorum=quorum, over_selection=over,
        min_online=min_online, round_timeout_s=cfg.round_timeout,
        train=wire.TrainSettings(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr),
        privacy=wire.PrivacySettings(clip_norm=cfg.clip_norm, noise_multiplier=cfg.noise_multiplier,
                                     delta=cfg.delta),
        encodings=("f32", "int8") if cfg.encoding == "int8" else ("f32",))
    closed: "queue.Queue[tuple[Any, dict[str, np.ndarray]]]" = queue.Queue()
    service = AggregatorService(engine, bundle, sdir / "aggregator", MqttSettings(url=broker_url),
                                max_rounds=cfg.rounds, on_round_closed=lambda s, m: closed.put((s, m)),
                                rng=random.Random(cfg.seed))  # seeded cohorts: simulation only
    # after the service (which may refuse its state): the fleet holds the lock of its state root until close()
    fleet = Fleet.build(fleet=fleet_name, broker_url=broker_url, bundle_dir=bundle_dir, state_root=sdir / "devices",
                        spec=spec, sizes={c: len(y) for c, (_, y) in ds.clients.items()}, seed=cfg.seed,
                        hetero=cfg.hetero(), pool=pool, epsilon_budget=cfg.epsilon_budget, delta=cfg.delta,
                        encoding=cfg.encoding, byzantine=parse_byzantine(cfg.byzantine))
    evaluator = cf.ThreadPoolExecutor(1, thread_name_prefix="sim-eval")
    trainer_box: list[Any] = []

    def evaluate(named: dict[str, np.ndarray]) -> dict[str, float | None]:
        if not trainer_box:  # created in the evaluator thread, used only there
            trainer_box.append(LocalTrainer(bundle, threads=1))
        return evaluate_metrics(trainer_box[0], bundle, named, ds.test, ds.task)

    records: list[RoundRecord] = []
    extras: list[dict[str, Any]] = []
    pending: list[tuple[Any, cf.Future, dict[str, Any]]] = []
    bar = _progress(cfg, strategy)
    t0 = time.monotonic()
    initial_eval = evaluator.submit(evaluate, bundle.split(bundle.initial_parameters()))
    try:
        _start_fleet(cfg, fleet, initial)
        service.start()
        last_progress = time.monotonic()
        stall = max(120.0, 6 * cfg.round_timeout)
        seen = 0
        down_mark = 0
        while seen < cfg.rounds or pending:
            fleet.driver.run_once(0.05)
            while True:
                try:
                    summary, model = closed.get_nowait()
                except queue.Empty:
                    break
                seen = summary.round
                last_progress = time.monotonic()
                eps = fleet.epsilons()
                down = fleet.bytes_down()
                extra = {"round": summary.round, "late": summary.late, "duplicates": summary.duplicates,
                         "cohort": summary.extra.get("cohort"), "num_examples": summary.extra.get("num_examples"),
                         "online": len(fleet.online), "bytes_down": down - down_mark, "epsilon": eps,
                         "skips_so_far": fleet.skips(), "wall_s": time.monotonic() - t0,
                         "layer_entropy": summary.extra.get("layer_entropy", {})}
                down_mark = down
                pending.append((summary, evaluator.submit(evaluate, model), extra))
                # fleet events keyed by the round that just closed
                if summary.round in leaves:
                    fleet.stop(leaves[summary.round])
                if summary.round in joins:
                    fleet.start(joins[summary.round])
                if summary.round in cfg.broker_restart_at and summary.round < cfg.rounds:
                    if restart_broker is None:
                        raise SimulationError("broker restart needs the embedded broker (or a restart callback)")
                    log.warning("restarting the broker after round %d", summary.round)
                    restart_broker()
            while pending and pending[0][1].done():
                summary, fut, extra = pending.pop(0)
                rec = _record(summary, fut.result(), extra)
                records.append(rec)
                extras.append(extra)
                if bar is not None:
                    bar.set_postfix_str(f"acc {rec.accuracy:.3f} loss {rec.loss:.3f} part {rec.participants} "
                                        f"ε max {rec.eps_max:.3g}", refresh=False)
                    bar.update(1)
            try:
                service.wait(0)  # re-raises a fatal aggregator error (e.g. a failed checkpoint write)
            except Exception as exc:
                raise SimulationError(f"aggregator failed: {exc}") from exc
            if seen < cfg.rounds and time.monotonic() - last_progress > stall:
                raise SimulationError(f"{strategy}: no round closed for {stall:.0f}s after round {seen} "
                                      f"(online {len(fleet.online)}, quorum {quorum}); see the log")
        wall = time.monotonic() - t0
    finally:
        if bar is not None:
            bar.close()
        try:
            service.stop()
        finally:
            fleet.close()
            _forget_sessions(broker_url, fleet.joined + [f"fedatt-aggregator-{fleet_name}"])
            evaluator.submit(lambda: trainer_box and trainer_box[0].close()).result(30)
            evaluator.shutdown(wait=True)
    first = initial_eval.result()
    eps = fleet.epsilons()
    meta = {"dataset": ds.name, "task": ds.task, "majority_baseline": ds.majority_baseline,
            "initial_accuracy": first["accuracy"], "initial_loss": first["loss"],
            "fleet": fleet_name, "model_id": bundle.model_id, "devices": len(ds.client_ids),
            "quorum": quorum, "cohort": math.ceil(quorum * over - 1e-9), "min_online": min_online,
            "noise_multiplier": cfg.noise_multiplier, "clip_norm": cfg.clip_norm, "delta": cfg.delta,
            "adjacency": "add_remove", "releases": fleet.releases(), "skips": fleet.skips(),
            "jobs": fleet.runner.jobs, "wall_s": wall, "round_extras": extras, "seed": cfg.seed,
            "joins": {str(k): v for k, v in joins.items()}, "leaves": {str(k): v for k, v in leaves.items()},
            "broker_restarts": list(cfg.broker_restart_at)}
    write_strategy_metrics(cfg.out, strategy, meta, records, eps)
    return records


def _record(summary: Any, ev: dict[str, float | None], extra: dict[str, Any]) -> RoundRecord:
    eps = list(extra["epsilon"].values())
    ent = [float(v) for v in (extra.get("layer_entropy") or {}).values()]
    return RoundRecord(
        round=summary.round, accuracy=float(ev["accuracy"]), loss=float(ev["loss"]),
        participants=len(summary.participants), round_time_s=float(summary.duration_s),
        bytes_up=int(summary.bytes_in), bytes_down=int(extra["bytes_down"]),
        precision=ev["precision"], recall=ev["recall"], auc=ev["auc"], rejections=dict(summary.rejections),
        eps_max=max(eps, default=0.0), eps_median=statistics.median(eps) if eps else 0.0,
        attempts=int(summary.attempt), weights={d: dict(w) for d, w in summary.weights.items()},
        attention_entropy=(sum(ent) / len(ent)) if ent else None)


def _forget_sessions(url: str, client_ids: Sequence[str], batch: int = 500, timeout: float = 10.0) -> None:
    """Drop the broker's persistent sessions of this run's clients (clean_session=True connect + disconnect).

    Devices keep their MQTT client id (= device id) across the strategies of a comparison; without this the
    next strategy's devices would inherit subscriptions to the previous fleet's topics. Clients are driven in
    batches by one selector (simulator/raw_fleet.py), not by paho's loop_start(): no thread per client, and no
    select() on descriptors above 1,024. Best effort: a session left behind only costs warnings later.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_sdk.connection import parse_broker_url
    from simulator.raw_fleet import ClientPump

    addr = parse_broker_url(url)
    ids = list(client_ids)
    for start in range(0, len(ids), batch):
        pump = ClientPump()
        acked: set[str] = set()
        try:
            for cid in ids[start:start + batch]:
                c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, clean_session=True,
                                protocol=mqtt.MQTTv311)
                c.on_connect = lambda client, userdata, flags, rc, props, cid=cid: acked.add(cid)
                try:
                    c.connect(addr.host, addr.port, keepalive=10)
                except OSError as exc:
                    log.debug("could not clear the session of %s: %s", cid, exc)
                    continue
                pump.add(c)
            end = time.monotonic() + timeout
            while len(acked) < len(pump.clients) and time.monotonic() < end:
                pump.pump(0.05)  # the broker answers CONNACK once the clean session replaced the old one
            if len(acked) < len(pump.clients):
                log.debug("%d sessions not confirmed cleared", len(pump.clients) - len(acked))
        finally:
            pump.close()  # DISCONNECT (written at once: these clients have no network thread) and close


def _start_fleet(cfg: SimConfig, fleet: Fleet, ids: Sequence[str]) -> None:
    """Create and connect the initial devices (a progress bar for large fleets: 10,000 take a minute or so)."""
    t0 = time.monotonic()
    bar = None
    if cfg.progress and len(ids) >= 500:
        from tqdm import tqdm

        bar = tqdm(total=len(ids), desc=f"{'devices':>18}", unit="dev", file=sys.stderr, dynamic_ncols=True)
    try:
        fleet.start(list(ids), progress=bar.update if bar is not None else None)
        # Generous and proportional: creating + connecting took ~2.5 ms per device on a loaded 2-core machine.
        _wait_connected(fleet, ids, timeout=30.0 + 0.02 * len(ids))
    finally:
        if bar is not None:
            bar.close()
    log.info("%d devices created and connected in %.1f s", len(ids), time.monotonic() - t0)


def _wait_connected(fleet: Fleet, ids: Sequence[str], timeout: float) -> None:
    """Drive the fleet until every device is connected (so the aggregator sees all of them before round 1)."""
    end = time.monotonic() + timeout
    waiting = list(ids)
    while time.monotonic() < end:
        fleet.driver.run_once(0.05)
        waiting = [d for d in waiting if not (fleet.devices[d].client is not None
                                              and fleet.devices[d].client.wait_connected(0))]
        if not waiting:
            # a few more short spins so the retained 'online' statuses are written out
            for _ in range(5):
                fleet.driver.run_once(0.01)
            return
    raise SimulationError(f"{len(waiting)} of {len(ids)} devices could not connect to {fleet.broker_url} within "
                          f"{timeout:.0f} s: {waiting[:5]}")


def _progress(cfg: SimConfig, strategy: str) -> Any:
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.rounds, desc=f"{strategy:>18}", unit="round", file=sys.stderr, dynamic_ncols=True)


# ------------------------------------------------------------------------------------- whole run
def training_pool(workers: int) -> cf.ProcessPoolExecutor:
    """The worker processes that run the devices' training jobs (shared by every strategy of a run).

    spawn, not fork: the main process runs broker, paho and evaluator threads that fork would copy mid-lock.
    block_torch: `import onnxruntime` would otherwise load torch (~240 MiB) in every worker (edge_sdk/_ort.py).
    """
    from edge_sdk._ort import block_torch

    return cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=block_torch)


def simulate(cfg: SimConfig, *, broker_restart: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run every strategy of `cfg` on the same fleet, partitions, seeds and initial model; write the report.

    Returns {"run_dir", "report", "rows" (summary table rows), "majority_baseline", "wall_s"}.
    `broker_restart`: how to restart an external broker (tests); the embedded one restarts itself.
    """
    from simulator.embedded_broker import EmbeddedBroker

    t0 = time.monotonic()
    cfg.out.mkdir(parents=True, exist_ok=True)
    _clear_previous(cfg.out)
    spec = cfg.dataset_spec()
    ds = spec.load()
    _ensure_fd_limit(len(ds.client_ids), embedded=cfg.broker_url is None)
    bundle_dir = export_model(ds, cfg.out / "bundle", cfg.seed)
    export_s = time.monotonic() - t0
    broker = None
    pool = None
    results: dict[str, list[RoundRecord]] = {}
    try:
        if cfg.broker_url is None:
            broker = EmbeddedBroker().start()
            url, restart = broker.url, broker.restart
        else:
            url, restart = cfg.broker_url, broker_restart
        pool = training_pool(cfg.workers)
        for strategy in cfg.strategies:
            results[strategy] = run_strategy(cfg, strategy, ds, spec, bundle_dir, url, pool, restart)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if broker is not None:
            broker.stop()
    wall = time.monotonic() - t0
    doc = {"config": cfg.to_json(), "dataset": ds.summary(), "export_s": export_s, "wall_s": wall}
    from edge_sdk.durable import atomic_write

    atomic_write(cfg.out / "config.json", json.dumps(doc, indent=1, default=str))
    rows = summary_rows(cfg.out)
    notes = _notes(cfg, ds, rows, wall, export_s)
    report = write_report(cfg.out, cfg.title or f"fedatt simulation: {ds.name}, {len(ds.client_ids)} devices",
                          notes)
    return {"run_dir": cfg.out, "report": report, "rows": rows, "majority_baseline": ds.majority_baseline,
            "wall_s": wall, "results": results}


def _ensure_fd_limit(devices: int, *, embedded: bool) -> None:
    """Raise the soft RLIMIT_NOFILE to what the fleet needs (up to the hard limit), or fail now with the remedy.

    Each device holds one socket (its state dir is covered by the fleet's lock); the embedded broker lives in
    this process too and holds the other end of every connection. Without this, a fleet past the usual soft
    limit of 1,024 fails midway with EMFILE ("Too many open files") while connecting.
    """
    import resource

    need = devices * (2 if embedded else 1) + 256  # + worker pipes, bundle/ledger files, plots, ...
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise SimulationError(
            f"{devices} devices need about {need} open files here but the hard limit (ulimit -Hn) is {hard}: "
            f"raise it (e.g. `ulimit -n {need}` as root or in limits.conf)"
            + ("" if not embedded else ", or use an external broker (--broker), which halves the need"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))  # hard >= need here
    log.info("raised the open-file limit from %d to %d for %d devices", soft, need, devices)


def _clear_previous(out: Path) -> None:
    """Remove results of an earlier run in the same directory, so the report shows this run only."""
    import shutil

    for metrics in out.glob("*/metrics.json"):
        log.warning("replacing the earlier results in %s", metrics.parent)
        shutil.rmtree(metrics.parent)
    for name in ("plots", "report.md", "config.json"):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _notes(cfg: SimConfig, ds: Any, rows: list[dict[str, Any]], wall: float, export_s: float) -> list[str]:
    notes = [
        f"dataset `{ds.name}` ({ds.task}), partition {cfg.partition or 'default'}, {len(ds.client_ids)} devices, "
        f"{ds.num_train()} training / {len(ds.test[1])} test examples; model `{ds.model[0]}`",
        f"majority-class baseline on the test set: {ds.majority_baseline:.3f} (always predict the most frequent label)",
        f"{cfg.rounds} rounds, {cfg.epochs} local epoch(s), batch {cfg.batch_size}, clip C={cfg.clip_norm:g}, "
        f"noise multiplier z={cfg.noise_multiplier:g} on every device, δ={cfg.delta:g}, seed {cfg.seed}",
        "ε is per device (add/remove adjacency), read from each device's own privacy ledger. Local DP — every "
        "update noised on the device before it leaves — needs little noise to stay useful, so ε per device is "
        "large; it is an honest figure, not a strong guarantee.",
        f"wall time {wall:.0f} s including the model export ({export_s:.0f} s), {cfg.workers} training workers",
    ]
    for r in rows:
        verdict = "above" if r["final_acc"] > r["majority"] else "NOT above"
        notes.append(f"{r['strategy']}: final accuracy {r['final_acc']:.3f} is {verdict} the majority baseline "
                     f"{r['majority']:.3f}; ε max {r['eps_max']:.4g}")
    if cfg.dropout or cfg.speed_spread or cfg.late_prob or cfg.eligible_fraction < 1 or cfg.join_at or cfg.leave_at \
            or cfg.broker_restart_at:
        notes.append(f"faults: dropout {cfg.dropout}, speed spread {cfg.speed_spread}s, late {cfg.late_prob}, "
                     f"eligible fraction {cfg.eligible_fraction}, joins {list(cfg.join_at)}, "
                     f"leaves {list(cfg.leave_at)}, broker restarts after rounds {list(cfg.broker_restart_at)}")
    notes += list(cfg.notes)
    return notes


def print_summary(result: dict[str, Any]) -> None:
    print()
    print(format_table(result["rows"]))
    print(f"\nreport: {result['report']}\nplots:  {Path(result['run_dir']) / 'plots'}")

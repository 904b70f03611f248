"""Virtual devices for the simulator: real EdgeClients with their own identity, data, state dir and ledger.

A `Fleet` owns N `VirtualDevice`s of one strategy run. Each device is the unmodified `edge_sdk.EdgeClient`
(its own MQTT connection, client id = device id, its own privacy ledger and outbox in its own state dir),
driven in external mode by `SimDriver`, one selector loop in the main thread for the whole fleet. Local
training runs on a shared process pool through `SimRunner`, so both cores train while the main thread only
moves bytes; a device that is not training holds no ORT session (the job opens and closes it in the worker).
Scale (10,000 devices in one process): one open descriptor per device (its socket; the fleet locks its state
root once instead of each state dir, `ClientConfig.lock_state_dir=False`), one verified `Bundle` shared by all
clients, devices created by a few threads (fresh ledgers are fsynced) and connected chunk by chunk, and a
driver that services only the devices that need it (see `SimDriver`).

Heterogeneity and faults (`Heterogeneity`), all decided by seeded draws per (run seed, device, round), so a
run is reproducible and the same fault hits the same device in every strategy of a comparison:
* speed:     device d has a slowness u_d ∈ [0, 1); its update is handed back to the client `speed_spread·u_d`
             seconds after training finished (a slower phone), before the client releases and publishes it.
* dropout:   with probability `dropout` per round the device's eligibility callback says "not idle": the real
             follower skips the round (reason "ineligible") and the aggregator sees no answer.
* windows:   a device is eligible only in a contiguous window covering `eligible_fraction` of every
             `window_period` rounds (a per-device phase): charging at night, on Wi-Fi at home.
* late:      with probability `late_prob` per round the device's uplink stalls right after it published: the
             driver holds its socket writes until `late_delay` s after the round's deadline, so the update
             reaches the aggregator after the round closed and is counted late (real bytes, real broker).
* join/leave: the fleet starts some devices later and stops others mid-run (`Fleet.start`/`stop`).
* byzantine: a seeded set of devices (`Byzantine`, `--byzantine FRACTION:KIND[:SCALE]`) runs the real SDK
             job (`run_byzantine_job`) with its *local training result* Δ replaced before privatisation:
             `flip` sends −Δ, `random` a Gaussian direction; the replacement is given norm SCALE·C (default
             SCALE = 1: at the clip norm, so the SDK's clip leaves it there). SCALE > 1 models a modified SDK
             that skips the clip: the update arrives with norm SCALE·C (the noise std stays z·C). The device's
             ledger, MQTT identity and wire format are untouched; the aggregator cannot tell.

Simulator-only: TrainJobs get a seed derived from (run seed, device, round), so shuffling and DP noise are
reproducible. A real device leaves `TrainJob.seed` at None and draws its noise from the OS CSPRNG; seeded
noise is for reproducing experiments only and protects nothing.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import functools
import hashlib
import heapq
import itertools
import logging
import math
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge_sdk.bundle import Bundle
from edge_sdk.client import EdgeClient, TrainJob, lock_state_dir, run_training_job, unlock_state_dir
from edge_sdk.config import ClientConfig

__all__ = ["Byzantine", "run_byzantine_job", "DatasetSpec", "PartitionRef", "Heterogeneity", "VirtualDevice", "SimRunner", "SimDriver", "Fleet",
           "unit_draw", "derive_seed"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- seeded draws
def _digest(*parts: object) -> int:
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big")


def unit_draw(seed: int, purpose: str, device_id: str, round_: int = 0) -> float:
    """A uniform number in [0, 1) fixed by (seed, purpose, device, round): independent of timing and order."""
    return _digest(seed, purpose, device_id, round_) / 2.0**64


def derive_seed(seed: int, device_id: str, round_: int) -> int:
    """The TrainJob seed of one device in one round (shuffle + noise streams derive from it)."""
    return _digest(seed, "train", device_id, round_) >> 1  # < 2**63: fits numpy's SeedSequence happily


# ------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DatasetSpec:
    """Arguments of `load_dataset`, hashable, so a worker process can rebuild exactly the same partitions."""

    name: str
    seed: int = 0
    num_clients: int | None = None
    partition: str | None = None
    alpha: float = 0.5
    max_clients: int | None = None
    max_samples_per_client: int | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def load(self) -> Any:
        """The FederatedDataset (cached per process: a worker loads it once, not every round)."""
        return _load_cached(self)


@functools.lru_cache(maxsize=2)
def _load_cached(spec: DatasetSpec) -> Any:
    from simulator.datasets import load_dataset

    return load_dataset(spec.name, seed=spec.seed, num_clients=spec.num_clients, partition=spec.partition,
                        alpha=spec.alpha, max_clients=spec.max_clients,
                        max_samples_per_client=spec.max_samples_per_client, **dict(spec.options))


@dataclass(frozen=True)
class PartitionRef:
    """A device's training data as a picklable zero-argument callable (edge_sdk.client.TrainData).

    The process-pool worker calls it and gets the partition from its own cached copy of the dataset, so a
    round ships a few hundred bytes to the worker instead of the device's whole partition.
    """

    spec: DatasetSpec
    client_id: str

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        return self.spec.load().clients[self.client_id]


# ---------------------------------------------------------------------------------- heterogeneity
@dataclass(frozen=True)
class Byzantine:
    """A seeded `fraction` of the devices (at least one if fraction > 0) send manipulated updates."""

    fraction: float = 0.0
    kind: str = "flip"  # flip | random
    scale: float = 1.0  # norm of the manipulated update in units of the clip norm C

    KINDS = ("flip", "random")

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"byzantine fraction must be in [0, 1), got {self.fraction}")
        if self.kind not in self.KINDS:
            raise ValueError(f"byzantine kind must be one of {self.KINDS}, got {self.kind!r}")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"byzantine scale must be > 0 and finite, got {self.scale}")

    def choose(self, device_ids: list[str], seed: int) -> list[str]:
        if self.fraction <= 0:
            return []
        # Halves round up (25% of 10 devices = 3), not to even as round() would (2): the count grows with fraction.
        k = max(1, math.floor(self.fraction * len(device_ids) + 0.5))
        return sorted(sorted(device_ids, key=lambda d: unit_draw(seed, "byzantine", d))[:k])


def run_byzantine_job(job: TrainJob, kind: str, scale: float) -> Any:
    """The SDK's `run_training_job` with Δ replaced before clip + noise (runs in a worker process).

    Only `edge_sdk.client.privatize` is wrapped for the duration of this call (a process-pool worker runs
    one job at a time), so training, encoding and everything after privatisation are the real SDK code.
    """
    import edge_sdk.client as ec

    real = ec.privatize
    mrng = np.random.default_rng([job.seed if job.seed is not None else 0, 7])  # 7: not shuffle/noise

    def manipulated(delta: np.ndarray, clip_norm: float, noise_multiplier: float, rng: Any = None) -> Any:
        d = np.asarray(delta, dtype=np.float64)
        v = -d if kind == "flip" else mrng.standard_normal(d.shape)
        norm = float(np.linalg.norm(v))
        target = scale * clip_norm
        v = v * (target / norm) if norm > 0 else v
        # scale > 1: the clip is skipped (clip at the larger norm), the noise std stays z·C
        return real(v, max(clip_norm, target), noise_multiplier * clip_norm / max(clip_norm, target), rng=rng)

    ec.privatize = manipulated
    try:
        return run_training_job(job)
    finally:
        ec.privatize = real


@dataclass(frozen=True)
class Heterogeneity:
    """How devices differ and fail; see the module docstring for the model."""

    dropout: float = 0.0
    speed_spread: float = 0.0  # seconds of extra delay for the slowest device
    late_prob: float = 0.0
    late_delay: float = 1.0  # seconds after the deadline at which a late device's uplink resumes
    eligible_fraction: float = 1.0
    window_period: int = 10  # rounds

    def __post_init__(self) -> None:
        for name in ("dropout", "late_prob"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        if self.speed_spread < 0 or self.late_delay < 0:
            raise ValueError("speed_spread and late_delay must be >= 0")
        if not 0.0 < self.eligible_fraction <= 1.0:
            raise ValueError(f"eligible_fraction must be in (0, 1], got {self.eligible_fraction}")
        if self.window_period < 1:
            raise ValueError("window_period must be >= 1")


class VirtualDevice:
    """One simulated device: identity, partition, state dir and the per-round fault draws."""

    def __init__(self, device_id: str, state_dir: Path, data: PartitionRef, num_examples: int, seed: int,
                 hetero: Heterogeneity) -> None:
        self.device_id = device_id
        self.state_dir = Path(state_dir)
        self.data = data
        self.num_examples = num_examples
        self.seed = seed
        self.hetero = hetero
        self.slowness = unit_draw(seed, "speed", device_id)  # fixed per device: a slow phone stays slow
        self.phase = int(unit_draw(seed, "window", device_id) * hetero.window_period)
        self.client: EdgeClient | None = None
        self.bytes_down = 0  # measured: payload bytes of every model/round message this device received
        self.online = False
        self._hold: tuple[int, float] | None = None  # (round, monotonic time) until which uplink writes wait

    # ---- fault draws -----------------------------------------------------------------------------
    @property
    def extra_delay(self) -> float:
        return self.hetero.speed_spread * self.slowness

    def drops_out(self, round_: int) -> bool:
        return self.hetero.dropout > 0 and unit_draw(self.seed, "dropout", self.device_id, round_) < self.hetero.dropout

    def in_window(self, round_: int) -> bool:
        h = self.hetero
        if h.eligible_fraction >= 1.0:
            return True
        width = max(1, round(h.eligible_fraction * h.window_period))
        return (round_ + self.phase) % h.window_period < width

    def late(self, round_: int) -> bool:
        return self.hetero.late_prob > 0 and unit_draw(self.seed, "late", self.device_id, round_) < self.hetero.late_prob

    def _current_round(self) -> int | None:
        task = self.client.follower.task if self.client is not None else None
        return None if task is None else task.round

    def is_idle(self) -> bool:
        """The app's eligibility callback (ClientConfig.is_idle): dropout and eligibility window."""
        r = self._current_round()
        return r is None or (not self.drops_out(r) and self.in_window(r))

    def is_charging(self) -> bool:
        return True

    # ---- uplink stall (late arrival) ---------------------------------------------------------------
    def uplink_held(self, now_mono: float) -> bool:
        """True while this device's socket writes must wait (its update of a 'late' round is in flight)."""
        c = self.client
        if c is None or c.follower.task is None:
            return False
        f = c.follower
        task = f.task
        if self._hold is not None:
            if self._hold[0] == task.round and now_mono < self._hold[1]:
                return True
            if self._hold[0] == task.round:
                return False  # hold over for this round
            self._hold = None
        if not self.late(task.round):
            return False
        if any(e.round == task.round and e.update_id in f.in_flight for e in f.entries.values()):
            # Hold until late_delay after the deadline (wall-clock deadline -> monotonic).
            until = time.monotonic() + max(0.0, task.deadline - time.time()) + self.hetero.late_delay
            self._hold = (task.round, until)
            return True
        return False


# ------------------------------------------------------------------------------------ training runner
class _Timers:
    """Thread-safe min-heap of (due monotonic time, callback) serviced by the driver loop."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._lock = threading.Lock()
        self._count = itertools.count()
        self._wake = wake

    def at(self, due: float, fn: Callable[[], None]) -> None:
        with self._lock:
            heapq.heappush(self._heap, (due, next(self._count), fn))
        self._wake()

    def next_due(self) -> float | None:
        with self._lock:
            return self._heap[0][0] if self._heap else None

    def run_due(self) -> None:
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._heap or self._heap[0][0] > now:
                    return
                _, _, fn = heapq.heappop(self._heap)
            fn()


class SimRunner(cf.Executor):
    """The EdgeClients' training runner: the real `run_training_job` on a shared process pool.

    Two simulator-only additions, neither touching what the job computes: the job gets a seed derived from
    (run seed, device, round), and the future the client waits on completes `delay(device)` seconds after
    the worker finished (device speed). The delay is a timer in the main process, so it costs no worker.
    """

    def __init__(self, pool: cf.Executor, seed: int, delay: Callable[[str], float], timers: _Timers,
                 byzantine: dict[str, Byzantine] | None = None) -> None:
        self.byzantine = byzantine or {}
        self.pool = pool
        self.seed = seed
        self.delay = delay
        self.timers = timers
        self.jobs = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        if fn is not run_training_job or len(args) != 1 or kwargs or not isinstance(args[0], TrainJob):
            raise TypeError("SimRunner runs edge_sdk.client.run_training_job(TrainJob) only")
        job: TrainJob = args[0]
        job = dataclasses.replace(job, seed=derive_seed(self.seed, job.spec.device_id, job.spec.round))
        outer: cf.Future = cf.Future()
        outer.set_running_or_notify_cancel()
        self.jobs += 1
        byz = self.byzantine.get(job.spec.device_id)
        inner = (self.pool.submit(run_byzantine_job, job, byz.kind, byz.scale) if byz is not None
                 else self.pool.submit(run_training_job, job))
        extra = self.delay(job.spec.device_id)

        def finished(f: cf.Future) -> None:
            def hand_over() -> None:
                exc = f.exception()
                if exc is not None:
                    outer.set_exception(exc)
                else:
                    outer.set_result(f.result())
            self.timers.at(time.monotonic() + extra, hand_over)

        inner.add_done_callback(finished)
        return outer

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass  # the pool belongs to the caller (shared by every strategy of a comparison)


# ------------------------------------------------------------------------------------------ driver
class SimDriver:
    """Selector loop for externally driven EdgeClients (like edge_sdk.client.FleetDriver) plus what the
    simulator needs: removing devices mid-run, timers, holding a late device's socket writes, and thousands of
    devices per process.

    Every client's paho socket writes go through this loop (`on_socket_register_write` is set, which makes
    paho queue packets instead of writing inside publish()), so a stalled uplink is just a socket this loop
    does not write to for a while.

    Scale: a pass services only the devices that need it: those with socket activity, those woken from another
    thread (training finished: each device's wake-up names it), and a slice of a round-robin sweep that visits
    every device once per `sweep_period()` (client ticks, keepalive, reconnect backoff, the end of an uplink
    hold). Servicing all 10,000 devices costs 0.1-0.3 s, too much to repeat on every pass; and with a fixed short
    period every slow pass made the next sweep slice the whole fleet again. Registrations are refreshed for the
    devices serviced in the previous pass, since only servicing a device changes its socket or pending writes.
    """

    SWEEP_PERIOD = 0.25  # s, small fleets; EdgeClient ticks every 0.5 s (Fleet sets tick_interval)
    SWEEP_DEVICES_PER_S = 4000  # larger fleets: a longer period, so sweeping takes ~15% of the loop at most
    SWEEP_PERIOD_MAX = 5.0  # s; well inside the 30 s MQTT keepalive

    def sweep_period(self) -> float:
        return min(self.SWEEP_PERIOD_MAX, max(self.SWEEP_PERIOD, len(self._order) / self.SWEEP_DEVICES_PER_S))

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._devices: dict[str, VirtualDevice] = {}
        self._reg: dict[str, tuple[Any, int]] = {}
        self._order: list[str] = []  # sweep order
        self._cursor = 0
        self._last_sweep = time.monotonic()
        self._dirty: set[str] = set()  # serviced in the last pass: registrations to refresh
        self._woken: collections.deque[str] = collections.deque()  # appended from any thread (atomic)
        self._loop_thread: int | None = None  # the thread running run_once (posts from it need no wake-up)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self.timers = _Timers(self.wake)

    def wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # already awake / closing

    def _wake_device(self, device_id: str) -> None:
        self._woken.append(device_id)
        if threading.get_ident() != self._loop_thread:  # the loop itself checks _woken before it waits
            self.wake()

    def add(self, dev: VirtualDevice) -> None:
        c = dev.client
        assert c is not None
        c.mqtt.on_socket_register_write = lambda *a: None  # writes happen in this loop only
        c.set_wakeup(functools.partial(self._wake_device, dev.device_id))
        c.connect_external()
        self._devices[dev.device_id] = dev
        self._order.append(dev.device_id)
        self._dirty.add(dev.device_id)

    def remove(self, dev: VirtualDevice) -> None:
        """Stop the device (retained 'offline' status, DISCONNECT) and flush those bytes before dropping it."""
        self._unregister(dev.device_id)
        if self._devices.pop(dev.device_id, None) is not None:
            self._order.remove(dev.device_id)
        self._dirty.discard(dev.device_id)
        c = dev.client
        if c is None:
            return
        c.stop()
        end = time.monotonic() + 2.0
        while c.mqtt.socket() is not None and c.mqtt.want_write() and time.monotonic() < end:
            c.mqtt.loop_write()

    def _unregister(self, device_id: str) -> None:
        old = self._reg.pop(device_id, None)
        if old is not None:
            try:
                self._sel.unregister(old[0])
            except (KeyError, ValueError, OSError):
                pass

    def _sync(self, device_ids: Any, now: float) -> None:
        """Refresh the selector registrations of these devices (socket replaced or closed, writes wanted)."""
        live: list[tuple[str, VirtualDevice, Any]] = []
        for did in device_ids:  # 1. drop stale registrations first: a closed socket's descriptor number may
            dev = self._devices.get(did)  # already belong to another device's new socket in this same batch
            if dev is None:
                continue
            sock = dev.client.socket() if dev.client is not None else None
            old = self._reg.get(did)
            if old is not None and old[0] is not sock:
                self._unregister(did)
            if sock is not None:
                live.append((did, dev, sock))
        for did, dev, sock in live:  # 2. register / modify
            write = dev.client.want_write() and not dev.uplink_held(now)  # type: ignore[union-attr]
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
            old = self._reg.get(did)
            if old is None:
                try:
                    self._sel.register(sock, want, did)
                except KeyError:  # the number is still registered for a socket closed outside this batch
                    stale = self._sel.get_key(sock)
                    self._reg.pop(stale.data, None)
                    self._sel.unregister(stale.fileobj)
                    self._sel.register(sock, want, did)
            elif old[1] != want:
                self._sel.modify(sock, want, did)
            self._reg[did] = (sock, want)

    def _sweep_slice(self, now: float) -> list[str]:
        """The next devices of the round-robin sweep, as many as keep the whole fleet within sweep_period()."""
        n = len(self._order)
        k = min(n, math.ceil(n * (now - self._last_sweep) / self.sweep_period()))
        if k <= 0:
            return []
        self._last_sweep = now
        start = self._cursor % n
        out = self._order[start:start + k]
        if len(out) < k:
            out += self._order[:k - len(out)]
        self._cursor = (start + k) % n
        return out

    def run_once(self, timeout: float = 0.1) -> None:
        self._loop_thread = threading.get_ident()
        now = time.monotonic()
        self.timers.run_due()
        self._sync(self._dirty, now)
        due = self.timers.next_due()
        if due is not None:
            timeout = min(timeout, due - now)
        if self._order:
            timeout = min(timeout, self.SWEEP_PERIOD / 2)  # keep sweep slices small and frequent
        # TLS: bytes already decrypted into the SSL object are invisible to the selector
        ready = [did for did in self._dirty if (d := self._devices.get(did)) is not None and d.client is not None
                 and (s := d.client.socket()) is not None and getattr(s, "pending", lambda: 0)()]
        serviced: set[str] = set(ready)
        for key, mask in self._sel.select(0 if ready or self._woken else max(0.0, timeout)):
            if key.data is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except OSError:
                    pass
                continue
            dev = self._devices.get(key.data)
            if dev is None or dev.client is None:
                continue
            serviced.add(key.data)
            if mask & selectors.EVENT_READ:
                dev.client.loop_read()
            if mask & selectors.EVENT_WRITE and dev.client.socket() is not None:
                dev.client.loop_write()
        for did in ready:
            self._devices[did].client.loop_read()  # type: ignore[union-attr]
        while self._woken:
            serviced.add(self._woken.popleft())
        now = time.monotonic()
        serviced.update(self._sweep_slice(now))
        for did in serviced:
            dev = self._devices.get(did)
            if dev is None or dev.client is None:
                continue
            c = dev.client
            c.loop_misc()  # events queued by callbacks or other threads, ticks, keepalive, reconnects
            # Write what this pass queued (PUBACKs, statuses, updates) now rather than one pass later: after a
            # broadcast that is every device, and a whole extra pass. What the socket does not take waits for
            # EVENT_WRITE, registered by the next _sync.
            if c.socket() is not None and c.want_write() and not dev.uplink_held(now):
                c.loop_write()
        self._dirty = serviced
        self.timers.run_due()

    def close(self) -> None:
        for dev in list(self._devices.values()):
            try:
                self.remove(dev)
            except Exception as exc:  # closing must finish for every device
                log.debug("while stopping %s: %s", dev.device_id, exc)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()


# ------------------------------------------------------------------------------------------- fleet
@dataclass
class Fleet:
    """The devices of one strategy run, their driver and runner. `start(ids)` connects; `stop(ids)` leaves."""

    fleet: str
    broker_url: str
    bundle_dir: Path
    devices: dict[str, VirtualDevice]
    driver: SimDriver
    runner: SimRunner
    epsilon_budget: float = 1e9
    delta: float = 1e-5
    encoding: str = "f32"
    joined: list[str] = field(default_factory=list)  # every device that was ever started, in order
    bundle: Bundle | None = None  # loaded (and verified) once, shared by every device's EdgeClient
    root_lock: int | None = None  # flock on <state root>/.lock: this fleet owns every device state dir under it

    # Fresh devices are created by a few threads: opening a new privacy ledger writes it durably (two fsyncs,
    # ~3-8 ms here), which would make 10,000 devices take over a minute one after another. fsync releases
    # the GIL, so the writes overlap. Sockets are connected in the main thread, in chunks, so the broker
    # sees CONNECTs while the next chunk is being created instead of 10,000 idle TCP connections at once.
    CREATE_THREADS = 8
    CHUNK = 250

    @classmethod
    def build(cls, *, fleet: str, broker_url: str, bundle_dir: Path, state_root: Path, spec: DatasetSpec,
              sizes: dict[str, int], seed: int, hetero: Heterogeneity, pool: cf.Executor,
              epsilon_budget: float, delta: float, encoding: str,
              byzantine: Byzantine | None = None) -> "Fleet":
        bundle = Bundle.load(bundle_dir)
        Path(state_root).mkdir(parents=True, exist_ok=True)
        # One lock for the whole fleet instead of one per device (ClientConfig.lock_state_dir=False below): a
        # descriptor per device would double what 10,000 devices need (their sockets) and hit RLIMIT_NOFILE.
        root_lock = lock_state_dir(Path(state_root), owner="simulation")
        driver = SimDriver()
        devices = {cid: VirtualDevice(cid, Path(state_root) / cid, PartitionRef(spec, cid), n, seed, hetero)
                   for cid, n in sizes.items()}
        bad = byzantine.choose(list(sizes), seed) if byzantine is not None else []
        runner = SimRunner(pool, seed, lambda d: devices[d].extra_delay, driver.timers,
                           byzantine={d: byzantine for d in bad} if byzantine is not None else None)
        return cls(fleet=fleet, broker_url=broker_url, bundle_dir=Path(bundle_dir), devices=devices, driver=driver,
                   runner=runner, epsilon_budget=epsilon_budget, delta=delta, encoding=encoding, bundle=bundle,
                   root_lock=root_lock)

    def _new_client(self, dev: VirtualDevice) -> EdgeClient:
        cfg = ClientConfig(device_id=dev.device_id, fleet=self.fleet, broker=self.broker_url, state_dir=dev.state_dir,
                           epsilon_budget=self.epsilon_budget, delta=self.delta, encoding=self.encoding,
                           is_idle=dev.is_idle, is_charging=dev.is_charging, threads=1,
                           tick_interval=0.5, reconnect_min=0.5, reconnect_max=5.0, lock_state_dir=False)
        return EdgeClient(cfg, self.bundle or self.bundle_dir, dev.data, runner=self.runner)

    def start(self, device_ids: list[str], progress: Callable[[int], None] | None = None) -> None:
        """Create and connect these devices (the driver loop completes the connections); `progress(n)` after
        every chunk of n devices."""
        todo = [self.devices[d] for d in dict.fromkeys(device_ids) if not self.devices[d].online]
        joined = set(self.joined)
        with cf.ThreadPoolExecutor(self.CREATE_THREADS, thread_name_prefix="sim-create") as creators:
            for i in range(0, len(todo), self.CHUNK):
                chunk = todo[i:i + self.CHUNK]
                for dev, client in zip(chunk, _all_or_none([creators.submit(self._new_client, d) for d in chunk])):
                    dev.client = client
                    _count_downlink(dev)
                    self.driver.add(dev)
                    dev.online = True
                    if dev.device_id not in joined:
                        joined.add(dev.device_id)
                        self.joined.append(dev.device_id)
                self.driver.run_once(0)  # send this chunk's CONNECTs
                if progress is not None:
                    progress(len(chunk))

    def stop(self, device_ids: list[str]) -> None:
        for did in device_ids:
            dev = self.devices[did]
            if dev.online:
                self.driver.remove(dev)
                dev.online = False

    @property
    def online(self) -> list[str]:
        return [d for d, dev in self.devices.items() if dev.online]

    def epsilons(self) -> dict[str, float]:
        """ε spent per device so far, read from each device's own ledger (devices never started: omitted)."""
        return {d: float(self.devices[d].client.ledger.epsilon) for d in self.joined
                if self.devices[d].client is not None}

    def releases(self) -> dict[str, list[float]]:
        """Noise multipliers of every release per device, from the ledgers (to re-derive ε independently)."""
        return {d: [float(r.noise_multiplier) for r in self.devices[d].client.ledger.releases] for d in self.joined
                if self.devices[d].client is not None}

    def bytes_down(self) -> int:
        return sum(dev.bytes_down for dev in self.devices.values())

    def skips(self) -> dict[str, int]:
        """How often devices skipped a round, by reason (from the clients' own RoundResults)."""
        out: dict[str, int] = {}
        for d in self.joined:
            c = self.devices[d].client
            for r in (c.results if c is not None else []):
                if r.status == "skipped":
                    out[r.reason] = out.get(r.reason, 0) + 1
        return out

    def close(self) -> None:
        try:
            self.driver.close()
        finally:
            for dev in self.devices.values():
                dev.online = False
            unlock_state_dir(self.root_lock)
            self.root_lock = None


def _all_or_none(futures: list[cf.Future]) -> list[EdgeClient]:
    """The clients of one chunk; if one could not be created, stop the others and raise that error."""
    cf.wait(futures)
    error = next((f.exception() for f in futures if f.exception() is not None), None)
    if error is None:
        return [f.result() for f in futures]
    for f in futures:
        if f.exception() is None:
            f.result().stop()
    raise error


def _count_downlink(dev: VirtualDevice) -> None:
    """Count the payload bytes the device receives (model + round task), then hand the message to the client."""
    c = dev.client
    assert c is not None
    inner = c.mqtt.on_message

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        dev.bytes_down += len(msg.payload)
        inner(client, userdata, msg)

    c.mqtt.on_message = on_message

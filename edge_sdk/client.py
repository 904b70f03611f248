"""EdgeClient: the device side of fedatt over MQTT (paho-mqtt 2.x), wrapped around the sans-I/O RoundFollower.

What it does: connects with the device's own identity (client id = device id, clean_session=False, per-device
credentials, optional TLS), sets a retained "offline" last will and publishes a retained "online" status,
follows the retained global model and round task, runs local training in a worker (never on paho's network
thread), and carries out the follower's actions: ledger first, outbox second, publish third (see
edge_sdk/follower.py for why that order).

Threads. MQTT callbacks only translate: they put an event on a queue. One place handles events, so the
follower is never called concurrently:
* `start()`/`stop()` (apps): paho's own network thread (`loop_start`, which also retries the first connect
  with the configured backoff) plus one control thread that handles events and ticks.
* external mode (the simulator, thousands of clients in one process): `connect_external()`, then the driver
  selects on `socket()` and calls `loop_read()` / `loop_write()` (when `want_write()`) / `loop_misc()`;
  `loop_misc()` also handles queued events, ticks and reconnects with backoff. `set_wakeup(fn)` tells the
  driver (from any thread) that a training run finished. `FleetDriver` below is a reference selector loop.

Training runs through an injectable runner: an `Executor` (a process pool in the simulator; the job and
`run_training_job` are picklable, and the job carries only numpy arrays and plain dataclasses) or a
callable `runner(job) -> TrainOutcome`, which the client calls on its own worker thread. The ORT session
exists only during a run: idle devices hold none.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import queue
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Union

import numpy as np
import paho.mqtt.client as mqtt

from edge_sdk import wire
from edge_sdk.bundle import Bundle
from edge_sdk.config import ClientConfig
from edge_sdk.connection import new_client
from edge_sdk.follower import (ForgetEntries, Note, Publish, Release, Report, RoundFollower, RoundResult,
                               RoundSpec, StartTraining, TrainOutcome, UpdateEntry)
from edge_sdk.outbox import Outbox
from edge_sdk.privacy import BudgetExceeded, DuplicateRelease, LedgerError, PrivacyLedger, privatize

__all__ = ["EdgeClient", "TrainJob", "run_training_job", "FleetDriver", "RoundResult", "TrainData",
           "lock_state_dir", "unlock_state_dir"]

log = logging.getLogger(__name__)

# (x, y) arrays, a re-iterable of (x, y) batches, or a picklable zero-argument callable returning either
# (lets a process-pool runner load a device's partition in the worker instead of shipping it every round).
TrainData = Union[tuple[np.ndarray, np.ndarray], Iterable[tuple[np.ndarray, np.ndarray]], Callable[[], Any]]
Runner = Union[cf.Executor, Callable[["TrainJob"], TrainOutcome]]

LEDGER_FILE = "privacy_ledger.json"
OUTBOX_DIR = "outbox"
LOCK_FILE = ".lock"
# CONNACK reason codes that mean "these credentials will not work" (MQTT 5 numbering; paho maps 3.1.1's return
# codes 4 and 5 onto them): 0x86 bad user name or password, 0x87 not authorized.
AUTH_REFUSAL_CODES = (0x86, 0x87)


# ------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainJob:
    """One local round, self-contained so it can run in another process."""

    spec: RoundSpec
    bundle_dir: str
    data: Any  # TrainData
    threads: int = 1
    flush_denormals: bool = False  # edge_sdk.trainer.DENORMAL_AS_ZERO: only where the SDK owns the thread
    # None (devices): shuffling and DP noise come from OS randomness. An int seeds both: simulations only,
    # so a run can be reproduced; predictable noise gives no privacy.
    seed: int | None = None


_BUNDLES: dict[tuple[str, str], Bundle] = {}  # per-process cache: verifying digests every round is wasted work
_BUNDLES_LOCK = threading.Lock()


def _bundle_for(path: str, model_id: str) -> Bundle:
    with _BUNDLES_LOCK:
        b = _BUNDLES.get((path, model_id))
        if b is None:
            b = Bundle.load(path)  # full verification once per process
            if b.model_id != model_id:
                raise ValueError(f"bundle at {path} is {b.model_id}, the round expects {model_id}")
            _BUNDLES[(path, model_id)] = b
        return b


def run_training_job(job: TrainJob) -> TrainOutcome:
    """Train E epochs from the global model, Δ = θ_local − θ_global, clip + noise (OS CSPRNG; see TrainJob.seed), encode.

    Runs in a worker thread or process. Raw quantities (Δ, its norm) never leave this function; only the
    privatised, encoded payload and local metrics do.
    """
    from edge_sdk.compression import quantize_int8
    from edge_sdk.trainer import LocalTrainer

    spec = job.spec
    bundle = _bundle_for(job.bundle_dir, spec.model_id)
    data = job.data() if callable(job.data) else job.data
    theta_global = bundle.join(spec.global_tensors)
    trainer = LocalTrainer(bundle, threads=job.threads, flush_denormals=job.flush_denormals)
    try:  # fresh optimizer state per round is LocalTrainer.train's contract
        trainer.set_parameters(theta_global)
        result = trainer.train(data, epochs=spec.train.epochs, batch_size=spec.train.batch_size, lr=spec.train.lr,
                               seed=job.seed)
        theta_local = trainer.get_parameters()
    finally:
        trainer.close()  # idle devices hold no ORT session
    delta = theta_local.astype(np.float64) - theta_global.astype(np.float64)
    noise_rng = None if job.seed is None else np.random.default_rng([job.seed, 1])  # 1: not the shuffle stream
    noised, info = privatize(delta, spec.privacy.clip_norm, spec.privacy.noise_multiplier, rng=noise_rng)
    named = bundle.split(noised)
    msg = wire.UpdateMessage(model_id=spec.model_id, round=spec.round, device_id=spec.device_id,
                             update_id=spec.update_id, num_examples=result.num_examples,
                             clip_norm=spec.privacy.clip_norm, noise_multiplier=spec.privacy.noise_multiplier,
                             encoding=spec.encoding, tensors=named, sdk=spec.sdk)
    quantized = None
    if spec.encoding == wire.ENCODING_INT8:  # after noise: post-processing, costs no privacy
        quantized = {name: quantize_int8(arr) for name, arr in named.items()}
    payload = wire.encode_update(msg, quantized)
    return TrainOutcome(update_id=spec.update_id, payload=payload, num_examples=result.num_examples,
                        train_loss=result.mean_loss, seconds=result.seconds, clipped=info.clipped)


# --------------------------------------------------------------------------------------------- client
class EdgeClient:
    """One device: `EdgeClient(config, bundle, data).start()` ... `.stop()`, or driven externally."""

    def __init__(self, config: ClientConfig, bundle: Bundle | str | os.PathLike[str], data: TrainData, *,
                 runner: Runner | None = None,
                 on_round_result: Callable[[RoundResult], None] | None = None) -> None:
        if not isinstance(config, ClientConfig):
            raise TypeError("config must be a ClientConfig")
        self.config = config
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        self.data = data
        self.on_round_result = on_round_result
        self.topics = wire.Topics(config.fleet)
        self._log = logging.LoggerAdapter(log, {"device": config.device_id})
        state = Path(config.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        self._lock_fd = lock_state_dir(state) if config.lock_state_dir else None
        try:
            self.ledger = PrivacyLedger.open(state / LEDGER_FILE, epsilon_budget=config.epsilon_budget,
                                             delta=config.delta, adjacency=config.adjacency)
            self.outbox = Outbox(state / OUTBOX_DIR)
        except BaseException:
            unlock_state_dir(self._lock_fd)
            raise
        self.follower = RoundFollower(
            device_id=config.device_id, fleet=config.fleet, model_id=self.bundle.model_id,
            expected={p.name: p.shape for p in self.bundle.trainable}, ledger=self.ledger,
            eligibility=config.ineligibility, encoding=config.encoding, outbox=self.outbox.entries(),
            sdk=config.sdk)
        self._runner = runner
        self._own_executor: cf.ThreadPoolExecutor | None = None
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._mids: dict[int, str] = {}  # paho message id -> update_id, for PUBACK
        self._wakeup: Callable[[], None] | None = None
        self._control: threading.Thread | None = None
        self._mode: str | None = None  # "thread" | "external"
        self._stopping = False
        self._closed = False
        self._connected = threading.Event()
        # The broker's last CONNACK refusal for bad credentials ("Bad user name or password" / "Not authorized"),
        # cleared by a successful connect. The client keeps retrying (an operator may fix the password file on
        # the broker side); a CLI or app that cannot fix it itself should stop instead (`fedatt device` does).
        self.auth_refused: str | None = None
        self._next_tick = 0.0
        self._backoff = config.reconnect_min
        self._next_connect = 0.0
        self.results: list[RoundResult] = []  # every result, in order (the app may also pass a callback)
        self.mqtt = self._make_mqtt()

    # ---- paho setup and callbacks (translate only) ---------------------------------------------------
    def _make_mqtt(self) -> mqtt.Client:
        cfg = self.config
        ctx = cfg.ssl_context()
        c = new_client(cfg.device_id, clean_session=False, username=cfg.username, password=cfg.password,
                       ssl_context=ctx)
        if ctx is not None and cfg.tls_insecure:
            c.tls_insecure_set(True)
        c.will_set(self.topics.status(cfg.device_id), self._status("offline"), qos=1, retain=True)
        c.reconnect_delay_set(min_delay=cfg.reconnect_min, max_delay=cfg.reconnect_max)  # type: ignore[arg-type]
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_connect_fail = self._on_connect_fail
        return c

    def _status(self, state: str) -> bytes:
        return wire.encode_status(wire.Status(self.config.device_id, state, time.time(), self.config.sdk))

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._log.error("broker refused the connection: %s (check credentials/ACL)", reason_code)
            if getattr(reason_code, "value", None) in AUTH_REFUSAL_CODES:
                self.auth_refused = str(reason_code)
            return
        self.auth_refused = None
        self._backoff = self.config.reconnect_min
        client.subscribe([(self.topics.model, 1), (self.topics.round, 1)])
        client.publish(self.topics.status(self.config.device_id), self._status("online"), qos=1, retain=True)
        self._connected.set()
        self._post(("connected", bool(getattr(flags, "session_present", False))))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._log.info("cannot reach the broker at %s; retrying with backoff", self.config.broker)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connected.clear()
        if not self._stopping:
            self._log.warning("disconnected from the broker (%s); will reconnect", reason_code)
        self._post(("disconnected",))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._post(("message", msg.topic, msg.payload))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        self._post(("puback", mid))

    def _post(self, event: tuple) -> None:
        self._events.put(event)
        wake = self._wakeup
        if wake is not None:
            try:
                wake()
            except Exception:  # a driver's wake-up must not break paho's thread
                self._log.exception("wake-up callback failed")

    # ---- event handling (one thread at a time) -------------------------------------------------------
    def _handle(self, event: tuple) -> None:
        kind = event[0]
        f = self.follower
        if kind == "message":
            _, topic, payload = event
            if topic == self.topics.model:
                actions = f.model_payload(payload)
            elif topic == self.topics.round:
                actions = f.round_payload(payload)
            else:
                actions = [Note("unexpected_topic", topic, "warning")]
        elif kind == "connected":
            self._log.info("connected to %s (session present: %s)", self.config.broker, event[1])
            actions = f.connected()
        elif kind == "puback":
            uid = self._mids.pop(event[1], None)
            actions = f.published(uid) if uid is not None else []
        elif kind == "trained":
            _, uid, future = event
            try:
                outcome = future.result()
            except BaseException as exc:  # the worker's error becomes a skip, never a crash of the device
                self._log.error("local training failed: %s: %s", type(exc).__name__, exc)
                actions = f.training_failed(uid, f"{type(exc).__name__}: {exc}"[:300])
            else:
                actions = f.training_finished(outcome)
        elif kind == "tick":
            actions = f.tick()
        else:  # "disconnected": paho keeps unacknowledged publishes and re-sends them itself
            actions = []
        self._run(actions)

    def _run(self, actions: list) -> None:
        for a in actions:
            try:
                self._do(a)
            except Exception:
                self._log.exception("action %s failed", type(a).__name__)

    def _do(self, a: Any) -> None:
        if isinstance(a, StartTraining):
            self._start_training(a.spec)
        elif isinstance(a, Release):
            self._release(a)
        elif isinstance(a, Publish):
            try:
                payload = self.outbox.payload(a.update_id)
            except (KeyError, OSError) as exc:
                self._log.error("cannot re-send update %s: %s", a.update_id, exc)
                self._run(self.follower.release_failed(a.update_id, "outbox_lost", str(exc)))
                return
            self._log.info("re-sending update %s (%d bytes, same bytes as released)", a.update_id, len(payload))
            self._publish(a.topic, payload, a.update_id)
        elif isinstance(a, UpdateEntry):
            changes = {k: v for k, v in (("state", a.state), ("attempt", a.attempt)) if v is not None}
            self.outbox.update(a.update_id, **changes)
        elif isinstance(a, ForgetEntries):
            self.outbox.remove(a.update_ids)
        elif isinstance(a, Report):
            self._report(a.result)
        elif isinstance(a, Note):
            level = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}[a.level]
            self._log.log(level, "%s%s", a.reason, f": {a.detail}" if a.detail else "")

    def _start_training(self, spec: RoundSpec) -> None:
        self._log.info("round %d (attempt %d): training %d epoch(s) from model %d, z=%g C=%g, %s",
                       spec.round, spec.attempt, spec.train.epochs, spec.model_round,
                       spec.privacy.noise_multiplier, spec.privacy.clip_norm, spec.encoding)
        job = TrainJob(spec=spec, bundle_dir=str(self.bundle.path), data=self.data, threads=self.config.threads,
                       flush_denormals=self.config.flush_denormals)
        runner = self._runner
        try:
            if isinstance(runner, cf.Executor):
                future = runner.submit(run_training_job, job)
            else:
                if self._own_executor is None:
                    self._own_executor = cf.ThreadPoolExecutor(1, thread_name_prefix=f"train-{self.config.device_id}")
                future = self._own_executor.submit(runner or run_training_job, job)
        except RuntimeError as exc:  # executor shut down (stopping)
            future = cf.Future()
            future.set_exception(exc)
        future.add_done_callback(lambda fut, uid=spec.update_id: self._post(("trained", uid, fut)))

    def _release(self, a: Release) -> None:
        e = a.entry
        # 1. ledger (durable) — from here on this key is spent, whatever happens next
        try:
            self.ledger.record_release(e.key, a.noise_multiplier, a.clip_norm, round=e.round, update_id=e.update_id)
        except BudgetExceeded as exc:
            self._run(self.follower.release_failed(e.update_id, "budget", str(exc)))
            return
        except DuplicateRelease as exc:
            self._run(self.follower.release_failed(e.update_id, "already_released", str(exc)))
            return
        except (LedgerError, OSError) as exc:
            self._log.error("privacy ledger write failed, not publishing: %s", exc)
            self._run(self.follower.release_failed(e.update_id, "ledger_error", str(exc)))
            return
        # 2. outbox (durable) — so a restart re-sends these bytes instead of losing the round
        try:
            self.outbox.put(e, a.payload)
        except OSError as exc:  # publishing is still safe: the release is already counted
            self._log.warning("could not persist update %s in the outbox (%s); publishing without it", e.update_id, exc)
        # 3. publish, QoS 1
        self._log.info("round %d: releasing update %s (%d bytes), ε now %.4g of %g", e.round, e.update_id,
                       len(a.payload), self.ledger.epsilon, self.ledger.epsilon_budget)
        self._publish(e.topic, a.payload, e.update_id)

    def _publish(self, topic: str, payload: bytes, update_id: str) -> None:
        info = self.mqtt.publish(topic, payload, qos=1, retain=False)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: queued, sent on reconnect
            self._log.error("publish of %s failed: %s", update_id, mqtt.error_string(info.rc))
            return
        self._mids[info.mid] = update_id

    def _report(self, r: RoundResult) -> None:
        self.results.append(r)
        if r.status == "published":
            self._log.info("round %d attempt %d: published%s (update %s, %s examples, loss %s, ε %.4g)",
                           r.round, r.attempt, f" ({r.detail})" if r.detail else "", r.update_id,
                           r.num_examples, "n/a" if r.train_loss is None else f"{r.train_loss:.4f}", r.epsilon or 0.0)
        else:
            self._log.info("round %d attempt %d: skipped (%s)%s", r.round, r.attempt, r.reason,
                           f": {r.detail}" if r.detail else "")
        if self.on_round_result is not None:
            try:
                self.on_round_result(r)
            except Exception:
                self._log.exception("on_round_result callback raised")

    def _drain(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if event[0] == "stop":
                continue
            self._handle(event)
        now = time.monotonic()
        if now >= self._next_tick:
            self._next_tick = now + self.config.tick_interval
            self._handle(("tick",))

    # ---- mode 1: threads (apps) ----------------------------------------------------------------------
    def start(self) -> "EdgeClient":
        """Connect in the background (retrying with backoff) and follow rounds until `stop()`."""
        self._begin("thread")
        addr = self.config.address
        self.mqtt.connect_async(addr.host, addr.port, keepalive=self.config.keepalive)
        self.mqtt.loop_start()  # paho's thread retries the first connect too (retry_first_connection=True)
        self._control = threading.Thread(target=self._control_loop, name=f"fedatt-{self.config.device_id}",
                                          daemon=True)
        self._control.start()
        return self

    def _control_loop(self) -> None:
        while not self._stopping:
            timeout = max(0.0, self._next_tick - time.monotonic())
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                event = None
            if self._stopping:
                break
            if event is not None and event[0] != "stop":
                self._handle(event)
            if time.monotonic() >= self._next_tick:
                self._next_tick = time.monotonic() + self.config.tick_interval
                self._handle(("tick",))

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    # ---- mode 2: external driver (simulator) ---------------------------------------------------------
    def connect_external(self) -> "EdgeClient":
        """Begin connecting without any thread; the caller then drives the client (see `FleetDriver`)."""
        self._begin("external")
        addr = self.config.address
        self.mqtt.connect_async(addr.host, addr.port, keepalive=self.config.keepalive)
        self._try_connect()
        return self

    def set_wakeup(self, fn: Callable[[], None] | None) -> None:
        """`fn()` is called from any thread when an event is queued (e.g. training finished)."""
        self._wakeup = fn

    def socket(self) -> socket.socket | None:
        """The current socket (changes after a reconnect; None while disconnected)."""
        return self.mqtt.socket()  # type: ignore[return-value]

    def want_write(self) -> bool:
        return self.mqtt.want_write()

    def loop_read(self) -> None:
        self.mqtt.loop_read()

    def loop_write(self) -> None:
        self.mqtt.loop_write()

    def loop_misc(self) -> None:
        """Keepalive, reconnect with backoff, and the device's own work (events, ticks). Call often (≥1 Hz)."""
        if self._closed:
            return
        self.mqtt.loop_misc()
        if self.mqtt.socket() is None and not self._stopping and time.monotonic() >= self._next_connect:
            self._try_connect()
        self._drain()

    def step(self, timeout: float = 0.0) -> None:
        """Drive this one client for up to `timeout` seconds (select on its socket, then loop_misc)."""
        sock = self.socket()
        if sock is not None:
            pending = getattr(sock, "pending", None)
            if pending is not None and pending():
                self.loop_read()
            else:
                sel = selectors.DefaultSelector()
                try:
                    events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.want_write() else 0)
                    sel.register(sock, events)
                    for _, mask in sel.select(timeout):
                        if mask & selectors.EVENT_READ:
                            self.loop_read()
                        if mask & selectors.EVENT_WRITE and self.socket() is not None:
                            self.loop_write()
                finally:
                    sel.close()
        elif timeout:
            time.sleep(min(timeout, 0.05))
        self.loop_misc()

    def _try_connect(self) -> None:
        try:
            self.mqtt.reconnect()
        except OSError as exc:
            self._log.info("cannot reach the broker at %s (%s); retrying in %.1fs", self.config.broker, exc,
                           self._backoff)
            self._next_connect = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self.config.reconnect_max)
            return
        # a connection that fails later (e.g. CONNACK refused) also waits a backoff before the next try
        self._next_connect = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.config.reconnect_max)

    # ---- shared ---------------------------------------------------------------------------------------
    def _begin(self, mode: str) -> None:
        if self._closed:
            raise RuntimeError("this EdgeClient was stopped; create a new one (same state_dir) to restart")
        if self._mode is not None:
            raise RuntimeError(f"already started ({self._mode} mode)")
        self._mode = mode

    def stop(self, timeout: float = 5.0) -> None:
        """Publish a retained offline status, disconnect, stop threads. A run in progress is abandoned
        (nothing was released for it); an unacknowledged update stays in the outbox for the next start."""
        if self._closed:
            return
        self._stopping = True
        self._events.put(("stop",))
        if self._control is not None:
            self._control.join(timeout)
        try:
            if self.mqtt.is_connected():
                info = self.mqtt.publish(self.topics.status(self.config.device_id), self._status("offline"),
                                         qos=1, retain=True)
                if self._mode == "thread":
                    info.wait_for_publish(min(timeout, 2.0))
            self.mqtt.disconnect()
        except Exception as exc:  # stopping must always complete
            self._log.debug("while disconnecting: %s", exc)
        if self._mode == "thread":
            self._stop_network_thread(timeout)
        if self._own_executor is not None:
            self._own_executor.shutdown(wait=False, cancel_futures=True)
        self._closed = True
        unlock_state_dir(self._lock_fd)
        self._lock_fd = None

    def _stop_network_thread(self, timeout: float) -> None:
        # paho's loop_stop() joins its network thread with no timeout, and that thread only leaves its loop once
        # the connection is gone or nothing is left to send (e.g. a QoS 1 message the broker never acknowledges).
        # The thread is a daemon, so after `timeout` it is abandoned (it ends with the process) and stop()
        # always completes.
        stopper = threading.Thread(target=self.mqtt.loop_stop, name=f"fedatt-stop-{self.config.device_id}",
                                   daemon=True)
        stopper.start()
        stopper.join(timeout)
        if stopper.is_alive():
            self._log.warning("MQTT network thread did not stop within %.1fs; abandoning it", timeout)

    close = stop

    def __enter__(self) -> "EdgeClient":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"EdgeClient({self.config.device_id!r}, fleet={self.config.fleet!r}, mode={self._mode}, "
                f"ε={self.ledger.epsilon:.4g}/{self.ledger.epsilon_budget:g})")


# ------------------------------------------------------------------------------- reference driver
class FleetDriver:
    """A selector loop for many externally-driven EdgeClients in one thread (what the simulator needs).

    `add(client)` connects it; `run_once(timeout)` waits for socket activity or a wake-up and services every
    client. Sockets are re-registered when a client reconnects (its socket object changes).
    """

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._clients: list[EdgeClient] = []
        self._reg: dict[int, tuple[Any, int]] = {}  # id(client) -> (socket, events)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)

    def wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake / closing

    def add(self, client: EdgeClient) -> EdgeClient:
        client.set_wakeup(self.wake)
        client.connect_external()
        self._clients.append(client)
        return client

    def _sync(self) -> None:
        for c in self._clients:
            sock = c.socket()
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if sock is not None and c.want_write() else 0)
            old = self._reg.get(id(c))
            if old is not None and (old[0] is not sock or sock is None):
                try:
                    self._sel.unregister(old[0])
                except (KeyError, ValueError, OSError):
                    pass
                del self._reg[id(c)]
                old = None
            if sock is None:
                continue
            if old is None:
                self._sel.register(sock, want, c)
            elif old[1] != want:
                self._sel.modify(sock, want, c)
            self._reg[id(c)] = (sock, want)

    def run_once(self, timeout: float = 0.1) -> None:
        self._sync()
        ready = [c for c in self._clients if (s := c.socket()) is not None and getattr(s, "pending", lambda: 0)()]
        for key, mask in self._sel.select(0 if ready else timeout):
            c = key.data
            if c is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
                continue
            if mask & selectors.EVENT_READ:
                c.loop_read()
            if mask & selectors.EVENT_WRITE and c.socket() is not None:
                c.loop_write()
        for c in ready:
            c.loop_read()
        for c in self._clients:
            c.loop_misc()

    def run(self, until: Callable[[], bool], timeout: float = 0.1) -> None:
        while not until():
            self.run_once(timeout)

    def close(self) -> None:
        for c in self._clients:
            c.stop()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()


# ---------------------------------------------------------------------------------- state-dir lock
def lock_state_dir(state: Path, owner: str = "EdgeClient") -> int | None:
    """Lock `state` exclusively (flock on <state>/.lock, held while the returned descriptor is open).

    One EdgeClient per state_dir: two owners of one ledger would lose each other's releases. RuntimeError if
    another process or client holds it; None where flock does not exist (not POSIX: the app must ensure it).
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the app (documented)
        return None
    fd = os.open(state / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RuntimeError(f"state_dir {state} is in use by another {owner} (one owner per state_dir)") from None
    return fd


def unlock_state_dir(fd: int | None) -> None:
    """Release a lock taken by `lock_state_dir` (closing the descriptor releases the flock)."""
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass

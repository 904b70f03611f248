"""The aggregator process: MQTT glue around the sans-I/O RoundEngine, checkpoints and Prometheus metrics.

Threads: the MQTT network thread only *translates* (connect → event, message → event) into a queue; one engine
thread consumes the queue in order, feeds the engine, and executes its actions in order (checkpoint before
publish: see broker/rounds.py). The engine is never touched from two threads. The network thread is
edge_sdk.netloop.NetworkLoop (epoll), not paho's loop_start() (select): the aggregator must keep working in a
process that holds more than 1,024 descriptors, e.g. the simulator with its thousands of device sockets.

A failed checkpoint write is fatal: the service stops with an error and publishes nothing more of that round;
a restart resumes from the last good checkpoint (systemd's Restart=on-failure does that in deployments).
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import paho.mqtt.client as mqtt

from broker.metrics import AggregatorMetrics
from broker.rounds import (Accepted, EngineConfig, Publish, Rejected, RoundAnnounced, RoundClosed, RoundEngine,
                           execute)
from broker.state import CheckpointError, CheckpointStore
from edge_sdk import wire
from edge_sdk.bundle import Bundle
from edge_sdk.connection import new_client, parse_broker_url, tls_context
from edge_sdk.netloop import NetworkLoop

log = logging.getLogger("fedatt.aggregator")


@dataclass(frozen=True)
class MqttSettings:
    """How the aggregator reaches the broker (the deploy/ config gives it a loopback plaintext listener)."""

    url: str
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    client_id: str | None = None  # default: fedatt-aggregator-<fleet>
    keepalive: int = 30


RoundCallback = Callable[[wire.RoundSummary, dict[str, np.ndarray]], Any]


class AggregatorService:
    """Run rounds for one fleet until stopped (or until `max_rounds` more rounds have closed)."""

    def __init__(self, config: EngineConfig, bundle: Bundle, state_dir: str | Path, mqtt_settings: MqttSettings, *,
                 metrics: AggregatorMetrics | None = None, metrics_port: int | None = None,
                 max_rounds: int | None = None, tick_interval: float = 0.2,
                 on_round_closed: RoundCallback | None = None, rng: Any = None) -> None:
        if config.model_id != bundle.model_id:
            raise ValueError(f"engine model_id {config.model_id} differs from the bundle's {bundle.model_id}")
        self.config = config
        self.bundle = bundle
        self.topics = wire.Topics(config.fleet)
        self.store = CheckpointStore(Path(state_dir) / "checkpoints")
        checkpoint = self.store.load()  # CheckpointError if every generation is damaged: refuse to start blind
        if checkpoint is not None and checkpoint.model_id != bundle.model_id:
            raise CheckpointError(f"checkpoint in {self.store.dir} is for model {checkpoint.model_id}, "
                                  f"the bundle is {bundle.model_id}: use another --state directory")
        self.engine = RoundEngine(config, bundle.split(bundle.initial_parameters()), checkpoint=checkpoint, rng=rng)
        self.resumed_from = checkpoint.round if checkpoint is not None else None
        self.metrics = metrics or AggregatorMetrics(config.fleet)
        self.metrics_port = metrics_port
        self.max_rounds = max_rounds
        self.tick_interval = tick_interval
        self.on_round_closed = on_round_closed
        self.mqtt_settings = mqtt_settings
        self._start_round = self.engine.model_round
        if max_rounds is not None:  # and announce none beyond them (devices would train for nothing)
            self.engine.stop_after(self._start_round + max_rounds)
        self._events: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._closed = threading.Condition()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._client = self._make_client()
        self._net = NetworkLoop(self._client, reconnect_min=1.0, reconnect_max=30.0,
                                name=f"fedatt-aggregator-mqtt-{config.fleet}")
        self._global = self.engine.global_model
        self._model_round = self.engine.model_round
        self.summaries: list[wire.RoundSummary] = []

    # --------------------------------------------------------------------------------------- wiring
    def _make_client(self) -> mqtt.Client:
        s = self.mqtt_settings
        addr = parse_broker_url(s.url)
        ctx = tls_context(s.ca_file, s.cert_file, s.key_file, s.tls_insecure) if addr.tls else None
        # clean_session=False: the broker queues updates (QoS 1) for us while we restart.
        c = new_client(s.client_id or f"fedatt-aggregator-{self.config.fleet}", clean_session=False,
                       username=s.username, password=s.password, ssl_context=ctx)
        c.max_queued_messages_set(0)  # reconnect backoff (1 s doubling to 30 s): see NetworkLoop in __init__
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        return c

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        # Statuses at QoS 0: they are retained state, and every SUBSCRIBE (each reconnect) re-sends all of them at
        # once. At QoS 1 the broker's per-client queue limit (Mosquitto max_queued_messages 1000 + 20 in flight,
        # EMQX's max_mqueue_len 1000) drops all but ~1,020 of them, so with a larger fleet most devices would
        # never count as online. QoS 0 is written out as it is queued; a change missed while disconnected is
        # re-sent by the next subscribe. Updates stay QoS 1: the broker keeps them for us while we restart.
        client.subscribe([(self.topics.all_updates, 1), (self.topics.all_status, 0)])
        self._events.put(("connected",))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if not self._stop.is_set():
            log.warning("disconnected from broker (%s); reconnecting with backoff", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._events.put(("message", msg.topic, bytes(msg.payload)))

    # ------------------------------------------------------------------------------------- lifecycle
    def start(self, connect_timeout: float = 30.0) -> "AggregatorService":
        if self.metrics_port is not None:
            self.metrics.serve(self.metrics_port)
        addr = parse_broker_url(self.mqtt_settings.url)
        deadline = time.monotonic() + connect_timeout
        delay = 0.5
        while True:  # the first connect is not covered by paho's automatic reconnect
            try:
                self._client.connect(addr.host, addr.port, keepalive=self.mqtt_settings.keepalive)
                break
            except OSError as exc:
                if time.monotonic() + delay > deadline:
                    raise ConnectionError(f"cannot reach broker {self.mqtt_settings.url}: {exc}") from exc
                log.warning("broker %s not reachable (%s); retrying in %.1fs", self.mqtt_settings.url, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        self._net.start()
        self._thread = threading.Thread(target=self._engine_loop, name="fedatt-engine", daemon=True)
        self._thread.start()
        log.info("aggregator started", extra={"fedatt": {"fleet": self.config.fleet, "strategy": self.config.strategy,
                                                        "resumed_from_round": self.resumed_from}})
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._events.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout)
        self._net.stop(timeout=min(timeout, 5.0))  # DISCONNECT, flush what is queued, end the network thread

    def wait(self, timeout: float | None = None) -> bool:
        """Until max_rounds closed, the service stopped, or a fatal error (re-raised here)."""
        finished = self._done.wait(timeout)
        if self._error is not None:
            raise self._error
        return finished

    def wait_for_round(self, model_round: int, timeout: float) -> bool:
        """Until the global model has reached `model_round` (True) or timeout (False)."""
        end = time.monotonic() + timeout
        with self._closed:
            while self._model_round < model_round:
                if self._error is not None:
                    raise self._error
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._closed.wait(left)
        return True

    @property
    def model_round(self) -> int:
        return self._model_round

    def global_model(self) -> dict[str, np.ndarray]:
        with self._closed:
            return {k: v.copy() for k, v in self._global.items()}

    def __enter__(self) -> "AggregatorService":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------- engine loop
    def _engine_loop(self) -> None:
        next_tick = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    event = self._events.get(timeout=max(0.0, next_tick - time.monotonic()))
                except queue.Empty:
                    event = None
                now = time.time()
                if event is not None:
                    if event[0] == "stop":
                        break
                    self._dispatch(event, now)
                if time.monotonic() >= next_tick:
                    self._run(self.engine.tick(now))
                    next_tick = time.monotonic() + self.tick_interval
        except BaseException as exc:  # fatal (e.g. checkpoint write failed): stop, surface through wait()
            self._error = exc
            log.critical("aggregator stopped: %s", exc, exc_info=not isinstance(exc, CheckpointError))
            with self._closed:
                self._closed.notify_all()
        finally:
            self._done.set()

    def _dispatch(self, event: tuple, now: float) -> None:
        if event[0] == "connected":
            self._run(self.engine.start(now))  # re-publishes retained model/round after every (re)connect
            return
        _, topic, payload = event
        try:
            if topic.startswith(self.topics.prefix + "/updates/"):
                device = topic.rsplit("/", 1)[1]
                self._run(self.engine.update_received(device, payload, now))
            elif topic.startswith(self.topics.prefix + "/status/"):
                device = topic.rsplit("/", 1)[1]
                self._run(self.engine.status_received(device, payload, now))
                self.metrics.set_online(len(self.engine.online))
            else:
                log.warning("message on unexpected topic ignored", extra={"fedatt": {"topic": topic[:200]}})
        except CheckpointError:
            raise
        except Exception:  # defence in depth: one bad message must never take the aggregator down
            log.exception("unexpected error while handling a message on %s (dropped)", topic[:200])

    def _run(self, actions: list) -> None:
        execute(actions, publish=self._publish, save=self.store.save, on_action=self._observe, logger=log)

    def _publish(self, p: Publish) -> None:
        info = self._client.publish(p.topic, p.payload, qos=p.qos, retain=p.retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            # NO_CONN: paho keeps QoS 1 messages and sends them on reconnect; start() republishes anyway.
            log.error("publish to %s failed: %s", p.topic, mqtt.error_string(info.rc))

    def _observe(self, action: Any) -> None:
        if isinstance(action, Accepted):
            self.metrics.update_accepted(action.nbytes)
        elif isinstance(action, Rejected):
            self.metrics.update_rejected(action.reason, action.nbytes)  # the engine logs the rejection itself
        elif isinstance(action, RoundAnnounced):
            self.metrics.set_round(action.task.round)
            if action.task.attempt > 1:
                self.metrics.round_reannounced()
        elif isinstance(action, RoundClosed):
            s = action.summary
            self.metrics.round_closed(s.duration_s, len(s.participants))
            model = self.engine.global_model
            with self._closed:
                self._global = model
                self._model_round = s.round
                self.summaries.append(s)
                self._closed.notify_all()
            log.info("round closed", extra={"fedatt": {"round": s.round, "participants": len(s.participants),
                                                       "rejections": s.rejections, "duration_s": round(s.duration_s, 3)}})
            if self.on_round_closed is not None:
                try:
                    self.on_round_closed(s, model)
                except Exception:
                    log.exception("on_round_closed callback failed")
            if self.max_rounds is not None and s.round - self._start_round >= self.max_rounds:
                self._stop.set()


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's structured `fedatt` fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        fields = getattr(record, "fedatt", None)
        if isinstance(fields, dict):
            doc.update({k: v for k, v in fields.items() if k not in doc})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)

"""Sans-I/O round engine of the aggregator: announce, collect, validate, close, re-announce (h11-style).

`RoundEngine` holds the aggregator's state and is driven by events; every event method takes `now` (unix
seconds) and returns a list of actions. It never reads a clock, touches a socket or a file: broker/service.py
translates MQTT callbacks into events and executes the actions *in order* (`execute()` below does exactly
that), and broker/state.py writes the checkpoints. Tests drive every edge case in microseconds.

Events                                            Actions (dataclasses)
  start(now)              publish model, announce   Publish(topic, payload, retain, qos=1)
  tick(now)               deadlines, waiting start  SaveCheckpoint(checkpoint)   <- the commit point
  device_online / device_offline(device_id, now)    Accepted / Rejected(device_id, reason, detail, …)
  status_received(topic_device_id, payload, now)    RoundAnnounced(task) / RoundClosed(summary)
  update_received(topic_device_id, payload, now)    LogEvent(level, event, fields)

Commit point. Closing a round emits, in this order: SaveCheckpoint, Publish(model, retained), Publish(summary,
retained), RoundClosed, then (if enough devices are online, and `stop_after` allows) the next round's
Publish(round task, retained).
The executor must stop at the first action that raises: if the checkpoint cannot be written, nothing of the
round is published and the process should exit; the restart resumes from the previous checkpoint and runs the
round again (its number was never published with a model, so no round is applied twice). The engine's memory
is then ahead of the disk, which is why a failed SaveCheckpoint is fatal rather than retried.

Round policy (see also broker/validation.py for the per-update checks):
  * No round is announced until `min_online` devices are online (status events; the retained status and the
    last will keep this exact across broker and aggregator restarts). Announcing happens in start(), tick()
    and right after a close, never on a status event, so the burst of retained statuses that follows a
    (re)subscription settles before a cohort is drawn.
  * Cohort: ceil(quorum × over_selection) devices drawn with `secrets.SystemRandom` from the online ones
    (capped by their number and by wire's max_cohort).
  * A round closes as soon as every cohort member has answered (accepted or rejected) with at least `quorum`
    accepted, otherwise at the deadline if at least `quorum` were accepted.
  * Missed quorum at the deadline: the same round is re-announced with attempt+1, a new deadline and the
    cohort topped up with other online devices so that ceil((quorum − accepted) × over_selection) invitees
    are still outstanding. Accepted updates are kept: they answer the same model_round.
  * After `max_attempts` (None = never) the round is abandoned: its updates are discarded, and the same round
    number is announced afresh (attempt keeps increasing) to devices that did not already answer it (those
    have spent privacy budget on it and would refuse to train it twice).
  * A crash mid-round loses that round's accepted-but-unaggregated updates (never a global model); the
    restarted engine re-announces the round after the checkpointed one.
"""
from __future__ import annotations

import copy
import logging
import math
import re
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np

from broker.state import Checkpoint
from broker.strategies import STRATEGIES, AggregationError, Aggregator, make_aggregator
from broker.validation import DEFAULT_NORM_T, RoundContext, Rejection, validate_update
from edge_sdk import wire

log = logging.getLogger(__name__)

_MODEL_ID_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
# Rejections that say nothing about the device's answer to the *open* round, so they do not count as one.
_NOT_AN_ANSWER = frozenset({"stale_round", "no_round", "duplicate", "bad_topic"})


class ConfigError(ValueError):
    """The engine configuration is invalid; the message names the field."""


# ----------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class EngineConfig:
    """Everything a round needs, validated once at construction."""

    fleet: str
    model_id: str
    strategy: str = "fedavg"
    strategy_params: Mapping[str, Any] = field(default_factory=dict)
    quorum: int = 2
    over_selection: float = 1.5  # cohort = ceil(quorum × over_selection), capped by the online count
    min_online: int | None = None  # None: = quorum
    round_timeout_s: float = 60.0  # deadline = announce time + timeout (each attempt)
    max_attempts: int | None = None  # None: re-announce forever
    train: wire.TrainSettings = field(default_factory=wire.TrainSettings)
    privacy: wire.PrivacySettings = field(default_factory=wire.PrivacySettings)
    encodings: tuple[str, ...] = wire.ENCODINGS
    max_update_bytes: int = wire.DEFAULT_LIMITS.max_tensor_message_bytes
    norm_t: float = DEFAULT_NORM_T  # Gaussian tail parameter of the norm bound (false rejection ≤ exp(−t²/2))
    history_limit: int = 1000  # round summaries kept in the checkpoint

    def __post_init__(self) -> None:
        try:
            wire.check_id(self.fleet, "fleet")
        except wire.WireError as exc:
            raise ConfigError(str(exc)) from None
        _require(isinstance(self.model_id, str) and bool(_MODEL_ID_RE.fullmatch(self.model_id)),
                 "model_id must be 'sha256:' + 64 lowercase hex characters")
        _require(self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        max_cohort = wire.DEFAULT_LIMITS.max_cohort
        _require(_is_int(self.quorum) and 1 <= self.quorum <= max_cohort, f"quorum must be in [1, {max_cohort}]")
        _require(_finite(self.over_selection) and self.over_selection >= 1.0, "over_selection must be >= 1")
        if self.min_online is None:
            object.__setattr__(self, "min_online", self.quorum)
        _require(_is_int(self.min_online) and self.min_online >= self.quorum,
                 "min_online must be an integer >= quorum (a cohort can never be smaller than the quorum)")
        _require(_finite(self.round_timeout_s) and self.round_timeout_s > 0, "round_timeout_s must be > 0")
        _require(self.max_attempts is None or (_is_int(self.max_attempts) and self.max_attempts >= 1),
                 "max_attempts must be None (infinite) or >= 1")
        t = self.train
        _require(_is_int(t.epochs) and 1 <= t.epochs <= 1000, "train.epochs must be in [1, 1000]")
        _require(_is_int(t.batch_size) and 1 <= t.batch_size <= 1_000_000, "train.batch_size must be in [1, 1e6]")
        _require(t.lr is None or (_finite(t.lr) and 0 < t.lr <= 10), "train.lr must be None or in (0, 10]")
        p = self.privacy
        _require(_finite(p.clip_norm) and p.clip_norm > 0, "privacy.clip_norm must be > 0")
        _require(_finite(p.noise_multiplier) and p.noise_multiplier >= 0, "privacy.noise_multiplier must be >= 0")
        _require(p.adjacency in wire.ADJACENCIES, f"privacy.adjacency must be one of {wire.ADJACENCIES}")
        _require(_finite(p.delta) and 0 < p.delta < 1, "privacy.delta must be in (0, 1)")
        _require(len(self.encodings) > 0 and all(e in wire.ENCODINGS for e in self.encodings)
                 and len(set(self.encodings)) == len(self.encodings),
                 f"encodings must be a non-empty subset of {wire.ENCODINGS}")
        object.__setattr__(self, "encodings", tuple(self.encodings))
        _require(_is_int(self.max_update_bytes)
                 and 1024 <= self.max_update_bytes <= wire.DEFAULT_LIMITS.max_tensor_message_bytes,
                 "max_update_bytes must be in [1024, wire max_tensor_message_bytes]")
        _require(_finite(self.norm_t) and self.norm_t > 0, "norm_t must be > 0")
        _require(_is_int(self.history_limit) and self.history_limit >= 1, "history_limit must be >= 1")
        object.__setattr__(self, "strategy_params", dict(self.strategy_params))

    @property
    def cohort_size(self) -> int:
        """Target cohort: ceil(quorum × over_selection) (before capping by the online count)."""
        return min(math.ceil(self.quorum * self.over_selection - 1e-9), wire.DEFAULT_LIMITS.max_cohort)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------------------------------------- actions
@dataclass(frozen=True)
class Publish:
    """Publish `payload` on `topic` (QoS 1 everywhere in protocol v1)."""

    topic: str
    payload: bytes
    retain: bool
    qos: int = 1


@dataclass(frozen=True)
class SaveCheckpoint:
    """The commit point: write it durably (broker.state.CheckpointStore.save) before any later action runs."""

    checkpoint: Checkpoint


@dataclass(frozen=True)
class Accepted:
    """An update passed validation and was folded into the open round's aggregate."""

    device_id: str
    round: int
    update_id: str
    nbytes: int
    norm: float


@dataclass(frozen=True)
class Rejected:
    """An update was dropped; `reason` is a PROTOCOL.md rejection code (the metrics label)."""

    device_id: str
    reason: str
    detail: str
    nbytes: int
    round: int | None  # the open round when it arrived
    late: bool = False


@dataclass(frozen=True)
class RoundAnnounced:
    """A round task was (re)announced; attempt > 1 means a re-announcement after a missed quorum."""

    task: wire.RoundTask


@dataclass(frozen=True)
class RoundClosed:
    """A round was aggregated; its model and summary are published by the preceding Publish actions."""

    summary: wire.RoundSummary


@dataclass(frozen=True)
class LogEvent:
    """Something to log: `logging.log(level, event, extra={"fedatt": fields})`."""

    level: int
    event: str
    fields: dict[str, Any] = field(default_factory=dict)


Action = Union[Publish, SaveCheckpoint, Accepted, Rejected, RoundAnnounced, RoundClosed, LogEvent]


def execute(actions: Iterable[Action], *, publish: Callable[[Publish], Any], save: Callable[[Checkpoint], Any],
            on_action: Callable[[Action], Any] | None = None, logger: logging.Logger = log) -> None:
    """Run actions in order; an exception (e.g. a failed save) propagates and nothing after it runs."""
    for action in actions:
        if isinstance(action, SaveCheckpoint):
            save(action.checkpoint)
        elif isinstance(action, Publish):
            publish(action)
        elif isinstance(action, LogEvent):
            logger.log(action.level, action.event, extra={"fedatt": action.fields})
        if on_action is not None and not isinstance(action, LogEvent):
            on_action(action)


# ------------------------------------------------------------------------------------------------ engine
@dataclass
class _OpenRound:
    number: int
    attempt: int
    cohort: list[str]
    deadline: float
    started_at: float  # first announcement of this round number: duration_s counts from here
    task: wire.RoundTask
    agg: Aggregator
    accepted: dict[str, str] = field(default_factory=dict)  # device -> update_id, in arrival order
    examples: dict[str, int] = field(default_factory=dict)
    responded: set[str] = field(default_factory=set)
    rejections: Counter = field(default_factory=Counter)
    bytes_in: int = 0
    late: int = 0
    duplicates: int = 0
    burned: set[str] = field(default_factory=set)  # answered an abandoned attempt: never invited again
    first_attempt: int = 1  # attempt number this aggregation started at (> 1 after an abandonment)


@dataclass
class _Carry:
    """A round that was abandoned: the next announcement keeps its number, attempt count and burned devices."""

    number: int
    next_attempt: int
    started_at: float
    burned: set[str]


class RoundEngine:
    """The aggregator's round state machine. Feed events, execute the returned actions in order."""

    def __init__(self, config: EngineConfig, initial_model: Mapping[str, np.ndarray], *,
                 checkpoint: Checkpoint | None = None, rng: Any = None) -> None:
        """`initial_model`: the bundle's trainable parameters (Bundle.split(initial_parameters())), which also
        fix the expected update names and shapes. `checkpoint`: resume from it. `rng`: defaults to
        secrets.SystemRandom(); tests may pass a seeded random.Random for reproducibility."""
        if not initial_model:
            raise ConfigError("initial_model has no trainable parameters")
        self.config = config
        self.topics = wire.Topics(config.fleet)
        self._rng = rng if rng is not None else secrets.SystemRandom()
        self._expected = {k: tuple(int(d) for d in np.shape(v)) for k, v in initial_model.items()}
        self._global = {k: np.array(v, dtype=np.float32) for k, v in initial_model.items()}
        self._model_round = 0
        self._model_created = 0.0
        self._strategy_state: dict[str, Any] = {}
        self._registry: dict[str, dict[str, Any]] = {}
        self._history: list[dict[str, Any]] = []
        self._last_summary = b""  # encoded summary of the last closed round (re-published by start())
        self._totals: dict[str, Any] = _new_totals()
        self._online: set[str] = set()
        self._round: _OpenRound | None = None
        self._carry: _Carry | None = None
        self._started = False
        self._waiting_logged = False
        self._last_round: int | None = None  # stop_after(): no round is announced past it
        self._pending: list[Action] = []  # log events raised before start() (restore notes)
        if checkpoint is not None:
            self._restore(checkpoint)
        try:
            self._new_aggregator()  # validates strategy_params (and the restored state) once, now
        except AggregationError as exc:
            raise ConfigError(f"strategy {config.strategy!r}: {exc}") from None

    def stop_after(self, model_round: int | None) -> None:
        """Announce no round after `model_round` has closed (None: no limit). For runs of a fixed length
        (`fedatt aggregate --max-rounds`, the simulator): a round announced as the aggregator stops would make
        its cohort train and spend privacy budget on an update nobody aggregates."""
        if model_round is not None and (not _is_int(model_round) or model_round < 0):
            raise ConfigError(f"stop_after needs a round number >= 0, got {model_round!r}")
        self._last_round = model_round

    # ------------------------------------------------------------------------------------- read-only
    @property
    def model_round(self) -> int:
        """Round of the current global model (0 = initial parameters); the next round is model_round + 1."""
        return self._model_round

    @property
    def global_model(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._global.items()}

    @property
    def online(self) -> frozenset[str]:
        return frozenset(self._online)

    @property
    def current_task(self) -> wire.RoundTask | None:
        """The open round's announcement, or None while waiting for devices."""
        return self._round.task if self._round else None

    @property
    def totals(self) -> dict[str, Any]:
        return copy.deepcopy(self._totals)

    @property
    def registry(self) -> dict[str, dict[str, Any]]:
        return copy.deepcopy(self._registry)

    @property
    def history(self) -> list[dict[str, Any]]:
        return copy.deepcopy(self._history)

    # ---------------------------------------------------------------------------------------- events
    def start(self, now: float) -> list[Action]:
        """(Re)publish the retained global model and the open round, or announce the next one if possible.

        Call it after connecting (and again after every reconnect: a broker restarted without persistence
        has lost the retained messages)."""
        self._started = True
        actions: list[Action] = list(self._pending)
        self._pending.clear()
        actions.append(self._publish_model(now))
        if self._last_summary:  # idempotent for subscribers: the same bytes, retained
            actions.append(Publish(self.topics.summary, self._last_summary, retain=True))
        if self._round is not None:
            actions.append(Publish(self.topics.round, wire.encode_round(self._round.task), retain=True))
            actions.append(_log(logging.INFO, "round_republished", round=self._round.number,
                                attempt=self._round.attempt))
        else:
            actions += self._maybe_announce(now)
        return actions

    def tick(self, now: float) -> list[Action]:
        """Time passes: close or re-announce a round past its deadline; announce one if enough devices are online."""
        if not self._started:
            return []
        if self._round is not None:
            return self._expire(now)
        return self._maybe_announce(now)

    def device_online(self, device_id: str, now: float) -> list[Action]:
        """A device's retained status says online."""
        if not _valid_id(device_id):
            return [_log(logging.WARNING, "status_ignored", device_id=str(device_id)[:80], why="bad device id")]
        entry = self._touch(device_id, now)
        entry["online"] = True
        self._online.add(device_id)
        return []

    def device_offline(self, device_id: str, now: float) -> list[Action]:
        """A device's status (or its last will) says offline."""
        if not _valid_id(device_id):
            return [_log(logging.WARNING, "status_ignored", device_id=str(device_id)[:80], why="bad device id")]
        entry = self._touch(device_id, now)
        entry["online"] = False
        self._online.discard(device_id)
        return []

    def status_received(self, topic_device_id: str, payload: bytes, now: float) -> list[Action]:
        """Decode a status message from `<prefix>/status/<id>` and dispatch it (convenience for the glue).

        An empty payload is the retained status being cleared: treated as offline."""
        if not payload:
            return self.device_offline(topic_device_id, now)
        try:
            status = wire.decode_status(payload)
        except wire.WireError as exc:
            return [_log(logging.WARNING, "status_ignored", device_id=str(topic_device_id)[:80], why=exc.reason,
                         detail=exc.detail)]
        if status.device_id != topic_device_id:
            return [_log(logging.WARNING, "status_ignored", device_id=str(topic_device_id)[:80],
                         why="device_mismatch", payload_device_id=status.device_id)]
        if status.state == "online":
            return self.device_online(topic_device_id, now)
        return self.device_offline(topic_device_id, now)

    def update_received(self, topic_device_id: str, payload: bytes, now: float) -> list[Action]:
        """An update arrived on `<prefix>/updates/<topic_device_id>`. Validates, folds in, maybe closes."""
        actions = self._expire(now) if self._round is not None else []  # a passed deadline is processed first
        payload = bytes(payload)
        nbytes = len(payload)
        self._totals["bytes_in"] += nbytes
        if not _valid_id(topic_device_id):
            return actions + self._reject(str(topic_device_id)[:80], Rejection("bad_topic", "bad device id"), nbytes)
        self._touch(topic_device_id, now)
        r = self._round
        if r is not None:
            r.bytes_in += nbytes
        try:
            acc = validate_update(topic_device_id, payload, self._context())
        except Rejection as rej:
            return actions + self._reject(topic_device_id, rej, nbytes) + self._maybe_close_early(now)
        assert r is not None  # validation rejects everything (no_round / stale_round) when no round is open
        msg = acc.message
        try:
            r.agg.add(topic_device_id, msg.tensors, num_examples=msg.num_examples,
                      noise_std=self.config.privacy.noise_multiplier * self.config.privacy.clip_norm)
        except AggregationError as exc:  # validation mirrors the strategy's checks; this is a safety net
            return (actions + self._reject(topic_device_id, Rejection("bad_tensors", str(exc)), nbytes)
                    + self._maybe_close_early(now))
        r.accepted[topic_device_id] = msg.update_id
        r.examples[topic_device_id] = msg.num_examples
        r.responded.add(topic_device_id)
        self._totals["accepted"] += 1
        self._registry[topic_device_id]["accepted"] += 1
        actions.append(Accepted(topic_device_id, r.number, msg.update_id, nbytes, acc.norm))
        actions.append(_log(logging.INFO, "update_accepted", round=r.number, attempt=r.attempt,
                            device_id=topic_device_id, nbytes=nbytes, norm=acc.norm, bound=acc.bound,
                            accepted=len(r.accepted), quorum=self.config.quorum))
        return actions + self._maybe_close_early(now)

    # ----------------------------------------------------------------------------------- checkpoints
    def checkpoint(self, now: float) -> Checkpoint:
        """A snapshot of the state after the last closed round (what SaveCheckpoint carries)."""
        return Checkpoint(fleet=self.config.fleet, model_id=self.config.model_id, round=self._model_round,
                          model=dict(self._global), strategy=self.config.strategy,
                          strategy_state=dict(self._strategy_state), registry=copy.deepcopy(self._registry),
                          history=copy.deepcopy(self._history), totals=copy.deepcopy(self._totals),
                          last_summary=self._last_summary,
                          created=self._model_created or now)

    def _restore(self, ckpt: Checkpoint) -> None:
        cfg = self.config
        if ckpt.fleet != cfg.fleet or ckpt.model_id != cfg.model_id:
            raise ConfigError(f"checkpoint is for fleet {ckpt.fleet!r} model {ckpt.model_id[:20]}…, this "
                              f"aggregator serves fleet {cfg.fleet!r} model {cfg.model_id[:20]}…")
        shapes = {k: tuple(np.shape(v)) for k, v in ckpt.model.items()}
        if shapes != self._expected:
            raise ConfigError("checkpoint model does not match the bundle's trainable parameters")
        if ckpt.round < 0:
            raise ConfigError(f"checkpoint round {ckpt.round} < 0")
        self._global = {k: np.array(ckpt.model[k], dtype=np.float32) for k in self._expected}
        self._model_round = int(ckpt.round)
        self._model_created = float(ckpt.created)
        if ckpt.strategy == cfg.strategy:
            self._strategy_state = dict(ckpt.strategy_state)
        elif ckpt.strategy_state:
            self._pending.append(_log(logging.WARNING, "strategy_state_dropped", checkpoint_strategy=ckpt.strategy,
                                      strategy=cfg.strategy))
        self._registry = copy.deepcopy(ckpt.registry)
        for entry in self._registry.values():
            entry["online"] = False  # presence comes from the retained statuses after resubscribing
        self._history = copy.deepcopy(ckpt.history)[-cfg.history_limit:]
        self._last_summary = ckpt.last_summary
        self._totals = {**_new_totals(), **copy.deepcopy(ckpt.totals)}
        self._pending.append(_log(logging.INFO, "restored", round=self._model_round, next_round=self._model_round + 1))

    # ------------------------------------------------------------------------------------- internals
    def _publish_model(self, now: float) -> Publish:
        # A checkpointed model keeps its close time, so a restart re-publishes the same tensors and `created`
        # (not byte-identical: safetensors writes the metadata map in a per-process hash order).
        msg = wire.ModelMessage(model_id=self.config.model_id, round=self._model_round, tensors=self._global,
                                created=self._model_created or now)
        return Publish(self.topics.model, wire.encode_model(msg), retain=True)

    def _new_aggregator(self) -> Aggregator:
        agg = make_aggregator(self.config.strategy, self._global, **self.config.strategy_params)
        if self._strategy_state:
            agg.load_state_dict(self._strategy_state)
        return agg

    def _context(self) -> RoundContext:
        r, cfg = self._round, self.config
        return RoundContext(
            model_id=cfg.model_id, expected=self._expected, open_round=r.number if r else None,
            last_closed_round=self._model_round, cohort=frozenset(r.cohort) if r else frozenset(),
            accepted=r.accepted if r else {}, clip_norm=cfg.privacy.clip_norm,
            noise_multiplier=cfg.privacy.noise_multiplier, encodings=cfg.encodings,
            max_update_bytes=cfg.max_update_bytes, norm_t=cfg.norm_t)

    def _touch(self, device_id: str, now: float) -> dict[str, Any]:
        entry = self._registry.get(device_id)
        if entry is None:
            entry = self._registry[device_id] = {"first_seen": now, "last_seen": now, "online": False,
                                                 "participations": 0, "accepted": 0, "rejections": {},
                                                 "last_round": None}
        entry["last_seen"] = max(float(entry.get("last_seen") or 0.0), now)
        return entry

    def _reject(self, device_id: str, rej: Rejection, nbytes: int) -> list[Action]:
        r = self._round
        self._totals["rejections"][rej.reason] = self._totals["rejections"].get(rej.reason, 0) + 1
        if rej.late:
            self._totals["late"] += 1
        if rej.reason == "duplicate":
            self._totals["duplicates"] += 1
        if device_id in self._registry:
            regs = self._registry[device_id]["rejections"]
            regs[rej.reason] = regs.get(rej.reason, 0) + 1
        if r is not None:
            r.rejections[rej.reason] += 1
            r.late += int(rej.late)
            r.duplicates += int(rej.reason == "duplicate")
            if device_id in r.cohort and rej.reason not in _NOT_AN_ANSWER:
                r.responded.add(device_id)
        # A re-send of identical bytes is routine (QoS 1, device restart): not worth a warning.
        level = logging.INFO if rej.late or rej.reason == "duplicate" else logging.WARNING
        return [Rejected(device_id, rej.reason, rej.detail, nbytes, r.number if r else None, rej.late),
                _log(level, "update_rejected", device_id=device_id, reason=rej.reason, detail=rej.detail,
                     round=r.number if r else None, nbytes=nbytes)]

    def _eligible(self, exclude: Iterable[str] = ()) -> list[str]:
        ex = set(exclude)
        return sorted(d for d in self._online if d not in ex)  # sorted: a seeded test rng is reproducible

    def _maybe_announce(self, now: float) -> list[Action]:
        if not self._started or self._round is not None:
            return []
        if self._last_round is not None and self._model_round >= self._last_round:
            return []
        cfg = self.config
        carry = self._carry if self._carry and self._carry.number == self._model_round + 1 else None
        burned = carry.burned if carry else set()
        eligible = self._eligible(burned)
        if len(self._online) < cfg.min_online or len(eligible) < cfg.quorum:
            if not self._waiting_logged:
                self._waiting_logged = True
                return [_log(logging.INFO, "waiting_for_devices", online=len(self._online), eligible=len(eligible),
                             min_online=cfg.min_online, quorum=cfg.quorum, next_round=self._model_round + 1)]
            return []
        self._waiting_logged = False
        size = min(cfg.cohort_size, len(eligible))
        cohort = self._rng.sample(eligible, size)
        number = self._model_round + 1
        attempt = carry.next_attempt if carry else 1
        task = self._task(number, attempt, cohort, now)
        self._round = _OpenRound(number=number, attempt=attempt, cohort=cohort, deadline=task.deadline,
                                 started_at=carry.started_at if carry else now, task=task,
                                 agg=self._new_aggregator(), burned=set(burned), first_attempt=attempt)
        self._carry = None
        return self._announce_actions(task, online=len(self._online))

    def _task(self, number: int, attempt: int, cohort: Sequence[str], now: float) -> wire.RoundTask:
        cfg = self.config
        return wire.RoundTask(fleet=cfg.fleet, round=number, model_id=cfg.model_id, model_round=self._model_round,
                              deadline=now + cfg.round_timeout_s, quorum=cfg.quorum, cohort=tuple(cohort),
                              attempt=attempt, train=cfg.train, privacy=cfg.privacy, encodings=cfg.encodings,
                              max_update_bytes=cfg.max_update_bytes, issued_at=now)

    def _announce_actions(self, task: wire.RoundTask, **fields: Any) -> list[Action]:
        return [Publish(self.topics.round, wire.encode_round(task), retain=True), RoundAnnounced(task),
                _log(logging.INFO, "round_announced", round=task.round, attempt=task.attempt,
                     cohort=len(task.cohort), quorum=task.quorum, deadline=task.deadline, **fields)]

    def _maybe_close_early(self, now: float) -> list[Action]:
        # Every invitee has answered (accepted or rejected) and the quorum is met: waiting cannot add anything.
        r = self._round
        if r is not None and len(r.accepted) >= self.config.quorum and all(d in r.responded for d in r.cohort):
            return self._close(now)
        return []

    def _expire(self, now: float) -> list[Action]:
        r = self._round
        if r is None or now < r.deadline:
            return []
        if len(r.accepted) >= self.config.quorum:
            return self._close(now)
        if self.config.max_attempts is not None and r.attempt - r.first_attempt + 1 >= self.config.max_attempts:
            return self._abandon(now, "max_attempts reached; accepted updates discarded")
        return self._reannounce(now)

    def _reannounce(self, now: float) -> list[Action]:
        r, cfg = self._round, self.config
        assert r is not None
        outstanding = [d for d in r.cohort if d not in r.responded and d in self._online]
        needed = cfg.quorum - len(r.accepted)
        target = math.ceil(needed * cfg.over_selection - 1e-9)
        room = wire.DEFAULT_LIMITS.max_cohort - len(r.cohort)
        candidates = self._eligible(set(r.cohort) | r.burned)
        extra = self._rng.sample(candidates, max(0, min(target - len(outstanding), len(candidates), room)))
        # Old members stay invited (an in-flight update still counts); accepted ones must stay listed too.
        r.cohort = r.cohort + extra
        r.attempt += 1
        r.task = self._task(r.number, r.attempt, r.cohort, now)
        r.deadline = r.task.deadline
        self._totals["reannounced"] += 1
        return self._announce_actions(r.task, accepted=len(r.accepted), added=len(extra),
                                      outstanding=len(outstanding))

    def _abandon(self, now: float, why: str, level: int = logging.WARNING) -> list[Action]:
        r = self._round
        assert r is not None
        self._totals["abandoned"] += 1
        self._carry = _Carry(number=r.number, next_attempt=r.attempt + 1, started_at=r.started_at,
                             burned=r.burned | set(r.accepted))
        self._round = None
        return [_log(level, "round_abandoned", round=r.number, attempt=r.attempt, accepted=len(r.accepted),
                     quorum=self.config.quorum, why=why)] + self._maybe_announce(now)

    def _close(self, now: float) -> list[Action]:
        r, cfg = self._round, self.config
        assert r is not None
        try:
            new_global, report = r.agg.finalize()
        except AggregationError as exc:  # e.g. a robust rule refusing this cohort: never leave the round stuck
            return self._abandon(now, f"aggregation failed: {exc}", level=logging.ERROR)
        self._global = {k: np.asarray(new_global[k], dtype=np.float32) for k in self._expected}
        self._model_round = r.number
        self._model_created = now
        self._strategy_state = dict(r.agg.state_dict())
        participants = tuple(r.accepted)
        extra = {"layer_entropy": report.layer_entropy, "layer_max_weight": report.layer_max_weight,
                 "strategy": report.extra, "params": report.params, "cohort": len(r.cohort),
                 "num_examples": int(sum(r.examples.values()))}
        summary = wire.RoundSummary(
            fleet=cfg.fleet, round=r.number, model_id=cfg.model_id, strategy=cfg.strategy,
            participants=participants, rejections=dict(sorted(r.rejections.items())),
            weights=_jsonable(report.weights), bytes_in=r.bytes_in, duration_s=max(0.0, now - r.started_at),
            late=r.late, duplicates=r.duplicates, attempt=r.attempt, extra=_jsonable(extra))
        for d in participants:
            self._registry[d]["participations"] += 1
            self._registry[d]["last_round"] = r.number
        self._history.append(_jsonable({"round": r.number, "attempt": r.attempt, "participants": list(participants),
                                        "rejections": summary.rejections, "bytes_in": r.bytes_in,
                                        "duration_s": summary.duration_s, "late": r.late,
                                        "duplicates": r.duplicates, "closed_at": now}))
        del self._history[:-cfg.history_limit]
        self._totals["rounds_closed"] += 1
        self._last_summary = wire.encode_summary(summary)
        self._round = None
        self._carry = None
        actions: list[Action] = [
            SaveCheckpoint(self.checkpoint(now)),  # commit point: everything below depends on it
            self._publish_model(now),
            Publish(self.topics.summary, self._last_summary, retain=True),
            RoundClosed(summary),
            _log(logging.INFO, "round_closed", round=r.number, attempt=r.attempt, participants=len(participants),
                 rejected=sum(r.rejections.values()), late=r.late, duplicates=r.duplicates,
                 duration_s=summary.duration_s)]
        return actions + self._maybe_announce(now)


# ------------------------------------------------------------------------------------------------ helpers
def _new_totals() -> dict[str, Any]:
    return {"accepted": 0, "rejections": {}, "late": 0, "duplicates": 0, "bytes_in": 0, "rounds_closed": 0,
            "reannounced": 0, "abandoned": 0}


def _valid_id(device_id: Any) -> bool:
    try:
        wire.check_id(device_id, "device_id")
        return True
    except wire.WireError:
        return False


def _log(level: int, event: str, **fields: Any) -> LogEvent:
    return LogEvent(level, event, {"event": event, **fields})


def _jsonable(obj: Any) -> Any:
    """Plain JSON values (numpy scalars/arrays converted, NaN/Inf -> None): the wire forbids NaN."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)

"""Sans-I/O round follower of one device: events in (model, round task, training done, PUBACK), actions out.

The follower decides *whether* and *what* the device does in a round; it performs no I/O itself. The
`EdgeClient` feeds it what MQTT and the training worker report and carries out the actions it returns, in
order. That keeps every edge case (late, duplicate, stale, re-announced, restarted between steps) testable
in microseconds without a broker (tests/test_follower.py).

A device takes part in a round when (docs/PROTOCOL.md, "round"):
  it is in the cohort, it holds global model `model_round` of the bundle's `model_id`, the app's
  eligibility callbacks say yes, the privacy ledger can afford one more release at the round's z, the
  deadline has not passed, and nothing was released yet for the key (model_id, round).

Release ordering (carried out by the client for a `Release` action):
  ledger.record_release(key)  ->  outbox.put(entry, payload)  ->  MQTT publish (QoS 1)  ->  PUBACK: entry `sent`.
A crash before the ledger write releases nothing; after it, the update is either in the outbox (re-sent
byte for byte on the next connect) or lost (counted in ε, never re-noised). Released entries stay in the
outbox until the round changes, so a re-announcement of the same round (attempt > 1) re-sends the same
bytes. The follower never asks for a second noise draw for a key that is already in the ledger.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Literal, Mapping, Protocol, Union

import numpy as np

from edge_sdk import wire
from edge_sdk.outbox import PENDING, SENT, OutboxEntry, release_key

__all__ = [
    "RoundFollower", "LedgerView", "RoundSpec", "TrainOutcome", "RoundResult",
    "StartTraining", "Release", "Publish", "UpdateEntry", "ForgetEntries", "Report", "Note", "Action",
]


class LedgerView(Protocol):
    """The read-only part of `edge_sdk.privacy.PrivacyLedger` the follower consults."""

    def has_release(self, key: str) -> bool: ...

    def can_release(self, noise_multiplier: float) -> bool: ...

    @property
    def epsilon(self) -> float: ...


# ------------------------------------------------------------------------------------------- values
@dataclass(frozen=True)
class RoundSpec:
    """What one local training run must produce: an update for `round`, trained from `global_tensors`."""

    key: str  # ledger key '<model_id>:<round>'
    model_id: str
    round: int
    attempt: int
    model_round: int
    update_id: str  # chosen once per (device, round): every re-send carries the same id
    device_id: str
    topic: str
    global_tensors: Mapping[str, np.ndarray]
    train: wire.TrainSettings
    privacy: wire.PrivacySettings
    encoding: str
    sdk: str = ""


@dataclass(frozen=True)
class TrainOutcome:
    """A finished local run: the encoded, privatised update and local metrics (these never leave the device)."""

    update_id: str
    payload: bytes
    num_examples: int
    train_loss: float
    seconds: float
    clipped: bool = False


@dataclass(frozen=True)
class RoundResult:
    """Reported to the app once per round the device was invited to (and once per re-send)."""

    round: int
    attempt: int
    status: Literal["published", "skipped"]
    reason: str = ""  # skipped: budget | ineligible | deadline | already_released | round_closed | ...
    detail: str = ""  # published: "" or "resent"
    update_id: str | None = None
    num_examples: int | None = None
    train_loss: float | None = None
    epsilon: float | None = None  # ε spent by this device after the round
    seconds: float | None = None  # local training time
    bytes: int | None = None  # update payload size


# ------------------------------------------------------------------------------------------ actions
@dataclass(frozen=True)
class StartTraining:
    spec: RoundSpec


@dataclass(frozen=True)
class Release:
    """Record the release in the ledger, persist the entry + payload in the outbox, then publish (in order)."""

    entry: OutboxEntry
    payload: bytes
    noise_multiplier: float
    clip_norm: float


@dataclass(frozen=True)
class Publish:
    """Re-send an already-released update: the exact payload stored in the outbox under `update_id`."""

    update_id: str
    topic: str


@dataclass(frozen=True)
class UpdateEntry:
    update_id: str
    state: str | None = None
    attempt: int | None = None


@dataclass(frozen=True)
class ForgetEntries:
    update_ids: tuple[str, ...]


@dataclass(frozen=True)
class Report:
    result: RoundResult


@dataclass(frozen=True)
class Note:
    """Something ignored or worth a log line; `reason` is machine-readable (tests assert on it)."""

    reason: str
    detail: str = ""
    level: Literal["debug", "info", "warning"] = "info"


Action = Union[StartTraining, Release, Publish, UpdateEntry, ForgetEntries, Report, Note]


# ----------------------------------------------------------------------------------------- follower
@dataclass
class _Metrics:
    round: int
    attempt: int
    resent: bool
    num_examples: int | None = None
    train_loss: float | None = None
    seconds: float | None = None
    bytes: int | None = None


class RoundFollower:
    """One device's round logic. Single-threaded: the client serialises every call."""

    def __init__(self, *, device_id: str, fleet: str, model_id: str, expected: Mapping[str, tuple[int, ...]],
                 ledger: LedgerView, eligibility: Callable[[], str | None] = lambda: None,
                 encoding: str = wire.ENCODING_F32, outbox: Iterable[OutboxEntry] = (), sdk: str = "",
                 limits: wire.Limits = wire.DEFAULT_LIMITS) -> None:
        self.device_id = wire.check_id(device_id, "device_id")
        self.topics = wire.Topics(fleet)
        self.model_id = model_id
        self.expected = {k: tuple(v) for k, v in expected.items()}
        self.ledger = ledger
        self.eligibility = eligibility
        self.encoding = encoding
        self.sdk = sdk
        self.limits = limits
        self.model: wire.ModelMessage | None = None
        self.task: wire.RoundTask | None = None
        self.training: RoundSpec | None = None
        self.entries: dict[str, OutboxEntry] = {}  # ledger key -> the one released entry for that key
        for e in outbox:
            self.entries[e.key] = e
        self.in_flight: set[str] = set()  # update_ids handed to MQTT in this process and not yet acknowledged
        self._metrics: dict[str, _Metrics] = {}  # update_id -> what to report at PUBACK
        self._said: set[tuple] = set()  # (round, attempt, reason) already reported: retained re-deliveries are quiet

    # ---- events -----------------------------------------------------------------------------------
    def connected(self, now: float | None = None) -> list[Action]:
        """A (re)connection. Pending outbox entries this process has not handed to MQTT yet are re-sent.

        Entries published in this process stay with the MQTT client, which re-sends its unacknowledged
        QoS 1 messages itself after a reconnect: publishing them again would duplicate them on the wire.
        """
        out: list[Action] = []
        for e in self.entries.values():
            if e.state == PENDING and e.update_id not in self.in_flight:
                out += self._resend(e, e.attempt)
                out.append(Note("resend_pending", f"round {e.round} update {e.update_id} from the outbox"))
        return out

    def model_payload(self, payload: bytes, now: float | None = None) -> list[Action]:
        try:
            msg = _decode_model_shared(payload, self.limits)
            if msg.model_id != self.model_id:
                raise wire.WireError("wrong_model", f"global model is {msg.model_id[:23]}…, bundle is "
                                                    f"{self.model_id[:23]}…")
            wire.check_tensors(msg.tensors, self.expected)
        except wire.WireError as exc:
            return [Note(f"model_ignored:{exc.reason}", exc.detail, "warning")]
        if self.model is not None and msg.round < self.model.round:
            return [Note("model_ignored:stale_model", f"model round {msg.round} < held {self.model.round}", "warning")]
        self.model = msg
        return [Note("model", f"global model round {msg.round}", "debug")] + self._consider(_now(now))

    def round_payload(self, payload: bytes, now: float | None = None) -> list[Action]:
        try:
            task = wire.decode_round(payload, self.limits)
        except wire.WireError as exc:
            return [Note(f"round_ignored:{exc.reason}", exc.detail, "warning")]
        if task.fleet != self.topics.fleet:
            return [Note("round_ignored:wrong_fleet", f"task for fleet {task.fleet!r}", "warning")]
        if task.model_id != self.model_id:
            return [Note("round_ignored:wrong_model", f"round {task.round} is for model {task.model_id[:23]}…, "
                                                      f"bundle is {self.model_id[:23]}…", "warning")]
        cur = self.task
        if cur is not None and (task.round, task.attempt) < (cur.round, cur.attempt):
            return [Note("round_ignored:stale_round", f"round {task.round} attempt {task.attempt} is older than "
                                                      f"round {cur.round} attempt {cur.attempt}", "warning")]
        if cur is None or task.round != cur.round:
            self._said = {m for m in self._said if m[0] >= task.round}  # bounded: only this round's notes
        self.task = task
        out: list[Action] = []
        key = release_key(task.model_id, task.round)
        old = [e.update_id for k, e in self.entries.items() if k != key]
        if old:  # the fleet moved on: updates of earlier rounds will never be wanted again
            self.entries = {k: e for k, e in self.entries.items() if k == key}
            out.append(ForgetEntries(tuple(old)))
        return out + self._consider(_now(now))

    def tick(self, now: float | None = None) -> list[Action]:
        """Periodic re-check: a device that was ineligible (not charging, ...) may join before the deadline."""
        return self._consider(_now(now))

    def training_finished(self, outcome: TrainOutcome, now: float | None = None) -> list[Action]:
        spec = self.training
        if spec is None or outcome.update_id != spec.update_id:
            return [Note("training_result_ignored", f"no training run {outcome.update_id} in progress", "warning")]
        self.training = None
        now = _now(now)
        task = self.task
        reason = None
        if task is None or release_key(task.model_id, task.round) != spec.key or task.model_round != spec.model_round:
            reason = "round_closed"  # the fleet moved on while we trained: nothing is released, nothing spent
        elif now > task.deadline:
            reason = "deadline"  # the aggregator would drop it as late: do not spend ε on it
        elif self.ledger.has_release(spec.key):
            reason = "already_released"
        elif not self.ledger.can_release(spec.privacy.noise_multiplier):
            reason = "budget"
        elif len(outcome.payload) > task.max_update_bytes:
            reason = "too_large"
        if reason is not None:
            if task is not None:  # _consider below must not report the same skip again for this attempt
                self._said.add((task.round, task.attempt, reason))
            return [self._skip(spec.round, spec.attempt, reason)] + self._consider(now)
        entry = OutboxEntry(key=spec.key, model_id=spec.model_id, round=spec.round, model_round=spec.model_round,
                            attempt=task.attempt, update_id=spec.update_id, topic=spec.topic, sha256="",
                            size=len(outcome.payload), state=PENDING)
        self.entries[spec.key] = entry
        self.in_flight.add(entry.update_id)
        self._metrics[entry.update_id] = _Metrics(spec.round, task.attempt, False, outcome.num_examples,
                                                  outcome.train_loss, outcome.seconds, len(outcome.payload))
        return [Release(entry, outcome.payload, spec.privacy.noise_multiplier, spec.privacy.clip_norm)]

    def training_failed(self, update_id: str, error: str, now: float | None = None) -> list[Action]:
        spec = self.training
        if spec is None or spec.update_id != update_id:
            return [Note("training_result_ignored", f"no training run {update_id} in progress", "warning")]
        self.training = None
        return [self._skip(spec.round, spec.attempt, "training_failed", error)] + self._consider(_now(now))

    def release_failed(self, update_id: str, reason: str, detail: str = "") -> list[Action]:
        """The ledger refused to record the release (budget / duplicate / I/O): nothing was published."""
        key = next((k for k, e in self.entries.items() if e.update_id == update_id), None)
        if key is not None:
            del self.entries[key]
        self.in_flight.discard(update_id)
        m = self._metrics.pop(update_id, None)
        if m is None:
            return [Note("release_failed", detail, "warning")]
        return [self._skip(m.round, m.attempt, reason, detail)]

    def published(self, update_id: str) -> list[Action]:
        """PUBACK for an update: the broker has it. The entry stays (state `sent`) until the round changes."""
        self.in_flight.discard(update_id)
        out: list[Action] = []
        if any(e.update_id == update_id for e in self.entries.values()):
            for k, e in self.entries.items():
                if e.update_id == update_id:
                    self.entries[k] = replace(e, state=SENT)
            out.append(UpdateEntry(update_id, state=SENT))
        m = self._metrics.pop(update_id, None)
        if m is not None:
            out.append(Report(RoundResult(
                round=m.round, attempt=m.attempt, status="published", detail="resent" if m.resent else "",
                update_id=update_id, num_examples=m.num_examples, train_loss=m.train_loss,
                epsilon=self.ledger.epsilon, seconds=m.seconds, bytes=m.bytes)))
        return out

    # ---- the decision -----------------------------------------------------------------------------
    def _consider(self, now: float) -> list[Action]:
        t = self.task
        if t is None:
            return []
        if self.device_id not in t.cohort:
            return self._once(t, "not_in_cohort", Note("not_in_cohort", f"round {t.round} attempt {t.attempt}", "debug"))
        key = release_key(t.model_id, t.round)
        entry = self.entries.get(key)
        if entry is not None:
            return self._already_released(t, entry)
        if self.ledger.has_release(key):
            # Recorded but its bytes are gone (crash between ledger and outbox): never noise it again.
            return self._once(t, "already_released", self._skip(t.round, t.attempt, "already_released",
                                                                 "released before; its payload was not kept"))
        if self.training is not None:
            return []  # one run at a time; a stale run is discarded when it finishes
        if now > t.deadline:
            return self._once(t, "deadline", self._skip(t.round, t.attempt, "deadline", f"deadline {t.deadline:.0f} passed"))
        if self.model is None or self.model.round != t.model_round:
            held = "none" if self.model is None else str(self.model.round)
            return self._once(t, "waiting_for_model", Note("waiting_for_model",
                                                           f"round {t.round} needs model {t.model_round}, holding {held}"))
        why = self.eligibility()
        if why:
            # Reported once per attempt; tick() keeps re-checking until the deadline.
            return self._once(t, "ineligible", self._skip(t.round, t.attempt, "ineligible", why))
        z = t.privacy.noise_multiplier
        if not self.ledger.can_release(z):
            return self._once(t, "budget", self._skip(t.round, t.attempt, "budget",
                                                      f"one more release at z={z:g} would exceed the ε budget"))
        enc = self.encoding if self.encoding in t.encodings else (
            wire.ENCODING_F32 if wire.ENCODING_F32 in t.encodings else t.encodings[0])
        self.training = RoundSpec(
            key=key, model_id=t.model_id, round=t.round, attempt=t.attempt, model_round=t.model_round,
            update_id=wire.new_update_id(), device_id=self.device_id, topic=self.topics.update(self.device_id),
            global_tensors=self.model.tensors, train=t.train, privacy=t.privacy, encoding=enc, sdk=self.sdk)
        return [StartTraining(self.training)]

    def _already_released(self, t: wire.RoundTask, e: OutboxEntry) -> list[Action]:
        if e.update_id in self.in_flight:
            return []  # the MQTT client still holds it and delivers it
        if t.attempt > e.attempt:
            if e.model_round != t.model_round:
                return self._once(t, "already_released", self._skip(
                    t.round, t.attempt, "already_released",
                    f"released from model {e.model_round}, re-announced with model {t.model_round}"))
            # Re-announcement of a round this device already answered: same bytes again, no new noise.
            self.entries[e.key] = replace(e, attempt=t.attempt)
            return [UpdateEntry(e.update_id, attempt=t.attempt)] + self._resend(e, t.attempt)
        return []

    def _resend(self, e: OutboxEntry, attempt: int) -> list[Action]:
        self.in_flight.add(e.update_id)
        self._metrics.setdefault(e.update_id, _Metrics(e.round, attempt, True, bytes=e.size))
        return [Publish(e.update_id, e.topic)]

    def _skip(self, round_: int, attempt: int, reason: str, detail: str = "") -> Report:
        return Report(RoundResult(round=round_, attempt=attempt, status="skipped", reason=reason, detail=detail,
                                  epsilon=self.ledger.epsilon))

    def _once(self, t: wire.RoundTask, reason: str, action: Action) -> list[Action]:
        mark = (t.round, t.attempt, reason)
        if mark in self._said:
            return []
        self._said.add(mark)
        return [action]


_SHARED: "OrderedDict[tuple[wire.Limits, int, bytes], wire.ModelMessage]" = OrderedDict()
_SHARED_LOCK = threading.Lock()
_SHARED_MAX = 2


def _decode_model_shared(payload: bytes, limits: wire.Limits) -> wire.ModelMessage:
    """Decode a global model once per process: thousands of simulated devices receive the same bytes.

    The decoded arrays are shared between followers, so they are made read-only (a training run copies
    them with Bundle.join). Keyed by the payload's sha256, so only byte-identical payloads share.
    """
    digest = (limits, len(payload), hashlib.sha256(payload).digest())
    with _SHARED_LOCK:
        msg = _SHARED.get(digest)
        if msg is not None:
            _SHARED.move_to_end(digest)
            return msg
    msg = wire.decode_model(payload, limits)
    for arr in msg.tensors.values():
        arr.flags.writeable = False
    with _SHARED_LOCK:
        _SHARED[digest] = msg
        while len(_SHARED) > _SHARED_MAX:
            _SHARED.popitem(last=False)
    return msg


def _now(now: float | None) -> float:
    return time.time() if now is None else now

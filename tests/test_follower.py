"""Unit tests of the sans-I/O RoundFollower: every branch of the round decision, no broker, no ORT.

The ledger is a small fake with the same read-only surface (has_release / can_release / epsilon); the
client is simulated by applying the follower's actions to that fake (record on Release).
"""
from __future__ import annotations

import numpy as np
import pytest

from edge_sdk import wire
from edge_sdk.follower import (ForgetEntries, Note, Publish, Release, Report, RoundFollower, StartTraining,
                               TrainOutcome, UpdateEntry)
from edge_sdk.outbox import PENDING, SENT, OutboxEntry, release_key

MODEL_ID = "sha256:" + "ab" * 32
OTHER_MODEL = "sha256:" + "cd" * 32
SHAPES = {"w": (3, 2), "b": (2,)}
NOW = 1_000_000.0


class FakeLedger:
    def __init__(self, budget_releases: int = 100) -> None:
        self.keys: list[str] = []
        self.budget_releases = budget_releases

    def has_release(self, key: str) -> bool:
        return key in self.keys

    def can_release(self, z: float) -> bool:
        return z > 0 and len(self.keys) < self.budget_releases

    @property
    def epsilon(self) -> float:
        return 0.5 * len(self.keys)


def model(round_: int = 0, model_id: str = MODEL_ID, shapes=SHAPES) -> bytes:
    return wire.encode_model(wire.ModelMessage(model_id, round_, {k: np.zeros(s, np.float32) for k, s in shapes.items()},
                                               created=NOW))


def task(round_: int = 1, model_round: int = 0, cohort=("dev1", "dev2"), attempt: int = 1, model_id: str = MODEL_ID,
         z: float = 1.0, deadline: float = NOW + 60, encodings=("f32", "int8"), fleet: str = "fleet") -> bytes:
    return wire.encode_round(wire.RoundTask(
        fleet=fleet, round=round_, model_id=model_id, model_round=model_round, deadline=deadline, quorum=1,
        cohort=tuple(cohort), attempt=attempt, privacy=wire.PrivacySettings(clip_norm=1.0, noise_multiplier=z),
        encodings=tuple(encodings), issued_at=NOW))


def follower(ledger=None, eligible=lambda: None, outbox=(), encoding="f32") -> RoundFollower:
    return RoundFollower(device_id="dev1", fleet="fleet", model_id=MODEL_ID, expected=SHAPES,
                         ledger=ledger or FakeLedger(), eligibility=eligible, outbox=outbox, encoding=encoding)


def kinds(actions, cls):
    return [a for a in actions if isinstance(a, cls)]


def reasons(actions):
    return [a.reason for a in actions if isinstance(a, Note)] + \
           [a.result.reason for a in actions if isinstance(a, Report) and a.result.status == "skipped"]


def finish(f: RoundFollower, ledger: FakeLedger, payload: bytes = b"payload", now: float = NOW):
    """Complete the running training and apply the Release like the client does (ledger, then publish)."""
    spec = f.training
    acts = f.training_finished(TrainOutcome(spec.update_id, payload, 10, 0.5, 0.01), now=now)
    for a in kinds(acts, Release):
        ledger.keys.append(a.entry.key)
    return spec, acts


def test_trains_when_in_cohort_with_model_and_budget():
    f = follower()
    assert f.model_payload(model(0), now=NOW)[-1:] == [Note("model", "global model round 0", "debug")]
    acts = f.round_payload(task(), now=NOW)
    (start,) = kinds(acts, StartTraining)
    spec = start.spec
    assert (spec.round, spec.model_round, spec.key, spec.encoding) == (1, 0, release_key(MODEL_ID, 1), "f32")
    assert spec.topic == "fedatt/fleet/updates/dev1" and len(spec.update_id) == 32
    assert set(spec.global_tensors) == set(SHAPES)


def test_release_then_puback_reports_published_and_marks_sent():
    ledger = FakeLedger()
    f = follower(ledger)
    f.model_payload(model(0), now=NOW)
    f.round_payload(task(), now=NOW)
    spec, acts = finish(f, ledger)
    (rel,) = kinds(acts, Release)
    assert rel.entry.state == PENDING and rel.payload == b"payload" and rel.noise_multiplier == 1.0
    acts = f.published(spec.update_id)
    assert kinds(acts, UpdateEntry) == [UpdateEntry(spec.update_id, state=SENT)]
    (rep,) = kinds(acts, Report)
    assert rep.result.status == "published" and rep.result.num_examples == 10 and rep.result.epsilon == 0.5


def test_not_in_cohort():
    f = follower()
    f.model_payload(model(0), now=NOW)
    acts = f.round_payload(task(cohort=("dev2", "dev3")), now=NOW)
    assert not kinds(acts, StartTraining) and reasons(acts) == ["not_in_cohort"]
    assert f.round_payload(task(cohort=("dev2", "dev3")), now=NOW) == []  # retained re-delivery: quiet


def test_no_model_yet_then_model_arrives():
    f = follower()
    acts = f.round_payload(task(model_round=3), now=NOW)
    assert reasons(acts) == ["waiting_for_model"] and not kinds(acts, StartTraining)
    acts = f.model_payload(model(2), now=NOW)  # an older model than the task wants: still waiting
    assert not kinds(acts, StartTraining)
    acts = f.model_payload(model(3), now=NOW)
    assert kinds(acts, StartTraining)


def test_wrong_model_id_and_bad_tensors_are_ignored():
    f = follower()
    assert reasons(f.model_payload(model(0, model_id=OTHER_MODEL), now=NOW)) == ["model_ignored:wrong_model"]
    assert reasons(f.model_payload(model(0, shapes={"w": (3, 3), "b": (2,)}), now=NOW)) == ["model_ignored:bad_shape"]
    assert reasons(f.model_payload(model(0, shapes={"w": (3, 2)}), now=NOW)) == ["model_ignored:wrong_tensors"]
    assert reasons(f.round_payload(task(model_id=OTHER_MODEL), now=NOW)) == ["round_ignored:wrong_model"]
    assert reasons(f.round_payload(task(fleet="other"), now=NOW)) == ["round_ignored:wrong_fleet"]
    assert f.model is None and f.task is None


@pytest.mark.parametrize("payload,reason", [
    (b"\x00garbage", "bad_header"), (b"", "bad_container"), (b"{}", "bad_container"),
])
def test_malformed_model(payload, reason):
    assert reasons(follower().model_payload(payload, now=NOW)) == [f"model_ignored:{reason}"]


@pytest.mark.parametrize("payload,reason", [
    (b"not json", "bad_json"), (b'{"protocol": 2, "kind": "round"}', "bad_protocol_version"),
    (b'{"protocol": 1, "kind": "round", "cohort": "dev1"}', "bad_field"),
])
def test_malformed_round(payload, reason):
    assert reasons(follower().round_payload(payload, now=NOW)) == [f"round_ignored:{reason}"]


def test_stale_round_and_stale_model():
    f = follower()
    f.model_payload(model(5), now=NOW)
    assert reasons(f.model_payload(model(4), now=NOW)) == ["model_ignored:stale_model"]
    f.round_payload(task(round_=6, model_round=5, cohort=("dev2",)), now=NOW)
    acts = f.round_payload(task(round_=5, model_round=4), now=NOW)
    assert reasons(acts) == ["round_ignored:stale_round"] and f.task.round == 6
    f.round_payload(task(round_=6, model_round=5, attempt=2, cohort=("dev2",)), now=NOW)
    assert reasons(f.round_payload(task(round_=6, model_round=5, attempt=1), now=NOW)) == ["round_ignored:stale_round"]


def test_budget_exhausted_skips_with_reason():
    f = follower(FakeLedger(budget_releases=0))
    f.model_payload(model(0), now=NOW)
    acts = f.round_payload(task(), now=NOW)
    (rep,) = kinds(acts, Report)
    assert rep.result.status == "skipped" and rep.result.reason == "budget" and not kinds(acts, StartTraining)
    # z = 0 (no noise) can never be afforded
    f2 = follower()
    f2.model_payload(model(0), now=NOW)
    assert reasons(f2.round_payload(task(z=0.0), now=NOW)) == ["budget"]


def test_ineligible_then_eligible_on_tick():
    state = {"ok": False}
    f = follower(eligible=lambda: None if state["ok"] else "not_charging")
    f.model_payload(model(0), now=NOW)
    acts = f.round_payload(task(), now=NOW)
    (rep,) = kinds(acts, Report)
    assert (rep.result.reason, rep.result.detail) == ("ineligible", "not_charging")
    assert f.tick(now=NOW + 1) == []  # still ineligible: reported once per attempt
    state["ok"] = True
    assert kinds(f.tick(now=NOW + 2), StartTraining)


def test_deadline_passed_before_start_and_during_training():
    ledger = FakeLedger()
    f = follower(ledger)
    f.model_payload(model(0), now=NOW)
    assert reasons(f.round_payload(task(deadline=NOW - 1), now=NOW)) == ["deadline"]
    f2 = follower(ledger)
    f2.model_payload(model(0), now=NOW)
    f2.round_payload(task(deadline=NOW + 10), now=NOW)
    _, acts = finish(f2, ledger, now=NOW + 11)
    assert reasons(acts) == ["deadline"] and not kinds(acts, Release) and ledger.keys == []


def test_round_closed_while_training_discards_without_release_and_starts_next():
    ledger = FakeLedger()
    f = follower(ledger)
    f.model_payload(model(0), now=NOW)
    f.round_payload(task(round_=1, model_round=0), now=NOW)
    f.model_payload(model(1), now=NOW)
    acts = f.round_payload(task(round_=2, model_round=1), now=NOW)
    assert not kinds(acts, StartTraining)  # one run at a time
    _, acts = finish(f, ledger)
    assert reasons(acts) == ["round_closed"] and not kinds(acts, Release) and ledger.keys == []
    (start,) = kinds(acts, StartTraining)
    assert start.spec.round == 2 and start.spec.model_round == 1


def test_already_released_key_without_payload_is_never_noised_again():
    ledger = FakeLedger()
    ledger.keys.append(release_key(MODEL_ID, 1))  # crash between ledger and outbox: no bytes kept
    f = follower(ledger)
    f.model_payload(model(0), now=NOW)
    acts = f.round_payload(task(), now=NOW)
    assert reasons(acts) == ["already_released"] and not kinds(acts, StartTraining)
    assert not kinds(f.round_payload(task(attempt=2), now=NOW), StartTraining)


def test_duplicate_round_delivery_does_not_republish():
    ledger = FakeLedger()
    f = follower(ledger)
    f.model_payload(model(0), now=NOW)
    f.round_payload(task(), now=NOW)
    spec, _ = finish(f, ledger)
    assert f.round_payload(task(), now=NOW) == []  # in flight: MQTT client delivers it
    f.published(spec.update_id)
    assert f.round_payload(task(), now=NOW) == []  # retained re-delivery of the same attempt: nothing


def test_reannounce_same_round_resends_same_update():
    ledger = FakeLedger()
    f = follower(ledger)
    f.model_payload(model(0), now=NOW)
    f.round_payload(task(attempt=1), now=NOW)
    spec, _ = finish(f, ledger)
    f.published(spec.update_id)
    acts = f.round_payload(task(attempt=2), now=NOW)
    assert kinds(acts, Publish) == [Publish(spec.update_id, spec.topic)]
    assert kinds(acts, UpdateEntry) == [UpdateEntry(spec.update_id, attempt=2)]
    assert not kinds(acts, StartTraining) and ledger.keys == [spec.key]  # no new noise, no new release
    (rep,) = kinds(f.published(spec.update_id), Report)
    assert rep.result.detail == "resent" and rep.result.attempt == 2
    # a re-announcement with a different base model cannot reuse the bytes, and must not re-noise
    acts = f.round_payload(task(attempt=3, model_round=1), now=NOW)
    assert reasons(acts) == ["already_released"] and not kinds(acts, Publish) and not kinds(acts, StartTraining)


def test_restart_with_pending_entry_resends_on_connect_once():
    key = release_key(MODEL_ID, 1)
    ledger = FakeLedger()
    ledger.keys.append(key)
    entry = OutboxEntry(key=key, model_id=MODEL_ID, round=1, model_round=0, attempt=1, update_id="1" * 32,
                        topic="fedatt/fleet/updates/dev1", sha256="x", size=7, state=PENDING)
    f = follower(ledger, outbox=[entry])
    assert kinds(f.connected(now=NOW), Publish) == [Publish(entry.update_id, entry.topic)]
    assert kinds(f.connected(now=NOW), Publish) == []  # reconnect: paho re-sends its own in-flight messages
    f.model_payload(model(0), now=NOW)
    assert f.round_payload(task(), now=NOW) == []  # same round, same attempt: nothing new
    (rep,) = kinds(f.published(entry.update_id), Report)
    assert rep.result.status == "published" and rep.result.detail == "resent"


def test_restart_with_sent_entry_resends_only_on_reannounce():
    key = release_key(MODEL_ID, 1)
    ledger = FakeLedger()
    ledger.keys.append(key)
    entry = OutboxEntry(key=key, model_id=MODEL_ID, round=1, model_round=0, attempt=1, update_id="2" * 32,
                        topic="fedatt/fleet/updates/dev1", sha256="x", size=7, state=SENT)
    f = follower(ledger, outbox=[entry])
    assert f.connected(now=NOW) == []
    f.model_payload(model(0), now=NOW)
    assert f.round_payload(task(attempt=1), now=NOW) == []
    assert kinds(f.round_payload(task(attempt=2), now=NOW), Publish) == [Publish(entry.update_id, entry.topic)]


def test_next_round_forgets_old_entries_and_trains_again():
    ledger = FakeLedger()
    f = follower(ledger)
    f.model_payload(model(0), now=NOW)
    f.round_payload(task(round_=1), now=NOW)
    spec, _ = finish(f, ledger)
    f.published(spec.update_id)
    f.model_payload(model(1), now=NOW)
    acts = f.round_payload(task(round_=2, model_round=1), now=NOW)
    assert kinds(acts, ForgetEntries) == [ForgetEntries((spec.update_id,))]
    (start,) = kinds(acts, StartTraining)
    assert start.spec.update_id != spec.update_id and f.entries == {}


def test_budget_checked_again_after_training():
    ledger = FakeLedger(budget_releases=1)
    f = follower(ledger)
    f.model_payload(model(0), now=NOW)
    f.round_payload(task(), now=NOW)
    ledger.keys.append("something-else")  # budget spent meanwhile
    _, acts = finish(f, ledger)
    assert reasons(acts) == ["budget"] and not kinds(acts, Release)


def test_release_failed_and_training_failed_are_skips():
    ledger = FakeLedger()
    f = follower(ledger)
    f.model_payload(model(0), now=NOW)
    f.round_payload(task(), now=NOW)
    spec = f.training
    acts = f.training_finished(TrainOutcome(spec.update_id, b"p", 1, 0.1, 0.0), now=NOW)
    assert kinds(acts, Release)
    acts = f.release_failed(spec.update_id, "budget", "ledger refused")
    assert reasons(acts) == ["budget"] and f.entries == {} and f.in_flight == set()
    # a failed run (e.g. NaN loss) is a skip; a re-announcement may try again (nothing was released)
    acts = f.round_payload(task(attempt=2), now=NOW)
    spec2 = kinds(acts, StartTraining)[0].spec
    assert reasons(f.training_failed(spec2.update_id, "FloatingPointError", now=NOW)) == ["training_failed"]
    assert reasons(f.training_finished(TrainOutcome("0" * 32, b"p", 1, 0.1, 0.0), now=NOW)) == ["training_result_ignored"]


def test_encoding_preference_and_fallback():
    f = follower(encoding="int8")
    f.model_payload(model(0), now=NOW)
    assert kinds(f.round_payload(task(), now=NOW), StartTraining)[0].spec.encoding == "int8"
    f2 = follower(encoding="int8")
    f2.model_payload(model(0), now=NOW)
    assert kinds(f2.round_payload(task(encodings=("f32",)), now=NOW), StartTraining)[0].spec.encoding == "f32"


def test_too_large_update_is_not_released():
    ledger = FakeLedger()
    f = follower(ledger)
    f.model_payload(model(0), now=NOW)
    f.round_payload(task(), now=NOW)
    _, acts = finish(f, ledger, payload=b"x" * (wire.DEFAULT_LIMITS.max_tensor_message_bytes + 1))
    assert reasons(acts) == ["too_large"] and ledger.keys == []


def test_outbox_persists_atomically_and_drops_damaged_entries(tmp_path):
    from edge_sdk.outbox import Outbox

    box = Outbox(tmp_path)
    e = OutboxEntry(key=release_key(MODEL_ID, 1), model_id=MODEL_ID, round=1, model_round=0, attempt=1,
                    update_id="a" * 32, topic="fedatt/fleet/updates/dev1", sha256="", size=0)
    stored = box.put(e, b"released bytes")
    box.update(e.update_id, state=SENT, attempt=2)
    (again,) = Outbox(tmp_path).entries()  # a restart sees the same entry and bytes
    assert again == OutboxEntry(**{**stored.__dict__, "state": SENT, "attempt": 2})
    assert Outbox(tmp_path).payload(e.update_id) == b"released bytes"
    (tmp_path / ("b" * 32 + ".update")).write_bytes(b"orphan: written before a crash, never indexed")
    (tmp_path / f"{e.update_id}.update").write_bytes(b"tampered")
    box = Outbox(tmp_path)
    assert box.entries() == [] and list(tmp_path.glob("*.update")) == []
    (tmp_path / "index.json").write_text("{not json")
    assert Outbox(tmp_path).entries() == []  # an unreadable index is dropped, never trusted

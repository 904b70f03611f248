"""The sans-I/O round engine (broker/rounds.py), driven with events: rounds, quorum misses, rejections, restarts.

No broker: payloads are real wire messages, aggregation is the real broker/strategies.py, checkpoints are real
files in tmp_path (broker/state.py). Times are plain floats passed as `now`.
"""
from __future__ import annotations

import math
import random
import secrets

import numpy as np
import pytest

from broker import rounds
from broker.rounds import (Accepted, ConfigError, EngineConfig, LogEvent, Publish, Rejected, RoundAnnounced,
                           RoundClosed, RoundEngine, SaveCheckpoint, execute)
from broker.state import CheckpointStore
from broker.strategies import fedavg_direct, make_aggregator
from edge_sdk import wire

MID = "sha256:" + "ab" * 32
OTHER_MID = "sha256:" + "cd" * 32
SHAPES = {"w": (4, 3), "b": (3,)}
T0 = 1_000_000.0
TOPICS = wire.Topics("f1")


def initial_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def delta(seed: int, norm: float = 0.5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    n = math.sqrt(sum(float((v ** 2).sum()) for v in raw.values()))
    return {k: (v * norm / n).astype(np.float32) for k, v in raw.items()}


def upd(device: str, rnd: int, tensors=None, *, seed: int | None = None, model_id: str = MID, clip: float = 1.0,
        z: float = 0.0, update_id: str | None = None, num_examples: int = 10, payload_device: str | None = None,
        encoding: str = "f32") -> bytes:
    if tensors is None:
        tensors = delta(seed if seed is not None else hash((device, rnd)) % 1000)
    msg = wire.UpdateMessage(model_id=model_id, round=rnd, device_id=payload_device or device,
                             update_id=update_id or secrets.token_hex(16), num_examples=num_examples,
                             clip_norm=clip, noise_multiplier=z, encoding=encoding, tensors=tensors)
    quantized = None
    if encoding == "int8":
        from edge_sdk.compression import quantize_int8
        quantized = {k: quantize_int8(v) for k, v in tensors.items()}
    return wire.encode_update(msg, quantized)


def config(**kw) -> EngineConfig:
    base = dict(fleet="f1", model_id=MID, strategy="fedavg", quorum=3, over_selection=1.5, round_timeout_s=30.0)
    base.update(kw)
    return EngineConfig(**base)


def engine(n_online: int = 6, *, checkpoint=None, seed: int = 0, **kw) -> RoundEngine:
    e = RoundEngine(config(**kw), initial_model(), checkpoint=checkpoint, rng=random.Random(seed))
    for i in range(n_online):
        e.device_online(f"d{i}", T0)
    return e


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def announced(actions) -> wire.RoundTask:
    [a] = of(actions, RoundAnnounced)
    # The retained publish carries exactly the task the action reports.
    [p] = [p for p in of(actions, Publish) if p.topic == TOPICS.round]
    assert p.retain and p.qos == 1 and wire.decode_round(p.payload).cohort == a.task.cohort
    return a.task


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("bad", [dict(quorum=0), dict(over_selection=0.9), dict(min_online=2),
                                 dict(strategy="nope"), dict(round_timeout_s=0), dict(max_attempts=0),
                                 dict(model_id="sha256:xyz"), dict(fleet="a/b"), dict(encodings=("zip",)),
                                 dict(max_update_bytes=10), dict(privacy=wire.PrivacySettings(clip_norm=0)),
                                 dict(privacy=wire.PrivacySettings(adjacency="swap")),
                                 dict(train=wire.TrainSettings(epochs=0))])
def test_config_is_validated_once(bad):
    with pytest.raises(ConfigError):
        config(**bad)


def test_strategy_params_are_validated_at_construction():
    with pytest.raises(ConfigError):
        RoundEngine(config(strategy="fedatt", strategy_params={"eps": -1}), initial_model())
    with pytest.raises(ConfigError):
        RoundEngine(config(strategy="fedavg", strategy_params={"bogus": 1}), initial_model())


# ------------------------------------------------------------------------------------------------ cohort
def test_cohort_is_secure_random_subset_of_online_and_over_selected():
    e = RoundEngine(config(quorum=3, over_selection=1.5), initial_model())
    assert isinstance(e._rng, secrets.SystemRandom)
    for i in range(10):
        e.device_online(f"d{i}", T0)
    e.device_offline("d3", T0)
    e.device_offline("d7", T0)
    cohorts = set()
    for _ in range(20):
        e._round = None
        task = announced(e.start(T0))
        assert len(task.cohort) == math.ceil(3 * 1.5) == 5
        assert set(task.cohort) <= {f"d{i}" for i in range(10)} - {"d3", "d7"}
        assert len(set(task.cohort)) == 5 and task.quorum == 3
        cohorts.add(frozenset(task.cohort))
    assert len(cohorts) > 1  # really random


def test_cohort_capped_by_online_count():
    e = engine(4)  # target 5, only 4 online
    task = announced(e.start(T0))
    assert sorted(task.cohort) == ["d0", "d1", "d2", "d3"]


def test_no_round_until_min_online():
    e = engine(2, min_online=3)
    acts = e.start(T0)
    assert not of(acts, RoundAnnounced)
    assert [p.topic for p in of(acts, Publish)] == [TOPICS.model]  # the retained model is (re)published anyway
    assert wire.decode_model(of(acts, Publish)[0].payload).round == 0
    # An update with no round open is refused.
    [rej] = of(e.update_received("d0", upd("d0", 1), T0 + 1), Rejected)
    assert rej.reason == "no_round"
    assert e.device_online("d2", T0 + 2) == []  # status events never announce: tick does
    task = announced(e.tick(T0 + 2))
    assert task.round == 1 and task.model_round == 0 and task.attempt == 1
    assert task.deadline == T0 + 2 + 30.0


# ------------------------------------------------------------------------------------------------ rounds
def run_round(e: RoundEngine, task: wire.RoundTask, now: float, devices=None, seed0: int = 0):
    """Every (given) cohort member sends an honest update; returns (actions, {device: tensors})."""
    acts, sent = [], {}
    for j, d in enumerate(devices if devices is not None else task.cohort):
        sent[d] = delta(seed0 + j)
        acts += e.update_received(d, upd(d, task.round, sent[d], num_examples=10 + j), now + j)
    return acts, sent


def test_round_closes_when_all_report_and_model_follows_fedavg():
    e = engine(5)
    g0 = e.global_model
    task = announced(e.start(T0))
    acts, sent = run_round(e, task, T0 + 1)
    ns = [10 + j for j in range(len(task.cohort))]
    expected = fedavg_direct(g0, [sent[d] for d in task.cohort], ns)
    for k in SHAPES:
        np.testing.assert_allclose(e.global_model[k], expected[k], rtol=1e-6, atol=1e-7)
    # Order: accepted updates, then the commit point, then the model, the summary, and the next round.
    kinds = [type(a).__name__ for a in acts if not isinstance(a, LogEvent)]
    assert kinds == ["Accepted"] * 5 + ["SaveCheckpoint", "Publish", "Publish", "RoundClosed", "Publish",
                                        "RoundAnnounced"]
    save = of(acts, SaveCheckpoint)[0]
    assert save.checkpoint.round == 1
    model_pub, summary_pub = [p for p in of(acts, Publish) if p.topic in (TOPICS.model, TOPICS.summary)]
    assert model_pub.topic == TOPICS.model and model_pub.retain and summary_pub.retain
    m = wire.decode_model(model_pub.payload)
    assert m.round == 1 and m.model_id == MID
    for k in SHAPES:
        np.testing.assert_array_equal(m.tensors[k], e.global_model[k])
        np.testing.assert_array_equal(save.checkpoint.model[k], e.global_model[k])
    s = wire.decode_summary(summary_pub.payload)
    assert s.round == 1 and set(s.participants) == set(task.cohort) and s.attempt == 1
    assert s.rejections == {} and s.late == 0 and s.duplicates == 0
    assert s.bytes_in == sum(a.nbytes for a in of(acts, Accepted))
    assert sum(w["w"] for w in s.weights.values()) == pytest.approx(1.0)
    assert s.duration_s == pytest.approx(5.0)  # last update at T0 + 1 + 4
    nxt = announced(acts)
    assert nxt.round == 2 and nxt.model_round == 1
    assert e.registry[task.cohort[0]]["participations"] == 1


@pytest.mark.parametrize("strategy, params", [("fedatt", {"eps": 1.2}), ("fedatt-noise-aware", {}),
                                              ("median", {}), ("trimmed_mean", {"beta": 0.2})])
def test_model_changes_as_the_strategy_says(strategy, params):
    e = engine(5, strategy=strategy, strategy_params=params, privacy=wire.PrivacySettings(noise_multiplier=0.1))
    ref_state: dict = {}
    for rnd in (1, 2):  # two rounds: the noise-aware rule carries state from round 1 into round 2
        g = e.global_model
        task = e.current_task or announced(e.start(T0))
        sent = {}
        for j, d in enumerate(task.cohort):
            t = {k: v + np.float32(0.1) * np.random.default_rng(100 * rnd + j).standard_normal(v.shape)
                 .astype(np.float32) for k, v in delta(rnd * 10 + j).items()}
            sent[d] = t
            e.update_received(d, upd(d, rnd, t, z=0.1), T0 + rnd * 100 + j)
        ref = make_aggregator(strategy, g, **params)
        if ref_state:
            ref.load_state_dict(ref_state)
        for d in task.cohort:  # same arrival order as the engine saw
            ref.add(d, sent[d], num_examples=10, noise_std=0.1)
        expected, _ = ref.finalize()
        ref_state = ref.state_dict()
        assert e.model_round == rnd
        for k in SHAPES:
            np.testing.assert_allclose(e.global_model[k], expected[k], rtol=1e-6, atol=1e-7)


def test_stop_after_announces_no_round_past_the_limit():
    """A fixed-length run (--max-rounds) must not invite a cohort to a round nobody will aggregate."""
    e = engine(5)
    e.stop_after(2)
    task = announced(e.start(T0))
    acts, _ = run_round(e, task, T0 + 1)
    task2 = announced(acts)
    acts, _ = run_round(e, task2, T0 + 10)
    assert e.model_round == 2 and of(acts, RoundClosed) and not of(acts, RoundAnnounced)
    assert not of(e.tick(T0 + 100), RoundAnnounced) and not of(e.start(T0 + 101), RoundAnnounced)
    e.stop_after(None)
    assert announced(e.tick(T0 + 102)).round == 3
    with pytest.raises(ConfigError):
        e.stop_after(-1)


def test_deadline_closes_with_quorum_only_when_due():
    e = engine(5)
    task = announced(e.start(T0))
    run_round(e, task, T0 + 1, devices=task.cohort[:3])
    assert e.tick(T0 + 29.9) == []
    acts = e.tick(T0 + 30.0)
    [closed] = of(acts, RoundClosed)
    assert set(closed.summary.participants) == set(task.cohort[:3])
    assert e.model_round == 1


def test_quorum_miss_reannounces_with_attempt_2_and_topped_up_cohort():
    e = engine(8, quorum=3, over_selection=1.0)  # cohort of exactly 3 so a miss is easy to stage
    g0 = e.global_model
    task = announced(e.start(T0))
    _, sent = run_round(e, task, T0 + 1, devices=task.cohort[:2])  # 2 of 3: quorum missed
    e.device_offline(task.cohort[2], T0 + 5)
    acts = e.tick(T0 + 30)
    assert not of(acts, RoundClosed)
    t2 = announced(acts)
    assert (t2.round, t2.attempt, t2.model_round) == (1, 2, 0)
    assert t2.deadline == T0 + 60
    assert set(task.cohort) < set(t2.cohort)  # old members stay invited, new ones added
    added = [d for d in t2.cohort if d not in task.cohort]
    assert len(added) == 1 and added[0] in e.online  # ceil((3 − 2) × 1.0) outstanding needed, none left online
    # Accepted updates were kept: one more from the new invitee reaches the quorum.
    new = added[0]
    sent[new] = delta(99)
    e.update_received(new, upd(new, 1, sent[new], num_examples=10), T0 + 40)
    acts = e.tick(T0 + 60)
    [closed] = of(acts, RoundClosed)
    assert closed.summary.attempt == 2 and set(closed.summary.participants) == set(sent)
    assert closed.summary.duration_s == pytest.approx(60.0)  # counted from the first announcement
    expected = fedavg_direct(g0, list(sent.values()), [10, 11, 10])  # run_round sends 10 + j examples
    for k in SHAPES:
        np.testing.assert_allclose(e.global_model[k], expected[k], rtol=1e-6, atol=1e-7)
    assert e.totals["reannounced"] == 1


def test_max_attempts_abandons_round_and_invites_others():
    e = engine(6, quorum=3, over_selection=1.0, max_attempts=1)
    g0 = e.global_model
    task = announced(e.start(T0))
    run_round(e, task, T0 + 1, devices=task.cohort[:1])
    acts = e.tick(T0 + 30)
    assert any(isinstance(a, LogEvent) and a.event == "round_abandoned" for a in acts)
    t2 = announced(acts)
    assert (t2.round, t2.attempt) == (1, 2)
    assert task.cohort[0] not in t2.cohort  # it spent privacy budget on round 1 already
    for k in SHAPES:
        np.testing.assert_array_equal(e.global_model[k], g0[k])
    assert e.totals["abandoned"] == 1


def test_max_attempts_counts_from_each_fresh_start():
    e = engine(12, quorum=3, over_selection=1.0, max_attempts=2)
    t = announced(e.start(T0))
    attempts = [t.attempt]
    for k in range(1, 4):  # nobody answers: re-announce, abandon, re-announce
        t = announced(e.tick(T0 + 30 * k))
        attempts.append(t.attempt)
    assert attempts == [1, 2, 3, 4] and e.totals["abandoned"] == 1 and e.totals["reannounced"] == 2


def test_rejection_as_last_answer_closes_the_round_early():
    e = engine(4, quorum=3, over_selection=1.0)
    task = announced(e.start(T0))
    run_round(e, task, T0 + 1, devices=task.cohort)  # all three accepted: closes
    assert e.model_round == 1
    e2 = engine(4, quorum=2, over_selection=1.5)
    t = announced(e2.start(T0))
    assert len(t.cohort) == 3
    run_round(e2, t, T0 + 1, devices=t.cohort[:2])
    assert e2.model_round == 0  # the third invitee may still answer
    acts = e2.update_received(t.cohort[2], upd(t.cohort[2], 1, delta(1, norm=40.0)), T0 + 5)
    assert [a.reason for a in of(acts, Rejected)] == ["norm_bound"]
    assert of(acts, RoundClosed) and e2.model_round == 1


def test_rejections_are_counted_while_honest_devices_close_the_round():
    # over_selection 2 with 6 online: the cohort is every online device, so the bad senders are invited.
    e = engine(6, quorum=3, over_selection=2.0, max_update_bytes=4096, encodings=("f32",))
    g0 = e.global_model
    task = announced(e.start(T0))
    assert sorted(task.cohort) == [f"d{i}" for i in range(6)]
    e.device_online("x9", T0)  # online but not invited
    honest = ["d0", "d1", "d2"]
    now = T0 + 1
    bad = [
        ("d3", upd("d3", 1, model_id=OTHER_MID), "wrong_model"),
        ("d3", upd("d3", 1, payload_device="d4"), "device_mismatch"),
        ("d3", upd("d3", 7), "stale_round"),
        ("d3", upd("d3", 1, {"w": np.full((4, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)}),
         "non_finite"),
        ("d4", upd("d4", 1, {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32),
                             "pad": np.zeros(2000, np.float32)}), "too_large"),
        ("d4", upd("d4", 1, {"w": np.zeros((3, 4), np.float32), "b": np.zeros(3, np.float32)}), "bad_shape"),
        ("d4", upd("d4", 1, {"w": np.zeros((4, 3), np.float32)}), "wrong_tensors"),
        ("d5", upd("d5", 1, delta(5, norm=50.0)), "norm_bound"),
        ("d5", upd("d5", 1, clip=3.0), "bad_privacy"),
        ("d5", upd("d5", 1, encoding="int8"), "bad_encoding"),
        ("x9", upd("x9", 1), "not_in_cohort"),
    ]
    for d, data, _ in bad:
        e.update_received(d, data, now)
    assert e.current_task is not None  # the honest devices have not reported yet
    sent = {}
    for j, d in enumerate(honest):
        sent[d] = delta(j)
        resend = upd(d, 1, sent[d], update_id="e" * 32)
        acts = e.update_received(d, resend, now + 1 + j)
        if d == "d0":  # the device restarts and re-sends the identical bytes: dropped as a duplicate
            [dup] = of(e.update_received(d, resend, now + 1.5), Rejected)
            assert dup.reason == "duplicate" and "identical" in dup.detail
    [closed] = of(acts, RoundClosed)  # every cohort member has answered, quorum met: closes at once
    s = closed.summary
    assert set(s.participants) == set(honest)
    expected_reasons: dict[str, int] = {}
    for *_, r in bad:
        expected_reasons[r] = expected_reasons.get(r, 0) + 1
    expected_reasons["duplicate"] = 1
    assert s.rejections == expected_reasons
    assert s.duplicates == 1 and s.late == 0
    assert e.totals["rejections"] == expected_reasons and e.totals["accepted"] == 3
    assert e.registry["d5"]["rejections"] == {"norm_bound": 1, "bad_privacy": 1, "bad_encoding": 1}
    # Rejected input left no trace in the model: it is exactly FedAvg of the honest three.
    expected = fedavg_direct(g0, [sent[d] for d in honest], [10] * 3)
    for k in SHAPES:
        np.testing.assert_allclose(e.global_model[k], expected[k], rtol=1e-6, atol=1e-7)


def test_late_update_is_dropped_and_counted_in_the_next_summary():
    e = engine(5)
    task = announced(e.start(T0))
    run_round(e, task, T0 + 1, devices=task.cohort[:3])
    straggler = task.cohort[3]
    slow = upd(straggler, 1)
    acts = e.update_received(straggler, slow, T0 + 31)  # after the deadline: the round closes first
    assert of(acts, RoundClosed) and e.model_round == 1
    [rej] = of(acts, Rejected)
    assert (rej.reason, rej.late) == ("stale_round", True)
    t2 = e.current_task
    acts, _ = run_round(e, t2, T0 + 40)
    [closed] = of(acts, RoundClosed)
    assert closed.summary.round == 2 and closed.summary.late == 1
    assert closed.summary.rejections == {"stale_round": 1}
    assert e.totals["late"] == 1


def test_second_different_update_from_same_device_is_a_duplicate():
    e = engine(5)
    task = announced(e.start(T0))
    d = task.cohort[0]
    e.update_received(d, upd(d, 1, seed=1), T0 + 1)
    [rej] = of(e.update_received(d, upd(d, 1, seed=2), T0 + 2), Rejected)
    assert rej.reason == "duplicate" and "different update_id" in rej.detail


def test_status_messages_drive_presence():
    e = engine(0)
    st = wire.encode_status(wire.Status("d1", "online", ts=T0))
    assert e.status_received("d1", st, T0) == [] and e.online == {"d1"}
    [warn] = e.status_received("d2", st, T0)  # payload says d1 on d2's topic: ignored
    assert isinstance(warn, LogEvent) and warn.fields["why"] == "device_mismatch" and e.online == {"d1"}
    e.status_received("d1", wire.encode_status(wire.Status("d1", "offline", ts=T0)), T0 + 1)
    assert e.online == set() and e.registry["d1"]["online"] is False
    e.status_received("d1", b"", T0 + 2)  # a cleared retained status
    assert e.online == set()
    [bad] = e.status_received("d1", b"{", T0 + 3)
    assert bad.fields["why"] == "bad_json"


# ------------------------------------------------------------------------------------------ restart/commit
def drive(e: RoundEngine, actions, store: CheckpointStore, published: list) -> None:
    execute(actions, publish=published.append, save=store.save)


def test_restart_mid_round_resumes_after_last_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    pub: list[Publish] = []
    e = engine(5)
    task = announced(acts := e.start(T0))
    drive(e, acts, store, pub)
    acts, _ = run_round(e, task, T0 + 1)
    drive(e, acts, store, pub)
    model1 = e.global_model
    model_bytes = [p.payload for p in pub if p.topic == TOPICS.model][-1]
    t2 = e.current_task
    in_flight = upd(t2.cohort[0], 2, seed=77, update_id="c" * 32)
    drive(e, e.update_received(t2.cohort[0], in_flight, T0 + 20), store, pub)
    # kill -9 here: round 2 had one accepted update in memory only.
    ckpt = store.load()
    assert ckpt is not None and ckpt.round == 1
    e2 = engine(5, checkpoint=ckpt, seed=1)
    acts = e2.start(T0 + 100)
    model_pub = [p for p in of(acts, Publish) if p.topic == TOPICS.model]
    # The same retained model after the restart: same round, tensors and creation time (safetensors orders
    # metadata keys arbitrarily, so the bytes may differ; the content may not).
    before, after = wire.decode_model(model_bytes), wire.decode_model(model_pub[0].payload)
    assert (after.round, after.created, after.model_id) == (before.round, before.created, before.model_id) == (
        1, before.created, MID)
    for k in SHAPES:
        np.testing.assert_array_equal(after.tensors[k], before.tensors[k])
    t2b = announced(acts)
    assert (t2b.round, t2b.model_round, t2b.attempt) == (2, 1, 1)
    for k in SHAPES:
        np.testing.assert_array_equal(e2.global_model[k], model1[k])
    # A device re-sending its round-2 bytes after the restart is accepted if invited again.
    if t2.cohort[0] in t2b.cohort:
        assert of(e2.update_received(t2.cohort[0], in_flight, T0 + 101), Accepted)
    assert e2.registry[task.cohort[0]]["participations"] == 1
    assert e2.totals["rounds_closed"] == 1


@pytest.mark.parametrize("crash_after", ["nothing", "save"])
def test_crash_around_commit_point_never_applies_a_round_twice(tmp_path, crash_after):
    store = CheckpointStore(tmp_path / "ckpt")
    e = engine(5)
    task = announced(e.start(T0))
    acts, sent = run_round(e, task, T0 + 1)
    closing = [a for a in acts if isinstance(a, (SaveCheckpoint, Publish, RoundClosed))]
    assert isinstance(closing[0], SaveCheckpoint)
    if crash_after == "save":
        store.save(closing[0].checkpoint)  # committed, then killed before publishing
    ckpt = store.load()
    e2 = engine(5, checkpoint=ckpt)
    t = announced(e2.start(T0 + 100))
    if crash_after == "save":
        # Round 1 is committed: the restart announces round 2 on top of it (round 1 is not re-run).
        assert ckpt.round == 1 and (t.round, t.model_round) == (2, 1)
        # The summary that the kill kept from going out is re-published, byte for byte, from the checkpoint.
        [closed1] = of(acts, RoundClosed)
        summaries = [p.payload for p in of(e2.start(T0 + 100), Publish) if p.topic == TOPICS.summary]
        assert summaries == [wire.encode_summary(closed1.summary)]
    else:
        # Nothing committed: round 1 is run again from the initial model, so it is applied exactly once.
        assert ckpt is None and (t.round, t.model_round) == (1, 0)
        acts2, _ = run_round(e2, t, T0 + 101)
        execute(acts2, publish=lambda p: None, save=store.save)
        assert store.load().round == 1
    # Rounds strictly increase across the restart: the next close is round 2 in both cases, checkpointed once.
    acts3, _ = run_round(e2, e2.current_task, T0 + 200, seed0=50)
    [closed] = of(acts3, RoundClosed)
    assert closed.summary.round == e2.model_round == 2
    execute(acts3, publish=lambda p: None, save=store.save)
    assert store.load().round == 2
    assert [h["round"] for h in store.load().history] == [1, 2]


def test_failed_save_stops_execution_before_any_publish(tmp_path):
    e = engine(5)
    task = announced(e.start(T0))
    acts, _ = run_round(e, task, T0 + 1)
    published: list = []

    def failing_save(ckpt):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        execute(acts, publish=published.append, save=failing_save)
    assert all(p.topic != TOPICS.model for p in published) and not any(p.topic == TOPICS.summary
                                                                       for p in published)


def test_restore_refuses_another_fleet_or_model(tmp_path):
    e = engine(5)
    ckpt = e.checkpoint(T0)
    with pytest.raises(ConfigError):
        RoundEngine(config(model_id=OTHER_MID), initial_model(), checkpoint=ckpt)
    with pytest.raises(ConfigError):
        RoundEngine(config(), {"w": np.zeros((2, 2), np.float32)}, checkpoint=ckpt)


def test_start_again_republishes_open_round_unchanged():
    e = engine(5)
    task = announced(e.start(T0))
    acts = e.start(T0 + 5)  # e.g. after a broker restart that lost retained messages
    assert not of(acts, RoundAnnounced)
    rounds_pub = [p for p in of(acts, Publish) if p.topic == TOPICS.round]
    assert wire.decode_round(rounds_pub[0].payload) == task


def test_engine_is_fast():
    # Sans-I/O: 20 rounds of a 20-device cohort take well under a second (the limit is generous for CI).
    import time
    e = engine(20, quorum=10, over_selection=2.0, round_timeout_s=1e6)
    t = announced(e.start(T0))
    start = time.perf_counter()
    for r in range(20):
        acts, _ = run_round(e, t, T0 + 100 * r, seed0=r)
        t = announced(acts)
    assert e.model_round == 20 and time.perf_counter() - start < 5.0


def test_log_events_are_structured(caplog):
    e = engine(5)
    with caplog.at_level("INFO", logger="broker.rounds"):
        execute(e.start(T0), publish=lambda p: None, save=lambda c: None)
    rec = [r for r in caplog.records if r.getMessage() == "round_announced"][0]
    assert rec.fedatt["round"] == 1 and rec.fedatt["event"] == "round_announced"
    assert rounds.log.name == "broker.rounds"

"""Fault injection against real processes (issue 6): broker SIGKILL, aggregator kill -9, device kill -9, disk full.

* Mosquitto killed with SIGKILL mid-round (devices are publishing into the dead connection) and restarted on the
  same port: devices and aggregator reconnect, every QoS 1 update is accepted exactly once (duplicates are
  counted and dropped), the round and the next one complete.
* `fedatt aggregate` (a subprocess) killed with SIGKILL at seeded random times, several times in a row, each
  restart resuming from its checkpoint: the published model rounds increase by exactly one, every round's model
  is published with identical bytes (never applied twice), the checkpoint always equals the model published
  right after the restart, and at the end equals the last retained model.
* `fedatt device` (a subprocess) killed mid-training and right after its privacy-ledger write (mid-publish),
  then restarted: ledger intact with one entry per round, no second noise draw, at most one update per
  (device, round) accepted.
* Checkpoint writes failing with ENOSPC (in-process) or a state "directory" that is a file (CLI): a clear error,
  nothing of the failed round published, the previous checkpoint intact, and a restart resumes.
Uses tests/test_aggregator_mqtt.py's fixtures (three-client data, MLP bundle, Mosquitto with deploy/'s ACL).
"""
from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from broker.rounds import EngineConfig
from broker.service import AggregatorService, MqttSettings
from broker.state import CheckpointError, CheckpointStore
from edge_sdk import wire
from edge_sdk.client import EdgeClient, run_training_job
from edge_sdk.config import ClientConfig
from edge_sdk.privacy import PrivacyLedger
from tests.polling import wait_for
from tests.test_aggregator_mqtt import DEVICES, FLEET, Observer, bundle, data, engine_config, secure_broker  # noqa: F401

pytestmark = pytest.mark.mosquitto

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
FIGURES: dict = {}


def devices(tmp_path, broker, creds, bundle, data, runner=None, names=DEVICES, fleet=FLEET) -> list[EdgeClient]:
    out = []
    for name, cid in zip(names, sorted(data.clients)):
        cfg = ClientConfig(device_id=name, fleet=fleet, broker=broker.url, state_dir=tmp_path / "devices" / name,
                           username=name, password=creds[name], epsilon_budget=1e9, reconnect_min=0.2,
                           reconnect_max=1.0, tick_interval=0.3)
        out.append(EdgeClient(cfg, bundle, data.clients[cid], runner=runner).start())
    return out


def agg_settings(broker, creds) -> MqttSettings:
    return MqttSettings(broker.url, "fedatt-aggregator", creds["fedatt-aggregator"])


def ledger_keys(client: EdgeClient) -> list[str]:
    return [r.key for r in client.ledger.releases]


# ------------------------------------------------------------------------------------------ broker SIGKILL
def test_broker_sigkill_mid_round_updates_arrive_exactly_once(tmp_path, secure_broker, bundle, data):
    broker, creds = secure_broker
    gate, training = threading.Event(), set()
    lock = threading.Lock()

    def gated(job):  # round 2: hold every device's release until the broker has been killed
        if job.spec.round == 2:
            with lock:
                training.add(job.spec.device_id)
            assert gate.wait(60)
        return run_training_job(job)

    service = AggregatorService(engine_config(bundle, round_timeout_s=8.0), bundle, tmp_path / "state",
                                agg_settings(broker, creds), max_rounds=3)
    clients = []
    try:
        service.start()
        clients = devices(tmp_path, broker, creds, bundle, data, runner=gated)
        assert service.wait_for_round(1, timeout=60)
        wait_for(lambda: len(training) == 3, 30, "all devices training round 2")
        broker.stop(kill=True)  # SIGKILL: no clean shutdown, persistence only as of the last autosave
        killed_at = time.monotonic()
        gate.set()  # devices release and publish into dead connections; paho keeps the QoS 1 messages
        wait_for(lambda: all(len(c.ledger.releases) == 2 for c in clients), 30, "round-2 releases")
        time.sleep(0.5)
        broker.start()
        assert service.wait_for_round(3, timeout=90), f"stuck at round {service.model_round}"
        recovered_s = time.monotonic() - killed_at
    finally:
        gate.set()
        for c in clients:
            c.stop()
        service.stop()
    rounds = [s.round for s in service.summaries]
    assert rounds == [1, 2, 3]
    assert all(sorted(s.participants) == DEVICES for s in service.summaries)
    totals = service.engine.totals
    assert totals["accepted"] == 9, totals  # 3 rounds x 3 devices, each accepted exactly once
    assert all(service.engine.registry[d]["accepted"] == 3 for d in DEVICES)
    for c in clients:
        keys = ledger_keys(c)
        assert len(keys) == 3 and len(set(keys)) == 3
    FIGURES["broker_kill"] = {"recovered_s": round(recovered_s, 2), "duplicates": totals["duplicates"],
                              "round2_attempt": service.summaries[1].attempt}
    print(f"\nbroker SIGKILL mid-round: recovered (round 2 and 3 closed) {recovered_s:.1f}s after the kill; "
          f"{totals['duplicates']} duplicate(s) dropped; round 2 closed at attempt {service.summaries[1].attempt}")


# -------------------------------------------------------------------------------------- aggregator kill -9
def aggregate_cmd(broker, bundle, state: Path, pwfile: Path, fleet: str = FLEET, timeout: float = 3.0) -> list[str]:
    return [sys.executable, "-m", "edge_sdk.cli", "aggregate", "--broker", broker.url, "--username",
            "fedatt-aggregator", "--password-file", str(pwfile), "--bundle", str(bundle.path), "--state", str(state),
            "--fleet", fleet, "--strategy", "fedatt-noise-aware", "--quorum", "3", "--over-selection", "1",
            "--round-timeout", str(timeout), "--epochs", "1", "--batch-size", "16", "--lr", "0.05",
            "--clip-norm", "2.0", "--noise-multiplier", "0.02"]


def decoded_models(observer: Observer, since: int = 0) -> list[wire.ModelMessage]:
    return [wire.decode_model(p) for t, p, _ in observer.messages[since:] if t.endswith("/model")]


def test_aggregator_kill9_at_random_points_resumes_without_losing_or_repeating_rounds(tmp_path, secure_broker,
                                                                                        bundle, data):
    broker, creds = secure_broker
    pwfile = tmp_path / "agg.password"
    pwfile.write_text(creds["fedatt-aggregator"] + "\n")
    state = tmp_path / "state"
    store = CheckpointStore(state / "checkpoints")
    observer = Observer(broker, creds["observer"], [f"fedatt/{FLEET}/model", f"fedatt/{FLEET}/metrics"])
    clients = devices(tmp_path, broker, creds, bundle, data)
    rnd = random.Random(20240601)
    kills, restarts = [], []
    proc = None
    try:
        for i in range(5):
            ckpt = store.load()
            mark = len(observer.messages)
            started = time.monotonic()
            proc = subprocess.Popen(aggregate_cmd(broker, bundle, state, pwfile), cwd=ROOT, env=ENV,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            # The first model published after a restart is the checkpointed one.
            wait_for(lambda: decoded_models(observer, mark), 30, "model published after (re)start")
            first = decoded_models(observer, mark)[0]
            restarts.append(time.monotonic() - started)
            if ckpt is not None:
                assert first.round == ckpt.round
                assert all(np.array_equal(first.tensors[k], ckpt.model[k]) for k in ckpt.model)
            else:
                assert first.round == 0
            time.sleep(rnd.uniform(1.0, 6.0))
            seen_before = max(m.round for m in decoded_models(observer))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            after = store.load()
            # The checkpoint is the last published model, or the one about to be published when the kill came.
            assert after is not None and after.round in (seen_before, seen_before + 1), (after and after.round,
                                                                                          seen_before)
            kills.append(after.round)
        proc = subprocess.Popen(aggregate_cmd(broker, bundle, state, pwfile) + ["--max-rounds", "2"], cwd=ROOT,
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
        time.sleep(0.3)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        for c in clients:
            c.stop()
        observer.close()
    models = decoded_models(observer)
    distinct = [m.round for i, m in enumerate(models) if i == 0 or m.round != models[i - 1].round]
    assert distinct == list(range(distinct[0], distinct[-1] + 1)), distinct  # +1 steps, never back
    assert distinct[0] == 0 and distinct[-1] >= kills[-1] + 2
    by_round: dict[int, list[wire.ModelMessage]] = {}
    for m in models:
        by_round.setdefault(m.round, []).append(m)
    # Never applied twice: every publication of a round's model (re-publications after restarts included) carries
    # the same tensors and the same close time. Not the same *bytes*: safetensors writes the metadata map in a
    # per-process hash order (see docs/RELIABILITY.md). Round 0 (never checkpointed) gets a new `created` per start.
    for r, ms in by_round.items():
        assert all(all(np.array_equal(m.tensors[k], ms[0].tensors[k]) for k in m.tensors) for m in ms), r
        assert r == 0 or len({m.created for m in ms}) == 1, r
    republished = sum(len(ms) - 1 for r, ms in by_round.items() if r > 0)
    observer.summary_rounds()  # fails if a round's summary was seen with two different contents
    final = store.load()
    assert final.round == models[-1].round == distinct[-1]
    assert all(np.array_equal(final.model[k], models[-1].tensors[k]) for k in final.model)
    for c in clients:  # every device released at most once per round
        assert len(set(ledger_keys(c))) == len(ledger_keys(c))
    FIGURES["aggregator_kill"] = {"kills": len(kills), "rounds": distinct[-1], "checkpoint_round_at_kill": kills,
                                  "republished_models": republished,
                                  "restart_to_first_model_s": [round(x, 2) for x in restarts]}
    print(f"\naggregator kill -9 x{len(kills)} (checkpoint rounds at the kills {kills}); reached round {distinct[-1]}; "
          f"restart -> first retained model: {', '.join(f'{x:.2f}s' for x in restarts)}")


# ------------------------------------------------------------------------------------------ device kill -9
class Proc:
    """A `fedatt -v device` subprocess whose output is collected by a thread."""

    def __init__(self, cmd: list[str]) -> None:
        self.lines: list[str] = []
        self.p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.append(line)

    def saw(self, text: str) -> bool:
        return any(text in ln for ln in self.lines)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait(10)


def test_device_killed_mid_training_and_mid_publish_never_releases_twice(tmp_path, mosquitto, bundle):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8000, 10)).astype(np.float32)
    npz = tmp_path / "local.npz"
    np.savez(npz, x=x, y=(x[:, 0] > 0).astype(np.int64))
    state = tmp_path / "device"
    ledger_file = state / "privacy_ledger.json"
    cmd = [sys.executable, "-m", "edge_sdk.cli", "-v", "device", "--bundle", str(bundle.path), "--data", str(npz),
           "--broker", mosquitto.url, "--device-id", "dev-k", "--fleet", "killfleet", "--state-dir", str(state),
           "--epsilon-budget", "1000000"]
    cfg = EngineConfig(fleet="killfleet", model_id=bundle.model_id, strategy="fedavg", quorum=1, over_selection=1.0,
                       round_timeout_s=60.0, train=wire.TrainSettings(epochs=40, batch_size=16, lr=0.01),
                       privacy=wire.PrivacySettings(clip_norm=1.0, noise_multiplier=1.0))
    from tests.test_client_mqtt import Subscriber

    sub = Subscriber(mosquitto.port, "fedatt/killfleet/updates/+", client_id="kill-observer")
    service = AggregatorService(cfg, bundle, tmp_path / "state", MqttSettings(mosquitto.url))
    procs: list[Proc] = []

    def releases() -> list[str]:
        if not ledger_file.exists():
            return []
        led = PrivacyLedger.open(ledger_file, epsilon_budget=1e6, delta=1e-5, adjacency="add_remove")
        return [r.key for r in led.releases]

    try:
        service.start()
        # 1. Killed mid-training (40 local epochs take ~3 s): nothing was released, nothing spent.
        procs.append(Proc(cmd))
        wait_for(lambda: procs[-1].saw("training"), 60, "the device to start training round 1")
        time.sleep(0.7)
        assert service.model_round == 0 and not procs[-1].saw("published")
        procs[-1].kill()
        assert releases() == [] and sub.msgs == []
        # Restarted: it trains round 1 again (it may: nothing was released) and publishes once.
        procs.append(Proc(cmd))
        assert service.wait_for_round(1, timeout=60)
        assert len(releases()) == 1
        # 2. Killed the moment its ledger records the round-2 release (the publish is in progress or about to be).
        deadline = time.monotonic() + 60
        while len(releases()) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        procs[-1].kill()
        arrived_before_restart = len(sub.msgs)
        outbox = (state / "outbox" / "index.json").read_text() if (state / "outbox" / "index.json").exists() else ""
        where = ("after PUBACK" if '"sent"' in outbox else "outbox pending" if '"pending"' in outbox
                 else "between ledger and outbox")
        keys_at_kill = releases()
        assert len(keys_at_kill) == 2 and len(set(keys_at_kill)) == 2
        procs.append(Proc(cmd))
        # The restarted device either re-sends the identical outbox bytes or knows the round is already released.
        wait_for(lambda: service.model_round >= 2 or procs[-1].saw("already_released"), 60,
                 "round 2 to close or the device to report already_released")
        time.sleep(1.0)
    finally:
        for p in procs:
            p.kill()
        service.stop()
        sub.close()
    keys = releases()
    assert len(keys) == len(set(keys)) and len(keys) in (2, 3), keys  # one entry per round, ledger readable
    ups = sub.updates()
    per_round: dict[int, set[str]] = {}
    for u in ups:
        per_round.setdefault(u.round, set()).add(u.update_id)
    assert all(len(ids) == 1 for ids in per_round.values()), per_round  # re-sends carry the same update_id
    reg = service.engine.registry.get("dev-k", {})
    assert reg.get("accepted", 0) == len([s for s in service.summaries if "dev-k" in s.participants])
    assert all(s.participants == ("dev-k",) for s in service.summaries)
    FIGURES["device_kill"] = {"mid_publish_kill_landed": where, "raw_arrivals": len(sub.msgs),
                              "arrived_before_restart": arrived_before_restart,
                              "duplicates_dropped": service.engine.totals["duplicates"]}
    print(f"\ndevice kill -9: mid-publish kill landed {where}; {len(sub.msgs)} raw arrival(s) for "
          f"{len(per_round)} round(s); duplicates dropped by the aggregator: {service.engine.totals['duplicates']}")


# ---------------------------------------------------------------------------------------------- disk full
def test_checkpoint_enospc_is_fatal_keeps_previous_checkpoint_and_restart_resumes(tmp_path, secure_broker, bundle,
                                                                                  data, monkeypatch):
    import broker.state as state_mod

    broker, creds = secure_broker
    real = state_mod._write_durable
    failures = []

    def full_disk(path, payload):
        if "gen-000000000002" in str(path):
            failures.append(str(path))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, payload)

    monkeypatch.setattr(state_mod, "_write_durable", full_disk)
    observer = Observer(broker, creds["observer"], [f"fedatt/{FLEET}/model", f"fedatt/{FLEET}/metrics"])
    state = tmp_path / "state"
    service = AggregatorService(engine_config(bundle, round_timeout_s=8.0), bundle, state, agg_settings(broker, creds))
    clients = devices(tmp_path, broker, creds, bundle, data)
    service2 = None
    try:
        service.start()
        assert service.wait_for_round(1, timeout=60)
        with pytest.raises(CheckpointError, match="No space left on device") as err:
            service.wait_for_round(2, timeout=60)
        assert "gen-000000000002" in str(err.value) and failures
        service.stop()
        time.sleep(0.5)
        assert CheckpointStore(state / "checkpoints").load().round == 1  # previous checkpoint intact
        assert not any(p.name.startswith(".tmp") for p in (state / "checkpoints").iterdir())
        assert max(m.round for m in decoded_models(observer)) == 1, "round 2 must not be published"
        assert observer.summary_rounds() == [1]
        monkeypatch.setattr(state_mod, "_write_durable", real)  # space freed
        service2 = AggregatorService(engine_config(bundle, round_timeout_s=4.0), bundle, state,
                                     agg_settings(broker, creds), max_rounds=2)
        assert service2.resumed_from == 1
        service2.start()
        assert service2.wait_for_round(3, timeout=90)
    finally:
        for c in clients:
            c.stop()
        if service2 is not None:
            service2.stop()
        observer.close()
    assert observer.summary_rounds() == [1, 2, 3]
    assert CheckpointStore(state / "checkpoints").load().round == 3


def test_state_dir_that_is_a_file_gives_a_clear_error(tmp_path, secure_broker, bundle, data):
    broker, creds = secure_broker
    pwfile = tmp_path / "agg.password"
    pwfile.write_text(creds["fedatt-aggregator"] + "\n")
    blocker = tmp_path / "state"
    blocker.write_text("not a directory\n")
    clients = devices(tmp_path, broker, creds, bundle, data)
    proc = subprocess.Popen(aggregate_cmd(broker, bundle, blocker, pwfile), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for c in clients:
            c.stop()
    text = out.decode(errors="replace")
    assert proc.returncode == 4, text[-2000:]
    assert "cannot create checkpoint directory" in text and "previous checkpoint is intact" in text, text[-2000:]
    assert blocker.read_text() == "not a directory\n"

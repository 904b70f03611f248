"""The aggregator end to end: real devices (EdgeClient), the real service, a real Mosquitto with deploy/'s ACL.

Covers issue 4's "done when": rounds complete and the global model improves on held-out data; a device cannot
publish to another device's topic or the model topic; malformed/stale/duplicate/NaN updates are rejected with
reasons while the round still closes; a kill -9'd aggregator resumes from its checkpoint without repeating a round.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from broker.credentials import add_device
from broker.rounds import EngineConfig
from broker.service import AggregatorService, MqttSettings
from edge_sdk import wire
from edge_sdk.bundle import Bundle
from edge_sdk.client import EdgeClient
from edge_sdk.config import ClientConfig
from edge_sdk.trainer import LocalTrainer
from simulator.datasets import load_dataset
from tests.mosquitto import Mosquitto

ROOT = Path(__file__).resolve().parents[1]
FLEET = "e2e"
DEVICES = ["dev-a", "dev-b", "dev-c"]


@pytest.fixture(scope="module")
def data():
    return load_dataset("three_clients", seed=0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, data) -> Bundle:
    import torch

    from exporter import export_bundle
    from exporter.zoo import mlp

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bundle") / "mlp"
    return export_bundle(mlp(in_features=10), ((1, 10), "float32"), out, loss="cross_entropy", lr=0.05)


@pytest.fixture
def secure_broker(tmp_path):
    """Mosquitto with deploy/mosquitto/acl, per-device passwords, no anonymous access."""
    passwd = tmp_path / "passwd"
    creds = {name: add_device(passwd, name) for name in ["fedatt-aggregator", "observer", "rogue", *DEVICES]}
    extra = (f"allow_anonymous false\npassword_file {passwd}\nacl_file {ROOT / 'deploy/mosquitto/acl'}\n"
             "use_username_as_clientid true\n")
    broker = Mosquitto(tmp_path / "mosquitto", extra_config=extra).start()
    try:
        yield broker, creds
    finally:
        broker.stop()


def engine_config(bundle: Bundle, **over) -> EngineConfig:
    base = dict(fleet=FLEET, model_id=bundle.model_id, strategy="fedavg", quorum=3, over_selection=1.0,
                round_timeout_s=30.0, train=wire.TrainSettings(epochs=2, batch_size=16, lr=0.05),
                privacy=wire.PrivacySettings(clip_norm=2.0, noise_multiplier=0.02))
    base.update(over)
    return EngineConfig(**base)


def start_devices(tmp_path, broker, creds, bundle, data, names=DEVICES) -> list[EdgeClient]:
    clients = []
    for name, cid in zip(names, sorted(data.clients)):
        cfg = ClientConfig(device_id=name, fleet=FLEET, broker=broker.url, state_dir=tmp_path / "devices" / name,
                           username=name, password=creds[name], epsilon_budget=1e9, reconnect_min=0.2,
                           reconnect_max=2.0, tick_interval=0.5)
        clients.append(EdgeClient(cfg, bundle, data.clients[cid]).start())
    return clients


def accuracy(bundle: Bundle, named: dict, data) -> float:
    with LocalTrainer(bundle) as t:
        t.set_parameters(bundle.join(named))
        return t.evaluate(*data.test).accuracy


class Observer:
    """Subscribes with its own account and records what arrives (the ACL lets every account read these)."""

    def __init__(self, broker, password: str, topics: list[str]) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="observer", protocol=mqtt.MQTTv311)
        self.c.username_pw_set("observer", password)
        self.c.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload), m.retain))
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()

    def summaries(self) -> list[wire.RoundSummary]:
        return [wire.decode_summary(p) for t, p, _ in self.messages if t.endswith("/metrics")]

    def summary_rounds(self) -> list[int]:
        """Rounds whose summary arrived, each once. An aggregator restart re-publishes the last retained summary:
        fails if a round's summary was seen with different content (that would be a second application)."""
        by_round: dict[int, set[bytes]] = {}
        for t, p, _ in self.messages:
            if t.endswith("/metrics"):
                by_round.setdefault(wire.decode_summary(p).round, set()).add(p)
        twice = {r: len(v) for r, v in by_round.items() if len(v) > 1}
        assert not twice, f"rounds closed twice (different summaries): {twice}"
        return sorted(by_round)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def raw_client(broker, user: str, password: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv311)
    c.username_pw_set(user, password)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    return c


def test_rounds_complete_and_model_improves(tmp_path, secure_broker, bundle, data):
    broker, creds = secure_broker
    from tests.mosquitto import free_port

    metrics_port = free_port()
    service = AggregatorService(engine_config(bundle), bundle, tmp_path / "state",
                                MqttSettings(broker.url, "fedatt-aggregator", creds["fedatt-aggregator"]),
                                max_rounds=6, metrics_port=metrics_port)
    initial = accuracy(bundle, service.global_model(), data)
    clients = start_devices(tmp_path, broker, creds, bundle, data)
    try:
        service.start()
        assert service.wait_for_round(6, timeout=120), f"only reached round {service.model_round}"
        import urllib.request

        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    finally:
        service.stop()
        for c in clients:
            c.stop()
    final = accuracy(bundle, service.global_model(), data)
    assert [s.round for s in service.summaries] == [1, 2, 3, 4, 5, 6]
    assert all(sorted(s.participants) == DEVICES for s in service.summaries)
    assert all(abs(sum(w[next(iter(w))] for w in s.weights.values()) - 1) < 1e-6 for s in service.summaries)
    # Learned something real: well above the 0.5 majority baseline and above the initial model.
    assert final >= max(initial + 0.15, 0.7), (initial, final)
    # The Prometheus endpoint reports what happened.
    assert f'fedatt_rounds_closed_total{{fleet="{FLEET}"}} 6.0' in scraped
    assert f'fedatt_updates_accepted_total{{fleet="{FLEET}"}} 18.0' in scraped
    assert f'fedatt_round_duration_seconds_count{{fleet="{FLEET}"}} 6.0' in scraped
    assert f'fedatt_devices_online{{fleet="{FLEET}"}} 3.0' in scraped
    # Each device released exactly one update per round, and its ledger says so.
    for c in clients:
        assert len(c.ledger.releases) == 6


def test_acl_and_hostile_updates(tmp_path, secure_broker, bundle, data):
    broker, creds = secure_broker
    service = AggregatorService(engine_config(bundle, quorum=3, round_timeout_s=20.0), bundle, tmp_path / "state",
                                MqttSettings(broker.url, "fedatt-aggregator", creds["fedatt-aggregator"]),
                                max_rounds=1)
    service.start()
    observer = Observer(broker, creds["observer"], [f"fedatt/{FLEET}/model", f"fedatt/{FLEET}/metrics"])
    # "rogue" is a hostile device with valid credentials: it tries to impersonate dev-b and overwrite the model.
    spy = raw_client(broker, "rogue", creds["rogue"])
    seen_by_rogue: list[str] = []
    spy.on_message = lambda c, u, m: seen_by_rogue.append(m.topic)
    spy.subscribe(f"fedatt/{FLEET}/updates/#", qos=1)
    clients = []
    try:
        time.sleep(0.5)
        initial_model = service.global_model()
        good = {k: np.zeros_like(v) for k, v in initial_model.items()}

        def update(device: str, rnd: int = 1, **over) -> bytes:
            fields = dict(model_id=bundle.model_id, round=rnd, device_id=device, update_id=wire.new_update_id(),
                          num_examples=10, clip_norm=2.0, noise_multiplier=0.02, encoding="f32", tensors=good)
            fields.update(over)
            return wire.encode_update(wire.UpdateMessage(**fields))

        # Impersonation and model overwrite: the broker drops them (ACL), the aggregator never sees them.
        spy.publish(f"fedatt/{FLEET}/updates/dev-b", update("dev-b", tensors={k: v + 100 for k, v in good.items()}), qos=1)
        spy.publish(f"fedatt/{FLEET}/model", b"evil", qos=1, retain=True)
        # The honest devices start and round 1 is announced to dev-a, dev-b, dev-c.
        clients = start_devices(tmp_path, broker, creds, bundle, data)
        assert service.wait_for_round(1, timeout=60)
    finally:
        for c in clients:
            c.stop()
        service.stop()
        spy.loop_stop()
        observer.close()
    summary = service.summaries[0]
    assert sorted(summary.participants) == DEVICES
    assert seen_by_rogue == [], "a device must not read other devices' updates"
    models = [p for t, p, _ in observer.messages if t.endswith("/model")]
    assert models and all(p != b"evil" for p in models)
    assert all(wire.decode_model(p).model_id == bundle.model_id for p in models)


def test_malformed_stale_duplicate_nan_rejected_round_still_closes(tmp_path, secure_broker, bundle, data):
    broker, creds = secure_broker
    # Cohort = everyone online (4 of 4), so the hostile "rogue" account is invited and answers with garbage.
    cfg = engine_config(bundle, quorum=3, over_selection=2.0, min_online=4, round_timeout_s=8.0)
    service = AggregatorService(cfg, bundle, tmp_path / "state",
                                MqttSettings(broker.url, "fedatt-aggregator", creds["fedatt-aggregator"]))
    service.start()
    rogue = raw_client(broker, "rogue", creds["rogue"])
    rogue.publish(f"fedatt/{FLEET}/status/rogue", wire.encode_status(wire.Status("rogue", "online")), qos=1, retain=True)
    shapes = {p.name: p.shape for p in bundle.trainable}
    zeros = {k: np.zeros(s, np.float32) for k, s in shapes.items()}

    def upd(rnd=1, device="rogue", model_id=bundle.model_id, uid=None):
        return wire.encode_update(wire.UpdateMessage(
            model_id=model_id, round=rnd, device_id=device, update_id=uid or wire.new_update_id(),
            num_examples=5, clip_norm=2.0, noise_multiplier=0.02, encoding="f32", tensors=zeros))

    import safetensors.numpy as st  # NaN cannot come out of a well-behaved encoder: build the container by hand
    meta = {"protocol": "1", "kind": "update", "model_id": bundle.model_id, "round": "1", "device_id": "rogue",
            "update_id": "1" * 32, "num_examples": "5", "clip_norm": "2.0", "noise_multiplier": "0.02",
            "encoding": "f32", "sdk": ""}
    big = {k: np.full(s, 50.0, np.float32) for k, s in shapes.items()}  # far past the clipping bound
    bad = {"bad_container": [b"garbage", b"\x00" * 7], "bad_field": [upd(rnd=0)], "stale_round": [upd(rnd=99)],
           "device_mismatch": [upd(device="dev-a")], "wrong_model": [upd(model_id="sha256:" + "0" * 64)],
           "non_finite": [st.save({k: np.full(s, np.nan, np.float32) for k, s in shapes.items()}, metadata=meta)],
           "norm_bound": [st.save(big, metadata={**meta, "update_id": "2" * 32})]}
    clients = start_devices(tmp_path, broker, creds, bundle, data)
    try:
        deadline = time.monotonic() + 30
        while service.engine.current_task is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert service.engine.current_task is not None and "rogue" in service.engine.current_task.cohort
        for payloads in bad.values():
            for p in payloads:
                rogue.publish(f"fedatt/{FLEET}/updates/rogue", p, qos=1)
        assert service.wait_for_round(1, timeout=60)
        deadline = time.monotonic() + 10
        while sum(service.engine.totals["rejections"].values()) < sum(map(len, bad.values())) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for c in clients:
            c.stop()
        service.stop()
        rogue.loop_stop()
    s = service.summaries[0]
    assert sorted(s.participants) == DEVICES, "the round closes with the honest devices"
    assert "rogue" not in s.weights
    totals = service.engine.totals["rejections"]
    for reason, payloads in bad.items():
        assert totals.get(reason, 0) >= len(payloads), (reason, totals)


def _aggregate_cmd(broker, bundle: Bundle, state: Path, pwfile: Path) -> list[str]:
    return [sys.executable, "-m", "edge_sdk.cli", "aggregate", "--broker", broker.url, "--username",
            "fedatt-aggregator", "--password-file", str(pwfile), "--bundle", str(bundle.path), "--state", str(state),
            "--fleet", FLEET, "--strategy", "fedatt-noise-aware", "--quorum", "3", "--over-selection", "1",
            "--round-timeout", "30", "--epochs", "1", "--batch-size", "16", "--lr", "0.05", "--clip-norm", "2.0",
            "--noise-multiplier", "0.02", "--log-format", "json"]


def test_killed_aggregator_resumes_from_checkpoint(tmp_path, secure_broker, bundle, data):
    broker, creds = secure_broker
    pwfile = tmp_path / "agg.password"
    pwfile.write_text(creds["fedatt-aggregator"] + "\n")
    state = tmp_path / "state"
    observer = Observer(broker, creds["observer"], [f"fedatt/{FLEET}/metrics"])
    clients = start_devices(tmp_path, broker, creds, bundle, data)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_aggregate_cmd(broker, bundle, state, pwfile), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(observer.summaries()) < 2:
            time.sleep(0.1)
        assert len(observer.summaries()) >= 2, proc.stdout.read1().decode(errors="replace") if proc.poll() else ""
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_after = max(s.round for s in observer.summaries())
        proc = subprocess.Popen(_aggregate_cmd(broker, bundle, state, pwfile) + ["--max-rounds", "2"], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = proc.communicate(timeout=120)
        text = out.decode(errors="replace")
        assert proc.returncode == 0, text
    finally:
        if proc.poll() is None:
            proc.kill()
        for c in clients:
            c.stop()
        observer.close()
    rounds = observer.summary_rounds()  # a summary seen twice must be a byte-identical re-publication
    # None skipped, and the restart continued from its checkpoint.
    assert rounds == list(range(1, len(rounds) + 1)), rounds
    assert max(rounds) >= killed_after + 2
    assert "resuming after round" in text

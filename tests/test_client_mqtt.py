"""EdgeClient against a real Mosquitto: train, privatise, publish; ledger and outbox across restarts; broker restarts.

The test plays the aggregator with the wire encoders (retained model + round task) and a plain paho
subscriber on `updates/+`. One tiny bundle (MLP, 10 features, 1,474 trainable parameters) is exported once
per module. Timeouts are short; every client and broker is stopped in a finally block.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_sdk import wire
from edge_sdk.client import EdgeClient, FleetDriver, run_training_job
from edge_sdk.config import ClientConfig
from edge_sdk.outbox import Outbox
from edge_sdk.privacy import epsilon_for
from tests.polling import wait_for

pytestmark = pytest.mark.mosquitto

FLEET = "fleet1"
TOPICS = wire.Topics(FLEET)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    import exporter
    from exporter import zoo

    return exporter.export_bundle(zoo.mlp(in_features=10), "1x10", tmp_path_factory.mktemp("b") / "mlp",
                                  loss="cross_entropy")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 10)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def publish(port: int, topic: str, payload: bytes, retain: bool = True) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()


class Subscriber:
    """Collects every raw arrival on a topic filter. A fixed client id + clean_session=False survives restarts."""

    def __init__(self, port: int, topic: str, client_id: str = "") -> None:
        self.msgs: list[tuple[str, bytes]] = []
        self.subscribed = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not client_id,
                             protocol=mqtt.MQTTv311)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, 1)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.c.on_message = lambda c, u, m: self.msgs.append((m.topic, bytes(m.payload)))
        self.c.reconnect_delay_set(0.1, 0.5)
        self.c.connect_async("127.0.0.1", port)
        self.c.loop_start()
        assert self.subscribed.wait(10), "subscriber did not subscribe"

    def updates(self) -> list[wire.UpdateMessage]:
        return [wire.decode_update(p) for _, p in self.msgs]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def config(broker, state_dir, device_id="dev1", **kw) -> ClientConfig:
    kw.setdefault("epsilon_budget", 50.0)
    return ClientConfig(device_id=device_id, fleet=FLEET, broker=broker.url, state_dir=state_dir,
                        reconnect_min=0.1, reconnect_max=0.5, tick_interval=0.2, keepalive=10, **kw)


def announce(broker, bundle, *, round_=1, model_round=0, z=20.0, clip=0.05, attempt=1, cohort=("dev1",),
             params=None, deadline_in=60.0, epochs=1, encodings=("f32", "int8")) -> None:
    flat = bundle.initial_parameters() if params is None else params
    publish(broker.port, TOPICS.model, wire.encode_model(wire.ModelMessage(bundle.model_id, model_round,
                                                                            bundle.split(flat))))
    publish(broker.port, TOPICS.round, wire.encode_round(wire.RoundTask(
        fleet=FLEET, round=round_, model_id=bundle.model_id, model_round=model_round,
        deadline=time.time() + deadline_in, quorum=1, cohort=tuple(cohort), attempt=attempt,
        train=wire.TrainSettings(epochs=epochs, batch_size=16, lr=None),
        privacy=wire.PrivacySettings(clip_norm=clip, noise_multiplier=z), encodings=tuple(encodings))))


def test_device_publishes_noised_update_with_right_metadata_and_noise(mosquitto, bundle, data, tmp_path):
    sub = Subscriber(mosquitto.port, TOPICS.all_updates)
    status = Subscriber(mosquitto.port, TOPICS.all_status)
    results = []
    client = EdgeClient(config(mosquitto, tmp_path / "dev1"), bundle, data, on_round_result=results.append)
    try:
        z, clip = 20.0, 0.05  # noise std zC = 1.0 against a clipped signal of L2 norm <= 0.05 (all 1,474 coords)
        announce(mosquitto, bundle, z=z, clip=clip)
        client.start()
        wait_for(lambda: len(sub.msgs) == 1 and results, what="one update and a result")
        topic, payload = sub.msgs[0]
        assert topic == TOPICS.update("dev1")
        u = wire.decode_update(payload)
        assert (u.model_id, u.round, u.device_id, u.encoding) == (bundle.model_id, 1, "dev1", "f32")
        assert (u.clip_norm, u.noise_multiplier, u.num_examples) == (clip, z, 40)
        wire.check_tensors(u.tensors, {p.name: p.shape for p in bundle.trainable})
        values = np.concatenate([t.ravel() for t in u.tensors.values()]).astype(np.float64)
        std, n = float(values.std()), values.size
        # std of n Gaussian samples has relative standard error 1/sqrt(2n) = 1.8% at n=1474; allow 6% (~3.3 SE)
        print(f"\nmeasured noise std {std:.4f} vs zC = {z * clip:.4f} over {n} coordinates "
              f"(rel. err {abs(std / (z * clip) - 1):.2%}), mean {values.mean():+.4f}")
        assert abs(std / (z * clip) - 1) < 0.06
        assert abs(values.mean()) < 4 * z * clip / np.sqrt(n)
        (r,) = results
        assert (r.status, r.round, r.update_id, r.num_examples) == ("published", 1, u.update_id, 40)
        assert r.epsilon == pytest.approx(epsilon_for([z], 1e-5)) and r.train_loss > 0
        online = [wire.decode_status(p) for t, p in status.msgs if t == TOPICS.status("dev1")]
        assert online and online[-1].state == "online"

        # Re-announcement of the same round: the identical bytes again, no new noise, no new ledger entry.
        announce(mosquitto, bundle, z=z, clip=clip, attempt=2)
        wait_for(lambda: len(sub.msgs) == 2, what="re-sent update")
        assert sub.msgs[1][1] == payload and len(client.ledger.releases) == 1
        wait_for(lambda: len(results) == 2, what="second result")
        assert results[1].detail == "resent"
    finally:
        client.stop()
        sub.close()
    # Graceful stop publishes a retained offline status.
    wait_for(lambda: any(wire.decode_status(p).state == "offline" for _, p in status.msgs), 5, "offline status")
    status.close()


def test_int8_update_decodes_with_expected_noise(mosquitto, bundle, data, tmp_path):
    sub = Subscriber(mosquitto.port, TOPICS.all_updates)
    client = EdgeClient(config(mosquitto, tmp_path / "d", encoding="int8"), bundle, data)
    try:
        announce(mosquitto, bundle, z=20.0, clip=0.05)
        client.start()
        wait_for(lambda: len(sub.msgs) == 1, what="int8 update")
        u = wire.decode_update(sub.msgs[0][1])
        assert u.encoding == "int8"
        values = np.concatenate([t.ravel() for t in u.tensors.values()])
        print(f"\nint8: measured std {values.std():.4f} vs zC = 1.0")
        assert abs(values.std() - 1.0) < 0.06
        assert len(sub.msgs[0][1]) < 0.5 * 4 * bundle.num_trainable  # float32 data alone would be 4 B per value
    finally:
        client.stop()
        sub.close()


def test_ledger_survives_restart_and_blocks_past_budget(mosquitto, bundle, data, tmp_path):
    z = 5.0
    budget = (epsilon_for([z], 1e-5) + epsilon_for([z, z], 1e-5)) / 2  # room for exactly one release
    sub = Subscriber(mosquitto.port, TOPICS.all_updates)
    state = tmp_path / "dev1"
    results = []
    client = EdgeClient(config(mosquitto, state, epsilon_budget=budget), bundle, data, on_round_result=results.append)
    try:
        announce(mosquitto, bundle, z=z, clip=1.0)
        client.start()
        wait_for(lambda: results, what="round 1 result")
        assert results[0].status == "published"
        spent = client.ledger.epsilon
    finally:
        client.stop()
    results.clear()
    client = EdgeClient(config(mosquitto, state, epsilon_budget=budget), bundle, data, on_round_result=results.append)
    try:
        assert client.ledger.epsilon == pytest.approx(spent) and len(client.ledger.releases) == 1
        announce(mosquitto, bundle, round_=2, model_round=1, z=z, clip=1.0)
        client.start()
        wait_for(lambda: results, what="round 2 result")
        assert (results[0].round, results[0].status, results[0].reason) == (2, "skipped", "budget")
        time.sleep(0.3)
        assert len(sub.msgs) == 1 and len(client.ledger.releases) == 1
    finally:
        client.stop()
        sub.close()


def test_broker_restart_mid_publish_delivers_exactly_once(mosquitto, bundle, data, tmp_path):
    started, go = threading.Event(), threading.Event()

    def gated_runner(job):  # hold the release until the broker is down
        started.set()
        assert go.wait(20)
        return run_training_job(job)

    sub = Subscriber(mosquitto.port, TOPICS.all_updates, client_id="aggregator-test")
    results = []
    client = EdgeClient(config(mosquitto, tmp_path / "dev1"), bundle, data, runner=gated_runner,
                        on_round_result=results.append)
    try:
        announce(mosquitto, bundle)
        client.start()
        assert started.wait(15)
        mosquitto.stop()  # the device publishes into a dead connection: paho queues it
        go.set()
        wait_for(lambda: client.outbox.entries(), what="outbox entry")
        assert client.outbox.entries()[0].state == "pending"
        time.sleep(0.5)
        mosquitto.start()  # same port, persisted sessions: subscriber and device reconnect
        wait_for(lambda: results, 20, "PUBACK after the broker came back")
        time.sleep(1.5)  # time for any duplicate to show up
        ids = [u.update_id for u in sub.updates()]
        print(f"\nbroker restart: {len(sub.msgs)} raw arrival(s), {len(set(ids))} distinct update_id(s)")
        assert len(sub.msgs) == 1 and len(set(ids)) == 1
        assert client.outbox.entries()[0].state == "sent" and len(client.ledger.releases) == 1
    finally:
        go.set()
        client.stop()
        sub.close()


def test_restart_with_outbox_entry_resends_identical_bytes(mosquitto, bundle, data, tmp_path):
    started, go = threading.Event(), threading.Event()

    def gated_runner(job):
        started.set()
        assert go.wait(20)
        return run_training_job(job)

    state = tmp_path / "dev1"
    client = EdgeClient(config(mosquitto, state), bundle, data, runner=gated_runner)
    try:
        announce(mosquitto, bundle)
        client.start()
        assert started.wait(15)
        mosquitto.stop()
        go.set()
        wait_for(lambda: client.outbox.entries(), what="outbox entry")
    finally:
        go.set()
        client.stop()  # the app dies with the update released but unacknowledged
    (entry,) = Outbox(state / "outbox").entries()
    stored = (state / "outbox" / f"{entry.update_id}.update").read_bytes()
    mosquitto.start()
    sub = Subscriber(mosquitto.port, TOPICS.all_updates)
    results = []
    client = EdgeClient(config(mosquitto, state), bundle, data, on_round_result=results.append)
    try:
        client.start()
        wait_for(lambda: sub.msgs, what="re-sent update")
        assert sub.msgs[0][1] == stored and wire.decode_update(stored).update_id == entry.update_id
        wait_for(lambda: results, what="result")
        assert results[0].detail == "resent" and len(client.ledger.releases) == 1
        time.sleep(0.3)
        assert len(sub.msgs) == 1  # the retained task of the same round does not trigger another run
    finally:
        client.stop()
        sub.close()


def test_malformed_retained_messages_are_ignored_with_reason(mosquitto, bundle, data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="edge_sdk")
    sub = Subscriber(mosquitto.port, TOPICS.all_updates)
    publish(mosquitto.port, TOPICS.model, b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}....")
    publish(mosquitto.port, TOPICS.round, b'{"protocol": 1, "kind": "round", "round": "one"}')
    client = EdgeClient(config(mosquitto, tmp_path / "dev1"), bundle, data)
    try:
        client.start()
        wait_for(lambda: "model_ignored:bad_header" in caplog.text and "round_ignored:bad_field" in caplog.text,
                 what="logged reasons")
        announce(mosquitto, bundle)  # the device is still alive and takes part once the messages are valid
        wait_for(lambda: sub.msgs, what="update after valid messages")
    finally:
        client.stop()
        sub.close()


def test_external_driver_runs_several_devices_in_one_thread(mosquitto, bundle, data, tmp_path):
    sub = Subscriber(mosquitto.port, TOPICS.all_updates)
    driver = FleetDriver()
    results = []
    try:
        clients = [driver.add(EdgeClient(config(mosquitto, tmp_path / f"d{i}", device_id=f"d{i}"), bundle, data,
                                         on_round_result=results.append)) for i in range(3)]
        announce(mosquitto, bundle, cohort=("d0", "d1", "d2"))
        deadline = time.monotonic() + 20
        driver.run(lambda: len(results) == 3 or time.monotonic() > deadline, timeout=0.05)
        assert sorted(u.device_id for u in sub.updates()) == ["d0", "d1", "d2"]
        assert all(r.status == "published" for r in results)
        assert all(c.mqtt._thread is None for c in clients)  # no paho thread in external mode
    finally:
        driver.close()
        sub.close()


def test_edge_sdk_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import edge_sdk\n"
            "from edge_sdk import Bundle, ClientConfig, EdgeClient, PrivacyLedger, Predictor\n"
            "import edge_sdk.client, edge_sdk.follower, edge_sdk.outbox, edge_sdk.device_cli, edge_sdk.trainer\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_config_validation(tmp_path):
    from edge_sdk.config import ConfigError

    ok = dict(device_id="dev1", fleet="f", broker="mqtt://127.0.0.1:1883", state_dir=tmp_path)
    assert ClientConfig(**ok).address.port == 1883
    assert tuple(vars(ClientConfig(**dict(ok, broker="mqtts://host")).address).values()) == ("host", 8883, True)
    for bad, msg in [(dict(device_id="a/b"), "device_id"), (dict(broker="http://x"), "mqtt://"),
                     (dict(ca_file=tmp_path / "none.pem"), "ca_file"), (dict(encoding="fp16"), "encoding"),
                     (dict(epsilon_budget=0), "epsilon_budget"), (dict(adjacency="x"), "adjacency"),
                     (dict(reconnect_min=5, reconnect_max=1), "reconnect_max")]:
        with pytest.raises(ConfigError, match=msg):
            ClientConfig(**dict(ok, **bad))
    assert "secret" not in repr(ClientConfig(**dict(ok, username="dev1", password="secret")))


@pytest.mark.parametrize("inherited_sigint", ["default", "ignored"])
def test_fedatt_device_cli_runs_until_interrupted(mosquitto, bundle, data, tmp_path, inherited_sigint):
    """Ctrl-C stops the device, also when it was started with SIGINT ignored (a shell's background job)."""
    import signal

    disposition = signal.SIG_DFL if inherited_sigint == "default" else signal.SIG_IGN
    np.savez(tmp_path / "data.npz", x=data[0], y=data[1])
    sub = Subscriber(mosquitto.port, TOPICS.all_updates)
    announce(mosquitto, bundle, cohort=("cli1",))
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_sdk.cli", "device", "--bundle", str(bundle.path), "--data",
         str(tmp_path / "data.npz"), "--broker", mosquitto.url, "--device-id", "cli1", "--fleet", FLEET,
         "--state-dir", str(tmp_path / "state"), "--epsilon-budget", "5"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))
    try:
        wait_for(lambda: sub.msgs, 30, "update from the CLI device")
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # the CLI dumps every thread's stack: say where it hangs
            time.sleep(1.0)
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"fedatt device did not stop within 15 s of SIGINT; stacks:\n{err[-6000:]}")
        assert proc.returncode == 0, err
        assert "round 1 (attempt 1): published" in out and "stopped" in out, out + err
        assert wire.decode_update(sub.msgs[0][1]).device_id == "cli1"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sub.close()


def test_stop_is_bounded_when_the_network_thread_does_not_end(mosquitto, bundle, data, tmp_path, caplog):
    """paho's loop_stop() joins with no timeout; a network thread that never ends must not hang stop()."""
    import threading

    client = EdgeClient(config(mosquitto, tmp_path / "dev1"), bundle, data).start()
    assert client.wait_connected(10)
    release = threading.Event()
    real_loop_stop = client.mqtt.loop_stop
    client.mqtt.loop_stop = lambda: release.wait()  # stands in for a network thread stuck in its loop
    t0 = time.monotonic()
    try:
        with caplog.at_level("WARNING"):
            client.stop(timeout=0.5)
        assert time.monotonic() - t0 < 3.0
        assert "did not stop within 0.5s" in caplog.text
    finally:
        release.set()
        real_loop_stop()


def _tls_material(d: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1 (EC P-256: fast to generate)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *a: subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True, timeout=30)  # noqa: E731
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=fedatt-test-ca")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "san.ext")


@pytest.mark.skipif(not __import__("shutil").which("openssl"), reason="needs the openssl CLI")
def test_tls_with_per_device_password_and_acl(bundle, data, tmp_path, caplog):
    from broker.credentials import add_device
    from tests.mosquitto import Mosquitto

    caplog.set_level(logging.ERROR, logger="edge_sdk")
    tls = tmp_path / "tls"
    tls.mkdir()
    _tls_material(tls)
    passwd = tmp_path / "passwd"
    pw_dev = add_device(passwd, "dev1")
    pw_agg = add_device(passwd, "fedatt-aggregator")
    broker = Mosquitto(tmp_path / "mq", extra_config=(
        f"cafile {tls / 'ca.crt'}\ncertfile {tls / 'server.crt'}\nkeyfile {tls / 'server.key'}\n"
        f"allow_anonymous false\npassword_file {passwd}\nacl_file {ROOT / 'deploy/mosquitto/acl'}\n"))
    broker.url = broker.url.replace("mqtt://", "mqtts://")
    agg = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fedatt-aggregator", protocol=mqtt.MQTTv311)
    agg.tls_set(ca_certs=str(tls / "ca.crt"))
    agg.username_pw_set("fedatt-aggregator", pw_agg)
    got: list[bytes] = []
    agg.on_message = lambda c, u, m: got.append(bytes(m.payload))
    good = bad = None
    try:
        broker.start()
        agg.connect("127.0.0.1", broker.port)
        agg.loop_start()
        agg.subscribe(TOPICS.all_updates, 1)
        flat = bundle.initial_parameters()
        agg.publish(TOPICS.model, wire.encode_model(wire.ModelMessage(bundle.model_id, 0, bundle.split(flat))),
                    qos=1, retain=True).wait_for_publish(5)
        agg.publish(TOPICS.round, wire.encode_round(wire.RoundTask(
            fleet=FLEET, round=1, model_id=bundle.model_id, model_round=0, deadline=time.time() + 60, quorum=1,
            cohort=("dev1", "dev2"), privacy=wire.PrivacySettings(clip_norm=1.0, noise_multiplier=5.0))),
            qos=1, retain=True).wait_for_publish(5)
        bad = EdgeClient(config(broker, tmp_path / "dev2", device_id="dev2", username="dev2", password="wrong",
                                ca_file=tls / "ca.crt"), bundle, data).start()
        good = EdgeClient(config(broker, tmp_path / "dev1", username="dev1", password=pw_dev,
                                 ca_file=tls / "ca.crt"), bundle, data).start()
        wait_for(lambda: got, 20, "update over TLS")
        assert wire.decode_update(got[0]).device_id == "dev1"
        assert not bad.wait_connected(0.5) and "refused" in caplog.text
    finally:
        for c in (good, bad):
            if c is not None:
                c.stop()
        agg.disconnect()
        agg.loop_stop()
        broker.stop()


@pytest.mark.parametrize("mode", ["thread", "external"])
def test_first_connect_retries_until_the_broker_is_up(mosquitto, bundle, data, tmp_path, mode):
    mosquitto.stop()
    client = EdgeClient(config(mosquitto, tmp_path / "dev1"), bundle, data)
    driver = FleetDriver() if mode == "external" else None
    try:
        if driver:
            driver.add(client)
        else:
            client.start()
        end = time.monotonic() + 0.6
        while time.monotonic() < end:  # a few failed attempts with backoff
            driver.run_once(0.05) if driver else time.sleep(0.05)
        assert not client.wait_connected(0)
        mosquitto.start()
        end = time.monotonic() + 10
        while not client.wait_connected(0) and time.monotonic() < end:
            driver.run_once(0.05) if driver else time.sleep(0.05)
        assert client.wait_connected(0)
    finally:
        if driver:
            driver.close()
        else:
            client.stop()

"""Load (issue 6, `make soak`): 1,000 device connections publish one round's updates to a local Mosquitto.

The aggregator is the real `fedatt aggregate` subprocess (fedatt-noise-aware, streaming: O(model) memory).
The devices are 1,000 lightweight paho clients driven by one selector loop in this process (not 1,000 ORT
trainers): each publishes a retained online status, follows the round task and, when invited, publishes a valid
update for a 53,314-parameter MLP bundle (213 KB), clipped and noised with the device's real mechanism (privatize, OS
CSPRNG noise). Asserted: every one of the 1,000 updates is PUBACKed and accepted, none rejected or lost; the
aggregator's peak RSS growth stays below the size of the round's raw payloads (see the known limit in
docs/RELIABILITY.md: the strategy streams in O(model), the service's event queue buffers the backlog). Reported: connect time, updates/s, aggregator and broker RSS. Marked slow: run with
`make soak` (or `pytest -m slow tests/test_load.py`); deselected from the default run.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edge_sdk import wire
from edge_sdk.privacy import privatize
from simulator.raw_fleet import ClientPump
from tests.mosquitto import Mosquitto

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]

ROOT = Path(__file__).resolve().parents[1]
N = 1000
FLEET = "load"
T = wire.Topics(FLEET)
CLIP, Z = 1.0, 1.0


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    import exporter
    from exporter import zoo

    return exporter.export_bundle(zoo.mlp(in_features=10, hidden=224), "1x10",
                                  tmp_path_factory.mktemp("b") / "mlp224", loss="cross_entropy")


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


class Device:
    def __init__(self, name: str, port: int, payload: bytes, stats: dict) -> None:
        self.name, self.payload, self.stats = name, payload, stats
        self.sent = False
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, clean_session=True,
                             protocol=mqtt.MQTTv311)
        self.c.max_inflight_messages_set(5)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_publish = self._on_publish
        self.c.connect("127.0.0.1", port, keepalive=120)
        self.update_mid: int | None = None

    def _on_connect(self, c, u, flags, rc, props):
        assert not rc.is_failure, rc
        self.stats["connected"] += 1
        c.subscribe(T.round, 1)
        c.publish(T.status(self.name), wire.encode_status(wire.Status(self.name, "online", time.time())), qos=1,
                  retain=True)

    def _on_message(self, c, u, msg):
        task = wire.decode_round(msg.payload)
        if self.name in task.cohort and not self.sent:
            self.sent = True
            self.stats["first_publish"] = self.stats["first_publish"] or time.monotonic()
            self.update_mid = c.publish(T.update(self.name), self.payload, qos=1).mid

    def _on_publish(self, c, u, mid, rc, props):
        if mid == self.update_mid:
            self.stats["pubacks"] += 1
            self.stats["last_puback"] = time.monotonic()


def make_payloads(bundle, round_: int) -> list[bytes]:
    shapes = [(p.name, p.shape) for p in bundle.trainable]
    d = sum(int(np.prod(s)) for _, s in shapes)
    rng = np.random.default_rng(1)
    out = []
    for i in range(N):
        flat, _ = privatize(rng.standard_normal(d) * 0.01, CLIP, Z)  # real mechanism: OS CSPRNG noise
        named, off = {}, 0
        for name, s in shapes:
            n = int(np.prod(s))
            named[name] = flat[off:off + n].reshape(s)
            off += n
        out.append(wire.encode_update(wire.UpdateMessage(
            model_id=bundle.model_id, round=round_, device_id=f"d{i:04d}", update_id=wire.new_update_id(),
            num_examples=10, clip_norm=CLIP, noise_multiplier=Z, encoding="f32", tensors=named, sdk="load")))
    return out


def test_1000_devices_publish_one_round(tmp_path, bundle):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * N:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8 * N), hard))
    t_start = time.monotonic()
    payloads = make_payloads(bundle, 1)
    update_bytes = len(payloads[0])
    # The deploy limits that matter here are kept (max_inflight 20, max_queued 1000 per client).
    broker = Mosquitto(tmp_path / "mq", extra_config="allow_anonymous true\nmax_connections -1\n"
                       "max_queued_messages 1000\nmax_inflight_messages 20\n", persistence=False).start()
    agg = None
    devices: list[Device] = []
    fleet = ClientPump()
    stats = {"connected": 0, "pubacks": 0, "first_publish": 0.0, "last_puback": 0.0}
    summary_box: list[bytes] = []
    obs = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="load-observer", protocol=mqtt.MQTTv311)
    obs.on_message = lambda c, u, m: summary_box.append(bytes(m.payload))
    try:
        obs.connect("127.0.0.1", broker.port)
        obs.subscribe(T.summary, 1)
        obs.loop_start()
        cmd = [sys.executable, "-m", "edge_sdk.cli", "aggregate", "--broker", broker.url, "--bundle", str(bundle.path),
               "--state", str(tmp_path / "state"), "--fleet", FLEET, "--strategy", "fedatt-noise-aware",
               "--quorum", str(N), "--over-selection", "1", "--min-online", str(N), "--round-timeout", "600",
               "--clip-norm", str(CLIP), "--noise-multiplier", str(Z), "--encodings", "f32", "--max-rounds", "1"]
        agg = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(3.0)  # imports + bundle verification
        assert agg.poll() is None, agg.stderr.read().decode()[-2000:]
        agg_base = rss_kib(agg.pid)
        t0 = time.monotonic()
        stats["payloads_s"] = round(t0 - t_start, 1)
        for i in range(N):
            d = Device(f"d{i:04d}", broker.port, payloads[i], stats)
            devices.append(d)
            fleet.add(d.c)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not summary_box:
            fleet.pump(0.05)
            if stats["connected"] == N and "connect_s" not in stats:
                stats["connect_s"] = time.monotonic() - t0
        assert summary_box, f"no round summary: {stats}"
        t_summary = time.monotonic()
        agg_after = rss_kib(agg.pid)
        broker_rss = rss_kib(broker.proc.pid)
        agg.wait(60)
    finally:
        fleet.close()
        obs.disconnect()
        obs.loop_stop()
        if agg is not None and agg.poll() is None:
            agg.kill()
            agg.wait()
        broker.stop()
    # With 1,000 participants the summary (per-device, per-layer weights) is ~0.4 MB: above max_json_bytes, which
    # is why summaries have their own limit (max_summary_bytes); a conforming receiver must accept it.
    summary_bytes = len(summary_box[0])
    summary = wire.decode_summary(summary_box[0])
    assert stats["connected"] == N and stats["pubacks"] == N
    assert len(summary.participants) == N and sorted(summary.participants) == [d.name for d in devices]
    assert summary.rejections == {} and summary.duplicates == 0 and summary.late == 0
    publish_window = stats["last_puback"] - stats["first_publish"]
    end_to_end = t_summary - stats["first_publish"]
    growth_mib = (agg_after["VmHWM"] - agg_base["VmRSS"]) / 1024
    all_updates_mib = N * update_bytes / 2**20
    figures = {"devices": N, "setup_s": stats["payloads_s"], "update_bytes": update_bytes, "connect_s": round(stats["connect_s"], 2),
               "publish_window_s": round(publish_window, 2), "updates_per_s_puback": round(N / publish_window, 1),
               "updates_per_s_end_to_end": round(N / end_to_end, 1), "aggregation_duration_s": round(summary.duration_s, 2),
               "agg_rss_before_mib": round(agg_base["VmRSS"] / 1024, 1), "agg_peak_rss_mib": round(agg_after["VmHWM"] / 1024, 1),
               "agg_rss_growth_mib": round(growth_mib, 1), "all_updates_mib": round(all_updates_mib, 1),
               "summary_bytes": summary_bytes, "broker_rss_mib": round(broker_rss["VmRSS"] / 1024, 1), "broker_peak_rss_mib": round(broker_rss["VmHWM"] / 1024, 1)}
    print("\nload: " + json.dumps(figures))
    # The strategy streams (O(model)), but the service's event queue is unbounded: under a burst it holds the
    # payloads the engine thread has not reached yet (docs/RELIABILITY.md, known limits). Bound asserted: the
    # aggregator never holds more than the round's raw payloads once (no decoded copies pile up).
    assert growth_mib < all_updates_mib, figures

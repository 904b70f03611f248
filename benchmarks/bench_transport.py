"""Benchmark 3: bytes on the wire per update (framing overhead, int8 ratio) and end-to-end round latency over MQTT.

Part A - sizes. For the zoo bundles (their real trainable layout and names) and synthetic models of P float32
parameters in 4 layers, an update is encoded with `edge_sdk.wire.encode_update` as f32 and as int8
(`edge_sdk.compression.quantize_int8` per tensor, plus its `#scale` tensor). Reported against the raw 4·P bytes:
framing overhead = (len(payload) - 4P) / 4P and int8 ratio = len(int8 payload) / 4P; also the MQTT PUBLISH
packet (fixed header + topic + packet id) on top. Targets: framing <= 2 %, int8 <= 0.27x.

Part B - round latency. A real Mosquitto (tests/mosquitto.py) on a loopback port, the real aggregator
(`fedatt aggregate` = broker.service.AggregatorService, fedatt-noise-aware, in its own process) and K
lightweight paho devices driven by one selector loop in this process (not ORT trainers): each publishes a retained
online status, follows the round task and, when invited, publishes a valid pre-encoded update (clipped and
noised with edge_sdk.privacy.privatize). An observer client timestamps the round announcement and the published
model of the same round: latency = model received - announcement received (both on this process' clock).
Model: the zoo CNN bundle (105,898 parameters, ~424 KB f32 updates). K = 10, 50, 200; quorum = cohort = K.

Run: python -m benchmarks.bench_transport [--quick] [--rounds R]
"""
from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import ROOT, base_parser, peak_rss_mib, rss_mib, table, wait_for_quiet, write_result

CLIP, Z = 1.0, 1.0


# ------------------------------------------------------------------------------------------ sizes
def mqtt_publish_overhead(topic: str, payload_len: int, qos: int = 1) -> int:
    """Bytes an MQTT 3.1.1 PUBLISH adds around the payload: fixed header, topic, packet id."""
    var = 2 + len(topic.encode()) + (2 if qos else 0)
    remaining = var + payload_len
    n = 1
    while remaining >= 128:
        remaining //= 128
        n += 1
    return 1 + n + var


def encode_sizes(layout: list[tuple[str, tuple[int, ...]]], model_id: str, rng: np.random.Generator
                 ) -> dict[str, Any]:
    from edge_sdk import wire
    from edge_sdk.compression import quantize_int8

    p = sum(int(np.prod(s)) for _, s in layout)
    named = {n: (rng.standard_normal(int(np.prod(s))).astype(np.float32) * np.float32(0.01)).reshape(s)
             for n, s in layout}
    msg = wire.UpdateMessage(model_id=model_id, round=12345, device_id="device-0001", update_id=wire.new_update_id(),
                             num_examples=500, clip_norm=CLIP, noise_multiplier=Z, encoding="f32", tensors=named,
                             sdk="fedatt-edge/0.1.0")
    f32 = wire.encode_update(msg)
    quant = {n: quantize_int8(a, rng) for n, a in named.items()}
    i8 = wire.encode_update(wire.UpdateMessage(**{**msg.__dict__, "encoding": "int8"}), quantized=quant)
    wire.decode_update(f32)
    wire.decode_update(i8)  # both must be valid protocol messages
    raw = 4 * p
    topic = wire.Topics("fleet-1").update("device-0001")
    return {"P": p, "tensors": len(layout), "raw_bytes": raw, "f32_bytes": len(f32), "int8_bytes": len(i8),
            "framing_overhead": (len(f32) - raw) / raw, "int8_ratio": len(i8) / raw,
            "mqtt_f32_bytes": len(f32) + mqtt_publish_overhead(topic, len(f32)),
            "mqtt_overhead": (len(f32) + mqtt_publish_overhead(topic, len(f32)) - raw) / raw}


def sizes_part(quick: bool) -> list[dict[str, Any]]:
    from benchmarks.bench_training import MODELS, bundle_dir
    from edge_sdk.bundle import Bundle

    rng = np.random.default_rng(0)
    out = []
    for name in MODELS:
        b = Bundle.load(bundle_dir(name))
        r = encode_sizes([(p.name, tuple(p.shape)) for p in b.trainable], b.model_id, rng)
        out.append({"model": name, **r})
    mid = "sha256:" + "0" * 64
    for p in ((1_000, 100_000, 1_000_000) if quick else (1_000, 10_000, 100_000, 1_000_000, 4_000_000)):
        from benchmarks.bench_aggregation import layer_sizes

        layout = [(f"layers.{i}.weight", (s,)) for i, s in enumerate(layer_sizes(p))]
        out.append({"model": f"synthetic P={p:,}", **encode_sizes(layout, mid, rng)})
    return out


# ---------------------------------------------------------------------------------------- latency
class Device:
    """A lightweight device: retained online status, follows the round task, publishes its update once per round."""

    def __init__(self, name: str, port: int, payloads: dict[int, bytes], topics: Any, stats: dict) -> None:
        import paho.mqtt.client as mqtt

        from edge_sdk import wire

        self.wire = wire
        self.name, self.payloads, self.t, self.stats = name, payloads, topics, stats
        self.sent: set[int] = set()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, clean_session=True,
                             protocol=mqtt.MQTTv311)
        self.c.max_inflight_messages_set(5)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port, keepalive=120)

    def _on_connect(self, c, u, flags, rc, props) -> None:
        self.stats["connected"] += 1
        c.subscribe(self.t.round, 1)
        c.publish(self.t.status(self.name), self.wire.encode_status(self.wire.Status(self.name, "online", time.time())),
                  qos=1, retain=True)

    def _on_message(self, c, u, msg) -> None:
        task = self.wire.decode_round(msg.payload)
        if self.name in task.cohort and task.round not in self.sent and task.round in self.payloads:
            self.sent.add(task.round)
            c.publish(self.t.update(self.name), self.payloads[task.round], qos=1)


def make_payloads(bundle: Any, k: int, rounds: int, encoding: str) -> list[dict[int, bytes]]:
    from edge_sdk import wire
    from edge_sdk.compression import quantize_int8
    from edge_sdk.privacy import privatize

    rng = np.random.default_rng(1)
    out = []
    for i in range(k):
        per = {}
        flat, _ = privatize(rng.standard_normal(bundle.num_trainable) * 0.01, CLIP, Z, rng=rng)
        named = bundle.split(np.asarray(flat, dtype=np.float32))
        for r in range(1, rounds + 1):
            msg = wire.UpdateMessage(model_id=bundle.model_id, round=r, device_id=f"d{i:04d}",
                                     update_id=wire.new_update_id(), num_examples=10, clip_norm=CLIP,
                                     noise_multiplier=Z, encoding=encoding, tensors=named, sdk="bench")
            quant = {n: quantize_int8(a, rng) for n, a in named.items()} if encoding == "int8" else None
            per[r] = wire.encode_update(msg, quantized=quant)
        out.append(per)
    return out


def latency_run(bundle: Any, k: int, rounds: int, encoding: str, workdir: Path) -> dict[str, Any]:
    import paho.mqtt.client as mqtt

    from edge_sdk import wire
    from tests.mosquitto import Mosquitto

    fleet = f"bench{k}{encoding}"
    topics = wire.Topics(fleet)
    payloads = make_payloads(bundle, k, rounds, encoding)
    broker = Mosquitto(workdir / "mq", extra_config="allow_anonymous true\nmax_connections -1\n"
                       "max_queued_messages 1000\nmax_inflight_messages 20\n", persistence=False).start()
    agg = None
    from simulator.raw_fleet import ClientPump

    devices: list[Device] = []
    fleet_pump = ClientPump()
    stats = {"connected": 0}
    events: list[tuple[str, int, float]] = []  # (kind, round, monotonic)
    summaries: dict[int, Any] = {}

    def on_obs(c, u, m) -> None:
        now = time.monotonic()
        if m.topic == topics.round:
            task = wire.decode_round(m.payload)
            events.append(("round", task.round, now))
        elif m.topic == topics.model:
            events.append(("model", wire.decode_model(m.payload).round, now))
        elif m.topic == topics.summary:
            s = wire.decode_summary(m.payload)
            summaries[s.round] = s

    obs = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"obs-{fleet}", protocol=mqtt.MQTTv311)
    obs.on_message = on_obs
    try:
        obs.connect("127.0.0.1", broker.port)
        obs.subscribe([(topics.round, 1), (topics.model, 1), (topics.summary, 1)])
        obs.loop_start()
        cmd = [sys.executable, "-m", "edge_sdk.cli", "aggregate", "--broker", broker.url, "--bundle", str(bundle.path),
               "--state", str(workdir / "state"), "--fleet", fleet, "--strategy", "fedatt-noise-aware",
               "--quorum", str(k), "--over-selection", "1", "--min-online", str(k), "--round-timeout", "300",
               "--clip-norm", str(CLIP), "--noise-multiplier", str(Z), "--encodings", "f32,int8",
               "--max-rounds", str(rounds)]
        agg = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for i in range(k):
            d = Device(f"d{i:04d}", broker.port, payloads[i], topics, stats)
            devices.append(d)
            fleet_pump.add(d.c)
        deadline = time.monotonic() + 120 + 5 * k
        # The aggregator's peak RSS is sampled from /proc while it runs: it exits by itself after --max-rounds (an
        # exited process has no VmHWM; the first version read it afterwards and recorded 0 MiB), and wait4's
        # ru_maxrss is no substitute: Linux carries the forked parent's RSS (this process, holding K payloads)
        # across exec into it.
        agg_peak = 0.0
        while time.monotonic() < deadline and len(summaries) < rounds:
            if agg.poll() is not None and len(summaries) < rounds:
                raise RuntimeError("aggregator exited: " + agg.stderr.read().decode()[-2000:])
            fleet_pump.pump(0.02)
            agg_peak = max(agg_peak, peak_rss_mib(agg.pid))
        time.sleep(0.2)  # let the observer see the last model
        agg_peak = max(agg_peak, peak_rss_mib(agg.pid))
        if len(summaries) < rounds:
            raise RuntimeError(f"only {len(summaries)} of {rounds} rounds closed (connected {stats['connected']})")
        broker_peak = peak_rss_mib(broker.proc.pid)
        agg.wait(60)
    finally:
        fleet_pump.close()
        obs.disconnect()
        obs.loop_stop()
        if agg is not None and agg.poll() is None:
            agg.kill()
            agg.wait()
        broker.stop()
    lat = []
    for r in range(1, rounds + 1):
        announced = min(t for kind, rr, t in events if kind == "round" and rr == r)
        published = min(t for kind, rr, t in events if kind == "model" and rr == r)
        lat.append(published - announced)
    s = [summaries[r] for r in range(1, rounds + 1)]
    assert all(len(x.participants) == k and not x.rejections for x in s), [x.rejections for x in s]
    return {"K": k, "encoding": encoding, "rounds": rounds, "update_bytes": len(payloads[0][1]),
            "latency_s": lat, "latency_median_s": statistics.median(lat),
            "aggregator_duration_s": [x.duration_s for x in s], "bytes_in": [x.bytes_in for x in s],
            "aggregator_peak_rss_mib": agg_peak, "broker_peak_rss_mib": broker_peak}


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="rounds per K (default 3, quick 2)")
    args = p.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    ks = (10, 50) if args.quick else (10, 50, 200)
    encodings = ("f32",) if args.quick else ("f32", "int8")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))

    sizes = sizes_part(args.quick)
    print(table(["model", "P", "raw 4P bytes", "f32 payload", "framing", "MQTT packet overhead", "int8 payload",
                 "int8 / 4P"],
                [[r["model"], r["P"], r["raw_bytes"], r["f32_bytes"], f"{100 * r['framing_overhead']:.3f} %",
                  f"{100 * r['mqtt_overhead']:.3f} %", r["int8_bytes"], f"{r['int8_ratio']:.4f}x"] for r in sizes]))
    worst_frame = max(sizes, key=lambda r: r["framing_overhead"])
    worst_int8 = max(sizes, key=lambda r: r["int8_ratio"])
    print(f"\nworst framing {100 * worst_frame['framing_overhead']:.2f} % ({worst_frame['model']}); "
          f"worst int8 ratio {worst_int8['int8_ratio']:.4f}x ({worst_int8['model']})")

    from benchmarks.bench_training import bundle_dir
    from edge_sdk.bundle import Bundle

    bundle = Bundle.load(bundle_dir("cnn"))
    quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet else wait_for_quiet(0, quiet=True)
    lat = []
    with tempfile.TemporaryDirectory(prefix="fedatt-bench-transport-") as tmp:
        for enc in encodings:
            for k in ks:
                r = latency_run(bundle, k, rounds, enc, Path(tmp) / f"{enc}{k}")
                lat.append(r)
                print(f"  K={k:<4} {enc}: round latency median {r['latency_median_s']:.3f} s "
                      f"({', '.join(f'{x:.3f}' for x in r['latency_s'])})", flush=True)
    print()
    print(table(["K", "encoding", "update bytes", "latency median s", "latencies s", "agg duration s (summary)",
                 "aggregator peak RSS MiB", "Mosquitto peak RSS MiB"],
                [[r["K"], r["encoding"], r["update_bytes"], r["latency_median_s"],
                  " ".join(f"{x:.3f}" for x in r["latency_s"]), statistics.median(r["aggregator_duration_s"]),
                  r["aggregator_peak_rss_mib"], r["broker_peak_rss_mib"]] for r in lat]))
    zoo = [r for r in sizes if not r["model"].startswith("synthetic")]
    targets = {"framing_le_2pct": {"worst": worst_frame["framing_overhead"], "worst_model": worst_frame["model"],
                                   "met": worst_frame["framing_overhead"] <= 0.02,
                                   "zoo_worst": max(r["framing_overhead"] for r in zoo)},
               "int8_le_0.27x": {"worst": worst_int8["int8_ratio"], "worst_model": worst_int8["model"],
                                 "met": worst_int8["int8_ratio"] <= 0.27,
                                 "zoo_worst": max(r["int8_ratio"] for r in zoo)}}
    path = write_result("bench_transport", {"sizes": sizes, "latency": lat, "targets": targets, "quiet": quiet,
                                            "bench_process_peak_rss_mib": peak_rss_mib(), "rss_mib": rss_mib()},
                        quick=args.quick)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

"""Processes that never use torch do not load it: the simulator's training workers and `fedatt aggregate`.

`import onnxruntime` (1.19.2) imports torch whenever torch is installed (~240 MiB per process); both entry points
call edge_sdk._ort.block_torch() first. Checked from outside the process: no libtorch mapped, and peak memory
(VmHWM) far below what torch alone costs.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edge_sdk import _ort
from tests.polling import wait_for
from tests.test_aggregator_mqtt import bundle, data  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MIB = 150  # measured: ~70 MiB without torch, ~290 MiB with it


def status_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_block_torch_blocks_and_is_a_noop_once_torch_is_loaded():
    import torch  # noqa: F401  (this test process needs it: the exporter)

    assert _ort.block_torch() is False
    assert not any(isinstance(f, _ort.TorchBlocked) for f in sys.meta_path)
    script = ("import sys; from edge_sdk._ort import block_torch, training_api\n"
              "assert block_torch() and block_torch()\n"
              "training_api()\n"
              "try:\n    import torch\nexcept ModuleNotFoundError as e:\n    print('blocked', e.name)\n"
              "assert 'torch' not in sys.modules and 'onnxruntime' in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["blocked", "torch"]


def test_simulator_training_workers_do_not_load_torch():
    from simulator.run import training_pool

    pool = training_pool(1)
    try:
        assert pool.submit(_ort.ort_version).result(120) == "1.19.2"  # the worker imported onnxruntime
        assert pool.submit(_ort.block_torch).result(30) is True  # True: torch is not in the worker's sys.modules
        (pid,) = list(pool._processes)
        assert not maps_torch(pid)
        assert status_mib(pid, "VmHWM") < LIMIT_MIB
    finally:
        pool.shutdown()


@pytest.mark.mosquitto
def test_aggregate_cli_does_not_load_torch(tmp_path, mosquitto, bundle):
    fleet = "notorch"
    models: list[bytes] = []
    obs = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="obs", protocol=mqtt.MQTTv311)
    obs.on_connect = lambda c, u, f, rc, p: c.subscribe(f"fedatt/{fleet}/model", 1)
    obs.on_message = lambda c, u, m: models.append(bytes(m.payload))
    obs.connect("127.0.0.1", mosquitto.port)
    obs.loop_start()
    proc = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "aggregate", "--broker", mosquitto.url,
                             "--bundle", str(bundle.path), "--state", str(tmp_path / "state"), "--fleet", fleet,
                             "--quorum", "1"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the retained initial model is published after the bundle's checkpoint was read with onnxruntime
        wait_for(lambda: models or proc.poll() is not None, 60, "the aggregator's retained model")
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.5)
        assert not maps_torch(proc.pid)
        assert status_mib(proc.pid, "VmHWM") < LIMIT_MIB
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
        obs.disconnect()
        obs.loop_stop()
    assert proc.returncode == 0, err
    assert "stopped after round 0" in out

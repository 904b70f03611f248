"""Checkpoints (broker/state.py): round trip, two generations, corrupt/partial files, failed writes, kill -9."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from broker import state
from broker.state import Checkpoint, CheckpointError, CheckpointStore

MID = "sha256:" + "ab" * 32
ROOT = Path(__file__).resolve().parents[1]


def ckpt(rnd: int, value: float | None = None) -> Checkpoint:
    v = float(rnd if value is None else value)
    return Checkpoint(
        fleet="f1", model_id=MID, round=rnd,
        model={"w": np.full((4, 3), v, np.float32), "b": np.full(3, -v, np.float32)},
        strategy="fedatt-noise-aware",
        strategy_state={"version": 1, "rounds": rnd, "direction_decay": 0.9,
                        "direction/w": np.full((4, 3), 0.5 * v, np.float32)},
        registry={"d1": {"first_seen": 1.0, "last_seen": 2.0, "online": True, "participations": rnd,
                         "accepted": rnd, "rejections": {"norm_bound": 1}, "last_round": rnd}},
        history=[{"round": r, "participants": ["d1"]} for r in range(1, rnd + 1)],
        totals={"accepted": rnd, "rejections": {"norm_bound": 1}}, created=1000.0 + rnd)


def test_empty_directory_has_no_checkpoint(tmp_path):
    assert CheckpointStore(tmp_path / "missing").load() is None
    assert CheckpointStore(tmp_path).load() is None


def test_round_trip(tmp_path):
    store = CheckpointStore(tmp_path)
    gen = store.save(ckpt(3))
    assert gen.name == "gen-000000000003"
    got = store.load()
    assert (got.fleet, got.model_id, got.round, got.strategy, got.created) == ("f1", MID, 3, "fedatt-noise-aware",
                                                                                1003.0)
    np.testing.assert_array_equal(got.model["w"], np.full((4, 3), 3.0, np.float32))
    assert got.model["w"].dtype == np.float32
    np.testing.assert_array_equal(got.strategy_state["direction/w"], np.full((4, 3), 1.5, np.float32))
    assert got.strategy_state["version"] == 1 and got.strategy_state["rounds"] == 3
    assert got.registry["d1"]["rejections"] == {"norm_bound": 1}
    assert [h["round"] for h in got.history] == [1, 2, 3]
    # Files on disk: safetensors + JSON only (no pickle), an index with sizes and hashes, a CURRENT pointer.
    names = sorted(p.name for p in gen.iterdir())
    assert names == ["INDEX.json", "model.safetensors", "state.json", "strategy.safetensors"]
    index = json.loads((gen / "INDEX.json").read_text())
    assert set(index["files"]) == {"model.safetensors", "state.json", "strategy.safetensors"}
    assert json.loads((tmp_path / "CURRENT").read_text())["generation"] == gen.name


def test_stateless_strategy_writes_no_strategy_file(tmp_path):
    c = ckpt(1)
    c.strategy_state = {}
    gen = CheckpointStore(tmp_path).save(c)
    assert not (gen / "strategy.safetensors").exists()
    assert CheckpointStore(tmp_path).load().strategy_state == {}


def test_keeps_two_generations(tmp_path):
    store = CheckpointStore(tmp_path)
    for r in range(1, 6):
        store.save(ckpt(r))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT", "gen-000000000004", "gen-000000000005"]
    assert store.load().round == 5


@pytest.mark.parametrize("damage", ["flip_model_byte", "truncate_state", "delete_index", "garbage_index",
                                    "delete_model"])
def test_damaged_current_generation_falls_back_to_previous(tmp_path, damage, caplog):
    store = CheckpointStore(tmp_path)
    store.save(ckpt(1))
    gen = store.save(ckpt(2))
    if damage == "flip_model_byte":
        data = bytearray((gen / "model.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (gen / "model.safetensors").write_bytes(bytes(data))
    elif damage == "truncate_state":
        p = gen / "state.json"
        p.write_bytes(p.read_bytes()[:10])
    elif damage == "delete_index":
        (gen / "INDEX.json").unlink()
    elif damage == "garbage_index":
        (gen / "INDEX.json").write_text("{nope")
    else:
        (gen / "model.safetensors").unlink()
    with caplog.at_level("ERROR", logger="broker.state"):
        got = store.load()
    assert got.round == 1
    assert any(getattr(r, "fedatt", {}).get("event") == "checkpoint_damaged" for r in caplog.records)


def test_corrupt_current_pointer_scans_generations(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(ckpt(1))
    store.save(ckpt(2))
    (tmp_path / "CURRENT").write_text("\x00garbage")
    assert store.load().round == 2
    (tmp_path / "CURRENT").unlink()
    assert store.load().round == 2


def test_no_valid_checkpoint_is_a_clear_error(tmp_path):
    store = CheckpointStore(tmp_path)
    for r in (1, 2):
        gen = store.save(ckpt(r))
        (gen / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError) as e:
        store.load()
    assert str(tmp_path) in str(e.value) and "no valid checkpoint" in str(e.value)


def test_failed_flip_leaves_previous_checkpoint_current(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    store.save(ckpt(1))

    def boom(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(state.os, "replace", boom)
    with pytest.raises(CheckpointError) as e:
        store.save(ckpt(2))
    assert "CURRENT" in str(e.value) and isinstance(e.value.__cause__, OSError)
    monkeypatch.undo()
    got = store.load()
    assert got.round == 1
    np.testing.assert_array_equal(got.model["w"], np.full((4, 3), 1.0, np.float32))
    assert not list(tmp_path.glob(".tmp-*"))
    # The next save (the re-run round 2) replaces the orphaned generation and succeeds.
    store.save(ckpt(2, value=7.0))
    got = store.load()
    assert got.round == 2 and got.model["w"][0, 0] == 7.0


def test_write_failing_midway_keeps_previous(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    store.save(ckpt(1))
    real = state._write_durable
    calls = {"n": 0}

    def disk_full_on_second_file(path, data):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(path, "xb") as f:
                f.write(data[: len(data) // 2])  # a partial file, then the disk is full
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(state, "_write_durable", disk_full_on_second_file)
    with pytest.raises(CheckpointError) as e:
        store.save(ckpt(2))
    assert "No space left" in str(e.value) and str(tmp_path) in str(e.value)
    monkeypatch.undo()
    assert store.load().round == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT", "gen-000000000001"]


def test_unwritable_directory_is_a_clear_error(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path / "ckpt")
    store.save(ckpt(1))
    if os.geteuid() == 0:  # root ignores permission bits: simulate the kernel's answer instead
        def denied(self, *a, **kw):
            raise PermissionError(13, "Permission denied", str(self))
        monkeypatch.setattr(state.Path, "mkdir", denied)
    else:
        os.chmod(tmp_path / "ckpt", 0o500)
    try:
        with pytest.raises(CheckpointError) as e:
            store.save(ckpt(2))
        assert "ckpt" in str(e.value) and "Permission denied" in str(e.value)
    finally:
        os.chmod(tmp_path / "ckpt", 0o700)
    monkeypatch.undo()
    assert store.load().round == 1


def test_model_must_not_be_empty(tmp_path):
    c = ckpt(1)
    c.model = {}
    with pytest.raises(CheckpointError):
        CheckpointStore(tmp_path).save(c)
    assert not any(tmp_path.iterdir())


_WRITER = r"""
import sys
sys.path.insert(0, sys.argv[2])
from tests.test_state import ckpt
from broker.state import CheckpointStore
store = CheckpointStore(sys.argv[1])
r = int(sys.argv[3])
while True:
    store.save(ckpt(r))
    print(r, flush=True)
    r += 1
"""


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.35, 0.5, 0.8])
def test_kill_9_at_any_moment_leaves_a_loadable_checkpoint(tmp_path, delay):
    store = CheckpointStore(tmp_path / "ckpt")
    store.save(ckpt(1))
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "ckpt"), str(ROOT), "2"],
                            stdout=subprocess.PIPE, text=True)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=10)
    done = [int(x) for x in out.split()]
    last_done = done[-1] if done else 1
    got = store.load()
    # Every save that returned is durable; one more may have committed just before the kill.
    assert last_done <= got.round <= last_done + 1
    np.testing.assert_array_equal(got.model["w"], np.full((4, 3), float(got.round), np.float32))
    assert [h["round"] for h in got.history] == list(range(1, got.round + 1))

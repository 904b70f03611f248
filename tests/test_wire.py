"""The wire protocol: round trips, every rejection reason, and agreement with docs/PROTOCOL.md."""
from __future__ import annotations

import json
import re
import struct
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as st

from edge_sdk import wire
from edge_sdk.wire import (ModelMessage, PrivacySettings, RoundSummary, RoundTask, Status, Topics,
                           TrainSettings, UpdateMessage, WireError)

DOC = (Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md").read_text()
MID = "sha256:" + "ab" * 32


def doc_table(heading: str) -> list[list[str]]:
    """Rows (first column first) of the first markdown table after `heading`."""
    section = DOC.split(heading, 1)[1]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip().strip("`") for c in line.strip().strip("|").split("|")])
        elif rows and not line.strip():
            break
    return rows[1:]  # drop the column titles


def update_msg(**over) -> UpdateMessage:
    base = dict(model_id=MID, round=3, device_id="dev-1", update_id=wire.new_update_id(), num_examples=40,
                clip_norm=1.0, noise_multiplier=0.5, encoding="f32", sdk="fedatt-py/0.1",
                tensors={"fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "fc.bias": np.ones(2, np.float32)})
    base.update(over)
    return UpdateMessage(**base)


def raw_container(meta: dict, tensors: dict) -> bytes:
    return st.save(tensors, metadata=meta)


def test_update_round_trip_f32():
    msg = update_msg()
    out = wire.decode_update(wire.encode_update(msg))
    assert out.device_id == "dev-1" and out.round == 3 and out.num_examples == 40
    assert out.clip_norm == 1.0 and out.noise_multiplier == 0.5 and out.update_id == msg.update_id
    np.testing.assert_array_equal(out.tensors["fc.weight"], msg.tensors["fc.weight"])


def test_update_round_trip_int8():
    q = {"fc.weight": (np.array([[1, -2, 3], [127, -127, 0]], np.int8), 0.5), "fc.bias": (np.zeros(2, np.int8), 0.0)}
    msg = update_msg(encoding="int8")
    out = wire.decode_update(wire.encode_update(msg, quantized=q))
    np.testing.assert_array_equal(out.tensors["fc.weight"], np.array([[0.5, -1, 1.5], [63.5, -63.5, 0]], np.float32))
    assert out.tensors["fc.weight"].dtype == np.float32


def test_model_round_trip():
    t = {"w": np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)}
    out = wire.decode_model(wire.encode_model(ModelMessage(model_id=MID, round=0, tensors=t)))
    assert out.round == 0 and out.model_id == MID
    np.testing.assert_array_equal(out.tensors["w"], t["w"])


def test_round_task_round_trip():
    task = RoundTask(fleet="demo", round=7, model_id=MID, model_round=6, deadline=1e9, quorum=2,
                     cohort=("a", "b", "c"), attempt=2, train=TrainSettings(2, 16, None),
                     privacy=PrivacySettings(1.5, 10.0, "replace_one", 1e-6), encodings=("f32",), issued_at=123.5)
    assert wire.decode_round(wire.encode_round(task)) == task


def test_status_and_summary_round_trip():
    s = wire.decode_status(wire.encode_status(Status("dev-9", "offline", 5.0, "x")))
    assert (s.device_id, s.state, s.ts) == ("dev-9", "offline", 5.0)
    summ = RoundSummary(fleet="f", round=2, model_id=MID, strategy="fedatt", participants=("a",),
                        rejections={"non_finite": 1}, weights={"a": {"w": 1.0}}, bytes_in=10, duration_s=0.5)
    assert wire.decode_summary(wire.encode_summary(summ)) == summ


def test_topics_and_identity():
    t = Topics("fleet-1")
    assert t.update("d1") == "fedatt/fleet-1/updates/d1"
    assert t.device_of("fedatt/fleet-1/updates/d1", wire.KIND_UPDATE) == "d1"
    for bad in ("fedatt/other/updates/d1", "fedatt/fleet-1/updates/a/b", "fedatt/fleet-1/updates/+"):
        with pytest.raises(WireError) as e:
            t.device_of(bad, wire.KIND_UPDATE)
        assert e.value.reason == "bad_topic"
    with pytest.raises(WireError):
        Topics("a/b")


def good_meta() -> dict:
    return {"protocol": "1", "kind": "update", "model_id": MID, "round": "1", "device_id": "d",
            "update_id": "0" * 32, "num_examples": "1", "clip_norm": "1.0", "noise_multiplier": "0",
            "encoding": "f32", "sdk": ""}


@pytest.mark.parametrize("payload, reason", [
    (b"", "bad_container"),
    (b"\x01\x02", "bad_container"),
    (struct.pack("<Q", 10**9) + b"{}", "bad_header"),
    (struct.pack("<Q", 100) + b"{}", "bad_container"),
    (struct.pack("<Q", 2) + b"\xff\xfe", "bad_header"),
    (struct.pack("<Q", 2) + b"[]", "bad_header"),
    (b"\x00" * (17 * 1024 * 1024), "too_large"),
])
def test_update_rejects_broken_containers(payload, reason):
    with pytest.raises(WireError) as e:
        wire.decode_update(payload)
    assert e.value.reason == reason


@pytest.mark.parametrize("change, tensors, reason", [
    ({"protocol": "2"}, None, "bad_protocol_version"),
    ({"kind": "model"}, None, "wrong_kind"),
    ({"model_id": "md5:1"}, None, "bad_field"),
    ({"round": "-1"}, None, "bad_field"),
    ({"round": "1e3"}, None, "bad_field"),
    ({"device_id": "a/b"}, None, "bad_field"),
    ({"device_id": "d\n"}, None, "bad_field"),  # a regex `$` alone would accept the trailing newline
    ({"update_id": "xyz"}, None, "bad_field"),
    ({"update_id": "0" * 32 + "\n"}, None, "bad_field"),
    ({"model_id": MID + "\n"}, None, "bad_field"),
    ({"clip_norm": "0"}, None, "bad_field"),
    ({"clip_norm": "nan"}, None, "bad_field"),
    ({"noise_multiplier": "inf"}, None, "bad_field"),
    ({"encoding": "f16"}, None, "bad_encoding"),
    ({}, {"w": np.ones(2, np.float64)}, "bad_dtype"),
    ({}, {"w": np.array([1.0, np.nan], np.float32)}, "non_finite"),
    ({}, {"w": np.array([np.inf], np.float32)}, "non_finite"),
    ({"encoding": "int8"}, {"w": np.ones(2, np.int8)}, "bad_tensors"),
    ({"encoding": "int8"}, {"w": np.ones(2, np.int8), "w#scale": np.ones(2, np.float32)}, "bad_tensors"),
    ({"encoding": "int8"}, {"w": np.full(2, -128, np.int8), "w#scale": np.ones(1, np.float32)}, "bad_tensors"),
    ({"encoding": "int8"}, {"w": np.ones(2, np.float32), "w#scale": np.ones(1, np.float32)}, "bad_dtype"),
    ({}, {"w#scale": np.ones(1, np.float32)}, "bad_tensors"),
])
def test_update_rejects_bad_metadata_and_tensors(change, tensors, reason):
    meta = {**good_meta(), **change}
    payload = raw_container(meta, tensors if tensors is not None else {"w": np.ones(2, np.float32)})
    with pytest.raises(WireError) as e:
        wire.decode_update(payload)
    assert e.value.reason == reason, e.value


def test_missing_metadata_field_is_rejected():
    for key in ("model_id", "round", "device_id", "update_id", "num_examples", "clip_norm", "noise_multiplier"):
        meta = good_meta()
        del meta[key]
        with pytest.raises(WireError) as e:
            wire.decode_update(raw_container(meta, {"w": np.ones(1, np.float32)}))
        assert e.value.reason == "bad_field", key


def test_check_tensors_against_manifest():
    expected = {"a": (2, 3), "b": (2,)}
    wire.check_tensors({"a": np.zeros((2, 3)), "b": np.zeros(2)}, expected)
    with pytest.raises(WireError) as e:
        wire.check_tensors({"a": np.zeros((3, 2)), "b": np.zeros(2)}, expected)
    assert e.value.reason == "bad_shape"
    with pytest.raises(WireError) as e:
        wire.check_tensors({"a": np.zeros((2, 3))}, expected)
    assert e.value.reason == "wrong_tensors"


@pytest.mark.parametrize("obj, reason", [
    ({"protocol": 1, "kind": "status", "device_id": "d", "state": "maybe", "ts": 1}, "bad_field"),
    ({"protocol": "1", "kind": "status", "device_id": "d", "state": "online", "ts": 1}, "bad_protocol_version"),
    ({"protocol": 1, "kind": "round", "device_id": "d", "state": "online", "ts": 1}, "wrong_kind"),
    ({"protocol": 1, "kind": "status", "device_id": "d", "state": "online", "ts": "1"}, "bad_field"),
])
def test_status_rejections(obj, reason):
    with pytest.raises(WireError) as e:
        wire.decode_status(json.dumps(obj).encode())
    assert e.value.reason == reason


def test_json_rejections():
    for payload, reason in [(b"\xff", "bad_json"), (b"[1]", "bad_json"), (b"{" * 10, "bad_json"),
                            (b'{"protocol": NaN}', "bad_json"), (b" " * 300_000, "too_large")]:
        with pytest.raises(WireError) as e:
            wire.decode_status(payload)
        assert e.value.reason == reason


def test_round_task_rejections():
    good = json.loads(wire.encode_round(RoundTask(fleet="f", round=1, model_id=MID, model_round=0, deadline=10.0,
                                                  quorum=2, cohort=("a", "b"))))
    for change in ({"quorum": 3}, {"cohort": ["a", "a"]}, {"cohort": ["a/b", "c"]}, {"round": 0},
                   {"privacy": {**good["privacy"], "adjacency": "swap"}}, {"encodings": ["zip"]},
                   {"train": {**good["train"], "epochs": 0}}, {"privacy": {**good["privacy"], "clip_norm": -1}},
                   {"cohort": [f"d{i}" for i in range(10_001)]}):
        with pytest.raises(WireError) as e:
            wire.decode_round(json.dumps({**good, **change}).encode())
        assert e.value.reason == "bad_field", change


# ------------------------------------------------------------------------- PROTOCOL.md agrees with code
def test_doc_update_and_model_metadata_match_code():
    doc_update = {r[0] for r in doc_table("### `update`")}
    payload = wire.encode_update(update_msg())
    (n,) = struct.unpack("<Q", payload[:8])
    assert set(json.loads(payload[8:8 + n])["__metadata__"]) == doc_update
    doc_model = {r[0] for r in doc_table("### `model`")}
    payload = wire.encode_model(ModelMessage(MID, 1, {"w": np.ones(1, np.float32)}))
    (n,) = struct.unpack("<Q", payload[:8])
    assert set(json.loads(payload[8:8 + n])["__metadata__"]) == doc_model


def test_doc_json_fields_match_code():
    task = RoundTask(fleet="f", round=1, model_id=MID, model_round=0, deadline=1.0, quorum=1, cohort=("a",))
    assert set(json.loads(wire.encode_round(task))) == {r[0] for r in doc_table("### `round`")}
    assert set(json.loads(wire.encode_status(Status("a", "online")))) == {r[0] for r in doc_table("### `status`")}
    summ = RoundSummary("f", 1, MID, "fedavg", (), {}, {}, 0, 0.0)
    assert set(json.loads(wire.encode_summary(summ))) == {r[0] for r in doc_table("### `summary`")}


def test_doc_limits_match_code():
    doc = {r[0]: int(r[1]) for r in doc_table("## Size limits")}
    code = {f.name: getattr(wire.DEFAULT_LIMITS, f.name) for f in fields(wire.Limits) if f.name != "max_round"}
    assert doc == code


def test_doc_topics_match_code():
    t = Topics("F")
    doc_topics = {r[0].replace("<fleet>", "F").replace("<device_id>", "D") for r in doc_table("## Topics")}
    assert doc_topics == {t.model, t.round, t.update("D"), t.status("D"), t.summary}


def test_every_reason_in_code_is_documented():
    documented = {r[0] for r in doc_table("## Rejection reasons")}
    root = Path(__file__).resolve().parents[1]
    used = set()
    for path in [root / "edge_sdk" / "wire.py", *sorted((root / "broker").glob("*.py"))]:
        used |= set(re.findall(r'(?:WireError|Rejection|reject)\(\s*"([a-z_0-9]+)"', path.read_text()))
    assert used, "no reason codes found"
    assert used <= documented, used - documented

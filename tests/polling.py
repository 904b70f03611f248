"""Waiting in tests: poll a condition until it holds or a timeout fails the test with what was awaited."""
from __future__ import annotations

import time
from typing import Callable


def wait_for(cond: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")

"""Shared fixtures: a real Mosquitto per test, and a torch-free subprocess runner."""
from __future__ import annotations

import pytest

from tests.mosquitto import Mosquitto


@pytest.fixture
def mosquitto(tmp_path):
    """An anonymous Mosquitto on a free loopback port, stopped after the test."""
    broker = Mosquitto(tmp_path / "mosquitto").start()
    try:
        yield broker
    finally:
        broker.stop()

"""SimDriver (simulator/fleet.py) without a broker: which devices a pass services, and socket bookkeeping.

A pass services devices with socket activity, devices woken from another thread, and a round-robin sweep that
reaches every device within SWEEP_PERIOD; a closed socket's descriptor number reused by another device's new
socket in the same batch must not break the selector.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path
from types import SimpleNamespace

from simulator.fleet import Heterogeneity, PartitionRef, SimDriver, VirtualDevice


class FakeClient:
    """The part of EdgeClient the driver uses; counts loop_misc calls."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.peer: socket.socket | None = None
        self.misc = 0
        self.reads = 0
        self.follower = SimpleNamespace(task=None)
        self.wakeup = None
        self.mqtt = SimpleNamespace(on_socket_register_write=None)

    def open(self) -> None:
        self.sock, self.peer = socket.socketpair()

    def close(self) -> None:
        for s in (self.sock, self.peer):
            if s is not None:
                s.close()
        self.sock = self.peer = None

    def set_wakeup(self, fn) -> None:
        self.wakeup = fn

    def connect_external(self) -> None:
        self.open()

    def socket(self):
        return self.sock

    def want_write(self) -> bool:
        return False

    def loop_read(self) -> None:
        self.reads += 1
        self.sock.recv(4096)

    def loop_write(self) -> None:
        pass

    def loop_misc(self) -> None:
        self.misc += 1


def make(driver: SimDriver, n: int) -> list[VirtualDevice]:
    devs = []
    for i in range(n):
        dev = VirtualDevice(f"d{i}", Path("/nonexistent"), PartitionRef(None, f"d{i}"), 1, 0, Heterogeneity())
        dev.client = FakeClient()  # type: ignore[assignment]
        driver.add(dev)
        devs.append(dev)
    return devs


def test_sweep_reaches_every_device_and_busy_devices_are_serviced_at_once():
    driver = SimDriver()
    devs = make(driver, 400)
    try:
        driver.run_once(0)
        for d in devs:
            d.client.misc = 0
        end = time.monotonic() + SimDriver.SWEEP_PERIOD * 1.5
        while time.monotonic() < end:
            driver.run_once(0.01)
        assert all(d.client.misc >= 1 for d in devs)  # the sweep visited everyone
        passes = [d.client.misc for d in devs]
        assert max(passes) <= 4  # ... but not on every pass
        before = devs[7].client.misc
        devs[7].client.peer.send(b"x")  # socket activity
        devs[9].client.wakeup()  # a training job finished (another thread in real use)
        before9 = devs[9].client.misc
        driver.run_once(0.05)
        assert devs[7].client.reads == 1 and devs[7].client.misc > before and devs[9].client.misc > before9
    finally:
        for d in devs:
            d.client.close()


def test_descriptor_reused_by_another_device_in_the_same_pass():
    driver = SimDriver()
    a, b = make(driver, 2)
    try:
        driver.run_once(0)  # both registered
        fd = a.client.sock.fileno()
        a.client.close()  # a's connection dropped ...
        b.client.close()
        b.client.open()  # ... and b's reconnect got the same descriptor numbers
        assert fd in (b.client.sock.fileno(), b.client.peer.fileno())
        if b.client.sock.fileno() != fd:  # make b's socket the one with a's old number
            b.client.sock, b.client.peer = b.client.peer, b.client.sock
        driver._dirty = ["d1", "d0"]  # type: ignore[assignment]  (b first)
        driver.run_once(0)  # raised KeyError "already registered" when b was synced before a
        b.client.peer.send(b"x")
        driver.run_once(0.05)
        assert b.client.reads == 1
    finally:
        a.client.close()
        b.client.close()

"""Many plain paho clients driven from one thread by a selector: load tests and transport benchmarks.

Thousands of MQTT connections without a thread each. Unlike `edge_sdk.client.FleetDriver` (which drives real
EdgeClients), these clients carry pre-encoded payloads only: they measure the broker and the aggregator, not training.
"""
from __future__ import annotations

import selectors
import time

import paho.mqtt.client as mqtt


class ClientPump:
    """Register connected clients, call `pump()` in a loop, `close()` at the end (disconnects them all)."""

    def __init__(self, misc_interval: float = 1.0) -> None:
        self.clients: list[mqtt.Client] = []
        self._sel = selectors.DefaultSelector()
        self._misc_interval = misc_interval  # keepalive/retry housekeeping; once a second is what paho needs
        self._last_misc = 0.0

    def add(self, client: mqtt.Client) -> None:
        """A client on which `connect()` has been called (its socket exists)."""
        self.clients.append(client)
        self._sel.register(client.socket(), selectors.EVENT_READ, client)

    def pump(self, timeout: float = 0.05) -> None:
        """One pass: read what arrived, write what is queued, and housekeeping when due."""
        for key, _ in self._sel.select(timeout):
            key.data.loop_read()
        for c in self.clients:
            if c.want_write():
                c.loop_write()
        now = time.monotonic()
        if now - self._last_misc > self._misc_interval:
            self._last_misc = now
            for c in self.clients:
                c.loop_misc()

    def close(self) -> None:
        for c in self.clients:
            try:
                c.disconnect()
            except Exception:  # teardown of a load run: a broken connection must not stop the others' cleanup
                pass
        self._sel.close()

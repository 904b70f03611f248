"""A zero-install MQTT broker for local simulations: amqtt in a background thread, loopback only.

Why amqtt: it is pure Python and installs from PyPI, so `make demo` needs no system package. It is slower
than Mosquitto, speaks MQTT 3.1.1 only and loses retained messages on restart (notes/mqtt.md), so it is
for the simulator alone; tests and deployments use Mosquitto (`--broker mqtt://…`). It always binds
127.0.0.1 (its own default would be 0.0.0.0) and allows anonymous clients, which is safe only because of that.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future

from simulator.ports import free_listen_port

log = logging.getLogger(__name__)


class _BrokerNoiseFilter(logging.Filter):
    """Counts, instead of printing, two known harmless amqtt/asyncio messages seen under connection bursts.

    * asyncio's "socket.send() raised exception." when clients disconnect while the broker writes to them;
    * amqtt 0.12's race in `_handle_client_session` ("dictionary changed size during iteration") when many clients
      (re)connect at once: that client's connection is dropped and it reconnects with its normal backoff.
    Anything else from asyncio still goes through.
    """

    def __init__(self) -> None:
        super().__init__()
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        exc = record.exc_info[1] if record.exc_info else None
        if msg.startswith("socket.send() raised exception") or (
                isinstance(exc, RuntimeError) and "changed size during iteration" in str(exc)):
            self.suppressed += 1
            return False
        return True


class EmbeddedBroker:
    """Start/stop/restart an amqtt broker on 127.0.0.1:`port` (by default a free port outside the ephemeral
    range, so that nothing can take it while the broker is down for a restart: simulator/ports.py)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_listen_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker = None
        self._noise = _BrokerNoiseFilter()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _config(self) -> dict:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}", "max_connections": 0}},
            # Only the auth plugin: amqtt refuses every client without one; the $SYS and packet-logging
            # plugins cost CPU we would rather give to training.
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    def start(self, timeout: float = 15.0) -> "EmbeddedBroker":
        if self._thread is not None:
            raise RuntimeError("embedded broker already running")
        # amqtt logs every connection at INFO; keep the simulator's terminal for progress output.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        if self._noise not in logging.getLogger("asyncio").filters:
            logging.getLogger("asyncio").addFilter(self._noise)
        ready: Future = Future()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._start_async())
                ready.set_result(True)
            except BaseException as exc:  # surfaced to the caller through the future
                ready.set_exception(exc)
                return
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="embedded-mqtt-broker", daemon=True)
        self._thread.start()
        try:
            ready.result(timeout)
        except Exception as exc:
            self._thread = None
            raise RuntimeError(f"embedded MQTT broker failed to start on 127.0.0.1:{self.port}: {exc}") from exc
        log.info("embedded MQTT broker listening on %s", self.url)
        return self

    async def _start_async(self) -> None:
        from amqtt.broker import Broker

        self._broker = Broker(self._config())
        await self._broker.start()

    def stop(self, timeout: float = 15.0) -> None:
        if self._thread is None or self._loop is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            fut.result(timeout)
        except Exception as exc:  # a failed shutdown must not leave the thread behind
            log.warning("embedded broker shutdown: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._loop.close()
        self._thread = self._loop = self._broker = None
        if self._noise.suppressed:
            log.info("embedded broker: %d client disconnects/reconnect races absorbed (amqtt, harmless)",
                     self._noise.suppressed)
            self._noise.suppressed = 0

    def restart(self, downtime: float = 0.0) -> None:
        import time

        self.stop()
        time.sleep(downtime)
        self.start()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

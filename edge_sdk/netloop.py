"""A network thread for one paho client that waits with epoll/kqueue instead of select(): no 1,024-fd ceiling.

Why not paho's `loop_start()`: its loop waits in `select.select()`, which raises ValueError for a file
descriptor >= FD_SETSIZE (1,024). paho turns that silently into a lost connection, and every reconnect gets a
large descriptor again, so the client never stays connected. A process that holds many descriptors (the
simulator: a socket and a state-dir lock per virtual device) hands the aggregator's socket a number above
1,024, and with ~500 or more devices no round was ever announced (docs/PERFORMANCE.md §4).

`NetworkLoop` drives the client through paho's documented external-loop API (`socket()`, `loop_read()`,
`loop_write()`, `want_write()`, `loop_misc()`, and the `on_socket_register_write` callback) with
`selectors.DefaultSelector` (epoll on Linux, kqueue on BSD/macOS), and reconnects with exponential backoff as
`loop_start()` does, including the first connection if it has not been made yet.

Threads: callbacks (on_connect, on_message, ...) run on this loop's thread, as with `loop_start()`. Other
threads may publish/subscribe at any time: paho queues the packet and calls `on_socket_register_write`, which
only wakes this thread; all socket I/O happens here, so two threads never write one socket.
"""
from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

__all__ = ["NetworkLoop"]

log = logging.getLogger(__name__)

# paho calls loop_misc() at least once a second in its own loop; keepalive pings depend on it.
_MISC_INTERVAL = 1.0


class NetworkLoop:
    """Run one paho client's network I/O on a thread: `start()`, then `stop()` (disconnects and joins).

    The client must have been given its broker (`connect()` or `connect_async()`) before `start()`. If it is not
    connected yet the loop connects, retrying on failure; after a lost connection it waits `reconnect_min`
    seconds, doubling up to `reconnect_max` while attempts fail, and starts again from `reconnect_min` once a
    connection was accepted. A failed attempt calls the client's `on_connect_fail` callback, as paho's loop does.
    """

    def __init__(self, client: mqtt.Client, *, reconnect_min: float = 1.0, reconnect_max: float = 30.0,
                 name: str | None = None) -> None:
        if not 0 < reconnect_min <= reconnect_max:
            raise ValueError(f"need 0 < reconnect_min <= reconnect_max, got {reconnect_min}, {reconnect_max}")
        self.client = client
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.name = name or "fedatt-mqtt-loop"
        self._stop = threading.Event()
        self._flush_until = 0.0
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # With this callback set, paho queues packets published from any thread instead of writing them there.
        client.on_socket_register_write = lambda *_: self.wake()

    def wake(self) -> None:
        """Make the loop look at the client now (e.g. a packet was queued). Safe from any thread."""
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # buffer full (already awake) or closed (stopping)

    def start(self) -> "NetworkLoop":
        if self._thread is not None:
            raise RuntimeError("this NetworkLoop was already started")
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0, *, disconnect: bool = True) -> None:
        """Send DISCONNECT (if `disconnect`), flush queued packets for up to `timeout` s, end the thread."""
        self._flush_until = time.monotonic() + timeout
        self._stop.set()  # before disconnect(): the closed socket must not look like a lost connection
        if disconnect:
            try:
                self.client.disconnect()
            except Exception as exc:  # stopping must always finish
                log.debug("%s: disconnect failed: %s", self.name, exc)
        self.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout + 1.0)
            if self._thread.is_alive():
                log.warning("%s: network thread did not end within %.1fs", self.name, timeout + 1.0)
                return  # it still uses the wake socket; it is a daemon thread and ends with the process
        self._wake_r.close()
        self._wake_w.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------------------------- the loop
    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        registered: tuple[Any, int] | None = None  # (socket, events) as registered with `sel`
        delay = self.reconnect_min
        next_connect = time.monotonic()  # not connected yet at start: try at once
        last_misc = 0.0
        c = self.client
        try:
            while True:
                now = time.monotonic()
                sock = c.socket()
                if self._stop.is_set() and (sock is None or not c.want_write() or now >= self._flush_until):
                    break
                if registered is not None and registered[0] is not sock:  # closed, or replaced by a reconnect
                    _unregister(sel, registered[0])
                    registered = None
                if sock is None:
                    if now >= next_connect:
                        if not self._connect():
                            next_connect = time.monotonic() + delay
                            delay = min(delay * 2, self.reconnect_max)
                    else:
                        _wait(sel, min(next_connect - now, _MISC_INTERVAL), self._wake_r)
                    continue
                if c.is_connected():
                    delay = self.reconnect_min  # accepted: the next loss starts the backoff from the minimum
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.want_write() else 0)
                if registered is None:
                    sel.register(sock, events, sock)
                elif registered[1] != events:
                    sel.modify(sock, events, sock)
                registered = (sock, events)
                pending = getattr(sock, "pending", None)  # TLS: decrypted bytes select() cannot see
                buffered = bool(pending is not None and pending())
                readable = buffered
                for key, mask in sel.select(0 if buffered else _MISC_INTERVAL):
                    if key.data is None:
                        _drain(self._wake_r)
                    elif mask & selectors.EVENT_READ:
                        readable = True
                if readable:
                    c.loop_read()
                if c.socket() is not None and c.want_write():
                    c.loop_write()  # non-blocking: writes what the socket takes, keeps the rest queued
                now = time.monotonic()
                if c.socket() is not None and now - last_misc >= _MISC_INTERVAL / 2:
                    last_misc = now
                    c.loop_misc()  # keepalive; closes the socket if the broker stopped answering
                if c.socket() is None and not self._stop.is_set():
                    log.debug("%s: connection lost; reconnecting in %.1fs", self.name, delay)
                    next_connect = time.monotonic() + delay
                    delay = min(delay * 2, self.reconnect_max)
        except Exception:  # must not happen; without this the client would go silent forever
            log.exception("%s: network loop failed", self.name)
        finally:
            sel.close()

    def _connect(self) -> bool:
        """One connection attempt (TCP + CONNECT queued); False if it failed."""
        try:
            self.client.reconnect()
            return True
        except (OSError, ValueError) as exc:  # ValueError: paho's "invalid host/port"
            log.debug("%s: connection attempt failed: %s", self.name, exc)
            callback = self.client.on_connect_fail
            if callback is not None:
                try:
                    callback(self.client, self.client.user_data_get())
                except Exception:
                    log.exception("%s: on_connect_fail callback failed", self.name)
            return False


def _unregister(sel: selectors.BaseSelector, sock: Any) -> None:
    try:
        sel.unregister(sock)
    except (KeyError, ValueError, OSError):
        pass  # already closed: epoll dropped it with the descriptor


def _wait(sel: selectors.BaseSelector, timeout: float, wake_r: socket.socket) -> None:
    for key, _ in sel.select(max(0.0, timeout)):
        if key.data is None:
            _drain(wake_r)


def _drain(wake_r: socket.socket) -> None:
    try:
        while wake_r.recv(4096):
            pass
    except OSError:
        pass  # empty (BlockingIOError) or closed

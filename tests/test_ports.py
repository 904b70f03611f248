"""Broker ports are chosen outside the kernel's ephemeral range, so a restart on the same port cannot fail."""
from __future__ import annotations

import socket

from simulator.ports import ephemeral_start, free_listen_port


def test_free_listen_port_is_below_the_ephemeral_range_and_bindable():
    start = ephemeral_start()
    ports = {free_listen_port() for _ in range(50)}
    assert all(20000 <= p < start for p in ports)
    assert len(ports) > 1  # drawn at random, not a fixed port two concurrent runs would share
    port = ports.pop()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_outgoing_connections_never_get_the_port():
    """The failure it prevents: while a broker is down, clients' local ports come from the ephemeral range."""
    start = ephemeral_start()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        clients = [socket.create_connection(server.getsockname()) for _ in range(32)]
        try:
            assert all(c.getsockname()[1] >= start for c in clients)
        finally:
            for c in clients:
                c.close()

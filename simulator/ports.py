"""Free loopback ports for brokers that must restart on the same port (embedded broker, test Mosquitto).

Why not `bind(("127.0.0.1", 0))`: the kernel hands out a port from the *ephemeral* range, the same range it
draws every outgoing connection's local port from. While a broker is down for a restart, any client connecting
anywhere may be given that port as its local port, and a device reconnecting to the stopped broker can even
connect to itself (TCP simultaneous open: local port == remote port). Either way the port is taken and the
restarted broker fails with EADDRINUSE (seen in CI: `test_cli_embedded_broker_dropout_join_and_restart`).
A port below the ephemeral range is never auto-assigned, so only another listener could take it.
"""
from __future__ import annotations

import errno
import secrets
import socket
from pathlib import Path

# Below the ephemeral range and above the well-known/registered ports that services on a dev box tend to use.
_LOW = 20000
_FALLBACK_EPHEMERAL_START = 32768  # Linux default when /proc cannot be read
_ATTEMPTS = 200


def ephemeral_start() -> int:
    """First port of the kernel's ephemeral range (Linux: /proc/sys/net/ipv4/ip_local_port_range)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _FALLBACK_EPHEMERAL_START
    return low if low > _LOW + 100 else _FALLBACK_EPHEMERAL_START


def free_listen_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that is free now and that the kernel never assigns to outgoing connections."""
    high = ephemeral_start()
    for _ in range(_ATTEMPTS):
        port = _LOW + secrets.randbelow(high - _LOW)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
        return port
    raise RuntimeError(f"no free port on {host} in [{_LOW}, {high}) after {_ATTEMPTS} tries")

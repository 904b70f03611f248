"""How any fedatt process reaches the MQTT broker: URL parsing, TLS context, a configured paho client.

Shared by the device (`EdgeClient`) and the aggregator (`broker.service`) so both accept the same
`mqtt://host[:port]` / `mqtts://host[:port]` URLs and TLS options.
"""
from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt

SCHEMES = {"mqtt": (1883, False), "mqtts": (8883, True)}


class BrokerURLError(ValueError):
    pass


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://host[:port]` (plaintext, 1883) or `mqtts://host[:port]` (TLS, 8883); nothing else."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise BrokerURLError(f"broker must be mqtt://host[:port] or mqtts://host[:port], got {url!r}")
    if not parts.hostname:
        raise BrokerURLError(f"broker URL {url!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise BrokerURLError(f"broker URL {url!r}: only scheme, host and port are allowed "
                             "(credentials go in username/password)")
    default_port, tls = SCHEMES[parts.scheme]
    try:
        port = parts.port or default_port
    except ValueError:
        raise BrokerURLError(f"broker URL {url!r} has an invalid port") from None
    return BrokerAddress(parts.hostname, port, tls)


def tls_context(ca_file: str | os.PathLike[str] | None = None, cert_file: str | os.PathLike[str] | None = None,
                key_file: str | os.PathLike[str] | None = None, insecure: bool = False) -> ssl.SSLContext:
    """System CAs or `ca_file`; optional client certificate; `insecure` skips only the hostname check."""
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if cert_file:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    if insecure:
        ctx.check_hostname = False
    return ctx


def read_secret(path: str | os.PathLike[str]) -> str:
    """A password from a file (first line), so it never appears on a command line or in `ps`."""
    text = Path(path).read_text().splitlines()
    if not text or not text[0]:
        raise ValueError(f"{path}: empty password file")
    return text[0]


def new_client(client_id: str, *, clean_session: bool, username: str | None = None, password: str | None = None,
               ssl_context: ssl.SSLContext | None = None) -> mqtt.Client:
    """A paho 2.x client speaking MQTT 3.1.1 (works with Mosquitto and the embedded amqtt broker)."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                    protocol=mqtt.MQTTv311)
    if username is not None:
        c.username_pw_set(username, password)
    if ssl_context is not None:
        c.tls_set_context(ssl_context)
    return c

"""Throwaway TLS material for tests: a test CA and a server certificate for 127.0.0.1/localhost.

Uses the `openssl` CLI (the `cryptography` package is not installed in .venv). EC P-256 keys: fast to make.
Also renders deploy/mosquitto/fedatt.conf for a test broker (`render_deploy_conf`): the deploy file's /etc
paths, ports and persistence directory are replaced textually and every other line is kept verbatim, so the
test broker runs with the deployment's security settings. The renderer fails loudly when the deploy file's
directives change shape, so a changed security setting cannot slip past the security tests unnoticed.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_CONF = ROOT / "deploy" / "mosquitto" / "fedatt.conf"
DEPLOY_ACL = ROOT / "deploy" / "mosquitto" / "acl"


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


@dataclass(frozen=True)
class TlsFiles:
    ca_crt: Path
    ca_key: Path
    server_crt: Path
    server_key: Path


def make_tls(d: Path, cn: str = "127.0.0.1") -> TlsFiles:
    """A CA and a server certificate signed by it, SAN IP:127.0.0.1 and DNS:localhost, valid for 2 days."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        proc = subprocess.run(["openssl", *args], cwd=d, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {proc.stderr}")

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=fedatt-test-ca")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={cn}")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "san.ext")
    return TlsFiles(d / "ca.crt", d / "ca.key", d / "server.crt", d / "server.key")


# Every directive of deploy/mosquitto/fedatt.conf, in order, with the value the tests expect. `None` = the value
# is a deployment path or port that render_deploy_conf replaces. Any other difference is an error.
EXPECTED_DIRECTIVES: list[tuple[str, str | None]] = [
    ("allow_anonymous", "false"),
    ("password_file", None),
    ("acl_file", None),
    ("per_listener_settings", "false"),
    ("max_packet_size", "16842752"),
    ("persistence", "true"),
    ("persistence_location", None),
    ("autosave_interval", "30"),
    ("max_queued_messages", "1000"),
    ("max_inflight_messages", "20"),
    ("listener", None),  # 8883: TLS for devices
    ("cafile", None),
    ("certfile", None),
    ("keyfile", None),
    ("tls_version", "tlsv1.2"),
    ("use_username_as_clientid", "true"),  # a listener option: must follow each `listener` line
    ("listener", None),  # 1883 127.0.0.1: the aggregator's plaintext loopback listener
    ("use_username_as_clientid", "true"),
]


def deploy_directives(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        out.append((key, value.strip()))
    return out


def render_deploy_conf(*, passwd: Path, tls: TlsFiles, tls_port: int, plain_port: int, persistence_dir: Path,
                       acl: Path = DEPLOY_ACL, text: str | None = None) -> str:
    """deploy/mosquitto/fedatt.conf with test paths and free loopback ports; every security setting kept.

    The TLS listener of the deploy file binds every interface; the tests bind it to 127.0.0.1 (loopback only).
    """
    text = DEPLOY_CONF.read_text() if text is None else text
    got = deploy_directives(text)
    keys = [k for k, _ in got]
    want = [k for k, _ in EXPECTED_DIRECTIVES]
    if keys != want:
        raise AssertionError(f"deploy/mosquitto/fedatt.conf changed shape: directives {keys}, the security tests "
                             f"know {want}. Update tests/tls.py (and the tests) to the new configuration.")
    for (key, value), (_, expected) in zip(got, EXPECTED_DIRECTIVES):
        if expected is not None and value != expected:
            raise AssertionError(f"deploy/mosquitto/fedatt.conf: {key} is {value!r}, the security tests expect "
                                 f"{expected!r}")
    replacements = {
        "password_file": (r"^/etc/mosquitto/fedatt/passwd$", str(passwd)),
        "acl_file": (r"^/etc/mosquitto/fedatt/acl$", str(acl)),
        "persistence_location": (r"^/var/lib/mosquitto/$", f"{persistence_dir}/"),
        "cafile": (r"^/etc/mosquitto/fedatt/ca\.crt$", str(tls.ca_crt)),
        "certfile": (r"^/etc/mosquitto/fedatt/server\.crt$", str(tls.server_crt)),
        "keyfile": (r"^/etc/mosquitto/fedatt/server\.key$", str(tls.server_key)),
    }
    listeners = [(r"^8883$", f"{tls_port} 127.0.0.1"), (r"^1883 127\.0\.0\.1$", f"{plain_port} 127.0.0.1")]
    lines = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            lines.append(raw)
            continue
        key, _, value = stripped.partition(" ")
        value = value.strip()
        if key == "listener":
            pattern, new = listeners.pop(0)
            if not re.match(pattern, value):
                raise AssertionError(f"deploy listener {value!r} does not match {pattern!r}")
            value = new
        elif key in replacements:
            pattern, new = replacements[key]
            if not re.match(pattern, value):
                raise AssertionError(f"deploy {key} {value!r} does not match {pattern!r}")
            value = new
        lines.append(f"{key} {value}")
    return "\n".join(lines) + "\n"

"""Per-device MQTT credentials for Mosquitto: generate a password, add it to the broker's password file.

Hashing is left to Mosquitto's own `mosquitto_passwd` (PBKDF2-SHA512), so the file is always in the format the
installed broker reads. The password goes to it on stdin, never on a command line (visible in `ps`).
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

from edge_sdk.wire import WireError, check_id


class CredentialError(RuntimeError):
    pass


def add_device(passwd_file: Path, device_id: str, password: str | None = None,
               credentials_dir: Path | None = None) -> str:
    """Add or replace `device_id` in Mosquitto's password file; returns the password.

    With `credentials_dir`, the password is also written to `<dir>/<device_id>.password` (mode 0600) for
    provisioning the device. Mosquitto must be told to reload (SIGHUP) to pick up the change.
    """
    try:
        check_id(device_id, "device_id")
    except WireError as exc:
        raise CredentialError(str(exc)) from None
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        raise CredentialError("mosquitto_passwd not found: install the `mosquitto` package (apt-get install mosquitto)")
    password = password or secrets.token_urlsafe(24)
    if "\n" in password or not password:
        raise CredentialError("password must be non-empty and a single line")
    passwd_file = Path(passwd_file)
    if not passwd_file.exists():
        passwd_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(passwd_file, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    proc = subprocess.run([tool, str(passwd_file), device_id], input=f"{password}\n{password}\n",
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise CredentialError(f"mosquitto_passwd failed for {device_id}: {proc.stderr.strip() or proc.stdout.strip()}")
    if credentials_dir is not None:
        credentials_dir = Path(credentials_dir)
        credentials_dir.mkdir(parents=True, exist_ok=True)
        target = credentials_dir / f"{device_id}.password"
        tmp = target.with_suffix(".tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    return password

"""Security against a real Mosquitto running deploy/mosquitto/fedatt.conf (issue 6), and a no-pickle source scan.

The broker runs the deploy configuration rendered by tests/tls.py (test CA + server certificate, test password
file, deploy/mosquitto/acl, free loopback ports; every security directive kept verbatim). Proven here:
* no anonymous access on either listener; a wrong password is refused (plaintext and TLS);
* a device with valid credentials cannot publish as another device (update and status topics, also when it
  asks for the other device's client id), nor on the model, round or metrics topics; the aggregator account,
  subscribed to everything, never sees a forged message (checked with an in-order sentinel), and the retained
  model is untouched;
* a device cannot read other devices' updates or statuses;
* EdgeClient over mqtts:// with the test CA connects and is seen online; without the CA (system trust) the
  TLS handshake fails; plaintext MQTT on the TLS port gets no CONNACK; `fedatt device` with a wrong password
  exits with status 3 and says so instead of retrying forever.
* No Python source of edge_sdk, broker, exporter, simulator or benchmarks uses pickle, cloudpickle, dill,
  marshal, shelve, joblib, torch.load, pandas.read_pickle or numpy.load(allow_pickle=True).
"""
from __future__ import annotations

import ast
import os
import pwd
import socket
import ssl
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from broker.credentials import add_device
from edge_sdk import wire
from tests.polling import wait_for
from tests.mosquitto import Mosquitto, free_port
from tests.tls import have_openssl, make_tls, render_deploy_conf

pytestmark = [pytest.mark.mosquitto, pytest.mark.skipif(not have_openssl(), reason="needs the openssl CLI")]

ROOT = Path(__file__).resolve().parents[1]
FLEET = "sec"
T = wire.Topics(FLEET)
MID = "sha256:" + "5e" * 32
ACCOUNTS = ["fedatt-aggregator", "dev-a", "dev-b", "rogue"]


class DeployBroker:
    def __init__(self, broker: Mosquitto, tls_port: int, tls, creds: dict[str, str]) -> None:
        self.broker, self.plain_port, self.tls_port, self.tls, self.creds = broker, broker.port, tls_port, tls, creds


@pytest.fixture(scope="module")
def deploy(tmp_path_factory):
    d = tmp_path_factory.mktemp("deploy")
    tls = make_tls(d / "tls")
    passwd = d / "passwd"
    creds = {name: add_device(passwd, name) for name in ACCOUNTS}
    plain_port, tls_port = free_port(), free_port()
    broker = Mosquitto(d / "mq", port=plain_port)
    conf = render_deploy_conf(passwd=passwd, tls=tls, tls_port=tls_port, plain_port=plain_port,
                              persistence_dir=broker.workdir)
    # tests/mosquitto.py's own lines (run as the current user, log to a file) followed by the deploy config,
    # which brings its own listeners: the test class only starts the process and waits on plain_port.
    broker.conf.write_text(f"user {pwd.getpwuid(os.geteuid()).pw_name}\nlog_dest file {broker.workdir / 'mosquitto.log'}\n"
                           "log_type all\n" + conf)
    broker.start()
    try:
        from tests.mosquitto import wait_port

        wait_port(tls_port)
        yield DeployBroker(broker, tls_port, tls, creds)
    finally:
        broker.stop()


def test_rendered_config_keeps_every_security_setting(deploy):
    text = deploy.broker.conf.read_text()
    for line in ["allow_anonymous false", "use_username_as_clientid true", "per_listener_settings false",
                 "tls_version tlsv1.2", f"listener {deploy.tls_port} 127.0.0.1",
                 f"listener {deploy.plain_port} 127.0.0.1", f"acl_file {ROOT / 'deploy/mosquitto/acl'}"]:
        assert line in text.splitlines(), line
    directives = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert not any("/etc/" in ln or "/var/lib" in ln for ln in directives), directives
    # The renderer refuses a deploy file whose settings changed shape (here: anonymous access switched on).
    from tests.tls import DEPLOY_CONF

    changed = DEPLOY_CONF.read_text().replace("allow_anonymous false", "allow_anonymous true")
    with pytest.raises(AssertionError, match="allow_anonymous"):
        render_deploy_conf(passwd=Path("p"), tls=deploy.tls, tls_port=1, plain_port=2, persistence_dir=Path("x"),
                           text=changed)
    with pytest.raises(AssertionError, match="changed shape"):
        render_deploy_conf(passwd=Path("p"), tls=deploy.tls, tls_port=1, plain_port=2, persistence_dir=Path("x"),
                           text=DEPLOY_CONF.read_text() + "\nlistener 9001\n")


# ------------------------------------------------------------------------------------------------ helpers
class Client:
    """A paho client that records the CONNACK outcome and every message it receives."""

    def __init__(self, deploy: DeployBroker, user: str | None, password: str | None = None, *, tls: str = "none",
                 client_id: str = "", port: int | None = None, subscribe: list[str] = ()) -> None:
        self.connack = threading.Event()
        self.rc: str | None = None
        self.ok = False
        self.msgs: list[tuple[str, bytes, bool]] = []
        self.suback = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or user or "", protocol=mqtt.MQTTv311)
        if user is not None:
            self.c.username_pw_set(user, password)
        if tls == "ca":
            self.c.tls_set(ca_certs=str(deploy.tls.ca_crt))
        elif tls == "system":
            self.c.tls_set()  # the system trust store: does not contain the test CA
        self.c.on_connect = self._on_connect
        self.c.on_message = lambda c, u, m: self.msgs.append((m.topic, bytes(m.payload), bool(m.retain)))
        self.c.on_subscribe = lambda *a: self.suback.set()
        self.disconnects = 0
        self.c.on_disconnect = self._on_disconnect
        self.subscriptions = list(subscribe)
        port = port or (deploy.tls_port if tls != "none" else deploy.plain_port)
        self.error: Exception | None = None
        try:
            self.c.connect("127.0.0.1", port, keepalive=10)
        except (OSError, ssl.SSLError) as exc:
            self.error = exc
            return
        self.c.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.rc = str(reason_code)
        self.ok = not reason_code.is_failure
        if self.ok and self.subscriptions:
            client.subscribe([(t, 1) for t in self.subscriptions])
        self.connack.set()

    def _on_disconnect(self, *args) -> None:
        self.disconnects += 1

    def wait_connected(self, timeout: float = 5.0) -> bool:
        self.connack.wait(timeout)
        return self.ok

    def topics(self) -> list[str]:
        return [t for t, _, _ in self.msgs]

    def close(self) -> None:
        try:
            self.c.disconnect()
        finally:
            self.c.loop_stop()


def model_bytes(value: float, round_: int = 0) -> bytes:
    return wire.encode_model(wire.ModelMessage(MID, round_, {"w": np.full(4, value, np.float32)}, created=1000.0))


def update_bytes(device: str, value: float = 0.0) -> bytes:
    return wire.encode_update(wire.UpdateMessage(
        model_id=MID, round=1, device_id=device, update_id=wire.new_update_id(), num_examples=1, clip_norm=1.0,
        noise_multiplier=1.0, encoding="f32", tensors={"w": np.full(4, value, np.float32)}))


# --------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("tls", ["none", "ca"])
def test_no_anonymous_access_and_wrong_password_refused(deploy, tls):
    outcomes = {}
    for label, user, pw in [("anonymous", None, None), ("wrong password", "dev-a", "not-the-password"),
                            ("unknown user", "nobody", "x"), ("other's password", "dev-a", deploy.creds["dev-b"]),
                            ("good", "dev-a", deploy.creds["dev-a"])]:
        c = Client(deploy, user, pw, tls=tls)
        try:
            assert c.error is None, c.error
            connected = c.wait_connected(5)
            assert c.connack.is_set(), f"{label}: no CONNACK at all"
            outcomes[label] = (connected, c.rc)
        finally:
            c.close()
    assert outcomes["good"][0], outcomes
    for label in ("anonymous", "wrong password", "unknown user", "other's password"):
        assert not outcomes[label][0], (label, outcomes[label])
    print(f"\n{tls}: " + ", ".join(f"{k} -> {v[1]}" for k, v in outcomes.items()))


def test_device_cannot_publish_as_another_device_or_as_the_aggregator(deploy):
    everything = [f"fedatt/#"]
    agg = Client(deploy, "fedatt-aggregator", deploy.creds["fedatt-aggregator"], subscribe=everything)
    dev_a = Client(deploy, "dev-a", deploy.creds["dev-a"], tls="ca")
    rogue = hijack = None
    try:
        assert agg.wait_connected() and dev_a.wait_connected()
        # Valid accounts asking for another account's client id (session takeover): the id is forced to the username.
        rogue = Client(deploy, "rogue", deploy.creds["rogue"], tls="ca", client_id="dev-a")
        hijack = Client(deploy, "dev-b", deploy.creds["dev-b"], client_id="fedatt-aggregator")
        assert rogue.wait_connected() and hijack.wait_connected()
        assert agg.suback.wait(5)
        good_model = model_bytes(1.0)
        agg.c.publish(T.model, good_model, qos=1, retain=True).wait_for_publish(5)
        wait_for(lambda: (T.model, good_model, False) in agg.msgs or (T.model, good_model, True) in agg.msgs,
                 what="the aggregator's own model")
        forged = {
            T.update("dev-a"): update_bytes("dev-a", 100.0),
            T.update("dev-b"): update_bytes("dev-b", 100.0),
            T.status("dev-a"): wire.encode_status(wire.Status("dev-a", "offline", time.time())),
            T.status("dev-b"): wire.encode_status(wire.Status("dev-b", "online", time.time())),
            T.model: model_bytes(666.0, round_=99),
            T.round: b'{"forged": true}',
            T.summary: b'{"forged": true}',
            "fedatt/other-fleet/updates/dev-a": update_bytes("dev-a", 100.0),
            "fedatt/sec/updates/rogue/extra": b"forged",
        }
        for qos in (0, 1):
            for topic, payload in forged.items():
                rogue.c.publish(topic, payload, qos=qos, retain=topic in (T.model, T.round, T.summary, T.status("dev-a")))
        sentinel = update_bytes("rogue")
        rogue.c.publish(T.update("rogue"), sentinel, qos=1).wait_for_publish(5)
        # Mosquitto handles one client's publishes in order: once the sentinel is in, any forgery would be too.
        wait_for(lambda: any(p == sentinel for _, p, _ in agg.msgs), what="rogue's own update (sentinel)")
        time.sleep(0.3)
        seen = set(agg.topics())
        leaked = [t for t, p, _ in agg.msgs if p in forged.values()]
        assert leaked == [], f"the aggregator saw forged messages on {leaked}"
        assert T.update("rogue") in seen
        # Neither the real dev-a nor the aggregator was kicked off (that would also hand over their sessions).
        assert dev_a.disconnects == 0 and agg.disconnects == 0 and dev_a.c.is_connected() and agg.c.is_connected()
        # The retained model is still the aggregator's.
        fresh = Client(deploy, "fedatt-aggregator", deploy.creds["fedatt-aggregator"], client_id="agg-check",
                       subscribe=[T.model, T.round, T.summary, T.status("dev-a")])
        try:
            assert fresh.wait_connected()
            wait_for(lambda: any(t == T.model for t in fresh.topics()), what="retained model")
            time.sleep(0.3)
            assert [p for t, p, r in fresh.msgs if t == T.model] == [good_model]
            assert not any(t in (T.round, T.summary, T.status("dev-a")) for t in fresh.topics()), fresh.topics()
        finally:
            fresh.close()
    finally:
        for c in (agg, dev_a, rogue, hijack):
            if c is not None:
                c.close()


def test_device_cannot_read_other_devices_updates_or_statuses(deploy):
    spy = Client(deploy, "rogue", deploy.creds["rogue"], tls="ca",
                 subscribe=["fedatt/#", T.all_updates, T.update("dev-a"), T.all_status, "#"])
    agg = Client(deploy, "fedatt-aggregator", deploy.creds["fedatt-aggregator"], subscribe=[T.all_updates])
    dev_a = Client(deploy, "dev-a", deploy.creds["dev-a"], tls="ca")
    try:
        assert spy.wait_connected() and agg.wait_connected() and dev_a.wait_connected()
        assert spy.suback.wait(5) and agg.suback.wait(5)
        payload = update_bytes("dev-a", 0.5)
        dev_a.c.publish(T.update("dev-a"), payload, qos=1).wait_for_publish(5)
        dev_a.c.publish(T.status("dev-a"), wire.encode_status(wire.Status("dev-a", "online", time.time())), qos=1,
                        retain=True).wait_for_publish(5)
        wait_for(lambda: any(p == payload for _, p, _ in agg.msgs), what="dev-a's update at the aggregator")
        marker = b'{"marker": 1}'
        agg.c.publish(T.summary, marker, qos=1).wait_for_publish(5)
        wait_for(lambda: any(p == marker for _, p, _ in spy.msgs), what="the metrics marker at the spy (allowed)")
        time.sleep(0.2)
        forbidden = [t for t in spy.topics() if "/updates/" in t or "/status/" in t]
        assert forbidden == [], forbidden
    finally:
        for c in (spy, agg, dev_a):
            c.close()


# --------------------------------------------------------------------------------------------------- TLS
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    import exporter
    from exporter import zoo

    return exporter.export_bundle(zoo.mlp(in_features=10), "1x10", tmp_path_factory.mktemp("b") / "mlp",
                                  loss="cross_entropy")


def test_edge_client_over_tls_with_the_test_ca_and_not_without_it(deploy, bundle, tmp_path):
    from edge_sdk.client import EdgeClient
    from edge_sdk.config import ClientConfig

    x = np.zeros((4, 10), np.float32)
    data = (x, np.zeros(4, np.int64))
    agg = Client(deploy, "fedatt-aggregator", deploy.creds["fedatt-aggregator"], subscribe=[T.all_status])
    common = dict(fleet=FLEET, broker=f"mqtts://127.0.0.1:{deploy.tls_port}", reconnect_min=0.2, reconnect_max=1.0)
    good = no_ca = None
    try:
        assert agg.wait_connected() and agg.suback.wait(5)
        good = EdgeClient(ClientConfig(device_id="dev-a", state_dir=tmp_path / "a", username="dev-a",
                                       password=deploy.creds["dev-a"], ca_file=deploy.tls.ca_crt, **common),
                          bundle, data).start()
        no_ca = EdgeClient(ClientConfig(device_id="dev-b", state_dir=tmp_path / "b", username="dev-b",
                                        password=deploy.creds["dev-b"], **common), bundle, data).start()
        assert good.wait_connected(10), "EdgeClient with the test CA did not connect over TLS"
        wait_for(lambda: any(t == T.status("dev-a") and wire.decode_status(p).state == "online"
                             for t, p, _ in agg.msgs), what="dev-a online over TLS")
        assert not no_ca.wait_connected(2), "a client trusting only the system CAs must not accept the test server"
        assert not any(t == T.status("dev-b") for t in agg.topics())
    finally:
        for c in (good, no_ca):
            if c is not None:
                c.stop()
        agg.close()
    # The precise failure without the CA: certificate verification, not something incidental.
    ctx = ssl.create_default_context()
    with socket.create_connection(("127.0.0.1", deploy.tls_port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    # With the CA the same handshake verifies, hostname included (SAN IP:127.0.0.1), at TLS >= 1.2.
    ctx = ssl.create_default_context(cafile=str(deploy.tls.ca_crt))
    with socket.create_connection(("127.0.0.1", deploy.tls_port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            assert s.version() in ("TLSv1.2", "TLSv1.3")


def test_fedatt_device_exits_on_refused_credentials(deploy, bundle, tmp_path):
    import subprocess
    import sys

    np.savez(tmp_path / "data.npz", x=np.zeros((4, 10), np.float32), y=np.zeros(4, np.int64))
    (tmp_path / "wrong").write_text("not-the-password\n")
    (tmp_path / "right").write_text(deploy.creds["dev-a"] + "\n")

    def device(password_file: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "edge_sdk.cli", "device", "--bundle", str(bundle.path), "--data",
             str(tmp_path / "data.npz"), "--broker", f"mqtts://127.0.0.1:{deploy.tls_port}", "--ca",
             str(deploy.tls.ca_crt), "--device-id", "dev-a", "--fleet", FLEET, "--state-dir",
             str(tmp_path / "state"), "--password-file", str(tmp_path / password_file), *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    proc = device("wrong")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, out + err
    assert "refused the credentials of dev-a" in err and "Not authorized" in err, err
    # The same device with its real password connects and runs until stopped (the refusal was the password),
    # and --keep-retrying keeps a refused device running instead of exiting.
    for password_file, extra in (("right", ()), ("wrong", ("--keep-retrying",))):
        proc = device(password_file, *extra)
        try:
            time.sleep(4)
            assert proc.poll() is None, proc.communicate()
            proc.terminate()
            out, err = proc.communicate(timeout=15)
            assert proc.returncode == 0 and "stopped" in out, out + err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_plaintext_mqtt_is_refused_on_the_tls_port(deploy):
    # A well-formed MQTT 3.1.1 CONNECT for dev-a with its real password, in clear, to the TLS listener.
    user, pw = b"dev-a", deploy.creds["dev-a"].encode()
    var = b"\x00\x04MQTT\x04\xc2\x00\x0a"
    payload = b"".join(len(s).to_bytes(2, "big") + s for s in (user, user, pw))
    body = var + payload
    packet = b"\x10" + bytes([len(body)]) + body
    with socket.create_connection(("127.0.0.1", deploy.tls_port), timeout=5) as s:
        s.sendall(packet)
        try:
            reply = s.recv(64)
        except (ConnectionResetError, socket.timeout):
            reply = b""
    assert not reply.startswith(b"\x20"), f"got a CONNACK in plaintext: {reply!r}"
    # paho in plaintext against the TLS port: no CONNACK either.
    c = Client(deploy, "dev-a", deploy.creds["dev-a"], port=deploy.tls_port)
    try:
        assert not c.wait_connected(2) and not c.ok
    finally:
        c.close()


# ----------------------------------------------------------------------------------------------- no pickle
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib", "copyreg"}
SCANNED = ["edge_sdk", "broker", "exporter", "simulator", "benchmarks"]


def pickle_hits(source: str, filename: str) -> list[str]:
    """Uses of unpickling/serialising-by-code machinery in one Python source (AST, so comments do not count)."""
    hits = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            hits += [f"{filename}:{node.lineno} import {a.name}" for a in node.names
                     if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PICKLE_MODULES:
            hits.append(f"{filename}:{node.lineno} from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            kwargs = {k.arg: k.value for k in node.keywords}
            if name in ("torch.load", "pd.read_pickle", "pandas.read_pickle", "__import__") and not (
                    name == "__import__" and node.args and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value not in PICKLE_MODULES):
                hits.append(f"{filename}:{node.lineno} {name}(...)")
            if name.endswith(".load") or name == "load":
                ap = kwargs.get("allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    hits.append(f"{filename}:{node.lineno} {name}(allow_pickle={ast.unparse(ap)})")
            if name.endswith("importlib.import_module") or name == "import_module":
                if node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in PICKLE_MODULES:
                    hits.append(f"{filename}:{node.lineno} import_module({node.args[0].value!r})")
    return hits


def test_scanner_catches_what_it_should():
    bad = ("import pickle\nfrom dill import loads\nimport numpy as np\nx = np.load('f', allow_pickle=True)\n"
           "import torch\nm = torch.load('m.pt')\nimport marshal as m2\nimport importlib\nimportlib.import_module('cloudpickle')\n")
    assert len(pickle_hits(bad, "bad.py")) == 6, pickle_hits(bad, "bad.py")
    ok = "# no pickle here\nimport numpy as np\nx = np.load('f', allow_pickle=False)\ns = 'pickle'\n"
    assert pickle_hits(ok, "ok.py") == []


def test_no_pickle_anywhere_in_the_product_sources():
    hits, files = [], 0
    for pkg in SCANNED:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            files += 1
            hits += pickle_hits(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert files >= 40, f"only {files} files scanned: did the layout change?"
    assert hits == [], "\n".join(hits)

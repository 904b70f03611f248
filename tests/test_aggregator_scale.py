"""The aggregator where large fleets take it: >1,024 open descriptors in its process, >1,020 retained statuses.

* paho's loop_start() waits in select(), which cannot take a descriptor >= 1,024: in the simulator's process (a
  socket per device) the aggregator lost every connection silently and never announced a round. With
  edge_sdk.netloop.NetworkLoop (epoll) it runs rounds, and NetworkLoop keeps reconnecting after a broker restart
  as loop_start() did.
* Every (re)subscribe delivers all retained statuses at once; subscribed at QoS 1, Mosquitto's default queue
  limits (max_queued_messages 1000, 20 in flight) dropped all but 1,020, so a larger fleet never reached
  min_online. The status subscription is QoS 0.
"""
from __future__ import annotations

import os
import resource
import threading
import time

import pytest

from broker.service import AggregatorService, MqttSettings
from edge_sdk import wire
from edge_sdk.client import EdgeClient, FleetDriver
from edge_sdk.config import ClientConfig
from edge_sdk.connection import new_client
from edge_sdk.netloop import NetworkLoop
from tests.polling import wait_for
from tests.test_aggregator_mqtt import DEVICES, FLEET, bundle, data, engine_config  # noqa: F401

pytestmark = pytest.mark.mosquitto

HIGH_FD = 1100  # above FD_SETSIZE (1,024) with a margin


@pytest.fixture
def many_fds():
    """Open /dev/null until the next descriptor is above HIGH_FD; close them and restore the limit afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = HIGH_FD + 512
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    fds: list[int] = []
    try:
        while not fds or fds[-1] < HIGH_FD:
            fds.append(os.open(os.devnull, os.O_RDONLY))
        yield fds
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_aggregator_runs_rounds_with_descriptors_above_1024(tmp_path, mosquitto, bundle, data, many_fds):
    """Real EdgeClients on an epoll driver (like the simulator) and the real service, all sockets above 1,024."""
    service = AggregatorService(engine_config(bundle, quorum=3, round_timeout_s=30.0), bundle, tmp_path / "state",
                                MqttSettings(mosquitto.url), max_rounds=2)
    driver = FleetDriver()
    for name, cid in zip(DEVICES, sorted(data.clients)):
        cfg = ClientConfig(device_id=name, fleet=FLEET, broker=mosquitto.url, state_dir=tmp_path / "devices" / name,
                           epsilon_budget=1e9, tick_interval=0.3)
        driver.add(EdgeClient(cfg, bundle, data.clients[cid]))
    try:
        service.start()
        assert service._client.socket().fileno() > 1024  # the case select() cannot handle
        end = time.monotonic() + 60
        while service.model_round < 2 and time.monotonic() < end:
            driver.run_once(0.05)
            service.wait(0)  # re-raises a fatal aggregator error
    finally:
        service.stop()
        driver.close()
    assert service.model_round == 2, f"stuck at round {service.model_round}: the aggregator never kept a connection"
    assert [s.round for s in service.summaries] == [1, 2]
    assert all(sorted(s.participants) == DEVICES for s in service.summaries)


def test_network_loop_reconnects_after_broker_restart(mosquitto, many_fds):
    """Connect (first attempt made by the loop), lose the broker, get it back: connected again, subscriptions
    restored by on_connect, and publishes from another thread go out through the loop."""
    client = new_client("netloop-test", clean_session=True)
    connects: list[float] = []
    received: list[bytes] = []
    client.on_connect = lambda c, u, f, rc, p: (connects.append(time.monotonic()), c.subscribe("netloop/#", 1))
    client.on_message = lambda c, u, m: received.append(bytes(m.payload))
    client.connect_async("127.0.0.1", mosquitto.port, keepalive=10)
    loop = NetworkLoop(client, reconnect_min=0.2, reconnect_max=1.0, name="netloop-test").start()
    try:
        wait_for(lambda: client.is_connected() and connects, 10, "first connection")
        assert client.socket().fileno() > 1024
        mosquitto.restart(downtime=1.0)
        wait_for(lambda: len(connects) >= 2 and client.is_connected(), 20, "reconnection after a broker restart")
        sent = threading.Thread(target=lambda: [client.publish("netloop/x", str(i).encode(), qos=1)
                                                for i in range(50)])
        sent.start()
        sent.join()
        wait_for(lambda: len(received) >= 50, 10, "messages published from another thread")
        assert sorted(int(p) for p in received[-50:]) == list(range(50))
    finally:
        loop.stop()
    assert not loop.running and client.socket() is None


def test_network_loop_stop_without_broker_ends_quickly():
    """A loop still trying to reach a broker that is not there stops at once (and calls on_connect_fail)."""
    client = new_client("netloop-nobroker", clean_session=True)
    fails: list[int] = []
    client.on_connect_fail = lambda c, u: fails.append(1)
    from tests.mosquitto import free_port

    client.connect_async("127.0.0.1", free_port())
    loop = NetworkLoop(client, reconnect_min=0.1, reconnect_max=0.2).start()
    wait_for(lambda: len(fails) >= 2, 10, "repeated connection attempts")
    t0 = time.monotonic()
    loop.stop(timeout=2.0)
    assert time.monotonic() - t0 < 1.5 and not loop.running


def test_all_retained_statuses_of_a_large_fleet_count(tmp_path, mosquitto, bundle):
    """1,500 devices' retained 'online' statuses (more than Mosquitto queues per client at QoS 1) are all seen:
    the round needs every one of them (min_online = 1,500) to be announced."""
    n = 1500
    pub = new_client("status-writer", clean_session=True)
    pub.connect("127.0.0.1", mosquitto.port)
    loop = NetworkLoop(pub, name="status-writer").start()
    try:
        infos = [pub.publish(f"fedatt/{FLEET}/status/d{i:04d}",
                             wire.encode_status(wire.Status(f"d{i:04d}", "online", time.time(), "test")),
                             qos=1, retain=True) for i in range(n)]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        loop.stop()
    service = AggregatorService(engine_config(bundle, quorum=2, min_online=n, round_timeout_s=30.0), bundle,
                                tmp_path / "state", MqttSettings(mosquitto.url), max_rounds=1)
    announced: list[wire.RoundTask] = []
    watcher = new_client("round-watcher", clean_session=True)
    watcher.on_connect = lambda c, u, f, rc, p: c.subscribe(f"fedatt/{FLEET}/round", 1)
    watcher.on_message = lambda c, u, m: announced.append(wire.decode_round(bytes(m.payload)))
    watcher.connect("127.0.0.1", mosquitto.port)
    watch = NetworkLoop(watcher, name="round-watcher").start()
    try:
        service.start()
        wait_for(lambda: announced, 30, f"round 1 to be announced ({len(service.engine.online)} of {n} online)")
    finally:
        service.stop()
        watch.stop()
    assert announced[0].round == 1 and len(service.engine.online) == n

"""Prometheus metrics of the aggregator: rounds, updates accepted/rejected by reason, latency, bytes, devices.

Each service owns its own CollectorRegistry (not the global default) so several aggregators, e.g. the
strategies of one simulator comparison, can run in one process without clashing.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server


class AggregatorMetrics:
    def __init__(self, fleet: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["fleet"]
        self.fleet = fleet
        self._rounds = Counter("fedatt_rounds_closed_total", "Rounds closed and applied to the global model",
                               labels, registry=self.registry)
        self._reannounced = Counter("fedatt_rounds_reannounced_total", "Rounds re-announced after a missed quorum",
                                    labels, registry=self.registry)
        self._accepted = Counter("fedatt_updates_accepted_total", "Updates that passed validation", labels,
                                 registry=self.registry)
        self._rejected = Counter("fedatt_updates_rejected_total", "Updates rejected, by reason",
                                 labels + ["reason"], registry=self.registry)
        self._bytes = Counter("fedatt_update_bytes_total", "Bytes of update payloads received", labels,
                              registry=self.registry)
        self._latency = Histogram("fedatt_round_duration_seconds", "Announce-to-close time of a round", labels,
                                  buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
                                  registry=self.registry)
        self._online = Gauge("fedatt_devices_online", "Devices whose retained status is online", labels,
                             registry=self.registry)
        self._round = Gauge("fedatt_current_round", "Round number of the open round", labels,
                            registry=self.registry)
        self._participants = Gauge("fedatt_last_round_participants", "Updates aggregated in the last round",
                                   labels, registry=self.registry)

    def round_closed(self, duration_s: float, participants: int) -> None:
        self._rounds.labels(self.fleet).inc()
        self._latency.labels(self.fleet).observe(duration_s)
        self._participants.labels(self.fleet).set(participants)

    def round_reannounced(self) -> None:
        self._reannounced.labels(self.fleet).inc()

    def update_accepted(self, nbytes: int) -> None:
        self._accepted.labels(self.fleet).inc()
        self._bytes.labels(self.fleet).inc(nbytes)

    def update_rejected(self, reason: str, nbytes: int) -> None:
        self._rejected.labels(self.fleet, reason).inc()
        self._bytes.labels(self.fleet).inc(nbytes)

    def set_online(self, n: int) -> None:
        self._online.labels(self.fleet).set(n)

    def set_round(self, r: int) -> None:
        self._round.labels(self.fleet).set(r)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Expose /metrics over HTTP (loopback by default: put a reverse proxy in front to publish it)."""
        start_http_server(port, addr=addr, registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

"""The stream consumer's Prometheus metrics: its lag and what it has done, scraped from
``http://HOST:COHORTFLOW_CONSUME_METRICS_PORT/metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from cohortflow.events.stream import ConsumeStats, Lag


class ConsumerMetrics:
    """Gauges of one consumer process, in a registry of its own."""

    def __init__(self, consumer: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["consumer"]
        self._consumer = consumer
        self._lag = {
            "pending": Gauge(
                "cohortflow_consumer_pending",
                "Messages in the stream not yet delivered to the consumer.",
                labels,
                registry=self.registry,
            ),
            "unacknowledged": Gauge(
                "cohortflow_consumer_unacknowledged",
                "Messages delivered but not yet acknowledged (stored).",
                labels,
                registry=self.registry,
            ),
            "dead_letters": Gauge(
                "cohortflow_consumer_dead_letters",
                "Events in the dead-letter stream.",
                labels,
                registry=self.registry,
            ),
        }
        self._done = {
            name: Gauge(
                f"cohortflow_consumer_{name}",
                f"Since the process started: {text}.",
                labels,
                registry=self.registry,
            )
            for name, text in (
                ("messages", "messages acknowledged"),
                ("accepted", "events stored"),
                ("duplicates", "events already stored"),
            )
        }

    def serve(self, host: str, port: int) -> None:
        """Serve ``/metrics`` from a daemon thread."""
        start_http_server(port, addr=host, registry=self.registry)

    def update(self, lag: Lag, stats: ConsumeStats) -> None:
        """Set every gauge from the latest lag and counts."""
        for name, gauge in self._lag.items():
            gauge.labels(self._consumer).set(getattr(lag, name))
        for name, gauge in self._done.items():
            gauge.labels(self._consumer).set(getattr(stats, name))

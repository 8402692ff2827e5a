"""Prometheus metrics of the sidecar (one registry per app, so tests stay independent).

A front with ``--workers N`` is N processes behind one port, and a scrape reaches one of them:
``svd-sidecar`` then gives the workers a shared ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's
multiprocess mode), and every scrape answers the sum over all of them.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["MULTIPROCESS_DIR", "SidecarMetrics"]

#: The variable prometheus-client reads (at import) to keep its values in files shared by workers.
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"


class SidecarMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.registrations = Counter(
            "svd_sidecar_registrations",
            "vector registrations and changes",
            ["op"],
            registry=self.registry,
        )
        self.rejections = Counter(
            "svd_sidecar_rejections",
            "refused management or proxy requests",
            ["reason"],
            registry=self.registry,
        )
        self.proxied = Counter(
            "svd_sidecar_proxied_requests",
            "requests proxied to vLLM",
            ["endpoint", "steering"],
            registry=self.registry,
        )
        self.upstream_faults = Counter(
            "svd_sidecar_upstream_faults",
            "vLLM failures seen by the front (timeout: no answer in time; dropped: refused or "
            "cut off)",
            ["endpoint", "kind"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "svd_sidecar_request_seconds",
            "request latency through the sidecar",
            ["route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )

    def exposition(self) -> bytes:
        """What a scrape gets: this app's metrics, or every worker's, summed."""
        if os.environ.get(MULTIPROCESS_DIR):
            merged = CollectorRegistry()
            MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry)

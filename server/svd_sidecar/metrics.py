"""Prometheus metrics of the sidecar (one registry per app, so tests stay independent)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["SidecarMetrics"]


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

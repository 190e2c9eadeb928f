"""/healthz and Prometheus /metrics on one small HTTP server.

``/healthz`` answers JSON from the agent's ``health()``: HTTP 200 while the agent serves its
dataplane from a full view of the Store, 503 before the first full view or while stopping.
A failing Store is not a reason for 503 (a liveness probe that restarts the agent would not
free a disk or remount a filesystem, and a restart is the one moment an agent can lose its
view): the body then carries ``"degraded": "<which loop fails: the error, naming the Store's
file or URL>"``, present only while something fails. A ``health()`` that raises is a 500.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.endpoints = Gauge("tabby_endpoints", "Endpoints on this host by state", ["state"], registry=self.registry)
        self.errors = Counter("tabby_dataplane_errors_total", "Kernel writes that failed", registry=self.registry)
        self.apply_seconds = Histogram(
            "tabby_apply_seconds", "Time to apply one batch of changes to the kernel", registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.resyncs = Counter("tabby_resyncs_total", "Full reads of the kernel state", registry=self.registry)
        self.store_events = Counter("tabby_store_events_total", "Store updates received", registry=self.registry)
        self.policy_writes = Counter("tabby_policy_writes_total", "nftables writes by kind (replace, patch)",
                                     ["kind"], registry=self.registry)
        self.policy_drift = Counter("tabby_policy_drift_restored_total",
                                    "Times the nftables table was found changed by hand and restored",
                                    registry=self.registry)
        self.corrupt = Counter("tabby_corrupt_records_total", "Store records skipped as corrupt",
                               registry=self.registry)
        self.monitor_overflows = Counter(
            "tabby_netlink_overflows_total",
            "Times kernel events were lost from the netlink monitor's socket (each brings a full check)",
            registry=self.registry)

    def count_watch_events(self, read: Callable[[], int]) -> None:
        """``tabby_store_watch_events_total``: every event the Store watch carried to this agent,
        wanted or dropped by key (``tabby_store_events_total`` counts only the updates used): what
        the rest of the fabric costs this agent. Read from the syncer when scraped."""

        class _Collector:
            def collect(self) -> Iterator[CounterMetricFamily]:
                yield CounterMetricFamily("tabby_store_watch_events", "Store watch events received, any key",
                                          value=read())

        self.registry.register(_Collector())  # type: ignore[arg-type]


class HealthServer:
    def __init__(self, addr: str, port: int, metrics: Metrics, health: Callable[[], tuple[bool, dict[str, Any]]]):
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
                elif self.path == "/healthz":
                    try:
                        ok, info = health()
                        body, code = json.dumps(info).encode(), 200 if ok else 503
                    except Exception as e:  # a bug in health(): say so rather than drop the connection
                        body, code = json.dumps({"error": f"health check failed: {e!r}"}).encode(), 500
                    ctype = "application/json"
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((addr, port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="health", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

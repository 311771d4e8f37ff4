"""What the ranking service needs to run under load: Prometheus metrics, admission control (a bounded number of
``/rank`` requests in flight, 503 with ``Retry-After`` past it) and the service's readiness.

One ASGI middleware (``Operations``) wraps the whole app, so every answer is counted, including those that never
reach FastAPI (413 from the body-size limit, 503 from admission control). Admission is decided before the body is
read or parsed: past capacity a request costs the service almost nothing, and the latency of admitted requests stays
bounded by the capacity instead of growing with the queue.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

RANK_PATH = "/rank"
ENDPOINTS = ("/rank", "/model", "/healthz", "/readyz", "/metrics")  # other paths are counted as "other"
# seconds: from well under a millisecond (health checks) to the 10 s of a pathological request
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24)
CANDIDATE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 4096, 10_000)


class ServiceMetrics:
    """The service's Prometheus metrics, in a registry of its own (two apps in one process do not collide)."""

    def __init__(self, model: dict[str, str], capacity: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("onerank_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("onerank_request_duration_seconds",
                                 "time from receiving a request to the end of its answer, by endpoint and status",
                                 ["endpoint", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("onerank_inference_duration_seconds",
                                   "encoding, model, fusion and sorting of one /rank request (in a worker thread)",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.candidates = Histogram("onerank_candidates_per_request", "candidates of the /rank requests scored",
                                    buckets=CANDIDATE_BUCKETS, registry=r)
        self.in_flight = Gauge("onerank_requests_in_flight", "/rank requests admitted and not yet answered", registry=r)
        self.capacity = Gauge("onerank_capacity", "/rank requests admitted at once; more get 503", registry=r)
        self.ready = Gauge("onerank_ready", "1 once the model is loaded and warmed, 0 before and while draining",
                           registry=r)
        self.model = Info("onerank_model", "the served model: name, checkpoint version, backend, device, precision",
                          registry=r)
        self.model.info(model)
        self.capacity.set(capacity)


@dataclass
class ServiceState:
    """Readiness: ``ready`` once warmed; ``draining`` from the shutdown signal on; ``warm_up_error`` if warming failed."""

    ready: bool = False
    draining: bool = False
    warm_up_error: str | None = None


class Admission:
    """At most ``capacity`` ``/rank`` requests in flight (being scored or waiting for a worker). The counter lives on
    the event loop's thread only, so checking and taking a slot cannot interleave with another request."""

    def __init__(self, capacity: int, retry_after_s: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.retry_after_s = max(1, math.ceil(retry_after_s))  # Retry-After takes whole seconds
        self.in_flight = 0

    def try_acquire(self) -> bool:
        if self.in_flight >= self.capacity:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1


class Operations:
    """ASGI middleware: admission control on ``POST /rank`` and, for every request, its count by status and its
    latency."""

    def __init__(self, app, metrics: ServiceMetrics, admission: Admission) -> None:
        self.app = app
        self.metrics = metrics
        self.admission = admission

    async def _overloaded(self, send) -> None:
        detail = [{"loc": [], "type": "overloaded",
                   "msg": f"the service is at capacity ({self.admission.capacity} requests in flight); retry after "
                          f"{self.admission.retry_after_s} s"}]
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"retry-after", str(self.admission.retry_after_s).encode())]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        start = time.perf_counter()
        status = 500  # what the client sees if the app raises before answering

        async def send_recording_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        admitted = False
        try:
            if endpoint == RANK_PATH and scope["method"] == "POST":
                admitted = self.admission.try_acquire()
                if not admitted:
                    await self._overloaded(send_recording_status)
                    return
                self.metrics.in_flight.inc()
            await self.app(scope, receive, send_recording_status)
        finally:
            if admitted:
                self.admission.release()
                self.metrics.in_flight.dec()
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint, str(status)).observe(time.perf_counter() - start)

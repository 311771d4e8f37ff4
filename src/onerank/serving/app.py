"""The HTTP ranking service (FastAPI): ``POST /rank``, ``GET /model``, ``GET /healthz``, ``GET /readyz``,
``GET /metrics`` (Prometheus).

Inference (encoding plus the model) runs in a small thread pool, never on the event loop, so slow requests do not
block health checks or the parsing of other requests; PyTorch and ONNX Runtime release the GIL while they compute.
At most ``workers + max_queue`` ranking requests are in flight; past that the service answers 503 with
``Retry-After`` at once (``onerank.serving.operations``). ``/readyz`` answers 200 once the model has scored a warm-up
request, 503 before and from the shutdown signal on; shutdown stops accepting connections and lets the requests in
flight finish (up to ``graceful_timeout_s``) before the worker threads stop.
Bad input always gets a 4xx whose ``detail`` names the field at fault (FastAPI's layout: ``[{"loc", "msg",
"type"}]``): 422 for malformed JSON, missing fields, wrong types and empty candidate lists, 413 for requests past the
limits (candidates, history length, body size). Unknown ids are not errors: they are scored as OOV.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import onerank
from onerank.serving.operations import Admission, Operations, ServiceMetrics, ServiceState
from onerank.serving.ranker import DEFAULT_CHUNK_SIZE, Fusion, Ranker
from onerank.serving.request import RequestLimits
from onerank.serving.wire import ModelDescription, RankRequest, RankResponse, RequestError

log = logging.getLogger(__name__)

MAX_ERRORS = 20  # validation errors reported per response
WARM_UP_CANDIDATES = 2 * DEFAULT_CHUNK_SIZE + 1  # several chunks: OneRank's cached-context path runs, not only one pass


def _error_body(errors: list[dict]) -> dict[str, Any]:
    return {"detail": errors[:MAX_ERRORS]}


class BodySizeLimit:
    """ASGI middleware: a body past ``max_bytes`` (declared or streamed) gets 413 before it is parsed."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: int | str) -> dict:
        return {"loc": ["body"], "msg": f"request body of {size} bytes exceeds the limit of {self.max_bytes} bytes",
                "type": "too_large"}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse(_error_body([self._too_large(int(declared))]), status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI passes HTTPException through its body parsing; a plain error would become a 400
                    raise HTTPException(413, detail=[self._too_large(f"more than {received}")])
            return message

        await self.app(scope, limited_receive, send)


def create_app(
    ranker: Ranker, workers: int = 2, max_body_bytes: int = 8 * 2**20, max_queue: int = 8, retry_after_s: int = 1,
) -> FastAPI:
    """The service around a ranker: ``workers`` requests are scored at once, up to ``max_queue`` more wait for a
    worker, the rest get 503 with ``Retry-After: retry_after_s``."""
    if workers < 1 or max_queue < 0:
        raise ValueError(f"workers must be >= 1 and max_queue >= 0, got workers={workers}, max_queue={max_queue}")
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="onerank-rank")
    description = ModelDescription.model_validate(ranker.describe())
    admission = Admission(workers + max_queue, retry_after_s)
    metrics = ServiceMetrics(
        {"name": description.name, "version": description.version, "backend": description.backend,
         "device": description.device, "precision": description.precision},
        admission.capacity,
    )
    state = ServiceState()

    def warm_up() -> None:
        # the first calls pay for lazy initialisation (kernels, allocator, caches): not the first user's request
        request = ranker.example_request(min(WARM_UP_CANDIDATES, ranker.limits.max_candidates))
        for _ in range(2):
            ranker.rank(request)

    def warmed(future) -> None:
        if future.exception() is not None:
            state.warm_up_error = f"warm-up failed: {future.exception()!r}"
            log.error(state.warm_up_error)
        elif not state.draining:
            state.ready = True
            metrics.ready.set(1)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        executor.submit(warm_up).add_done_callback(warmed)
        yield
        # uvicorn has closed the listening socket and let the requests in flight finish: the workers are idle
        drain(app)
        executor.shutdown(wait=True)

    app = FastAPI(title="onerank ranking service", version=onerank.__version__, lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.add_middleware(Operations, metrics=metrics, admission=admission)  # outermost: counts every answer
    app.state.ranker = ranker
    app.state.service = state
    app.state.metrics = metrics

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(_error_body(exc.errors), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # only where and what: echoing the input back could return a whole oversized candidate list
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse(_error_body(errors), status_code=422)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers (the model may still be warming up; see /readyz)."""
        return {"status": "ok", "model": ranker.model_name, "version": ranker.version}

    @app.get("/readyz", responses={503: {"description": "warming up, warm-up failed, or draining"}})
    async def readyz() -> JSONResponse:
        """Readiness: 200 once the model is loaded and has scored a warm-up request; 503 before that and while the
        service drains for shutdown."""
        if state.ready and not state.draining:
            return JSONResponse({"status": "ready", "model": ranker.model_name, "version": ranker.version})
        reason = "draining" if state.draining else state.warm_up_error or "warming up"
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/model", response_model=ModelDescription)
    async def model() -> ModelDescription:
        return description

    def respond(request: RankRequest) -> JSONResponse:
        with metrics.inference.time():
            body = ranker.respond(request)
        # rendered here, in the worker thread: JSON of a long ranking would otherwise hold up the event loop
        return JSONResponse(body)

    @app.post("/rank", response_model=RankResponse,
              responses={413: {"description": "request past the limits"}, 422: {"description": "invalid request"},
                         503: {"description": "at capacity: retry after the Retry-After header's seconds"}})
    async def rank(request: RankRequest) -> JSONResponse:
        metrics.candidates.observe(len(request.candidates))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, respond, request)

    return app


def drain(app: FastAPI) -> None:
    """Mark the service as shutting down: /readyz answers 503 so that load balancers stop sending requests."""
    app.state.service.draining = True
    app.state.metrics.ready.set(0)


def serve(
    checkpoint: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str = "torch",
    export_path: str | Path | None = None,
    fusion: Fusion | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_candidates: int = 4096,
    max_history: int = 1000,
    max_body_bytes: int = 8 * 2**20,
    workers: int = 2,
    threads: int | None = None,
    fusion_file: str | Path | bool | None = None,
    max_queue: int = 8,
    retry_after_s: int = 1,
    graceful_timeout_s: float = 30.0,
    device: str = "cpu",
    precision: str = "fp32",
    processes: int = 1,
) -> None:
    """Load the checkpoint (with its fusion file, see ``Ranker``) and serve it with uvicorn until SIGINT / SIGTERM, then drain (see the module docstring).

    ``processes`` > 1 starts that many server processes on the same port (uvicorn's workers), each with its own copy
    of the model, its own worker threads and its own /metrics."""
    if workers < 1 or processes < 1:
        raise ValueError(f"workers and processes must be >= 1, got workers={workers}, processes={processes}")
    # Concurrent inferences share the cores: by default each gets its share rather than all of them.
    threads = threads or max(1, (os.cpu_count() or 1) // (workers * processes))
    options = {
        "checkpoint": str(checkpoint), "backend": backend, "export_path": str(export_path) if export_path else None,
        "fusion": {"kind": fusion.kind, "weights": fusion.weights} if fusion else None, "chunk_size": chunk_size, "max_candidates": max_candidates,
        "max_history": max_history, "threads": threads, "device": device, "precision": precision,
        "workers": workers, "max_body_bytes": int(max_body_bytes), "max_queue": max_queue,
        "retry_after_s": retry_after_s,
        "fusion_file": str(fusion_file) if isinstance(fusion_file, (str, Path)) else fusion_file,
    }
    if processes > 1:
        # uvicorn's worker processes import the app: the options travel in the environment
        os.environ[SERVE_OPTIONS_ENV] = json.dumps(options)
        log.info("serving %s with %d processes on http://%s:%d", checkpoint, processes, host, port)
        # uvicorn pings each worker and replaces one that does not answer in time: loading PyTorch and the model
        # and the warm-up keep a worker busy for seconds on a busy machine, longer than uvicorn's default 5 s
        uvicorn.run("onerank.serving.app:app_from_environment", factory=True, host=host, port=port,
                    workers=processes, timeout_graceful_shutdown=graceful_timeout_s, log_level="info",
                    timeout_worker_healthcheck=WORKER_HEALTHCHECK_S)
        return
    app = _app_from_options(options)
    ranker = app.state.ranker
    log.info("serving %s (%s on %s, version %s) on http://%s:%d", ranker.model_name, backend, device, ranker.version,
             host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=graceful_timeout_s)
    DrainingServer(config, lambda: drain(app)).run()


SERVE_OPTIONS_ENV = "ONERANK_SERVE_OPTIONS"
WORKER_HEALTHCHECK_S = 120


def _app_from_options(options: dict[str, Any]) -> FastAPI:
    fusion = Fusion(options["fusion"]["kind"], options["fusion"]["weights"]) if options["fusion"] else None
    ranker = Ranker(
        options["checkpoint"], backend=options["backend"], export_path=options["export_path"], fusion=fusion,
        chunk_size=options["chunk_size"], limits=RequestLimits(options["max_candidates"], options["max_history"]),
        threads=options["threads"], device=options["device"], precision=options["precision"],
        fusion_file=options.get("fusion_file"),
    )
    return create_app(ranker, workers=options["workers"], max_body_bytes=options["max_body_bytes"],
                      max_queue=options["max_queue"], retry_after_s=options["retry_after_s"])


def app_from_environment() -> FastAPI:
    """The app of one of ``serve``'s worker processes (``processes`` > 1), built from the options it left in the
    environment."""
    return _app_from_options(json.loads(os.environ[SERVE_OPTIONS_ENV]))


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app as soon as a shutdown signal arrives (before uvicorn waits for the requests
    in flight), so that /readyz fails while they finish."""

    def __init__(self, config: uvicorn.Config, on_exit) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

"""The HTTP ranking service (FastAPI): ``POST /rank``, ``GET /model``, ``GET /healthz``.

Inference (encoding plus the model) runs in a small thread pool, never on the event loop, so slow requests do not
block health checks or the parsing of other requests; PyTorch and ONNX Runtime release the GIL while they compute.
Bad input always gets a 4xx whose ``detail`` names the field at fault (FastAPI's layout: ``[{"loc", "msg",
"type"}]``): 422 for malformed JSON, missing fields, wrong types and empty candidate lists, 413 for requests past the
limits (candidates, history length, body size). Unknown ids are not errors: they are scored as OOV.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

import onerank
from onerank.serving.ranker import DEFAULT_CHUNK_SIZE, Fusion, Ranker
from onerank.serving.request import RankRequest, RankResponse, RequestError, RequestLimits

log = logging.getLogger(__name__)

MAX_ERRORS = 20  # validation errors reported per response


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


def create_app(ranker: Ranker, workers: int = 2, max_body_bytes: int = 8 * 2**20) -> FastAPI:
    """The service around a ranker; ``workers`` requests are scored at once, the rest wait in the pool's queue."""
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="onerank-rank")
    description = ranker.describe()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        executor.shutdown(wait=True)

    app = FastAPI(title="onerank ranking service", version=onerank.__version__, lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.state.ranker = ranker

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
        return {"status": "ok", "model": ranker.model_name, "version": ranker.version}

    @app.get("/model")
    async def model() -> dict[str, Any]:
        return description

    @app.post("/rank", response_model=RankResponse,
              responses={413: {"description": "request past the limits"}, 422: {"description": "invalid request"}})
    async def rank(request: RankRequest) -> JSONResponse:
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(executor, ranker.respond, request)
        return JSONResponse(body)

    return app


def serve(
    checkpoint: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str = "torch",
    onnx_path: str | Path | None = None,
    fusion: Fusion | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_candidates: int = 4096,
    max_history: int = 1000,
    max_body_bytes: int = 8 * 2**20,
    workers: int = 2,
    threads: int | None = None,
    fusion_file: str | Path | bool | None = None,
) -> None:
    """Load the checkpoint (with its fusion file, see ``Ranker``) and serve it with uvicorn until interrupted."""
    import uvicorn

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    # Concurrent inferences share the cores: by default each gets its share rather than all of them.
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    ranker = Ranker(checkpoint, backend=backend, onnx_path=onnx_path, fusion=fusion, chunk_size=chunk_size,
                    limits=RequestLimits(max_candidates, max_history), threads=threads,
                    fusion_file=fusion_file)
    app = create_app(ranker, workers=workers, max_body_bytes=int(max_body_bytes))
    log.info("serving %s (%s, version %s) on http://%s:%d", ranker.model_name, backend, ranker.version, host, port)
    uvicorn.run(app, host=host, port=port, log_level="info")

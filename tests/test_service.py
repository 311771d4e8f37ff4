"""The HTTP service, started for real (uvicorn on 127.0.0.1, a free port): rankings equal the Python ranker's, bad
input gets a 4xx naming the problem (never a 500) and the service keeps serving, inference does not block the event
loop, and `onerank serve` starts it from the command line. Operations: /metrics counts requests by status, latency
and candidates in the Prometheus format; /readyz waits for the warm-up; past capacity the service answers 503 with
Retry-After; a shutdown lets the request in flight finish; /model follows its pydantic model."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from prometheus_client.parser import text_string_to_metric_families

from onerank.serving import Ranker, RequestLimits
from onerank.serving.app import DrainingServer, create_app, drain
from onerank.serving.wire import ModelDescription


class LiveServer:
    """uvicorn serving ``app`` in a thread on a socket bound to 127.0.0.1 on a free port."""

    def __init__(self, app) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        # the server `onerank serve` runs: a shutdown signal marks the app as draining first
        self.server = DrainingServer(uvicorn.Config(app, log_level="warning", lifespan="on"), lambda: drain(app))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


@pytest.fixture(scope="module")
def ranker(tiny_checkpoint):
    return Ranker(tiny_checkpoint("mmoe"), limits=RequestLimits(max_candidates=300, max_history=50))


@pytest.fixture(scope="module")
def live(ranker):
    with LiveServer(create_app(ranker, workers=2, max_body_bytes=200_000)) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            yield client


def requests_for(ranker: Ranker) -> list[dict]:
    base = ranker.example_request(60)
    unknown = json.loads(json.dumps(base))
    unknown["candidates"][3]["item_id"] = 123_456_789
    unknown["histories"]["clicked"] = [5, 999_999, 7]
    unknown["user"]["user_id"] = None
    product = {**base, "fusion": {"kind": "product", "weights": {"click": 1.0, "buy": 0.3}}, "top_k": 10}
    single = {**base, "candidates": base["candidates"][:1], "histories": {}}
    return [base, unknown, product, single]


def test_rankings_over_http_equal_the_python_ranker(live, ranker):
    for request in requests_for(ranker):
        response = live.post("/rank", json=request)
        assert response.status_code == 200, response.text
        body = response.json()
        expected = ranker.respond(request)
        assert [r["index"] for r in body["ranking"]] == [r["index"] for r in expected["ranking"]]
        assert [r["item_id"] for r in body["ranking"]] == [r["item_id"] for r in expected["ranking"]]
        for got, want in zip(body["ranking"], expected["ranking"]):
            assert got["score"] == pytest.approx(want["score"], abs=1e-9)
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-9)
        assert body["model"] == "mmoe" and body["version"] == ranker.version


def test_model_description_and_its_example_request(live):
    assert live.get("/healthz").json()["status"] == "ok"
    description = live.get("/model").json()
    assert description["name"] == "mmoe" and [t["name"] for t in description["tasks"]] == ["click", "buy"]
    assert description["schema"]["item_id"] == "item_id" and description["version"]
    assert live.get("/openapi.json").status_code == 200
    response = live.post("/rank", json=description["example_request"])
    assert response.status_code == 200
    assert len(response.json()["ranking"]) == len(description["example_request"]["candidates"])


def _chunks(data: bytes, size: int):
    for start in range(0, len(data), size):
        yield data[start:start + size]


BAD = [
    # (what, body bytes or JSON, expected status, a fragment the loc or message must hold)
    ("malformed JSON", b'{"candidates": [', 422, "json"),
    ("not an object", b"[1, 2, 3]", 422, "body"),
    ("empty body", b"", 422, "body"),
    ("no candidates", {"user": {"user_id": 1}}, 422, "candidates"),
    ("empty candidate list", {"candidates": []}, 422, "candidates"),
    ("candidate not an object", {"candidates": ["a"]}, 422, "candidates"),
    ("unknown top-level key", {"candidates": [{"item_id": 1}], "cadidates": []}, 422, "cadidates"),
    ("missing user field", {"context": {"hour": 1}, "candidates": [{"item_id": 1}]}, 422, "user_id"),
    ("unknown context field", "unknown_context", 422, "devcie"),
    ("wrong type of a dense value", "bad_price", 422, "price"),
    ("infinite dense value", "infinite_price", 422, "price"),
    ("list as a field value", "list_value", 422, "category"),
    ("non-numeric id of an integer field", "text_id", 422, "item_id"),
    ("history item of the wrong type", "bad_history", 422, "clicked"),
    ("unknown behaviour sequence", "unknown_sequence", 422, "viewed"),
    ("fusion weight of an unknown task", "bad_fusion", 422, "fusion"),
    ("top_k of 0", "bad_top_k", 422, "top_k"),
    ("too many candidates", "many_candidates", 413, "candidates"),
    ("history too long", "long_history", 413, "clicked"),
    ("body too large", "huge_body", 413, "body"),
]


def bad_body(kind, valid: dict) -> bytes:
    if isinstance(kind, bytes):
        return kind
    if isinstance(kind, dict):
        return json.dumps(kind).encode()
    request = json.loads(json.dumps(valid))
    if kind == "unknown_context":
        request["context"]["devcie"] = "ios"
    elif kind == "bad_price":
        request["candidates"][0]["price"] = "cheap"
    elif kind == "infinite_price":
        request["candidates"][0]["price"] = 123456.789  # JSON has no infinity; Python's parser takes the literal
        return json.dumps(request).replace("123456.789", "Infinity").encode()
    elif kind == "list_value":
        request["candidates"][0]["category"] = [1, 2]
    elif kind == "text_id":
        request["candidates"][1]["item_id"] = "abc"
    elif kind == "bad_history":
        request["histories"]["clicked"] = [1, {"id": 2}]
    elif kind == "unknown_sequence":
        request["histories"]["viewed"] = [1]
    elif kind == "bad_fusion":
        request["fusion"] = {"weights": {"like": 1}}
    elif kind == "bad_top_k":
        request["top_k"] = 0
    elif kind == "many_candidates":
        request["candidates"] = [{"item_id": 1}] * 301
    elif kind == "long_history":
        request["histories"]["clicked"] = [1] * 51
    elif kind == "huge_body":
        request["padding"] = "x" * 250_000
    return json.dumps(request).encode()


def test_bad_input_gets_a_4xx_naming_the_problem_and_the_service_keeps_serving(live, ranker):
    valid = ranker.example_request(5)
    for what, kind, status, fragment in BAD:
        response = live.post("/rank", content=bad_body(kind, valid), headers={"content-type": "application/json"})
        assert response.status_code == status, f"{what}: {response.status_code} {response.text[:300]}"
        detail = response.json()["detail"]
        assert isinstance(detail, list) and detail, what
        text = json.dumps(detail).lower()
        assert fragment.lower() in text, f"{what}: {fragment!r} not in {text[:300]}"
    # a body streamed without a content-length is cut off at the limit too
    streamed = live.post("/rank", content=_chunks(bad_body("huge_body", valid), 16_384),
                         headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert live.post("/rank", json=valid).status_code == 200
    assert live.get("/healthz").status_code == 200


def test_concurrent_requests_are_all_served(live, ranker):
    requests = requests_for(ranker) * 6
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda r: live.post("/rank", json=r), requests))
    assert [r.status_code for r in responses] == [200] * len(requests)
    for request, response in zip(requests, responses):
        expected = [r["index"] for r in ranker.respond(request)["ranking"]]
        assert [r["index"] for r in response.json()["ranking"]] == expected


class SlowRanker:
    """A ranker whose inference (``respond``; not the warm-up) takes ``seconds``: the event loop must stay free."""

    def __init__(self, ranker: Ranker, seconds: float = 1.0) -> None:
        self._ranker = ranker
        self._seconds = seconds

    def respond(self, request):
        time.sleep(self._seconds)
        return self._ranker.respond(request)

    def __getattr__(self, name):
        return getattr(self._ranker, name)


def test_inference_does_not_block_the_event_loop(ranker):
    with LiveServer(create_app(SlowRanker(ranker), workers=2)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(client.post, "/rank", json=ranker.example_request(3))
            time.sleep(0.2)
            start = time.perf_counter()
            health = client.get("/healthz")
            waited = time.perf_counter() - start
            assert health.status_code == 200 and waited < 0.5 and not slow.done()
            assert slow.result().status_code == 200


def test_cli_serve_starts_the_service(tiny_checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "onerank.cli", "serve", "--checkpoint", str(tiny_checkpoint("mmoe")),
         "--port", str(port), "--workers", "1", "--fusion", "product", "--weight", "click=1", "--weight", "buy=0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"onerank serve did not start: {process.stdout.read() if process.poll() else ''}")
            time.sleep(0.2)
        description = httpx.get(f"{url}/model", timeout=10).json()
        assert description["fusion"] == {"kind": "product", "weights": {"click": 1.0, "buy": 0.5}}
        response = httpx.post(f"{url}/rank", json=description["example_request"], timeout=30)
        assert response.status_code == 200 and response.json()["fusion"]["kind"] == "product"
    finally:
        process.terminate()
        process.wait(timeout=30)


# ---------------------------------------------------------------------------------------------------------------------
# Operations
# ---------------------------------------------------------------------------------------------------------------------
def scrape(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """GET /metrics, parsed: (sample name, sorted labels) -> value."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_metrics_count_requests_by_status_latency_and_candidates(live, ranker):
    before = scrape(live)
    sizes = [3, 40, 7]
    for n in sizes:
        assert live.post("/rank", json=ranker.example_request(n)).status_code == 200
    assert live.post("/rank", json={"candidates": []}).status_code == 422
    after = scrape(live)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("onerank_requests_total", endpoint="/rank", status="200") == len(sizes)
    assert delta("onerank_requests_total", endpoint="/rank", status="422") == 1
    assert delta("onerank_request_duration_seconds_count", endpoint="/rank", status="200") == len(sizes)
    assert delta("onerank_request_duration_seconds_count", endpoint="/rank", status="422") == 1
    assert delta("onerank_request_duration_seconds_sum", endpoint="/rank", status="200") > 0
    assert delta("onerank_candidates_per_request_count") == len(sizes)
    assert delta("onerank_candidates_per_request_sum") == sum(sizes)
    assert delta("onerank_candidates_per_request_bucket", le="10.0") == 2  # 3 and 7
    assert delta("onerank_inference_duration_seconds_count") == len(sizes)
    info = {labels: v for (name, labels), v in after.items() if name == "onerank_model_info"}
    assert list(info.values()) == [1.0]
    assert dict(next(iter(info))) == {"name": "mmoe", "version": ranker.version, "backend": "torch",
                                      "device": "cpu", "precision": "fp32"}
    assert after[("onerank_capacity", ())] == 2 + 8 and after[("onerank_requests_in_flight", ())] == 0


def test_model_description_is_typed(live, ranker):
    description = ModelDescription.model_validate(live.get("/model").json())
    assert description.name == "mmoe" and description.device == "cpu" and description.precision == "fp32"
    assert description.limits.max_candidates == 300
    schema = live.get("/openapi.json").json()
    model_response = schema["paths"]["/model"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert model_response["$ref"].endswith("/ModelDescription")


class GatedRanker:
    """A ranker whose ``rank`` (what the warm-up calls) waits until ``opened`` is set."""

    def __init__(self, ranker: Ranker) -> None:
        self._ranker = ranker
        self.opened = threading.Event()

    def rank(self, request, fusion=None):
        assert self.opened.wait(timeout=30)
        return self._ranker.rank(request, fusion)

    def __getattr__(self, name):
        return getattr(self._ranker, name)


def test_readyz_answers_503_until_the_model_is_warmed(ranker):
    gated = GatedRanker(ranker)
    with LiveServer(create_app(gated, workers=1)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200  # alive, not ready
        warming = client.get("/readyz")
        assert warming.status_code == 503 and warming.json()["reason"] == "warming up"
        assert scrape(client)[("onerank_ready", ())] == 0
        gated.opened.set()
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the service did not become ready"
            time.sleep(0.05)
        assert client.get("/readyz").json()["status"] == "ready"
        assert scrape(client)[("onerank_ready", ())] == 1


def test_past_capacity_the_service_answers_503_with_retry_after(ranker):
    # one worker and one waiting slot: of 6 simultaneous 2-second requests, 2 are admitted, 4 refused at once
    app = create_app(SlowRanker(ranker, seconds=2.0), workers=1, max_queue=1, retry_after_s=3)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        request = ranker.example_request(3)
        barrier = threading.Barrier(6)

        def post(_):
            with httpx.Client(base_url=server.url, timeout=30) as own:
                barrier.wait()
                start = time.perf_counter()
                response = own.post("/rank", json=request)
                return response, time.perf_counter() - start

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(post, range(6)))
        statuses = sorted(r.status_code for r, _ in results)
        assert statuses == [200, 200, 503, 503, 503, 503]
        for response, seconds in results:
            if response.status_code == 503:
                assert response.headers["retry-after"] == "3" and seconds < 1.5  # refused without waiting
                assert response.json()["detail"][0]["type"] == "overloaded"
        metrics = scrape(client)
        assert metrics[("onerank_requests_total", (("endpoint", "/rank"), ("status", "503")))] == 4
        assert metrics[("onerank_requests_total", (("endpoint", "/rank"), ("status", "200")))] == 2
        assert client.post("/rank", json=request).status_code == 200  # capacity is back once they are answered


def test_shutdown_lets_the_request_in_flight_finish(ranker):
    app = create_app(SlowRanker(ranker, seconds=1.5), workers=1)
    server = LiveServer(app).__enter__()
    try:
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(httpx.post, f"{server.url}/rank", json=ranker.example_request(5), timeout=30)
            time.sleep(0.4)
            assert not in_flight.done()
            server.server.handle_exit(signal.SIGTERM, None)  # what SIGTERM does to `onerank serve`
            assert app.state.service.draining  # /readyz answers 503 from now on
            response = in_flight.result()
        assert response.status_code == 200 and len(response.json()["ranking"]) == 5
        server.thread.join(timeout=30)
        assert not server.thread.is_alive()  # the server stopped once the request was answered
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.url}/healthz", timeout=2)
    finally:
        server.__exit__(None, None, None)


@pytest.mark.parametrize("weights", [None, {"click": 1.0, "buy": 0.5}])
def test_a_worker_process_builds_its_app_from_the_serve_options(tiny_checkpoint, monkeypatch, weights):
    """`onerank serve --processes N`: each uvicorn worker process rebuilds the app from the options in the
    environment (app_from_environment), default fusion or not."""
    from onerank.serving.app import SERVE_OPTIONS_ENV, app_from_environment

    options = {"checkpoint": str(tiny_checkpoint("mmoe")), "backend": "torch", "export_path": None,
               "fusion": {"kind": "product" if weights else "weighted_sum", "weights": weights}, "chunk_size": 64,
               "max_candidates": 100, "max_history": 50, "threads": 1, "device": "cpu", "precision": "fp32",
               "workers": 1, "max_body_bytes": 100_000, "max_queue": 3, "retry_after_s": 2}
    monkeypatch.setenv(SERVE_OPTIONS_ENV, json.dumps(options))
    app = app_from_environment()
    ranker = app.state.ranker
    assert ranker.fusion.weights == (weights or {"click": 1.0, "buy": 1.0})
    assert ranker.limits.max_candidates == 100 and app.state.metrics.capacity._value.get() == 4

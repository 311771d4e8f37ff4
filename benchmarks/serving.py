"""Serving latency and throughput: the Python ranker per request, and a load test of the HTTP service.

1. Checkpoints: OneRank (configs/models/onerank.yaml) and MMoE (defaults) trained one epoch on a small synthetic
   dataset with 50-item histories, in a work folder (kept between runs unless ``--retrain``).
2. Ranker latency: one request = a user, a context, two 50-item histories and N candidates (item id and price; the
   other item fields come from the item table), for N = 100, 1000, 4096, end to end through ``Ranker.rank``
   (encoding, the model, fusion, sorting). Rows: OneRank with the context encoded once per request (``score_pool``,
   the ranker's path), OneRank re-encoding the context for every chunk (the generic chunked ``score_pool`` of the
   base class: what a ranker without the context cache pays; its pool-level steps then see one chunk at a time, so
   it is a cost baseline, not the same scores), MMoE, and both models on their ONNX exports in ONNX Runtime.
   Reported: p50 / p95 / p99 latency in ms and candidates per second (N / mean latency).
3. Load test: ``onerank serve`` in a subprocess on 127.0.0.1 (a free port), OneRank, requests of
   ``--load-candidates`` candidates with 50-item histories sent by 1, 8 and 32 concurrent httpx clients for
   ``--seconds`` each; reported: requests/s, candidates/s, latency percentiles and the number of errors (any
   non-200 answer or transport error; must be 0).

    python benchmarks/serving.py                      # everything, about 3 minutes on 2 cores
    python benchmarks/serving.py --quick              # fewer repetitions, shorter load test
    python benchmarks/serving.py --json benchmarks/results/serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from onerank.serving.ranker import DEFAULT_CHUNK_SIZE

ROOT = Path(__file__).resolve().parents[1]
HISTORY = 50
SIZES = (100, 1000, 4096)
DATASET = {
    "num_users": 400, "num_items": 5000, "candidates_per_request": 20, "history_len": HISTORY,
    "history_requests": 12.0, "days": 3, "history_days": 7,
}


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------
def train_checkpoints(work: Path, retrain: bool) -> dict[str, Path]:
    from onerank import api
    from onerank.training.config import RunConfig, TrainConfig

    onerank_config = RunConfig.from_yaml(ROOT / "configs" / "models" / "onerank.yaml")
    runs = {
        "onerank": (onerank_config.model_options, onerank_config.objective),
        "mmoe": ({}, {}),
    }
    out = {}
    for name, (options, objective) in runs.items():
        checkpoint = work / name / "checkpoint.pt"
        if retrain or not checkpoint.exists():
            config = RunConfig(
                dataset="synthetic", dataset_options=dict(DATASET), model=name, model_options=dict(options),
                objective=dict(objective), cache_dir=str(work / "cache"),
                train=TrainConfig(epochs=1, batch_size=512, progress=False, tensorboard=False),
            )
            start = time.perf_counter()
            api.train(config, out_dir=work / name, overwrite=True)  # retrain: replace the run there
            print(f"trained {name} in {time.perf_counter() - start:.1f}s -> {checkpoint}", flush=True)
        out[name] = checkpoint
    return out


def export_onnx(checkpoint: Path) -> tuple[Path | None, str]:
    from onerank.serving.export import default_export_path, export_checkpoint

    path = default_export_path(checkpoint, "onnx")
    if path.exists() and path.stat().st_mtime >= checkpoint.stat().st_mtime:
        return path, ""
    try:
        report = export_checkpoint(checkpoint, "onnx")
    except ValueError as exc:
        return None, str(exc)
    return report.path, ""


# ---------------------------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------------------------
def make_request(ranker, n: int, seed: int = 0) -> dict:
    """A user with two full 50-item histories and n candidates (id and price; other item fields from the table)."""
    rng = np.random.default_rng(seed)
    request = ranker.example_request(1)
    items = ranker.encoder.encoders.vocabularies[ranker.space.schema.item_id].to_list()
    for seq in ranker.space.sequences:
        request["histories"][seq] = [items[i] for i in rng.integers(0, len(items), HISTORY)]
    candidates = rng.choice(len(items), size=n, replace=n > len(items))
    prices = np.round(np.exp(rng.normal(3.0, 0.6, size=n)), 2)
    request["candidates"] = [{"item_id": items[i], "price": float(p)} for i, p in zip(candidates, prices)]
    return request


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1000
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean())}


# ---------------------------------------------------------------------------------------------------------------------
# Ranker latency
# ---------------------------------------------------------------------------------------------------------------------
class ContextPerChunk:
    """Torch backend that scores the pool chunk by chunk with the base class's generic ``score_pool``: every chunk
    re-encodes the request's context (the cost a ranker without OneRank's context cache pays)."""

    def __init__(self, backend) -> None:
        self.inner = backend

    def __call__(self, encoded):
        from onerank.models.base import MultiTaskModel

        inner = self.inner
        batch = encoded.to_batch(inner.item_table, inner.item_id)
        with torch.inference_mode():
            logits = MultiTaskModel.score_pool(inner.model, batch, inner.chunk_size)
        return {t: v.float().numpy() for t, v in logits.items()}


def time_ranker(ranker, n: int, repeats: int, warmup: int = 2) -> dict:
    request = make_request(ranker, n)  # a dict, as a Python caller holds it: validation is part of the timing
    for _ in range(warmup):
        ranker.rank(request)
    latencies = []
    for _ in range(repeats):
        start = time.perf_counter()
        ranker.rank(request)
        latencies.append(time.perf_counter() - start)
    stats = percentiles(latencies)
    stats["candidates_per_s"] = n / (stats["mean"] / 1000)
    return stats


def ranker_rows(
    checkpoints: dict[str, Path], chunk_size: int, quick: bool, threads: int
) -> tuple[list[dict], list[str]]:
    from onerank.serving import Ranker

    notes = []
    variants = []
    for name, checkpoint in checkpoints.items():
        ranker = Ranker(checkpoint, chunk_size=chunk_size, threads=threads)
        variants.append((name, "torch", "context once" if name == "onerank" else "", ranker))
        if name == "onerank":
            per_chunk = Ranker(checkpoint, chunk_size=chunk_size, threads=threads)
            per_chunk.backend = ContextPerChunk(per_chunk.backend)
            variants.append((name, "torch", "context per chunk", per_chunk))
        onnx_path, why = export_onnx(checkpoint)
        if onnx_path is None:
            notes.append(f"{name} onnx: not measured ({why})")
        else:
            variants.append((name, "onnx", "one pass", Ranker(checkpoint, backend="onnx", onnx_path=onnx_path,
                                                              threads=threads)))
    rows = []
    for model, backend, variant, ranker in variants:
        for n in SIZES:
            repeats = {100: 60, 1000: 30, 4096: 10}[n] // (3 if quick else 1)
            stats = time_ranker(ranker, n, max(repeats, 5))
            rows.append({"model": model, "backend": backend, "variant": variant, "candidates": n, **stats})
            print(f"  {model:8s} {backend:5s} {variant:18s} N={n:5d}  p50 {stats['p50']:8.2f} ms", flush=True)
    return rows, notes


# ---------------------------------------------------------------------------------------------------------------------
# Load test over HTTP
# ---------------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(checkpoint: Path, port: int, workers: int, threads: int) -> subprocess.Popen:
    import httpx

    process = subprocess.Popen(
        [sys.executable, "-m", "onerank.cli", "serve", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
         "--port", str(port), "--workers", str(workers), "--threads", str(threads)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"onerank serve exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.25)
    process.kill()
    raise RuntimeError("onerank serve did not start in 180 s")


async def load(url: str, body: bytes, concurrency: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(client) -> None:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            try:
                response = await client.post("/rank", content=body, headers={"content-type": "application/json"})
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
                    continue
            except httpx.HTTPError as exc:
                errors.append(repr(exc))
                continue
            latencies.append(time.perf_counter() - start)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        began = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    stats = percentiles(latencies) if latencies else {"p50": float("nan"), "p95": float("nan"),
                                                       "p99": float("nan"), "mean": float("nan")}
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
            "error_examples": errors[:3], "requests_per_s": len(latencies) / elapsed, **stats}


def load_rows(checkpoint: Path, candidates: int, seconds: float, workers: int, threads: int) -> list[dict]:
    from onerank.serving import Ranker

    body = json.dumps(make_request(Ranker(checkpoint), candidates, seed=1)).encode()
    port = free_port()
    process = start_service(checkpoint, port, workers, threads)
    rows = []
    try:
        for concurrency in (1, 8, 32):
            row = asyncio.run(load(f"http://127.0.0.1:{port}", body, concurrency, seconds))
            row["candidates"] = candidates
            row["candidates_per_s"] = row["requests_per_s"] * candidates
            rows.append(row)
            print(f"  {concurrency:3d} clients: {row['requests_per_s']:7.1f} req/s, p50 {row['p50']:7.1f} ms, "
                  f"errors {row['errors']}", flush=True)
    finally:
        process.terminate()
        process.wait(timeout=30)
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    cells = [[fmt.format(r[key]) if isinstance(r[key], (int, float)) else str(r[key]) for _, key, fmt in columns]
             for r in rows]
    header = [title for title, _, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    line = lambda cs: "  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cs, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "onerank-serving-bench"),
                        help="folder for the dataset cache, checkpoints and exports (reused between runs)")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the ranker / the service")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help="candidates per chunk of the torch backend (default: the ranker's)")
    parser.add_argument("--load-candidates", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each load-test level")
    parser.add_argument("--workers", type=int, default=2, help="inference threads of the service")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    checkpoints = train_checkpoints(work, args.retrain)
    print("ranker latency (one request: two 50-item histories, N candidates)", flush=True)
    rows, notes = ranker_rows(checkpoints, args.chunk_size, args.quick, args.threads)
    print("load test over HTTP (onerank serve on 127.0.0.1)", flush=True)
    seconds = min(args.seconds, 4.0) if args.quick else args.seconds
    load_results = load_rows(checkpoints["onerank"], args.load_candidates, seconds, args.workers, args.threads)

    # other jobs on the machine slow every figure down: the load average says how much
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
              f"{args.threads} intra-op thread(s), chunk {args.chunk_size}, load average at the end " \
              f"{os.getloadavg()[1]:.1f} (5 min)"
    print(f"\nRanker latency per request ({machine})")
    print(table(rows, [("model", "model", "{}"), ("backend", "backend", "{}"), ("variant", "variant", "{}"),
                       ("N", "candidates", "{:d}"), ("p50 ms", "p50", "{:.2f}"), ("p95 ms", "p95", "{:.2f}"),
                       ("p99 ms", "p99", "{:.2f}"), ("candidates/s", "candidates_per_s", "{:,.0f}")]))
    for note in notes:
        print(f"note: {note}")
    print(f"\nHTTP load test: onerank, {args.load_candidates} candidates + two 50-item histories per request, "
          f"{seconds:g} s per level, {args.workers} inference workers")
    print(table([{**r, "model": "onerank", "backend": "http"} for r in load_results],
                [("model", "model", "{}"), ("backend", "backend", "{}"), ("clients", "concurrency", "{:d}"),
                 ("requests", "requests", "{:d}"), ("req/s", "requests_per_s", "{:.1f}"),
                 ("candidates/s", "candidates_per_s", "{:,.0f}"), ("p50 ms", "p50", "{:.1f}"),
                 ("p95 ms", "p95", "{:.1f}"), ("p99 ms", "p99", "{:.1f}"), ("errors", "errors", "{:d}")]))
    errors = sum(r["errors"] for r in load_results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"machine": machine, "command": " ".join(sys.argv), "ranker": rows, "notes": notes, "load": load_results},
            indent=2))
    if errors:
        raise SystemExit(f"load test: {errors} errors, e.g. {load_results[-1]['error_examples']}")


if __name__ == "__main__":
    main()

"""Load test of `onerank serve` over loopback: throughput, latency, 503s past capacity, and the server's memory.

Bounded and self-stopping: the service runs in a subprocess on 127.0.0.1 (a free port, nothing else is contacted),
every level stops after ``--seconds`` or ``--requests``, the soak after ``--soak-requests`` or ``--soak-seconds``, and
the service is stopped (SIGTERM, then drained) at the end; about 4 minutes in all with the defaults.

1. The OneRank checkpoint of benchmarks/serving.py (trained there once, reused from ``--work``).
2. ``onerank serve --workers 2 --threads 1 --max-queue 8``: 2 requests scored at once, 8 waiting, the rest get 503.
3. Levels of 1, 8, 32 and 128 concurrent clients (httpx, one asyncio loop) sending the same request (``--candidates``
   candidates, two 50-item histories). A client that gets 503 waits the Retry-After seconds, as a well-behaved client
   does, then sends again. Reported per level: answers per second (200s), p50 / p99 latency of the 200s as the
   clients see it, the same inside the server (from its /metrics histogram: receipt of the request to the end of
   the answer; the clients' figure adds the load generator's own scheduling, which shares the cores), the share of
   503s, other errors (must be 0).
4. Soak: ``--soak-requests`` more requests from 8 clients; the server's resident memory (VmRSS of /proc/PID/status)
   is read when it is ready, after every level and after the soak: its growth across the soak must stay small.

    python benchmarks/load.py --json benchmarks/results/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import DEFAULT_WORK, make_request, train_checkpoints  # noqa: E402  (benchmarks/serving.py)

LEVELS = (1, 8, 32, 128)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def rank_latency_buckets(url: str) -> dict[float, float]:
    """The server's cumulative histogram of answered-200 ``/rank`` latencies: upper bound (s) -> count."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {float(s.labels["le"]): s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "onerank_request_duration_seconds_bucket" and s.labels.get("endpoint") == "/rank"
            and s.labels.get("status") == "200"}


def histogram_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """Quantile q (ms) of the observations between two scrapes, interpolated inside its bucket as Prometheus'
    histogram_quantile does (the +Inf bucket answers with the last finite bound)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank, lower, below = q * counts[-1], 0.0, 0.0
    for bound, cumulative in zip(bounds, counts):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower * 1000
            return (lower + (bound - lower) * (rank - below) / max(cumulative - below, 1e-12)) * 1000
        lower, below = bound, cumulative
    return lower * 1000


def start_service(checkpoint: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    import httpx

    command = [sys.executable, "-m", "onerank.cli", "serve", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
               "--port", str(port), "--workers", str(args.workers), "--threads", str(args.threads),
               "--max-queue", str(args.max_queue), "--precision", args.precision]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"onerank serve exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    process.kill()
    raise RuntimeError("onerank serve was not ready within 180 s")


async def run_level(url: str, body: bytes, clients: int, max_requests: int, seconds: float) -> dict:
    """``clients`` loops sending ``body`` until ``max_requests`` answers or ``seconds`` have passed."""
    import httpx

    latencies: list[float] = []
    overloaded = 0
    errors: list[str] = []
    sent = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"content-type": "application/json"}

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal sent, overloaded
        while time.perf_counter() < stop and sent < max_requests:
            sent += 1
            start = time.perf_counter()
            try:
                response = await client.post("/rank", content=body, headers=headers)
            except httpx.HTTPError as exc:
                errors.append(repr(exc))
                continue
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)
            elif response.status_code == 503:
                overloaded += 1
                await asyncio.sleep(min(float(response.headers.get("retry-after", 1)), stop - time.perf_counter()))
            else:
                errors.append(f"{response.status_code}: {response.text[:200]}")

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        began = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        elapsed = time.perf_counter() - began
    ms = np.asarray(latencies) * 1000
    answered = len(latencies) + overloaded + len(errors)
    return {
        "clients": clients, "seconds": elapsed, "requests": answered, "ok": len(latencies),
        "ok_per_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None, "overloaded_503": overloaded,
        "share_503": overloaded / max(answered, 1), "errors": len(errors), "error_examples": errors[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=DEFAULT_WORK, help="benchmarks/serving.py's work folder (checkpoints)")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20.0, help="time limit of each level")
    parser.add_argument("--requests", type=int, default=3000, help="request limit of each level")
    parser.add_argument("--soak-requests", type=int, default=10_000)
    parser.add_argument("--soak-seconds", type=float, default=180.0, help="time limit of the soak")
    parser.add_argument("--workers", type=int, default=2, help="the service's inference threads")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per inference")
    parser.add_argument("--max-queue", type=int, default=8, help="requests waiting for a worker before 503s")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    checkpoint = train_checkpoints(Path(args.work), retrain=False, names=("onerank",))["onerank"]
    from onerank.serving import Ranker

    body = json.dumps(make_request(Ranker(checkpoint), args.candidates, seed=1)).encode()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_service(checkpoint, port, args)
    memory = {"ready": rss_mib(process.pid)}
    levels = []
    try:
        for clients in LEVELS:
            before = rank_latency_buckets(url)
            row = asyncio.run(run_level(url, body, clients, args.requests, args.seconds))
            after = rank_latency_buckets(url)
            row["server_p50_ms"] = histogram_quantile(0.5, before, after)
            row["server_p99_ms"] = histogram_quantile(0.99, before, after)
            levels.append(row)
            memory[f"after {clients} clients"] = rss_mib(process.pid)
            print(f"  {clients:3d} clients: {row['ok_per_s']:7.1f} answers/s, p50 {row['p50_ms'] or 0:7.1f} ms, "
                  f"p99 {row['p99_ms'] or 0:7.1f} ms (server {row['server_p50_ms'] or 0:.1f} / "
                  f"{row['server_p99_ms'] or 0:.1f} ms), 503 share {row['share_503']:.1%}, errors {row['errors']}",
                  flush=True)
        before_soak = rss_mib(process.pid)
        soak = asyncio.run(run_level(url, body, 8, args.soak_requests, args.soak_seconds))
        memory["after soak"] = after_soak = rss_mib(process.pid)
        print(f"  soak: {soak['requests']} requests from 8 clients, RSS {before_soak:.1f} -> {after_soak:.1f} MiB",
              flush=True)
    finally:
        process.send_signal(signal.SIGTERM)  # graceful: drains, then exits
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()

    machine = (f"{platform.machine()}, {os.cpu_count()} cores, load average at the end {os.getloadavg()[1]:.1f} "
               f"(5 min); the load generator shares the cores with the service")
    print(f"\nHTTP load test ({machine}): onerank, {args.candidates} candidates + two 50-item histories per request, "
          f"{args.workers} workers x {args.threads} thread, capacity {args.workers + args.max_queue} in flight")
    print("clients  requests  answers/s  p50 ms  p99 ms  server p50 ms  server p99 ms  503 share  errors")
    for r in levels:
        print(f"{r['clients']:7d}  {r['requests']:8d}  {r['ok_per_s']:9.1f}  {r['p50_ms'] or 0:6.1f}  "
              f"{r['p99_ms'] or 0:6.1f}  {r['server_p50_ms'] or 0:13.1f}  {r['server_p99_ms'] or 0:13.1f}  "
              f"{r['share_503']:9.1%}  {r['errors']:6d}")
    growth = after_soak - before_soak
    print(f"server RSS (MiB): " + ", ".join(f"{k} {v:.1f}" for k, v in memory.items())
          + f"; growth across the soak of {soak['requests']} requests: {growth:+.1f} MiB")
    errors = sum(r["errors"] for r in levels) + soak["errors"]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "machine": machine, "command": " ".join(["python", *sys.argv]), "candidates": args.candidates,
            "workers": args.workers, "threads": args.threads, "capacity": args.workers + args.max_queue,
            "precision": args.precision, "levels": levels, "soak": soak, "rss_mib": memory,
            "rss_growth_across_soak_mib": growth,
        }, indent=2))
    if errors:
        raise SystemExit(f"load test: {errors} errors (non-200 / non-503 answers or transport errors)")


if __name__ == "__main__":
    main()

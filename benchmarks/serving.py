"""Serving latency of the Python ranker, OneRank and MMoE in the same run, against the machine's matmul peak.

1. Checkpoints: OneRank (configs/models/onerank.yaml) and MMoE (defaults) trained one epoch on a small synthetic
   dataset with 50-item histories, in a work folder (kept between runs unless ``--retrain``).
2. Peak: the best GFLOP/s of a 2048^3 fp32 matrix product on the same threads (and bf16 where the CPU has it).
3. Ranker latency: one request = a user, a context, two 50-item histories and N candidates (item id and price; the
   other item fields come from the item table), for N = 100, 1000, 4096, end to end through ``Ranker.rank``
   (validation, encoding, the model, fusion, sorting). Rows: OneRank with the context encoded once per request
   (``score_pool``, the ranker's path; fp32 and bf16), OneRank re-encoding the context for every chunk (the generic
   chunked ``score_pool`` of the base class: what a ranker without the context cache pays; its pool-level steps then
   see one chunk at a time, so it is a cost baseline, not the same scores), MMoE (fp32 and bf16), and both models on
   their ONNX exports in ONNX Runtime. Reported: p50 / p95 / p99 wall latency, p50 thread CPU time (time.thread_time:
   less inflated than wall time when other jobs share the cores), candidates per second, the model's FLOPs per
   request (torch.utils.flop_counter) and the share of the matmul peak the request reaches at its p50 wall time (and
   at its p50 CPU time: the figure to read when other jobs share the cores).
4. Targets (1000 candidates, fp32 ranker path): OneRank p50 <= 20 ms and p99 <= 40 ms, MMoE p50 <= 30 ms.

The HTTP load test is benchmarks/load.py.

    python benchmarks/serving.py --json benchmarks/results/serving.json     # about 2 minutes on a quiet core
    python benchmarks/serving.py --quick                                    # fewer repetitions
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from onerank.serving.ranker import DEFAULT_CHUNK_SIZE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import matmul_peak  # noqa: E402  (benchmarks/throughput.py)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORK = str(Path(tempfile.gettempdir()) / "onerank-serving-bench")
TARGETS = {"onerank": {"p50": 20.0, "p99": 40.0}, "mmoe": {"p50": 30.0}}  # ms, 1000 candidates, fp32 ranker path
TARGET_CANDIDATES = 1000
HISTORY = 50
SIZES = (100, 1000, 4096)
DATASET = {
    "num_users": 400, "num_items": 5000, "candidates_per_request": 20, "history_len": HISTORY,
    "history_requests": 12.0, "days": 3, "history_days": 7,
}


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------
def train_checkpoints(work: Path, retrain: bool, names: tuple[str, ...] = ("onerank", "mmoe")) -> dict[str, Path]:
    from onerank import api
    from onerank.training.config import RunConfig, TrainConfig

    onerank_config = RunConfig.from_yaml(ROOT / "configs" / "models" / "onerank.yaml")
    runs = {
        "onerank": (onerank_config.model_options, onerank_config.objective),
        "mmoe": ({}, {}),
    }
    out = {}
    for name in names:
        options, objective = runs[name]
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
    latencies, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.thread_time()
        ranker.rank(request)
        latencies.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)
    stats = percentiles(latencies)
    stats["cpu_p50"] = float(np.median(cpu) * 1000)
    stats["candidates_per_s"] = n / (stats["mean"] / 1000)
    return stats


def request_flops(ranker, n: int) -> float:
    """FLOPs of the model on one request of n candidates (torch backend), by torch.utils.flop_counter. The fused CPU
    attention kernel is counted like the flash attention it is (2 matrix products per query and key)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash_flops}
    encoded = ranker.encode(make_request(ranker, n))
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        ranker.backend(encoded)
    return float(counter.get_total_flops())


def ranker_rows(
    checkpoints: dict[str, Path], chunk_size: int, quick: bool, threads: int, peaks: dict[str, float]
) -> tuple[list[dict], list[str]]:
    from onerank.serving import Ranker

    notes = []
    variants = []
    reference_rankers = {}
    for name, checkpoint in checkpoints.items():
        ranker = reference_rankers[name] = Ranker(checkpoint, chunk_size=chunk_size, threads=threads)
        variants.append((name, "torch", "context once" if name == "onerank" else "", "fp32", ranker))
        if "bf16" in peaks:
            bf16 = Ranker(checkpoint, chunk_size=chunk_size, threads=threads, precision="bf16")
            variants.append((name, "torch", "context once" if name == "onerank" else "", "bf16", bf16))
        if name == "onerank":
            per_chunk = Ranker(checkpoint, chunk_size=chunk_size, threads=threads)
            per_chunk.backend = ContextPerChunk(per_chunk.backend)
            variants.append((name, "torch", "context per chunk", "fp32", per_chunk))
        export_path, why = export_onnx(checkpoint)
        if export_path is None:
            notes.append(f"{name} onnx: not measured ({why})")
        else:
            variants.append((name, "onnx", "one pass", "fp32", Ranker(checkpoint, backend="onnx", export_path=export_path,
                                                                      threads=threads)))
    # The FLOPs of the ranker's path (fp32 PyTorch, context once), counted once per model and size: every row of the
    # model is measured against this useful work (the per-chunk baseline does more, ONNX and bf16 the same).
    flops_of = {(model, n): request_flops(ranker, n) for model, ranker in reference_rankers.items() for n in SIZES}
    rows = []
    for model, backend, variant, precision, ranker in variants:
        for n in SIZES:
            repeats = {100: 60, 1000: 40, 4096: 10}[n] // (3 if quick else 1)
            stats = time_ranker(ranker, n, max(repeats, 5))
            flops = flops_of[(model, n)]
            share = flops / (stats["p50"] / 1000) / peaks[precision]
            # on a shared machine the wall time counts other jobs' turns too; the thread's CPU time does not
            share_cpu = flops / (stats["cpu_p50"] / 1000) / peaks[precision]
            rows.append({"model": model, "backend": backend, "variant": variant, "precision": precision,
                         "candidates": n, **stats, "gflops_per_request": flops / 1e9,
                         "peak_share": share, "peak_share_cpu": share_cpu})
            print(f"  {model:8s} {backend:5s} {variant:18s} {precision} N={n:5d}  p50 {stats['p50']:8.2f} ms "
                  f"(cpu {stats['cpu_p50']:7.2f} ms)", flush=True)
    return rows, notes


def check_targets(rows: list[dict]) -> list[str]:
    """One line per target: the fp32 ranker path at 1000 candidates against TARGETS."""
    lines = []
    for row in rows:
        path = row["backend"] == "torch" and row["precision"] == "fp32" and row["variant"] != "context per chunk"
        if row["candidates"] != TARGET_CANDIDATES or not path or row["model"] not in TARGETS:
            continue
        for stat, limit in TARGETS[row["model"]].items():
            verdict = "met" if row[stat] <= limit else "MISSED"
            lines.append(f"{row['model']} {stat} {row[stat]:.1f} ms (cpu p50 {row['cpu_p50']:.1f} ms) <= {limit:g} ms: "
                         f"{verdict}")
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    cells = [[fmt.format(r[key]) if isinstance(r[key], (int, float)) else "-" if r[key] is None else str(r[key])
              for _, key, fmt in columns] for r in rows]
    header = [title for title, _, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    line = lambda cs: "  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cs, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=DEFAULT_WORK,
                        help="folder for the dataset cache, checkpoints and exports (reused between runs)")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the ranker")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help="candidates per chunk of the torch backend (default: the ranker's)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    checkpoints = train_checkpoints(work, args.retrain)
    peaks = {"fp32": matmul_peak(torch.float32)}
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        peaks["bf16"] = matmul_peak(torch.bfloat16)
    print("matmul peak, " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()), flush=True)
    print("ranker latency (one request: two 50-item histories, N candidates)", flush=True)
    rows, notes = ranker_rows(checkpoints, args.chunk_size, args.quick, args.threads, peaks)

    # other jobs on the machine slow every figure down: the load average says how much
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU capability " \
              f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, {args.threads} intra-op " \
              f"thread(s), chunk {args.chunk_size}, load average at the end {os.getloadavg()[1]:.1f} (5 min)"
    print(f"\nRanker latency per request ({machine})")
    print("matmul peak: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))
    print(table(rows, [("model", "model", "{}"), ("backend", "backend", "{}"), ("variant", "variant", "{}"),
                       ("prec", "precision", "{}"), ("N", "candidates", "{:d}"), ("p50 ms", "p50", "{:.2f}"),
                       ("p99 ms", "p99", "{:.2f}"), ("cpu p50 ms", "cpu_p50", "{:.2f}"),
                       ("candidates/s", "candidates_per_s", "{:,.0f}"), ("GFLOP", "gflops_per_request", "{:.3f}"),
                       ("peak share", "peak_share", "{:.1%}"), ("of cpu time", "peak_share_cpu", "{:.1%}")]))
    for note in notes:
        print(f"note: {note}")
    targets = check_targets(rows)
    print("\ntargets (1000 candidates, fp32 ranker path):\n  " + "\n  ".join(targets))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"machine": machine, "command": " ".join(["python", *sys.argv]),
             "matmul_peak_gflops": {k: v / 1e9 for k, v in peaks.items()}, "ranker": rows, "targets": targets,
             "notes": notes},
            indent=2))


if __name__ == "__main__":
    main()

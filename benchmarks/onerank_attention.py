"""OneRank's structured attention versus the reference masked full attention, per request.

One request with a 50-item history, 8 situational tokens, K = 3 tasks and N candidates, the model of
configs/models/onerank.yaml, inference (no gradients). For each N it prints the time per request of the structured
encoder (context once + candidate groups against it) and of the reference (one attention over all U + N(1 + K)
tokens with the explicit boolean mask), their ratio, and the peak memory of each.

Peak memory on CPU: every (path, N) runs in a fresh Python process; after building the model and the inputs the
process resets its resident-set high-water mark (``/proc/self/clear_refs``), runs the path once, and reports
``VmHWM - VmRSS(before)``: the extra resident memory at the peak of the call, beyond the model, inputs and the torch
runtime. On CUDA it is ``torch.cuda.max_memory_allocated`` beyond what was allocated before the call.

    python benchmarks/onerank_attention.py --threads 1 --json benchmarks/results/onerank_attention_cpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from onerank.data.batching import Batch
from onerank.data.schema import CategoricalField, DenseField, Schema, SequenceField, TaskSpec
from onerank.features.space import FeatureSpace
from onerank.models import build_model
from onerank.models.onerank import OneRank, reference_encode
from onerank.training.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
HISTORY = 50
TASKS = ("click", "cart", "order")
SD_FIELDS = ("user_id", "age", "gender", "city", "hour", "device")
ITEM_FIELDS = ("item_id", "category", "brand")
VOCAB = {"user_id": 10_000, "age": 8, "gender": 3, "city": 50, "hour": 26, "device": 5, "item_id": 50_000,
         "category": 100, "brand": 500}


def build(device: str) -> OneRank:
    schema = Schema(
        categorical=[CategoricalField(f, "user") for f in SD_FIELDS] + [CategoricalField(f, "item") for f in ITEM_FIELDS],
        dense=[DenseField("activity", group="user"), DenseField("spend", group="user")],
        sequences=[SequenceField("history", max_len=HISTORY)],
        tasks=[TaskSpec(t) for t in TASKS],
        item_id="item_id",
    )
    torch.manual_seed(0)
    options = RunConfig.from_yaml(ROOT / "configs" / "models" / "onerank.yaml").model_options
    return build_model("onerank", FeatureSpace(schema, VOCAB), options).to(device).eval()


def request(n: int, device: str) -> Batch:
    """One request of n candidates, its history full."""
    g = torch.Generator().manual_seed(n)
    categorical = {f: torch.randint(2, VOCAB[f], (1,), generator=g).expand(n) for f in SD_FIELDS}
    categorical.update({f: torch.randint(2, VOCAB[f], (n,), generator=g) for f in ITEM_FIELDS})
    history = torch.randint(2, VOCAB["item_id"], (1, HISTORY), generator=g).expand(n, -1)
    histories = {"history": {"item_id": history, "category": history % 98 + 2, "brand": history % 498 + 2}}
    ones = {t: torch.ones(n) for t in TASKS}
    batch = Batch(categorical, {"activity": torch.randn(n), "spend": torch.randn(n)}, histories, ones,
                  {t: torch.ones(n, dtype=torch.bool) for t in TASKS}, user=torch.zeros(n, dtype=torch.long),
                  request=torch.zeros(n, dtype=torch.long))
    return batch.to(device)


def path(model: OneRank, name: str):
    if name == "structured":
        return lambda batch: model.encode_candidates(model.encode_context(batch), batch)
    return lambda batch: reference_encode(model, batch)[2]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def time_both(model: OneRank, n: int, device: str, budget_s: float) -> tuple[float, float]:
    """Best-of-k wall time (ms) of one call of each path. The two paths alternate call by call, so both see the same
    load from other processes (the timings are meant for a shared machine); best-of-k is the least disturbed."""
    batch = request(n, device)
    runs = {name: path(model, name) for name in ("structured", "reference")}
    best = {name: float("inf") for name in runs}
    start, calls = time.perf_counter(), 0
    while calls < 4 or (time.perf_counter() - start < budget_s and calls < 100):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run(batch)
            _sync(device)
            if calls:  # the first call of each path is a warm-up
                best[name] = min(best[name], time.perf_counter() - t0)
        calls += 1
    return 1000 * best["structured"], 1000 * best["reference"]


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@torch.no_grad()
def peak_mb_here(name: str, n: int, device: str, threads: int) -> float:
    """Run in a fresh process by ``peak_mb``: extra memory at the peak of one call."""
    torch.set_num_threads(threads)
    model = build(device)
    batch, run = request(n, device), path(model, name)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(batch)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak RSS) to the current RSS
    run(batch)
    return (_status_kb("VmHWM") - before) / 1024


def peak_mb(name: str, n: int, device: str, threads: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--peak-of", name, str(n), "--device", device, "--threads", str(threads)],
        check=True, capture_output=True, text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,500,1000", help="candidate counts N")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of timing per N (both paths)")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    parser.add_argument("--peak-of", nargs=2, metavar=("PATH", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_of:
        print(peak_mb_here(args.peak_of[0], int(args.peak_of[1]), args.device, args.threads))
        return
    torch.set_num_threads(args.threads)
    model = build(args.device)
    u = HISTORY + len(SD_FIELDS) + 2
    print(f"device={args.device} threads={args.threads} U={u} K={len(TASKS)} d={model.config.dim} "
          f"layers={model.config.num_layers} heads={model.config.num_heads}")
    print(f"{'N':>5} {'tokens':>7} {'structured ms':>14} {'reference ms':>13} {'ratio':>6} {'peak MB':>8} "
          f"{'ref peak MB':>12}")
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        structured, reference = time_both(model, n, args.device, args.budget)
        row = {
            "n": n,
            "structured_ms": round(structured, 3),
            "reference_ms": round(reference, 3),
            "ratio": round(reference / structured, 2),
            "peak_mb": round(peak_mb("structured", n, args.device, args.threads), 1),
            "reference_peak_mb": round(peak_mb("reference", n, args.device, args.threads), 1),
        }
        rows.append(row)
        print(f"{n:>5} {u + n * (1 + len(TASKS)):>7} {row['structured_ms']:>14.2f} {row['reference_ms']:>13.2f} "
              f"{row['ratio']:>6.1f} {row['peak_mb']:>8.1f} {row['reference_peak_mb']:>12.1f}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

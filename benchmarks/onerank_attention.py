"""OneRank's structured attention versus the reference masked full attention, per request.

Requests with a 50-item history, 8 situational tokens (U = 58 context tokens), K = 3 tasks and N candidates, the model
of configs/models/onerank.yaml, inference (``torch.inference_mode``, as a server runs it). For each N it prints:

* the two encoders on the same input tokens (``model.tokens(batch)``: the tokenisation both share is done once,
  outside the clock): the structured encoder in one pass (``model.encode_tokens``: context and candidate groups
  share each layer's token-wise operators, only the attention is split) and the reference (``reference_encoder``:
  the explicit boolean mask, then one attention over all U + N (1 + K) tokens per layer), and their ratio: the
  comparison the structured attention is about (``structured_ms``, ``reference_ms``, ``ratio`` in the JSON);
* end to end from the batch, tokenisation included: the one-pass structured path (``model.encode(batch)``: what
  training and ``score_pool`` of one chunk run), the same in two passes (context first, then the groups against its
  cache: ``encode_candidates(encode_context(batch), batch)``), the groups alone against an already encoded context
  ("cached ctx"), the reference (``model.reference_encode``), and the end-to-end ratio (``*_e2e_ms``, ``e2e_ratio``);
* the peak memory of the end-to-end structured path and of the reference.

Time: best of k calls, the paths alternating call by call. On CPU the clock is the calling thread's CPU time
(with one intra-op thread all of torch's work runs on that thread, and other processes of a shared machine do not
count); wall time is kept in the JSON too. ``--requests R`` puts R requests in each call and divides by R (batched
serving and training amortise the per-operator overhead that dominates small N).

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
from onerank.models.onerank import OneRank
from onerank.nn.structured import reference_encoder
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
        categorical=[CategoricalField(f, "user") for f in SD_FIELDS]
        + [CategoricalField(f, "item") for f in ITEM_FIELDS],
        dense=[DenseField("activity", group="user"), DenseField("spend", group="user")],
        sequences=[SequenceField("history", max_len=HISTORY)],
        tasks=[TaskSpec(t) for t in TASKS],
        item_id="item_id",
    )
    torch.manual_seed(0)
    options = RunConfig.from_yaml(ROOT / "configs" / "models" / "onerank.yaml").model_options
    return build_model("onerank", FeatureSpace(schema, VOCAB), options).to(device).eval()


def requests(n: int, device: str, count: int = 1) -> Batch:
    """``count`` requests of n candidates each, their histories full."""
    g = torch.Generator().manual_seed(n)
    request = torch.arange(count).repeat_interleave(n)
    rows = count * n
    categorical = {f: torch.randint(2, VOCAB[f], (count,), generator=g)[request] for f in SD_FIELDS}
    categorical.update({f: torch.randint(2, VOCAB[f], (rows,), generator=g) for f in ITEM_FIELDS})
    history = torch.randint(2, VOCAB["item_id"], (count, HISTORY), generator=g)[request]
    histories = {"history": {"item_id": history, "category": history % 98 + 2, "brand": history % 498 + 2}}
    dense = {"activity": torch.randn(count, generator=g)[request], "spend": torch.randn(count, generator=g)[request]}
    batch = Batch(categorical, dense, histories, {t: torch.ones(rows) for t in TASKS},
                  {t: torch.ones(rows, dtype=torch.bool) for t in TASKS}, user=request, request=request)
    return batch.to(device)


PATHS = ("structured_encoder", "reference_encoder", "structured", "two_pass", "cached", "reference")


def path(model: OneRank, name: str, batch: Batch):
    """One call of a path on ``batch``. ``structured_encoder`` / ``reference_encoder``: the two encoders on input
    tokens made once beforehand. ``structured``: the one-pass structured encoder from the batch (``model.encode``:
    tokenisation, then context and candidate groups together; what training and ``score_pool`` of one chunk run);
    ``two_pass``: the context encoded first, then the groups against its cache; ``cached``: the groups only, the
    request's context already encoded (a server keeping the ContextCache of a user or session scores the next pool
    at this cost); ``reference``: ``model.reference_encode`` from the batch."""
    if name.endswith("_encoder"):
        context, groups, present = model.tokens(batch)
        if name == "structured_encoder":
            return lambda: model.encode_tokens(context, groups)
        return lambda: reference_encoder(model.encoder, context, groups, present)
    if name == "structured":
        return lambda: model.encode(batch)
    if name == "two_pass":
        return lambda: model.encode_candidates(model.encode_context(batch), batch)
    if name == "cached":
        cache = model.encode_context(batch)
        return lambda: model.encode_candidates(cache, batch)
    return lambda: model.reference_encode(batch)[2]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def time_paths(model: OneRank, batch: Batch, device: str, budget_s: float) -> dict[str, float]:
    """Best-of-k time (ms) of one call of each path. On CPU the clock is the calling thread's CPU time: with one
    intra-op thread all of torch's work runs on it, and other processes on a shared machine do not count; wall
    time is kept too. The paths alternate call by call so all meet the same conditions."""
    runs = {name: path(model, name, batch) for name in PATHS}
    cpu = not device.startswith("cuda")
    best = {f"{name}_{clock}": float("inf") for name in runs for clock in ("ms", "wall_ms")}
    start, calls = time.perf_counter(), 0
    while calls < 4 or (time.perf_counter() - start < budget_s and calls < 100):
        for name, run in runs.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            run()
            _sync(device)
            wall, used = time.perf_counter() - t0, time.thread_time() - c0
            if calls:  # the first call of each path is a warm-up
                best[f"{name}_wall_ms"] = min(best[f"{name}_wall_ms"], 1000 * wall)
                best[f"{name}_ms"] = min(best[f"{name}_ms"], 1000 * (used if cpu else wall))
        calls += 1
    return best


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@torch.inference_mode()
def peak_mb_here(name: str, n: int, count: int, device: str, threads: int) -> float:
    """Run in a fresh process by ``peak_mb``: extra memory at the peak of one call."""
    torch.set_num_threads(threads)
    model = build(device)
    run = path(model, name, requests(n, device, count))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak RSS) to the current RSS
    except OSError as error:  # a kernel or sandbox without it: no peak rather than a wrong one
        print(f"peak memory not measured: /proc/self/clear_refs: {error}", file=sys.stderr)
        return float("nan")
    run()
    return (_status_kb("VmHWM") - before) / 1024


def peak_mb(name: str, n: int, count: int, device: str, threads: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--peak-of", name, str(n), "--requests", str(count), "--device", device,
         "--threads", str(threads)],
        check=True, capture_output=True, text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,500,1000", help="candidate counts N")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of timing per N (all paths)")
    parser.add_argument("--requests", type=int, default=1, help="requests per call (times are divided by it)")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    parser.add_argument("--peak-of", nargs=2, metavar=("PATH", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_of:
        print(peak_mb_here(args.peak_of[0], int(args.peak_of[1]), args.requests, args.device, args.threads))
        return
    torch.set_num_threads(args.threads)
    model = build(args.device)
    u, per = HISTORY + len(SD_FIELDS) + 2, args.requests
    clock = "wall time" if args.device.startswith("cuda") else "thread CPU time"
    print(f"device={args.device} threads={args.threads} requests/call={per} U={u} K={len(TASKS)} d={model.config.dim} "
          f"layers={model.config.num_layers} heads={model.config.num_heads}; ms per request, best of k, {clock}")
    header = ("N", "tokens", "struct enc", "ref enc", "ratio", "| struct e2e", "two-pass", "cached ctx", "ref e2e",
              "e2e ratio", "| peak MB", "ref peak MB")
    print(" ".join(f"{h:>11}" for h in header))
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        t = time_paths(model, requests(n, args.device, per), args.device, args.budget)
        row = {
            "n": n,
            "requests_per_call": per,
            "structured_ms": round(t["structured_encoder_ms"] / per, 3),
            "reference_ms": round(t["reference_encoder_ms"] / per, 3),
            "ratio": round(t["reference_encoder_ms"] / t["structured_encoder_ms"], 2),
            "structured_e2e_ms": round(t["structured_ms"] / per, 3),
            "two_pass_e2e_ms": round(t["two_pass_ms"] / per, 3),
            "cached_context_ms": round(t["cached_ms"] / per, 3),
            "reference_e2e_ms": round(t["reference_ms"] / per, 3),
            "e2e_ratio": round(t["reference_ms"] / t["structured_ms"], 2),
            "structured_wall_ms": round(t["structured_encoder_wall_ms"] / per, 3),
            "reference_wall_ms": round(t["reference_encoder_wall_ms"] / per, 3),
            "peak_mb": round(peak_mb("structured", n, per, args.device, args.threads), 1),
            "reference_peak_mb": round(peak_mb("reference", n, per, args.device, args.threads), 1),
        }
        rows.append(row)
        cells = [n, u + n * (1 + len(TASKS)), row["structured_ms"], row["reference_ms"], row["ratio"],
                 row["structured_e2e_ms"], row["two_pass_e2e_ms"], row["cached_context_ms"], row["reference_e2e_ms"],
                 row["e2e_ratio"], row["peak_mb"], row["reference_peak_mb"]]
        print(" ".join(f"{c:>11}" for c in cells), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Training and inference throughput of every model on Census-Income and KuaiRand, the share of a training step
spent loading data, and the achieved FLOP/s of training as a share of this machine's matrix-multiply peak.

    .venv/bin/python benchmarks/throughput.py                                  # every model, both datasets
    .venv/bin/python benchmarks/throughput.py --quick --models mmoe,onerank    # a few steps each
    .venv/bin/python benchmarks/throughput.py --models mmoe --profile          # where a step's time goes

Training samples/s are measured on the real ``Trainer.fit`` loop (batch gathering, forward, losses, weighting,
backward, clipping, optimiser) over up to ``--steps`` steps (as many as fit in ``--budget`` seconds) after
``--warmup`` steps, inside the first epoch so that no validation pass is timed; "data %" is the share of that wall
time spent producing batches. Inference samples/s is ``Trainer.predict`` over the whole test split (batches of
``eval_batch_size``). FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one training step (matrix
products, convolutions and attention; element-wise work is not counted), and the peak is the best FLOP/s of a large
square matrix product measured in the same run with the same threads, right before each model (the load of a shared
machine varies). "busy" is process CPU time over wall time: with one thread, a value well under 1.0 means other jobs
shared the cores and the wall-clock figures understate the code's speed.

Datasets are read from ``--data-root`` (default ``../shared/data``); a dataset that is not there is skipped with a
message. Results: ``--json FILE``; figures and commands are recorded in docs/scaling.md.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {"census": "census-income", "kuairand": "kuairand-pure", "synthetic": None}  # synthetic: generated
# Loader options per dataset: KuaiRand at the benchmark suite's setting (its train days and history length), the
# synthetic funnel at its default, requests of 20 candidates (what "per candidate" figures are measured on).
TARGET_RATIOS = {"kuairand": 0.4, "synthetic": 1.0}  # OneRank / MMoE training samples/s (issue 12)


def dataset_options(name: str) -> dict:
    if name == "kuairand":
        import yaml

        suite = yaml.safe_load((ROOT / "benchmarks" / "suites" / "kuairand.yaml").read_text())
        return dict(suite.get("dataset_options") or {})
    if name == "synthetic":
        return {"candidates_per_request": 20}
    return {}


class TimedLoader:
    """Wraps a batch loader: adds up the wall time spent producing batches, and when batch ``warmup`` + 1 is asked
    for (the warm-up steps are done), takes a snapshot of the clocks and of the trainer's sample count, so that one
    uninterrupted ``fit`` is measured (a second ``fit`` would restart the epoch: a resume, costly when streaming)."""

    def __init__(self, loader, trainer, warmup: int) -> None:
        self.loader = loader
        self.trainer = trainer
        self.warmup = warmup
        self.seconds = 0.0
        self.mark: tuple[float, float, int] | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int = 0, start_step: int = 0) -> Iterator:
        batches = self.loader.epoch(epoch, start_step=start_step)
        for produced in itertools.count():
            if produced == self.warmup:
                self.seconds = 0.0
                self.mark = (time.perf_counter(), time.process_time(), self.trainer.state.train_samples)
            start = time.perf_counter()
            batch = next(batches, None)
            self.seconds += time.perf_counter() - start
            if batch is None:
                return
            yield batch


def matmul_peak(dtype: torch.dtype, seconds: float = 1.0, n: int = 2048) -> float:
    """Best FLOP/s of an n x n x n matrix product with the current thread settings."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def flops_per_sample(trainer) -> float:
    """FLOPs of one training step (forward, losses, the strategy's backward) on the first training batch, per
    sample of that batch."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = next(iter(trainer.train_loader.epoch(0))).to(trainer.device)
    model = trainer.model
    model.train()
    with FlopCounterMode(display=False) as counter:
        with trainer._autocast():
            logits = model(batch)
            losses = trainer.objective(logits, batch, model.auxiliary_losses(batch, logits))
        trainer.weighting.backward(losses, model.shared_parameters())
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / max(batch.size, 1)


def fit_steps(trainer, steps: int) -> None:
    from onerank.training.trainer import TrainingInterrupted

    try:
        trainer.fit(stop_after_steps=trainer.state.global_step + steps)
    except TrainingInterrupted:
        pass


def measure(trainer, steps: int, warmup: int, budget: float) -> dict:
    # the step count comes from a probe on a copy of the trainer's state: a few steps, then the state is restored
    probe = {"model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
             "optimizers": [copy.deepcopy(o.state_dict()) for o in trainer.optimizers],
             "schedulers": [copy.deepcopy(s.state_dict()) for s in trainer.schedulers]}
    start = time.perf_counter()
    fit_steps(trainer, 2)
    per_step = (time.perf_counter() - start) / 2
    trainer.model.load_state_dict(probe["model"])
    for opt, state in zip(trainer.optimizers, probe["optimizers"]):
        opt.load_state_dict(state)
    for scheduler, state in zip(trainer.schedulers, probe["schedulers"]):
        scheduler.load_state_dict(state)
    trainer.state = type(trainer.state)()
    # as many steps as fit in the time budget (at least 3), inside the first epoch: no validation pass is timed
    steps = min(steps, max(3, int(budget / per_step)), len(trainer.train_loader) - warmup - 1)
    if steps < 1:
        raise ValueError("the training split is too small for the requested warm-up")
    timed = TimedLoader(trainer.train_loader, trainer, warmup)
    trainer.train_loader = timed
    fit_steps(trainer, warmup + steps)
    wall0, cpu0, samples0 = timed.mark
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    trainer.train_loader = timed.loader
    samples = trainer.state.train_samples - samples0

    rows = trainer.data.splits["test"].n
    start = time.perf_counter()
    trainer.predict("test")
    infer = time.perf_counter() - start
    flops = flops_per_sample(trainer)
    return {
        "train_samples_per_s": round(samples / wall, 1),
        "train_steps": steps,
        "data_share": round(timed.seconds / wall, 4),
        "busy": round(cpu / wall / torch.get_num_threads(), 3),
        "infer_samples_per_s": round(rows / infer, 1),
        "train_flops_per_sample": flops,
        "train_flops_per_s": flops * samples / wall,
    }


def profile(trainer, steps: int) -> str:
    """A training step split into phases, then the costliest operators (torch.profiler)."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    model, shared = trainer.model, trainer.model.shared_parameters()
    batches = trainer.train_loader.epoch(0)
    phases = ("data", "forward+loss", "backward", "clip", "optimizer")
    totals = dict.fromkeys(phases, 0.0)

    def step(timed: bool) -> None:
        marks = [time.perf_counter()]
        with record_function("data"):
            batch = next(batches).to(trainer.device)
        marks.append(time.perf_counter())
        for opt in trainer.optimizers:
            opt.zero_grad(set_to_none=True)
        with record_function("forward+loss"), trainer._autocast():
            logits = model(batch)
            losses = trainer.objective(logits, batch, model.auxiliary_losses(batch, logits))
        marks.append(time.perf_counter())
        with record_function("backward"):
            trainer.weighting.backward(losses, shared)
        marks.append(time.perf_counter())
        with record_function("clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.config.grad_clip or 1e9)
        marks.append(time.perf_counter())
        with record_function("optimizer"):
            for opt in trainer.optimizers:
                opt.step()
        marks.append(time.perf_counter())
        if timed:
            for name, a, b in zip(phases, marks, marks[1:]):
                totals[name] += b - a

    model.train()
    for _ in range(3):
        step(False)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(True)
    total = sum(totals.values())
    lines = ["  phase shares: " + ", ".join(f"{k} {v / total:.1%}" for k, v in totals.items())
             + f"  ({total / steps * 1e3:.1f} ms/step, profiler on)"]
    lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return "\n".join(lines)


def parse_model(text: str) -> tuple[str, dict]:
    """'onerank[sd_tokens=group;dim=64]' -> ('onerank', {'sd_tokens': 'group', 'dim': 64})."""
    import yaml

    name, _, rest = text.partition("[")
    options = {}
    for item in filter(None, rest.rstrip("]").split(";")):
        key, _, value = item.partition("=")
        options[key.strip()] = yaml.safe_load(value)
    return name.strip(), options


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="census,kuairand,synthetic")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--models", help="comma-separated (default: every registered model); a model with options is "
                                    "written NAME[KEY=VALUE;KEY=VALUE], e.g. 'onerank[sd_tokens=group]'")
    p.add_argument("--quick", action="store_true", help="a few steps per model (a smoke run, noisier figures)")
    p.add_argument("--steps", type=int, help="at most this many timed training steps per model (default 100, quick 8)")
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed training per model, about")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5, quick 2)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile each model (adds compile time)")
    p.add_argument("--streaming", action="store_true",
                   help="train from a Parquet stream of the train split (written once to a temporary folder)")
    p.add_argument("--stream-buffer-rows", type=int, default=65_536,
                   help="shuffle buffer when streaming (smaller than the split, so that reading is timed too)")
    p.add_argument("--stream-prefetch", type=int, default=2,
                   help="batches decoded ahead by a background thread when streaming (0: in the training loop)")
    p.add_argument("--profile", action="store_true", help="also print a per-phase and per-operator profile")
    p.add_argument("--json", help="write all figures here")
    args = p.parse_args()
    steps = args.steps or (8 if args.quick else 100)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)

    from onerank import api
    from onerank.models import model_class, model_names
    from onerank.training.config import RunConfig, TrainConfig

    torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",")] if args.models else model_names()
    for model in models:
        model_class(parse_model(model)[0])  # a misspelled model fails before any data is loaded
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_peak(dtype)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{args.precision}; measured matrix-multiply peak {peak / 1e9:.1f} GFLOP/s", flush=True)
    stream_dir = Path(tempfile.mkdtemp(prefix="onerank-throughput-"))
    from onerank.benchmarking.runner import code_version

    report = {"code": code_version(), "streaming": args.streaming,
              "stream_prefetch": args.stream_prefetch if args.streaming else None,
              "load_average": os.getloadavg(), "peak_flops_per_s": peak, "threads": args.threads,
              "precision": args.precision,
              "batch_size": args.batch_size, "torch": torch.__version__, "results": []}
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        folder = DATASETS.get(name, name)
        data_dir = Path(args.data_root) / folder if folder else None
        if data_dir is not None and not data_dir.is_dir():
            print(f"skipping {name}: no data at {data_dir}", flush=True)
            continue
        options = dataset_options(name)
        ds = api.load_run_dataset(RunConfig(dataset=name, data_dir=str(data_dir) if data_dir else None,
                                            dataset_options=options))
        print(f"\n{name} {options or ''}: {len(ds.train):,} train rows, {len(ds.test):,} test rows, "
              f"batch {args.batch_size}")
        header = (f"{'model':18} {'train/s':>9} {'data %':>7} {'busy':>5} {'infer/s':>9} {'MFLOP/sample':>13} "
                  f"{'GFLOP/s':>8} {'% peak':>7}")
        print(header + "\n" + "-" * len(header), flush=True)
        for model in models:
            model_name, model_options = parse_model(model)
            config = RunConfig(
                dataset=name, data_dir=str(data_dir) if data_dir else None, dataset_options=options,
                model=model_name, model_options=model_options,
                train=TrainConfig(epochs=1, batch_size=args.batch_size, threads=args.threads, progress=False,
                                  tensorboard=False, precision=args.precision, compile=args.compile,
                                  streaming="on" if args.streaming else "off",
                                  stream_buffer_rows=args.stream_buffer_rows, stream_prefetch=args.stream_prefetch),
            )
            try:
                trainer = api.build_trainer(config, ds, out_dir=stream_dir / name if args.streaming else None)
                # the peak is measured again next to each model: on a shared machine the load varies
                peak = matmul_peak(dtype)
                figures = measure(trainer, steps, warmup, args.budget)
            except Exception as exc:  # one model failing must not hide the others' figures
                print(f"{model:18} failed: {type(exc).__name__}: {exc}", flush=True)
                report["results"].append({"dataset": name, "model": model, "error": str(exc)})
                continue
            share = figures["train_flops_per_s"] / peak
            print(f"{model:18} {figures['train_samples_per_s']:9,.0f} {figures['data_share']:7.1%} "
                  f"{figures['busy']:5.2f} {figures['infer_samples_per_s']:9,.0f} "
                  f"{figures['train_flops_per_sample'] / 1e6:13.2f} {figures['train_flops_per_s'] / 1e9:8.2f} "
                  f"{share:7.1%}", flush=True)
            report["results"].append({"dataset": name, "model": model, **figures, "peak_flops_per_s": peak,
                                      "peak_share": share})
            if args.profile:
                print(profile(trainer, steps=min(steps, 10)), flush=True)
    onerank = [r for r in report["results"] if r["model"] == "onerank" and "error" not in r]
    for r in onerank:
        print(f"\nOneRank training on {r['dataset']}: {r['train_flops_per_s'] / 1e9:.2f} GFLOP/s = "
              f"{r['peak_share']:.1%} of the {r['peak_flops_per_s'] / 1e9:.1f} GFLOP/s matrix-multiply peak "
              "measured just before it")
    # On a shared machine the wall-clock rates move with the neighbours' load; samples per second of this process's
    # CPU time (train/s divided by "busy", one thread) do not, so both ratios are printed.
    for dataset, target in TARGET_RATIOS.items():
        rows = {r["model"]: r for r in report["results"] if r["dataset"] == dataset and "error" not in r}
        for label in [m for m in rows if m.startswith("onerank")] if "mmoe" in rows else []:
            a, b = rows[label], rows["mmoe"]
            wall = a["train_samples_per_s"] / b["train_samples_per_s"]
            cpu = (a["train_samples_per_s"] / max(a["busy"], 1e-9)) / (b["train_samples_per_s"] / max(b["busy"], 1e-9))
            report.setdefault("onerank_over_mmoe", {}).setdefault(dataset, {})[label] = {
                "wall": round(wall, 3), "cpu_time": round(cpu, 3)}
            print(f"{label} / MMoE training samples/s on {dataset}: {wall:.2f}x wall clock "
                  f"({a['train_samples_per_s']:,.0f} / {b['train_samples_per_s']:,.0f}), {cpu:.2f}x per CPU second "
                  f"(target >= {target}x; same run, {args.threads} thread(s))")
    shutil.rmtree(stream_dir, ignore_errors=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sharded embedding tables on TorchRec against the fused, replicated table under DDP, in one run on the same batches.

A synthetic click log whose ``user_id`` field holds more than 10^7 distinct ids (drawn from a 10^9 id space) hashed into
``--buckets`` rows (``hash_buckets``), an MMoE, exact Adagrad for the tables in both runs (so both take the same
updates), ``--world-size`` gloo processes on CPU. Each rank trains ``--steps`` timed steps (after ``--warmup``) with:

* ``fused``: the fused table held whole by every rank, its dense gradient all-reduced by DDP (today's engine);
* ``torchrec``: TorchRec tables sharded by its planner (``--sharding``), FBGEMM's fused optimiser.

Reported per run: the mean training loss of the timed steps, the validation metrics after them, samples/s, each rank's
table memory (rows, gradient and optimiser state it holds) and peak resident memory. ``--json`` writes it with the
commit, whether the tree was clean and the load average (figures taken on a shared machine are marked as such);
``--publish PAGE`` writes the table of ``docs/scaling.md`` from that JSON.

    .venv/bin/python benchmarks/sharded_tables.py --json benchmarks/results/sharded_tables_cpu2.json \\
        --publish docs/scaling.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from onerank import api
from onerank.benchmarking.runner import code_version
from onerank.data import CategoricalField, DenseField, RawDataset, RawSplit, Schema, TaskSpec
from onerank.data.dataset import EncodedDataset, encode_dataset
from onerank.features import sharding
from onerank.training.config import RunConfig, TrainConfig
from onerank.training.trainer import TrainingInterrupted

SECTION = "sharded-tables"


def raw_dataset(rows: int, valid_rows: int, seed: int) -> RawDataset:
    """Clicks that depend on the item, its category and the hour; ``user_id`` is a near-unique id per row (the
    long tail that fills industrial tables)."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> RawSplit:
        item = rng.integers(0, 2000, n)
        hour = rng.integers(0, 24, n)
        logit = -1.5 + 1.2 * np.sin(item * 0.37) + 0.5 * (item % 20 < 5) + 0.3 * np.cos(hour / 4)
        click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
        like = (rng.random(n) < 1 / (1 + np.exp(-(logit - 1.0 + 0.8 * (item % 7 == 0))))).astype(np.int64)
        table = pd.DataFrame({"user_id": rng.integers(0, 10**9, n), "item_id": item, "category": item % 20,
                              "hour": hour, "price": rng.gamma(2.0, 10.0, n), "click": click, "like": like})
        return RawSplit(table=table)

    schema = Schema(
        categorical=[CategoricalField("user_id", "user"), CategoricalField("item_id", "item"),
                     CategoricalField("category", "item"), CategoricalField("hour", "context")],
        dense=[DenseField("price", group="item", log1p=True)],
        tasks=[TaskSpec("click"), TaskSpec("like")],
        item_id="item_id",
    )
    return RawDataset("sharded-bench", schema, split(rows), split(valid_rows), split(valid_rows))


def config(backend: str, args: argparse.Namespace) -> RunConfig:
    train = TrainConfig(epochs=1, batch_size=args.batch_size, seed=0, progress=False, tensorboard=False, device="cpu",
                        grad_clip=None, embedding_tables=backend, embedding_optimizer="adagrad", embedding_lr=0.05,
                        sharding=args.sharding, eval_batch_size=65_536)
    return RunConfig(dataset="sharded-bench", model="mmoe", model_options={"embedding_dim": args.dim}, train=train)


def table_memory(trainer) -> dict[str, int]:
    """Bytes of embedding rows, their gradient and their optimiser state that this rank holds."""
    if trainer.sharded:
        held = sharding.table_bytes(trainer.model)
        return {"rows": held["rows"], "gradient": 0, "optimizer_state": held["optimizer_state"]}
    table = trainer.model.encoder.embedding.table.weight
    state = sum(v.numel() * v.element_size() for opt in trainer.optimizers for p, s in opt.state.items()
                if p is table for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    size = table.numel() * table.element_size()
    return {"rows": size, "gradient": size, "optimizer_state": state}


def run(backend: str, ds: EncodedDataset, args: argparse.Namespace) -> dict:
    trainer = api.build_trainer(config(backend, args), ds)
    try:
        trainer.fit(stop_after_steps=args.warmup)
    except TrainingInterrupted:
        pass
    dist.barrier()
    start = time.perf_counter()
    before = dict(trainer.state.epoch_loss_sums)
    try:
        trainer.fit(stop_after_steps=args.warmup + args.steps)
    except TrainingInterrupted:
        pass
    dist.barrier()
    seconds = time.perf_counter() - start
    losses = {t: (trainer.state.epoch_loss_sums[t] - before[t]) / args.steps for t in before}
    valid = trainer.evaluate("valid")
    out = {
        "train_loss": dict(zip(losses, dist_mean(list(losses.values())))),  # the ranks' mean losses, averaged
        "valid": valid,
        "samples_per_s": args.steps * args.batch_size / seconds,
        "seconds": seconds,
        "table_memory": table_memory(trainer),
        "plan": trainer.table_plan,
    }
    del trainer
    return out


def dist_mean(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def worker(rank: int, world_size: int, tmp: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size)
    ds = EncodedDataset.load(Path(tmp) / "dataset")
    report = {}
    for backend in ("fused", "torchrec"):
        report[backend] = run(backend, ds, args)
        report[backend]["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=12_000_000, help="training rows (one near-unique user id each)")
    parser.add_argument("--valid-rows", type=int, default=200_000)
    parser.add_argument("--buckets", type=int, default=2**24, help="hash buckets of user_id (its table's rows)")
    parser.add_argument("--dim", type=int, default=8, help="embedding width")
    parser.add_argument("--batch-size", type=int, default=8192, help="global batch")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--sharding", default="auto", choices=["auto", "table_wise", "column_wise", "row_wise"])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--publish", type=Path, help="write the table of this page (docs/scaling.md) from --json")
    parser.add_argument("--publish-only", action="store_true", help="only render --json into --publish")
    args = parser.parse_args(argv)
    if args.publish_only:
        publish(json.loads(args.json.read_text()), args.publish)
        return
    load_before, code = os.getloadavg(), code_version()  # the code that runs, before anything is committed meanwhile
    with tempfile.TemporaryDirectory(prefix="onerank-sharded-") as tmp:
        start = time.perf_counter()
        ds = _hashed(raw_dataset(args.rows, args.valid_rows, seed=0), args.buckets)
        ds.save(Path(tmp) / "dataset")
        prepare = time.perf_counter() - start
        hashing = ds.info["hashing"]["user_id"]
        del ds
        mp.spawn(worker, args=(args.world_size, tmp, args), nprocs=args.world_size, join=True)
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(args.world_size)]
    result = {
        "benchmark": "sharded_tables",
        "code": code,
        "torch": torch.__version__,
        "torchrec": _version("torchrec"),
        "fbgemm_gpu": _version("fbgemm_gpu"),
        "machine": {"cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
                    "shared": True, "threads_per_process": 1},
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "publish", "publish_only")} | {
            "model": "mmoe", "embedding_optimizer": "adagrad", "embedding_lr": 0.05, "backend": "gloo, CPU"},
        "dataset": {"train_rows": args.rows, "user_id": hashing, "prepare_seconds": round(prepare, 1)},
        "ranks": ranks,
    }
    fused, sharded = ranks[0]["fused"], ranks[0]["torchrec"]
    result["summary"] = {
        "max_abs_train_loss_difference": max(abs(fused["train_loss"][t] - sharded["train_loss"][t])
                                             for t in fused["train_loss"]),
        "max_abs_valid_auc_difference": max(abs(fused["valid"][t]["auc"] - sharded["valid"][t]["auc"])
                                            for t in fused["valid"]),
        "max_abs_valid_logloss_difference": max(abs(fused["valid"][t]["logloss"] - sharded["valid"][t]["logloss"])
                                                for t in fused["valid"]),
        "speedup": sharded["samples_per_s"] / fused["samples_per_s"],
    }
    print(json.dumps(result["summary"], indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.publish:
        publish(result, args.publish)


def _hashed(raw: RawDataset, buckets: int) -> EncodedDataset:
    import dataclasses

    return encode_dataset(dataclasses.replace(raw, schema=raw.schema.with_hashing({"user_id": buckets})))


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def publish(result: dict, page: Path) -> None:
    """The results table of docs/scaling.md, between its markers, from the JSON (no figure typed by hand)."""
    from onerank.benchmarking.report import publish_section

    s, d = result["settings"], result["dataset"]
    lines = [
        f"Run: `{result['code']['git_commit'][:10] if result['code']['git_commit'] else '?'}`"
        f"{' (uncommitted changes)' if result['code']['git_dirty'] else ''}, torch {result['torch']}, torchrec "
        f"{result['torchrec']}, fbgemm_gpu {result['fbgemm_gpu']}, {s['world_size']} gloo processes on CPU, 1 thread "
        f"each; load average {result['machine']['load_average_before'][0]:.1f} before and "
        f"{result['machine']['load_average_after'][0]:.1f} after on {result['machine']['cpus']} cores shared with "
        "other jobs (throughput figures are indicative only).",
        "",
        f"Data: {d['train_rows']:,} training rows; `user_id` has {d['user_id']['distinct_ids']:,} distinct ids "
        f"hashed into {d['user_id']['buckets']:,} buckets ({d['user_id']['occupied_buckets']:,} occupied, collision "
        f"rate {d['user_id']['collision_rate']:.3f}). MMoE, embeddings of {s['dim']}, global batch {s['batch_size']:,}, "
        f"{s['steps']} timed steps after {s['warmup']}, exact Adagrad (lr {s['embedding_lr']}) for the tables.",
        "",
        "| run | rank | table rows held (MB) | table gradient (MB) | optimiser state (MB) | samples/s |",
        "|---|---|---|---|---|---|",
    ]
    for backend, label in (("fused", "fused table, DDP"), ("torchrec", "TorchRec, sharded")):
        for rank, report in enumerate(result["ranks"]):
            r = report[backend]
            m = r["table_memory"]
            lines.append(f"| {label} | {rank} | {_mb(m['rows'])} | {_mb(m['gradient'])} | "
                         f"{_mb(m['optimizer_state'])} | {r['samples_per_s']:,.0f} |")
    peak = max(report["torchrec"]["peak_rss_bytes"] for report in result["ranks"])
    lines += ["", f"(Table memory: the bytes of rows, dense gradient and Adagrad state each rank holds. The dataset, "
              f"every rank's copy of it, dominates the processes' resident memory: peak {_mb(peak)} MB per process over "
              "both runs.)"]
    plan = result["ranks"][0]["torchrec"]["plan"]
    lines += ["", "Plan (TorchRec's planner): " + ", ".join(
        f"`{k.rsplit('.', 1)[-1]}` {v['sharding']} on ranks {v['ranks']}" for k, v in sorted(plan.items())) + ".", ""]
    fused, sharded = result["ranks"][0]["fused"], result["ranks"][0]["torchrec"]
    lines += ["| | " + " | ".join(f"{t} loss" for t in fused["train_loss"]) + " | " +
              " | ".join(f"valid {t} AUC | valid {t} logloss" for t in fused["valid"]) + " |",
              "|---|" + "---|" * (len(fused["train_loss"]) + 2 * len(fused["valid"]))]
    for label, r in (("fused table, DDP", fused), ("TorchRec, sharded", sharded)):
        lines.append(f"| {label} | " + " | ".join(f"{v:.7f}" for v in r["train_loss"].values()) + " | " +
                     " | ".join(f"{m['auc']:.7f} | {m['logloss']:.7f}" for m in r["valid"].values()) + " |")
    summary = result["summary"]
    lines += ["", f"Largest differences: training loss {summary['max_abs_train_loss_difference']:.1e}, validation AUC "
              f"{summary['max_abs_valid_auc_difference']:.1e}, logloss {summary['max_abs_valid_logloss_difference']:.1e}; "
              f"the sharded run trained {summary['speedup']:.1f}x as many samples per second."]
    publish_section(page, SECTION, "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

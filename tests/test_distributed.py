"""Data-parallel training: two processes with global batch B reproduce one process with batch B, checkpoints are
written once and resumed by every rank, metrics are exact, and replicas stay identical under every weighting path.

Multi-process tests run on CPU with gloo (two processes on this machine): one through ``torchrun`` and the
command line, one through ``torch.multiprocessing`` on the shared tiny dataset (task spaces, histories, requests).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from onerank import api, cli
from onerank.data.batching import BatchLoader, TensorSplit
from onerank.objectives.weighting import build_weighting
from onerank.training import checkpoint as ckpt
from onerank.training import distributed
from onerank.training.config import RunConfig, TrainConfig
from onerank.training.trainer import TrainingInterrupted

ROOT = Path(__file__).resolve().parents[1]
# Parity tolerance: the two runs differ only in the order of floating-point sums (per-rank partial gradients are
# averaged), so after a few epochs of Adam parameters agree to ~1e-7 and metrics to far below 1e-5.
TOLERANCE = 1e-5


# ---- sharding, without processes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("by_request", [False, True])
@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_partition_every_global_batch(tiny_dataset, by_request, world_size):
    split = TensorSplit(tiny_dataset.train, tiny_dataset.item_table, tiny_dataset.schema.item_id)
    single = BatchLoader(split, 64, shuffle=True, seed=3, by_request=by_request)
    ranks = [
        BatchLoader(split, 64, shuffle=True, seed=3, by_request=by_request, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    assert all(len(r) == len(single) for r in ranks)  # every rank takes the same number of steps
    for whole, *parts in zip(single.epoch(1), *(r.epoch(1) for r in ranks)):
        # contiguous shares, in rank order, of exactly the single-process batch
        for name in ("user", ):
            assert torch.equal(torch.cat([getattr(p, name) for p in parts]), getattr(whole, name))
        for key in whole.categorical:
            assert torch.equal(torch.cat([p.categorical[key] for p in parts]), whole.categorical[key])
        sizes = [p.size for p in parts]
        if by_request:
            assert all(p.num_requests * 5 == p.size for p in parts)  # whole requests of 5 impressions
            assert max(sizes) - min(sizes) <= 5
        else:
            assert max(sizes) - min(sizes) <= 1


def test_blocks_cover_items_in_order():
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3):
            blocks = [distributed.block(n, distributed.DistInfo(rank=r, world_size=world)) for r in range(world)]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))


def test_strategies_that_write_gradients_themselves_are_synchronised_manually(tiny_dataset):
    tasks = tiny_dataset.schema.tasks
    assert distributed.plain_backward(build_weighting("fixed", tasks))
    assert distributed.plain_backward(build_weighting("equal", tasks))
    for name in ("uncertainty", "gradnorm", "pcgrad"):
        assert not distributed.plain_backward(build_weighting(name, tasks))


def test_without_a_process_group_everything_is_a_no_op(tiny_dataset):
    assert not distributed.info().enabled
    scales, total = distributed.global_loss_scales(7, {"click": torch.ones(7, dtype=torch.bool)})
    assert scales == {"click": 1.0} and total == 7
    assert distributed.rank_zero_first(lambda: 5) == 5
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]


# ---- two processes through torchrun and the command line -------------------------------------------------------------
SYNTHETIC = [
    "--dataset", "synthetic", "--dataset-option", "num_users=150", "--dataset-option", "num_items=80",
    "--dataset-option", "history_len=4", "--dataset-option", "history_requests=2",
    "--model", "mmoe", "--model-option", "use_histories=false", "--epochs", "2", "--batch-size", "128",
    "--seed", "5", "--no-progress", "--threads", "1",
]


def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    assert cli.main(["train", *SYNTHETIC, "--out", str(tmp_path / "one")]) == 0  # builds the cache first
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "onerank.cli", "train", *SYNTHETIC, "--out", str(tmp_path / "two"),
    ]
    # a session of its own, so that a hung run is killed with its workers
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("wrote ") == 1  # only rank 0 prints and writes

    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["best_epoch"] == one["best_epoch"]
    for task, metrics in one["test"].items():
        for name, value in metrics.items():
            assert two["test"][task][name] == pytest.approx(value, abs=TOLERANCE), (task, name)
    a = ckpt.load(tmp_path / "one" / "checkpoint.pt")["model"]
    b = ckpt.load(tmp_path / "two" / "checkpoint.pt")["model"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < TOLERANCE


# ---- two processes through torch.multiprocessing: resume, exact metrics, every gradient path -------------------------
def _config(weighting: str = "fixed", **train) -> RunConfig:
    defaults = dict(epochs=2, batch_size=64, progress=False, patience=5, seed=11, checkpoint_every=5,
                    tensorboard=False, threads=1)
    defaults.update(train)
    return RunConfig(dataset="tiny", model="mmoe", model_options={"use_histories": False}, weighting=weighting,
                     train=TrainConfig(**defaults))


def _summary(result: dict, out: Path | None) -> dict:
    summary = {"test": result["test"], "best_epoch": result["best_epoch"], "world_size": result["world_size"]}
    if out is not None:
        model = ckpt.load(out / "checkpoint.pt")["model"]
        summary["params"] = {k: v.double().sum().item() for k, v in model.items()}
    return summary


def _worker(rank: int, world_size: int, tmp: str) -> None:
    from conftest import tiny_raw  # the spawned process imports the test folder's helpers like pytest did

    from onerank.data.dataset import encode_dataset

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size
    )
    tmp_path = Path(tmp)
    ds = encode_dataset(tiny_raw())
    report: dict = {}
    # the default strategy (DDP backward hooks): straight, then interrupted mid-epoch and resumed by both ranks
    straight = api.train(_config(), out_dir=tmp_path / "straight", dataset=ds)
    report["straight"] = _summary(straight, tmp_path / "straight")
    try:
        api.train(_config(), out_dir=tmp_path / "crashed", dataset=ds, stop_after_steps=23)
    except TrainingInterrupted:
        pass
    report["resumed"] = _summary(
        api.train(_config(), out_dir=tmp_path / "crashed", dataset=ds, resume=True), tmp_path / "crashed"
    )
    # DDP hooks (fixed) and strategies that call autograd.grad / write .grad themselves (averaged by hand after
    # their backward): every rank's replica must hold exactly the same parameters
    for strategy in ("fixed", "uncertainty", "pcgrad"):
        trainer = api.build_trainer(_config(strategy, checkpoint_every=0), ds)
        trainer.fit()
        report[strategy] = {
            "auc": trainer.evaluate("test")["click"]["auc"],
            "replica": {k: float(v.double().sum()) for k, v in trainer.model.state_dict().items()},
        }
    # streaming: ranks read disjoint row groups and stop an epoch together; a resume restarts exactly
    stream = dict(streaming="on", stream_buffer_rows=128)
    report["stream"] = _summary(api.train(_config(**stream), out_dir=tmp_path / "stream", dataset=ds),
                                tmp_path / "stream")
    try:
        api.train(_config(**stream), out_dir=tmp_path / "stream-crashed", dataset=ds, stop_after_steps=11)
    except TrainingInterrupted:
        pass
    report["stream_resumed"] = _summary(
        api.train(_config(**stream), out_dir=tmp_path / "stream-crashed", dataset=ds, resume=True),
        tmp_path / "stream-crashed",
    )
    (tmp_path / f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


def _assert_close(a: dict, b: dict, tol: float = TOLERANCE) -> None:
    assert a["best_epoch"] == b["best_epoch"]
    for task, metrics in a["test"].items():
        for name, value in metrics.items():
            assert b["test"][task][name] == pytest.approx(value, abs=tol), (task, name)
    for key, value in a.get("params", {}).items():
        assert b["params"][key] == pytest.approx(value, abs=tol * max(1.0, abs(value))), key


def test_two_spawned_processes_resume_and_stay_in_step(tiny_dataset, tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # every rank evaluated the whole test split and reports the same, exact metrics
    for run in ("straight", "resumed", "stream", "stream_resumed"):
        assert ranks[0][run]["test"] == ranks[1][run]["test"], run
    report = ranks[0]
    assert report["straight"]["world_size"] == 2
    # one process, same global batch: the task "buy" lives in the click space, so ranks hold different numbers of
    # labelled rows; the loss rescaling keeps the gradient that of the global-batch mean
    one = api.train(_config(), out_dir=tmp_path / "one", dataset=tiny_dataset)
    _assert_close(_summary(one, tmp_path / "one"), report["straight"])
    # rank 0 wrote the checkpoints; the interrupted run, resumed by both ranks, ends where the straight one did
    _assert_close(report["straight"], report["resumed"], tol=1e-6)
    assert not list(tmp_path.glob("straight/.*.tmp"))
    _assert_close(report["stream"], report["stream_resumed"], tol=1e-6)
    for strategy in ("fixed", "uncertainty", "pcgrad"):
        assert ranks[0][strategy]["replica"] == ranks[1][strategy]["replica"], strategy  # bit-identical replicas
        assert report[strategy]["auc"] > 0.55, strategy
    # the uncertainty objective is linear in the task losses: manual averaging reproduces one process too
    single = api.build_trainer(_config("uncertainty", checkpoint_every=0), tiny_dataset)
    single.fit()
    for key, value in single.model.state_dict().items():
        assert report["uncertainty"]["replica"][key] == pytest.approx(float(value.double().sum()), abs=1e-4), key

"""Embedding tables on TorchRec (``train.embedding_tables: torchrec``): the same model as with the fused table, sharded
over processes; checkpoints saved by two processes and read by one.

The TorchRec tests need the extra ``onerank[torchrec]`` and are skipped without it (the error for a missing extra is
tested either way). Multi-process tests run two gloo processes on the shared tiny dataset.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from onerank import api, cli
from onerank.features import sharding, tables
from onerank.models.base import build_model, model_names
from onerank.features.space import FeatureSpace
from onerank.training import checkpoint as ckpt
from onerank.training import sharded_checkpoint
from onerank.training.config import RunConfig, TrainConfig
from onerank.training.trainer import TrainingInterrupted

needs_torchrec = pytest.mark.skipif(not tables.torchrec_available(),
                                    reason='needs the extra onerank[torchrec] (pip install "onerank[torchrec]")')
# The runs differ in the order of floating-point sums only (gradients summed per row across ranks, DDP's averages).
TOLERANCE = 1e-5


# ---- without TorchRec ----------------------------------------------------------------------------------------------------
def test_the_option_without_the_extra_is_a_one_line_error_naming_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "fbgemm_gpu", None)  # what an environment without the extra looks like
    with pytest.raises(tables.TorchRecUnavailable, match=r"onerank\[torchrec\]"):
        tables.require_torchrec()
    code = cli.main(["train", "--dataset", "synthetic", "--dataset-option", "num_users=40", "--dataset-option",
                     "num_items=30", "--epochs", "1", "--embedding-tables", "torchrec", "--no-progress",
                     "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "onerank[torchrec]" in err and len(err.splitlines()) == 1


@needs_torchrec
def test_an_fbgemm_built_for_another_torch_is_refused(monkeypatch):
    import fbgemm_gpu

    monkeypatch.setattr(fbgemm_gpu, "__version__", "1.9.0")
    with pytest.raises(tables.TorchRecUnavailable, match="not built for torch"):
        tables.require_torchrec()


# ---- one process ---------------------------------------------------------------------------------------------------------
def _config(embedding_tables: str = "torchrec", model: str = "mmoe", **train) -> RunConfig:
    options = {"onerank": {"dim": 8, "num_layers": 1}}.get(model, {})
    settings = dict(epochs=1, batch_size=64, seed=4, progress=False, tensorboard=False, device="cpu",
                    grad_clip=None, embedding_tables=embedding_tables)
    return RunConfig(dataset="tiny", model=model, model_options=options, train=TrainConfig(**{**settings, **train}))


def _spawn(worker, world_size: int, tmp: Path, *args) -> None:
    mp.spawn(worker, args=(world_size, str(tmp), *args), nprocs=world_size, join=True)


def _join(rank: int, world_size: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size)


def _models_worker(rank: int, world_size: int, tmp: str) -> None:
    """Every model, built as usual, then moved to TorchRec tables: the same logits before and after one step of
    exact Adagrad on the tables."""
    from conftest import tiny_raw

    from onerank.data.dataset import encode_dataset

    _join(rank, world_size, tmp)
    ds = encode_dataset(tiny_raw(20))
    report = {}
    for name in model_names():
        runs = {}
        for backend in ("fused", "torchrec"):
            trainer = api.build_trainer(_config(backend, name, embedding_optimizer="adagrad"), ds)
            batch = next(iter(trainer.train_loader.epoch(0)))
            logits = []
            for _ in range(2):
                with torch.no_grad():
                    logits.append({t: v.tolist() for t, v in trainer.model(batch).items()})
                try:
                    trainer.fit(stop_after_steps=trainer.state.global_step + 1)
                except TrainingInterrupted:
                    pass
            runs[backend] = logits
        report[name] = runs
    (Path(tmp) / "models.json").write_text(json.dumps(report))
    dist.destroy_process_group()


@needs_torchrec
def test_every_model_builds_and_trains_through_torchrec_tables(tmp_path):
    _spawn(_models_worker, 1, tmp_path)
    report = json.loads((tmp_path / "models.json").read_text())
    assert sorted(report) == sorted(model_names())
    for name, runs in report.items():
        for step, (fused, torchrec) in enumerate(zip(runs["fused"], runs["torchrec"])):
            for task, values in fused.items():
                assert torchrec[task] == pytest.approx(values, abs=1e-6), (name, step, task)


# ---- two processes -------------------------------------------------------------------------------------------------------
def _one_step(config: RunConfig, ds, save_to: Path | None = None) -> dict:
    """Logits of the first batch, then one optimiser step: the dense gradients and the whole model after it (and the
    sharded tables saved to ``save_to``)."""
    trainer = api.build_trainer(config, ds)
    batch = next(iter(trainer.train_loader.epoch(0)))
    with torch.no_grad():
        logits = {t: v.clone() for t, v in trainer.model(batch).items()}
    try:
        trainer.fit(stop_after_steps=1)
    except TrainingInterrupted:
        pass
    owned = sharding.sharded_parameter_names(trainer.model)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if n not in owned and p.grad is not None}
    state = sharding.plain_state_dict(trainer.model) if trainer.sharded else trainer.model.state_dict()
    if save_to is not None:
        sharded_checkpoint.save(trainer._table_state(), save_to)
    return {"logits": logits, "grads": grads, "state": {k: v.clone() for k, v in state.items()},
            "table_bytes": sharding.table_bytes(trainer.model) if trainer.sharded else None, "plan": trainer.table_plan}


def _sharded_worker(rank: int, world_size: int, tmp: str) -> None:
    from conftest import tiny_raw

    from onerank.data.dataset import encode_dataset

    _join(rank, world_size, tmp)
    out = Path(tmp)
    ds = encode_dataset(tiny_raw(60))
    # FBGEMM's CPU kernels have Adagrad (exact: rows without gradient keep still, as in torch's dense Adagrad), no Adam
    steps = {opt: _one_step(_config(sharding="row_wise", embedding_optimizer=opt), ds, out / f"{opt}.dcp")
             for opt in ("adagrad",)}
    torch.save(steps, out / f"step{rank}.pt")
    # checkpoints written by two processes; a run interrupted mid-epoch and resumed ends where the straight one does
    config = _config(epochs=2, sharding="column_wise", embedding_optimizer="adagrad", checkpoint_every=5)
    straight = api.train(config, out_dir=out / "straight", dataset=ds)
    try:
        api.train(config, out_dir=out / "crashed", dataset=ds, stop_after_steps=7)
    except TrainingInterrupted:
        pass
    if rank == 0:  # the interrupted state, for a resume by one process
        shutil.copytree(out / "crashed", out / "crashed-copy")
    dist.barrier()
    resumed = api.train(config, out_dir=out / "crashed", dataset=ds, resume=True)
    (out / f"runs{rank}.json").write_text(json.dumps({"straight": straight["test"], "resumed": resumed["test"]}))
    dist.destroy_process_group()


def _resume_worker(rank: int, world_size: int, tmp: str) -> None:
    from conftest import tiny_raw

    from onerank.data.dataset import encode_dataset

    _join(rank, world_size, tmp)
    config = _config(epochs=2, sharding="column_wise", embedding_optimizer="adagrad", checkpoint_every=5)
    result = api.train(config, out_dir=Path(tmp) / "crashed-copy", dataset=encode_dataset(tiny_raw(60)), resume=True)
    (Path(tmp) / "resumed-by-one.json").write_text(json.dumps(result["test"]))
    dist.destroy_process_group()


def _assert_metrics_close(a: dict, b: dict) -> None:
    for task, metrics in a.items():
        for name, value in metrics.items():
            assert b[task][name] == pytest.approx(value, abs=TOLERANCE), (task, name)


@needs_torchrec
def test_two_processes_with_sharded_tables_match_one_process_with_the_fused_table(tiny_dataset, tmp_path):
    from conftest import tiny_raw

    from onerank.data.dataset import encode_dataset

    _spawn(_sharded_worker, 2, tmp_path)
    ds = encode_dataset(tiny_raw(60))
    ranks = [torch.load(tmp_path / f"step{r}.pt", weights_only=False) for r in range(2)]
    for optimizer in ("adagrad",):
        reference = _one_step(_config("fused", embedding_optimizer=optimizer), ds)
        shards = [r[optimizer] for r in ranks]
        assert shards[0]["plan"] and all(p["sharding"] == "row_wise" for p in shards[0]["plan"].values())
        # forward: each rank's share of the global batch, in order, is the single process's batch
        for task, logits in reference["logits"].items():
            joined = torch.cat([s["logits"][task] for s in shards])
            assert torch.allclose(joined, logits, atol=1e-6), (optimizer, task)
        # backward: the dense parameters' gradients (DDP's averages of the rescaled rank losses) are the global ones
        assert set(shards[0]["grads"]) == set(reference["grads"]) - {k for k in reference["grads"] if "table" in k}
        for name, grad in shards[0]["grads"].items():
            assert torch.allclose(grad, reference["grads"][name], atol=1e-6), (optimizer, name)
        # one optimiser step: the whole model (tables included, gathered whole) is the single process's. Except a
        # parameter whose true gradient is zero (the attention score's bias before its softmax): its gradient is float
        # noise, which Adam normalises to a full step (docs/scaling.md), in one process as in two
        noise = {k for k, g in reference["grads"].items() if g.abs().max() < 1e-8}
        for rank_state in (s["state"] for s in shards):
            assert rank_state.keys() == reference["state"].keys()
            for key, value in reference["state"].items():
                if key not in noise:
                    assert torch.allclose(rank_state[key], value, atol=1e-6), (optimizer, key)
        # each rank holds half of the rows
        table_rows = sum(v.numel() * v.element_size() for k, v in reference["state"].items() if k.endswith("table.weight"))
        for s in shards:
            assert s["table_bytes"]["rows"] <= 0.5 * table_rows + 64 * 8 * 4 * len(ds.schema.categorical)

    runs = [json.loads((tmp_path / f"runs{r}.json").read_text()) for r in range(2)]
    _assert_metrics_close(runs[0]["straight"], runs[1]["straight"])  # every rank reports the exact metrics
    _assert_metrics_close(runs[0]["straight"], runs[0]["resumed"])  # a mid-epoch resume on two processes is exact
    # the unsharded checkpoint.pt scores as the run reported
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api, "load_run_dataset", lambda config: ds)
        trainer, _, _ = api.checkpoint_trainer(tmp_path / "straight" / "checkpoint.pt")
    _assert_metrics_close(runs[0]["straight"], trainer.evaluate("test"))

    # tables saved by two processes, read whole by one into an unsharded model (serving, export)
    unsharded = build_model("mmoe", FeatureSpace.from_dataset(ds))
    sharded_checkpoint.load_unsharded(unsharded, tmp_path / "adagrad.dcp")
    after_step = ranks[0]["adagrad"]["state"]["encoder.embedding.table.weight"]
    assert torch.equal(unsharded.encoder.embedding.table.weight.detach(), after_step)

    # ... and resumed by one process (the tables re-sharded 2 -> 1): the same global batches, the same result
    _spawn(_resume_worker, 1, tmp_path)
    _assert_metrics_close(runs[0]["straight"], json.loads((tmp_path / "resumed-by-one.json").read_text()))


@needs_torchrec
def test_adam_for_sharded_tables_on_cpu_is_refused_with_the_fix(tiny_dataset):
    with pytest.raises(ValueError, match="embedding_optimizer: adagrad"):
        api.build_trainer(_config(embedding_optimizer="adam"), tiny_dataset)


@needs_torchrec
def test_sharded_checkpoints_refuse_code_in_their_metadata(tmp_path):
    import pickle

    sharded_checkpoint.save({"tables": {"w": torch.ones(3, 2)}}, tmp_path / "ok.dcp")
    target = {"tables": {"w": torch.zeros(3, 2)}}
    sharded_checkpoint.load(target, tmp_path / "ok.dcp")
    assert torch.equal(target["tables"]["w"], torch.ones(3, 2))

    class Payload:
        def __reduce__(self):
            return (print, ("this must not run",))

    shutil.copytree(tmp_path / "ok.dcp", tmp_path / "evil.dcp")
    (tmp_path / "evil.dcp" / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ckpt.CheckpointError, match="builtins.print"):
        sharded_checkpoint.load({"tables": {"w": torch.zeros(3, 2)}}, tmp_path / "evil.dcp")
    with pytest.raises(ckpt.CheckpointError, match="not a sharded checkpoint"):
        sharded_checkpoint.load(target, tmp_path)

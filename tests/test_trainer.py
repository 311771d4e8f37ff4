import json
import math

import pytest
import torch

from onerank import api
from onerank.training import checkpoint as ckpt
from onerank.training.config import RunConfig, TrainConfig
from onerank.training.trainer import TrainingInterrupted


def config(model="mmoe", **train):
    defaults = dict(epochs=3, batch_size=64, progress=False, patience=5, seed=7, checkpoint_every=5)
    defaults.update(train)
    return RunConfig(dataset="tiny", model=model, train=TrainConfig(**defaults))


@pytest.mark.parametrize("model", ["mmoe", "ple"])
def test_resume_after_a_crash_reaches_the_same_result(tiny_dataset, tmp_path, model):
    straight = api.train(config(model), out_dir=tmp_path / "straight", dataset=tiny_dataset)

    out = tmp_path / "crashed"
    with pytest.raises(TrainingInterrupted):
        # 23 steps is mid-epoch (an epoch has ~16 batches) and between checkpoints: the last 3 steps are lost
        api.train(config(model), out_dir=out, dataset=tiny_dataset, stop_after_steps=23)
    assert (out / "last.pt").exists()
    resumed = api.train(config(model), out_dir=out, dataset=tiny_dataset, resume=True)

    assert resumed["best_epoch"] == straight["best_epoch"]
    for task, metrics in straight["test"].items():
        for name, value in metrics.items():
            assert resumed["test"][task][name] == pytest.approx(value, abs=1e-6), (task, name)
    a = ckpt.load(tmp_path / "straight" / "checkpoint.pt")["model"]
    b = ckpt.load(out / "checkpoint.pt")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_early_stopping_follows_validation_and_restores_the_best_epoch(tiny_dataset, tmp_path):
    # A huge learning rate makes validation worse after the first epochs: training must stop and keep the best.
    result = api.train(config(epochs=8, lr=0.3, patience=1, checkpoint_every=0), out_dir=tmp_path,
                       dataset=tiny_dataset)
    monitors = [h["monitor"] for h in result["history"]]
    assert result["epochs"] < 8 or result["best_epoch"] == 8
    best = max(range(len(monitors)), key=lambda i: -math.inf if math.isnan(monitors[i]) else monitors[i])
    assert result["best_epoch"] == best + 1
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["best_epoch"] == result["best_epoch"] and "test" in saved
    state = ckpt.load(tmp_path / "checkpoint.pt")
    assert state["epoch"] == best and state["meta"]["space"]["vocab_sizes"]


def test_training_improves_over_chance(tiny_dataset):
    result = api.train(config("shared_bottom", epochs=4, lr=3e-3, checkpoint_every=0), dataset=tiny_dataset)
    assert result["test"]["click"]["auc"] > 0.6
    assert result["train_samples_per_s"] > 0 and result["params"] > 0


def test_a_failed_checkpoint_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_atomic({"v": 1}, path)

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt.save_atomic({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"v": 1}  # the old bytes, whole
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_separate_embedding_optimiser_and_cosine_schedule(tiny_dataset):
    """``embedding_lr``: the embedding tables get their own Adam at that rate (and only they: the dense weights keep
    AdamW at ``lr``); ``cosine``: every optimiser step of the run uses lr * (1 + cos(pi t / T)) / 2, t = 0 .. T - 1
    over the run's T steps."""
    trainer = api.build_trainer(config(epochs=2, lr=3e-3, embedding_lr=0.01, lr_schedule="cosine", patience=2,
                                       checkpoint_every=0), tiny_dataset)
    dense, sparse = trainer.optimizers
    assert type(dense) is torch.optim.AdamW and type(sparse) is torch.optim.Adam
    tables = {id(p) for m in trainer.model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    in_sparse = {id(p) for group in sparse.param_groups for p in group["params"]}
    in_dense = {id(p) for group in dense.param_groups for p in group["params"]}
    assert tables and in_sparse == tables and not in_dense & tables
    assert in_dense | in_sparse >= {id(p) for p in trainer.model.parameters()}
    used = []  # (dense lr, embedding lr) at each optimiser step of the run
    dense.register_step_pre_hook(
        lambda *_: used.append((dense.param_groups[0]["lr"], sparse.param_groups[0]["lr"])))
    try:
        trainer.fit()
    finally:
        trainer.close()
    steps = 2 * len(trainer.train_loader)
    assert len(used) == steps
    for t in (0, steps // 4, steps // 2, steps - 1):
        share = 0.5 * (1 + math.cos(math.pi * t / steps))
        assert used[t] == pytest.approx((3e-3 * share, 0.01 * share))
    assert used[-1][0] < 1e-5 < used[steps // 2][0]

def test_monitor_weights_must_name_known_tasks(tiny_dataset):
    with pytest.raises(ValueError, match="unknown tasks"):
        api.train(config(monitor_weights={"clikc": 1.0}), dataset=tiny_dataset)

"""Cross-task distillation (objectives/distillation.py): the losses against per-pair loop references, the
switched-off objective against the plain one, the stop-gradients of the method, configuration errors, and training
with zoo models and OneRank through the unchanged trainer."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from onerank import api, cli
from onerank.data.batching import Batch
from onerank.data.schema import SchemaError, TaskSpec
from onerank.objectives.distillation import CrossDistillation, DistillationConfig, quadruplet_classes
from onerank.objectives.losses import MultiTaskObjective, ObjectiveConfig
from onerank.training import checkpoint as ckpt
from onerank.training.config import RunConfig, TrainConfig

TASKS = [TaskSpec("click"), TaskSpec("long_view"), TaskSpec("like")]
PAIRS = ["like<-long_view", "long_view<-click"]


def label_batch(n: int = 40, seed: int = 0) -> tuple[Batch, dict[str, torch.Tensor]]:
    """Labels, masks (some rows without a label) and logits that require gradients; no features needed."""
    g = torch.Generator().manual_seed(seed)
    click = (torch.rand(n, generator=g) < 0.5).float()
    long_view = (torch.rand(n, generator=g) < 0.4).float()
    like = ((torch.rand(n, generator=g) < 0.3) & (long_view > 0)).float()
    labels = {"click": click, "long_view": long_view, "like": like}
    mask = {t: torch.rand(n, generator=g) > 0.15 for t in labels}
    batch = Batch(categorical={}, dense={}, histories={}, labels=labels, label_mask=mask,
                  user=torch.zeros(n, dtype=torch.long))
    logits = {t: torch.randn(n, generator=g).requires_grad_() for t in labels}
    return batch, logits


def distillation(**options) -> CrossDistillation:
    module = CrossDistillation(TASKS, {"pairs": PAIRS, "warmup_steps": 0, **options})
    with torch.no_grad():  # a teacher that differs from the student, as after some training
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module


def reference_quadruplet(scores, target, helper, valid) -> float:
    """The quadruplet loss as a loop over every ordered pair of rows."""
    rank = [2 * int(t > 0.5) + int(h > 0.5) for t, h in zip(target.tolist(), helper.tolist())]
    per_relation = {upper: [] for upper in (3, 2, 1)}
    for i, j in itertools.product(range(len(rank)), repeat=2):
        if valid[i] and valid[j] and rank[i] in per_relation and rank[j] == rank[i] - 1:
            per_relation[rank[i]].append(-math.log(1.0 / (1.0 + math.exp(-(scores[i] - scores[j])))))
    means = [sum(v) / len(v) for v in per_relation.values() if v]
    return sum(means) / len(means)


def reference_bce(logits, targets, mask) -> float:
    terms = [-(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))
             for x, y, m in zip(logits.tolist(), targets.tolist(), mask.tolist()) if m]
    return sum(terms) / len(terms)


def test_the_auxiliary_losses_match_a_per_pair_loop():
    batch, logits = label_batch()
    module = distillation(correction=0.6)
    for pair in module.pairs:
        terms = module.pair_terms(pair, logits, batch)
        y, h = batch.labels[pair.target], batch.labels[pair.helper]
        m_t, m_h = batch.label_mask[pair.target], batch.label_mask[pair.helper]
        with torch.no_grad():
            teacher = module.teachers[pair.key](logits[pair.target], logits[pair.helper])
            calibrated = module.calibrators[pair.key](teacher)
        reference = reference_quadruplet(teacher.tolist(), y, h, (m_t & m_h).tolist())
        assert float(terms.ranking.detach()) == pytest.approx(reference, rel=1e-5)
        assert float(terms.calibration.detach()) == pytest.approx(reference_bce(calibrated, y, m_t), rel=1e-5)
        soft = [0.6 * yi + 0.4 / (1 + math.exp(-c)) for yi, c in zip(y.tolist(), calibrated.tolist())]
        reference = reference_bce(logits[pair.target], torch.tensor(soft), m_t)
        assert float(terms.distillation.detach()) == pytest.approx(reference, rel=1e-5)


def test_the_label_combinations_are_ranked_target_first():
    target = torch.tensor([1.0, 1.0, 0.0, 0.0])
    helper = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert quadruplet_classes(target, helper).tolist() == [3, 2, 1, 0]


def test_corrected_soft_labels_keep_every_positive_above_every_negative():
    """With correction > 1/2 no ranking error of the teacher across the target's labels reaches the student."""
    batch, logits = label_batch(200, seed=3)
    module = distillation(correction=0.55)
    pair = module.pairs[0]
    mask = batch.label_mask[pair.target]
    teacher = module.teachers[pair.key](logits[pair.target].detach(), logits[pair.helper].detach())
    soft = module.soft_labels(pair, teacher, batch.labels[pair.target])[mask]
    assert not soft.requires_grad
    labels = batch.labels[pair.target][mask]
    assert soft[labels > 0.5].min() > soft[labels < 0.5].max()
    assert soft[labels < 0.5].std() > 0  # the teacher's order within a label survives


def model_gradients(objective, logits, batch):
    total = sum(objective(logits, batch).values())
    return torch.autograd.grad(total, list(logits.values()), allow_unused=True)


def test_with_distillation_switched_off_the_objective_equals_the_plain_one():
    batch, logits = label_batch()
    plain = MultiTaskObjective(TASKS)
    off = MultiTaskObjective(TASKS, ObjectiveConfig(distillation=None))
    assert all(torch.equal(a, b) for a, b in zip(plain(logits, batch).values(), off(logits, batch).values()))
    # configured but not distilling (warm-up, or weight 0): the teachers train, the model's gradient is the plain one
    expected = model_gradients(plain, logits, batch)
    for options in ({"warmup_steps": 5}, {"weight": 0.0}):
        waiting = MultiTaskObjective(TASKS, ObjectiveConfig(distillation={"pairs": PAIRS, **options}))
        assert all(torch.equal(a, b) for a, b in zip(expected, model_gradients(waiting, logits, batch)))
    # ... and once the warm-up is over, distillation changes the student's gradient (so the check above can fail)
    warm = MultiTaskObjective(TASKS, ObjectiveConfig(distillation={"pairs": PAIRS, "warmup_steps": 2}))
    warm.end_step()
    warm.end_step()
    after = model_gradients(warm, logits, batch)
    assert not torch.equal(after[2], expected[2]) and torch.equal(after[0], expected[0])  # like changes, click not


def grads(loss, params):
    return [g for g in torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)]


def test_gradients_stop_where_the_method_says():
    batch, logits = label_batch()
    module = distillation()
    teacher_params = list(module.teachers.parameters())
    calibrator_params = list(module.calibrators.parameters())
    logit_list = list(logits.values())
    for pair in module.pairs:
        terms = module.pair_terms(pair, logits, batch)
        # the quadruplet loss trains the teacher head only: it never reaches the model's logits
        assert all(g is None for g in grads(terms.ranking, logit_list))
        assert any(g is not None and g.abs().sum() > 0 for g in grads(terms.ranking, teacher_params))
        # calibration trains the calibrator only: it cannot reorder the teacher or move the model
        assert all(g is None for g in grads(terms.calibration, teacher_params + logit_list))
        assert any(g is not None and g.abs().sum() > 0 for g in grads(terms.calibration, calibrator_params))
        # distillation teaches the student (the target's logit) and never trains the teacher or its calibrator
        assert all(g is None for g in grads(terms.distillation, teacher_params + calibrator_params))
        student = grads(terms.distillation, logit_list)
        names = list(logits)
        assert student[names.index(pair.target)].abs().sum() > 0
        assert student[names.index(pair.helper)] is None


@pytest.mark.parametrize("options, message", [
    ({"pairs": ["like<-nope"]}, "unknown task 'nope'"),
    ({"pairs": ["like-long_view"]}, "must read 'target<-helper'"),
    ({"pairs": ["like<-like"]}, "two different tasks"),
    ({"pairs": []}, "at least one"),
    ({"pairs": ["like<-click"], "correction": 1.5}, "correction"),
    ({"pairs": ["like<-click"], "warmup": 3}, "unknown keys \\['warmup'\\]"),
])
def test_bad_options_name_the_culprit(options, message):
    with pytest.raises(SchemaError, match=message):
        CrossDistillation(TASKS, options)


def test_regression_tasks_cannot_be_paired():
    with pytest.raises(SchemaError, match="'watch_time' is regression"):
        CrossDistillation([TaskSpec("click"), TaskSpec("watch_time", kind="regression")],
                          {"pairs": ["click<-watch_time"]})


def test_options_are_read_from_yaml_and_cli(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("dataset: tiny\nobjective:\n  distillation: {pairs: ['buy<-click'], warmup_steps: 3}\n")
    config = RunConfig.from_yaml(path)
    assert config.objective["distillation"]["warmup_steps"] == 3
    args = cli.build_parser().parse_args(["train", "--config", str(path), "--out", str(tmp_path / "o"),
                                          "--distill", "click<-buy", "--distill-weight", "0.2",
                                          "--distill-option", "correction=0.7"])
    options = cli._run_config(args).objective["distillation"]
    assert options["pairs"] == ["click<-buy"] and options["weight"] == 0.2 and options["correction"] == 0.7
    assert options["warmup_steps"] == 3  # kept from the YAML
    off = cli.build_parser().parse_args(["train", "--config", str(path), "--out", "o", "--distill", "none"])
    assert cli._run_config(off).objective["distillation"] is None
    with pytest.raises(SchemaError, match="'objective.distillation' has unknown keys"):
        RunConfig.from_dict({"objective": {"distillation": {"pairs": ["a<-b"], "wieght": 1}}})
    code = cli.main(["train", "--dataset", "synthetic", "--out", str(tmp_path / "x"), "--distill-weight", "0.3"])
    assert code == 2 and "pairs" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["mmoe", "ple", "esmm", "onerank"])
def test_any_model_trains_with_it_and_the_teachers_are_optimised(tiny_dataset, tmp_path, model):
    config = RunConfig(dataset="tiny", model=model,
                       objective={"distillation": {"pairs": ["click<-buy"], "warmup_steps": 4}},
                       train=TrainConfig(epochs=1, batch_size=64, progress=False, tensorboard=False, seed=1))
    if model == "onerank":
        config.model_options = {"dim": 8, "num_layers": 1, "num_heads": 1, "item_mlp_hidden": [16]}
    trainer = api.build_trainer(config, tiny_dataset, out_dir=tmp_path)
    before = {k: v.clone() for k, v in trainer.objective.state_dict().items()}
    state = trainer.fit()
    trainer.close()
    after = trainer.objective.state_dict()
    assert int(after["distillation.steps"]) == state.global_step > 4
    assert not torch.equal(before["distillation.teachers.click<-buy.residual.2.weight"],
                           after["distillation.teachers.click<-buy.residual.2.weight"])
    bias = "distillation.calibrators.click<-buy.bias"
    assert not torch.equal(before[bias], after[bias])
    resume = ckpt.load(tmp_path / "last.pt")
    assert torch.equal(resume["objective"]["distillation.steps"], after["distillation.steps"])
    assert not any(k.startswith("distillation") for k in ckpt.load(tmp_path / "checkpoint.pt")["model"])
    assert not math.isnan(trainer.evaluate("test")["click"]["auc"])


def test_a_resumed_run_continues_the_warm_up(tiny_dataset, tmp_path):
    def config():
        return RunConfig(dataset="tiny", model="mmoe", objective={"distillation": {"pairs": ["click<-buy"]}},
                         train=TrainConfig(epochs=2, batch_size=64, progress=False, tensorboard=False,
                                           checkpoint_every=5))

    from onerank.training.trainer import TrainingInterrupted

    with pytest.raises(TrainingInterrupted):
        api.train(config(), out_dir=tmp_path, dataset=tiny_dataset, stop_after_steps=12)
    trainer = api.build_trainer(config(), tiny_dataset, out_dir=tmp_path)
    trainer.resume()
    assert int(trainer.objective.distillation.steps) == 10 == trainer.state.global_step
    trainer.close()


def test_config_dataclass_round_trips():
    options = {"pairs": {"like<-long_view": 0.3, "long_view<-click": 0.1}, "hidden": 4}
    config = DistillationConfig.from_options(options)
    pairs = config.task_pairs(TASKS)
    assert [(p.key, p.weight) for p in pairs] == [("like<-long_view", 0.3), ("long_view<-click", 0.1)]

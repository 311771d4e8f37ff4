"""Task-weighting strategies as plug-ins: each one's defining behaviour on a tiny problem, checkpoint/resume of their
state, and every strategy with every kind of model through the trainer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from onerank import api
from onerank.data.schema import SchemaError, TaskSpec
from onerank.models import model_names
from onerank.objectives.weighting import build_weighting, weighting_names
from onerank.training import checkpoint as ckpt
from onerank.training.config import RunConfig, TrainConfig
from onerank.training.trainer import TrainingInterrupted

ADAPTIVE = ["uncertainty", "gradnorm", "pcgrad", "dwa"]
TWO_TASKS = [TaskSpec("a"), TaskSpec("b")]


def test_registered_and_options_checked():
    assert set(ADAPTIVE + ["fixed", "equal"]) <= set(weighting_names())
    with pytest.raises(SchemaError, match="takes no options"):
        build_weighting("dwa", TWO_TASKS, temp=1.0)
    with pytest.raises(SchemaError, match="temperature"):
        build_weighting("dwa", TWO_TASKS, temperature=0)
    with pytest.raises(SchemaError, match="layer"):
        build_weighting("gradnorm", TWO_TASKS, layer="first")


# ---- uncertainty -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, optimum", [("regression", 1.0), ("binary", 2.0)])
def test_uncertainty_weights_converge_to_the_inverse_task_noise(kind, optimum):
    # Fixed losses stand for the tasks' noise levels: the optimum of each term is sigma^2 = optimum * L.
    tasks = [TaskSpec("quiet", kind=kind), TaskSpec("noisy", kind=kind)]
    strategy = build_weighting("uncertainty", tasks)
    opt = torch.optim.Adam(strategy.parameters(), lr=0.05)
    losses = {"quiet": torch.tensor(0.1), "noisy": torch.tensor(2.0)}
    for _ in range(800):
        opt.zero_grad()
        weights = strategy.backward(losses, [])
        opt.step()
    variance = torch.exp(strategy.log_variance.detach())
    torch.testing.assert_close(variance, optimum * torch.tensor([0.1, 2.0]), rtol=0.02, atol=1e-3)
    scale = 0.5 if kind == "regression" else 1.0
    assert weights["quiet"] == pytest.approx(scale / (optimum * 0.1), rel=0.03)
    assert weights["quiet"] / weights["noisy"] == pytest.approx(20.0, rel=0.05)


def test_uncertainty_learns_a_smaller_weight_for_the_noisier_regression_task():
    torch.manual_seed(0)
    x = torch.randn(512, 4)
    truth = x @ torch.tensor([1.0, -2.0, 0.5, 0.0])
    targets = {"quiet": truth + 0.1 * torch.randn(512), "noisy": truth + 1.0 * torch.randn(512)}
    tasks = [TaskSpec("quiet", kind="regression"), TaskSpec("noisy", kind="regression")]
    shared = nn.Linear(4, 1)
    strategy = build_weighting("uncertainty", tasks)
    opt = torch.optim.Adam([*shared.parameters(), *strategy.parameters()], lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        pred = shared(x).squeeze(-1)
        weights = strategy.backward({t: ((pred - y) ** 2).mean() for t, y in targets.items()}, list(shared.parameters()))
        opt.step()
    # both tasks share the same predictor, whose best fit leaves each task's own noise: 0.01 and 1.0
    variance = torch.exp(strategy.log_variance.detach())
    assert variance[0] < 0.05 and 0.7 < variance[1] < 1.4
    assert weights["quiet"] > 10 * weights["noisy"]


# ---- GradNorm ----------------------------------------------------------------------------------------------------------
def gradnorm_problem(seed=0):
    """A shared layer and two heads; task b's loss is 10x task a's, so its gradients dominate at equal weights."""
    torch.manual_seed(seed)
    x = torch.randn(256, 6)
    ya, yb = x @ torch.randn(6), x @ torch.randn(6)
    shared, head_a, head_b = nn.Linear(6, 8), nn.Linear(8, 1), nn.Linear(8, 1)

    def losses():
        h = torch.relu(shared(x))
        return {"a": ((head_a(h).squeeze(-1) - ya) ** 2).mean(), "b": 10 * ((head_b(h).squeeze(-1) - yb) ** 2).mean()}

    return shared, [*shared.parameters(), *head_a.parameters(), *head_b.parameters()], losses


def weighted_norms(strategy, shared, losses):
    out = []
    for k, t in enumerate(("a", "b")):
        grads = torch.autograd.grad(losses[t], list(shared.parameters()), retain_graph=True)
        out.append(float(strategy.weights.detach()[k]) * float(torch.cat([g.reshape(-1) for g in grads]).norm()))
    return out


@pytest.mark.parametrize("layer", ["all", "last"])
def test_gradnorm_equalises_gradient_norms_scaled_by_training_rates(layer):
    shared, params, make_losses = gradnorm_problem()
    alpha = 1.0
    strategy = build_weighting("gradnorm", TWO_TASKS, alpha=alpha, layer=layer)
    g_start = weighted_norms(strategy, shared, make_losses())
    model_opt = torch.optim.Adam(params, lr=0.01)
    weight_opt = torch.optim.Adam(strategy.parameters(), lr=0.02)
    for _ in range(300):
        model_opt.zero_grad()
        weight_opt.zero_grad()
        losses = make_losses()
        weights = strategy.backward(losses, list(shared.parameters()))
        model_opt.step()
        weight_opt.step()
    assert sum(weights.values()) == pytest.approx(2.0, rel=1e-4)  # renormalised to the number of tasks
    assert weights["a"] > weights["b"]
    losses = make_losses()
    g = weighted_norms(strategy, shared, losses)
    rates = [float(losses[t].detach()) / float(strategy.initial_losses[k]) for k, t in enumerate(("a", "b"))]
    target_log_ratio = alpha * math.log(rates[0] / rates[1])
    start_gap = abs(math.log(g_start[0] / g_start[1]))  # equal weights: the 10x loss dominates
    end_gap = abs(math.log(g[0] / g[1]) - target_log_ratio)
    assert start_gap > 1.0 and end_gap < 0.25 * start_gap, (start_gap, end_gap)


def test_gradnorm_remembers_the_initial_losses_in_its_state_dict():
    shared, _, make_losses = gradnorm_problem()
    strategy = build_weighting("gradnorm", TWO_TASKS)
    strategy.backward(make_losses(), list(shared.parameters()))
    restored = build_weighting("gradnorm", TWO_TASKS)
    restored.load_state_dict(strategy.state_dict())
    torch.testing.assert_close(restored.initial_losses, strategy.initial_losses)
    assert not torch.isnan(restored.initial_losses).any()


# ---- PCGrad -----------------------------------------------------------------------------------------------------------------
def test_pcgrad_projects_away_conflicting_components():
    g1, g2 = torch.tensor([1.0, 0.5, 0.0]), torch.tensor([-1.0, 1.0, 0.5])
    assert torch.dot(g1, g2) < 0
    theta = nn.Parameter(torch.zeros(3))
    private_a = nn.Parameter(torch.tensor(2.0))
    losses = {"a": torch.dot(g1, theta) + private_a * 3.0 + (private_a * theta).sum() * 0, "b": torch.dot(g2, theta)}
    strategy = build_weighting("pcgrad", TWO_TASKS)
    strategy.backward(losses, [theta])
    p1 = g1 - torch.dot(g1, g2) / g2.pow(2).sum() * g2
    p2 = g2 - torch.dot(g2, g1) / g1.pow(2).sum() * g1
    torch.testing.assert_close(theta.grad, p1 + p2)
    assert torch.dot(p1, g2).abs() < 1e-6 and torch.dot(p2, g1).abs() < 1e-6  # conflict removed
    assert torch.dot(p1, p2) >= 0  # the projected gradients no longer conflict with each other
    assert float(private_a.grad) == pytest.approx(3.0)  # a private parameter gets its own task's gradient


def test_pcgrad_leaves_agreeing_gradients_alone_and_projects_every_conflict():
    strategy = build_weighting("pcgrad", [TaskSpec("a"), TaskSpec("b"), TaskSpec("c")], seed=3)
    agreeing = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 2.0])]
    for got, g in zip(strategy.project(agreeing), agreeing):
        torch.testing.assert_close(got, g)
    torch.manual_seed(0)
    grads = [torch.randn(5) for _ in range(3)]
    grads[1] = -grads[0] + 0.1 * torch.randn(5)
    projected = strategy.project(grads)
    for i, p in enumerate(projected):
        for j, g in enumerate(grads):
            if i != j and torch.dot(grads[i], g) < 0:
                # each conflicting component is removed in turn, so the last one projected is exactly orthogonal,
                # and in any order the result no longer points against the other tasks by more than it did
                assert torch.dot(p, g) > torch.dot(grads[i], g)


def test_pcgrad_order_is_seeded_and_resumable():
    tasks = [TaskSpec(t) for t in "abcd"]
    torch.manual_seed(1)
    grads = [torch.randn(6) for _ in range(4)]
    a = build_weighting("pcgrad", tasks, seed=5)
    a.project(grads)
    saved = a.extra_state()
    b = build_weighting("pcgrad", tasks, seed=99)
    b.load_extra_state(saved)
    for x, y in zip(a.project(grads), b.project(grads)):
        torch.testing.assert_close(x, y)


# ---- DWA --------------------------------------------------------------------------------------------------------------------
def test_dwa_weighs_up_the_task_whose_loss_fell_less():
    strategy = build_weighting("dwa", TWO_TASKS, temperature=2.0)
    assert strategy.current_weights() == {"a": 1.0, "b": 1.0}
    strategy.epoch_end({"a": 1.0, "b": 1.0})
    assert strategy.current_weights() == {"a": 1.0, "b": 1.0}  # equal for the first two epochs
    strategy.epoch_end({"a": 0.5, "b": 0.9})
    w = strategy.current_weights()
    assert w["b"] > w["a"] and w["a"] + w["b"] == pytest.approx(2.0)
    expected_b = 2 * math.exp(0.9 / 2) / (math.exp(0.5 / 2) + math.exp(0.9 / 2))
    assert w["b"] == pytest.approx(expected_b)
    hot = build_weighting("dwa", TWO_TASKS, temperature=100.0)
    hot.load_extra_state(strategy.extra_state())
    assert abs(hot.current_weights()["b"] - 1.0) < 0.01  # a high temperature approaches equal weights
    a = torch.tensor(1.0, requires_grad=True)
    weights = strategy.backward({"a": a * 2.0, "b": a * 3.0}, [])
    assert float(a.grad) == pytest.approx(2.0 * weights["a"] + 3.0 * weights["b"])


# ---- through the trainer, with any model -------------------------------------------------------------------------------------
MODELS_UNDER_TEST = ["mmoe"] + (["onerank"] if "onerank" in model_names() else [])


def run_config(model, weighting, **train):
    options = dict(epochs=1, batch_size=128, progress=False, tensorboard=False, patience=5, seed=3)
    options.update(train)
    return RunConfig(dataset="tiny", model=model, weighting=weighting, train=TrainConfig(**options))


@pytest.mark.parametrize("model", MODELS_UNDER_TEST)
@pytest.mark.parametrize("weighting", ADAPTIVE + ["fixed", "equal"])
def test_every_strategy_trains_every_model(tiny_dataset, model, weighting):
    result = api.train(run_config(model, weighting), dataset=tiny_dataset)
    assert all(math.isfinite(m["logloss"]) for m in result["test"].values())


@pytest.mark.parametrize("weighting", ADAPTIVE)
def test_strategy_state_survives_a_crash_and_resume(tiny_dataset, tmp_path, weighting):
    config = run_config("mmoe", weighting, epochs=4, checkpoint_every=4)
    straight = api.train(config, out_dir=tmp_path / "straight", dataset=tiny_dataset)
    out = tmp_path / "crashed"
    with pytest.raises(TrainingInterrupted):
        api.train(config, out_dir=out, dataset=tiny_dataset, stop_after_steps=21)  # mid epoch 3 (8 steps/epoch)
    resumed = api.train(config, out_dir=out, dataset=tiny_dataset, resume=True)
    for task, metrics in straight["test"].items():
        assert resumed["test"][task]["auc"] == pytest.approx(metrics["auc"], abs=1e-6)
    a, b = ckpt.load(tmp_path / "straight" / "last.pt"), ckpt.load(out / "last.pt")
    for key, value in a["weighting"].items():
        torch.testing.assert_close(value, b["weighting"][key])
    if weighting == "dwa":
        assert a["weighting_extra"] == b["weighting_extra"] and len(a["weighting_extra"]["history"]) == 2

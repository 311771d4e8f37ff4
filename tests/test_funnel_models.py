"""Funnel models: ESMM (entire-space pCTCVR) and AITM (attention transfer + calibrator), and the auxiliary-loss hook."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onerank.data.schema import SchemaError, TaskSpec
from onerank.features.space import FeatureSpace
from onerank.models import build_model
from onerank.models.aitm import AttentionTransfer
from onerank.models.esmm import product_logit
from onerank.objectives.losses import MultiTaskObjective
import zoo_helpers
from zoo_helpers import REAL_DATA_EPOCHS, real_dataset, synthetic_dataset, train_on_tiny_dataset, train_tiny

MODELS = ["esmm", "aitm"]
SMALL = dict(embedding_dim=8, attention_hidden=(8,), tower_hidden=(16, 8))


def first_batch(dataset, size=64):
    return zoo_helpers.first_batch(dataset, size)


def build(name, dataset, **options):
    return build_model(name, FeatureSpace.from_dataset(dataset), {**SMALL, **options})


@pytest.mark.parametrize("model", MODELS)
def test_tiny_config_trains_on_synthetic(model):
    train_tiny(model)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dataset", ["kuairand", "census"])
def test_trains_on_real_data(model, dataset):
    train_tiny(model, dataset=real_dataset(dataset), epochs=REAL_DATA_EPOCHS)


@pytest.mark.parametrize("model", MODELS)
def test_learns_the_hand_made_dataset_with_a_task_space(model, tiny_dataset):
    # conftest's "buy" exists only where click = 1
    result = train_on_tiny_dataset(model, tiny_dataset)
    assert result["test"]["click"]["auc"] > 0.6 and result["test"]["buy"]["auc"] > 0.55


# ---- ESMM ---------------------------------------------------------------------------------------------------------
def test_product_logit_is_the_log_odds_of_the_product_even_at_extremes():
    rng = np.random.default_rng(0)
    for scale in (1.0, 8.0, 60.0):
        steps = rng.normal(0.0, scale, size=(3, 200))
        p = np.prod(1.0 / (1.0 + np.exp(-steps)), axis=0)
        with np.errstate(divide="ignore"):
            reference = np.log(p) - np.log1p(-p)
        got = product_logit([torch.tensor(s, dtype=torch.float32) for s in steps]).double().numpy()
        assert np.isfinite(got).all()
        finite = np.isfinite(reference) & (np.abs(reference) < 30)  # where float64 itself is still exact
        np.testing.assert_allclose(got[finite], reference[finite], rtol=1e-4, atol=1e-4)
    one = torch.tensor([-3.0, 0.0, 7.0])
    assert torch.equal(product_logit([one]), one)
    # p close to 1 (both steps certain) still has a finite, large logit and a finite gradient
    big = torch.tensor([40.0, 40.0], requires_grad=True)
    out = product_logit([big[:1], big[1:]])
    out.backward()
    assert torch.isfinite(out).all() and float(out.detach()) > 30 and torch.isfinite(big.grad).all()


def test_esmm_returns_pctr_and_pctcvr_and_names_the_funnel_probabilities():
    ds = synthetic_dataset("esmm")
    model = build("esmm", ds)
    batch = first_batch(ds)
    steps = model.step_logits(batch)
    out = model(batch)
    probs = model.funnel_probabilities(batch)
    torch.testing.assert_close(out["click"], steps["click"])
    torch.testing.assert_close(torch.sigmoid(out["cart"]), torch.sigmoid(steps["click"]) * torch.sigmoid(steps["cart"]))
    torch.testing.assert_close(probs["pCTR"], torch.sigmoid(out["click"]))
    torch.testing.assert_close(probs["pCVR"], torch.sigmoid(steps["cart"]))
    torch.testing.assert_close(probs["pCTCVR"], probs["pCTR"] * probs["pCVR"])
    torch.testing.assert_close(probs["pCTCVR"], torch.sigmoid(out["cart"]))
    torch.testing.assert_close(probs["p(order)"], probs["p(cart)"] * probs["p(order|cart)"])
    torch.testing.assert_close(probs["p(order)"], torch.sigmoid(out["order"]))
    assert set(probs) == {"p(click)", "p(cart)", "p(order)", "p(cart|click)", "p(order|cart)", "pCTR", "pCVR", "pCTCVR"}


def test_esmm_trains_the_cvr_tower_on_unclicked_impressions():
    ds = synthetic_dataset("esmm")
    model = build("esmm", ds)
    batch = first_batch(ds, 256)
    keep = torch.nonzero(batch.labels["click"] == 0).flatten()
    unclicked = dataclasses.replace(
        batch,
        categorical={k: v[keep] for k, v in batch.categorical.items()},
        dense={k: v[keep] for k, v in batch.dense.items()},
        histories={s: {k: v[keep] for k, v in f.items()} for s, f in batch.histories.items()},
        labels={k: v[keep] for k, v in batch.labels.items()},
        label_mask={k: v[keep] for k, v in batch.label_mask.items()},
        user=batch.user[keep], request=None,
    )
    assert unclicked.size > 0 and float(unclicked.labels["cart"].sum()) == 0
    losses = MultiTaskObjective(ds.schema.tasks)(model(unclicked), unclicked)
    losses["cart"].backward()
    cvr_tower = model.towers.towers["cart"]
    assert any(float(p.grad.abs().max()) > 0 for p in cvr_tower.parameters())


def test_esmm_with_a_conditional_task_scores_pcvr_and_adds_the_entire_space_term(tiny_dataset):
    model = build("esmm", tiny_dataset)
    batch = first_batch(tiny_dataset)
    objective = MultiTaskObjective(tiny_dataset.schema.tasks)
    with torch.no_grad():
        steps = model.step_logits(batch)
        out = model(batch)
        aux = model.auxiliary_losses(batch, out)
        plain, with_aux = objective(out, batch), objective(out, batch, aux)
    torch.testing.assert_close(out["buy"], steps["buy"])  # "buy" labels exist only on clicks: p(buy | click)
    assert set(aux) == {"buy/entire_space"}
    click, buy = batch.labels["click"], torch.where(batch.label_mask["buy"], batch.labels["buy"], 0.0)
    joint = torch.logit(torch.sigmoid(steps["click"]).double() * torch.sigmoid(steps["buy"]).double())
    expected = F.binary_cross_entropy_with_logits(joint, (click * buy).double())
    assert float(aux["buy/entire_space"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(with_aux["buy"]) == pytest.approx(float(plain["buy"] + aux["buy/entire_space"]))
    assert float(with_aux["click"]) == pytest.approx(float(plain["click"]))


def test_funnel_option_orders_the_steps_and_is_checked(tiny_dataset):
    ds = synthetic_dataset("esmm")
    model = build("esmm", ds, funnel=("click", "order"))
    batch = first_batch(ds)
    steps, out = model.step_logits(batch), model(batch)
    torch.testing.assert_close(out["cart"], steps["cart"])  # outside the funnel: its own tower
    torch.testing.assert_close(out["order"], product_logit([steps["click"], steps["order"]]))
    with pytest.raises(SchemaError, match="unknown tasks"):
        build("esmm", ds, funnel=("click", "purchase"))
    with pytest.raises(SchemaError, match="repeats"):
        build("aitm", ds, funnel=("click", "click"))
    with pytest.raises(SchemaError, match="not an earlier step"):
        build("esmm", tiny_dataset, funnel=("buy", "click"))
    schema = dataclasses.replace(ds.schema, tasks=[TaskSpec("click"), TaskSpec("cart", kind="regression")])
    space = FeatureSpace(schema=schema, vocab_sizes=ds.vocab_sizes)
    with pytest.raises(SchemaError, match="must be binary"):
        build_model("aitm", space, {"funnel": ("click", "cart")})


# ---- AITM -----------------------------------------------------------------------------------------------------------
def test_aitm_calibrator_penalises_a_later_step_likelier_than_the_earlier_one():
    ds = synthetic_dataset("aitm")
    model = build("aitm", ds, calibrator_weight=0.6)
    batch = first_batch(ds)
    logits = {"click": torch.tensor([0.0, 2.0, -1.0]), "cart": torch.tensor([1.0, 0.0, -1.0]),
              "order": torch.tensor([-5.0, -5.0, 3.0])}
    aux = model.auxiliary_losses(batch, logits)
    assert set(aux) == {"cart/calibrator", "order/calibrator"}
    expected_cart = 0.6 * (torch.sigmoid(torch.tensor(1.0)) - 0.5) / 3  # only the first row violates
    assert float(aux["cart/calibrator"]) == pytest.approx(float(expected_cart))
    expected_order = 0.6 * (torch.sigmoid(torch.tensor(3.0)) - torch.sigmoid(torch.tensor(-1.0))) / 3
    assert float(aux["order/calibrator"]) == pytest.approx(float(expected_order))
    ordered = {t: torch.tensor([2.0, 1.0, 0.0]) - i for i, t in enumerate(("click", "cart", "order"))}
    assert all(float(v) == 0 for v in model.auxiliary_losses(batch, ordered).values())
    assert build("aitm", ds, calibrator_weight=0.0).auxiliary_losses(batch, logits) == {}


def test_aitm_calibrator_skips_steps_over_different_rows(tiny_dataset):
    # "buy" is conditional on click: p(buy | click) may exceed p(click)
    model = build("aitm", tiny_dataset)
    batch = first_batch(tiny_dataset)
    assert model.auxiliary_losses(batch, model(batch)) == {}


@pytest.mark.parametrize("detach", [False, True])
def test_aitm_transfers_information_from_the_previous_step(detach):
    ds = synthetic_dataset("aitm")
    model = build("aitm", ds, detach_transfer=detach)
    batch = first_batch(ds)
    model(batch)["cart"].sum().backward()
    click_tower_grad = sum(float(p.grad.abs().sum()) for p in model.towers["click"].parameters() if p.grad is not None)
    assert (click_tower_grad == 0) == detach
    before = model(batch)["cart"].detach()
    with torch.no_grad():
        for p in model.towers["click"].parameters():
            p.add_(0.5)
    assert not torch.allclose(model(batch)["cart"], before)  # the forward pass always transfers


def test_attention_transfer_mixes_the_two_vectors_convexly():
    unit = AttentionTransfer(4)
    with torch.no_grad():
        unit.query.weight.zero_()  # equal scores: the output is the mean of the two values
        unit.value.weight.copy_(torch.eye(4))
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(unit(a, b), (a + b) / 2)


def test_auxiliary_losses_must_name_a_task(tiny_dataset):
    objective = MultiTaskObjective(tiny_dataset.schema.tasks)
    batch = first_batch(tiny_dataset)
    logits = {t: torch.zeros(batch.size, requires_grad=True) for t in ("click", "buy")}
    with pytest.raises(ValueError, match="'<task>/<name>'"):
        objective(logits, batch, {"calibrator": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="'<task>/<name>'"):
        objective(logits, batch, {"order/calibrator": torch.tensor(1.0)})

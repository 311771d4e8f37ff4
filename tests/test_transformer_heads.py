"""The Transformer encoder baselines: unified tokens, pre-LN Transformer, pooling, then MMoE / PLE heads."""

from __future__ import annotations

import pytest
import torch

from onerank.features.space import FeatureSpace
from onerank.models import build_model
import zoo_helpers
from zoo_helpers import REAL_DATA_EPOCHS, real_dataset, train_on_tiny_dataset, train_tiny

MODELS = ["transformer_mmoe", "transformer_ple"]
SMALL = dict(embedding_dim=8, d_model=16, num_layers=1, num_heads=2, ff_dim=16, expert_hidden=(8,), tower_hidden=(8,))


def first_batch(dataset, size=32):
    return zoo_helpers.first_batch(dataset, size)


@pytest.mark.parametrize("model", MODELS)
def test_tiny_config_trains_on_synthetic(model):
    train_tiny(model)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dataset", ["kuairand", "census"])
def test_trains_on_real_data(model, dataset):
    # Census-Income has neither item fields nor histories: only field tokens
    train_tiny(model, dataset=real_dataset(dataset), epochs=REAL_DATA_EPOCHS)


@pytest.mark.parametrize("model", MODELS)
def test_learns_the_hand_made_dataset(model, tiny_dataset):
    assert train_on_tiny_dataset(model, tiny_dataset)["test"]["click"]["auc"] > 0.6


def test_a_standard_pre_ln_transformer_reads_one_token_per_field_candidate_and_history_item(tiny_dataset):
    model = build_model("transformer_mmoe", FeatureSpace.from_dataset(tiny_dataset), SMALL)
    encoder = model.encoder.encoder
    assert isinstance(encoder, torch.nn.TransformerEncoder)
    assert all(layer.norm_first for layer in encoder.layers) and isinstance(encoder.norm, torch.nn.LayerNorm)
    seen = {}
    encoder.register_forward_hook(lambda module, args, kwargs, out: seen.update(x=args[0]), with_kwargs=True)
    batch = first_batch(tiny_dataset)
    model(batch)
    space = model.space
    # context fields (user_id, hour) + dense (price) + the candidate + 6 history slots
    assert seen["x"].shape == (batch.size, len(space.context_fields) + len(space.dense_fields) + 1 + 6, 16)


@pytest.mark.parametrize("pooling", ["mean", "cls", "candidate"])
def test_padded_history_slots_are_ignored(tiny_dataset, pooling):
    model = build_model("transformer_ple", FeatureSpace.from_dataset(tiny_dataset), {**SMALL, "pooling": pooling})
    model.eval()
    batch = first_batch(tiny_dataset)
    before = model(batch)
    codes = batch.histories["clicked"]["item_id"]
    empty = codes == 0
    assert empty.any()
    # an item id in an empty slot would change the output if the slot were attended to; the mask comes from the
    # item id, so only the side fields of padded slots can be altered to probe it
    batch.histories["clicked"]["category"] = torch.where(empty, torch.full_like(codes, 3), batch.histories["clicked"]["category"])
    after = model(batch)
    for t in before:
        torch.testing.assert_close(before[t], after[t])


def test_empty_histories_and_no_item_fields(tiny_dataset):
    model = build_model("transformer_mmoe", FeatureSpace.from_dataset(tiny_dataset), SMALL)
    batch = first_batch(tiny_dataset)
    for codes in batch.histories.values():
        for field in codes:
            codes[field] = torch.zeros_like(codes[field])
    out = model(batch)
    sum(o.sum() for o in out.values()).backward()
    assert all(torch.isfinite(o).all() for o in out.values())
    census = real_dataset("census")
    with pytest.raises(ValueError, match="needs item fields"):
        build_model("transformer_mmoe", FeatureSpace.from_dataset(census), {**SMALL, "pooling": "candidate"})
    with pytest.raises(ValueError, match="pooling must be one of"):
        build_model("transformer_ple", FeatureSpace.from_dataset(tiny_dataset), {**SMALL, "pooling": "max"})

"""Checkpoints of every earlier format load with today's code, without running code from them, and score as the code
that wrote them did (the files: tests/data/legacy_checkpoints, written by its generate.py from those commits)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from onerank import api
from onerank.data.batching import Batch
from onerank.features.space import FeatureSpace
from onerank.models.base import model_class, model_names
from onerank.training import checkpoint as ckpt

from conftest import tiny_schema

LEGACY = Path(__file__).parent / "data" / "legacy_checkpoints"
FORMATS = sorted(p.name for p in LEGACY.iterdir() if p.is_dir())
SPACE = FeatureSpace(tiny_schema(), {f.name: 5 for f in tiny_schema().categorical})
CASES = [(f, p.name.split(".")[0]) for f in FORMATS for p in sorted((LEGACY / f).glob("*.expected.pt"))]


def test_every_earlier_format_is_there():
    assert {"headerless", "format1_pre_gated", "format1_pre_task_item", "format1"} <= set(FORMATS)


@pytest.mark.parametrize("fmt,model", CASES)
def test_an_earlier_checkpoint_scores_as_the_code_that_wrote_it(fmt, model):
    loaded, meta = api.load_checkpoint(LEGACY / fmt / f"{model}.pt")
    expected = torch.load(LEGACY / fmt / f"{model}.expected.pt", weights_only=True)
    batch = Batch(categorical=expected["categorical"], dense=expected["dense"], histories=expected["histories"],
                  labels={}, label_mask={}, user=expected["user"], request=expected["request"])
    with torch.no_grad():
        logits = loaded(batch)
    assert set(logits) == set(expected["logits"])
    for task, want in expected["logits"].items():
        torch.testing.assert_close(logits[task], want, atol=1e-5, rtol=1e-5)


def test_an_option_missing_from_an_old_checkpoint_takes_its_old_behaviour():
    # OneRank's task tokens entered the encoder bare before task_token_input existed; today's default adds c_i
    state = ckpt.load(LEGACY / "headerless" / "onerank.pt")
    assert "task_token_input" not in state["meta"]["model_config"]
    model, _ = api.load_checkpoint(LEGACY / "headerless" / "onerank.pt")
    assert model.config.task_token_input == "template" and model.config.experimental.cross_task_block == "post_norm"


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_option_added_since_an_earlier_format_has_its_old_default(fmt):
    earlier = json.loads((LEGACY / fmt / "options.json").read_text())
    for name in model_names():
        if name not in earlier:
            continue  # a model that did not exist then has no checkpoint of that format
        cls = model_class(name)
        added = {f.name for f in fields(cls.Config)} - set(earlier[name])
        # what a checkpoint that saved none of today's options reads back: added_options, and what a model maps
        # from its older option names (OneRank's experimental block)
        restored = cls.saved_options({}, SPACE)
        missing = sorted(added - set(restored))
        assert not missing, f"{name}: options {missing} were added since {fmt} but have no old default in added_options"


def test_an_earlier_resumable_state_loads_as_plain_data():
    state = ckpt.load(LEGACY / "format1" / "onerank.last.pt", kind="resume")
    assert state["format_version"] == 1 and state["optimizers"]
    ckpt.set_rng_state(state["rng"])  # format 1 kept numpy's RNG state as numpy's tuple


def test_todays_checkpoint_loads_with_torch_defaults_alone(tmp_path):
    """What onerank writes now is plain data: torch.load's default (weights_only=True) reads it, no allow-list."""
    model, meta = api.load_checkpoint(LEGACY / "format1" / "onerank.pt")
    ckpt.save_atomic({**ckpt.header("model"), "model": model.state_dict(), "meta": meta, "rng": ckpt.rng_state()},
                     tmp_path / "checkpoint.pt")
    plain = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert plain["format_version"] == ckpt.FORMAT_VERSION == 2
    assert all(isinstance(v, torch.Tensor) for v in plain["meta"]["item_table"].values())
    again, meta_again = api.load_checkpoint(tmp_path / "checkpoint.pt")
    assert meta_again["item_table"].keys() == meta["item_table"].keys()
    assert all((meta_again["item_table"][k] == meta["item_table"][k]).all() for k in meta["item_table"])

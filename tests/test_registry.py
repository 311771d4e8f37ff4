"""One plug-in pattern for datasets, models, weightings and objective terms (``resources.Registry``): a module map
whose names are listed without importing any plug-in, each name resolving to what the map says, no module that adds
itself to a registry by being imported, and a user's plug-in joining by one call."""

from __future__ import annotations

import subprocess
import sys

import pytest

from onerank import cli
from onerank.data.registry import DATASETS
from onerank.data.schema import SchemaError, TaskSpec
from onerank.models.base import MODELS, MultiTaskModel, build_model, model_class, register_model
from onerank.objectives.losses import OBJECTIVE_TERMS
from onerank.objectives.weighting import WEIGHTINGS, WeightingStrategy, build_weighting

REGISTRIES = {"dataset": DATASETS, "model": MODELS, "weighting": WEIGHTINGS, "objective term": OBJECTIVE_TERMS}


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_listing_the_names_imports_no_plugin_and_importing_every_module_registers_nothing():
    out = run_python(
        "import sys, pkgutil, importlib, onerank\n"
        "from onerank.data.registry import DATASETS\n"
        "from onerank.models.base import MODELS\n"
        "from onerank.objectives.weighting import WEIGHTINGS\n"
        "from onerank.objectives.losses import OBJECTIVE_TERMS\n"
        "registries = (DATASETS, MODELS, WEIGHTINGS, OBJECTIVE_TERMS)\n"
        "before = [r.names() for r in registries]\n"
        "plugins = ('onerank.models.onerank', 'onerank.models.mmoe', 'onerank.objectives.strategies',\n"
        "           'onerank.data.kuairand', 'onerank.data.synthetic')\n"
        "print(sorted(m for m in plugins if m in sys.modules))\n"
        "for info in pkgutil.walk_packages(onerank.__path__, 'onerank.'):\n"
        "    importlib.import_module(info.name)\n"
        "print([r.names() for r in registries] == before)\n"
    )
    imported, unchanged = out.splitlines()
    assert imported == "[]"  # the names come from the map alone
    assert unchanged == "True"  # no module adds itself to a registry on import


@pytest.mark.parametrize("kind", REGISTRIES)
def test_every_name_resolves_to_a_plugin_of_its_family(kind):
    registry = REGISTRIES[kind]
    assert registry.names()
    for name in registry.names():
        plugin = registry.get(name)
        if kind == "model":
            assert issubclass(plugin, MultiTaskModel)
        elif kind == "weighting":
            assert issubclass(plugin, WeightingStrategy) and plugin.name == name
        else:
            assert callable(plugin)
    with pytest.raises(SchemaError if kind != "objective term" else KeyError, match=f"unknown {kind} 'nope'"):
        registry.get("nope")


def test_the_cli_lists_the_registries(capsys):
    for command, registry in (("models", MODELS), ("weightings", WEIGHTINGS), ("datasets", DATASETS)):
        assert cli.main([command]) == 0
        assert capsys.readouterr().out.split() == registry.names()


def test_a_users_plugin_joins_by_one_call(tiny_dataset):
    from onerank.features.space import FeatureSpace

    register_model("my_mmoe", "onerank.models.mmoe:MMoE")
    try:
        assert "my_mmoe" in MODELS.names() and model_class("my_mmoe") is model_class("mmoe")
        model = build_model("my_mmoe", FeatureSpace.from_dataset(tiny_dataset), {"num_experts": 2})
        assert model.config.num_experts == 2
        assert build_weighting("equal", [TaskSpec("a"), TaskSpec("b")]).base_weights == {"a": 1.0, "b": 1.0}
    finally:
        MODELS._entries.pop("my_mmoe")
    with pytest.raises(SchemaError, match="unknown model 'my_mmoe'; available: aitm, dtrn"):
        model_class("my_mmoe")

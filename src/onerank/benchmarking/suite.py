"""Benchmark suites: one YAML file per suite under ``benchmarks/suites/``, loaded into a ``Suite``.

A suite names one dataset (optionally swept over one loader option, e.g. the synthetic ``task_correlation``), the
models, the trainer settings every model shares, a small tuning grid (the same for every model) and, per model, an
optional grid of its own (``model_tuning``: model options such as OneRank's ``dim``, or trainer settings), the number
of seeds, the proposed model and its ablations. An ablation changes a model's options, its objective (e.g. adds
cross-task distillation), or both, and is compared with that model's own row. The SHA-256 of the YAML file is stored
with the results, so a result can be traced to the exact suite definition that produced it. The format, key by key:
docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from onerank.data.schema import SchemaError, read_yaml_mapping, typed
from onerank.resources import shipped
from onerank.training.checkpoint import file_sha256
from onerank.training.config import RunConfig, TrainConfig

DEFAULT_SUITES_DIR = Path("benchmarks/suites")
TRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
# set per run (seed) or shared by every run so that validation scores compare (monitor): never a tuning axis
UNTUNABLE = frozenset({"seed", "monitor"})


def split_point(point: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A tuning point as (trainer settings, model options): a key that is a TrainConfig field is a trainer setting,
    any other key a model option (the suite parser has checked that it is one)."""
    train = {k: v for k, v in point.items() if k in TRAIN_FIELDS}
    return train, {k: v for k, v in point.items() if k not in TRAIN_FIELDS}


@dataclass
class ModelEntry:
    label: str  # name in tables and plots (the model name, or e.g. "onerank[cross_task=none]" for an ablation)
    model: str
    options: dict[str, Any] = field(default_factory=dict)  # the suite's model_options, with an ablation's own on top
    ablation: bool = False
    changed: dict[str, Any] = field(default_factory=dict)  # an ablation's own options: they win over tuned ones
    objective: dict[str, Any] = field(default_factory=dict)  # ObjectiveConfig fields over the suite's objective


@dataclass
class Suite:
    name: str
    dataset: str
    path: Path
    sha256: str
    description: str = ""
    data_dir: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    variant_option: str | None = None  # a loader option swept over `variant_values` (None: one variant)
    variant_values: list[Any] = field(default_factory=lambda: [None])
    models: list[ModelEntry] = field(default_factory=list)
    proposed: str = "onerank"
    reference: str = "single_task"  # the single-task reference of the negative-transfer table
    seeds: int = 3
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields shared by every run
    tuning: dict[str, list[Any]] = field(default_factory=dict)  # TrainConfig field -> values, chosen with seed 0
    # model label -> {model option or TrainConfig field -> values}: that model's grid is the product with `tuning`
    model_tuning: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    # "product": a model with model_tuning runs every point of its grid; "coordinate": its own grid first (at the first
    # value of each suite-wide axis), then the suite-wide grid at its chosen own values (fewer runs, no interactions)
    tuning_search: str = "product"
    timings: bool = True  # False: the runs shared the machine, the report publishes no throughputs
    objective: dict[str, Any] = field(default_factory=dict)
    gradient_diagnostics: bool = False
    bootstrap: int = 1000  # resamples of the paired bootstrap

    def entries(self, only: list[str] | None = None) -> list[ModelEntry]:
        """The suite's model entries, restricted to ``only`` (model names or labels) when given."""
        if not only:
            return list(self.models)
        known = {e.label for e in self.models} | {e.model for e in self.models}
        unknown = sorted(set(only) - known)
        if unknown:
            raise SchemaError(f"suite {self.name!r} has no model {unknown}; it has {[e.label for e in self.models]}")
        return [e for e in self.models if e.label in only or e.model in only]

    def grid(self, entry: ModelEntry) -> list[dict[str, Any]]:
        """The points a model is tuned over (seed 0, chosen on validation): the product of the suite's grid and the
        model's own (``model_tuning``), keys sorted. An ablation is not tuned: its points are its base row's, less the
        options the ablation sets itself."""
        if entry.ablation:
            base = next((e for e in self.models if e.label == ablation_base(self, entry)), None)
            points = [ablation_point(entry, p) for p in (self.grid(base) if base else _product(self.tuning))]
            return [p for i, p in enumerate(points) if p not in points[:i]]
        return _product({**self.tuning, **self.model_tuning.get(entry.label, {})})

    def _searches_by_coordinate(self, entry: ModelEntry) -> bool:
        return self.tuning_search == "coordinate" and not entry.ablation and entry.label in self.model_tuning

    def first_stage(self, entry: ModelEntry) -> list[dict[str, Any]]:
        """The points trained before any choice: the whole ``grid``, or with coordinate search the model's own grid
        at the first value of every suite-wide axis."""
        if not self._searches_by_coordinate(entry):
            return self.grid(entry)
        return _product({**{k: values[:1] for k, values in self.tuning.items()}, **self.model_tuning[entry.label]})

    def second_stage(self, entry: ModelEntry, chosen: dict[str, Any]) -> list[dict[str, Any]]:
        """With coordinate search, the suite-wide grid at the model's own values of ``chosen`` (the first stage's
        choice, which is one of these points); nothing otherwise."""
        if not self._searches_by_coordinate(entry):
            return []
        return _product({**self.tuning, **{k: [chosen[k]] for k in self.model_tuning[entry.label]}})

    def points_searched(self, entry: ModelEntry) -> int:
        """How many points a tuned model trains at seed 0."""
        if not self._searches_by_coordinate(entry):
            return len(self.grid(entry))
        return len(self.first_stage(entry)) + len(_product(self.tuning)) - 1


def _product(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, as {key: value} with the keys sorted (one point, {}, for no axes)."""
    keys = sorted(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def ablation_point(entry: ModelEntry, point: dict[str, Any]) -> dict[str, Any]:
    """An ablation's share of its base row's tuning point: the base's values except the model options the ablation
    sets itself (those are the ablation), so that its run keys name what it really trains."""
    return {k: v for k, v in point.items() if k in TRAIN_FIELDS or k not in entry.changed}


def ablation_base(suite: "Suite", entry: ModelEntry) -> str:
    """The row an ablation is compared with (and takes its tuned values from): its model's own entry when the suite
    lists that model, else the proposed model."""
    tuned = {e.label for e in suite.models if not e.ablation}
    return entry.model if entry.model in tuned else suite.proposed


def suite_path(name: str, suites_dir: str | Path = DEFAULT_SUITES_DIR) -> Path:
    """A suite by name (``benchmarks/suites/NAME.yaml``) or by path to a YAML file."""
    as_path = Path(name)
    if as_path.suffix in (".yaml", ".yml") and as_path.exists():
        return as_path
    path = Path(suites_dir) / f"{name}.yaml"
    if not path.exists() and Path(suites_dir) == DEFAULT_SUITES_DIR:
        path = shipped("suites") / f"{name}.yaml"  # outside a checkout: the suites installed with onerank
    if not path.exists():
        available = sorted(p.stem for p in Path(suites_dir).glob("*.yaml")) if Path(suites_dir).is_dir() else []
        raise FileNotFoundError(f"no benchmark suite {name!r}: {path} does not exist (available: {available})")
    return path


def load_suite(name: str, suites_dir: str | Path = DEFAULT_SUITES_DIR) -> Suite:
    path = suite_path(name, suites_dir)
    return parse_suite(read_yaml_mapping(path), path)


SUITE_KEYS = {
    "name", "description", "dataset", "data_dir", "dataset_options", "variants", "models", "model_options",
    "ablations", "proposed", "reference", "seeds", "train", "tuning", "model_tuning", "objective",
    "gradient_diagnostics", "bootstrap", "timings", "tuning_search",
}


def _check_axis(path: Path, where: str, key: str, values: Any, model: str | None = None,
                options: dict[str, Any] | None = None) -> None:
    """One tuning axis: a non-empty list of distinct values, each a valid trainer setting (``key`` a TrainConfig
    field) or a valid option of ``model`` over its suite ``options``."""
    from onerank.models import build_config

    if key in UNTUNABLE:
        raise SchemaError(f"{path}: {where}.{key} cannot be tuned (the seed is set per run; the monitor must be the "
                          "same for every point so that their validation scores compare)")
    if not isinstance(values, list) or not values:
        raise SchemaError(f"{path}: {where}.{key} must be a non-empty list of values")
    if len({repr(v) for v in values}) != len(values):
        raise SchemaError(f"{path}: {where}.{key} repeats a value in {values}; each point must be distinct")
    for value in values:
        try:
            if key in TRAIN_FIELDS:
                typed(TrainConfig, {key: value}, "trainer setting")
            else:
                build_config(model, {**(options or {}), key: value})
        except SchemaError as exc:
            raise SchemaError(f"{path}: {where}.{key} = {value!r}: {exc}") from None


def _model_tuning(path: Path, raw: dict[str, Any]) -> dict[str, dict[str, list[Any]]]:
    """The checked ``model_tuning`` section: tuned models only, each key a TrainConfig field or a model option, not
    already on the suite-wide grid."""
    from onerank.models import model_class

    section = raw.get("model_tuning") or {}
    if not isinstance(section, dict):
        raise SchemaError(f"{path}: model_tuning must map a model of the suite to {{KEY: [values]}}")
    shared = raw.get("tuning") or {}
    for label, axes in section.items():
        if label not in raw["models"]:
            raise SchemaError(f"{path}: model_tuning names {label!r}, which is not in the suite's models "
                              f"{raw['models']} (an ablation is not tuned: it takes its base row's chosen point)")
        if not isinstance(axes, dict) or not axes:
            raise SchemaError(f"{path}: model_tuning.{label} must be a non-empty mapping KEY: [values]")
        options = {f.name for f in dataclasses.fields(model_class(label).Config)}
        for key, values in axes.items():
            if key not in TRAIN_FIELDS and key not in options:
                raise SchemaError(f"{path}: model_tuning.{label}.{key} is neither an option of model {label!r} "
                                  f"(its options: {sorted(options)}) nor a TrainConfig field")
            if key in shared:
                raise SchemaError(f"{path}: model_tuning.{label}.{key} is already on the suite-wide grid "
                                  f"(tuning.{key}); tune it in one place")
            _check_axis(path, f"model_tuning.{label}", key, values, label, (raw.get("model_options") or {}).get(label))
    return {label: {k: list(v) for k, v in axes.items()} for label, axes in section.items()}


def parse_suite(raw: dict[str, Any], path: Path) -> Suite:
    unknown = sorted(set(raw) - SUITE_KEYS)
    if unknown:
        raise SchemaError(f"{path}: unknown suite keys {unknown}; valid: {sorted(SUITE_KEYS)}")
    for key in ("name", "dataset", "models"):
        if key not in raw:
            raise SchemaError(f"{path}: suite key {key!r} is required")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for section in ("train", "tuning"):
        bad = sorted(set(raw.get(section) or {}) - train_fields)
        if bad:
            raise SchemaError(f"{path}: {section} has unknown TrainConfig keys {bad}")
    for key, values in (raw.get("tuning") or {}).items():
        _check_axis(path, "tuning", key, values)
    model_tuning = _model_tuning(path, raw)
    if raw.get("tuning_search", "product") not in ("product", "coordinate"):
        raise SchemaError(f"{path}: tuning_search must be product or coordinate, got {raw['tuning_search']!r}")
    if not isinstance(raw.get("timings", True), bool):
        raise SchemaError(f"{path}: timings must be true or false, got {raw['timings']!r}")

    from onerank.models import model_class

    model_options = raw.get("model_options") or {}
    entries = []
    for name in raw["models"]:
        model_class(name)  # a misspelled model fails here, before any training
        entries.append(ModelEntry(label=name, model=name, options=dict(model_options.get(name) or {})))
    proposed = raw.get("proposed", "onerank")
    for ablation in raw.get("ablations") or []:
        if not isinstance(ablation, dict) or not ({"options", "objective"} & set(ablation)):
            raise SchemaError(f"{path}: each ablation needs 'options' and / or 'objective' (optionally 'label', "
                              "'model')")
        unknown_keys = sorted(set(ablation) - {"label", "model", "options", "objective"})
        if unknown_keys:
            raise SchemaError(f"{path}: unknown ablation keys {unknown_keys}; valid: label, model, options, objective")
        if "objective" in ablation and "label" not in ablation:
            raise SchemaError(f"{path}: an ablation with 'objective' needs a 'label'")
        model = ablation.get("model", proposed)
        model_class(model)
        changed = ablation.get("options") or {}
        options = {**(model_options.get(model) or {}), **changed}
        objective = dict(ablation.get("objective") or {})
        if objective:
            try:  # a misspelled objective option fails here, before any training
                RunConfig.from_dict({"objective": {**(raw.get("objective") or {}), **objective}})
            except SchemaError as exc:
                raise SchemaError(f"{path}: ablation {ablation['label']!r}: {exc}") from None
        label = ablation.get("label") or f"{model}[" + ",".join(f"{k}={v}" for k, v in changed.items()) + "]"
        base = model if model in raw["models"] else proposed
        tuned_options = sorted(split_point(model_tuning.get(base, {}))[1])
        if model != base and tuned_options:
            raise SchemaError(f"{path}: ablation {label!r} of model {model!r} takes its tuned values from {base!r}, "
                              f"whose model_tuning tunes {base!r} options {tuned_options}; list {model!r} in models")
        entries.append(ModelEntry(label=label, model=model, options=options, ablation=True, objective=objective,
                                  changed=dict(changed)))
    from onerank.models import build_config

    for entry in entries:  # a misspelled option or a wrong value fails here, before any training
        try:
            build_config(entry.model, entry.options)
        except SchemaError as exc:
            raise SchemaError(f"{path}: {entry.label}: {exc}") from None
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise SchemaError(f"{path}: model labels must be unique, got {labels}")

    variants = raw.get("variants") or {}
    if variants and (set(variants) != {"option", "values"} or not variants["values"]):
        raise SchemaError(f"{path}: variants needs 'option' (a loader option) and a non-empty 'values' list")
    return Suite(
        name=str(raw["name"]),
        dataset=str(raw["dataset"]),
        path=path,
        sha256=file_sha256(path),
        description=str(raw.get("description", "")).strip(),
        data_dir=raw.get("data_dir"),
        dataset_options=dict(raw.get("dataset_options") or {}),
        variant_option=variants.get("option"),
        variant_values=list(variants.get("values") or [None]),
        models=entries,
        proposed=proposed,
        reference=raw.get("reference", "single_task"),
        seeds=int(raw.get("seeds", 3)),
        train=dict(raw.get("train") or {}),
        tuning={k: list(v) for k, v in (raw.get("tuning") or {}).items()},
        model_tuning=model_tuning,
        tuning_search=raw.get("tuning_search", "product"),
        timings=raw.get("timings", True),
        objective=dict(raw.get("objective") or {}),
        gradient_diagnostics=bool(raw.get("gradient_diagnostics", False)),
        bootstrap=int(raw.get("bootstrap", 1000)),
    )

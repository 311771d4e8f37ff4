"""The one interface every model implements, and the registry that builds models by name.

A model maps a batch to per-task logits, ``model(batch) -> {task: [B] logits}``, and knows nothing of losses,
optimisers or the trainer (the torchrec split between model and training wrapper).
"""

from __future__ import annotations

import abc
import dataclasses
import typing
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.data.schema import SchemaError, typed
from onerank.features.space import FeatureSpace
from onerank.nn.mlp import MLP
from onerank.resources import Registry


class MultiTaskModel(nn.Module, abc.ABC):
    """Base class: ``forward(batch) -> {task: logits [B]}``.

    Class attributes a model may set:
    - ``Config``: its dataclass of options (built from YAML / CLI options by ``build_model``);
    - ``needs_requests``: batches must hold whole requests (list-wise models); the data layer honours it, the
      trainer never looks at which model it holds;
    - ``needs_sessions``: batches must hold whole sessions in time order (session-level models, data/sessions.py).
    """

    Config: ClassVar[type] = object
    needs_requests: ClassVar[bool] = False
    needs_sessions: ClassVar[bool] = False
    # The objective this model is meant to be trained with (ObjectiveConfig fields); a run's explicit objective
    # settings override it. E.g. OneRank: point-wise plus list-wise loss.
    objective_defaults: ClassVar[dict[str, Any]] = {}
    # Every option added since the first release, with the behaviour the model had before it existed: a checkpoint
    # written without the option rebuilds that behaviour, not the new default (tests/test_checkpoint_formats.py
    # checks each option against the options of earlier releases).
    added_options: ClassVar[dict[str, Any]] = {}

    @classmethod
    def saved_options(cls, options: dict[str, Any], space: FeatureSpace) -> dict[str, Any]:
        """The options of a model saved by an earlier release (for the feature ``space`` it was trained on), as this
        release reads them: an option added since then takes its old behaviour (``added_options``); a model whose
        options were renamed or moved maps them here."""
        return {**cls.added_options, **options}

    def __init__(self, space: FeatureSpace, config: Any) -> None:
        super().__init__()
        self.space = space
        self.config = config
        self.tasks = space.task_names

    @abc.abstractmethod
    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Logits per task, each [B] for the batch's B impressions."""

    def auxiliary_losses(self, batch: Batch, logits: dict[str, Tensor]) -> dict[str, Tensor]:
        """Training terms a model defines on its own outputs (e.g. AITM's calibrator), keyed ``"<task>/<name>"``.

        The objective adds each term to the named task's loss, so weighting strategies and the gradient diagnostics
        see it as part of that task. ``logits`` is this batch's ``forward`` output. Default: none.
        """
        return {}

    def task_parameter_prefixes(self) -> dict[str, list[str]]:
        """Per task, the parameter-name prefixes private to it (towers, gates, task tokens).

        Everything else counts as shared; gradient-based weighting strategies and the gradient-conflict diagnostics
        act on the shared parameters.
        """
        return {}

    def output_biases(self) -> dict[str, nn.Parameter]:
        """Per task, the one-element parameter added last to its logit (a tower's output bias, OneRank's b_k).

        The training set-up starts them at the base rate's logit (``TrainConfig.bias_init``), so that no model spends
        its first steps learning the average before it can learn to rank. Default: none (a model that exposes no bias
        is left as initialised, with a warning).
        """
        return {}

    @torch.no_grad()
    def init_output_biases(self, logits: dict[str, float]) -> None:
        """Start each task's prediction, before any input-dependent term, at ``logits[task]`` (the logit of its base
        rate for a binary task, the mean target for a regression task). The default fills ``output_biases()``; a
        model whose outputs combine several biases (ESMM's funnel products) overrides this."""
        for task, bias in self.output_biases().items():
            if task in logits:
                bias.fill_(logits[task])

    def shared_parameters(self) -> list[nn.Parameter]:
        private = [p for prefixes in self.task_parameter_prefixes().values() for p in prefixes]
        return [
            param for name, param in self.named_parameters()
            if param.requires_grad and not any(name.startswith(p) for p in private)
        ]

    @torch.no_grad()
    def score_pool(self, batch: Batch, chunk_size: int = 1024) -> dict[str, Tensor]:
        """Logits for one request's whole candidate pool, computed ``chunk_size`` candidates at a time.

        Point-wise models score each candidate independently, so slicing the batch is exact. Models whose scores
        depend on the pool (OneRank) override this to encode the context once and keep the pool-level steps whole.
        """
        if batch.size <= chunk_size:
            return self(batch)
        parts = [self(batch.slice(start, start + chunk_size)) for start in range(0, batch.size, chunk_size)]
        return {t: torch.cat([p[t] for p in parts]) for t in self.tasks}

    @torch.no_grad()
    def predict(self, batch: Batch) -> dict[str, Tensor]:
        """Probabilities for binary tasks, raw values for regression tasks."""
        logits = self(batch)
        return {
            t.name: torch.sigmoid(logits[t.name]) if t.kind == "binary" else logits[t.name] for t in self.space.tasks
        }


class TaskTowers(nn.Module):
    """One small MLP per task mapping its representation to a logit."""

    def __init__(self, tasks: list[str], input_dim: int | dict[str, int], hidden: tuple[int, ...], dropout: float = 0.0,
                 batch_norm: bool = False):
        super().__init__()
        dims = input_dim if isinstance(input_dim, dict) else {t: input_dim for t in tasks}
        self.towers = nn.ModuleDict({
            t: MLP(dims[t], list(hidden), output_dim=1, dropout=dropout, batch_norm=batch_norm) for t in tasks
        })

    def forward(self, reps: dict[str, Tensor]) -> dict[str, Tensor]:
        return {t: tower(reps[t]).squeeze(-1) for t, tower in self.towers.items()}

    def output_biases(self) -> dict[str, nn.Parameter]:
        """Per task, the bias of its tower's output layer (``MultiTaskModel.output_biases``)."""
        return {t: tower.net[-1].bias for t, tower in self.towers.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Registry: model names -> classes, imported on first use (adding a model is adding a file and a line here)
# ---------------------------------------------------------------------------------------------------------------------
MODELS: Registry[type[MultiTaskModel]] = Registry("model", {
    "single_task": "onerank.models.single_task:SingleTask",
    "shared_bottom": "onerank.models.shared_bottom:SharedBottom",
    "omoe": "onerank.models.mmoe:OMoE",
    "mmoe": "onerank.models.mmoe:MMoE",
    "ple": "onerank.models.ple:PLE",
    "esmm": "onerank.models.esmm:ESMM",
    "esmm_gru": "onerank.models.esmm_gru:ESMMGRU",
    "heroes": "onerank.models.heroes:HEROES",
    "aitm": "onerank.models.aitm:AITM",
    "stem": "onerank.models.stem:STEM",
    "dtrn": "onerank.models.dtrn:DTRN",
    "dtrn_mmoe": "onerank.models.dtrn:DTRNMMoE",
    "dtrn_ple": "onerank.models.dtrn:DTRNPLE",
    "transformer_mmoe": "onerank.models.transformer_heads:TransformerMMoE",
    "transformer_ple": "onerank.models.transformer_heads:TransformerPLE",
    "onerank": "onerank.models.onerank:OneRank",
}, SchemaError)


def register_model(name: str, model: type[MultiTaskModel] | str) -> None:
    """Make ``model`` (a ``MultiTaskModel`` class, or its ``"module:Class"``) the model ``name``."""
    MODELS.register(name, model)


def model_names() -> list[str]:
    return MODELS.names()


def model_class(name: str) -> type[MultiTaskModel]:
    return MODELS.get(name)


def build_config(name: str, options: dict | None = None) -> Any:
    """The model's ``Config`` from options (YAML, CLI): a dotted key reaches into a nested block of options
    (``experimental.random_sd``); unknown and negative options are refused with their names."""
    cls = model_class(name)
    options = _check_options(name, cls.Config, _nested(options or {}), "")
    # types checked and converted by pydantic: "64" -> 64, a YAML list -> the config's tuple; errors name the option
    return typed(cls.Config, options, f"model {name!r} option")


def _nested(options: dict[str, Any]) -> dict[str, Any]:
    """{"block.key": v} -> {"block": {"key": v}}, merged with a {"block": {...}} given as well."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        head, dot, rest = str(key).partition(".")
        if dot:
            value, key = _nested({rest: value}), head
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = {**out[key], **value}
        out[key] = value
    return out


def _check_options(name: str, config: type, options: dict[str, Any], prefix: str) -> dict[str, Any]:
    hints = typing.get_type_hints(config)
    valid = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise SchemaError(f"model {name!r} has no option(s) {[prefix + k for k in unknown]}; its options are "
                          f"{sorted(prefix + k for k in valid)}")
    for key, value in options.items():
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            _check_options(name, hints[key], value, f"{prefix}{key}.")
            continue
        # sizes, counts and rates are never negative; a negative one is a typo that would fail deep inside torch
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0 for v in numbers):
            raise SchemaError(f"model {name!r} option {prefix}{key}={value!r}: must not be negative")
    return options


def build_model(name: str, space: FeatureSpace, options: dict | None = None) -> MultiTaskModel:
    cls = model_class(name)
    config = build_config(name, options)
    try:
        return cls(space, config)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise SchemaError(f"model {name!r} cannot be built with options {dict(options or {})}: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

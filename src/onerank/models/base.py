"""The one interface every model implements, and the registry that builds models by name.

A model maps a batch to per-task logits, ``model(batch) -> {task: [B] logits}``, and knows nothing of losses,
optimisers or the trainer (the torchrec split between model and training wrapper).
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import pkgutil
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.data.schema import SchemaError, typed
from onerank.features.space import FeatureSpace
from onerank.nn.mlp import MLP


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

    @classmethod
    def saved_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The options of a model saved by an earlier release, as this release reads them: an option added since
        then with a new default takes the value that release built (override where a default changed)."""
        return dict(options)

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
# Registry
# ---------------------------------------------------------------------------------------------------------------------
_MODELS: dict[str, type[MultiTaskModel]] = {}


def register_model(name: str):
    def decorate(cls: type[MultiTaskModel]) -> type[MultiTaskModel]:
        cls.model_name = name
        _MODELS[name] = cls
        return cls

    return decorate


def _discover() -> None:
    # Every module of this package registers its models on import: adding a model is adding a file.
    import onerank.models as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"onerank.models.{info.name}")


def model_names() -> list[str]:
    _discover()
    return sorted(_MODELS)


def model_class(name: str) -> type[MultiTaskModel]:
    _discover()
    if name not in _MODELS:
        raise SchemaError(f"unknown model {name!r}; available: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def build_config(name: str, options: dict | None = None) -> Any:
    cls = model_class(name)
    options = dict(options or {})
    valid = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise SchemaError(f"model {name!r} has no option(s) {unknown}; its options are {sorted(valid)}")
    for key, value in options.items():
        # sizes, counts and rates are never negative; a negative one is a typo that would fail deep inside torch
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0 for v in numbers):
            raise SchemaError(f"model {name!r} option {key}={value!r}: must not be negative")
    # types checked and converted by pydantic: "64" -> 64, a YAML list -> the config's tuple; errors name the option
    return typed(cls.Config, options, f"model {name!r} option")


def build_model(name: str, space: FeatureSpace, options: dict | None = None) -> MultiTaskModel:
    cls = model_class(name)
    config = build_config(name, options)
    try:
        return cls(space, config)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise SchemaError(f"model {name!r} cannot be built with options {dict(options or {})}: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

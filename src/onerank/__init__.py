"""onerank: multi-task ranking for recommender systems.

The public API, imported on first use so that ``import onerank`` stays cheap (no torch until one is called)::

    import onerank

    result = onerank.train(onerank.RunConfig(dataset="synthetic", model="mmoe"), out_dir="runs/mmoe")
    model, meta = onerank.load_checkpoint("runs/mmoe/checkpoint.pt")
    onerank.evaluate("runs/mmoe/checkpoint.pt")            # a split's metrics
    ranker = onerank.Ranker("runs/mmoe/checkpoint.pt")      # score raw requests

``compare`` trains several models on the same data, ``fuse`` fits calibration and a fusion of the tasks.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> (module, attribute)
_PUBLIC = {
    "train": ("onerank.api", "train"),
    "compare": ("onerank.api", "compare"),
    "evaluate": ("onerank.api", "evaluate_checkpoint"),
    "fuse": ("onerank.api", "fuse"),
    "load_checkpoint": ("onerank.api", "load_checkpoint"),
    "Ranker": ("onerank.serving.ranker", "Ranker"),
    "Fusion": ("onerank.fusion", "Fusion"),
    "RunConfig": ("onerank.training.config", "RunConfig"),
    "TrainConfig": ("onerank.training.config", "TrainConfig"),
    "FuseSettings": ("onerank.fusion.fit", "FuseSettings"),
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'onerank' has no attribute {name!r}")
    module, attribute = _PUBLIC[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))

"""Dataset names -> loaders: the one map of where they live (no loader module registers itself)."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Protocol

from onerank.data.dataset import EncodedDataset
from onerank.data.schema import SchemaError
from onerank.data.sessions import OPTIONS as SESSION_OPTIONS
from onerank.data.sessions import apply_session_rule, session_rule
from onerank.resources import Registry


class DatasetLoader(Protocol):
    def __call__(self, data_dir: str | Path | None, cache_root: str | Path | None, **options) -> EncodedDataset: ...


# Loader modules are imported on first use (``Registry``), so that `onerank --help` does not pay for the pandas
# parsing code of every loader.
DATASETS: Registry[DatasetLoader] = Registry("dataset", {
    "synthetic": "onerank.data.synthetic:load",
    "census": "onerank.data.census:load",
    "kuairand": "onerank.data.kuairand:load",
    "tabular": "onerank.data.tabular:load",
    "encoded": "onerank.data.streaming:load_streaming_dataset",  # a dataset written for streaming (docs/scaling.md)
}, SchemaError)


def register_dataset(name: str, loader: DatasetLoader | str) -> None:
    """Make ``loader`` (a function, or its ``"module:function"``) the dataset ``name``."""
    DATASETS.register(name, loader)


def dataset_names() -> list[str]:
    return DATASETS.names()


def load_dataset(
    name: str, data_dir: str | Path | None = None, cache_root: str | Path | None = None, **options
) -> EncodedDataset:
    """Load (from cache when possible) the encoded dataset ``name``; ``options`` are the loader's own keywords, plus
    the session rule every loader accepts (``session_gap``, ``session_max_size``, ``session_order``:
    data/sessions.py), applied to the loaded dataset."""
    loader = DATASETS.get(name)
    sessions = {k: options.pop(k) for k in SESSION_OPTIONS if k in options}
    ds = _load(loader, data_dir, cache_root, options)
    rule = session_rule(sessions, ds.info)
    return ds if rule is None else apply_session_rule(ds, rule)


def _load(loader: DatasetLoader, data_dir, cache_root, options: dict) -> EncodedDataset:
    tasks = options.get("tasks")
    if tasks is None or "tasks" in inspect.signature(loader).parameters:
        # a loader that takes `tasks` itself may also change features (e.g. drop a column a task is derived from)
        return loader(data_dir, cache_root, **options)
    options.pop("tasks")
    names = [t.strip() for t in tasks.split(",") if t.strip()] if isinstance(tasks, str) else list(tasks)
    return select_tasks(loader(data_dir, cache_root, **options), names)


def select_tasks(ds: EncodedDataset, tasks: list[str]) -> EncodedDataset:
    """A view of ``ds`` with only ``tasks`` (in that order); a task's space must be selected with it."""
    if not tasks:
        raise SchemaError("the task list is empty")
    schema = ds.schema.select_tasks(tasks)

    def keep(split):
        return dataclasses.replace(
            split,
            labels={t: split.labels[t] for t in tasks},
            label_mask={t: split.label_mask[t] for t in tasks},
        )

    return dataclasses.replace(
        ds, schema=schema, train=keep(ds.train), valid=keep(ds.valid), test=keep(ds.test)
    )

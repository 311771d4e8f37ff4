"""Dataset names -> loaders. Each loader module registers itself; this file only knows where they live."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path
from typing import Callable, Protocol

from onerank.data.dataset import EncodedDataset
from onerank.data.schema import SchemaError
from onerank.data.sessions import OPTIONS as SESSION_OPTIONS
from onerank.data.sessions import apply_session_rule, session_rule


class DatasetLoader(Protocol):
    def __call__(self, data_dir: str | Path | None, cache_root: str | Path | None, **options) -> EncodedDataset: ...


_LOADERS: dict[str, DatasetLoader] = {}
# Modules are imported on first use so that `onerank --help` does not pay for pandas parsing code of every loader.
_BUILTIN_MODULES = {
    "synthetic": "onerank.data.synthetic",
    "census": "onerank.data.census",
    "kuairand": "onerank.data.kuairand",
    "tabular": "onerank.data.tabular",
}


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    def decorate(fn: DatasetLoader) -> DatasetLoader:
        _LOADERS[name] = fn
        return fn

    return decorate


def dataset_names() -> list[str]:
    return sorted(set(_LOADERS) | set(_BUILTIN_MODULES))


def load_dataset(
    name: str, data_dir: str | Path | None = None, cache_root: str | Path | None = None, **options
) -> EncodedDataset:
    """Load (from cache when possible) the encoded dataset ``name``; ``options`` are the loader's own keywords, plus
    the session rule every loader accepts (``session_gap``, ``session_max_size``, ``session_order``:
    data/sessions.py), applied to the loaded dataset."""
    if name not in _LOADERS and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _LOADERS:
        raise SchemaError(f"unknown dataset {name!r}; available: {', '.join(dataset_names())}")
    sessions = {k: options.pop(k) for k in SESSION_OPTIONS if k in options}
    ds = _load(_LOADERS[name], data_dir, cache_root, options)
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

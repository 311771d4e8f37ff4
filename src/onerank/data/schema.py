"""Declarative description of a multi-task ranking dataset: fields, behaviour sequences and tasks.

The schema lives in ``data/`` (not ``features/``) because validation and encoding of raw tables need it, and
folders never reach back up the data flow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

FieldGroup = Literal["user", "item", "context"]
TaskKind = Literal["binary", "regression"]


class SchemaError(ValueError):
    """A schema or a raw table does not fit together; the message names the column and the problem."""


@dataclass
class CategoricalField:
    """A categorical column; its values are mapped to integer codes by a vocabulary fitted on the train split."""

    name: str
    group: FieldGroup = "context"
    column: str | None = None  # raw column name when it differs from ``name``
    min_count: int = 1  # values seen fewer times in train become OOV

    @property
    def source(self) -> str:
        return self.column or self.name


@dataclass
class DenseField:
    """A numeric column, standardised with train statistics (optionally after log1p for heavy tails)."""

    name: str
    group: FieldGroup = "context"
    column: str | None = None
    log1p: bool = False
    fill_value: float | None = None  # NaN -> this value; None: NaN is an error

    @property
    def source(self) -> str:
        return self.column or self.name


@dataclass
class SequenceField:
    """One behaviour type: an ordered list (oldest first) of item ids the user interacted with.

    Items in a sequence share the item fields of the schema (``Schema.item_fields``) through the dataset's item table,
    so a history item and a candidate item are embedded by the same tables.
    """

    name: str
    max_len: int = 50
    column: str | None = None  # for tabular input: a column holding a list or a delimited string of item ids
    separator: str = "|"

    @property
    def source(self) -> str:
        return self.column or self.name


@dataclass
class TaskSpec:
    """A prediction target.

    ``space``: the name of another binary task whose positives define where this label exists (e.g. conversion
    exists only where click = 1); the loss and the metrics use only those rows.
    """

    name: str
    kind: TaskKind = "binary"
    column: str | None = None
    weight: float = 1.0
    space: str | None = None

    @property
    def source(self) -> str:
        return self.column or self.name


@dataclass
class Schema:
    categorical: list[CategoricalField] = field(default_factory=list)
    dense: list[DenseField] = field(default_factory=list)
    sequences: list[SequenceField] = field(default_factory=list)
    tasks: list[TaskSpec] = field(default_factory=list)
    item_id: str | None = None  # the categorical field that identifies an item (candidates and history items)
    user_id: str | None = None  # raw column used to group impressions for GAUC and requests
    timestamp: str | None = None  # raw column giving event time (used for splits, histories, request grouping)
    request_id: str | None = None  # raw column naming a request, when the data has one

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived views -------------------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def item_fields(self) -> list[str]:
        """Categorical fields describing an item; the item id comes first."""
        names = [f.name for f in self.categorical if f.group == "item"]
        if self.item_id and self.item_id in names:
            names.remove(self.item_id)
            names.insert(0, self.item_id)
        return names

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise SchemaError(f"unknown task {name!r}; the schema has {self.task_names}")

    def select_tasks(self, names: list[str]) -> "Schema":
        """A copy keeping only ``names`` (in that order); a kept task's space must be kept too."""
        chosen = [self.task(n) for n in names]
        for t in chosen:
            if t.space is not None and t.space not in names:
                raise SchemaError(f"task {t.name!r} is defined in the space of {t.space!r}; select {t.space!r} too")
        return dataclasses.replace(self, tasks=chosen)

    # ---- checks ----------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        names = [f.name for f in self.categorical] + [f.name for f in self.dense] + [s.name for s in self.sequences]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SchemaError(f"field names must be unique; repeated: {dupes}")
        if not self.tasks:
            raise SchemaError("the schema declares no task")
        task_names = [t.name for t in self.tasks]
        if len(set(task_names)) != len(task_names):
            raise SchemaError(f"task names must be unique: {task_names}")
        for t in self.tasks:
            if t.kind not in ("binary", "regression"):
                raise SchemaError(f"task {t.name!r}: kind must be 'binary' or 'regression', not {t.kind!r}")
            if t.space is not None:
                if t.space not in task_names:
                    raise SchemaError(f"task {t.name!r}: space {t.space!r} is not a task of the schema {task_names}")
                if self.task(t.space).kind != "binary":
                    raise SchemaError(f"task {t.name!r}: space {t.space!r} must be a binary task")
        for f in self.categorical:
            if f.group not in ("user", "item", "context"):
                raise SchemaError(f"field {f.name!r}: group must be user, item or context, not {f.group!r}")
        if self.sequences and not self.item_id:
            raise SchemaError("behaviour sequences need `item_id`: the categorical field that identifies items")
        if self.item_id and self.item_id not in [f.name for f in self.categorical]:
            raise SchemaError(f"item_id {self.item_id!r} is not a categorical field of the schema")

    # ---- (de)serialisation ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Schema":
        known = {"categorical", "dense", "sequences", "tasks", "item_id", "user_id", "timestamp", "request_id"}
        unknown = set(raw) - known
        if unknown:
            raise SchemaError(f"unknown schema keys {sorted(unknown)}; expected some of {sorted(known)}")

        def build(kind: type, key: str) -> list:
            items = raw.get(key) or []
            out = []
            for item in items:
                if isinstance(item, str):
                    item = {"name": item}
                try:
                    out.append(kind(**item))
                except TypeError as exc:
                    raise SchemaError(f"schema {key} entry {item!r}: {exc}") from None
            return out

        return cls(
            categorical=build(CategoricalField, "categorical"),
            dense=build(DenseField, "dense"),
            sequences=build(SequenceField, "sequences"),
            tasks=build(TaskSpec, "tasks"),
            item_id=raw.get("item_id"),
            user_id=raw.get("user_id"),
            timestamp=raw.get("timestamp"),
            request_id=raw.get("request_id"),
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Schema":
        raw = read_yaml_mapping(path)
        return cls.from_dict(raw.get("schema", raw))


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level must be a mapping; every problem is a SchemaError naming the file."""
    path = Path(path)
    if not path.exists():
        raise SchemaError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SchemaError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SchemaError(f"{path}: expected a mapping at the top level")
    return raw


def dataclass_from_mapping(kind: type, values: Any, where: str) -> Any:
    """``kind(**values)`` for a config section, with an error naming the section and any unknown keys."""
    if dataclasses.is_dataclass(values):
        return values
    if not isinstance(values, dict):
        raise SchemaError(f"config section {where!r} must be a mapping")
    valid = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise SchemaError(f"config section {where!r} has unknown keys {unknown}; valid: {sorted(valid)}")
    return kind(**values)

"""Declarative description of a multi-task ranking dataset: fields, behaviour sequences and tasks.

The schema lives in ``data/`` (not ``features/``) because validation and encoding of raw tables need it, and
folders never reach back up the data flow.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field

FieldGroup = Literal["user", "item", "impression", "context"]
# Groups of the candidate side: one value per row. "item": an attribute of the item (looked up in the item table for
# history items too); "impression": of this showing of it (display position, slot, bid), never looked up for history
# items (they get the padding code) and never read from an item table.
CANDIDATE_GROUPS = ("item", "impression")
TaskKind = Literal["binary", "regression"]
LABEL_TRANSFORMS = ("none", "log1p", "standardize", "log1p_standardize")


class SchemaError(ValueError):
    """A schema or a raw table does not fit together; the message names the column and the problem."""


@dataclass
class CategoricalField:
    """A categorical column; its values are mapped to integer codes by a vocabulary fitted on the train split.

    ``group``: ``user`` and ``context`` fields describe the request (one value per request: list-wise models such as
    OneRank read them once per request), ``item`` fields describe the candidate item (one value per row; history items
    get theirs from the item table), ``impression`` fields describe this showing of the candidate (display position,
    slot, bid: one value per row, none for history items).
    ``min_count``: values seen fewer times in train share the out-of-vocabulary code, so that code is trained on the
    rare values and serves unseen ones with a learned embedding. ``oov_dropout``: during training, this share of the
    field's codes is replaced by the out-of-vocabulary code at random (0 = off). ``hash_buckets``: no vocabulary; a
    value's code is a stable hash of it into this many buckets (``data/encoding.py``, ``HashedVocabulary``), so a field
    with any number of distinct ids costs a fixed table.
    """

    name: str
    group: FieldGroup = "context"
    column: str | None = None  # raw column name when it differs from ``name``
    min_count: Annotated[int, Field(ge=1)] = 1  # values seen fewer times in train become OOV
    oov_dropout: float = 0.0  # training share of ids dropped to the OOV row (checked in Schema: [0, 1))
    hash_buckets: Annotated[int, Field(ge=1)] | None = None  # hash values into this many buckets instead of a vocabulary

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
    fill_value: Annotated[float, Field(allow_inf_nan=False)] | None = None  # NaN -> this value; None: NaN is an error

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
    max_len: Annotated[int, Field(ge=1)] = 50
    column: str | None = None  # for tabular input: a column holding a list or a delimited string of item ids
    separator: str = "|"

    @property
    def source(self) -> str:
        return self.column or self.name


@dataclass
class TaskSpec:
    """A prediction target.

    ``space``: the name of another binary task whose positives define where this label exists (e.g. conversion
    exists only where click = 1); the loss and the metrics use only those rows, and the label may be missing (NaN)
    outside them (an entire-space log).
    ``transform`` (regression tasks): the model learns the label after ``log1p`` and / or standardisation by train
    statistics (``standardize``: the default for regression, so a task in seconds does not drown the others'
    losses); predictions are mapped back to the label's units for metrics and serving.
    ``loss_scale``: a constant factor on this task's loss, applied before any weighting strategy.
    """

    name: str
    kind: TaskKind = "binary"
    column: str | None = None
    weight: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0
    space: str | None = None
    transform: str | None = None  # None: "standardize" for regression, "none" for binary
    loss_scale: float = 1.0

    @property
    def label_transform(self) -> str:
        if self.transform is not None:
            return self.transform
        return "standardize" if self.kind == "regression" else "none"

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
    # Numeric columns kept per row for offline evaluation only (e.g. watch time as the value a fused ranking is
    # judged by, onerank.fusion); never model inputs.
    values: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived views -------------------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def item_fields(self) -> list[str]:
        """Categorical fields of the candidate side (groups item and impression); the item id comes first."""
        names = [f.name for f in self.categorical if f.group in CANDIDATE_GROUPS]
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
            if t.label_transform not in LABEL_TRANSFORMS:
                raise SchemaError(f"task {t.name!r}: transform must be one of {LABEL_TRANSFORMS}, not {t.transform!r}")
            if t.kind == "binary" and t.label_transform != "none":
                raise SchemaError(f"task {t.name!r}: a binary task's labels stay 0 / 1; remove `transform`")
            if not (t.loss_scale > 0 and t.loss_scale < float("inf")):
                raise SchemaError(f"task {t.name!r}: loss_scale must be a positive number, got {t.loss_scale!r}")
        for f in self.categorical:
            if f.group not in ("user", "item", "impression", "context"):
                raise SchemaError(f"field {f.name!r}: group must be user, context, item or impression, not "
                                  f"{f.group!r}")
            if not (isinstance(f.min_count, int) and f.min_count >= 1):
                raise SchemaError(f"field {f.name!r}: min_count must be an integer >= 1, got {f.min_count!r}")
            if not 0.0 <= f.oov_dropout < 1.0:
                raise SchemaError(f"field {f.name!r}: oov_dropout must be in [0, 1), got {f.oov_dropout!r}")
            if f.hash_buckets is not None and (not isinstance(f.hash_buckets, int) or f.hash_buckets < 1):
                raise SchemaError(f"field {f.name!r}: hash_buckets must be an integer >= 1, got {f.hash_buckets!r}")
            if f.hash_buckets is not None and f.min_count > 1:
                raise SchemaError(f"field {f.name!r}: min_count needs a vocabulary; a hashed field (hash_buckets) has "
                                  "none, drop one of the two")
        if self.sequences and not self.item_id:
            raise SchemaError("behaviour sequences need `item_id`: the categorical field that identifies items")
        if self.item_id and self.item_id not in [f.name for f in self.categorical]:
            raise SchemaError(f"item_id {self.item_id!r} is not a categorical field of the schema")
        if self.item_id and next(f for f in self.categorical if f.name == self.item_id).group == "impression":
            raise SchemaError(f"item_id {self.item_id!r} names the item: its group is item, not impression")
        if len(set(self.values)) != len(self.values):
            raise SchemaError(f"value columns must be unique: {self.values}")

    # ---- (de)serialisation ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not out["values"]:
            del out["values"]  # schemas written before value columns existed (and the cache keys built from them)
        for f in out["categorical"]:
            if f["hash_buckets"] is None:
                del f["hash_buckets"]  # the same for fields without hashing
        return out

    def with_hashing(self, buckets: dict[str, int]) -> "Schema":
        """This schema with the named categorical fields hashed into the given numbers of buckets."""
        unknown = sorted(set(buckets) - {f.name for f in self.categorical})
        if unknown:
            raise SchemaError(f"hash_buckets names {unknown}, which are not categorical fields of the schema "
                              f"{[f.name for f in self.categorical]}")
        fields = [dataclasses.replace(f, hash_buckets=buckets[f.name]) if f.name in buckets else f
                  for f in self.categorical]
        schema = dataclasses.replace(self, categorical=fields)
        schema.validate()
        return schema

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Schema":
        known = {"categorical", "dense", "sequences", "tasks", "item_id", "user_id", "timestamp", "request_id", "values"}
        unknown = set(raw) - known
        if unknown:
            raise SchemaError(f"unknown schema keys {sorted(unknown)}; expected some of {sorted(known)}")

        def build(kind: type, key: str) -> list:
            items = raw.get(key) or []
            if not isinstance(items, list):
                raise SchemaError(f"schema {key}: expected a list of entries (names or mappings), got "
                                  f"{type(items).__name__} {items!r}; write `{key}: [{items}]`")
            out = []
            for i, item in enumerate(items):
                if isinstance(item, str):
                    item = {"name": item}
                if not isinstance(item, dict):
                    raise SchemaError(f"schema {key}[{i}]: expected a name or a mapping, got {item!r}")
                valid = {f.name for f in dataclasses.fields(kind)}
                unknown = sorted(set(item) - valid)
                if unknown:
                    raise SchemaError(f"schema {key}[{i}] ({item.get('name')!r}): unknown keys {unknown}; "
                                      f"valid: {sorted(valid)}")
                out.append(typed(kind, item, f"schema {key}[{i}]"))
            return out

        for key in ("item_id", "user_id", "timestamp", "request_id"):
            if raw.get(key) is not None and not isinstance(raw[key], str):
                raise SchemaError(f"schema {key}: expected a column name, got {raw[key]!r}")

        return cls(
            categorical=build(CategoricalField, "categorical"),
            dense=build(DenseField, "dense"),
            sequences=build(SequenceField, "sequences"),
            tasks=build(TaskSpec, "tasks"),
            item_id=raw.get("item_id"),
            user_id=raw.get("user_id"),
            timestamp=raw.get("timestamp"),
            request_id=raw.get("request_id"),
            values=list(raw.get("values") or []),
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Schema":
        raw = read_yaml_mapping(path)
        return cls.from_dict(raw.get("schema", raw))


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's core schema for plain scalars: only ``true`` / ``false`` are booleans
    (YAML 1.1 also reads ``yes``, ``no``, ``on``, ``off``, ``y``, ``n`` as booleans, so a documented value such as
    ``contextualization: off`` arrived as False), integers are decimal (``010`` is 10), hexadecimal ``0x`` or octal
    ``0o`` (no base-60 ``1:30``), and ``1e-3`` is a number (1.1 wants a dot)."""


_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
Yaml12Loader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                   list("-+0123456789"))
Yaml12Loader.add_implicit_resolver(
    _FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
                       r"|\.(?:nan|NaN|NAN))$"), list("-+.0123456789"))


def _yaml12_int(loader: Yaml12Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    return int(text, 0 if text.startswith(("0x", "0o")) else 10)


Yaml12Loader.add_constructor(_INT, _yaml12_int)


def load_yaml(text: str) -> Any:
    """YAML text -> Python values, read as YAML 1.2 (see ``Yaml12Loader``); every YAML the project reads goes here."""
    return yaml.load(text, Loader=Yaml12Loader)


def plain(value: Any) -> Any:
    """A value as a user wrote it, for error messages: numpy scalars as Python values (12, not np.int64(12))."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", None) == 0 else value


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level must be a mapping; every problem is a SchemaError naming the file."""
    path = Path(path)
    if not path.exists():
        raise SchemaError(f"config file {path} does not exist")
    if path.is_dir():
        raise SchemaError(f"config file {path} is a folder; give a YAML file")
    try:
        raw = load_yaml(path.read_text())
    except UnicodeDecodeError:
        raise SchemaError(f"{path}: not a text file; expected YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SchemaError(f"{path}: not valid YAML ({problem}{where}); fix the file") from None
    if not isinstance(raw, dict):
        raise SchemaError(f"{path}: expected a mapping at the top level")
    return raw


def typed(kind: type, values: Any, where: str) -> Any:
    """``kind(**values)`` for a config dataclass, each value checked and converted to its annotated type by pydantic
    (``"1e-3"`` -> 0.001, ``"10"`` -> 10, a list -> a tuple) and to the constraints of ``Annotated`` fields; a wrong
    value is a SchemaError naming the field as ``where.field``."""
    from pydantic import ValidationError

    if not isinstance(values, dict):
        raise SchemaError(f"{where} must be a mapping of {kind.__name__} fields, got {type(values).__name__} "
                          f"{values!r}")
    try:
        return _adapter(kind).validate_python(values)
    except ValidationError as exc:
        raise SchemaError(validation_message(exc, where)) from None


def validation_message(exc: Any, where: str) -> str:
    """One line from a pydantic ValidationError: the first field at fault, what is wrong, the value given."""
    errors = exc.errors()
    first = errors[0]
    loc = " ".join([where, ".".join(str(p) for p in first["loc"])]).strip()
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    value = f" (got {first['input']!r})" if first["type"] != "missing" else ""
    return f"{loc}: {first['msg']}{value}{more}".replace("\n", " ")


@functools.cache
def _adapter(kind: type) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(kind)


def check_keys(kind: type, values: Any, where: str) -> None:
    """A config section must be a mapping of ``kind``'s fields: unknown keys are named with the valid ones."""
    if not isinstance(values, dict):
        raise SchemaError(f"config section {where!r} must be a mapping, got {values!r}")
    valid = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise SchemaError(f"config section {where!r} has unknown keys {unknown}; valid: {sorted(valid)}")


def dataclass_from_mapping(kind: type, values: Any, where: str) -> Any:
    """``kind(**values)`` for a config section: unknown keys named, each value checked and converted (``typed``)."""
    if dataclasses.is_dataclass(values):
        return values
    check_keys(kind, values, where)
    return typed(kind, values, where)

"""Validation of raw tables, vocabularies fitted on train only, and encoding into integer / float columns.

Code conventions every model relies on: categorical code 0 is padding (empty history slots), 1 is the reserved
out-of-vocabulary id (values unseen in train, or rarer than ``min_count``), known values start at 2.
Histories are left-padded: position ``L - 1`` always holds the most recent item.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from onerank.data.schema import CANDIDATE_GROUPS, Schema, SchemaError, plain

PAD = 0
OOV = 1


@dataclass
class RaggedHistory:
    """Variable-length histories of one behaviour type for n rows: row r owns ``values[offsets[r]:offsets[r + 1]]``,
    oldest first. ``times`` (optional) has the event time of every value."""

    values: np.ndarray
    offsets: np.ndarray
    times: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        if self.offsets.ndim != 1 or len(self.offsets) == 0 or self.offsets[0] != 0:
            raise SchemaError("history offsets must be a 1-d array starting at 0")
        if np.any(np.diff(self.offsets) < 0) or self.offsets[-1] != len(self.values):
            raise SchemaError("history offsets must be non-decreasing and end at len(values)")

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_lists(cls, column: pd.Series, separator: str = "|") -> "RaggedHistory":
        """From a column of lists / arrays, or of delimited strings (``"12|7|40"``); NaN or "" is an empty history,
        a lone number a history of one item. A cell of another kind (a mapping, a set) is an error naming its row."""
        parts: list = []
        lengths = np.zeros(len(column), dtype=np.int64)
        for i, item in enumerate(column.tolist()):
            if item is None or (isinstance(item, float) and np.isnan(item)):
                seq: list = []
            elif isinstance(item, str):
                seq = [s for s in item.split(separator) if s != ""]
            elif isinstance(item, (int, float, np.integer, np.floating)) and not isinstance(item, bool):
                seq = [item]
            elif isinstance(item, (list, tuple, np.ndarray)):
                seq = list(item)
            else:
                raise SchemaError(f"history column {column.name!r}, row {i}: a {type(item).__name__} "
                                  f"({str(item)[:40]}), not a list of item ids or a string of ids separated by "
                                  f"{separator!r}")
            lengths[i] = len(seq)
            parts.extend(seq)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        return cls(values=np.asarray(parts, dtype=object), offsets=offsets)


def pack_left_padded(codes: np.ndarray, offsets: np.ndarray, max_len: int, pad: int = PAD) -> np.ndarray:
    """Last ``max_len`` entries of each ragged row, left-padded, as an [n, max_len] array (vectorised)."""
    lengths = np.diff(offsets)
    take = np.minimum(lengths, max_len)
    n = len(lengths)
    out = np.full((n, max_len), pad, dtype=codes.dtype if len(codes) else np.int64)
    slot = np.arange(max_len)[None, :]
    first_slot = (max_len - take)[:, None]
    valid = slot >= first_slot
    source = (offsets[1:] - take)[:, None] + (slot - first_slot)
    out[valid] = codes[source[valid]]
    return out


class Vocabulary:
    """Maps raw values to codes >= 2; unseen values to OOV. Fitted on the train split only."""

    def __init__(self, values: list) -> None:
        self.index = pd.Index(values)

    @classmethod
    def fit(cls, column: pd.Series | np.ndarray, min_count: int = 1) -> "Vocabulary":
        counts = pd.Series(column).value_counts(sort=False, dropna=True)
        kept = counts[counts >= min_count].index
        # Sorting makes codes independent of row order, so a shuffled train file gives the same model inputs.
        try:
            kept = kept.sort_values()
        except TypeError:
            kept = pd.Index(sorted(kept, key=str))
        return cls(list(kept))

    def __len__(self) -> int:
        """Number of codes including padding and OOV."""
        return len(self.index) + 2

    def encode(self, values: pd.Series | np.ndarray) -> np.ndarray:
        positions = self.index.get_indexer(pd.Index(values))
        return np.where(positions >= 0, positions + 2, OOV).astype(np.int64)

    def to_list(self) -> list:
        return [v.item() if hasattr(v, "item") else v for v in self.index]

    def state(self) -> list:
        return self.to_list()

    @property
    def value_kind(self) -> str:
        """How raw values are normalised before lookup ("int", "float" or "str"): like the column it was fitted on."""
        return _value_kind(self.index.dtype)


def _value_kind(dtype: np.dtype) -> str:
    return "int" if dtype.kind in "iub" else "float" if dtype.kind == "f" else "str"


# pandas' fixed default key: SipHash of strings, a fixed 64-bit mix of numbers; never Python's per-process salted hash
HASH_KEY = "0123456789123456"


class HashedVocabulary:
    """Codes without a vocabulary: value -> 2 + (stable 64-bit hash of the value) mod ``buckets`` (``pandas.util.
    hash_array``: the same code in every process, run and machine). Nothing is fitted but the kind of the values (int,
    float or str: the same value as an int and as a string hash differently), so a field with 10^9 distinct ids costs
    ``buckets + 2`` rows; distinct ids may share a bucket (``collisions``). Codes 0 (padding) and 1 (OOV, the target
    of ``oov_dropout``) keep their meaning."""

    def __init__(self, buckets: int, value_kind: str = "int") -> None:
        self.buckets = int(buckets)
        self.kind = value_kind

    @classmethod
    def fit(cls, column: pd.Series | np.ndarray, buckets: int) -> "HashedVocabulary":
        return cls(buckets, _value_kind(pd.Series(column).dtype))

    def __len__(self) -> int:
        return self.buckets + 2

    def encode(self, values: pd.Series | np.ndarray) -> np.ndarray:
        values = np.asarray(values)
        if values.dtype.kind == "O" or values.dtype.kind in "US":
            values = values.astype(object)
        hashed = pd.util.hash_array(values, hash_key=HASH_KEY, categorize=False)
        return (hashed % np.uint64(self.buckets)).astype(np.int64) + 2

    def collisions(self, values: pd.Series | np.ndarray) -> dict[str, float]:
        """How the distinct ``values`` share buckets: their number, the buckets they occupy, and the collision rate
        (the share of distinct values whose bucket an earlier value already holds)."""
        distinct = pd.unique(np.asarray(values))
        occupied = len(np.unique(self.encode(distinct))) if len(distinct) else 0
        rate = 1.0 - occupied / len(distinct) if len(distinct) else 0.0
        return {"buckets": self.buckets, "distinct_ids": int(len(distinct)), "occupied_buckets": int(occupied),
                "collision_rate": round(rate, 6)}

    def to_list(self) -> list:
        return []  # no known values

    def state(self) -> dict:
        return {"hash_buckets": self.buckets, "kind": self.kind}

    @property
    def value_kind(self) -> str:
        return self.kind


@dataclass
class DenseScaler:
    mean: float
    std: float
    log1p: bool

    @classmethod
    def fit(cls, values: np.ndarray, log1p: bool) -> "DenseScaler":
        x = np.log1p(np.maximum(values, 0.0)) if log1p else values.astype(np.float64)
        std = float(np.std(x))
        return cls(mean=float(np.mean(x)), std=std if std > 1e-12 else 1.0, log1p=log1p)

    def transform(self, values: np.ndarray) -> np.ndarray:
        x = np.log1p(np.maximum(values, 0.0)) if self.log1p else values.astype(np.float64)
        return ((x - self.mean) / self.std).astype(np.float32)


@dataclass
class LabelTransform:
    """A regression label as the model learns it: ``(f(y) - mean) / std`` with ``f`` = log1p or the identity, fitted on
    the train labels of the task's space; ``inverse`` maps predictions back to the label's units."""

    log1p: bool = False
    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def fit(cls, kind: str, values: np.ndarray) -> "LabelTransform":
        log1p = kind in ("log1p", "log1p_standardize")
        if log1p and len(values) and values.min() <= -1:
            raise SchemaError(f"transform {kind!r} needs labels > -1; found {values.min()!r}")
        x = np.log1p(values) if log1p else values.astype(np.float64)
        if kind not in ("standardize", "log1p_standardize") or len(x) == 0:
            return cls(log1p=log1p)
        std = float(np.std(x))
        return cls(log1p=log1p, mean=float(np.mean(x)), std=std if std > 1e-12 else 1.0)

    def transform(self, values: np.ndarray) -> np.ndarray:
        x = np.log1p(values) if self.log1p else values.astype(np.float64)
        return ((x - self.mean) / self.std).astype(np.float32)

    def inverse(self, values: np.ndarray) -> np.ndarray:
        x = np.asarray(values, dtype=np.float64) * self.std + self.mean
        return (np.expm1(x) if self.log1p else x).astype(np.float32)


@dataclass
class Encoders:
    """Everything fitted on train that is needed to encode new data the same way (saved in checkpoints)."""

    vocabularies: dict[str, Vocabulary | HashedVocabulary] = field(default_factory=dict)
    scalers: dict[str, DenseScaler] = field(default_factory=dict)
    label_transforms: dict[str, LabelTransform] = field(default_factory=dict)  # regression tasks only

    def state(self) -> dict:
        return {
            "vocabularies": {k: v.state() for k, v in self.vocabularies.items()},
            "scalers": {k: vars(v) for k, v in self.scalers.items()},
            "label_transforms": {k: vars(v) for k, v in self.label_transforms.items()},
        }

    @classmethod
    def from_state(cls, state: dict) -> "Encoders":
        return cls(
            vocabularies={
                k: HashedVocabulary(v["hash_buckets"], v["kind"]) if isinstance(v, dict) else Vocabulary(v)
                for k, v in state["vocabularies"].items()
            },
            scalers={k: DenseScaler(**v) for k, v in state["scalers"].items()},
            # checkpoints from before label transforms learned raw labels
            label_transforms={k: LabelTransform(**v) for k, v in state.get("label_transforms", {}).items()},
        )

    def to_label_units(self, predictions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Model outputs (probabilities, transformed regression values) -> the labels' units."""
        return {
            t: self.label_transforms[t].inverse(v) if t in self.label_transforms else v for t, v in predictions.items()
        }


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------
def validate_table(table: pd.DataFrame, schema: Schema, where: str = "table", require_labels: bool = True) -> None:
    """Raise a SchemaError naming the column and the problem, before anything is encoded or cached."""
    if len(table) == 0:
        raise SchemaError(f"{where}: the table is empty")
    needed: list[tuple[str, str]] = [(f.source, "categorical field") for f in schema.categorical]
    needed += [(f.source, "dense field") for f in schema.dense]
    if require_labels:
        needed += [(t.source, "task label") for t in schema.tasks]
        needed += [(v, "value column") for v in schema.values]
    for column, what in needed:
        if column not in table.columns:
            close = [c for c in table.columns if c.lower().replace("_", "") == column.lower().replace("_", "")]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SchemaError(f"{where}: missing column {column!r} ({what}){hint}")
    for f in schema.dense:
        col = table[f.source]
        if not pd.api.types.is_numeric_dtype(col):
            bad = col[pd.to_numeric(col, errors="coerce").isna() & col.notna()]
            raise SchemaError(
                f"{where}: dense column {f.source!r} must be numeric; found {col.dtype} with e.g. {bad.iloc[0]!r}"
                f"{_na_hint(bad.iloc[0])}"
            )
        infinite = np.isinf(col.to_numpy(dtype=np.float64, na_value=np.nan))
        if infinite.any():
            first = int(np.flatnonzero(infinite)[0])
            raise SchemaError(
                f"{where}: dense column {f.source!r} has {int(infinite.sum())} infinite values (first at row {first}, "
                f"{col.iloc[first]}); clip or drop them, or mark them missing (NaN) and set fill_value"
            )
        if f.fill_value is None and col.isna().any():
            raise SchemaError(
                f"{where}: dense column {f.source!r} has {int(col.isna().sum())} NaN values; "
                "set fill_value in the schema to impute them"
            )
    if schema.item_id:
        item_field = next(f for f in schema.categorical if f.name == schema.item_id)
        _check_ids(table[item_field.source], where, item_field.source)
    if require_labels:
        for t in schema.tasks:
            col = table[t.source]
            if not pd.api.types.is_numeric_dtype(col):
                bad = col[pd.to_numeric(col, errors="coerce").isna() & col.notna()]
                example = f" with e.g. {bad.iloc[0]!r}" if len(bad) else ""
                raise SchemaError(
                    f"{where}: label column {t.source!r} must be numeric, found {col.dtype}{example}"
                    f"{_na_hint(bad.iloc[0]) if len(bad) else ''}"
                )
        spaces = task_spaces(schema, table)
        for t in schema.tasks:
            col = table[t.source]
            # Entire-space logs leave a label missing where it cannot exist (no conversion without a click):
            # outside the task's space a NaN is masked, inside it a NaN is a data error.
            missing = col.isna().to_numpy() & spaces[t.name]
            if missing.any():
                rows = np.flatnonzero(missing)
                shown = ", ".join(str(r) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
                fix = (
                    "fill or drop those rows" if t.space is not None else
                    "fill or drop those rows, or declare `space: <task>` if the label exists only where another "
                    "task is positive (e.g. a conversion only after a click)"
                )
                where_space = f" inside its space ({t.space} = 1)" if t.space is not None else ""
                raise SchemaError(
                    f"{where}: label column {t.source!r} (task {t.name!r}) has {len(rows)} NaN labels{where_space} "
                    f"at rows {shown}; {fix}"
                )
            if t.kind == "binary":
                values = col.to_numpy()[spaces[t.name]]
                if not np.isin(values, (0, 1)).all():
                    odd = values[~np.isin(values, (0, 1))][0].item()
                    raise SchemaError(f"{where}: binary label column {t.source!r} holds {odd!r}; expected 0 or 1")
        for v in schema.values:
            col = table[v]
            if not pd.api.types.is_numeric_dtype(col) or col.isna().any():
                raise SchemaError(f"{where}: value column {v!r} must be numeric without NaN (found {col.dtype}, "
                                  f"{int(col.isna().sum())} NaN)")


def _na_hint(value) -> str:
    """Why an empty cell is text: ``csv: {keep_default_na: false}`` keeps "" instead of reading NaN."""
    if not (isinstance(value, str) and value.strip() == ""):
        return ""
    return (
        " (an empty cell read as text, as `csv: {keep_default_na: false}` does: fill the column in every row, or set "
        "`csv: {na_values: {COLUMN: ['']}}` to read its empty cells as missing)"
    )


def task_spaces(schema: Schema, table: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per task, the rows where its label exists: every row, or the positives of its space task (a missing space
    label counts as outside)."""
    out: dict[str, np.ndarray] = {}
    for t in schema.tasks:  # a space is a binary task of the schema; spaces can chain (cart in click, order in cart)
        out[t.name] = np.ones(len(table), dtype=bool)
    for t in _space_order(schema):
        if t.space is not None:
            space = table[schema.task(t.space).source].to_numpy(dtype=np.float64)
            out[t.name] = out[t.space] & (np.nan_to_num(space, nan=0.0) > 0.5)
    return out


def _space_order(schema: Schema) -> list:
    """Tasks with each task after the task of its space."""
    done: list = []
    pending = list(schema.tasks)
    while pending:
        ready = [t for t in pending if t.space is None or t.space in [d.name for d in done]]
        if not ready:
            raise SchemaError(f"task spaces form a cycle: {[(t.name, t.space) for t in pending]}")
        done += ready
        pending = [t for t in pending if t not in ready]
    return done


def _check_ids(col: pd.Series, where: str, name: str) -> None:
    if col.isna().any():
        raise SchemaError(f"{where}: id column {name!r} has {int(col.isna().sum())} missing values")
    if pd.api.types.is_float_dtype(col):
        values = col.to_numpy()
        if not np.all(values == np.floor(values)):
            raise SchemaError(f"{where}: id column {name!r} holds non-integer values, e.g. {values[values != np.floor(values)][0].item()}")
    if pd.api.types.is_numeric_dtype(col) and (col < 0).any():
        raise SchemaError(f"{where}: id column {name!r} holds negative ids, e.g. {col[col < 0].iloc[0].item()}")


# ---------------------------------------------------------------------------------------------------------------------
# Fitting and encoding
# ---------------------------------------------------------------------------------------------------------------------
def _categorical_values(col: pd.Series) -> pd.Series:
    # Integral floats (ids read with NaN elsewhere in the file) and ints must map to the same vocabulary entries.
    if pd.api.types.is_float_dtype(col):
        values = col.to_numpy()
        if np.all(np.isnan(values) | (values == np.floor(values))):
            return pd.Series(np.where(np.isnan(values), -1, values).astype(np.int64), index=col.index)
    if pd.api.types.is_bool_dtype(col):
        return col.astype(np.int64)
    if col.dtype == object:
        return col.fillna("<NA>").astype(str)
    return col


def fit_encoders(
    train: pd.DataFrame,
    schema: Schema,
    histories: dict[str, RaggedHistory] | None = None,
    item_table: pd.DataFrame | None = None,
    request: np.ndarray | None = None,
) -> Encoders:
    """Vocabularies and scalers from the train split only.

    ``min_count`` counts rows, except for user and context fields of a split with requests (``request``, one id per
    row): there a value counts once per request, since every candidate of a request repeats it.

    Items seen only in train histories count as train observations (they come from the train period); their side
    features come from the item table rows of items observed in train, so history-only items are not OOV there.
    """
    encoders = Encoders()
    history_items = [
        _categorical_values(pd.Series(h.values)) for h in (histories or {}).values() if len(h.values)
    ]
    id_field = next((f for f in schema.categorical if f.name == schema.item_id), None)
    history_only = None  # item-table rows of items seen in train histories but never as a train candidate
    if id_field is not None and item_table is not None and id_field.source in item_table.columns:
        row_items = set(_categorical_values(train[id_field.source]).unique())
        seen_items = row_items.union(*(set(h.unique()) for h in history_items))
        table_ids = _categorical_values(item_table[id_field.source])
        history_only = (table_ids.isin(seen_items) & ~table_ids.isin(row_items)).to_numpy()
    for f in schema.categorical:
        values = _categorical_values(train[f.source])
        if f.name == schema.item_id:
            values = pd.concat([values, *history_items], ignore_index=True)
        elif f.group == "item" and history_only is not None and f.source in item_table.columns:
            extra = _categorical_values(item_table[f.source])[history_only]
            values = pd.concat([values, extra], ignore_index=True)
        if f.hash_buckets is not None:
            encoders.vocabularies[f.name] = HashedVocabulary.fit(values, f.hash_buckets)
            continue
        if f.group not in CANDIDATE_GROUPS and request is not None and f.min_count > 1:
            values = values[~pd.DataFrame({"v": values.to_numpy(), "r": np.asarray(request)}).duplicated().to_numpy()]
        encoders.vocabularies[f.name] = Vocabulary.fit(values, f.min_count)
    for f in schema.dense:
        values = train[f.source].to_numpy(dtype=np.float64)
        if f.fill_value is not None:
            values = np.where(np.isnan(values), f.fill_value, values)
        encoders.scalers[f.name] = DenseScaler.fit(values, f.log1p)
    return encoders


def encode_categorical(encoders: Encoders, schema: Schema, table: pd.DataFrame) -> dict[str, np.ndarray]:
    return {
        f.name: encoders.vocabularies[f.name].encode(_categorical_values(table[f.source])) for f in schema.categorical
    }


def encode_dense(encoders: Encoders, schema: Schema, table: pd.DataFrame) -> dict[str, np.ndarray]:
    out = {}
    for f in schema.dense:
        values = table[f.source].to_numpy(dtype=np.float64)
        if f.fill_value is not None:
            values = np.where(np.isnan(values), f.fill_value, values)
        out[f.name] = encoders.scalers[f.name].transform(values)
    return out


def encode_history(encoders: Encoders, schema: Schema, seq_name: str, history: RaggedHistory) -> tuple[np.ndarray, np.ndarray | None]:
    spec = next(s for s in schema.sequences if s.name == seq_name)
    vocab = encoders.vocabularies[schema.item_id]
    codes = vocab.encode(_categorical_values(pd.Series(history.values))) if len(history.values) else np.zeros(0, np.int64)
    # int32 halves the cache of [n, L] history arrays; vocabularies never approach 2^31 ids
    packed = pack_left_padded(codes.astype(np.int32), history.offsets, spec.max_len)
    times = None
    if history.times is not None:
        times = pack_left_padded(np.asarray(history.times, dtype=np.int64), history.offsets, spec.max_len, pad=-1)
    return packed, times


def fit_label_transforms(train: pd.DataFrame, schema: Schema) -> dict[str, LabelTransform]:
    """Per regression task, its transform fitted on the train labels inside the task's space."""
    spaces = task_spaces(schema, train)
    return {
        t.name: LabelTransform.fit(t.label_transform, train[t.source].to_numpy(dtype=np.float64)[spaces[t.name]])
        for t in schema.tasks if t.kind == "regression"
    }


def encode_labels(
    schema: Schema, table: pd.DataFrame, transforms: dict[str, LabelTransform] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Labels as the model learns them (regression tasks transformed) and the mask of rows inside each task's space;
    a label outside its space is stored as 0 (masked, never used)."""
    masks = task_spaces(schema, table)
    labels = {}
    for t in schema.tasks:
        values = np.where(masks[t.name], table[t.source].to_numpy(dtype=np.float64), 0.0)
        if transforms and t.name in transforms:
            values = np.where(masks[t.name], transforms[t.name].transform(values), 0.0)
        labels[t.name] = values.astype(np.float32)
    return labels, masks


def check_constant_per_request(table: pd.DataFrame, request: np.ndarray, schema: Schema, where: str) -> None:
    """User and context fields describe a request: a value that changes between the candidates of one request would
    be read from the request's first row only by list-wise models. Raise naming the field and the fix."""
    fields = [f for f in schema.categorical + schema.dense if f.group not in CANDIDATE_GROUPS]
    if not fields or len(table) == 0:
        return
    request = np.asarray(request)
    order = np.argsort(request, kind="stable")
    same_request = request[order][1:] == request[order][:-1]
    for f in fields:
        values = table[f.source].to_numpy()[order]
        changed = same_request & ~_equal_or_both_missing(values[1:], values[:-1])
        if changed.any():
            at = int(np.flatnonzero(changed)[0])
            n_requests = len(np.unique(request[order][1:][changed]))
            raise SchemaError(
                f"{where}: {f.group} field {f.name!r} varies within {n_requests} requests (e.g. {plain(values[at])!r} "
                f"and {plain(values[at + 1])!r} in one request), but {f.group} fields are read once per request; "
                "declare it `group: impression` if it describes the candidate's showing (a display position, a slot, "
                "a bid), `group: item` if it is an attribute of the item, or make it constant per request"
            )


def _equal_or_both_missing(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    missing_a, missing_b = pd.isna(a), pd.isna(b)
    with np.errstate(invalid="ignore"):
        return (a == b) | (missing_a & missing_b)

"""Validation of raw tables, vocabularies fitted on train only, and encoding into integer / float columns.

Code conventions every model relies on: categorical code 0 is padding (empty history slots), 1 is the reserved
out-of-vocabulary id (values unseen in train, or rarer than ``min_count``), known values start at 2.
Histories are left-padded: position ``L - 1`` always holds the most recent item.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from onerank.data.schema import Schema, SchemaError

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
        """From a column of lists / arrays, or of delimited strings (``"12|7|40"``); NaN or "" is an empty history."""
        parts: list = []
        lengths = np.zeros(len(column), dtype=np.int64)
        for i, item in enumerate(column.tolist()):
            if item is None or (isinstance(item, float) and np.isnan(item)):
                seq: list = []
            elif isinstance(item, str):
                seq = [s for s in item.split(separator) if s != ""]
            else:
                seq = list(item)
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
class Encoders:
    """Everything fitted on train that is needed to encode new data the same way (saved in checkpoints)."""

    vocabularies: dict[str, Vocabulary] = field(default_factory=dict)
    scalers: dict[str, DenseScaler] = field(default_factory=dict)

    def state(self) -> dict:
        return {
            "vocabularies": {k: v.to_list() for k, v in self.vocabularies.items()},
            "scalers": {k: vars(v) for k, v in self.scalers.items()},
        }

    @classmethod
    def from_state(cls, state: dict) -> "Encoders":
        return cls(
            vocabularies={k: Vocabulary(v) for k, v in state["vocabularies"].items()},
            scalers={k: DenseScaler(**v) for k, v in state["scalers"].items()},
        )


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
                raise SchemaError(f"{where}: label column {t.source!r} must be numeric, found {col.dtype}")
            if col.isna().any():
                first = int(np.flatnonzero(col.isna().to_numpy())[0])
                raise SchemaError(
                    f"{where}: label column {t.source!r} has {int(col.isna().sum())} NaN labels (first at row {first})"
                )
            if t.kind == "binary":
                values = col.to_numpy()
                if not np.isin(values, (0, 1)).all():
                    odd = values[~np.isin(values, (0, 1))][0].item()
                    raise SchemaError(f"{where}: binary label column {t.source!r} holds {odd!r}; expected 0 or 1")
        for v in schema.values:
            col = table[v]
            if not pd.api.types.is_numeric_dtype(col) or col.isna().any():
                raise SchemaError(f"{where}: value column {v!r} must be numeric without NaN (found {col.dtype}, "
                                  f"{int(col.isna().sum())} NaN)")


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
) -> Encoders:
    """Vocabularies and scalers from the train split only.

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


def encode_labels(schema: Schema, table: pd.DataFrame) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    labels = {t.name: table[t.source].to_numpy(dtype=np.float32) for t in schema.tasks}
    masks = {}
    for t in schema.tasks:
        mask = np.ones(len(table), dtype=bool)
        if t.space is not None:
            mask &= labels[t.space] > 0.5
        masks[t.name] = mask
    return labels, masks

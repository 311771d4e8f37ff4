"""Generic tabular loader (dataset name ``tabular``): your own CSV / Parquet files + a YAML schema.

One YAML file describes everything; the schema keys are those of ``Schema.from_dict`` (at the top level or under
``schema:``), plus loader sections::

    name: my_data                 # cache / report name (default: the YAML file's stem)
    files:                        # paths or glob patterns, relative to data_dir (or to the YAML's folder)
      train: train.csv            # or `data: all.parquet` with a split rule
      valid: valid.csv            # optional: missing splits are carved from train (or data) by `split`
      test: test.csv
      items: items.csv            # optional item side-feature table (one row per item id)
      events: events.csv          # optional behaviour events (user, item, event type, time), see `events:`
      csv: {sep: ","}             # optional pandas.read_csv keywords
    split:
      method: fraction            # fraction (seeded, by group) | time (cut-offs on the timestamp column)
      by: user                    # fraction only: user | request | row (default: request, else user, else row)
      valid_fraction: 0.1
      test_fraction: 0.1
      seed: 0
      valid_start: 2022-05-06     # time only: rows with timestamp >= valid_start (and < test_start) are validation
      test_start: 2022-05-07
    requests: {max_gap: 300, max_size: 20}   # group impressions when there is no request id column
    events: {user: uid, item: ad, type: event, time: event_ts}   # the events table's columns (defaults: user_id,
                                  # the item_id column, `type`, timestamp)
    histories:                    # sequences, strictly before each request's start
      clicked: click              # from the impression log: 0/1 column marking the behaviour; null = every impression
      converted: {event: conversion}   # from the events table: events of that type (or a list), at their own time

Every ``load`` option overrides the YAML: ``schema``, ``train``, ``valid``, ``test``, ``data``, ``items``, ``name``,
``events``, ``split`` (method), ``split_by``, ``valid_fraction``, ``test_fraction``, ``seed``, ``valid_start``,
``test_start``, ``request_max_gap``, ``request_max_size``, ``history_len``, ``tasks``. Options given as strings (from a command line)
are parsed as YAML scalars / lists. See ``docs/tabular_example.md``.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from onerank.data.dataset import RawDataset, RawSplit, file_fingerprint, load_or_build
from onerank.data.encoding import RaggedHistory, _categorical_values, check_constant_per_request
from onerank.data.histories import build_histories
from onerank.data.requests import group_requests, request_start_times, size_distribution
from onerank.data.schema import Schema, SchemaError, SequenceField, load_yaml, plain, read_yaml_mapping

log = logging.getLogger(__name__)

NAME = "tabular"
LOADER_VERSION = 3  # 3: history cells as item ids of the item column's kind
SCHEMA_KEYS = {"categorical", "dense", "sequences", "tasks", "item_id", "user_id", "timestamp", "request_id",
               "values"}
LOADER_KEYS = {"name", "files", "split", "requests", "histories", "events", "schema"}
FILE_ROLES = ("train", "valid", "test", "data", "items", "events")
EVENT_KEYS = ("user", "item", "type", "time")
OPTION_KEYS = {
    "schema", "train", "valid", "test", "data", "items", "events", "name", "split", "split_by", "valid_fraction",
    "test_fraction", "seed", "valid_start", "test_start", "request_max_gap", "request_max_size", "history_len", "tasks",
}
PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
# Fields of a YAML schema that do not set min_count: a value must be seen in two train requests (rows for item fields)
# to get its own embedding, so the shared OOV row trains on the rare ones and serves unseen values. On the generated
# funnel log (benchmarks/results/funnel) 2 instead of 1 raised test click AUC by 0.007 (MMoE) and 0.015 (OneRank).
TABULAR_MIN_COUNT = 2
# A history column whose cells are not item lists (a JSON string, another separator, a number per cell) would give one
# unknown item per cell. Its cells without any item id of the data are named in a warning; when they are more than this
# share of a split's non-empty cells, the column is refused.
UNKNOWN_HISTORY_SHARE = 0.5
UNPARSED_ID = -(2**62)  # a token of a history cell that is no number where item ids are numbers: no item's id


# ---------------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------------
def _parse_scalar(value: Any) -> Any:
    """Command-line options arrive as strings: "0.1" -> 0.1, "[a, b]" -> list, "null" -> None (YAML 1.2: "off" and
    "no" stay strings)."""
    if isinstance(value, str):
        try:
            return load_yaml(value)
        except yaml.YAMLError:
            return value
    return value


def read_config(path: str | Path) -> dict:
    raw = read_yaml_mapping(path)
    unknown = set(raw) - SCHEMA_KEYS - LOADER_KEYS
    if unknown:
        raise SchemaError(
            f"{path}: unknown keys {sorted(unknown)}; expected schema keys {sorted(SCHEMA_KEYS)} "
            f"and loader sections {sorted(LOADER_KEYS)}"
        )
    if "schema" in raw and set(raw) & SCHEMA_KEYS:
        raise SchemaError(f"{path}: put the schema keys either under `schema:` or at the top level, not both")
    return raw


def _schema_dict(config: dict) -> dict:
    if "schema" in config:
        if not isinstance(config["schema"], dict):
            raise SchemaError("`schema:` must be a mapping of schema keys")
        return copy.deepcopy(config["schema"])
    return {k: copy.deepcopy(v) for k, v in config.items() if k in SCHEMA_KEYS}


def _resolve_schema_path(schema: str | Path, data_dir: Path | None) -> Path:
    path = Path(schema)
    if path.is_file():
        return path
    if data_dir is not None and (data_dir / path).is_file():
        return data_dir / path
    raise SchemaError(f"tabular: schema file {schema} not found (looked in the working directory and in data_dir)")


def _merge_options(config: dict, options: dict) -> dict:
    """The YAML's loader sections with the ``load`` options layered on top."""
    unknown = set(options) - OPTION_KEYS
    if unknown:
        raise SchemaError(f"tabular: unknown options {sorted(unknown)}; available: {sorted(OPTION_KEYS)}")
    files = dict(config.get("files") or {})
    split = dict(config.get("split") or {})
    requests = dict(config.get("requests") or {})
    if not isinstance(files, dict) or not isinstance(split, dict) or not isinstance(requests, dict):
        raise SchemaError("tabular: `files`, `split` and `requests` must be mappings")
    opts = {k: _parse_scalar(v) if k not in FILE_ROLES and k != "schema" else v for k, v in options.items()}
    for role in FILE_ROLES:
        if opts.get(role) is not None:
            files[role] = str(opts[role])
    if "split" in opts:
        split["method"] = opts["split"]
    for key, target in (("split_by", "by"), ("valid_fraction", "valid_fraction"), ("test_fraction", "test_fraction"),
                        ("seed", "seed"), ("valid_start", "valid_start"), ("test_start", "test_start")):
        if key in opts:
            split[target] = opts[key]
    if "request_max_gap" in opts:
        requests["max_gap"] = opts["request_max_gap"]
    if "request_max_size" in opts:
        requests["max_size"] = opts["request_max_size"]
    unknown_files = set(files) - set(FILE_ROLES) - {"csv"}
    if unknown_files:
        raise SchemaError(f"tabular: unknown `files` keys {sorted(unknown_files)}; expected {FILE_ROLES} and csv")
    split_keys = {"method", "by", "valid_fraction", "test_fraction", "seed", "valid_start", "test_start"}
    unknown_split = set(split) - split_keys
    if unknown_split:
        raise SchemaError(f"tabular: unknown `split` keys {sorted(unknown_split)}")
    unknown_req = set(requests) - {"max_gap", "max_size"}
    if unknown_req:
        raise SchemaError(f"tabular: unknown `requests` keys {sorted(unknown_req)}; expected max_gap, max_size")
    tasks = opts.get("tasks")
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    histories = config.get("histories") or {}
    if not isinstance(histories, dict):
        raise SchemaError("tabular: `histories` must map sequence names to a 0/1 column (or null)")
    for seq, spec in histories.items():
        if isinstance(spec, dict) and set(spec) != {"event"}:
            raise SchemaError(
                f"tabular: `histories: {seq}:` takes a column name, null, or {{event: TYPE}} (one type or a list) "
                f"for the events table; got keys {sorted(spec)}"
            )
    events = config.get("events") or {}
    if not isinstance(events, dict) or set(events) - set(EVENT_KEYS):
        raise SchemaError(f"tabular: `events` maps {EVENT_KEYS} to columns of the events table; got {events!r}")
    return {
        "files": files,
        "split": split,
        "requests": requests,
        "histories": dict(histories),
        "events": dict(events),
        "tasks": tasks,
        "history_len": opts.get("history_len"),
        "name": opts.get("name"),
    }


def _find(spec: str, base: Path, role: str) -> list[Path]:
    """A path or glob pattern relative to ``base`` (absolute paths are kept) -> existing files, sorted."""
    path = Path(spec)
    if any(ch in spec for ch in "*?["):
        root = Path(path.anchor) if path.is_absolute() else base
        pattern = str(path.relative_to(path.anchor)) if path.is_absolute() else spec
        matches = sorted(p for p in root.glob(pattern) if p.is_file())
        if not matches:
            raise SchemaError(f"tabular: no file matches the {role} pattern {spec!r} in {root}")
        return matches
    full = path if path.is_absolute() else base / path
    if not full.is_file():
        raise SchemaError(f"tabular: the {role} file {full} does not exist")
    return [full]


def _read(paths: list[Path], csv_options: dict, columns: list[str] | None) -> pd.DataFrame:
    frames = []
    for p in paths:
        name = p.name.lower()
        try:
            if name.endswith(PARQUET_SUFFIXES):
                frame = pd.read_parquet(p)
            else:
                frame = pd.read_csv(p, low_memory=False, **csv_options)
        except (OSError, ValueError) as exc:
            raise SchemaError(f"tabular: cannot read {p}: {exc}") from None
        if columns is not None:
            frame = frame[[c for c in columns if c in frame.columns]]
        frames.append(frame)
    if len(frames) > 1:
        first = list(frames[0].columns)
        for p, f in zip(paths[1:], frames[1:]):
            if set(f.columns) != set(first):
                raise SchemaError(f"tabular: {p} has columns {sorted(f.columns)}, {paths[0]} has {sorted(first)}")
        return pd.concat(frames, ignore_index=True)
    return frames[0]


# ---------------------------------------------------------------------------------------------------------------------
# Splits, requests, histories
# ---------------------------------------------------------------------------------------------------------------------
def _time_to_int(column: pd.Series, name: str) -> tuple[pd.Series, bool]:
    """Numeric times stay as they are (rounded to int64); datetime-like strings become milliseconds since epoch."""
    if pd.api.types.is_numeric_dtype(column):
        if column.isna().any():
            raise SchemaError(f"tabular: timestamp column {name!r} has {int(column.isna().sum())} missing values")
        return column.astype(np.int64), False
    parsed = pd.to_datetime(column, errors="coerce")
    if parsed.isna().any():
        bad = column[parsed.isna()].iloc[0]
        raise SchemaError(f"tabular: timestamp column {name!r} holds {bad!r}, neither a number nor a date")
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    ms = (parsed - pd.Timestamp("1970-01-01")) // pd.Timedelta(milliseconds=1)
    return ms.astype(np.int64), True


def _cutoff(value: Any, is_datetime: bool, what: str) -> int | float:
    if is_datetime:
        try:
            stamp = pd.Timestamp(str(value))
        except ValueError:
            raise SchemaError(f"tabular: split {what}={value!r} is not a date") from None
        if stamp.tzinfo is not None:
            stamp = stamp.tz_convert("UTC").tz_localize(None)
        return int((stamp - pd.Timestamp("1970-01-01")) // pd.Timedelta(milliseconds=1))
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SchemaError(f"tabular: split {what}={value!r} must be a number like the timestamp column") from None


def _fraction_assign(keys: pd.Series, fractions: dict[str, float], seed: int) -> np.ndarray:
    """Per row, the split (0 keep, 1 valid, 2 test) of its group, drawn once per distinct key with a seeded RNG.

    Keys are sorted before drawing, so the result does not depend on the row order; a split asked for with a positive
    fraction gets at least one group."""
    if keys.isna().any():
        raise SchemaError(f"tabular: the split key column has {int(keys.isna().sum())} missing values")
    codes, uniques = pd.factorize(keys, sort=True)
    draw = np.random.default_rng(seed).random(len(uniques))
    group = np.zeros(len(uniques), dtype=np.int8)
    t, v = fractions.get("test", 0.0), fractions.get("valid", 0.0)
    group[draw < t] = 2
    group[(draw >= t) & (draw < t + v)] = 1
    order = np.argsort(draw, kind="stable")
    for code, frac in ((2, t), (1, v)):
        if frac > 0 and not (group == code).any():
            free = [g for g in order if group[g] == 0]
            if len(free) <= 1:
                raise SchemaError(f"tabular: too few groups ({len(uniques)}) to carve the requested splits")
            group[free[0] if code == 2 else free[-1]] = code
    return group[codes]


def _carve(
    pool: pd.DataFrame, need: list[str], split: dict, schema: Schema, is_datetime: bool
) -> dict[str, pd.DataFrame]:
    """Split ``pool`` into train + the ``need`` splits (subset of valid/test) with the split rule."""
    method = split.get("method") or "fraction"
    out = {}
    if method == "time":
        if not schema.timestamp:
            raise SchemaError("tabular: split method `time` needs `timestamp` in the schema")
        times = pool[schema.timestamp].to_numpy()
        assign = np.zeros(len(pool), dtype=np.int8)
        bounds = {}
        for name in need:
            key = f"{name}_start"
            if split.get(key) is None:
                raise SchemaError(f"tabular: split method `time` needs split.{key} to make the {name} split")
            bounds[name] = _cutoff(split[key], is_datetime, key)
        if "valid" in bounds:
            assign[times >= bounds["valid"]] = 1
        if "test" in bounds:
            if "valid" in bounds and bounds["test"] <= bounds["valid"]:
                raise SchemaError("tabular: split.test_start must be after split.valid_start")
            assign[times >= bounds["test"]] = 2
    elif method == "fraction":
        by = split.get("by") or ("request" if schema.request_id else "user" if schema.user_id else "row")
        if by == "request":
            if not schema.request_id:
                raise SchemaError("tabular: split by request needs `request_id` in the schema")
            keys = pool[schema.request_id]
        elif by == "user":
            if not schema.user_id:
                raise SchemaError("tabular: split by user needs `user_id` in the schema")
            keys = pool[schema.user_id]
        elif by == "row":
            keys = pd.Series(np.arange(len(pool)))
        else:
            raise SchemaError(f"tabular: split.by must be user, request or row, not {by!r}")
        fractions = {}
        for name in need:
            frac = float(split.get(f"{name}_fraction", 0.1))
            if not 0.0 < frac < 1.0:
                raise SchemaError(f"tabular: split.{name}_fraction must be in (0, 1), got {frac}")
            fractions[name] = frac
        if sum(fractions.values()) >= 1.0:
            raise SchemaError("tabular: the split fractions leave nothing to train on")
        assign = _fraction_assign(keys.reset_index(drop=True), fractions, int(split.get("seed", 0)))
    else:
        raise SchemaError(f"tabular: split.method must be `fraction` or `time`, not {method!r}")
    out["train"] = pool[assign == 0].reset_index(drop=True)
    for code, name in ((1, "valid"), (2, "test")):
        if name in need:
            out[name] = pool[assign == code].reset_index(drop=True)
            if len(out[name]) == 0:
                raise SchemaError(f"tabular: the split rule {split} leaves the {name} split empty")
    if len(out["train"]) == 0:
        raise SchemaError(f"tabular: the split rule {split} leaves the train split empty")
    return out


def _max_gap(value: Any, is_datetime: bool) -> float:
    """``max_gap`` in the timestamp's unit; with date timestamps (milliseconds) a duration string like "5min" works."""
    if isinstance(value, str):
        if not is_datetime:
            raise SchemaError(
                f"tabular: requests.max_gap={value!r}: durations need a date timestamp column; give a number in the "
                "timestamp's unit"
            )
        try:
            return pd.Timedelta(value) / pd.Timedelta(milliseconds=1)
        except ValueError:
            raise SchemaError(f"tabular: requests.max_gap={value!r} is not a duration like '5min' or '300s'") from None
    try:
        gap = float(value)
    except (TypeError, ValueError):
        raise SchemaError(f"tabular: requests.max_gap={value!r} must be a number") from None
    if gap < 0:
        raise SchemaError(f"tabular: requests.max_gap must be >= 0, got {gap}")
    return gap


def _requests(
    tables: dict[str, pd.DataFrame], schema: Schema, rule: dict, is_datetime: bool = False
) -> dict[str, np.ndarray | None]:
    """Request index per row and split (globally unique ids), from the request id column or the grouping rule."""
    out: dict[str, np.ndarray | None] = {}
    offset = 0
    for code, (name, table) in enumerate(tables.items()):
        if schema.request_id:
            if schema.request_id not in table.columns:
                raise SchemaError(f"tabular {name} split: missing request id column {schema.request_id!r}")
            if table[schema.request_id].isna().any():
                raise SchemaError(f"tabular {name} split: request id column {schema.request_id!r} has missing values")
            ids = pd.factorize(table[schema.request_id], sort=True)[0].astype(np.int64)
        elif rule:
            if not (schema.user_id and schema.timestamp):
                raise SchemaError("tabular: `requests:` grouping needs `user_id` and `timestamp` in the schema")
            if rule.get("max_gap") is None:
                raise SchemaError("tabular: `requests:` needs max_gap (in the timestamp's unit; ms for dates)")
            max_size = rule.get("max_size")
            item_col = next((f.source for f in schema.categorical if f.name == schema.item_id), None)
            tiebreak = table[item_col].to_numpy() if item_col in table.columns else None
            ids = group_requests(
                table[schema.user_id].to_numpy(), table[schema.timestamp].to_numpy(),
                _max_gap(rule["max_gap"], is_datetime), None if max_size is None else int(max_size), tiebreak=tiebreak,
            )
        else:
            out[name] = None
            continue
        out[name] = ids + offset
        offset += int(ids.max()) + 1 if len(ids) else 0
    return out


def _history_column(
    split: str, table: pd.DataFrame, seq: SequenceField, known_items: pd.Series | None, numeric_ids: bool
) -> RaggedHistory:
    """A history column's cells as item ids, of the item id column's kind (the strings of ``"12|7"`` become the
    numbers 12 and 7 where item ids are numbers), checked: cells that hold no item id of the data are named, and
    above ``UNKNOWN_HISTORY_SHARE`` of a split's non-empty cells the column is refused (it holds no item lists)."""
    history = RaggedHistory.from_lists(table[seq.source], separator=seq.separator)
    if numeric_ids and history.values.dtype == object and len(history.values):
        numbers = pd.to_numeric(pd.Series(history.values), errors="coerce")
        whole = numbers.notna() & (numbers == np.floor(numbers.fillna(0)))
        history.values = np.where(whole, numbers.fillna(0), UNPARSED_ID).astype(np.int64)
    lengths = np.diff(history.offsets)
    filled = lengths > 0
    if known_items is None or not filled.any():
        return history
    hits = _categorical_values(pd.Series(history.values)).isin(known_items).to_numpy(dtype=np.float64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    unknown = filled & (np.bincount(rows, weights=hits, minlength=len(lengths)) == 0)
    if not unknown.any():
        return history
    share = unknown.sum() / filled.sum()
    examples = "; ".join(f"row {i}: {plain(table[seq.source].iloc[i])!r}" for i in np.flatnonzero(unknown)[:3])
    message = (f"tabular {split} split: {int(unknown.sum())} of {int(filled.sum())} non-empty cells ({share:.0%}) of "
               f"history column {seq.source!r} (sequence {seq.name!r}) hold no item id of the data ({examples}); a "
               f"cell is a list of item ids or a string of ids separated by {seq.separator!r} (the sequence's "
               "`separator`)")
    if share > UNKNOWN_HISTORY_SHARE:
        raise SchemaError(f"{message}: more than {UNKNOWN_HISTORY_SHARE:.0%} of them, so the column is refused")
    log.warning("%s; those items are unknown to the model (an items file listing every item id avoids this for "
                "items never shown as candidates)", message)
    return history


def _histories(
    tables: dict[str, pd.DataFrame], schema: Schema, requests: dict, behaviours: dict, item_source: str | None,
    events: pd.DataFrame | None = None, item_table: pd.DataFrame | None = None,
) -> dict[str, dict[str, RaggedHistory]]:
    """Per split and sequence, the histories cut at each request's start: from a column of item lists (see
    ``_history_column``), from the impression log (a 0/1 column, the event at the impression's time) or from the
    events table (``{event: type}``, each event at its own time); ``events`` has the columns user, item, type, time
    (renamed by ``_read_events``)."""
    out: dict[str, dict[str, RaggedHistory]] = {name: {} for name in tables}
    from_log = {}
    known_items, numeric_ids = None, False
    if item_source is not None:
        id_columns = [t[item_source] for t in tables.values() if item_source in t.columns]
        if item_table is not None and item_source in item_table.columns:
            id_columns.append(item_table[item_source])
        if id_columns:
            known_items = pd.concat([_categorical_values(c) for c in id_columns], ignore_index=True).unique()
            numeric_ids = all(pd.api.types.is_numeric_dtype(_categorical_values(c)) for c in id_columns)
    for seq in schema.sequences:
        in_all = all(seq.source in t.columns for t in tables.values())
        if seq.name in behaviours:
            from_log[seq.name] = behaviours[seq.name]
        elif in_all:
            for name, t in tables.items():
                out[name][seq.name] = _history_column(name, t, seq, known_items, numeric_ids)
        else:
            raise SchemaError(
                f"tabular: sequence {seq.name!r}: no column {seq.source!r} in every split and no `histories:` entry "
                "to build it from the log"
            )
    unknown = set(behaviours) - {s.name for s in schema.sequences}
    if unknown:
        raise SchemaError(f"tabular: `histories:` names {sorted(unknown)} are not sequences of the schema")
    if not from_log:
        return out
    if not (schema.user_id and schema.timestamp and item_source):
        raise SchemaError("tabular: histories built from the log need user_id, timestamp and item_id in the schema")
    impressions = pd.concat([t for t in tables.values()], ignore_index=True)
    # per sequence: (user, time, item) of its source and the mask of its events there
    sources: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = {}
    log_columns = (impressions[schema.user_id].to_numpy(), impressions[schema.timestamp].to_numpy(),
                   impressions[item_source].to_numpy())
    space_labels = {t.source: t for t in schema.tasks if t.space is not None}
    for name, spec in from_log.items():
        if isinstance(spec, dict):
            if events is None:
                raise SchemaError(f"tabular: `histories: {name}: {spec}` reads the events table: set files.events")
            wanted = spec["event"] if isinstance(spec["event"], list) else [spec["event"]]
            mask = events["type"].astype(str).isin([str(w) for w in wanted]).to_numpy()
            if not mask.any():
                present = sorted(events["type"].astype(str).unique())[:10]
                raise SchemaError(f"tabular: `histories: {name}`: no event of type {wanted} in the events table; "
                                  f"its types are {present}")
            if not events["item"][mask].isin(impressions[item_source]).any():
                raise SchemaError(
                    f"tabular: `histories: {name}`: no item of the events table occurs in the impressions' "
                    f"{item_source!r} column (e.g. {events['item'][mask].iloc[0]!r} vs "
                    f"{impressions[item_source].iloc[0]!r}): do they name items the same way?"
                )
            sources[name] = (events["user"].to_numpy(), events["time"].to_numpy(), events["item"].to_numpy(), mask)
        elif spec is None:
            sources[name] = (*log_columns, None)
        elif spec not in impressions.columns:
            raise SchemaError(f"tabular: `histories: {name}: {spec}`: no column {spec!r}")
        else:
            if spec in space_labels:
                log.warning(
                    "tabular: `histories: %s: %s` places each %s at its impression's time, but it happens later "
                    "(it exists only after %s): requests in between see it too early. Give the events table with "
                    "each event's own time (files.events, `histories: %s: {event: ...}`)",
                    name, spec, spec, space_labels[spec].space, name,
                )
            sources[name] = (*log_columns, impressions[spec].fillna(0).to_numpy(dtype=np.float64) > 0)
    max_len = {s.name: s.max_len for s in schema.sequences}
    for name, table in tables.items():
        time = table[schema.timestamp].to_numpy()
        cutoff = time if requests[name] is None else request_start_times(requests[name], time)
        for seq_name, (user, event_time, item, mask) in sources.items():
            built = build_histories(
                user, event_time, item, {seq_name: mask}, table[schema.user_id].to_numpy(), cutoff,
                max_len=max_len[seq_name],
            )
            out[name][seq_name] = built[seq_name]
    return out


def _read_events(
    files: dict, base: Path, csv_options: dict, columns: dict, schema: Schema, item_source: str | None,
    is_datetime: bool,
) -> pd.DataFrame:
    """The events table with columns user, item, type, time (time in the impression log's unit)."""
    names = {
        "user": columns.get("user", schema.user_id),
        "item": columns.get("item", item_source),
        "type": columns.get("type", "type"),
        "time": columns.get("time", schema.timestamp),
    }
    table = _read(_find(str(files["events"]), base, "events"), csv_options, None)
    for key, column in names.items():
        if column is None or column not in table.columns:
            raise SchemaError(
                f"tabular events file: no {key} column {column!r} (columns: {sorted(table.columns)[:12]}); name it "
                f"with `events: {{{key}: COLUMN}}`"
            )
        if table[column].isna().any():
            raise SchemaError(
                f"tabular events file: {key} column {column!r} has {int(table[column].isna().sum())} missing values"
            )
    out = pd.DataFrame({key: table[column] for key, column in names.items()})
    out["time"], events_datetime = _time_to_int(out["time"], names["time"])
    if events_datetime != is_datetime:
        raise SchemaError(
            f"tabular events file: time column {names['time']!r} holds "
            f"{'dates' if events_datetime else 'numbers'} but the timestamp column {schema.timestamp!r} holds "
            f"{'dates' if is_datetime else 'numbers'}; give both in the same form"
        )
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------
def _needed_columns(schema: Schema, behaviours: dict) -> list[str]:
    cols = [f.source for f in schema.categorical] + [f.source for f in schema.dense]
    cols += [t.source for t in schema.tasks] + [s.source for s in schema.sequences] + list(schema.values)
    cols += [c for c in (schema.user_id, schema.timestamp, schema.request_id) if c]
    cols += [c for c in behaviours.values() if isinstance(c, str)]
    return list(dict.fromkeys(cols))


def _check_key_columns(table: pd.DataFrame, schema: Schema, role: str) -> None:
    """``user_id`` and ``request_id`` name raw columns (``item_id`` names a field): a missing one is named with the fix."""
    for key in ("user_id", "request_id"):
        column = getattr(schema, key)
        if column is None or column in table.columns:
            continue
        field = next((f for f in schema.categorical + schema.dense if f.name == column and f.column), None)
        hint = f"; the field {column!r} reads column {field.column!r}: write `{key}: {field.column}`" if field else ""
        raise SchemaError(
            f"tabular {role} file: `{key}: {column}` names no column of the file ({key} takes a raw column name, "
            f"item_id a field name){hint}"
        )


def build(config: dict, opts: dict, schema: Schema, base: Path, name: str) -> RawDataset:
    files = opts["files"]
    csv_options = dict(files.get("csv") or {})
    columns = _needed_columns(schema, opts["histories"])
    given = {role: _read(_find(str(files[role]), base, role), csv_options, columns)
             for role in ("train", "valid", "test", "data") if files.get(role)}
    if "data" in given and any(r in given for r in ("train", "valid", "test")):
        raise SchemaError("tabular: give either `data` (one file + a split rule) or train/valid/test files, not both")
    if not given:
        raise SchemaError("tabular: no data file: set files.train (+ valid/test) or files.data in the YAML or options")
    if "data" not in given and "train" not in given:
        raise SchemaError("tabular: a train file is needed when valid/test files are given")
    for role, table in given.items():
        _check_key_columns(table, schema, role)
    is_datetime = False
    if schema.timestamp:
        for role, table in given.items():
            if schema.timestamp not in table.columns:
                raise SchemaError(f"tabular {role} file: missing timestamp column {schema.timestamp!r}")
            table[schema.timestamp], is_datetime = _time_to_int(table[schema.timestamp], schema.timestamp)
    pool = given.get("data", given.get("train"))
    need = [s for s in ("valid", "test") if s not in given]
    tables = _carve(pool, need, opts["split"], schema, is_datetime) if need else {"train": pool}
    for s in ("valid", "test"):
        if s in given:
            tables[s] = given[s]
    tables = {s: tables[s] for s in ("train", "valid", "test")}
    # Rows in (user, time) order when both exist: deterministic, and requests / histories read naturally.
    if schema.user_id and schema.timestamp:
        tables = {
            s: t.sort_values([schema.user_id, schema.timestamp], kind="stable").reset_index(drop=True)
            for s, t in tables.items()
        }
    requests = _requests(tables, schema, opts["requests"], is_datetime)
    for split, table in tables.items():
        if requests[split] is not None:
            check_constant_per_request(table, requests[split], schema, f"tabular {split} split")
    item_source = None
    if schema.item_id:
        item_source = next(f.source for f in schema.categorical if f.name == schema.item_id)
    events = None
    if files.get("events"):
        events = _read_events(files, base, csv_options, opts["events"], schema, item_source, is_datetime)
    item_table = None
    if files.get("items"):
        item_table = _read(_find(str(files["items"]), base, "items"), csv_options, None)
    histories = _histories(tables, schema, requests, opts["histories"], item_source, events, item_table)
    info: dict = {
        "base_dir": str(base),
        "split_rule": opts["split"] if need else "files",
        "requests_rule": opts["requests"],
        "time_unit": "ms" if is_datetime else None,  # dates become ms; a number's unit is the file's (sessions.py)
    }
    if events is not None:
        info["event_rows"] = int(len(events))
    for s, t in tables.items():
        info[f"{s}_rows"] = int(len(t))
        if requests[s] is not None:
            info[f"{s}_requests"] = size_distribution(pd.factorize(requests[s])[0])
    splits = {s: RawSplit(table=tables[s], histories=histories[s], request=requests[s]) for s in tables}
    return RawDataset(name=name, schema=schema, item_table=item_table, info=info, **splits)


def load(data_dir: str | Path | None = None, cache_root: str | Path | None = None, tasks=None, **options):
    """Your files as an ``EncodedDataset`` (cached). ``schema=PATH`` (a YAML file, see module doc) is required; file
    paths in it are relative to ``data_dir`` (or to the YAML's folder when ``data_dir`` is None). ``tasks``: a subset
    of the schema's tasks (list or comma-separated string); only their label columns are read and validated."""
    if tasks is not None:
        options["tasks"] = tasks
    hash_buckets = options.pop("hash_buckets", None)  # {field: buckets}, load_or_build (or per field in the schema)
    if not options.get("schema"):
        raise SchemaError("tabular: the option schema=PATH (a YAML schema file) is required")
    directory = Path(data_dir) if data_dir is not None else None
    if directory is not None and not directory.is_dir():
        raise SchemaError(f"tabular: data directory {directory} does not exist")
    schema_path = _resolve_schema_path(options["schema"], directory)
    config = read_config(schema_path)
    opts = _merge_options(config, {k: v for k, v in options.items() if k != "schema"})
    schema_dict = _schema_dict(config)
    if opts["history_len"] is not None:
        schema_dict["sequences"] = [
            {**({"name": seq} if isinstance(seq, str) else seq), "max_len": int(opts["history_len"])}
            for seq in schema_dict.get("sequences") or []
        ]
    schema_dict["categorical"] = [
        {"min_count": TABULAR_MIN_COUNT, **({"name": f} if isinstance(f, str) else f)}
        for f in schema_dict.get("categorical") or []
    ]
    schema = Schema.from_dict(schema_dict)
    if opts["tasks"]:
        schema = schema.select_tasks(list(opts["tasks"]))
    base = directory if directory is not None else schema_path.parent
    name = str(opts["name"] or config.get("name") or schema_path.stem)
    files = opts["files"]
    fingerprints = {}
    for role in FILE_ROLES:
        if files.get(role):
            fingerprints[role] = [file_fingerprint(p) for p in _find(str(files[role]), base, role)]
    key_parts = {
        "loader": NAME,
        "version": LOADER_VERSION,
        "name": name,
        "schema": schema.to_dict(),
        "options": {k: v for k, v in opts.items()},
        "files": fingerprints,
    }
    return load_or_build(name, key_parts, lambda: build(config, opts, schema, base, name), cache_root, hash_buckets)

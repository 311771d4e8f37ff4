"""Raw splits -> validated, encoded columns, cached on disk so a second run skips preprocessing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from onerank.data import encoding
from onerank.data.encoding import OOV, Encoders, RaggedHistory
from onerank.data.schema import Schema, SchemaError

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
GROUPS = ("categorical", "dense", "labels", "label_mask", "histories", "history_times", "values")  # of EncodedSplit
CACHE_FORMAT_VERSION = 1


@dataclass
class RawSplit:
    """One split as the loaders produce it.

    ``table`` holds the schema's columns; ``histories`` one ragged history per behaviour sequence (row-aligned with the
    table); ``request`` an optional request index per row; ``time`` optional event times used by list-wise grouping.
    """

    table: pd.DataFrame
    histories: dict[str, RaggedHistory] = field(default_factory=dict)
    request: np.ndarray | None = None


@dataclass
class RawDataset:
    name: str
    schema: Schema
    train: RawSplit
    valid: RawSplit
    test: RawSplit
    item_table: pd.DataFrame | None = None  # item side features, one row per item, keyed by the item id column
    info: dict = field(default_factory=dict)


@dataclass
class EncodedSplit:
    categorical: dict[str, np.ndarray]
    dense: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    label_mask: dict[str, np.ndarray]
    histories: dict[str, np.ndarray] = field(default_factory=dict)  # seq -> [n, L] item codes, left-padded
    history_times: dict[str, np.ndarray] = field(default_factory=dict)  # seq -> [n, L], -1 on padding
    user: np.ndarray | None = None  # [n] user index (for GAUC and request grouping)
    request: np.ndarray | None = None  # [n] request index, rows of a request contiguous
    time: np.ndarray | None = None  # [n] event time
    session: np.ndarray | None = None  # [n] session index (data/sessions.py), sessions contiguous and time-ordered
    values: dict[str, np.ndarray] = field(default_factory=dict)  # schema value column -> [n] float64 (evaluation only)

    def __len__(self) -> int:
        return len(next(iter(self.labels.values())))

    def arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for group in GROUPS:
            for name, arr in getattr(self, group).items():
                out[f"{group}.{name}"] = arr
        for name in ("user", "request", "time", "session"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "EncodedSplit":
        groups: dict[str, dict[str, np.ndarray]] = {g: {} for g in GROUPS}
        single = {}
        for key, arr in arrays.items():
            if "." in key:
                group, name = key.split(".", 1)
                groups[group][name] = arr
            else:
                single[key] = arr
        return cls(**groups, **single)


@dataclass
class EncodedDataset:
    name: str
    schema: Schema
    encoders: Encoders
    item_table: dict[str, np.ndarray]  # item field -> code per item code (index = item id code)
    train: EncodedSplit
    valid: EncodedSplit
    test: EncodedSplit
    info: dict = field(default_factory=dict)

    def split(self, name: str) -> EncodedSplit:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def label_values(self, name: str) -> dict[str, np.ndarray]:
        """The labels of split ``name`` in their own units (regression tasks are stored transformed for training);
        compare them with ``Trainer.predict``'s outputs. Rows outside a task's space hold meaningless values."""
        return self.encoders.to_label_units(self.split(name).labels)

    @property
    def vocab_sizes(self) -> dict[str, int]:
        return {name: len(v) for name, v in self.encoders.vocabularies.items()}

    # ---- cache -----------------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write to a temporary sibling directory, then rename: a crash never leaves a half-written cache behind."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            for split in SPLITS:
                for key, arr in self.split(split).arrays().items():
                    np.save(tmp / f"{split}__{key}.npy", arr, allow_pickle=False)
            for key, arr in self.item_table.items():
                np.save(tmp / f"item_table__{key}.npy", arr, allow_pickle=False)
            manifest = {
                "format": CACHE_FORMAT_VERSION,
                "name": self.name,
                "schema": self.schema.to_dict(),
                "encoders": self.encoders.state(),
                "info": self.info,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, default=str))
            if (directory / "manifest.json").exists():
                # Another process wrote the same key (same content) meanwhile: keep it, readers may be using it.
                shutil.rmtree(tmp, ignore_errors=True)
                return
            if directory.exists():  # an incomplete leftover
                shutil.rmtree(directory, ignore_errors=True)
            try:
                os.replace(tmp, directory)
            except OSError:
                # Another process finished the same cache first (same key, same content): keep theirs.
                if not (directory / "manifest.json").exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: str | Path) -> "EncodedDataset":
        directory = Path(directory)
        manifest = json.loads((directory / "manifest.json").read_text())
        if manifest.get("format") != CACHE_FORMAT_VERSION:
            raise SchemaError(f"{directory}: cache format {manifest.get('format')} is not {CACHE_FORMAT_VERSION}")
        per_split: dict[str, dict[str, np.ndarray]] = {s: {} for s in SPLITS}
        item_table = {}
        for path in directory.glob("*.npy"):
            prefix, key = path.stem.split("__", 1)
            arr = np.load(path, allow_pickle=False)
            if prefix == "item_table":
                item_table[key] = arr
            else:
                per_split[prefix][key] = arr
        return cls(
            name=manifest["name"],
            schema=Schema.from_dict(manifest["schema"]),
            encoders=Encoders.from_state(manifest["encoders"]),
            item_table=item_table,
            info=manifest.get("info", {}),
            **{s: EncodedSplit.from_arrays(per_split[s]) for s in SPLITS},
        )


def encode_dataset(raw: RawDataset) -> EncodedDataset:
    """Validate every split against the schema, fit encoders on train, encode all three splits."""
    schema = raw.schema
    for split in SPLITS:
        rs: RawSplit = getattr(raw, split)
        encoding.validate_table(rs.table, schema, where=f"{raw.name} {split} split")
        if rs.request is not None and len(rs.request) != len(rs.table):
            raise SchemaError(
                f"{raw.name} {split} split: {len(rs.request)} request ids for {len(rs.table)} rows"
            )
        for seq in schema.sequences:
            if seq.name not in rs.histories:
                raise SchemaError(f"{raw.name} {split} split: behaviour sequence {seq.name!r} is missing")
            if rs.histories[seq.name].num_rows != len(rs.table):
                raise SchemaError(
                    f"{raw.name} {split} split: sequence {seq.name!r} has {rs.histories[seq.name].num_rows} rows, "
                    f"the table {len(rs.table)}"
                )
    encoders = encoding.fit_encoders(
        raw.train.table, schema, raw.train.histories, raw.item_table, raw.train.request
    )
    encoders.label_transforms = encoding.fit_label_transforms(raw.train.table, schema)
    encoded = {split: _encode_split(getattr(raw, split), schema, encoders) for split in SPLITS}
    info = dict(raw.info)
    hashing = hashing_report(raw, encoders)
    if hashing:
        info["hashing"] = hashing
    return EncodedDataset(
        name=raw.name,
        schema=schema,
        encoders=encoders,
        item_table=_encode_item_table(raw, schema, encoders),
        info=info,
        **encoded,
    )


def hashing_report(raw: RawDataset, encoders: Encoders) -> dict[str, dict]:
    """Per hashed field, how its distinct train ids (for the item id, with the train histories' items) share buckets
    (``HashedVocabulary.collisions``); logged, and kept in the dataset's ``info["hashing"]``."""
    report = {}
    for f in raw.schema.categorical:
        vocab = encoders.vocabularies[f.name]
        if not isinstance(vocab, encoding.HashedVocabulary):
            continue
        values = [encoding._categorical_values(raw.train.table[f.source])]
        if f.name == raw.schema.item_id:
            values += [encoding._categorical_values(pd.Series(h.values)) for h in raw.train.histories.values()
                       if len(h.values)]
        report[f.name] = vocab.collisions(pd.concat(values, ignore_index=True).to_numpy())
        log.info("%s: field %r hashed into %d buckets: %d distinct train ids, collision rate %.4f", raw.name, f.name,
                 vocab.buckets, report[f.name]["distinct_ids"], report[f.name]["collision_rate"])
    return report


def _encode_split(rs: RawSplit, schema: Schema, encoders: Encoders) -> EncodedSplit:
    table = rs.table
    labels, masks = encoding.encode_labels(schema, table, encoders.label_transforms)
    histories, history_times = {}, {}
    for seq in schema.sequences:
        packed, times = encoding.encode_history(encoders, schema, seq.name, rs.histories[seq.name])
        histories[seq.name] = packed
        if times is not None:
            history_times[seq.name] = times
    user = None
    if schema.user_id and schema.user_id in table.columns:
        user = pd.factorize(table[schema.user_id])[0].astype(np.int64)
    time_col = None
    if schema.timestamp and schema.timestamp in table.columns:
        time_col = table[schema.timestamp].to_numpy(dtype=np.int64)
    request = rs.request
    if request is None and schema.request_id and schema.request_id in table.columns:
        request = pd.factorize(table[schema.request_id])[0].astype(np.int64)
    split = EncodedSplit(
        categorical=encoding.encode_categorical(encoders, schema, table),
        dense=encoding.encode_dense(encoders, schema, table),
        labels=labels,
        label_mask=masks,
        histories=histories,
        history_times=history_times,
        user=user,
        request=None if request is None else np.asarray(request, dtype=np.int64),
        time=time_col,
        values={v: table[v].to_numpy(dtype=np.float64) for v in schema.values},
    )
    if split.request is not None:
        split = _contiguous_requests(split)
    return split


def _contiguous_requests(split: EncodedSplit) -> EncodedSplit:
    """Reorder rows so each request's impressions are contiguous, and renumber requests 0..R-1 in order."""
    order = np.argsort(split.request, kind="stable")
    arrays = {k: v[order] for k, v in split.arrays().items()}
    arrays["request"] = pd.factorize(arrays["request"])[0].astype(np.int64)
    return EncodedSplit.from_arrays(arrays)


def _encode_item_table(raw: RawDataset, schema: Schema, encoders: Encoders) -> dict[str, np.ndarray]:
    """For every candidate-side field, the code of each item id code, so history items get the same side features
    as candidates. Items without known side features get OOV; impression fields (display position, slot) belong to
    a showing, not to the item: every history item gets their padding code."""
    if not schema.item_id:
        return {}
    id_field = next(f for f in schema.categorical if f.name == schema.item_id)
    id_vocab = encoders.vocabularies[schema.item_id]
    side = [f for f in schema.categorical if f.group == "item" and f.name != schema.item_id]
    table = {f.name: np.full(len(id_vocab), encoding.PAD, dtype=np.int64)
             for f in schema.categorical if f.group == "impression"}
    source = raw.item_table if raw.item_table is not None else raw.train.table
    missing = [c for c in [id_field.source, *(f.source for f in side)] if c not in source.columns]
    if missing:
        where = "the items file" if raw.item_table is not None else "the train split (there is no items file)"
        raise SchemaError(f"{raw.name}: {where} lacks the column(s) {missing} of the item fields; an item table holds "
                          "the item id and the attributes of items (`group: item`), while fields of the showing "
                          "(position, slot) take `group: impression`")
    items = source.drop_duplicates(subset=[id_field.source], keep="last")
    item_codes = id_vocab.encode(encoding._categorical_values(items[id_field.source]))
    known = item_codes != OOV
    for f in side:
        column = np.full(len(id_vocab), OOV, dtype=np.int64)
        column[0] = encoding.PAD
        codes = encoders.vocabularies[f.name].encode(encoding._categorical_values(items[f.source]))
        column[item_codes[known]] = codes[known]
        table[f.name] = column
    return table


# ---------------------------------------------------------------------------------------------------------------------
# Caching
# ---------------------------------------------------------------------------------------------------------------------
def file_fingerprint(path: str | Path) -> dict:
    p = Path(path)
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(parts: dict) -> str:
    blob = json.dumps({"format": CACHE_FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_root() -> Path:
    return Path(os.environ.get("ONERANK_CACHE", Path.home() / ".cache" / "onerank"))


def load_or_build(
    name: str, key_parts: dict, build: Callable[[], RawDataset], cache_root: str | Path | None = None,
    hash_buckets: dict[str, int] | None = None,
) -> EncodedDataset:
    """Return the cached encoded dataset for ``key_parts`` or build, encode and cache it.

    ``hash_buckets`` (the loaders' option of that name, ``{field: buckets}``) hashes those fields instead of fitting
    vocabularies (``Schema.with_hashing``); it is part of the cache key. ``cache_root=False``-like values are not
    supported on purpose: ``ONERANK_CACHE`` picks the folder.
    """
    if hash_buckets:
        if not isinstance(hash_buckets, dict):
            raise SchemaError(f"hash_buckets must map field names to numbers of buckets, got {hash_buckets!r}")
        key_parts = {**key_parts, "hash_buckets": dict(sorted(hash_buckets.items()))}
        unhashed = build

        def build() -> RawDataset:
            raw = unhashed()
            return dataclasses.replace(raw, schema=raw.schema.with_hashing(hash_buckets))

    root = Path(cache_root) if cache_root is not None else default_cache_root()
    key = cache_key(key_parts)
    directory = root / f"{name}-{key}"
    if (directory / "manifest.json").exists():
        try:
            ds = EncodedDataset.load(directory)
            log.info("loaded cached %s from %s", name, directory)
            ds.info["cache_hit"] = True
            ds.info["cache_key"] = key
            return ds
        except Exception as exc:  # a corrupt cache is rebuilt, never trusted
            log.warning("cache %s unreadable (%s); rebuilding", directory, exc)
    start = time.perf_counter()
    ds = encode_dataset(build())
    ds.info["preprocess_seconds"] = round(time.perf_counter() - start, 2)
    ds.save(directory)
    ds.info["cache_hit"] = False
    ds.info["cache_key"] = key
    ds.info["cache_dir"] = str(directory)
    log.info("preprocessed %s in %.1fs, cached at %s", name, ds.info["preprocess_seconds"], directory)
    return ds

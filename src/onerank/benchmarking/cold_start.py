"""The cold-start protocol of the item graph benchmark (docs/item_graph.md): a share of the items is held out of
training with every trace of them (their training impressions, their places in training histories, hence every edge
of theirs), then enters the vocabulary after training, as a refresh does, and is scored in valid and test.

``cold_split`` removes the items from a ``RawDataset`` before encoding (so the vocabularies never see them);
``refresh_items`` gives them codes after the training vocabulary (the id embedding reads those as out-of-vocabulary,
an item vector table gives each its own row) in the valid and test splits, their histories and the item table.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pandas as pd

from onerank.data.dataset import EncodedDataset, RawDataset, RawSplit
from onerank.data.encoding import OOV, RaggedHistory, Vocabulary, _categorical_values, encode_history


def choose_cold_items(raw: RawDataset, share: float, seed: int) -> np.ndarray:
    """A random ``share`` of the items shown in the training split (raw ids, sorted)."""
    column = next(f.source for f in raw.schema.categorical if f.name == raw.schema.item_id)
    items = np.unique(_categorical_values(raw.train.table[column]).to_numpy())
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(items, size=max(1, int(round(share * len(items)))), replace=False))


def _without(history: RaggedHistory, rows: np.ndarray, cold: np.ndarray) -> RaggedHistory:
    """Rows ``rows`` of ``history`` with the cold items taken out of each."""
    lengths = np.diff(history.offsets)[rows]
    source = np.repeat(history.offsets[rows], lengths) + np.arange(lengths.sum()) - np.repeat(
        np.cumsum(lengths) - lengths, lengths)
    values = history.values[source]
    keep = ~np.isin(_categorical_values(pd.Series(values)).to_numpy(), cold)
    owner = np.repeat(np.arange(len(rows)), lengths)[keep]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=len(rows)))])
    times = None if history.times is None else history.times[source][keep]
    return RaggedHistory(values=values[keep], offsets=offsets, times=times)


def cold_split(raw: RawDataset, cold: np.ndarray) -> RawDataset:
    """``raw`` without the ``cold`` items in its training split: their impressions dropped and their entries taken
    out of the remaining rows' histories. Valid and test keep them (they are what the protocol scores)."""
    column = next(f.source for f in raw.schema.categorical if f.name == raw.schema.item_id)
    train = raw.train
    keep = np.flatnonzero(~np.isin(_categorical_values(train.table[column]).to_numpy(), cold))
    split = RawSplit(
        table=train.table.iloc[keep].reset_index(drop=True),
        histories={seq: _without(h, keep, cold) for seq, h in train.histories.items()},
        request=None if train.request is None else train.request[keep],
    )
    info = dict(raw.info, cold_items=int(len(cold)))
    return dataclasses.replace(raw, train=split, info=info)


def encoded_order(split: RawSplit) -> np.ndarray:
    """The encoded split's rows as raw rows: ``encode_dataset`` groups a split's rows by request (stable)."""
    return np.argsort(split.request, kind="stable") if split.request is not None else np.arange(len(split.table))


def refresh_items(ds: EncodedDataset, raw: RawDataset, new_items: np.ndarray) -> EncodedDataset:
    """A copy of ``ds`` whose valid and test splits (candidates and histories) and item table know ``new_items``
    (raw ids, none of them in the training vocabulary) by codes V, V+1, ... after the training vocabulary's V codes.
    The encoders keep the training vocabulary: models size their id tables from it."""
    schema = ds.schema
    item_id = schema.item_id
    column = next(f.source for f in schema.categorical if f.name == item_id)
    trained = ds.encoders.vocabularies[item_id]
    if (trained.encode(pd.Series(new_items)) != OOV).any():
        raise ValueError("refresh_items: some new items are in the training vocabulary already")
    extended = Vocabulary(trained.to_list() + list(new_items))
    encoders = copy.copy(ds.encoders)
    encoders.vocabularies = dict(ds.encoders.vocabularies, **{item_id: extended})
    out = copy.copy(ds)
    for name in ("valid", "test"):
        rs, enc = getattr(raw, name), ds.split(name)
        order = encoded_order(rs)
        ids = _categorical_values(rs.table[column]).to_numpy()[order]
        codes = extended.encode(ids)
        if not np.array_equal(np.where(codes < len(trained), codes, OOV), enc.categorical[item_id]):
            raise ValueError(f"refresh_items: the raw {name} split does not line up with the encoded one")
        histories = {seq: encode_history(encoders, schema, seq, rs.histories[seq])[0][order] for seq in enc.histories}
        setattr(out, name, dataclasses.replace(enc, categorical=dict(enc.categorical, **{item_id: codes}),
                                               histories=histories))
    table = raw.item_table if raw.item_table is not None else raw.train.table
    rows = table.drop_duplicates(subset=[column], keep="last").set_index(column)
    rows.index = _categorical_values(pd.Series(rows.index)).to_numpy()
    side = {}
    for f, codes in ds.item_table.items():
        source = next(c.source for c in schema.categorical if c.name == f)
        new = np.full(len(new_items), OOV, dtype=np.int64)
        present = np.isin(new_items, rows.index)
        if present.any():
            values = rows.loc[new_items[present], source]
            new[present] = ds.encoders.vocabularies[f].encode(_categorical_values(values.reset_index(drop=True)))
        side[f] = np.concatenate([codes, new])
    out.item_table = side
    out.info = dict(ds.info, refreshed_items=int(len(new_items)))
    return out


def cold_rows(ds: EncodedDataset, split: str) -> np.ndarray:
    """Rows of ``split`` whose candidate is an item added after training (code beyond the training vocabulary)."""
    return ds.split(split).categorical[ds.schema.item_id] >= ds.vocab_sizes[ds.schema.item_id]

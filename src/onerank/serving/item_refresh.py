"""Serve items added after training: a refreshed checkpoint whose item vector table and vocabulary know them.

A model trained with item vectors from a graph encoder (``features/item_graph.py``) scores a new item well only if
the item has a vector. ``refresh_checkpoint`` computes the vectors of new items from their side features and
whatever edges they have (co-engagements with items old or new) with the saved encoder and graph, without
retraining, and writes a new checkpoint: the item id vocabulary extended by the new ids (codes after the training
vocabulary, which the id embedding reads as out-of-vocabulary), the item table extended by their side fields, and the
refreshed table in the weights. The ranker, the HTTP service and ``onerank export`` then serve the new items like
any other: this is what the service does (a refreshed table, e.g. daily), not a graph computation per request.
``new_item_vectors`` is the same computation for callers that embed items at request time themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from onerank.data.encoding import OOV, Encoders, Vocabulary, _categorical_values
from onerank.features.item_graph import ItemGraph, ItemGraphEncoder, load_encoder
from onerank.training import checkpoint as ckpt

VECTOR_SUFFIX = "item_vectors.table"


def new_item_vectors(encoder: ItemGraphEncoder, graph: ItemGraph, features: np.ndarray,
                     edges: np.ndarray) -> tuple[ItemGraph, np.ndarray]:
    """(the grown graph, its vector table): new nodes after the graph's (``features`` [M, F] side-field codes) with
    ``edges`` [K, 2] between item codes. Old items' vectors change where a new item enters their neighbourhood."""
    grown = graph.with_items(features, edges)
    return grown, encoder.table(grown)


def refresh_checkpoint(checkpoint: str | Path, encoder_file: str | Path, items: list[dict[str, Any]],
                       edges: list[tuple[Any, Any]], out: str | Path) -> dict[str, int]:
    """Write ``out``: ``checkpoint`` serving ``items`` (raw rows: the item id and the encoder's side fields; ids new
    to the checkpoint) with vectors from ``encoder_file`` and ``edges`` (pairs of raw item ids, old or new).
    Returns counts of what was added. ``out`` must not exist (nothing on disk is replaced)."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; give a new path for the refreshed checkpoint")
    state = ckpt.load(checkpoint, kind="model")
    meta = state["meta"]
    space = meta["space"]
    if not space.get("item_vectors"):
        raise ValueError(f"{checkpoint} was trained without item vectors; there is no table to refresh")
    item_id = space["schema"]["item_id"]
    encoders = Encoders.from_state(meta["encoders"])
    vocabulary = encoders.vocabularies[item_id]
    encoder, graph = load_encoder(encoder_file)
    if graph.num_nodes != space["item_vectors"]["rows"]:
        raise ValueError(f"{encoder_file}: its graph has {graph.num_nodes} items, the checkpoint's table "
                         f"{space['item_vectors']['rows']}; refresh with the encoder the table came from")
    frame = pd.DataFrame(items)
    if item_id not in frame.columns:
        raise ValueError(f"new items need their id {item_id!r}")
    ids = _categorical_values(frame[item_id]).to_numpy()
    known = vocabulary.encode(pd.Series(ids)) != OOV
    if known.any() or len(set(ids.tolist())) != len(ids):
        raise ValueError(f"new items must be new and distinct; {ids[known][:5].tolist()} are known already")
    missing = [f for f in graph.fields if f not in frame.columns]
    if missing:
        raise ValueError(f"new items lack the encoder's side fields {missing}")
    extended = Vocabulary(vocabulary.to_list() + ids.tolist())
    start = graph.num_nodes
    codes = {name: encoders.vocabularies[name].encode(_categorical_values(frame[name])) for name in graph.fields}
    features = np.stack([codes[f] for f in graph.fields], axis=1) if graph.fields else np.zeros((len(ids), 0))
    ends = [v for pair in edges for v in pair]
    pairs = extended.encode(_categorical_values(pd.Series(ends))).reshape(-1, 2) if ends else \
        np.zeros((0, 2), dtype=np.int64)
    if len(pairs) and (pairs == OOV).any():
        raise ValueError("every edge must join items the checkpoint or the new items know")
    if extended.encode(pd.Series(ids)).min() != start:
        raise ValueError("the checkpoint's vocabulary and its item vector table do not line up")
    _, table = new_item_vectors(encoder, graph, features, pairs)
    weights = state["model"]
    names = [k for k in weights if k.endswith(VECTOR_SUFFIX)]
    for name in names:
        weights[name] = torch.from_numpy(table)
    meta["encoders"] = dict(meta["encoders"], vocabularies=dict(meta["encoders"]["vocabularies"],
                                                                **{item_id: extended.to_list()}))
    item_table = {}
    for name, column in meta["item_table"].items():
        if name in frame.columns:
            side = encoders.vocabularies[name].encode(_categorical_values(frame[name]))
        else:
            side = np.full(len(ids), OOV, dtype=np.int64)
        item_table[name] = np.concatenate([np.asarray(column, dtype=np.int64), side])
    meta["item_table"] = item_table
    meta["space"] = dict(space, item_vectors=dict(space["item_vectors"], rows=int(table.shape[0])))
    meta["refreshed_from"] = {"checkpoint": str(checkpoint), "sha256": ckpt.file_sha256(checkpoint),
                              "new_items": int(len(ids)), "new_edges": int(len(pairs))}
    ckpt.save_atomic(state, out)
    return {"new_items": int(len(ids)), "new_edges": int(len(pairs)), "tables": len(names)}

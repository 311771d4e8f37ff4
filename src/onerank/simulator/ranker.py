"""The ranker under test, scoring a simulated session's candidate pool: a onerank checkpoint's model on its own
encoded dataset, its predictions calibrated by the fusion file's maps.

A simulated user's request context is the user's first impression of a split (their side fields, the hour, and the
behaviour histories up to that moment); every pool video takes the candidate's place in it. The ranker sees the pool
once, at the session's start, as a feed ranker scores a retrieved pool; the fusion policy then re-weights these
predictions request by request.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from onerank.data.batching import Batch
from onerank.data.dataset import EncodedDataset

CHUNK_ROWS = 8192  # (user, video) pairs per model call


class RankerScorer:
    """``scorer(users, pools) -> [N, P, K]``: the model's calibrated predictions of ``tasks`` (raw user / video ids)."""

    def __init__(self, model: torch.nn.Module, dataset: EncodedDataset, split: str, tasks: list[str],
                 duration_s: Callable[[np.ndarray], np.ndarray],
                 calibrate: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None) -> None:
        schema = dataset.schema
        unknown = [t for t in tasks if t not in schema.task_names]
        if unknown:
            raise ValueError(f"fused tasks {unknown} are not the model's tasks {schema.task_names}")
        self.model, self.dataset, self.tasks = model.eval(), dataset, list(tasks)
        self.duration_s, self.calibrate = duration_s, calibrate
        self.enc = dataset.split(split)
        vocab = dataset.encoders.vocabularies
        self.user_vocab, self.item_vocab = vocab[schema.user_id], vocab[schema.item_id]
        user_codes = self.enc.categorical[schema.user_id]
        first = np.unique(user_codes, return_index=True)
        # users unseen in train share the OOV code: none of them has a context of its own
        self.context_row = {c: r for c, r in zip(first[0].tolist(), first[1].tolist()) if c >= 2}
        self.item_table = {k: torch.as_tensor(np.asarray(v, dtype=np.int64)) for k, v in dataset.item_table.items()}
        self.request_categorical = [f.name for f in schema.categorical if f.group != "item"]
        self.item_categorical = [f.name for f in schema.categorical if f.group == "item" and f.name != schema.item_id]
        self.request_dense = [f.name for f in schema.dense if f.group != "item"]
        self.item_dense = [f.name for f in schema.dense if f.group == "item"]
        extra = [f for f in self.item_dense if f != "duration"]
        if extra:
            raise ValueError(f"the simulator knows only the video's duration as a dense item field, not {extra}")

    def users(self) -> np.ndarray:
        """Raw ids of the users who have a context in this split."""
        codes = np.array(sorted(self.context_row), dtype=np.int64)
        return np.asarray(self.user_vocab.to_list(), dtype=object)[codes - 2].astype(np.int64)  # known codes from 2

    def __call__(self, users: np.ndarray, pools: np.ndarray) -> np.ndarray:
        schema = self.dataset.schema
        codes = self.user_vocab.encode(np.asarray(users))
        missing = [u for u, c in zip(users, codes) if int(c) not in self.context_row]
        if missing:
            raise ValueError(f"user {missing[0]} has no impression in the ranker's split to take a context from")
        rows = np.array([self.context_row[int(c)] for c in codes])
        n, p = pools.shape
        row = np.repeat(rows, p)
        items = self.item_vocab.encode(pools.ravel())
        duration = self.dataset.encoders.scalers["duration"].transform(self.duration_s(pools.ravel())) \
            if self.item_dense else None
        out = {t: np.empty(n * p) for t in self.tasks}
        with torch.inference_mode():
            for lo in range(0, n * p, CHUNK_ROWS):
                hi = min(lo + CHUNK_ROWS, n * p)
                r, item = torch.as_tensor(row[lo:hi]), torch.as_tensor(items[lo:hi], dtype=torch.long)
                categorical = {f: torch.as_tensor(self.enc.categorical[f])[r] for f in self.request_categorical}
                categorical[schema.item_id] = item
                categorical.update({f: self.item_table[f][item] for f in self.item_categorical})
                dense = {f: torch.as_tensor(self.enc.dense[f])[r] for f in self.request_dense}
                if duration is not None:
                    dense["duration"] = torch.as_tensor(duration[lo:hi], dtype=torch.float32)
                histories = {}
                for seq, codes_ in self.enc.histories.items():
                    h = torch.as_tensor(codes_)[r]
                    histories[seq] = {schema.item_id: h, **{f: t[h] for f, t in self.item_table.items()}}
                batch = Batch(categorical=categorical, dense=dense, histories=histories, labels={}, label_mask={},
                              user=r.long(), request=None)
                preds = {k: v.float().numpy() for k, v in self.model.predict(batch).items()}
                preds = self.dataset.encoders.to_label_units(preds)
                if self.calibrate is not None:
                    preds = self.calibrate(preds)
                for t in self.tasks:
                    out[t][lo:hi] = preds[t]
        return np.stack([out[t].reshape(n, p) for t in self.tasks], axis=2)

"""What a training run reads, decided on the data side: the train split's batches (from memory, or streamed from a
Parquet copy when it is large or already on disk), the valid / test splits in memory for evaluation, and the training
split's labels (for the output biases' base rates). The trainer is handed a ``TrainingData`` and never asks where
its batches come from.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from onerank.data.batching import BatchLoader, TensorSplit
from onerank.data.dataset import SPLITS, EncodedDataset
from onerank.data.streaming import StreamingBatchLoader, parquet_labels, stream_source_for

T = TypeVar("T")


@dataclass
class TrainingData:
    dataset: EncodedDataset
    train: BatchLoader | StreamingBatchLoader  # shuffled by (seed, epoch); this rank's share under DDP
    splits: dict[str, TensorSplit]  # the splits held in memory: valid and test, and train unless it streams
    by_request: bool  # batches hold whole requests (list-wise models and objectives)
    by_session: bool = False  # batches hold whole sessions in time order (HEROES, data/sessions.py)
    stream_source: str | Path | None = None  # the Parquet train split (a folder or a URI), when streaming
    scratch: Path | None = None  # a temporary Parquet copy, removed by ``close``

    @property
    def streaming(self) -> bool:
        return self.stream_source is not None

    def eval_batches(self, split: str, batch_size: int) -> BatchLoader:
        """``split`` in row order (unshuffled), in batches of about ``batch_size`` impressions."""
        if split not in self.splits:
            raise ValueError(f"split {split!r} is streamed from disk; only valid and test can be predicted")
        return BatchLoader(self.splits[split], batch_size, by_request=self.by_request, by_session=self.by_session)

    def train_labels(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(labels, label masks) of the whole training split, from memory or from its Parquet stream."""
        if self.stream_source is None:
            train = self.dataset.split("train")
            return train.labels, train.label_mask
        return parquet_labels(self.stream_source, self.dataset.schema.task_names)

    def close(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


def training_data(
    dataset: EncodedDataset,
    batch_size: int,
    seed: int,
    by_request: bool,
    streaming: str = "auto",
    threshold_mb: float = 4096.0,
    buffer_rows: int = 262_144,
    out_dir: str | Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    all_ranks: Callable[[bool], bool] | None = None,
    write_first: Callable[[Callable[[], T]], T] = lambda fn: fn(),
    prefetch: int = 2,
    by_session: bool = False,
) -> TrainingData:
    """The batches of a run. ``streaming`` (``auto``, ``on``, ``off``; see ``stream_source_for``) decides whether
    the train split streams from Parquet (written once to ``out_dir/train-parquet``, or to a temporary folder that
    ``close`` removes). ``rank`` / ``world_size`` / ``all_ranks`` shard the train batches under DDP, and
    ``write_first`` runs the Parquet copy on one rank before the others read it (``distributed.rank_zero_first``);
    ``prefetch`` batches of a stream are decoded ahead by a background thread;
    ``by_session``: whole sessions per batch (in memory only)."""
    source = write_first(lambda: stream_source_for(dataset, streaming, threshold_mb, out_dir))
    if source is not None and by_session:
        raise ValueError("the model reads whole sessions, which the streaming loader does not batch; "
                         "set train.streaming: off")
    scratch = source.parent if source is not None and out_dir is None and not dataset.info.get("train_parquet") else None
    splits = {
        s: TensorSplit(dataset.split(s), dataset.item_table, dataset.schema.item_id)
        for s in SPLITS if not (source is not None and s == "train")
    }
    shard = dict(rank=rank, world_size=world_size)
    train: BatchLoader | StreamingBatchLoader
    if source is not None:
        train = StreamingBatchLoader(source, batch_size, dataset.item_table, dataset.schema.item_id, shuffle=True,
                                     seed=seed, by_request=by_request, buffer_rows=buffer_rows, all_ranks=all_ranks,
                                     prefetch=prefetch, **shard)
    else:
        train = BatchLoader(splits["train"], batch_size, shuffle=True, seed=seed, by_request=by_request,
                            by_session=by_session, **shard)
    return TrainingData(dataset, train, splits, by_request, by_session, source, scratch)

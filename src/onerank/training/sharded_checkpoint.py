"""Checkpoints of sharded embedding tables with ``torch.distributed.checkpoint`` (DCP): every rank writes its own
shards, and any number of processes reads them back, each taking the rows its own sharding plan gives it (N -> M), or
one process reads them whole into an unsharded model (serving, export).

A DCP folder holds one ``.metadata`` file (a pickle of DCP's plan: tensor shapes, dtypes, chunk offsets) and the
shards' bytes. DCP's own reader unpickles ``.metadata`` without restriction and loads non-tensor entries with
``torch.load(weights_only=False)``; both could run code from the files. Here the metadata goes through an unpickler
that admits DCP's plan classes and nothing else, and a folder holding anything but tensors is refused, so loading never
executes code from the files (tensors are read by DCP with ``torch.load(weights_only=True)``).

A folder is written next to its target and renamed over it when every rank has finished, so an interrupted save leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from onerank.features import sharding
from onerank.training.checkpoint import CheckpointError

# What a DCP plan pickles (checked on torch 2.13): its dataclasses, torch's Size, dtypes and layouts, and the path it
# was written to.
_PLAN_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata", "TensorProperties",
        "StorageMeta", "_MEM_FORMAT_ENCODING", "BytesStorageMetadata",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class _PlanUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLAN_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"the checkpoint's DCP metadata names {module}.{name}, which is not part of a "
                              "checkpoint plan; refusing to load it (it could run code)")


class SafeReader(FileSystemReader):
    """DCP's file reader with the metadata read by an unpickler restricted to DCP's plan classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = _PlanUnpickler(stream).load()
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"{self.path}: the DCP metadata is unreadable ({exc}); the checkpoint is "
                                      "damaged") from None
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{self.path}: .metadata holds a {type(metadata).__name__}, not a DCP plan")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorsOnly(DefaultLoadPlanner):
    """Loads tensors only: a non-tensor entry would be read with ``torch.load(weights_only=False)``."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        raise CheckpointError(f"the checkpoint holds a non-tensor entry {read_item.dest_index.fqn!r}; onerank's "
                              "sharded checkpoints hold tensors only, refusing to unpickle it")


def save(state: dict[str, Any], directory: str | Path) -> None:
    """Write ``state`` (nested dicts of tensors and ShardedTensors) to ``directory``; every rank calls it."""
    directory = Path(directory)
    partial = directory.with_name(f".{directory.name}.partial")
    distributed = dist.is_initialized()
    if _is_main():
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
    if distributed:
        dist.barrier()
    dcp.save(state, checkpoint_id=partial, no_dist=not distributed)
    if distributed:
        dist.barrier()
    if _is_main():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            directory.rename(old)
        partial.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    if distributed:
        dist.barrier()


def load(state: dict[str, Any], directory: str | Path) -> None:
    """Fill ``state`` (the same keys as saved, with this process's tensors or ShardedTensors) in place from
    ``directory``: under a process group every rank reads its own shards (whatever the world size that wrote them);
    in a plain process, whole tensors."""
    directory = Path(directory)
    if not (directory / ".metadata").is_file():
        raise CheckpointError(f"{directory} is not a sharded checkpoint (no .metadata); expected the folder written "
                              "by onerank train with embedding_tables: torchrec")
    try:
        dcp.load(state, storage_reader=SafeReader(directory), planner=TensorsOnly(),
                 no_dist=not dist.is_initialized())
    except CheckpointException as exc:  # DCP wraps every rank's failure; its text holds ours
        reason = str(exc)
        refused = next((line for line in reason.splitlines() if "refusing" in line), None)
        if refused is not None:
            raise CheckpointError(f"{directory}: {refused.split('failed: ', 1)[-1].split('; rank local')[0]}") from None
        raise CheckpointError(f"{directory}: not a readable sharded checkpoint ({reason.strip().splitlines()[-1]})") \
            from None


def load_unsharded(model: nn.Module, directory: str | Path) -> None:
    """Read the tables of a sharded checkpoint (``last.dcp``, written by any number of ranks) whole into ``model``, a
    model of the same kind with the fused table (an unsharded model, e.g. for serving or export). In a plain process."""
    embeddings = [(path, fe) for path, fe in sharding.feature_embeddings(model) if fe.torchrec is None]
    wanted: dict[str, Tensor] = {}
    for path, fe in embeddings:
        prefix = f"{path}.torchrec.collection.embeddings." if path else "torchrec.collection.embeddings."
        for name in fe.space.categorical_fields:
            wanted[prefix + name + ".weight"] = torch.zeros(fe.space.vocab_sizes[name], fe.dim)
    load({"tables": wanted}, directory)
    with torch.no_grad():
        for path, fe in embeddings:
            prefix = f"{path}.torchrec.collection.embeddings." if path else "torchrec.collection.embeddings."
            fe.table.weight.copy_(fe.fused_weight({n: wanted[prefix + n + ".weight"] for n in fe.space.categorical_fields}))


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


__all__ = ["SafeReader", "TensorsOnly", "load", "load_unsharded", "save"]

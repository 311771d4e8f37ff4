"""Sharding a model's embedding tables with TorchRec (``train.embedding_tables: torchrec``; ``features/tables.py`` says
how the tables are read), and their parameters, optimisers and state in the two layouts: sharded (ShardedTensors, saved
with torch.distributed.checkpoint) and plain (the fused table whole, as an unsharded model holds it).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from onerank.features.embedding import FeatureEmbedding
from onerank.features.tables import TableSettings, TABLE_EPS, require_torchrec


# ---------------------------------------------------------------------------------------------------------------------
def feature_embeddings(model: nn.Module) -> Iterator[tuple[str, FeatureEmbedding]]:
    for name, module in model.named_modules():
        if isinstance(module, FeatureEmbedding):
            yield name, module


def shard(model: nn.Module, settings: TableSettings, device: torch.device) -> dict[str, Any]:
    """Move every ``FeatureEmbedding`` of ``model`` to TorchRec tables and shard them over the process group (a group
    of one process is started when there is none: the tables are then trained by the same fused kernels on one rank).
    Returns the sharding plan, per table: sharding type and ranks."""
    require_torchrec()
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.shard import shard_modules
    from torchrec.distributed.types import ShardingEnv

    if settings.optimizer == "adam" and device.type == "cpu":
        raise ValueError("embedding_tables: torchrec on CPU: FBGEMM's CPU kernels train tables with Adagrad (or SGD), "
                         "not Adam; set train.embedding_optimizer: adagrad (--embedding-optimizer adagrad)")
    from torchrec.distributed import comm_ops

    if not comm_ops.GRADIENT_DIVISION:  # the tables' gradients would be W times the global-batch mean's
        raise ValueError("TorchRec's gradient division is off (comm_ops.set_gradient_division(False)); sharded tables "
                         "need it on to train like one process")
    embeddings = list(feature_embeddings(model))
    if not embeddings:
        raise ValueError(f"{type(model).__name__} has no FeatureEmbedding: nothing to shard")
    group = _process_group()
    world = dist.get_world_size(group)
    for _, fe in embeddings:
        fe.use_torchrec()
    sharder = EmbeddingCollectionSharder(fused_params=fused_parameters(settings))
    types = ["table_wise", "column_wise", "row_wise"] if settings.sharding == "auto" else [settings.sharding]
    constraints = {f: ParameterConstraints(sharding_types=types) for _, fe in embeddings for f in fe.torchrec.fields}
    topology = Topology(world_size=world, compute_device=device.type)
    # the share of memory kept for the dense part of the model (TorchRec's heuristic warns that it misjudges it)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints,
                                       storage_reservation=FixedPercentageStorageReservation(0.2))
    plan = planner.collective_plan(model, [sharder], group)
    shard_modules(model, env=ShardingEnv.from_process_group(group), device=device, plan=plan, sharders=[sharder])
    model.register_forward_pre_hook(_fetch_rows)
    model.register_forward_hook(_release_rows)
    return {
        f"{path}.{table}": {"sharding": p.sharding_type, "ranks": p.ranks}
        for path, module_plan in plan.plan.items() for table, p in module_plan.items()
    }


def fused_parameters(settings: TableSettings) -> dict[str, Any]:
    """FBGEMM's optimiser for the tables: the fused-table optimiser's rule and hyper-parameters (Adam as torch's
    AdamW without weight decay, CUDA only; or exact Adagrad), applied to the rows of the batch only."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    if settings.optimizer == "adagrad":
        return {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": settings.lr, "eps": TABLE_EPS}
    return {"optimizer": EmbOptimType.ADAM, "learning_rate": settings.lr, "eps": TABLE_EPS, "beta1": 0.9,
            "beta2": 0.999, "weight_decay": 0.0}


def _process_group() -> dist.ProcessGroup:
    if not dist.is_initialized():
        # A plain process: a group of one (in-process store), so that one process runs the same fused kernels.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dist.group.WORLD


def _fetch_rows(model: nn.Module, args: tuple) -> None:
    batch = args[0]
    for _, fe in feature_embeddings(model):
        if fe.torchrec is not None:
            fe.torchrec.fetch(fe.codes_of(batch))


def _release_rows(model: nn.Module, args: tuple, output: Any) -> None:
    for _, fe in feature_embeddings(model):
        if fe.torchrec is not None:
            fe.torchrec.release()


# ---------------------------------------------------------------------------------------------------------------------
# Parameters, optimisers and state of sharded tables
# ---------------------------------------------------------------------------------------------------------------------
def sharded_paths(model: nn.Module) -> tuple[str, ...]:
    """The module paths of the TorchRec tables: what DDP, broadcasts and the dense optimiser leave alone."""
    return tuple(f"{path}.torchrec" if path else "torchrec" for path, fe in feature_embeddings(model)
                 if fe.torchrec is not None)


def sharded_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters TorchRec owns (updated by its fused optimiser; never in DDP or the dense optimiser)."""
    paths = sharded_paths(model)
    return {n for n, _ in model.named_parameters() if any(n.startswith(p + ".") for p in paths)}


def sharded_state_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the sharded tables (ShardedTensors: saved with torch.distributed.checkpoint)."""
    keys = set()
    for path, fe in feature_embeddings(model):
        if fe.torchrec is not None:
            prefix = f"{path}.torchrec." if path else "torchrec."
            keys |= {prefix + k for k in fe.torchrec.state_dict()}
    return keys


def fused_optimizers(model: nn.Module) -> list[torch.optim.Optimizer]:
    """The tables' fused optimisers (one per FeatureEmbedding): their ``step`` applies learning-rate changes."""
    return [fe.torchrec.collection.fused_optimizer for _, fe in feature_embeddings(model) if fe.torchrec is not None]


def step_counters(model: nn.Module) -> list[Tensor]:
    """FBGEMM's step counters (Adam's bias correction reads them); kept in the resumable state so a resume is exact."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

    return [m.iter for m in model.modules() if isinstance(m, SplitTableBatchedEmbeddingBagsCodegen)]


def table_bytes(model: nn.Module) -> dict[str, int]:
    """This rank's bytes of table rows and of their optimiser state (local shards only)."""
    rows = sum(_local_bytes(v) for k, v in model.state_dict().items() if k in sharded_state_keys(model))
    state = 0
    for optimizer in fused_optimizers(model):
        for per_table in optimizer.state_dict()["state"].values():
            state += sum(_local_bytes(v) for v in per_table.values())
    return {"rows": rows, "optimizer_state": state}


def _local_bytes(value: Any) -> int:
    if hasattr(value, "local_shards"):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in value.local_shards())
    return value.numel() * value.element_size() if isinstance(value, Tensor) else 0


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state in the fused layout (``<embedding>.table.weight`` whole), as an unsharded model of the same
    kind holds it: what ``checkpoint.pt``, serving and export read. A collective under sharding (every rank gets the
    whole tables)."""
    state = model.state_dict()
    tables = sharded_state_keys(model)
    out = {k: v for k, v in state.items() if k not in tables}
    for path, fe in feature_embeddings(model):
        if fe.torchrec is None:
            continue
        prefix = f"{path}.torchrec." if path else "torchrec."
        whole = {f: _whole(state[f"{prefix}collection.embeddings.{f}.weight"]) for f in fe.torchrec.fields}
        out[f"{path}.table.weight" if path else "table.weight"] = fe.fused_weight(whole)
    return out


def load_plain_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a state in the fused layout (``plain_state_dict``, an unsharded checkpoint) into a model with sharded
    tables: each rank copies its shards' rows and columns; everything else loads as usual."""
    rest = dict(state)
    live = model.state_dict()
    for path, fe in feature_embeddings(model):
        if fe.torchrec is None:
            continue
        key = f"{path}.table.weight" if path else "table.weight"
        if key not in rest:
            raise KeyError(f"the state has no {key!r} (the fused table of {path or 'the model'})")
        per_field = fe.split_fused(rest.pop(key))
        prefix = f"{path}.torchrec." if path else "torchrec."
        for f, whole in per_field.items():
            key = f"{prefix}collection.embeddings.{f}.weight"
            _copy_into_shards(live[key], whole)
            rest[key] = live[key]  # TorchRec's load hook expects every table: its own shards, already filled
    missing, unexpected = model.load_state_dict(rest, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the state does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")


def _shape(value: Any) -> tuple[int, ...]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchRec's tables are ShardedTensors, which torch deprecates
        return tuple(value.size())


def _whole(value: Any) -> Tensor:
    """A ShardedTensor gathered whole on every rank (each element lives in exactly one shard: a sum does it)."""
    if not hasattr(value, "local_shards"):
        return value.detach().clone()
    whole = torch.zeros(_shape(value), dtype=value.dtype)
    for shard_ in value.local_shards():
        rows, cols = shard_.metadata.shard_offsets
        n, m = shard_.metadata.shard_sizes
        whole[rows: rows + n, cols: cols + m] = shard_.tensor.detach().cpu()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(whole)
    return whole


@torch.no_grad()
def _copy_into_shards(value: Any, whole: Tensor) -> None:
    if _shape(value) != tuple(whole.shape):
        raise RuntimeError(f"a table of shape {tuple(whole.shape)} does not fit the model's {_shape(value)}")
    for shard_ in value.local_shards():
        rows, cols = shard_.metadata.shard_offsets
        n, m = shard_.metadata.shard_sizes
        shard_.tensor.copy_(whole[rows: rows + n, cols: cols + m])


__all__ = [
    "feature_embeddings", "fused_optimizers", "fused_parameters", "load_plain_state_dict",
    "plain_state_dict", "shard", "sharded_parameter_names", "sharded_paths", "sharded_state_keys", "step_counters",
    "table_bytes",
]

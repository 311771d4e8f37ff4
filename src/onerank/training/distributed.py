"""Data-parallel training on ``torch.distributed``: process-group set-up, per-rank shards, gradient synchronisation
and exact gathering of predictions.

Launch any ``onerank`` command with ``torchrun``; a plain process is a world of one and every function here is then a
no-op, so the single-process path stays exactly what it was. Choices (details in ``docs/scaling.md``):

* **Backend** follows the device: NCCL when the run trains on CUDA (rank ``r`` of a node uses GPU ``LOCAL_RANK``),
  gloo on CPU.
* **Batches**: ``train.batch_size`` is the *global* batch. Every rank draws the same global permutation from
  ``(seed, epoch)`` and takes its contiguous share of each global batch (``BatchLoader(rank=, world_size=)``), so
  ``W`` processes step through exactly the batches of a single process.
* **Losses**: a task's loss is a mean over the batch's labelled rows. Each rank rescales its mean by
  ``W * n_local / n_global`` (one small all-reduce of the label counts per step); after DDP averages the gradients,
  the update is the gradient of the global-batch mean, as in one process, even when ranks hold different numbers
  of labelled rows (task spaces). List-wise terms (a mean over positives) are weighted the same way, which is exact
  only when every rank holds the same share of positives.
* **Gradients**: strategies that produce their gradients with one ``.backward()`` (``fixed``, ``equal``: they do not
  override ``WeightingStrategy.backward``, or declare ``plain_backward = True``) use DDP's bucketed all-reduce in
  backward hooks. Every other strategy (uncertainty, GradNorm, PCGrad, DWA, ...) may call ``autograd.grad`` or
  write ``.grad`` itself, which DDP's hooks would miss or overwrite: the step runs under ``no_sync()`` and the
  final ``.grad`` of every parameter is averaged in one flat all-reduce after the strategy's backward.
  Gradient surgery then acts on each rank's local task gradients before averaging (per micro-batch surgery).
* **Evaluation**: each rank predicts a contiguous block of the evaluation batches and the predictions are gathered
  in row order, so AUC / GAUC are computed exactly on the whole split, identically on every rank.
* **Checkpoints** are written by rank 0 only; every rank reads ``last.pt`` on resume (the output folder must be on
  a file system all nodes see). Each rank's RNG state is saved so that a resumed run continues exactly.
"""

from __future__ import annotations

import itertools
import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def info() -> DistInfo:
    """This process's place in the process group (a world of one when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend=dist.get_backend(),
    )


def setup(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); nothing to do in a plain process or when already joined."""
    if dist.is_available() and dist.is_initialized():
        return info()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = _wants_cuda(device)
    if use_cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    log.info("rank %d of %d joined (%s)", dist.get_rank(), world_size, backend)
    return info()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _wants_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def resolve_device(device: str, where: DistInfo | None = None) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` -> a concrete device; under DDP on CUDA, this rank's GPU (``LOCAL_RANK``)."""
    where = where or info()
    if _wants_cuda(device) and device != "auto" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is available to this PyTorch ({torch.__version__}); "
                         "use --device cpu (or auto)")
    if not _wants_cuda(device):
        return torch.device(device if device != "auto" else "cpu")
    if where.enabled:
        return torch.device("cuda", where.local_rank)
    return torch.device(device if device != "auto" else "cuda")


def _collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if info().backend == "nccl" else torch.device("cpu")


# ---- coordination -------------------------------------------------------------------------------------------------
def barrier() -> None:
    if info().enabled:
        dist.barrier()


def rank_zero_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0, then on the other ranks: e.g. the first run builds a dataset cache and the others read
    it instead of writing the same folder concurrently. If rank 0 fails, the other ranks fail the same way."""
    where = info()
    if not where.enabled:
        return fn()
    if where.is_main:
        try:
            return fn()
        finally:
            dist.barrier()
    dist.barrier()
    return fn()


def all_ranks(flag: bool) -> bool:
    """True when ``flag`` is true on every rank (ranks that stream data stop an epoch together)."""
    if not info().enabled:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average scalars (e.g. an epoch's mean losses) over ranks, so that every rank takes the same decisions."""
    if not info().enabled or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    tensor /= info().world_size
    return dict(zip(keys, tensor.tolist()))


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a list of one without a process group)."""
    if not info().enabled:
        return [obj]
    out: list[Any] = [None] * info().world_size
    dist.all_gather_object(out, obj)
    return out


def block(n: int, where: DistInfo | None = None) -> tuple[int, int]:
    """This rank's contiguous block ``[lo, hi)`` of ``n`` ordered items (blocks differ in size by at most one)."""
    where = where or info()
    lo = -(-where.rank * n // where.world_size)
    hi = -(-(where.rank + 1) * n // where.world_size)
    return lo, hi


def gather_predictions(parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate every rank's predictions in rank order: with blocks from ``block``, that is row order."""
    if not info().enabled:
        return parts
    gathered = gather_objects(parts)
    return {k: np.concatenate([g[k] for g in gathered]) for k in parts}


def broadcast_module(module: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Copy rank 0's parameters and buffers to every rank, except those under the module paths ``skip`` (sharded
    embedding tables: each rank holds other rows)."""
    if not info().enabled:
        return
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if isinstance(tensor, Tensor) and not _under(name, skip):
                dist.broadcast(tensor, src=0)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# ---- losses and gradients ----------------------------------------------------------------------------------------
def global_loss_scales(batch_size: int, label_mask: dict[str, Tensor]) -> tuple[dict[str, float], int]:
    """Per task ``W * n_local / n_global`` (the factor that turns this rank's mean loss into its share of the
    global-batch mean once DDP averages gradients), and the global batch size. ``({t: 1.0}, batch_size)`` without a
    process group."""
    where = info()
    if not where.enabled:
        return {t: 1.0 for t in label_mask}, batch_size
    names = list(label_mask)
    device = _collective_device()
    local = torch.stack(
        [torch.tensor(float(batch_size), device=device)]
        + [label_mask[t].sum().to(device=device, dtype=torch.float64) for t in names]
    ).double()
    total = local.clone()
    dist.all_reduce(total)
    local, total = local.tolist(), total.tolist()
    scales = {
        t: (where.world_size * local[i + 1] / total[i + 1]) if total[i + 1] > 0 else 0.0 for i, t in enumerate(names)
    }
    return scales, int(total[0])


def plain_backward(weighting: nn.Module) -> bool:
    """Whether a weighting strategy's gradients come from one ``.backward()`` of a loss (so DDP's backward hooks can
    all-reduce them): it does not override ``WeightingStrategy.backward``'s fixed-weights form, or it says so with a
    class attribute ``plain_backward = True``."""
    from onerank.objectives.weighting import FixedWeights

    declared = getattr(type(weighting), "plain_backward", None)
    if declared is not None:
        return bool(declared)
    return type(weighting).backward is FixedWeights.backward


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average ``.grad`` over ranks with one flat all-reduce. A gradient missing on some ranks counts as zeros
    there; a gradient missing on every rank stays ``None`` (the optimiser then skips the parameter, as it would in
    one process)."""
    where = info()
    if not where.enabled or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
    # one collective: the gradients, then one "had a gradient" flag per parameter
    flat = torch.cat([g.reshape(-1) for g in grads] + [present]).to(_collective_device())
    dist.all_reduce(flat)
    flat /= where.world_size
    offset = 0
    flags = flat[-len(params):].tolist()
    for p, g, flag in zip(params, grads, flags):
        n = g.numel()
        p.grad = flat[offset: offset + n].view_as(p).to(p.device) if flag > 0 else None
        offset += n


class GradientSync:
    """Keeps model replicas identical: ``with sync.step(): forward, loss, strategy backward``, then
    ``sync.finish()`` before clipping and the optimiser step. Without a process group both are no-ops and
    ``sync.module`` is the model itself.

    With DDP hooks (plain strategies), the first step runs with a manual all-reduce and records whether any
    parameter got no gradient; DDP is then built with ``find_unused_parameters`` only if needed (its graph walk costs
    time every step), which handles models with inactive branches without asking which model this is.
    """

    def __init__(self, model: nn.Module, extra_params: list[nn.Parameter], use_hooks: bool, device: torch.device,
                 skip: tuple[str, ...] = ()):
        self.model = model
        self.extra_params = [p for p in extra_params if p.requires_grad]
        self.where = info()
        self.use_hooks = use_hooks
        self.device = device
        self.skip = skip  # module paths of sharded tables: neither broadcast, nor in DDP, nor averaged
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        if not self.where.enabled:
            return
        broadcast_module(model, skip)
        for p in self.extra_params:
            with torch.no_grad():
                dist.broadcast(p.data, src=0)
        if not use_hooks:
            self.ddp = self._wrap(find_unused=False)

    @property
    def module(self) -> nn.Module:
        return self.ddp if self.ddp is not None else self.model

    def _wrap(self, find_unused: bool) -> nn.parallel.DistributedDataParallel:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        if self.skip:
            ignored = [n for n, _ in itertools.chain(self.model.named_parameters(), self.model.named_buffers())
                       if _under(n, self.skip)]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, ignored)
        return nn.parallel.DistributedDataParallel(
            self.model, device_ids=device_ids, find_unused_parameters=find_unused, init_sync=False
        )

    def _manual(self) -> bool:
        return not self.use_hooks or self.ddp is None

    @contextmanager
    def step(self) -> Iterator[None]:
        if not self.where.enabled:
            yield
            return
        context = self.ddp.no_sync() if (self.ddp is not None and not self.use_hooks) else nullcontext()
        with context:
            yield

    def finish(self) -> None:
        if not self.where.enabled:
            return
        model_params = [p for n, p in self.model.named_parameters() if p.requires_grad and not _under(n, self.skip)]
        if self._manual():
            unused = any(p.grad is None for p in model_params)
            average_gradients(model_params + self.extra_params)
            if self.use_hooks and self.ddp is None:
                self.ddp = self._wrap(find_unused=not all_ranks(not unused))
        else:
            average_gradients(self.extra_params)


def sync_buffers(module: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Give every rank rank 0's buffers (e.g. batch-norm statistics) before evaluating, except under ``skip``."""
    if not info().enabled:
        return
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if not _under(name, skip):
                dist.broadcast(buffer, src=0)


__all__ = [
    "DistInfo", "GradientSync", "all_ranks", "average_gradients", "barrier", "block", "broadcast_module",
    "gather_objects", "gather_predictions", "global_loss_scales", "info", "mean_over_ranks", "plain_backward",
    "rank_zero_first", "resolve_device", "setup", "sync_buffers", "teardown",
]

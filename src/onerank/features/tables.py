"""The categorical fields' embedding tables behind one interface, fused in one replicated table or sharded by TorchRec.

Every model embeds its fields through ``FeatureEmbedding.lookup(codes [..., F], names) -> [..., F, d]`` (code 0, the
padding, embeds to zero and gets no gradient). ``train.embedding_tables`` chooses what holds the rows:

* ``fused`` (default): one ``nn.Embedding`` for all fields (``FeatureEmbedding.table``), held whole by every rank and
  trained like any other parameter (its dense gradient is all-reduced by DDP, the trainer's AdamW updates it).
* ``torchrec``: one TorchRec table per field in an ``EmbeddingCollection``, sharded over the ranks by TorchRec's planner
  (table-, column- or row-wise; ``train.sharding``) and updated by FBGEMM's fused optimiser inside the backward pass,
  so no rank holds a whole table, its gradient or its optimiser state; the rest of the model stays data-parallel (DDP).

``features/sharding.py`` moves a model's tables to TorchRec, shards them and converts their state. The TorchRec tables
start from the fused table's rows (drawn under the run's seed as always), so a seed gives the same
initial model either way. A sharded lookup is a collective (an all-to-all of ids, then of rows), and FBGEMM applies the
optimiser once per backward of each lookup; the model, however, reads the same fields several times per forward
(candidate, histories, OneRank's item tokens). So the rows are fetched once per forward: a hook before the model's
forward collects every code the batch holds, per field, looks the distinct ones up in one call (``TorchRecTables.fetch``),
and the model's lookups index that small block. The update is then one optimiser step on the summed gradient of each
row, as with the fused table. TorchRec divides the rows' gradients by the world size on their way back to the owning
rank (its ``comm_ops`` gradient division, on by default), as DDP averages the dense ones, so both are the gradient of
the global-batch mean (each rank's loss is rescaled to its share of it: ``training/distributed.py``).

TorchRec and FBGEMM are the optional extra ``onerank[torchrec]``; this module imports them only when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

BACKENDS = ("fused", "torchrec")
SHARDINGS = ("auto", "table_wise", "column_wise", "row_wise")
OPTIMIZERS = ("adam", "adagrad")
EXTRA_HINT = 'pip install "onerank[torchrec]" (docs/scaling.md, section "Sharded embedding tables")'
# FBGEMM's releases pair with one torch minor release each (its compatibility table: 1.8 <-> 2.13, 1.9 <-> 2.14); a
# mismatched pair fails deep inside its operator library, so the pair is checked before anything is built.
FBGEMM_TORCH_OFFSET = 5
# Adam's and Adagrad's epsilon for the tables: the same in the fused table's torch optimiser and in FBGEMM's kernels.
TABLE_EPS = 1e-8


class TorchRecUnavailable(ValueError):
    """``embedding_tables: torchrec`` without a working TorchRec / FBGEMM pair (a setting the installation cannot honour,
    so a user error: one line, exit code 2 in the CLI); the message says what to install."""


@dataclass(frozen=True)
class TableSettings:
    """How a run holds and trains its embedding tables (``train.embedding_tables``, ``train.sharding``,
    ``train.embedding_optimizer``; ``lr``: ``train.embedding_lr`` or else ``train.lr``)."""

    backend: str = "fused"
    sharding: str = "auto"
    optimizer: str = "adam"
    lr: float = 2e-3

    def __post_init__(self) -> None:
        for name, allowed in (("backend", BACKENDS), ("sharding", SHARDINGS), ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"embedding tables: {name} must be one of {allowed}, got {getattr(self, name)!r}")


def require_torchrec() -> None:
    """Raise ``TorchRecUnavailable`` (one line naming the extra) unless TorchRec and an FBGEMM built for this torch
    import."""
    try:
        import fbgemm_gpu
    except (ImportError, OSError) as exc:
        raise TorchRecUnavailable(f"embedding_tables: torchrec needs TorchRec and FBGEMM ({_first_line(exc)}); "
                                  f"{EXTRA_HINT}") from None
    torch_minor = _minor(torch.__version__)
    fbgemm_minor = _minor(getattr(fbgemm_gpu, "__version__", "0.0"))
    if fbgemm_minor[0] != 1 or fbgemm_minor[1] + FBGEMM_TORCH_OFFSET != torch_minor[1] or torch_minor[0] != 2:
        wanted = f"1.{torch_minor[1] - FBGEMM_TORCH_OFFSET}"
        raise TorchRecUnavailable(f"embedding_tables: torchrec: fbgemm_gpu {fbgemm_gpu.__version__} is not built for "
                                  f"torch {torch.__version__} (that needs fbgemm {wanted}.x); {EXTRA_HINT}")
    try:
        import torchrec  # noqa: F401
    except (ImportError, OSError) as exc:
        raise TorchRecUnavailable(f"embedding_tables: torchrec needs TorchRec ({_first_line(exc)}); "
                                  f"{EXTRA_HINT}") from None


def torchrec_available() -> bool:
    try:
        require_torchrec()
    except TorchRecUnavailable:
        return False
    return True


def _minor(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return 0, 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------------
# The TorchRec tables of one FeatureEmbedding
# ---------------------------------------------------------------------------------------------------------------------
class TorchRecTables(nn.Module):
    """One TorchRec table per categorical field (rows indexed by the field's codes; row 0 is never read), fetched once
    per forward (see the module doc). ``collection`` is the ``EmbeddingCollection`` that ``shard`` replaces by its
    sharded form."""

    def __init__(self, rows: dict[str, Tensor]) -> None:
        super().__init__()
        from torchrec import EmbeddingCollection, EmbeddingConfig

        self.fields = list(rows)
        dim = next(iter(rows.values())).shape[1]
        configs = [EmbeddingConfig(name=f, embedding_dim=dim, num_embeddings=rows[f].shape[0], feature_names=[f])
                   for f in self.fields]
        self.collection = EmbeddingCollection(tables=configs, device=torch.device("cpu"))
        with torch.no_grad():
            for f, weight in rows.items():
                self.collection.embeddings[f].weight.copy_(weight)
        self._fetched: dict[str, tuple[Tensor, Tensor]] = {}

    def fetch(self, codes: dict[str, list[Tensor]]) -> None:
        """Look up every distinct code of ``codes`` (field -> code tensors of any shape) in one collective call. Code
        0 is always part of it, so that every rank sends every field at least one id (TorchRec's all-to-all over
        gloo fails on an empty feature); it is never read."""
        from torchrec import KeyedJaggedTensor

        distinct = []
        for f in self.fields:
            parts = [c.reshape(-1) for c in codes.get(f, [])]
            zero = torch.zeros(1, dtype=torch.long, device=self._device())
            distinct.append(torch.unique(torch.cat([zero, *[p.long() for p in parts]])))
        lengths = torch.tensor([len(d) for d in distinct], dtype=torch.int32)
        features = KeyedJaggedTensor.from_lengths_sync(keys=self.fields, values=torch.cat(distinct), lengths=lengths)
        out = self.collection(features)
        self._fetched = {f: (d, out[f].values()) for f, d in zip(self.fields, distinct)}

    def lookup(self, codes: Tensor, names: list[str] | tuple[str, ...]) -> Tensor:
        """codes [..., len(names)] -> [..., len(names), d], from the rows fetched for this forward."""
        columns = []
        for j, name in enumerate(names):
            if name not in self._fetched:
                raise RuntimeError("sharded embedding tables are read inside the model's forward only (their rows are "
                                   "fetched once per forward by the hook that onerank.features.tables.shard installs)")
            distinct, rows = self._fetched[name]
            code = codes[..., j].long().contiguous()
            at = torch.searchsorted(distinct, code).clamp_(max=len(distinct) - 1)
            if not torch.equal(distinct[at], code):
                raise RuntimeError(f"field {name!r}: a code the batch does not hold was looked up; sharded tables serve "
                                   "only the codes of the batch given to the model")
            columns.append(torch.where((code > 0).unsqueeze(-1), rows[at], 0.0))
        return torch.stack(columns, dim=-2)

    def release(self) -> None:
        self._fetched = {}

    def _device(self) -> torch.device:
        return next(iter(self.collection.parameters()), torch.empty(0)).device


__all__ = [
    "BACKENDS", "OPTIMIZERS", "SHARDINGS", "TABLE_EPS", "TableSettings", "TorchRecTables", "TorchRecUnavailable",
    "require_torchrec", "torchrec_available",
]

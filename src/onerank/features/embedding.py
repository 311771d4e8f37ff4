"""Embedding of categorical fields, dense fields and items (candidates and history items share the item tables)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.data.encoding import OOV
from onerank.features.item_vectors import ItemVectorEmbedding
from onerank.features.space import FeatureSpace
from onerank.features.tables import TorchRecTables


class FeatureEmbedding(nn.Module):
    """An embedding table per categorical field (code 0 = padding embeds to zero), one learned vector per dense field.

    All fields share one width ``dim`` so that they can also serve as Transformer tokens.

    The per-field tables are stored as one table: field f's code c > 0 is row ``offset[f] + c``, and every field's
    padding code is the shared row 0 (``padding_idx``: zero, never updated). Looking up F fields is then one gather and
    one gradient scatter instead of F of each, which measurably speeds up training of the many-field models
    (``docs/scaling.md``); ``field_table(name)`` is field ``name``'s slice of it.

    ``use_torchrec`` moves the rows to one TorchRec table per field (``features/tables.py``: sharded over ranks, fused
    optimiser); ``lookup`` and everything built on it keep their meaning, so no model knows which tables it has.
    """

    def __init__(self, space: FeatureSpace, dim: int) -> None:
        super().__init__()
        self.space = space
        self.dim = dim
        names = space.categorical_fields
        sizes = [space.vocab_sizes[name] for name in names]
        # field f's codes 1..V_f-1 take rows starts[f] .. starts[f] + V_f - 2, after the shared padding row 0
        starts = [1 + sum(v - 1 for v in sizes[:i]) for i in range(len(sizes))]
        self.offsets = {name: start - 1 for name, start in zip(names, starts)}
        self.table = nn.Embedding(1 + sum(v - 1 for v in sizes), dim, padding_idx=0)
        nn.init.normal_(self.table.weight, std=0.05)
        with torch.no_grad():
            self.table.weight[0].zero_()
        num_dense = len(space.dense_fields)
        self.dense_weight = nn.Parameter(torch.randn(num_dense, dim) * 0.05)
        self.dense_bias = nn.Parameter(torch.zeros(num_dense, dim))
        self._offset_cache: dict[tuple[str, ...], Tensor] = {}
        self._size_cache: dict[tuple[str, ...], Tensor] = {}
        self.item_id = space.schema.item_id
        self.item_vectors = ItemVectorEmbedding(space.item_vectors, dim) if space.item_vectors is not None else None
        self.torchrec: TorchRecTables | None = None

    # ---- where the rows live -----------------------------------------------------------------------------------------
    def use_torchrec(self) -> None:
        """Replace the fused table by TorchRec tables holding the same rows (``features.tables.shard`` then shards
        them)."""
        names = self.space.categorical_fields
        if not names or self.torchrec is not None:
            return
        self.torchrec = TorchRecTables(self.split_fused(self.table.weight.detach()))
        del self.table

    def split_fused(self, weight: Tensor) -> dict[str, Tensor]:
        """A fused table's rows ([1 + sum(V_f - 1), d]) as one table per field ([V_f, d], row 0 the padding row)."""
        return {name: self._field_rows(weight, name) for name in self.space.categorical_fields}

    def _field_rows(self, weight: Tensor, name: str) -> Tensor:
        start = self.offsets[name] + 1
        return torch.cat([weight[:1], weight[start: start + self.space.vocab_sizes[name] - 1]])

    def fused_weight(self, tables: dict[str, Tensor]) -> Tensor:
        """Per-field tables ([V_f, d]) as the fused table's rows (the shared padding row zero): ``split_fused``'s
        inverse."""
        names = self.space.categorical_fields
        return torch.cat([torch.zeros(1, self.dim, dtype=tables[names[0]].dtype)] + [tables[n][1:] for n in names])

    def codes_of(self, batch: Batch) -> dict[str, list[Tensor]]:
        """Every code of ``batch`` per field (its rows' fields, and its histories' item fields): what a forward on it
        may look up."""
        codes: dict[str, list[Tensor]] = {name: [] for name in self.space.categorical_fields}
        for name, column in batch.categorical.items():
            if name in codes:
                codes[name].append(column)
        for sequence in batch.histories.values():
            for name, column in sequence.items():
                if name in codes:
                    codes[name].append(column)
        return codes

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # Checkpoints of the first release hold one table per field (``tables.<field>.weight``, row 0 its padding
        # row): the same rows, laid out one after the other as __init__ does.
        old = [f"{prefix}tables.{name}.weight" for name in self.space.categorical_fields]
        if f"{prefix}table.weight" not in state_dict and old and all(key in state_dict for key in old):
            tables = [state_dict.pop(key) for key in old]
            state_dict[f"{prefix}table.weight"] = torch.cat([tables[0][:1].new_zeros(1, self.dim)]
                                                            + [t[1:] for t in tables])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def field_table(self, name: str) -> Tensor:
        """Field ``name``'s embedding rows, indexed by its codes ([V, d]; row 0 is the padding row)."""
        return self._field_rows(self.table.weight, name)

    def _offsets(self, names: tuple[str, ...], device: torch.device) -> Tensor:
        if torch.compiler.is_compiling():  # graph capture (torch.export) records the offsets as constants instead
            return torch.tensor([self.offsets[n] for n in names], dtype=torch.long, device=device)
        cached = self._offset_cache.get(names)
        if cached is None or cached.device != device:
            cached = torch.tensor([self.offsets[n] for n in names], dtype=torch.long, device=device)
            self._offset_cache[names] = cached
        return cached

    def _sizes(self, names: tuple[str, ...], device: torch.device) -> Tensor:
        cached = self._size_cache.get(names)
        if cached is None or cached.device != device:
            cached = torch.tensor([self.space.vocab_sizes[n] for n in names], dtype=torch.long, device=device)
            self._size_cache[names] = cached
        return cached

    def lookup(self, codes: Tensor, names: list[str] | tuple[str, ...]) -> Tensor:
        """codes [..., len(names)] of the named fields (last axis) -> [..., len(names), d]."""
        names = tuple(names)
        vectors = self.item_vectors is not None and len(names) > 0 and names[0] == self.item_id
        item_codes = codes[..., 0] if vectors else None
        known = torch.where(codes < self._sizes(names, codes.device), codes, OOV)
        if vectors and self.training and self.item_vectors.spec.id_dropout > 0:
            dropped = (torch.rand(known.shape[:-1], device=codes.device) < self.item_vectors.spec.id_dropout)
            known = torch.cat([torch.where(dropped & (known[..., 0] > OOV), OOV, known[..., 0])[..., None],
                               known[..., 1:]], dim=-1)
        if self.torchrec is not None:
            out = self.torchrec.lookup(known, names)
        else:
            rows = torch.where(known > 0, known + self._offsets(names, codes.device), 0)
            # The custom backward only pays off for CPU training steps; inference and exporters (which cannot
            # serialise a Python autograd Function) take the plain embedding.
            if self.table.weight.is_cuda or not torch.is_grad_enabled() or torch.jit.is_tracing():
                out = self.table(rows)
            else:
                out = _PaddedRowGather.apply(self.table.weight, rows)
        if not vectors:
            return out
        item = self.item_vectors(item_codes)
        first = item if self.item_vectors.spec.mode == "replace" else out[..., 0, :] + item
        return torch.cat([first.unsqueeze(-2), out[..., 1:, :]], dim=-2)

    # ---- fields -----------------------------------------------------------------------------------------------------
    def fields(self, batch: Batch, names: list[str]) -> Tensor:
        """[B, len(names), d]"""
        if not names:
            return self.dense_weight.new_zeros(batch.size, 0, self.dim)
        return self.lookup(torch.stack([batch.categorical[n] for n in names], dim=-1), names)

    def context(self, batch: Batch) -> Tensor:
        """User and context fields: [B, F_ctx, d]."""
        return self.fields(batch, self.space.context_fields)

    def candidate(self, batch: Batch) -> Tensor:
        """The candidate item's fields: [B, F_item, d]."""
        return self.fields(batch, self.space.item_fields)

    def dense_values(self, batch: Batch) -> Tensor:
        """[B, D] standardised dense values."""
        if not self.space.dense_fields:
            return self.dense_weight.new_zeros(batch.size, 0)
        return torch.stack([batch.dense[n] for n in self.space.dense_fields], dim=1)

    def dense_tokens(self, batch: Batch) -> Tensor:
        """[B, D, d]: value * w_f + b_f, one token per dense field."""
        return self.dense_values(batch).unsqueeze(-1) * self.dense_weight + self.dense_bias

    # ---- items and histories -----------------------------------------------------------------------------------------
    def items(self, codes: dict[str, Tensor]) -> Tensor:
        """Item fields of any leading shape -> [..., F_item, d]."""
        names = self.space.item_fields
        return self.lookup(torch.stack([codes[n] for n in names], dim=-1), names)

    def history(self, batch: Batch, sequence: str) -> tuple[Tensor, Tensor]:
        """([B, L, F_item, d] item embeddings, [B, L] validity mask) of one behaviour sequence."""
        codes = batch.histories[sequence]
        return self.items(codes), codes[self.space.schema.item_id] != 0


class _PaddedRowGather(torch.autograd.Function):
    """``F.embedding(rows, weight, padding_idx=0)`` for CPU tensors, with the weight gradient accumulated by
    ``index_add_`` (about 3x faster than the embedding backward on CPU for the batch sizes used here). Row 0 gets
    no gradient, as with ``padding_idx=0``; ``tests/test_fast_paths.py`` checks it against ``nn.Embedding``."""

    @staticmethod
    def forward(ctx, weight: Tensor, rows: Tensor) -> Tensor:
        ctx.save_for_backward(rows)
        ctx.num_rows = weight.shape[0]
        return weight.index_select(0, rows.reshape(-1)).view(*rows.shape, weight.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (rows,) = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        weight_grad = flat.new_zeros(ctx.num_rows, flat.shape[1]).index_add_(0, rows.reshape(-1), flat)
        weight_grad[0] = 0
        return weight_grad, None

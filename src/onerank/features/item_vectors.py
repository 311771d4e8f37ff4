"""Item vectors from outside the ranker (a graph encoder's table, ``features/item_graph.py``) read by every model in
place of, or beside, the item id embedding.

The table is indexed by item id code. Codes below the id vocabulary are the items of the training split; codes from
the vocabulary's size on are items added after training (a refreshed vocabulary and table): the id embedding sees them
as out-of-vocabulary, the table gives each its own vector. A code beyond the table is an item nobody told the model
about: both read the out-of-vocabulary row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from onerank.data.encoding import OOV

MODES = ("add", "replace")


@dataclass
class ItemVectorSpec:
    """What a model needs to size its item-vector table; ``table`` carries the values at build time (a checkpoint
    carries them in the model's weights instead, so the spec that is saved holds the shape only)."""

    rows: int  # item codes covered (0 = padding, 1 = out-of-vocabulary, then one row per item)
    width: int
    mode: str = "add"  # "add": id embedding + projected vector; "replace": the projected vector alone
    # Training share of item ids looked up as out-of-vocabulary in the id table while the vector keeps the item: the
    # model learns to rank an item it knows only by its vector, as every new item is at serving time.
    id_dropout: float = 0.0
    table: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"item vectors: mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"item vectors: id_dropout must be in [0, 1), got {self.id_dropout!r}")
        if self.rows < 2 or self.width < 1:
            raise ValueError(f"item vectors: need rows >= 2 and width >= 1, got {self.rows} x {self.width}")
        if self.table is not None and tuple(self.table.shape) != (self.rows, self.width):
            raise ValueError(f"item vectors: the table is {tuple(self.table.shape)}, the spec {self.rows} x {self.width}")

    @classmethod
    def of(cls, table: np.ndarray, mode: str = "add", id_dropout: float = 0.0) -> "ItemVectorSpec":
        table = np.asarray(table, dtype=np.float32)
        return cls(rows=table.shape[0], width=table.shape[1], mode=mode, id_dropout=id_dropout, table=table)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "table"}


class ItemVectorEmbedding(nn.Module):
    """codes -> projection(table[code]) [..., d]; padding (code 0) gives zero. The table is a buffer (frozen, saved
    with the weights); the projection is trained with the ranker."""

    def __init__(self, spec: ItemVectorSpec, dim: int) -> None:
        super().__init__()
        self.spec = spec
        table = torch.zeros(spec.rows, spec.width) if spec.table is None else torch.as_tensor(spec.table).float()
        self.register_buffer("table", table.clone())
        self.projection = nn.Linear(spec.width, dim)

    def forward(self, codes: Tensor) -> Tensor:
        known = torch.where(codes < self.table.shape[0], codes, OOV)
        return self.projection(self.table[known]) * (codes != 0).unsqueeze(-1)

    @torch.no_grad()
    def refresh(self, table: np.ndarray | Tensor) -> None:
        """Serve a refreshed table (more rows: items added since training); the projection stays as trained."""
        table = torch.as_tensor(np.asarray(table, dtype=np.float32)).to(self.table.device)
        if table.dim() != 2 or table.shape[1] != self.table.shape[1] or table.shape[0] < self.table.shape[0]:
            raise ValueError(f"item vectors: a refreshed table must keep the width {self.table.shape[1]} and at least "
                             f"{self.table.shape[0]} rows; got {tuple(table.shape)}")
        self.table = table
        self.spec.rows = table.shape[0]

"""Batches by tensor slicing of whole columns: no per-row Python objects on the hot path.

A batch is always a flat set of impressions. List-wise batches additionally carry ``request`` (0..R-1, each request's
impressions contiguous) so a list-wise model or loss can view them as padded [R, N] lists with ``Batch.to_lists``.
Session batches (``by_session``, data/sessions.py) hold whole sessions and carry ``session`` (0..S-1, each session's
impressions contiguous and in time order) besides ``request``, viewed as padded [S, T] sequences through
``Batch.session_layout``. Point-wise models ignore both, so every model is fed exactly the same impressions, features and
labels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from onerank.data.dataset import EncodedDataset, EncodedSplit
from onerank.data.encoding import OOV


@dataclass
class Batch:
    categorical: dict[str, Tensor]  # field -> [B] codes (0 pad, 1 OOV)
    dense: dict[str, Tensor]  # field -> [B] standardised values
    histories: dict[str, dict[str, Tensor]]  # sequence -> item field -> [B, L] codes, left-padded (0 = empty slot)
    labels: dict[str, Tensor]  # task -> [B] float
    label_mask: dict[str, Tensor]  # task -> [B] bool: label exists (task space) for this row
    user: Tensor  # [B] user index, for GAUC
    request: Tensor | None = None  # [B] request index within the batch (list-wise and session batches only)
    session: Tensor | None = None  # [B] session index within the batch (session batches only), rows in time order
    _lists: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        # shape[0] rather than len(): graph capture (torch.export, jit.trace) keeps it symbolic, len() bakes it in
        return self.user.shape[0]

    @property
    def num_requests(self) -> int:
        return 0 if self.request is None else int(self.request[-1]) + 1 if self.size else 0

    def to(self, device: torch.device | str) -> "Batch":
        def move(x):
            if isinstance(x, Tensor):
                return x.to(device, non_blocking=True)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            return x

        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self) if f.name != "_lists"})

    def slice(self, start: int, stop: int) -> "Batch":
        """Rows [start, stop) as a batch (request indices renumbered from 0)."""

        def cut(x):
            if isinstance(x, Tensor):
                return x[start:stop]
            if isinstance(x, dict):
                return {k: cut(v) for k, v in x.items()}
            return x

        def renumbered(ids: Tensor | None) -> Tensor | None:
            return None if ids is None else ids[start:stop] - ids[start]

        return Batch(**{f.name: cut(getattr(self, f.name)) for f in fields(self)
                        if f.name not in ("_lists", "request", "session")},
                     request=renumbered(self.request), session=renumbered(self.session))

    def list_layout(self) -> tuple[Tensor, Tensor]:
        """(slot, mask): ``slot[r, j]`` is the row of candidate j of request r (0 where padded), ``mask`` marks real
        candidates. Without request grouping every impression is a request of one."""
        if self._lists is None:
            request = self.request if self.request is not None else torch.arange(self.size, device=self.user.device)
            self._lists = group_layout(request)
        return self._lists

    def session_layout(self) -> tuple[Tensor, Tensor]:
        """(slot, mask) of the sessions, as ``list_layout`` of the requests: ``slot[s, t]`` is the row of the t-th
        impression of session s in time order. Without sessions every impression is a session of one."""
        if self.session is None:  # kept free of data-dependent shapes: exporters trace this path
            rows = torch.arange(self.size, device=self.user.device).unsqueeze(1)
            return rows, torch.ones_like(rows, dtype=torch.bool)
        return group_layout(self.session)

    def to_lists(self, x: Tensor) -> Tensor:
        """[B, ...] per-impression tensor -> [R, N, ...], padded entries are copies of row 0 (mask them)."""
        slot, _ = self.list_layout()
        return x[slot]

    def request_rows(self) -> Tensor:
        """Index of the first impression of each request: where request-level inputs (user, context, history) are read."""
        slot, _ = self.list_layout()
        return slot[:, 0]

    def request_inputs(self) -> "Batch":
        """The request-level inputs (categorical and dense fields, histories) of each request, read at its first row:
        a batch of R rows, so that a model embeds a request's context once, not once per candidate."""
        rows = self.request_rows()

        def pick(columns: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v[rows] for k, v in columns.items()}

        histories = {seq: pick(codes) for seq, codes in self.histories.items()}
        return Batch(pick(self.categorical), pick(self.dense), histories, {}, {}, self.user[rows])

    def as_one_request(self) -> "Batch":
        """The batch's rows as the candidates of one request (a serving pool usually comes without request grouping)."""
        request = torch.zeros(self.size, dtype=torch.long, device=self.user.device)
        return Batch(self.categorical, self.dense, self.histories, self.labels, self.label_mask, self.user, request)


def group_layout(group: Tensor) -> tuple[Tensor, Tensor]:
    """(slot [G, W], mask [G, W]) for ids 0..G-1 whose rows are contiguous: ``slot[g, j]`` is the j-th row of group g
    (0 where padded), ``mask`` marks real rows."""
    device = group.device
    counts = torch.bincount(group)
    starts = torch.cumsum(counts, 0) - counts
    width = int(counts.max()) if len(counts) else 0
    position = torch.arange(len(group), device=device) - starts[group]
    slot = torch.zeros(len(counts), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(counts), width, dtype=torch.bool, device=device)
    slot[group, position] = torch.arange(len(group), device=device)
    mask[group, position] = True
    return slot, mask


class TensorSplit:
    """An encoded split converted to torch tensors once; batches are gathered by index."""

    def __init__(self, split: EncodedSplit, item_table: dict[str, np.ndarray], item_id: str | None) -> None:
        self.n = len(split)
        # Fields are stored as one [n, F] matrix per kind so that a batch is one gather, not one per field; the
        # per-field dicts are column views of it.
        self._categorical = _stack_columns(split.categorical, np.int64, self.n)
        self._dense = _stack_columns(split.dense, np.float32, self.n)
        self.categorical = {k: self._categorical[:, j] for j, k in enumerate(split.categorical)}
        self.dense = {k: self._dense[:, j] for j, k in enumerate(split.dense)}
        self.labels = {k: torch.from_numpy(v.astype(np.float32)) for k, v in split.labels.items()}
        self.label_mask = {k: torch.from_numpy(v.astype(bool)) for k, v in split.label_mask.items()}
        self.histories = {k: torch.from_numpy(v.astype(np.int64)) for k, v in split.histories.items()}
        self.item_table = {k: torch.from_numpy(v.astype(np.int64)) for k, v in item_table.items()}
        self.item_id = item_id
        self.user = torch.from_numpy(
            split.user.astype(np.int64) if split.user is not None else np.arange(self.n, dtype=np.int64)
        )
        # Without request grouping (e.g. Census-Income) every impression is a request of one candidate.
        self.grouped = split.request is not None
        self.request = torch.from_numpy(
            split.request.astype(np.int64) if self.grouped else np.arange(self.n, dtype=np.int64)
        )
        counts = torch.bincount(self.request, minlength=1)
        self.request_starts = torch.cumsum(counts, 0) - counts
        self.request_sizes = counts
        # Without a session rule (data/sessions.py) every request is a session.
        self.session = torch.from_numpy(split.session.astype(np.int64)) if split.session is not None else self.request
        counts = torch.bincount(self.session, minlength=1)
        self.session_starts = torch.cumsum(counts, 0) - counts
        self.session_sizes = counts

    @property
    def num_requests(self) -> int:
        return len(self.request_sizes) if self.n else 0

    def gather(self, rows: Tensor, request: Tensor | None = None, session: Tensor | None = None) -> Batch:
        # index_select rather than x[rows]: several times faster for row gathers on CPU (docs/scaling.md)
        histories = {}
        for seq, codes in self.histories.items():
            items = codes.index_select(0, rows)
            per_field = {self.item_id: items}
            for name, table in self.item_table.items():
                per_field[name] = table[items]
            histories[seq] = per_field
        categorical = self._categorical.index_select(0, rows)
        dense = self._dense.index_select(0, rows)
        return Batch(
            categorical={k: categorical[:, j] for j, k in enumerate(self.categorical)},
            dense={k: dense[:, j] for j, k in enumerate(self.dense)},
            histories=histories,
            labels={k: v.index_select(0, rows) for k, v in self.labels.items()},
            label_mask={k: v.index_select(0, rows) for k, v in self.label_mask.items()},
            user=self.user.index_select(0, rows),
            request=request,
            session=session,
        )


class BatchLoader:
    """Iterates a split in batches of about ``batch_size`` impressions.

    ``by_request``: whole requests are kept together (list-wise training); batches then hold as many whole requests
    as fit in ``batch_size`` impressions (at least one). ``by_session``: the same with whole sessions (session-level
    models; a session is made of whole requests, so its batches also carry ``request``). Shuffling is a permutation
    drawn from (seed, epoch), so ``epoch(e, start_step=s)`` resumes exactly where an interrupted run stopped.

    ``rank`` / ``world_size`` (data-parallel training): ``batch_size`` stays the global batch; every rank plans the
    same global batches and yields its contiguous share of each (whole requests, balanced by impressions), so the
    ranks together see exactly the batches of one process.
    """

    def __init__(
        self,
        split: TensorSplit,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        by_request: bool = False,
        rank: int = 0,
        world_size: int = 1,
        by_session: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.by_request = by_request
        self.by_session = by_session
        self.rank = rank
        self.world_size = world_size

    def _units(self) -> tuple[Tensor, Tensor] | None:
        """(starts, sizes) of the units batches are made of (sessions or requests); None: single impressions."""
        if self.by_session:
            return self.split.session_starts, self.split.session_sizes
        if self.by_request:
            return self.split.request_starts, self.split.request_sizes
        return None

    def _plan(self, epoch: int) -> list[Tensor]:
        """Per batch, the units (impressions, requests or sessions) it holds."""
        grouped = self._units()
        units = (len(grouped[1]) if self.split.n else 0) if grouped else self.split.n
        if self.shuffle:
            gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(epoch))
            order = torch.randperm(units, generator=gen)
        else:
            order = torch.arange(units)
        if grouped is None:
            return list(torch.split(order, self.batch_size))
        sizes = grouped[1][order]
        ends = torch.cumsum(sizes, 0)
        batch_id = (ends - 1) // self.batch_size
        # a request larger than batch_size still forms one batch of its own
        boundaries = torch.nonzero(torch.diff(batch_id, prepend=batch_id[:1] - 1)).flatten().tolist() + [units]
        return [order[a:b] for a, b in zip(boundaries[:-1], boundaries[1:])]

    def __len__(self) -> int:
        return len(self._plan(0))

    def _shard(self, units: Tensor) -> Tensor:
        """This rank's contiguous share of a global batch's units: unit i goes to rank floor(start_i * W / rows),
        start_i being the number of impressions before it."""
        if self.world_size == 1:
            return units
        grouped = self._units()
        sizes = grouped[1][units] if grouped else torch.ones(len(units), dtype=torch.long)
        starts = torch.cumsum(sizes, 0) - sizes
        owner = starts * self.world_size // max(int(sizes.sum()), 1)
        return units[owner == self.rank]

    def epoch(self, epoch: int = 0, start_step: int = 0) -> Iterator[Batch]:
        plan = self._plan(epoch)
        grouped = self._units()
        for units in plan[start_step:]:
            units = self._shard(units)
            if grouped is None:
                yield self.split.gather(units)
                continue
            starts, sizes = grouped[0][units], grouped[1][units]
            group = torch.repeat_interleave(torch.arange(len(units)), sizes)
            offsets = torch.cumsum(sizes, 0) - sizes
            rows = starts[group] + torch.arange(int(sizes.sum())) - offsets[group]
            if self.by_session:
                yield self.split.gather(rows, request=_runs(self.split.request[rows]), session=group)
            else:
                yield self.split.gather(rows, request=group)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)


def _runs(ids: Tensor) -> Tensor:
    """Contiguous runs of equal ids -> 0, 1, 2, ... (requests renumbered within a session batch)."""
    new = torch.ones(len(ids), dtype=torch.long)
    new[1:] = (ids[1:] != ids[:-1]).long()
    return torch.cumsum(new, 0) - 1


def drop_to_oov(batch: Batch, rates: dict[str, float]) -> Batch:
    """``batch`` with a random share ``rates[field]`` of each field's codes replaced by the out-of-vocabulary code, so
    that row is trained on ordinary traffic and serves unseen values (users, items) with a learned embedding
    (training batches only; draws from torch's global RNG, which checkpoints save). Padding stays padding."""
    if not rates:
        return batch
    categorical = dict(batch.categorical)
    for name, rate in rates.items():
        codes = categorical[name]
        dropped = (torch.rand(codes.shape, device=codes.device) < rate) & (codes > OOV)
        categorical[name] = torch.where(dropped, torch.full_like(codes, OOV), codes)
    return dataclasses.replace(batch, categorical=categorical, _lists=batch._lists)


def _stack_columns(columns: dict[str, np.ndarray], dtype: type, n: int) -> Tensor:
    if not columns:
        return torch.zeros(n, 0, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype)
    return torch.from_numpy(np.stack([np.asarray(v, dtype=dtype) for v in columns.values()], axis=1))


def tensor_splits(ds: EncodedDataset) -> dict[str, TensorSplit]:
    return {name: TensorSplit(ds.split(name), ds.item_table, ds.schema.item_id) for name in ("train", "valid", "test")}

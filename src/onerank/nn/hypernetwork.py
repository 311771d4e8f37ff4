"""Hypernetwork-generated target attention: DTRN's task-specific interest module (our reconstruction).

One shared hypernetwork reads a task embedding and a behaviour-type embedding and writes the parameters of a small
target-attention unit for that (task, behaviour) pair: a low-rank bilinear form ``W = U V^T`` (``U, V`` of shape
``[d, r]``) scoring each history item ``h`` against the candidate ``c`` as ``c^T U V^T h / sqrt(r)``. Only the task
and behaviour embeddings are specific to a pair, so K tasks x S behaviours cost K + S small vectors, not K x S
attention units.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from onerank.nn.mlp import MLP


class TaskVector(nn.Module):
    """One learned vector; a module of its own so that each task's embedding has a name prefix of its own."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.vector = nn.Parameter(torch.randn(dim) * 0.1)

    def forward(self) -> Tensor:
        return self.vector


class HyperTargetAttention(nn.Module):
    """Per (task, behaviour) target attention whose bilinear parameters come from a shared hypernetwork.

    ``forward(candidate [B, d], histories {behaviour: ([B, L, d] keys, [B, L] mask)})`` returns the interests
    ``[B, K, S, d]``: for task k and behaviour s, the attention-weighted sum of sequence s's items. Weights are
    softmax-normalised over valid items; an empty history gives a zero interest (no NaN, finite gradients).
    """

    def __init__(
        self,
        item_dim: int,
        tasks: list[str],
        behaviours: list[str],
        task_embedding_dim: int = 8,
        behaviour_embedding_dim: int = 8,
        hidden: tuple[int, ...] = (64,),
        rank: int = 4,
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.behaviours = list(behaviours)
        self.item_dim = item_dim
        self.rank = rank
        self.task_embeddings = nn.ModuleDict({t: TaskVector(task_embedding_dim) for t in self.tasks})
        self.behaviour_embeddings = nn.Parameter(torch.randn(len(self.behaviours), behaviour_embedding_dim) * 0.1)
        self.hypernetwork = MLP(
            task_embedding_dim + behaviour_embedding_dim, list(hidden), output_dim=2 * item_dim * rank
        )
        # The generated U and V start at the scale of a standard initialisation of a [d, r] matrix (std 1/sqrt(d)),
        # whatever the hypernetwork's width: the last layer's output is rescaled once here, not at every call.
        last = self.hypernetwork.net[-1]
        with torch.no_grad():
            last.weight.mul_(1.0 / math.sqrt(item_dim))
            last.bias.normal_(0.0, 1.0 / math.sqrt(item_dim))

    def generate(self) -> tuple[Tensor, Tensor]:
        """The generated low-rank factors ``U, V``: each [K, S, d, r]."""
        task = torch.stack([self.task_embeddings[t]() for t in self.tasks])  # [K, e_t]
        behaviour = self.behaviour_embeddings  # [S, e_b]
        K, S = task.shape[0], behaviour.shape[0]
        pairs = torch.cat([task[:, None, :].expand(K, S, -1), behaviour[None, :, :].expand(K, S, -1)], dim=-1)
        params = self.hypernetwork(pairs).view(K, S, 2, self.item_dim, self.rank)
        return params[:, :, 0], params[:, :, 1]

    def forward(self, candidate: Tensor, histories: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        u, v = self.generate()
        interests = []
        for s, behaviour in enumerate(self.behaviours):
            keys, mask = histories[behaviour]
            query = torch.einsum("bd,kdr->bkr", candidate, u[:, s])  # c^T U for every task
            projected = torch.einsum("bld,kdr->bklr", keys, v[:, s])  # V^T h for every task and item
            logits = torch.einsum("bkr,bklr->bkl", query, projected) / math.sqrt(self.rank)
            valid = mask[:, None, :]
            # A finite fill keeps rows without any valid item finite; the mask then zeroes their weights.
            weights = torch.softmax(logits.masked_fill(~valid, -1e9), dim=-1) * valid
            interests.append(torch.einsum("bkl,bld->bkd", weights, keys))
        return torch.stack(interests, dim=2)

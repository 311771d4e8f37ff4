"""A SENet-like field gate (Hu et al., CVPR 2018; for field embeddings as in FiBiNET, Huang et al., RecSys 2019).

Squeeze each field embedding to a scalar (its mean), excite with a two-layer network, and rescale every field by its
gate. DTRN's task-specific representation refinement is one such gate per task.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SENetGate(nn.Module):
    """fields [B, F, d] -> fields [B, F, d] rescaled by ``scale * sigmoid(excitation(squeeze(fields)))``.

    ``scale = 2`` (the default) makes an untrained gate (sigmoid(0) = 0.5) the identity, as in EPNet / PEPNet's gate
    units, so adding the refinement does not halve the input at initialisation; ``scale = 1`` is SENet's plain gate.
    """

    def __init__(self, num_fields: int, reduction: int = 4, scale: float = 2.0) -> None:
        super().__init__()
        if num_fields < 1:
            raise ValueError("SENetGate needs at least one field")
        hidden = max(1, math.ceil(num_fields / reduction))
        self.excitation = nn.Sequential(
            nn.Linear(num_fields, hidden), nn.ReLU(), nn.Linear(hidden, num_fields)
        )
        self.scale = scale

    def gates(self, fields: Tensor) -> Tensor:
        """[B, F] gate values in (0, scale)."""
        return self.scale * torch.sigmoid(self.excitation(fields.mean(dim=-1)))

    def forward(self, fields: Tensor) -> Tensor:
        return fields * self.gates(fields).unsqueeze(-1)

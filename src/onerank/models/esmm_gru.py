"""ESMM + GRU: the baseline that tells HEROES' hierarchy apart from reading the session at all (docs/heroes.md).

ESMM (models/esmm.py) whose towers read, beside the impression's own representation x_t, the state of one plain GRU
run over the session's impressions x_1..x_t in time order (data/sessions.py): the same inputs, the same causal
order and the same funnel products as HEROES, with one recurrent layer at one time scale and no gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.features.space import FeatureSpace
from onerank.models.base import TaskTowers, register_model
from onerank.models.esmm import ESMM, ESMMConfig


@dataclass
class ESMMGRUConfig(ESMMConfig):
    hidden: int = 32  # width of the GRU state


@register_model("esmm_gru")
class ESMMGRU(ESMM):
    Config = ESMMGRUConfig
    needs_sessions = True

    def __init__(self, space: FeatureSpace, config: ESMMGRUConfig) -> None:
        super().__init__(space, config)
        width = self.encoder.output_dim
        self.gru = nn.GRU(width, config.hidden, batch_first=True)
        self.towers = TaskTowers(self.tasks, width + config.hidden, config.tower_hidden, config.dropout)

    def step_logits(self, batch: Batch) -> dict[str, Tensor]:
        x = self.encoder(batch)
        slot, mask = batch.session_layout()  # [S, T] in time order; padding after each session's end
        states, _ = self.gru(x[slot])  # causal: state t has read impressions 1..t of its session only
        values = states[mask]
        session_state = values.new_zeros(x.shape[0], values.shape[-1]).index_copy(0, slot[mask], values)
        return self.towers({t: torch.cat([x, session_state], dim=-1) for t in self.tasks})

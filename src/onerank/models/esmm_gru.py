"""ESMM + GRU: the baseline that tells HEROES' hierarchy apart from reading the session at all (docs/heroes.md).

ESMM (models/esmm.py) whose towers read, beside the impression's own representation x_t, the state of one plain GRU
run over the session's impressions x_1..x_t in time order (data/sessions.py): the same inputs, the same causal
order and the same funnel products as HEROES, with one recurrent layer at one time scale and no gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from onerank.data.batching import Batch
from onerank.features.space import FeatureSpace
from onerank.models.base import register_model
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
        self.gru = nn.GRU(self.encoder.output_dim, config.hidden, batch_first=True)

    def tower_input_dims(self) -> int:
        return self.encoder.output_dim + self.config.hidden

    def step_logits(self, batch: Batch) -> dict[str, Tensor]:
        x = self.encoder(batch)
        slot, mask = batch.session_layout()  # [S, T] in time order; padding after each session's end
        # causal: state t has read impressions 1..t of its session only
        if slot.shape[1] == 1:  # sessions of one (a scored pool, an export): nothing to pack
            states = self.gru(x[slot])[0]
        else:  # packed, the GRU steps each session to its own length only (no work on padding)
            packed = pack_padded_sequence(x[slot], mask.sum(1).cpu(), batch_first=True, enforce_sorted=False)
            states = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=slot.shape[1])[0]
        values = states[mask]
        session_state = values.new_zeros(x.shape[0], values.shape[-1]).index_copy(0, slot[mask], values)
        return self.towers({t: torch.cat([x, session_state], dim=-1) for t in self.tasks})

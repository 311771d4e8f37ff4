"""HEROES (Jin et al., "Multi-Scale User Behavior Network for Entire Space Multi-Task Learning", CIKM 2022,
arXiv 2208.01889): ESMM's entire-space funnel read along a session, with two recurrent layers at two time scales.

Read top to bottom like the paper's figure, for each session of the batch (data/sessions.py: one user's impressions
in time order) and each impression t in turn:

1. x_t: the impression's own representation, the DNN encoder ESMM uses (fields, target attention over histories).
2. Lower, engagement layer (state s_c, H_c), ticking at every impression. After a boundary it is flushed and
   re-seeded from above (HM-RNN's flush): ``s_c = tanh((1 - b) W H_c + b W' H_v) + i z + (1 - b) f s_c`` with
   b = g_{t-1}, the previous impression's boundary; the term in ``W' H_v`` is the **top-down** term.
3. ``p_ctr_t = sigmoid(tower([x_t, H_c]))``, and the **boundary gate** ``g_t = p_ctr_t``: an impression the model
   expects to be engaged with is where the slower layer ticks (a soft boundary, differentiable).
4. Upper, satisfaction layer (s_v, H_v) copies or updates (HM-RNN's copy / update):
   ``s_v = (1 - g) s_v + g (f s_v + i z + tanh(U_v H_v + U_c H_c))``, ``H_v = (1 - g) H_v + g o tanh(s_v)``: with
   g = 0 it is copied exactly, so satisfaction evolves at the time scale of engagement.
5. ``p_cvr_t = sigmoid(tower([x_t, H_v]))`` and ESMM's product ``p_ctcvr_t = p_ctr_t x p_cvr_t`` (this class is an
   ESMM: funnel, entire-space auxiliary loss and bias initialisation are ESMM's).

Every score depends on impressions 1..t of its session only (the recurrence runs forward; padding comes after a
session's last impression), so the model is causal; ``tests/test_heroes.py`` checks it, the gate's copy / update and
the batched recurrence against one session at a time.

Options: ``gate`` (off: b = 0 and g = 1, the upper layer updates at every impression and the lower one is never
flushed, i.e. one time scale), ``top_down`` (off: no W' H_v term), ``unit`` (``lstm``; ``hawkes``: each layer's
memory decays towards a learnt baseline before it is updated, ``s <- s_bar + (s - s_bar) exp(-delta)``, delta >= 0
learnt per impression; the continuous-time LSTM of the Neural Hawkes Process, Mei & Eisner 2017, in steps, our
reading of the paper's Hawkes unit). What we changed from the paper and its public code, and why: docs/heroes.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.features.space import FeatureSpace
from onerank.models.base import register_model
from onerank.models.esmm import ESMM, ESMMConfig


@dataclass
class HEROESConfig(ESMMConfig):
    hidden: int = 32  # width of each recurrent layer
    gate: bool = True  # the hierarchical boundary gate g_t = p_ctr_t (off: one time scale)
    top_down: bool = True  # the upper layer's state seeds the lower one after a boundary
    unit: Literal["lstm", "hawkes"] = "lstm"


class Gates(nn.Module):
    """One layer's gates from the impression and the layer's previous output: input i, forget f, output o, candidate
    z; for the Hawkes unit also the baseline's input / forget gates and the decay rate. The impression part is
    computed for the whole session at once (``project``), only the recurrent part inside the loop."""

    def __init__(self, input_dim: int, hidden: int, hawkes: bool) -> None:
        super().__init__()
        self.count = 7 if hawkes else 4
        self.hidden = hidden
        self.from_input = nn.Linear(input_dim, self.count * hidden)
        self.from_state = nn.Linear(hidden, self.count * hidden, bias=False)

    def project(self, x: Tensor) -> Tensor:
        return self.from_input(x)

    def forward(self, projected: Tensor, state: Tensor) -> dict[str, Tensor]:
        parts = (projected + self.from_state(state)).chunk(self.count, dim=-1)
        gates = {"i": torch.sigmoid(parts[0]), "f": torch.sigmoid(parts[1]), "o": torch.sigmoid(parts[2]),
                 "z": torch.tanh(parts[3])}
        if self.count == 7:
            gates.update(i_bar=torch.sigmoid(parts[4]), f_bar=torch.sigmoid(parts[5]), delta=F.softplus(parts[6]))
        return gates


def decayed(memory: Tensor, baseline: Tensor, gates: dict[str, Tensor]) -> Tensor:
    """The memory an update starts from: itself (LSTM), or decayed towards its baseline (Hawkes unit)."""
    if "delta" not in gates:
        return memory
    return baseline + (memory - baseline) * torch.exp(-gates["delta"])


def next_baseline(baseline: Tensor, gates: dict[str, Tensor]) -> Tensor:
    if "delta" not in gates:
        return baseline
    return gates["f_bar"] * baseline + gates["i_bar"] * gates["z"]


class HierarchicalCell(nn.Module):
    """The two layers' recurrences. State: lower (s_c, s_c_bar, H_c), upper (s_v, s_v_bar, H_v), each [S, hidden]."""

    def __init__(self, input_dim: int, config: HEROESConfig) -> None:
        super().__init__()
        h, hawkes = config.hidden, config.unit == "hawkes"
        self.gate, self.top_down = config.gate, config.top_down
        self.lower = Gates(input_dim, h, hawkes)
        self.upper = Gates(input_dim, h, hawkes)
        self.own = nn.Linear(h, h, bias=False)  # W: the lower layer's own state, kept where there was no boundary
        self.from_above = nn.Linear(h, h, bias=False)  # W': the top-down term
        self.upper_own = nn.Linear(h, h, bias=False)  # U_v
        self.from_below = nn.Linear(h, h, bias=False)  # U_c

    def lower_step(self, projected: Tensor, state: dict[str, Tensor], boundary: Tensor) -> dict[str, Tensor]:
        """Engagement layer at impression t; ``boundary`` [S, 1] is the previous impression's g (0 at the start)."""
        keep = 1.0 - boundary if self.gate else torch.ones_like(boundary)
        seed = keep * self.own(state["H_c"])
        if self.top_down:
            seed = seed + (boundary if self.gate else 1.0) * self.from_above(state["H_v"])
        g = self.lower(projected, state["H_c"])
        memory = torch.tanh(seed) + g["i"] * g["z"] + keep * g["f"] * decayed(state["s_c"], state["s_c_bar"], g)
        return {"s_c": memory, "s_c_bar": next_baseline(state["s_c_bar"], g), "H_c": g["o"] * torch.tanh(memory)}

    def upper_step(self, projected: Tensor, state: dict[str, Tensor], lower: dict[str, Tensor],
                   update: Tensor) -> dict[str, Tensor]:
        """Satisfaction layer: copied where ``update`` [S, 1] is 0, updated where it is 1, mixed in between."""
        g = self.upper(projected, state["H_v"])
        candidate = torch.tanh(self.upper_own(state["H_v"]) + self.from_below(lower["H_c"]))
        updated = g["f"] * decayed(state["s_v"], state["s_v_bar"], g) + g["i"] * g["z"] + candidate
        memory = (1.0 - update) * state["s_v"] + update * updated
        baseline = (1.0 - update) * state["s_v_bar"] + update * next_baseline(state["s_v_bar"], g)
        output = (1.0 - update) * state["H_v"] + update * g["o"] * torch.tanh(memory)
        return {"s_v": memory, "s_v_bar": baseline, "H_v": output}


@register_model("heroes")
class HEROES(ESMM):
    Config = HEROESConfig
    needs_sessions = True

    def __init__(self, space: FeatureSpace, config: HEROESConfig) -> None:
        super().__init__(space, config)
        self.engagement = self.funnel[0]  # the funnel's first step drives the gate
        self.cell = HierarchicalCell(self.encoder.output_dim, config)

    def tower_input_dims(self) -> dict[str, int]:
        # a funnel step reads its own layer (engagement the lower, later steps the upper); other tasks read both
        width, h = self.encoder.output_dim, self.config.hidden
        return {t: width + h if t in self.funnel else width + 2 * h for t in self.tasks}

    def step_logits(self, batch: Batch) -> dict[str, Tensor]:
        x = self.encoder(batch)
        slot, mask = batch.session_layout()  # [S, T]: row of each session's t-th impression, in time order
        active = [slot.shape[0]]  # sessions of one (a scored pool, an export): one step, free of data-dependent sizes
        if slot.shape[1] > 1:
            # longest sessions first: at step t the sessions still running are the first active[t], so no step works
            # on padding (and each session's state stays its own)
            lengths, order = mask.sum(1).sort(descending=True, stable=True)
            slot = slot[order]
            steps = torch.arange(slot.shape[1], device=x.device)
            active = (lengths.unsqueeze(0) > steps.unsqueeze(1)).sum(1).tolist()
        h = self.config.hidden
        state = {k: x.new_zeros(slot.shape[0], h) for k in ("s_c", "s_c_bar", "H_c", "s_v", "s_v_bar", "H_v")}
        boundary = x.new_zeros(slot.shape[0], 1)
        lower_in, upper_in = self.cell.lower.project(x), self.cell.upper.project(x)
        tower = self.towers.towers[self.engagement]
        rows, engagement, lower_out, upper_out = [], [], [], []
        for t, n in enumerate(active):
            if n < slot.shape[0]:
                slot, boundary, state = slot[:n], boundary[:n], {k: v[:n] for k, v in state.items()}
            at = slot[:, t]
            lower = self.cell.lower_step(lower_in[at], state, boundary)
            logit = tower(torch.cat([x[at], lower["H_c"]], dim=-1)).squeeze(-1)
            update = torch.sigmoid(logit).unsqueeze(-1) if self.config.gate else torch.ones_like(boundary)
            upper = self.cell.upper_step(upper_in[at], state, lower, update)
            state, boundary = {**lower, **upper}, update
            rows.append(at)
            engagement.append(logit)
            lower_out.append(lower["H_c"])
            upper_out.append(upper["H_v"])
        rows = torch.cat(rows)

        def flat(per_step: list[Tensor]) -> Tensor:  # the steps' outputs -> [B, ...] in the batch's row order
            values = torch.cat(per_step)
            return values.new_zeros((x.shape[0], *values.shape[1:])).index_copy(0, rows, values)

        H_c, H_v = flat(lower_out), flat(upper_out)
        reps = {t: torch.cat([x, H_v], dim=-1) if t in self.funnel else torch.cat([x, H_c, H_v], dim=-1)
                for t in self.tasks if t != self.engagement}
        out = {t: self.towers.towers[t](rep).squeeze(-1) for t, rep in reps.items()}
        out[self.engagement] = flat(engagement)
        return {t: out[t] for t in self.tasks}

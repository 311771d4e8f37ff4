"""Expert layers of the multi-gate family: MMoE / OMoE (Ma et al., KDD 2018) and PLE (Tang et al., RecSys 2020).

Every layer takes either one shared input [B, D] or one input per task ({task: [B, D]}, e.g. DTRN's task-specific
bottom representations), and returns one output per task.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onerank.nn.mlp import MLP

TaskInputs = Tensor | dict[str, Tensor]


def _per_task(x: TaskInputs, tasks: list[str]) -> dict[str, Tensor]:
    return x if isinstance(x, dict) else {t: x for t in tasks}


def _mix(experts: Tensor, gate_logits: Tensor) -> Tensor:
    """experts [B, E, H], gate logits [B, E] -> [B, H]"""
    # A broadcast multiply-and-sum, not einsum: einsum lowers this to B tiny [1, E] x [E, H] matrix products, several
    # times slower on CPU (docs/scaling.md).
    return (torch.softmax(gate_logits, dim=-1).unsqueeze(-1) * experts).sum(dim=1)


def _first_linear(module: nn.Module) -> tuple[nn.Linear, list[nn.Module]] | None:
    """(first linear layer, the layers after it) of a Linear or an MLP starting with one; None otherwise."""
    if isinstance(module, nn.Linear):
        return module, []
    if isinstance(module, MLP) and len(module.net) and isinstance(module.net[0], nn.Linear):
        return module.net[0], list(module.net)[1:]
    return None


def _apply_grouped(jobs: list[tuple[Tensor, nn.Module]]) -> list[Tensor]:
    """``[module(x) for x, module in jobs]``, with the first linear layers of all modules reading the same tensor
    computed as one matrix product of their concatenated weights (parameters keep their own names).

    Experts and gates of a layer usually read one input: one [D, sum H] product is markedly faster on CPU than E + G
    thin [D, H] ones, and the input's gradient is accumulated once instead of E + G times (docs/scaling.md).
    """
    out: list[Tensor | None] = [None] * len(jobs)
    groups: dict[int, list[int]] = {}
    for i, (x, _) in enumerate(jobs):
        groups.setdefault(id(x), []).append(i)
    for members in groups.values():
        x = jobs[members[0]][0]
        split = [_first_linear(jobs[i][1]) for i in members]
        if len(members) == 1 or any(s is None or s[0].bias is None for s in split):
            for i in members:
                out[i] = jobs[i][1](x)
            continue
        firsts = [s[0] for s in split]
        h = F.linear(x, torch.cat([l.weight for l in firsts]), torch.cat([l.bias for l in firsts]))
        for i, part, (_, rest) in zip(members, h.split([l.out_features for l in firsts], dim=-1), split):
            for layer in rest:
                part = layer(part)
            out[i] = part
    return out  # type: ignore[return-value]


class MixtureOfExperts(nn.Module):
    """Shared experts mixed by softmax gates: one gate per task (MMoE) or one gate shared by all tasks (OMoE).

    With per-task inputs, task k's gate and the experts it mixes both read task k's input.
    """

    def __init__(
        self,
        input_dim: int,
        tasks: list[str],
        num_experts: int = 4,
        expert_hidden: tuple[int, ...] = (64,),
        per_task_gates: bool = True,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.tasks = tasks
        self.experts = nn.ModuleList(
            MLP(input_dim, list(expert_hidden), dropout=dropout, batch_norm=batch_norm) for _ in range(num_experts)
        )
        gate_names = tasks if per_task_gates else ["shared"]
        self.gates = nn.ModuleDict({g: nn.Linear(input_dim, num_experts) for g in gate_names})
        self.per_task_gates = per_task_gates
        self.output_dim = self.experts[0].output_dim

    def forward(self, x: TaskInputs) -> dict[str, Tensor]:
        inputs = _per_task(x, self.tasks)
        gate_of = {t: t if self.per_task_gates else "shared" for t in self.tasks}
        # a shared input runs the experts once; each distinct input feeds the experts and the gates that read it
        distinct = list({id(xt): xt for xt in inputs.values()}.values())
        jobs: list[tuple[Tensor, nn.Module]] = []
        for xt in distinct:
            jobs += [(xt, e) for e in self.experts]
        gate_jobs = {task: len(jobs) + k for k, task in enumerate(self.tasks)}
        jobs += [(inputs[t], self.gates[gate_of[t]]) for t in self.tasks]
        results = _apply_grouped(jobs)
        num = len(self.experts)
        experts = {id(xt): torch.stack(results[k * num:(k + 1) * num], dim=1) for k, xt in enumerate(distinct)}
        return {t: _mix(experts[id(inputs[t])], results[gate_jobs[t]]) for t in self.tasks}


class CGCLayer(nn.Module):
    """One level of PLE: task-specific experts plus shared experts.

    Task k's gate mixes its own experts and the shared ones. When ``with_shared_output`` (every level but the
    last), a shared gate mixes all experts of all tasks and the shared ones; that mixture is the input of the next
    level's shared experts and shared gate, while task k's mixture feeds the next level's experts of task k.
    """

    def __init__(
        self,
        input_dim: int,
        tasks: list[str],
        num_task_experts: int = 1,
        num_shared_experts: int = 1,
        expert_hidden: tuple[int, ...] = (64,),
        with_shared_output: bool = False,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.tasks = tasks

        def experts(n: int) -> nn.ModuleList:
            return nn.ModuleList(
                MLP(input_dim, list(expert_hidden), dropout=dropout, batch_norm=batch_norm) for _ in range(n)
            )

        self.task_experts = nn.ModuleDict({t: experts(num_task_experts) for t in tasks})
        self.shared_experts = experts(num_shared_experts)
        self.task_gates = nn.ModuleDict(
            {t: nn.Linear(input_dim, num_task_experts + num_shared_experts) for t in tasks}
        )
        total = num_task_experts * len(tasks) + num_shared_experts
        self.shared_gate = nn.Linear(input_dim, total) if with_shared_output else None
        self.output_dim = self.shared_experts[0].output_dim

    def forward(self, task_inputs: dict[str, Tensor], shared_input: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        jobs: list[tuple[Tensor, nn.Module]] = [(shared_input, e) for e in self.shared_experts]
        for t in self.tasks:
            jobs += [(task_inputs[t], e) for e in self.task_experts[t]] + [(task_inputs[t], self.task_gates[t])]
        if self.shared_gate is not None:
            jobs.append((shared_input, self.shared_gate))
        results = iter(_apply_grouped(jobs))
        shared = [next(results) for _ in self.shared_experts]
        own, gates = {}, {}
        for t in self.tasks:
            own[t] = [next(results) for _ in self.task_experts[t]]
            gates[t] = next(results)
        outputs = {t: _mix(torch.stack(own[t] + shared, dim=1), gates[t]) for t in self.tasks}
        shared_out = None
        if self.shared_gate is not None:
            everything = [o for t in self.tasks for o in own[t]] + shared
            shared_out = _mix(torch.stack(everything, dim=1), next(results))
        return outputs, shared_out


class PLE(nn.Module):
    """Progressive Layered Extraction: stacked CGC levels."""

    def __init__(
        self,
        input_dim: int,
        tasks: list[str],
        num_levels: int = 1,
        num_task_experts: int = 1,
        num_shared_experts: int = 1,
        expert_hidden: tuple[int, ...] = (64,),
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError("PLE needs at least one level")
        self.tasks = tasks
        levels = []
        width = input_dim
        for level in range(num_levels):
            cgc = CGCLayer(
                width, tasks, num_task_experts, num_shared_experts, expert_hidden,
                with_shared_output=level < num_levels - 1, dropout=dropout, batch_norm=batch_norm,
            )
            levels.append(cgc)
            width = cgc.output_dim
        self.levels = nn.ModuleList(levels)
        self.output_dim = width

    def private_prefixes(self, attribute: str) -> dict[str, list[str]]:
        """Per task, the parameter-name prefixes of its own experts and gates, for a model holding this module as
        ``attribute`` (what ``MultiTaskModel.task_parameter_prefixes`` reports)."""
        return {
            t: [f"{attribute}.levels.{i}.{part}.{t}." for i in range(len(self.levels))
                for part in ("task_experts", "task_gates")]
            for t in self.tasks
        }

    def forward(self, x: TaskInputs, shared_input: Tensor | None = None) -> dict[str, Tensor]:
        task_inputs = _per_task(x, self.tasks)
        if shared_input is None:
            if isinstance(x, dict):
                shared_input = torch.stack(list(x.values()), dim=0).mean(dim=0)
            else:
                shared_input = x
        for level in self.levels:
            task_inputs, shared_input = level(task_inputs, shared_input)
        return task_inputs

"""Expert layers of the multi-gate family: MMoE / OMoE (Ma et al., KDD 2018) and PLE (Tang et al., RecSys 2020).

Every layer takes either one shared input [B, D] or one input per task ({task: [B, D]}, e.g. DTRN's task-specific
bottom representations), and returns one output per task.
"""

from __future__ import annotations

import torch
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
    ) -> None:
        super().__init__()
        self.tasks = tasks
        self.experts = nn.ModuleList(MLP(input_dim, list(expert_hidden), dropout=dropout) for _ in range(num_experts))
        gate_names = tasks if per_task_gates else ["shared"]
        self.gates = nn.ModuleDict({g: nn.Linear(input_dim, num_experts) for g in gate_names})
        self.per_task_gates = per_task_gates
        self.output_dim = self.experts[0].output_dim

    def forward(self, x: TaskInputs) -> dict[str, Tensor]:
        inputs = _per_task(x, self.tasks)
        out: dict[str, Tensor] = {}
        expert_cache: dict[int, Tensor] = {}
        for task in self.tasks:
            xt = inputs[task]
            if id(xt) not in expert_cache:  # a shared input runs the experts once
                expert_cache[id(xt)] = torch.stack([e(xt) for e in self.experts], dim=1)
            gate = self.gates[task if self.per_task_gates else "shared"]
            out[task] = _mix(expert_cache[id(xt)], gate(xt))
        return out


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
    ) -> None:
        super().__init__()
        self.tasks = tasks

        def experts(n: int) -> nn.ModuleList:
            return nn.ModuleList(MLP(input_dim, list(expert_hidden), dropout=dropout) for _ in range(n))

        self.task_experts = nn.ModuleDict({t: experts(num_task_experts) for t in tasks})
        self.shared_experts = experts(num_shared_experts)
        self.task_gates = nn.ModuleDict(
            {t: nn.Linear(input_dim, num_task_experts + num_shared_experts) for t in tasks}
        )
        total = num_task_experts * len(tasks) + num_shared_experts
        self.shared_gate = nn.Linear(input_dim, total) if with_shared_output else None
        self.output_dim = self.shared_experts[0].output_dim

    def forward(self, task_inputs: dict[str, Tensor], shared_input: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        shared = [e(shared_input) for e in self.shared_experts]
        own = {t: [e(task_inputs[t]) for e in self.task_experts[t]] for t in self.tasks}
        outputs = {
            t: _mix(torch.stack(own[t] + shared, dim=1), self.task_gates[t](task_inputs[t])) for t in self.tasks
        }
        shared_out = None
        if self.shared_gate is not None:
            everything = [o for t in self.tasks for o in own[t]] + shared
            shared_out = _mix(torch.stack(everything, dim=1), self.shared_gate(shared_input))
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
                with_shared_output=level < num_levels - 1, dropout=dropout,
            )
            levels.append(cgc)
            width = cgc.output_dim
        self.levels = nn.ModuleList(levels)
        self.output_dim = width

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

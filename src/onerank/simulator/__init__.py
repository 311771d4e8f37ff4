"""A session simulator of KuaiRand users for judging fusion policies (docs/rl_fusion.md): a response model fitted on
the log's train days, a leave model driven by the session's satisfaction, slates chosen from a candidate pool by a
fusion of a ranker's predictions; vectorised (``simulate``) and as a Gymnasium Env (``make_env``)."""

from onerank.simulator.env import (
    RewardWeights, Rollout, SessionStarts, SimulatorConfig, World, draw_starts, make_env, simulate,
)
from onerank.simulator.leave import LeaveModel
from onerank.simulator.logs import KuaiRandLog, read_kuairand
from onerank.simulator.world import fit_world, response_fit

__all__ = [
    "KuaiRandLog", "LeaveModel", "RewardWeights", "Rollout", "SessionStarts", "SimulatorConfig", "World",
    "draw_starts", "fit_world", "make_env", "read_kuairand", "response_fit", "simulate",
]

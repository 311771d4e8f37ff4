"""When a simulated user leaves: a hazard after every impression, driven by the session's accumulated satisfaction.

``P(leave after this impression) = sigmoid(intercept + position * log1p(n) - sum_s weight_s * S_s)``, ``n`` the
impressions already seen before this one, ``S_s`` the decayed in-session sum of signal ``s`` including this impression
(the response model's SESSION_DECAY). Two ways to set it:

* :meth:`LeaveModel.fit`: a logistic regression on the real sessions of the train days (is this impression the
  session's last?). On the KuaiRand-Pure slice it is driven by the position alone: the satisfaction weights come out
  near zero (docs/rl_fusion.md shows them), because the slice keeps about one impression of each feed request and
  cannot show what made a user stay. It reproduces the slice's session lengths (1.3 impressions on average).
* :meth:`LeaveModel.assumed`: the app-session model the fusion experiments run on, as KuaiSim (KRLBenchmark) does:
  satisfaction lowers the hazard with a chosen weight per signal, and the intercept is set so that sessions under
  the logging policy last a chosen number of impressions on average. The satisfaction weights are an assumption,
  not a measurement; the results are conditional on them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from onerank.simulator.response import SESSION_DECAY, SESSION_SIGNALS

SATISFACTION_SIGNALS = SESSION_SIGNALS


@dataclass
class LeaveModel:
    intercept: float
    position: float = 0.0
    satisfaction: dict[str, float] = field(default_factory=dict)  # signal -> weight (positive: keeps users longer)

    def hazard(self, seen: np.ndarray, satisfaction: dict[str, np.ndarray]) -> np.ndarray:
        """``seen``: impressions before this one; ``satisfaction``: decayed sums including this impression."""
        z = self.intercept + self.position * np.log1p(seen)
        for s, w in self.satisfaction.items():
            z = z - w * satisfaction[s]
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def fit(cls, sessions: pd.DataFrame) -> "LeaveModel":
        """Logistic regression of 'last impression of its session' on the position and the satisfaction sums
        (``sessions``: log rows with session, position and the SATISFACTION_SIGNALS columns, sorted by time)."""
        from sklearn.linear_model import LogisticRegression

        frame = sessions.reset_index(drop=True)
        session = frame["session"].to_numpy()
        last = np.ones(len(frame), dtype=bool)
        last[:-1] = session[1:] != session[:-1]
        sums = decayed_sums(frame, inclusive=True)
        x = np.column_stack([np.log1p(frame["position"].to_numpy())] + [sums[s] for s in SATISFACTION_SIGNALS])
        model = LogisticRegression(C=1e4, max_iter=2000).fit(x, last)
        coef = model.coef_[0]
        return cls(float(model.intercept_[0]), float(coef[0]),
                   {s: float(-c) for s, c in zip(SATISFACTION_SIGNALS, coef[1:])})

    @classmethod
    def assumed(cls, intercept: float, satisfaction: dict[str, float]) -> "LeaveModel":
        unknown = [s for s in satisfaction if s not in SATISFACTION_SIGNALS]
        if unknown:
            raise ValueError(f"unknown satisfaction signals {unknown}; known: {list(SATISFACTION_SIGNALS)}")
        return cls(float(intercept), 0.0, dict(satisfaction))


def decayed_sums(frame: pd.DataFrame, inclusive: bool) -> dict[str, np.ndarray]:
    """Per logged impression, the decayed in-session sums of SATISFACTION_SIGNALS (``inclusive``: with the impression
    itself, as the leave model reads them after it)."""
    position = frame["position"].to_numpy()
    out = {}
    for s in SATISFACTION_SIGNALS:
        values = np.log1p(frame["play_s"].to_numpy()) if s == "play" else frame[s].to_numpy(np.float64)
        acc = np.zeros(len(frame))
        running = 0.0
        for i in range(len(frame)):
            running = (0.0 if position[i] == 0 else SESSION_DECAY * running) + values[i]
            acc[i] = running
        out[s] = acc if inclusive else acc - values
    return out

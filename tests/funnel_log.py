"""A small, realistic advertising funnel log with known probabilities, shared by the tests and
``benchmarks/funnel_fixes.py``.

What a real log looks like, and what the tabular loader has to cope with:

* impressions ``ads.csv``: request id ``req``, user ``uid``, ad ``ad`` with advertiser ``adv``, display position
  ``slot`` (varies within a request), device ``dev`` (one per request), a high-cardinality ``site`` (Zipf, many
  values seen once, new values in the test period), a ``bid`` with gaps (NaN), epoch-second timestamps ``ts``;
* labels: ``clk``; ``cv`` observed only after a click (NaN elsewhere: an entire-space funnel); ``dwell`` seconds after
  a click (heavy-tailed, NaN elsewhere);
* events ``events.csv``: ``user, ad_id, kind, t`` with each click (a few seconds after its request started) and each
  conversion (hours later, at its own time), plus a pre-period of events before the first impression;
* users who arrive late: about a third of the test period's users have no train impression.

The generating probabilities are kept (``p_click``, ``p_cv``), so a benchmark can report the AUC of the truth.
Click: ``sigmoid(b + 1.3 u.v + position effect + site effect + 0.3 bid_z + user bias)``; conversion after a click:
``sigmoid(b' + 1.5 u.w_ad + ad quality)``; ``dwell = exp(2.5 + 0.8 u.v + N(0, 1))`` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

DAY = 86_400
T0 = 1_704_067_200  # 2024-01-01 00:00:00 UTC, in epoch seconds


@dataclass
class FunnelLog:
    impressions: pd.DataFrame
    events: pd.DataFrame
    valid_start: int
    test_start: int

    def write(self, folder: str | Path, **schema_options) -> Path:
        """Write ``ads.csv``, ``events.csv`` and ``funnel.yaml`` (see ``schema``); returns the YAML path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.impressions.to_csv(folder / "ads.csv", index=False)
        self.events.to_csv(folder / "events.csv", index=False)
        path = folder / "funnel.yaml"
        path.write_text(yaml.safe_dump(self.schema(**schema_options), sort_keys=False))
        return path

    def schema(
        self,
        events: bool = True,
        slot_group: str = "item",
        dwell: bool = True,
        dwell_transform: str | None = "log1p_standardize",
        min_count: int = 2,
        oov_dropout: float = 0.0,
        history_len: int = 20,
    ) -> dict:
        """The YAML of the log: ``events=False`` builds histories from the impression log (each outcome at its
        impression's time), ``slot_group`` is the group of the per-candidate position."""
        histories = (
            {"clicked": {"event": "click"}, "converted": {"event": "conversion"}} if events
            else {"clicked": "clk", "converted": "cv"}
        )
        files = {"data": "ads.csv", **({"events": "events.csv"} if events else {})}
        tasks = [{"name": "click", "column": "clk"}, {"name": "conversion", "column": "cv", "space": "click"}]
        if dwell:
            tasks.append({"name": "dwell", "kind": "regression", "space": "click", "transform": dwell_transform})
        ids = {"min_count": min_count, **({"oov_dropout": oov_dropout} if oov_dropout else {})}
        return {
            "name": "funnel",
            "files": files,
            **({"events": {"user": "user", "item": "ad_id", "type": "kind", "time": "t"}} if events else {}),
            "split": {"method": "time", "valid_start": self.valid_start, "test_start": self.test_start},
            "histories": histories,
            "user_id": "uid",
            "timestamp": "ts",
            "request_id": "req",
            "item_id": "ad",
            "categorical": [
                {"name": "uid", "group": "user", **ids},
                {"name": "ad", "group": "item", **ids},
                {"name": "adv", "group": "item"},
                {"name": "slot", "group": slot_group},
                {"name": "dev", "group": "context"},
                {"name": "site", "group": "context", **ids},
            ],
            "dense": [{"name": "bid", "group": "item", "log1p": True, "fill_value": 0.0}],
            "sequences": [{"name": "clicked", "max_len": history_len}, {"name": "converted", "max_len": history_len}],
            "tasks": tasks,
        }


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def funnel_log(
    num_users: int = 900,
    num_ads: int = 300,
    days: int = 14,
    pre_days: int = 7,
    requests_per_user: float = 5.0,
    candidates: int = 8,
    seed: int = 0,
) -> FunnelLog:
    """Generate the log (deterministic by ``seed``). Train: the first ``days - 4`` days, valid: 2 days, test: 2."""
    rng = np.random.default_rng(seed)
    dim = 4
    user_vec = rng.normal(0, 0.7, (num_users, dim))
    user_bias = rng.normal(0, 0.4, num_users)
    user_dev = rng.integers(0, 3, num_users)
    # a third of the users arrive during the last four days: many test users are new
    arrival = np.where(rng.random(num_users) < 0.3, (days - 4) * DAY, 0) + rng.integers(0, DAY, num_users)
    num_adv = max(num_ads // 6, 2)
    ad_adv = rng.integers(0, num_adv, num_ads)
    adv_vec = rng.normal(0, 0.8, (num_adv, dim))
    ad_vec = 0.7 * adv_vec[ad_adv] + 0.5 * rng.normal(0, 0.8, (num_ads, dim))
    conv_vec = 0.6 * ad_vec + 0.6 * rng.normal(0, 0.8, (num_ads, dim))
    ad_quality = rng.normal(0, 0.5, num_ads)
    ad_pop = rng.dirichlet(np.full(num_ads, 0.6))
    ad_bid = rng.lognormal(0.0, 0.6, num_ads)
    position_effect = -0.35 * np.arange(candidates)  # strong position bias: the first slot gets the clicks
    num_sites = 4000
    site_effect = rng.normal(0, 0.6, num_sites)
    site_weights = 1.0 / np.arange(1, num_sites + 1) ** 1.05
    site_weights /= site_weights.sum()

    def simulate(users: np.ndarray, start: np.ndarray, end: np.ndarray) -> pd.DataFrame:
        """Requests of ``users`` at uniform times in [start, end), candidates, labels and outcome times."""
        counts = rng.poisson(requests_per_user * (end - start) / (days * DAY))
        req_user = np.repeat(users, counts)
        req_time = (np.repeat(start, counts) + rng.random(len(req_user)) * np.repeat(end - start, counts)).astype(
            np.int64
        )
        n_req = len(req_user)
        gumbel = -np.log(-np.log(rng.random((n_req, num_ads))))
        ads = np.argsort(-(np.log(ad_pop)[None, :] + gumbel), axis=1)[:, :candidates]  # popularity, no repeats
        rows = n_req * candidates
        user = np.repeat(req_user, candidates)
        ad = ads.reshape(-1)
        slot = np.tile(np.arange(candidates), n_req)
        site = np.repeat(rng.choice(num_sites, n_req, p=site_weights), candidates)
        bid = ad_bid[ad] * rng.lognormal(0, 0.2, rows)
        affinity = np.einsum("nd,nd->n", user_vec[user], ad_vec[ad])
        p_click = _sigmoid(-1.6 + 1.3 * affinity + position_effect[slot] + site_effect[site]
                           + 0.3 * (np.log(bid) - 0.0) / 0.6 + user_bias[user])
        p_cv = _sigmoid(-2.0 + 1.5 * np.einsum("nd,nd->n", user_vec[user], conv_vec[ad]) + ad_quality[ad])
        clk = rng.random(rows) < p_click
        cv = clk & (rng.random(rows) < p_cv)
        ts = np.repeat(req_time, candidates)
        dwell = np.exp(2.5 + 0.8 * affinity + rng.normal(0, 1, rows))
        return pd.DataFrame({
            "req": np.repeat(np.arange(n_req), candidates), "uid": user, "ad": ad, "adv": ad_adv[ad], "slot": slot,
            "dev": np.repeat(np.where(rng.random(n_req) < 0.85, user_dev[req_user], rng.integers(0, 3, n_req)),
                             candidates),
            "site": site, "bid": bid, "ts": ts, "clk": clk.astype(np.int64), "cv": cv, "dwell": dwell,
            "p_click": p_click, "p_cv": p_cv,
            # outcomes at their own times: a click seconds after the request starts, a conversion hours later
            "click_t": ts + rng.integers(1, 60, rows),
            "cv_t": ts + 60 + rng.exponential(8 * 3600, rows).astype(np.int64),
        })

    users = np.arange(num_users)
    log = simulate(users, T0 + arrival, np.full(num_users, T0 + days * DAY))
    pre = simulate(users, np.full(num_users, T0 - pre_days * DAY), np.full(num_users, T0 - 1))
    pre = pre[pre["uid"].isin(users[arrival < DAY])]  # only early users have a pre-period
    pre = pre[pre["cv_t"] < T0]  # the pre-period summary ends where the log begins

    def outcome_events(frame: pd.DataFrame) -> pd.DataFrame:
        clicked, converted = frame[frame["clk"] == 1], frame[frame["cv"]]
        return pd.concat([
            pd.DataFrame({"user": clicked["uid"], "ad_id": clicked["ad"], "kind": "click", "t": clicked["click_t"]}),
            pd.DataFrame({"user": converted["uid"], "ad_id": converted["ad"], "kind": "conversion",
                          "t": converted["cv_t"]}),
        ])

    events = pd.concat([outcome_events(pre), outcome_events(log)], ignore_index=True)
    events = events.sort_values(["t", "user"], kind="stable").reset_index(drop=True)
    impressions = log.drop(columns=["click_t", "cv_t"]).copy()
    impressions["req"] = "r" + impressions["req"].astype(str)
    impressions["site"] = "s" + impressions["site"].astype(str)
    impressions["cv"] = np.where(impressions["clk"] == 1, impressions["cv"].astype(float), np.nan)
    impressions["dwell"] = np.where(impressions["clk"] == 1, impressions["dwell"].round(1), np.nan)
    impressions["bid"] = np.where(rng.random(len(impressions)) < 0.1, np.nan, impressions["bid"].round(3))
    impressions = impressions.sort_values(["ts", "req", "slot"], kind="stable").reset_index(drop=True)
    return FunnelLog(impressions, events, valid_start=T0 + (days - 4) * DAY, test_start=T0 + (days - 2) * DAY)

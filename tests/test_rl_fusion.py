"""Batch RL fusion and its simulator (docs/rl_fusion.md): the simulator is deterministic and session-separable, its
Env passes Gymnasium's checker, its state is the state the service computes, the served policy equals the trained
one (BCQ and CQL, through the fusion file), bad policy files and logged-session files are refused, and
`onerank fuse --method batch-rl` writes a fusion file the ranker and the HTTP service apply."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import shared_data
from onerank.fusion import FittedFusion, file_sha256, load_for_checkpoint
from onerank.fusion.batch_rl import (
    BatchRLSettings, FQESettings, LoggedSessions, conservative_fqe, state_spec, train_policy,
)
from onerank.fusion.policy import MLP, SESSION_FEATURES, PolicyFusion, SessionTracker, StateSpec, action_weights
from onerank.simulator import LeaveModel, SimulatorConfig, draw_starts, fit_world, read_kuairand, simulate
from onerank.simulator.env import SessionBatch, make_env
from onerank.simulator.experiment import SimulationSettings, log_sessions
from onerank.simulator.policies import exploring_policy, fusion_policy, static_policy

TASKS = ["click", "long_view", "like", "comment", "play_time"]
CONFIG = SimulatorConfig(slate_size=3, pool_size=30, max_requests=8)


# ---------------------------------------------------------------------------------------------------------------------
# A small simulator on real KuaiRand rows, and a stand-in ranker (the videos' smoothed train rates)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def log():
    return read_kuairand(shared_data("kuairand-pure"))


@pytest.fixture(scope="module")
def world(log):
    w = fit_world(log, "gbdt", seed=0, max_train_rows=12_000)
    w.leave = LeaveModel.assumed(-2.5, {"long_view": 0.5, "completion": 0.5})
    return w


@pytest.fixture(scope="module")
def scorer(world):
    stats = world.builder.video_stats

    def score(users: np.ndarray, pools: np.ndarray) -> np.ndarray:
        s = stats.transform(pools.ravel(), "v")
        columns = ["v_click", "v_long_view", "v_like", "v_comment", "v_play"]
        return np.stack([s[c].to_numpy() for c in columns], axis=1).reshape(*pools.shape, len(columns))

    return score


@pytest.fixture(scope="module")
def users(log):
    return log.split("valid")["user_id"].unique()[:300]


@pytest.fixture(scope="module")
def logged(world, scorer, users):
    starts = draw_starts(world, users, 120, CONFIG.pool_size, scorer, 0)
    settings = SimulationSettings(slate_size=CONFIG.slate_size, pool_size=CONFIG.pool_size,
                                  max_requests=CONFIG.max_requests)
    return log_sessions(world, starts, np.zeros(len(TASKS)), settings, TASKS, 0, {"checkpoint_sha256": "x" * 64})


def test_the_simulator_is_deterministic_and_each_session_has_its_own_random_stream(world, scorer, users):
    starts = draw_starts(world, users, 40, CONFIG.pool_size, scorer, 7)
    again = draw_starts(world, users, 40, CONFIG.pool_size, scorer, 7)
    assert np.array_equal(starts.users, again.users) and np.array_equal(starts.pools, again.pools)
    policy = static_policy(np.array([0.5, -0.2, 0.1, 0.0, 0.3]))
    first, second = simulate(world, starts, policy, CONFIG), simulate(world, starts, policy, CONFIG)
    for name in ("session", "states", "actions", "rewards", "terminated", "truncated", "impressions"):
        assert np.array_equal(getattr(first, name), getattr(second, name)), name
    other = simulate(world, draw_starts(world, users, 40, CONFIG.pool_size, scorer, 8), policy, CONFIG)
    assert not np.array_equal(first.session_returns(), other.session_returns())
    # a session's course does not depend on which other sessions run beside it (common random numbers)
    alone = simulate(world, starts.subset(np.array([5])), policy, CONFIG)
    in_batch = first.session == 5
    assert np.array_equal(alone.rewards, first.rewards[in_batch])
    assert np.array_equal(alone.states, first.states[in_batch])
    # sessions end when the user leaves or at max_requests, never both, and only at their last request
    ends = np.r_[first.session[1:] != first.session[:-1], True]
    assert np.array_equal(first.terminated | first.truncated, ends)
    assert not np.any(first.terminated & first.truncated)
    assert np.all(np.bincount(first.session) <= CONFIG.max_requests)


def test_fusion_weights_change_what_is_shown(world, scorer, users):
    starts = draw_starts(world, users, 60, CONFIG.pool_size, scorer, 3)
    click_only = static_policy(np.array([1.0, -1.0, -1.0, -1.0, -1.0]))
    like_only = static_policy(np.array([-1.0, -1.0, 1.0, -1.0, -1.0]))
    a = SessionBatch(world, starts, CONFIG)
    b = SessionBatch(world, starts, CONFIG)
    rows = np.arange(len(starts))
    slate_a = a.step(rows, click_only(a.observe(rows)))["slate"]
    slate_b = b.step(rows, like_only(b.observe(rows)))["slate"]
    assert not np.array_equal(slate_a, slate_b)
    # the click-weighted slate holds the videos the stand-in ranker scores highest on click
    top_click = np.argsort(-starts.predictions[0, :, 0], kind="stable")[: CONFIG.slate_size]
    assert set(slate_a[0]) == set(starts.pools[0, top_click])


def test_the_env_passes_gymnasium_checks_and_replays_a_seed(world, scorer, users):
    from gymnasium.utils.env_checker import check_env

    env = make_env(world, users, scorer, CONFIG)
    check_env(env, skip_render_check=True)
    assert env.action_space.shape == (len(TASKS),)

    def episode(seed: int):
        e = make_env(world, users, scorer, CONFIG)
        obs, _ = e.reset(seed=seed)
        e.action_space.seed(seed)
        trace, done = [obs], False
        while not done:
            obs, reward, terminated, truncated, info = e.step(e.action_space.sample())
            trace += [obs, reward, info["slate"]]
            done = terminated or truncated
        return trace

    first, second = episode(11), episode(11)
    assert len(first) == len(second)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(first, second))
    with pytest.raises(RuntimeError, match="reset"):
        env = make_env(world, users, scorer, CONFIG)
        env.reset(seed=0)
        done = False
        while not done:
            _, _, terminated, truncated, _ = env.step(np.zeros(len(TASKS), dtype=np.float32))
            done = terminated or truncated
        env.step(np.zeros(len(TASKS), dtype=np.float32))


def test_the_simulators_state_is_the_state_a_request_carries(world, scorer, users, log):
    """What the policy reads in the simulator equals what the service computes from a request's user fields and
    the session state a client tracks with SessionTracker."""
    starts = draw_starts(world, users, 3, CONFIG.pool_size, scorer, 5)
    batch = SessionBatch(world, starts, CONFIG)
    spec = StateSpec(world.user_fields, np.zeros(batch.state_dim), np.ones(batch.state_dim))
    profile = log.users.set_index("user_id")
    tracker = SessionTracker()
    row = np.array([0])
    user = {f: profile.loc[starts.users[0], f] for f in world.user_fields}
    for _ in range(4):
        assert np.allclose(batch.observe(row)[0], spec.raw_vector(user, tracker.state()))
        out = batch.step(row, np.zeros((1, len(TASKS))))
        r = out["responses"]
        for j in range(int(out["impressions"][0])):
            tracker.add_impression(r["click"][0, j], r["long_view"][0, j], r["like"][0, j], r["completion"][0, j],
                                   r["play_s"][0, j])
        tracker.end_request()
        if not batch.alive[0]:
            break


# ---------------------------------------------------------------------------------------------------------------------
# The served policy is the trained one
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(logged):
    return {alg: train_policy(logged, BatchRLSettings(algorithm=alg, steps=30, batch_size=64, hidden=(32, 32)))
            for alg in ("bcq", "cql")}


def test_served_cql_policy_equals_d3rlpys(trained, logged):
    policy, algo = trained["cql"]
    states = policy.state_spec.standardise(logged.states[:64])
    assert np.array_equal(policy.act(states), algo.predict(states))


def test_served_bcq_policy_equals_d3rlpys_selection(trained, logged):
    policy, algo = trained["bcq"]
    states = policy.state_spec.standardise(logged.states[:64])
    n, k = policy.latents.shape[0], len(policy.tasks)
    torch.manual_seed(123)
    expected = algo.predict(states)  # d3rlpy draws its latents with torch's global generator
    torch.manual_seed(123)
    latents = torch.randn(len(states) * n, 2 * k).clamp(-0.5, 0.5)
    assert np.array_equal(policy.act(states, latents), expected)
    # served with its fixed draws: a function of the state alone
    assert np.array_equal(policy.act(states), policy.act(states))
    assert np.all(np.abs(policy.act(states)) <= 1.0)


@pytest.mark.parametrize("algorithm", ["bcq", "cql"])
def test_a_policy_survives_the_fusion_file(trained, logged, tmp_path, algorithm):
    policy, _ = trained[algorithm]
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"stand-in checkpoint bytes")
    FittedFusion(file_sha256(checkpoint), None, policy).save(tmp_path / "checkpoint.fusion.json")
    loaded = load_for_checkpoint(checkpoint).fusion
    assert isinstance(loaded, PolicyFusion)
    states = policy.state_spec.standardise(logged.states)
    assert np.array_equal(loaded.act(states), policy.act(states))
    user = {"user_active_degree": "full_active", "is_lowactive_period": 0}
    state = dict(zip(SESSION_FEATURES, [2, 9, 1.2, 0.8, 0.0, 0.3, 5.1]))
    served = loaded.for_request(user, state)
    assert served.kind == "weighted_sum"
    assert np.isclose(sum(served.weights.values()), 1.0)
    expected = action_weights(policy.act(policy.state_spec.standardise(policy.state_spec.raw_vector(user, state))
                                         [None]), policy.action_scale)[0]
    assert np.allclose(list(served.weights.values()), expected)


def test_the_simulator_runs_a_served_policy_and_fqe_is_finite(trained, logged, world, scorer, users):
    policy, _ = trained["cql"]
    starts = draw_starts(world, users, 30, CONFIG.pool_size, scorer, 9)
    rollout = simulate(world, starts, fusion_policy(policy), CONFIG)
    assert np.all(np.isfinite(rollout.rewards)) and rollout.summary(0.95)["sessions"] == 30
    estimate = conservative_fqe(logged, fusion_policy(policy), FQESettings(steps=50))["estimate"]
    assert np.isfinite(estimate)


# ---------------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------------
def test_bad_policy_files_are_refused_with_one_line(trained, tmp_path):
    policy, _ = trained["bcq"]
    good = policy.to_dict()
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"bytes")
    sha = file_sha256(checkpoint)

    def broken(change) -> str:
        raw = json.loads(json.dumps(good))
        change(raw)
        path = tmp_path / "checkpoint.fusion.json"
        path.write_text(json.dumps({"format": 1, "checkpoint_sha256": sha, "calibration": None, "fusion": raw}))
        with pytest.raises(ValueError) as info:
            load_for_checkpoint(checkpoint)
        assert "\n" not in str(info.value) and "fusion file" in str(info.value)
        return str(info.value)

    assert "algorithm" in broken(lambda r: r.update(algorithm="ppo"))
    assert "'critic'" in broken(lambda r: r["networks"].pop("critic"))
    assert "latents" in broken(lambda r: r.update(latents=[[0.0, 1.0]]))
    assert "outputs" in broken(lambda r: r["networks"]["decoder"][1].update(
        weight=[[0.0] * 3] * len(r["networks"]["decoder"][1]["weight"])))
    assert "NaN" in broken(lambda r: r["networks"]["critic"][0]["bias"].__setitem__(0, float("nan")))
    assert "scale" in broken(lambda r: r["state"].update(scale=[0.0] * len(r["state"]["scale"])))
    assert "session features" in broken(lambda r: r["state"].update(session_features=["requests"]))
    assert "lacks" in broken(lambda r: r.pop("state"))


def test_a_requests_state_is_checked(trained):
    policy, _ = trained["cql"]
    user = {"user_active_degree": "full_active"}
    with pytest.raises(ValueError, match="unknown session state field 'clicks'"):
        policy.for_request(user, {"clicks": 1.0})
    with pytest.raises(ValueError, match="'impressions' is missing"):
        policy.for_request(user, {"requests": 1.0})
    bad = dict.fromkeys(SESSION_FEATURES, 0.0) | {"recent_play": float("nan")}
    with pytest.raises(ValueError, match="recent_play"):
        policy.for_request(user, bad)
    # no state: a session's first request, every session feature 0
    first = policy.for_request(user, None).weights
    assert first == policy.for_request(user, dict.fromkeys(SESSION_FEATURES, 0.0)).weights
    with pytest.raises(ValueError, match="per request"):
        policy({"click": np.ones(3)})


def test_logged_sessions_round_trip_and_bad_files_are_refused(logged, tmp_path):
    path = logged.save(tmp_path / "sessions.npz")
    again = LoggedSessions.load(path)
    for name in ("session", "states", "actions", "rewards", "terminated", "truncated", "next_states"):
        assert np.array_equal(getattr(again, name), getattr(logged, name)), name
    assert again.tasks == logged.tasks and again.meta == json.loads(json.dumps(logged.meta))
    with pytest.raises(ValueError, match="exists"):
        logged.save(path)
    # an .npz holding a pickled object is refused, never unpickled
    np.savez(tmp_path / "pickled.npz", header=np.array([{"kind": "onerank.logged_sessions"}], dtype=object))
    with pytest.raises(ValueError, match="not a logged sessions file"):
        LoggedSessions.load(tmp_path / "pickled.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not a logged sessions file"):
        LoggedSessions.load(tmp_path / "text.npz")
    with pytest.raises(FileNotFoundError):
        LoggedSessions.load(tmp_path / "absent.npz")
    bad = logged.rows(np.ones(len(logged.session), dtype=bool))
    bad.actions = bad.actions * 3
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        bad.check()


# ---------------------------------------------------------------------------------------------------------------------
# onerank fuse --method batch-rl, the ranker and the service
# ---------------------------------------------------------------------------------------------------------------------
def tiny_sessions(sha: str, n_sessions: int = 60, seed: int = 0) -> LoggedSessions:
    """Logged sessions over the tiny checkpoint's tasks (click, buy) and its one user field, with a reward that
    favours the click weight, so the policy has something to learn."""
    rng = np.random.default_rng(seed)
    user_fields = {"user_id": ["1", "2", "3"]}
    dim = 4 + len(SESSION_FEATURES)
    lengths = rng.integers(1, 6, n_sessions)
    session = np.repeat(np.arange(n_sessions), lengths)
    t = len(session)
    states = np.abs(rng.normal(size=(t, dim)))
    actions = rng.uniform(-1, 1, (t, 2))
    rewards = 1.0 + actions[:, 0] - actions[:, 1] + rng.normal(0, 0.1, t)
    ends = np.r_[session[1:] != session[:-1], True]
    terminated = ends & (rng.random(t) < 0.7)
    return LoggedSessions(session, states, actions, rewards, terminated, ends & ~terminated, np.roll(states, -1, 0),
                          ["click", "buy"], user_fields, 3.0, 0.95,
                          {"checkpoint_sha256": sha, "calibration": None,
                           "logging_policy": {"centre": [0.0, 0.0]}})


@pytest.fixture()
def batch_rl_checkpoint(tiny_checkpoint, tmp_path):
    from onerank.cli import main

    path = tmp_path / "checkpoint.pt"
    shutil.copy(tiny_checkpoint("mmoe"), path)
    sessions = tiny_sessions(file_sha256(path)).save(tmp_path / "sessions.npz")
    code = main(["fuse", "--method", "batch-rl", "--checkpoint", str(path), "--sessions", str(sessions),
                 "--algorithm", "cql", "--steps", "40"])
    assert code == 0
    return path


def test_fuse_batch_rl_writes_a_policy_the_ranker_serves(batch_rl_checkpoint):
    from onerank.serving import Ranker

    ranker = Ranker(batch_rl_checkpoint)
    policy = ranker.fusion
    assert isinstance(policy, PolicyFusion) and policy.algorithm == "cql"
    assert ranker.fitted.info["method"] == "batch-rl"
    request = ranker.example_request(7)
    state = dict(zip(SESSION_FEATURES, [3, 12, 1.0, 0.5, 0.0, 0.2, 4.0]))
    result = ranker.rank({**request, "state": state})
    expected = policy.for_request(request["user"], state)
    assert result.fusion.weights == expected.weights
    probs = ranker.predict(request)
    assert np.allclose(result.scores, sum(w * probs[t].astype(np.float64) for t, w in expected.weights.items()))
    first = ranker.rank(request)  # no state: the session's first request
    assert first.fusion.weights == policy.for_request(request["user"], None).weights
    assert ranker.describe()["fusion"]["kind"] == "policy"
    from onerank.serving.wire import RequestError

    with pytest.raises(RequestError) as info:
        ranker.rank({**request, "state": {"requests": 1.0}})
    assert info.value.errors[0]["loc"] == ["body", "state"]


def test_the_service_applies_the_policy(batch_rl_checkpoint):
    import httpx

    from onerank.serving import Ranker
    from onerank.serving.app import create_app
    from test_service import LiveServer

    ranker = Ranker(batch_rl_checkpoint)
    request = ranker.example_request(5)
    state = dict(zip(SESSION_FEATURES, [1, 5, 1.0, 1.0, 0.0, 0.0, 2.0]))
    with LiveServer(create_app(ranker, workers=1)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        ok = client.post("/rank", json={**request, "state": state})
        assert ok.status_code == 200
        assert ok.json()["fusion"]["weights"] == ranker.fusion.for_request(request["user"], state).weights
        bad = client.post("/rank", json={**request, "state": {"recent_click": -1.0}})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "state"]
        assert client.get("/model").json()["fusion"]["kind"] == "policy"


def test_fuse_batch_rl_refuses_sessions_of_another_checkpoint(tiny_checkpoint, tmp_path, capsys):
    from onerank.cli import main

    path = tmp_path / "checkpoint.pt"
    shutil.copy(tiny_checkpoint("mmoe"), path)
    sessions = tiny_sessions("0" * 64).save(tmp_path / "sessions.npz")
    code = main(["fuse", "--method", "batch-rl", "--checkpoint", str(path), "--sessions", str(sessions),
                 "--steps", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "was logged with checkpoint 000000000000" in err and err.count("\n") == 1
    assert not path.with_name("checkpoint.fusion.json").exists()
    assert main(["fuse", "--method", "batch-rl", "--checkpoint", str(path)]) == 2
    assert "--sessions" in capsys.readouterr().err


def test_state_spec_of_logs_standardises_every_column(logged):
    spec = state_spec(logged)
    z = spec.standardise(logged.states)
    varying = logged.states.std(axis=0) > 1e-6
    assert np.allclose(z[:, varying].mean(axis=0), 0, atol=1e-4)
    assert np.allclose(z[:, varying].std(axis=0), 1, atol=1e-3)
    assert spec.dim == logged.states.shape[1] and len(spec.names) == spec.dim


def test_exploring_policy_mixes_random_and_noisy_actions():
    centre = np.array([0.5, -0.5, 0.0])
    actions = exploring_policy(centre, random_share=0.3, noise=0.1, seed=0)(np.zeros((4000, 5)))
    near = np.all(np.abs(actions - centre) < 0.45, axis=1)
    assert 0.6 < near.mean() < 0.8  # 70 % noisy around the centre (+ the random ones that land near it)
    assert np.all(np.abs(actions) <= 1)
    assert np.array_equal(actions, exploring_policy(centre, 0.3, 0.1, 0)(np.zeros((4000, 5))))


def test_mlp_from_dict_refuses_mismatched_layers():
    layer = {"weight": [[1.0, 2.0]], "bias": [0.0]}
    assert MLP.from_dict([layer], "actor").out_features == 1
    with pytest.raises(ValueError, match="feeds"):
        MLP.from_dict([layer, {"weight": [[1.0, 2.0]], "bias": [0.0]}], "actor")
    with pytest.raises(ValueError, match="lists of numbers"):
        MLP.from_dict([{"weight": "__import__('os')", "bias": [0.0]}], "actor")


def test_the_ranker_scorer_scores_a_pool_as_the_model_scores_logged_rows(tmp_path):
    """A pool video scored in a user's context gets the model's prediction of the logged row that showed it."""
    from onerank import api
    from onerank.data.batching import BatchLoader, tensor_splits
    from onerank.simulator.ranker import RankerScorer
    from onerank.training.config import RunConfig, TrainConfig
    from zoo_helpers import real_dataset

    ds = real_dataset("kuairand")
    config = RunConfig(dataset="kuairand", model="mmoe",
                       train=TrainConfig(epochs=1, batch_size=256, progress=False, tensorboard=False))
    api.train(config, out_dir=tmp_path, dataset=ds)
    model, _ = api.load_checkpoint(tmp_path / "checkpoint.pt")
    split = ds.valid
    loader = BatchLoader(tensor_splits(ds)["valid"], len(split))
    with torch.inference_mode():
        logged = {t: v.numpy() for t, v in model.predict(next(iter(loader))).items()}
    vocab = ds.encoders.vocabularies
    users_raw = np.asarray(vocab["user_id"].to_list(), dtype=object)
    videos_raw = np.asarray(vocab["video_id"].to_list(), dtype=object)
    user_codes, video_codes = split.categorical["user_id"], split.categorical["video_id"]
    _, first = np.unique(user_codes, return_index=True)
    rows = np.array([r for r in first if user_codes[r] >= 2 and video_codes[r] >= 2])[:20]
    scaler = ds.encoders.scalers["duration"]
    seconds = {videos_raw[video_codes[r] - 2]: float(np.expm1(split.dense["duration"][r] * scaler.std + scaler.mean))
               for r in rows}
    tasks = ["click", "long_view", "like"]
    scorer = RankerScorer(model, ds, "valid", tasks, lambda v: np.array([seconds.get(x, 10.0) for x in v]))
    users = users_raw[user_codes[rows] - 2].astype(np.int64)
    assert set(users) <= set(scorer.users().tolist())
    other = videos_raw[video_codes[rows[::-1]] - 2].astype(np.int64)  # a second pool video: another row's
    pools = np.stack([videos_raw[video_codes[rows] - 2].astype(np.int64), other], axis=1)
    scores = scorer(users, pools)
    assert scores.shape == (len(rows), 2, len(tasks))
    for i, t in enumerate(tasks):
        assert np.allclose(scores[:, 0, i], logged[t][rows], atol=1e-5), t
    assert not np.allclose(scores[:, 0, 0], scores[:, 1, 0])

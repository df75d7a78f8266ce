"""Wrappers: rankings <-> scores, per-token features, and Gymnasium's flattening on KVEvict-v0."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import kvp_gym  # noqa: F401
from kvp_gym.envs.wrappers import RankingActions, TokenFeatures, ranking_to_scores, scores_to_ranking


def test_ranking_and_scores_round_trip():
    rng = np.random.default_rng(0)
    for t in (1, 2, 7, 100):
        ranking = rng.permutation(t)
        scores = ranking_to_scores(ranking)
        assert scores.min() >= -1 and scores.max() <= 1
        np.testing.assert_array_equal(scores_to_ranking(scores), ranking)
    batch = np.stack([rng.permutation(5) for _ in range(3)])
    np.testing.assert_array_equal(scores_to_ranking(ranking_to_scores(batch)), batch)


@pytest.fixture
def env(tiny_trace):
    return gym.make("KVEvict-v0", config={"traces": str(tiny_trace)})


def test_ranking_actions_give_the_same_reward_as_their_scores(env, tiny_trace):
    ranked = RankingActions(gym.make("KVEvict-v0", config={"traces": str(tiny_trace)}))
    check_env(ranked.unwrapped, skip_render_check=True)
    env.reset(seed=3)
    ranked.reset(seed=3)
    ranking = np.random.default_rng(1).permutation(ranked.action_space.shape[0])
    _, expected, _, _, _ = env.step(ranking_to_scores(ranking))
    _, reward, _, _, _ = ranked.step(ranking)
    assert reward == expected
    ranked.reset()
    with pytest.raises(ValueError, match="must be a permutation"):
        ranked.step(np.zeros(ranked.action_space.shape, np.int64))


def test_token_features_and_flattening(env):
    features = TokenFeatures(env)
    obs, _ = features.reset(seed=0)
    assert features.observation_space.contains(obs)
    d = env.observation_space["key"].shape[1]
    n = int(obs[:, -1].sum())
    np.testing.assert_array_equal(obs[:n, -2], np.arange(n))
    assert obs.shape == (env.action_space.shape[0], 2 * d + 2)
    flat = gym.wrappers.FlattenObservation(env)
    obs, _ = flat.reset(seed=0)
    assert obs.ndim == 1 and flat.observation_space.contains(obs)

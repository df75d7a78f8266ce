"""KVEvictDecode-v0: checkers, the oracle's return, masks, and the two action variants."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import kvp_gym  # noqa: F401
from kvp_gym.envs.decode import remaining_attention
from kvp_gym.utility import future_importance


@pytest.fixture
def config(tiny_trace):
    return {"traces": str(tiny_trace), "budget": 500, "sinks": 2, "recent": 3}


@pytest.mark.parametrize("action", ["index", "scores"])
def test_checkers(config, action):
    env = gym.make("KVEvictDecode-v0", config={**config, "action": action}).unwrapped
    check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=False)


def test_remaining_attention_is_future_importance_at_every_step():
    torch.manual_seed(0)
    queries, keys = torch.randn(2, 40, 8), torch.randn(40, 8)
    remaining = remaining_attention(queries, keys, chunk=9)
    for t in (5, 20, 38):
        torch.testing.assert_close(remaining[t, : t + 1], future_importance(queries, keys, t + 1))
    assert (remaining[-1] == 0).all()


def _run(env, choose):
    obs, _ = env.reset(seed=11)
    total, steps = 0.0, 0
    while True:
        obs, reward, terminated, truncated, info = env.step(choose(env, obs))
        total, steps = total + reward, steps + 1
        if terminated:
            return total, steps, info


def _greedy(env, obs):
    remaining = np.where(env.action_masks(), env._remaining[env._t, env._slots], np.inf)
    return int(np.argmin(remaining))


def test_the_greedy_oracle_returns_minus_one(config):
    env = gym.make("KVEvictDecode-v0", config=config).unwrapped
    total, steps, info = _run(env, _greedy)
    assert total == pytest.approx(-1.0) and info["score"] == pytest.approx(1.0)
    assert steps == len(env._keys) - 500


def _oldest(env, obs):
    return int(np.argmin(np.where(env.action_masks(), obs["positions"], np.iinfo(np.int64).max)))


def test_other_policies_do_worse_and_scores_variant_agrees(config):
    env = gym.make("KVEvictDecode-v0", config=config).unwrapped
    oldest = _run(env, _oldest)
    assert oldest[0] < -1.0 and oldest[2]["score"] < 1.0
    # With scores, the evictable slot with the lowest score goes: score = position evicts the oldest too.
    scores_env = gym.make("KVEvictDecode-v0", config={**config, "action": "scores"}).unwrapped
    by_scores = _run(scores_env, lambda e, obs: obs["positions"].astype(np.float32) / 1e4)
    assert by_scores[0] == pytest.approx(oldest[0])


def test_masks_protect_sinks_and_recent_and_invalid_slots_are_errors(config):
    env = gym.make("KVEvictDecode-v0", config=config).unwrapped
    obs, _ = env.reset(seed=0)
    mask = env.action_masks()
    t = obs["step_position"][0]
    np.testing.assert_array_equal(mask, (obs["positions"] >= 2) & (obs["positions"] <= t - 3))
    np.testing.assert_array_equal(obs["mask"], mask)
    with pytest.raises(ValueError, match="slot 0 cannot be evicted.*evictable slots"):
        env.step(0)
    with pytest.raises(ValueError, match=r"action must be an integer slot in \[0, \d+\), got 1.7"):
        env.step(1.7)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"budget": 0}, "'budget': expected an integer >= 1, got 0"),
        ({"action": "slot"}, "'action': expected 'index' or 'scores'"),
        ({"sinks": 60, "recent": 60, "budget": 100}, r"sinks \+ recent \(60 \+ 60\) must not exceed budget \(100\)"),
    ],
)
def test_bad_decode_configuration_is_a_clear_error(config, bad, message):
    with pytest.raises(ValueError, match=message):
        gym.make("KVEvictDecode-v0", config={**config, **bad})


def test_reset_info_is_the_episode_key_as_in_kvevict(config):
    from kvp_gym.envs.episodes import EpisodeKey

    env = gym.make("KVEvictDecode-v0", config=config)
    _, info = env.reset(seed=3)
    assert set(info) == {"episode"} and isinstance(info["episode"], EpisodeKey)
    assert info["episode"].split == config["budget"] and info["episode"].layer in env.unwrapped.episodes.layers

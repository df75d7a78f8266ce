"""Wrappers that adapt ``KVEvict-v0`` to other kinds of agents.

- :class:`RankingActions`: act with a ranking (a permutation of token slots, most important first) instead of
  scores.
- :class:`TokenFeatures`: observe one feature row per token, ``Box[T, 2D + 2]`` (key, value, position, mask),
  the natural input of a permutation-equivariant (per-token) policy.

For a flat ``Box`` observation, use Gymnasium's own ``gymnasium.wrappers.FlattenObservation`` (it one-hot encodes
the layer and head); it works on ``KVEvict-v0`` as is.

Imports nothing from kvp_gym (gymnasium and numpy only).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces


def ranking_to_scores(ranking: np.ndarray) -> np.ndarray:
    """Scores in [-1, 1] whose descending order is ``ranking``: slot ranking[k] gets 1 - 2k / (T - 1). [..., T]."""
    ranking = np.asarray(ranking)
    t = ranking.shape[-1]
    scores = np.empty(ranking.shape, np.float32)
    ranks = np.broadcast_to(np.arange(t), ranking.shape)
    np.put_along_axis(scores, ranking, 1.0 - 2.0 * ranks / max(t - 1, 1), axis=-1)
    return scores


def scores_to_ranking(scores: np.ndarray) -> np.ndarray:
    """The ranking that scores induce: stable descending order (ties keep the earlier slot first). [..., T]."""
    return np.argsort(-np.asarray(scores, np.float32), axis=-1, kind="stable")


class RankingActions(gym.ActionWrapper):
    """Actions are rankings: ``MultiDiscrete([T] * T)`` holding a permutation of 0..T-1, most important first.

    Padding slots may sit anywhere in the ranking (they are ignored). A vector that is not a permutation raises
    ValueError.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        t = env.action_space.shape[0]
        self.action_space = spaces.MultiDiscrete(np.full(t, t))

    def action(self, ranking):
        ranking = np.asarray(ranking)
        t = self.action_space.shape[0]
        if ranking.shape != (t,) or not np.array_equal(np.sort(ranking), np.arange(t)):
            raise ValueError(f"a ranking action must be a permutation of 0..{t - 1}, got {ranking!r}")
        return ranking_to_scores(ranking)


class TokenFeatures(gym.ObservationWrapper):
    """Observations become ``Box[T, 2D + 2]``: per token, its key (D), value (D), position and validity mask."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        keys = env.observation_space["key"]
        t, d = keys.shape
        high = np.full((t, 2 * d + 2), keys.high.max(), np.float32)
        high[:, -2] = env.observation_space["positions"].high  # positions may exceed the float16 range
        low = -high
        low[:, -2:] = 0
        high[:, -1] = 1
        self.observation_space = spaces.Box(low, high, dtype=np.float32)

    def observation(self, observation):
        return np.concatenate(
            [
                observation["key"],
                observation["value"],
                observation["positions"][:, None].astype(np.float32),
                observation["mask"][:, None].astype(np.float32),
            ],
            axis=-1,
        )

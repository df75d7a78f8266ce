"""Native vector version of ``KVEvict-v0``: N episodes at once, all rewards in one batched torch call.

``gym.make_vec("KVEvict-v0", num_envs=N)`` builds it (the registered vector entry point). Every episode lasts one
step, so it resets in the same step (``AutoresetMode.SAME_STEP``): ``step`` returns the next episodes'
observations (no step is spent on resets), and an info with the same keys as the single environment's step info,
batched as Gymnasium's SyncVectorEnv batches it (a ``_key`` mask beside each key): ``info["holistic_score"][i]``
in every form. The reset info is ``{"episode": keys, "protocol": names, "_episode": mask, "_protocol": mask}``, as
SyncVectorEnv batches the single environment's reset info.

Imports kvp_gym.envs.evict and kvp_gym.utility.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from kvp_gym.envs.evict import Observations, checked_scores, episode_source, resolve_config
from kvp_gym.utility import holistic_costs, protected_tokens, protocol_name, retained_fraction


class KVEvictVectorEnv(VectorEnv):
    """N independent ``KVEvict-v0`` environments sharing one episode source (see :class:`KVEvictEnv`)."""

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(
        self,
        num_envs: int = 1,
        config: Mapping[str, Any] | None = None,
        render_mode: str | None = None,
        **loose: Any,
    ):
        if not isinstance(num_envs, int) or isinstance(num_envs, bool) or num_envs < 1:
            raise ValueError(f"num_envs: expected an integer >= 1, got {num_envs!r}")
        self.num_envs = num_envs
        self.config = resolve_config(config, loose)
        self.episodes = episode_source(self.config)
        self.observations = Observations(self.config, self.episodes)
        self.single_observation_space = self.observations.space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        t = self.episodes.max_tokens
        self.single_action_space = spaces.Box(-1.0, 1.0, (t,), np.float32)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.budgets = tuple(self.config["budgets"])
        self.protocol = protocol_name(self.config["sinks"], self.config["recent"])
        self._observation: dict[str, np.ndarray] = {}
        self._importance = torch.zeros(num_envs, t)
        self._keys: list = []
        self._np_random, _ = seeding.np_random()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._np_random, _ = seeding.np_random(seed)
        self._draw()
        return self._observation, self._reset_info()

    def step(self, actions):
        if not self._keys:
            raise RuntimeError("call reset() before step()")
        actions = checked_scores(actions, self.action_space.shape, "actions")
        splits = [key.split for key in self._keys]
        valid = torch.from_numpy(self._observation["mask"]).bool()
        scores = torch.from_numpy(actions)
        protected = protected_tokens(torch.tensor(splits), valid.shape[-1], self.config["sinks"], self.config["recent"])
        ranked = valid & ~protected
        importance = self._importance
        cost, oracle, reward = holistic_costs(importance * ranked, scores, ranked)
        info = {
            "holistic_score": (-1.0 / reward).numpy(),
            "retained_fraction": retained_fraction(importance, scores, self.budgets, valid, protected).numpy(),
            "budgets": np.tile(np.asarray(self.budgets), (self.num_envs, 1)),
            "cost": cost.numpy(),
            "oracle_cost": oracle.numpy(),
            "trace": np.array([k.trace for k in self._keys]),
            "sample": np.array([k.sample for k in self._keys], dtype=object),
            "layer": np.array([k.layer for k in self._keys]),
            "head": np.array([k.head for k in self._keys]),
            "split_point": np.array(splits),
            "num_tokens": np.array(self._num_tokens),
        }
        every = np.ones(self.num_envs, bool)
        info.update({f"_{name}": every for name in list(info)})
        self._draw()
        return self._observation, reward.numpy().astype(np.float64), every.copy(), ~every, info

    def _reset_info(self) -> dict[str, np.ndarray]:
        """The reset info of the episodes just drawn, batched as Gymnasium's SyncVectorEnv batches it."""
        keys = np.empty(self.num_envs, dtype=object)
        keys[:] = self._keys
        protocols = np.full(self.num_envs, self.protocol, dtype=object)
        every = np.ones(self.num_envs, bool)
        return {"episode": keys, "protocol": protocols, "_episode": every, "_protocol": every.copy()}

    def _draw(self) -> None:
        """The next N episodes, into fresh observation arrays (those handed out before are never overwritten)."""
        self._keys = [self.episodes.draw(self._np_random) for _ in range(self.num_envs)]
        self._observation = self.observations.empty((self.num_envs,))
        self._importance = torch.zeros_like(self._importance)
        self._num_tokens = []
        for i, key in enumerate(self._keys):
            episode = self.episodes.load(key)
            self._num_tokens.append(episode.num_tokens)
            self.observations.write(self._observation, episode, (i,))
            self._importance[i, : key.split] = episode.importance

    def close_extras(self, **kwargs) -> None:
        self.episodes.close()

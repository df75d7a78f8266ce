"""From a policy trained in ``KVEvict-v0`` to a scorer that ``kvp_gym.evaluation`` and the evicting cache can run.

A policy here is any callable (a function, a ``torch.nn.Module``) from a batch of KVEvict-v0 observations (the
env's Dict observation, each field with a leading batch dimension B: ``key`` [B, T, D], ``mask`` [B, T], ...) to
scores [B, T] (numpy or torch), higher = keep. :class:`EnvPolicyScorer` writes each head of a scorer view into
exactly the observation the environment would show for it, calls the policy, and returns the scores of the real
tokens::

    env = gym.make("KVEvict-v0", config={"traces": paths, "observe_queries": "window:8"})
    scorer = EnvPolicyScorer(my_policy, env, name="my-reinforce")
    record = kvp_gym.evaluation.evaluate(paths, [scorer, "tova", "streaming_llm"], split="test")

Imports kvp_gym.envs.episodes and kvp_gym.scorers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from kvp_gym.envs.episodes import Episode, EpisodeKey
from kvp_gym.scorers import HeadView, ScorerError


class EnvPolicyScorer:
    """A KVEvict-v0 policy behind the scorer contract (:class:`kvp_gym.scorers.Scorer`).

    Args:
        policy: observations (dict of numpy arrays [B, ...]) -> scores [B, T] (array or tensor).
        env: the environment (or its vector version, or any wrapper of either) the policy was trained on: its
            observation layout and padding length T are reused. With ``observe_queries``, the scorer reads the
            prefill queries (``needs_queries``).
        name: the label the scorer gets in results.
        batch_size: heads per policy call.
    """

    needs_future = False

    def __init__(self, policy: Callable[[dict[str, np.ndarray]], Any], env: gym.Env, name: str, batch_size: int = 64):
        observations = getattr(env.unwrapped, "observations", None)
        if observations is None:
            raise TypeError(f"env must be a KVEvict-v0 environment (or a wrapper of one), got {env!r}")
        self.policy, self.name, self.batch_size = policy, name, batch_size
        self.observations = observations
        self.needs_queries = observations.window is not None

    def score(self, view: HeadView) -> torch.Tensor:
        """[B..., n] scores of the view's heads: the policy's scores of the n real tokens of each observation."""
        *batch, n, _ = view.keys.shape
        limit = self.observations.max_tokens
        if n > limit:
            raise ScorerError(f"scorer {self.name!r}: the policy observes at most {limit} tokens, this cache has {n}")
        keys, values = view.keys.reshape(-1, n, view.keys.shape[-1]), view.values.reshape(-1, n, view.keys.shape[-1])
        heads = keys.shape[0]
        layer = _per_head(view.layer, heads)
        kv_head = _per_head(view.kv_head, heads)
        positions = view.positions.reshape(-1, n)
        queries = None if view.queries is None else view.queries.reshape(heads, *view.queries.shape[-3:])
        scores = torch.empty(heads, n)
        for start in range(0, heads, self.batch_size):
            rows = range(start, min(start + self.batch_size, heads))
            batch_obs = self.observations.empty((len(rows),))
            for i, h in enumerate(rows):
                episode = Episode(
                    key=EpisodeKey(trace=0, sample="", layer=layer[h], head=kv_head[h], split=n),
                    keys=keys[h],
                    values=values[h],
                    positions=positions[h],
                    queries=queries[h] if self.needs_queries else torch.zeros(0),
                    importance=torch.zeros(0),
                    num_tokens=n,
                )
                self.observations.write(batch_obs, episode, (i,))
            with torch.no_grad():
                out = self.policy(batch_obs)
            out = out.detach().cpu() if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))
            if out.shape != (len(rows), limit):
                raise ScorerError(
                    f"scorer {self.name!r}: the policy returned shape {list(out.shape)} for {len(rows)} observations, "
                    f"expected [{len(rows)}, {limit}] (one score per token slot)"
                )
            scores[start : start + len(rows)] = out[:, :n].float()
        return scores.reshape(*batch, n)


def _per_head(ids: torch.Tensor | None, heads: int) -> list[int]:
    """Layer or KV head id of each flattened head (0 when the view does not say)."""
    return [0] * heads if ids is None else [int(i) for i in ids.reshape(-1).expand(heads)]

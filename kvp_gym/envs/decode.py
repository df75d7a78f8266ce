"""``KVEvictDecode-v0``: evict one token per step while a trace's tokens arrive under a fixed budget.

Beyond the KVP paper, which compresses the cache once after prefill: here the cache holds at most B tokens, the
trace's tokens arrive one at a time, and each arrival beyond B forces one eviction.

Imports kvp_gym.envs.episodes and kvp_gym.envs.evict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from kvp_gym.envs.episodes import EpisodeKey, TraceEpisodes
from kvp_gym.envs.evict import FLOAT16_MAX, checked_scores, trace_paths, validated_config

DECODE_CONFIG: dict[str, Any] = {
    "traces": None,  # a trace file or a list; None = the default SmolLM2 trace set
    "split": "train",
    "layers": None,
    "heads": None,
    "budget": 128,  # B: tokens the cache keeps
    "sinks": 0,  # the first tokens can never be evicted
    "recent": 0,  # the newest cached tokens (the arriving one included) can never be evicted
    "action": "index",  # index: Discrete(B + 1) slot to evict | scores: Box(-1, 1, (B + 1,)), lowest is evicted
}


def remaining_attention(queries: torch.Tensor, keys: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """R[t, i] = attention token i receives from the queries after t (u = t+1..S-1), max over the GQA group.

    queries: [G, S, D]; keys: [S, D]. Returns float32 [S, S] (zero where i > u for every later u).
    """
    groups, num_tokens, head_dim = queries.shape
    attention = torch.zeros(num_tokens, num_tokens)
    positions = torch.arange(num_tokens)
    for start in range(0, num_tokens, chunk):
        stop = min(start + chunk, num_tokens)
        logits = torch.einsum("gtd,sd->gts", queries[:, start:stop].float(), keys[:stop].float()) * head_dim**-0.5
        logits.masked_fill_(positions[:stop] > positions[start:stop, None], float("-inf"))
        attention[start:stop, :stop] = logits.softmax(-1).amax(0)
    after = attention.flip(0).cumsum(0).flip(0)  # after[t] = sum over u >= t
    return torch.cat([after[1:], torch.zeros(1, num_tokens)])  # shift: queries strictly after t


class KVEvictDecodeEnv(gym.Env):
    """Keep a KV head's cache at B tokens while the trace's tokens arrive, evicting one token per arrival.

    An episode is one (sample, layer, KV head) of a trace file. The first B tokens fill the cache; then token t
    (t = B..S-1) arrives into slot B, its query attends to the cache, and the agent evicts one of the B + 1 slots
    (the newcomer included). The newcomer takes the evicted slot. Evicted tokens never return.

    ## Observation
    A Dict over the B + 1 slots: ``key``, ``value`` float32 [B + 1, D]; ``positions`` int64 [B + 1] (each slot's
    token position); ``mask`` int8 [B + 1], 1 where the slot may be evicted; ``step_position`` (t, int64 [1]);
    ``layer``, ``head`` (Discrete).

    ## Action
    ``action="index"``: ``Discrete(B + 1)``, the slot to evict; ``action_masks()`` gives the evictable slots (for
    sb3-contrib's MaskablePPO). ``action="scores"``: ``Box(-1, 1, (B + 1,))``, the evictable slot with the lowest
    score is evicted (ties: the lowest slot). Evicting a protected slot (``sinks``, ``recent``) raises ValueError.

    ## Reward
    Minus the attention the evicted token would still have received from the queries after this step (full-cache
    attention, max over the GQA group), divided by the episode's oracle cost: the total of that quantity under the
    greedy oracle that always evicts the token with the least remaining attention. The oracle's return is exactly
    -1; the greedy oracle is not guaranteed optimal, so a return slightly above -1 is possible but rare.

    ## Episode end
    Terminates after the last token (S - B steps). ``info`` then has ``episode_cost``, ``oracle_cost`` and
    ``score`` (oracle cost / episode cost). Every step's ``info`` has ``evicted_position`` and ``evicted_attention``.

    ## Arguments
    ``gym.make("KVEvictDecode-v0", config={...})`` with keys of :data:`DECODE_CONFIG`.
    """

    metadata = {"render_modes": []}

    def __init__(self, config: Mapping[str, Any] | None = None, render_mode: str | None = None, **loose: Any):
        self.config = validated_config(config, DECODE_CONFIG, "KVEvictDecode", loose)
        budget, action = self.config["budget"], self.config["action"]
        if self.config["sinks"] + self.config["recent"] > budget:
            raise ValueError(
                f"KVEvictDecode config: sinks + recent ({self.config['sinks']} + {self.config['recent']}) must not "
                f"exceed budget ({budget})"
            )
        paths = trace_paths(self.config["traces"])
        self.episodes = TraceEpisodes(paths, self.config["split"], self.config["layers"], self.config["heads"])
        self.samples = [(i, s) for i, s in self.episodes.samples if s.num_tokens > budget + 1]
        if not self.samples:
            raise ValueError(f"no {self.config['split']!r} sample has more than budget + 1 = {budget + 1} tokens")
        geometry = self.episodes.geometry
        slots, d = budget + 1, geometry.head_dim
        self.observation_space = spaces.Dict(
            {
                "key": spaces.Box(-FLOAT16_MAX, FLOAT16_MAX, (slots, d), np.float32),
                "value": spaces.Box(-FLOAT16_MAX, FLOAT16_MAX, (slots, d), np.float32),
                "positions": spaces.Box(0, np.iinfo(np.int32).max, (slots,), np.int64),
                "mask": spaces.MultiBinary(slots),
                "step_position": spaces.Box(0, np.iinfo(np.int32).max, (1,), np.int64),
                "layer": spaces.Discrete(geometry.num_layers),
                "head": spaces.Discrete(geometry.num_kv_heads),
            }
        )
        self.action_space = spaces.Discrete(slots) if action == "index" else spaces.Box(-1.0, 1.0, (slots,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        trace, sample = self.samples[self.np_random.integers(len(self.samples))]
        layers, heads = self.episodes.layers, self.episodes.heads
        self._layer = int(layers[self.np_random.integers(len(layers))])
        self._head = int(heads[self.np_random.integers(len(heads))])
        head = self.episodes.traces[trace].head(sample, self._layer, self._head)
        self._keys, self._values = head.keys.float().numpy(), head.values.float().numpy()
        self._remaining = remaining_attention(head.queries, head.keys).numpy()
        self._sample = sample.name
        budget = self.config["budget"]
        self._slots = np.arange(budget + 1)  # token position held by each slot; slot B = the newcomer
        self._t = budget
        self._cost = 0.0
        self._oracle_cost = self._greedy_oracle_cost()
        # The same reset info as KVEvict-v0: the episode's key (its split point is where eviction starts, B).
        key = EpisodeKey(trace=trace, sample=sample.name, layer=self._layer, head=self._head, split=budget)
        return self._observation(), {"episode": key}

    def action_masks(self) -> np.ndarray:
        """Bool [B + 1]: the slots that may be evicted now (not sinks, not among the ``recent`` newest tokens)."""
        return self._evictable(self._slots, self._t)

    def step(self, action):
        allowed = self.action_masks()
        if self.config["action"] == "scores":
            scores = np.where(allowed, checked_scores(action, self.action_space.shape), np.inf)
            slot = int(np.argmin(scores))
        else:
            if np.ndim(action) != 0 or not np.issubdtype(np.asarray(action).dtype, np.integer):
                raise ValueError(f"action must be an integer slot in [0, {len(allowed)}), got {action!r}")
            slot = int(action)
            if not 0 <= slot < len(allowed) or not allowed[slot]:
                raise ValueError(
                    f"slot {slot} cannot be evicted at step position {self._t}; evictable slots: "
                    f"{np.flatnonzero(allowed).tolist()} (use action_masks())"
                )
        position = int(self._slots[slot])
        lost = float(self._remaining[self._t, position])
        self._cost += lost
        self._slots[slot] = self._t  # the newcomer (slot B) takes the freed slot; a no-op if it was evicted
        reward = -lost / self._oracle_cost if self._oracle_cost > 0 else 0.0
        info = {"evicted_position": position, "evicted_attention": lost}
        self._t += 1
        terminated = self._t >= len(self._keys)
        if terminated:
            info.update(
                episode_cost=self._cost,
                oracle_cost=self._oracle_cost,
                score=self._oracle_cost / self._cost if self._cost > 0 else 1.0,
            )
        else:
            self._slots[-1] = self._t
        return self._observation(), reward, terminated, False, info

    def _evictable(self, slots: np.ndarray, t: int) -> np.ndarray:
        sinks, recent = self.config["sinks"], self.config["recent"]
        return (slots >= sinks) & (slots <= t - recent)

    def _greedy_oracle_cost(self) -> float:
        """Total remaining attention evicted by the policy that always evicts the least-attended evictable token."""
        slots, cost = np.arange(self.config["budget"] + 1), 0.0
        for t in range(self.config["budget"], len(self._keys)):
            slots[-1] = t
            remaining = np.where(self._evictable(slots, t), self._remaining[t, slots], np.inf)
            slot = int(np.argmin(remaining))
            cost += float(remaining[slot])
            slots[slot] = t
        return cost

    def _observation(self) -> dict[str, Any]:
        t = min(self._t, len(self._keys) - 1)
        slots = self._slots
        return {
            "key": self._keys[slots],
            "value": self._values[slots],
            "positions": slots.astype(np.int64),
            "mask": self._evictable(slots, t).astype(np.int8),
            "step_position": np.array([t], np.int64),
            "layer": np.int64(self._layer),
            "head": np.int64(self._head),
        }

    def close(self) -> None:
        self.episodes.close()

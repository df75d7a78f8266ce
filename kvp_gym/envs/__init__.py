"""Gymnasium environments over trace files. Registered when ``kvp_gym`` is imported:

- ``KVEvict-v0`` (:class:`~kvp_gym.envs.evict.KVEvictEnv`): rank one head's cache; holistic all-budget reward.
  ``gym.make_vec("KVEvict-v0", num_envs=N)`` gives the native batched version (:mod:`kvp_gym.envs.vector`).
- ``KVEvictDecode-v0`` (:class:`~kvp_gym.envs.decode.KVEvictDecodeEnv`): evict one token per arriving token under a
  fixed budget.

Imports only gymnasium: the environment classes load when an environment is made.
"""

from __future__ import annotations

import gymnasium as gym


def register_envs() -> None:
    if "KVEvict-v0" not in gym.registry:
        gym.register(
            id="KVEvict-v0",
            entry_point="kvp_gym.envs.evict:KVEvictEnv",
            vector_entry_point="kvp_gym.envs.vector:KVEvictVectorEnv",
        )
    if "KVEvictDecode-v0" not in gym.registry:
        gym.register(id="KVEvictDecode-v0", entry_point="kvp_gym.envs.decode:KVEvictDecodeEnv")

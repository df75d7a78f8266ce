"""kvp-gym: a Gymnasium environment and benchmark suite for learned KV-cache eviction in LLMs.

The core package: trace files (:mod:`kvp_gym.traces`), their collection from a real model
(:mod:`kvp_gym.collect`), model loading (:mod:`kvp_gym.models`), offline tasks (:mod:`kvp_gym.tasks`), the
environments (:mod:`kvp_gym.envs`), the scorer contract (:mod:`kvp_gym.scorers`), evaluation at trace level and
end to end (:mod:`kvp_gym.evaluation`), the evicting cache (:mod:`kvp_gym.cache`; ``kvp_gym.generate`` and
``kvp_gym.EvictingCache`` load it on first use), the kernels (:mod:`kvp_gym.kernels`) and the command line
(:mod:`kvp_gym.cli`). docs/architecture.md maps the rooms and the rules between them.

Imports kvp_gym.envs (the registration only: no environment module, no torch) and kvp_gym.version; kvp_gym.cache on
first use of its two names.
"""

from kvp_gym.envs import register_envs  # gym.make("KVEvict-v0") works after `import kvp_gym`
from kvp_gym.version import __version__

__all__ = ["__version__", "register_envs"]

register_envs()


def __getattr__(name: str):
    """``kvp_gym.generate`` and ``kvp_gym.EvictingCache``, imported on first use (they load transformers)."""
    if name in ("generate", "EvictingCache"):
        from kvp_gym import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'kvp_gym' has no attribute {name!r}")

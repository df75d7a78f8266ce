"""The evicting KV cache and generation under a budget, on a real model.

- :mod:`kvp_gym.cache.evicting`: :class:`EvictingCache`, a transformers cache that shrinks to a budget.
- :mod:`kvp_gym.cache.generate`: prefill -> compress -> greedy decode (:func:`generate`), or a prefill that
  compresses as it goes (:func:`prefill_compressing`).

Imports only kvp_gym.cache.evicting and kvp_gym.cache.generate.
"""

from kvp_gym.cache.evicting import CacheError, Compression, EvictingCache
from kvp_gym.cache.generate import (
    Generation,
    continue_from,
    decode,
    generate,
    prefill,
    prefill_compressing,
    until_eos,
)

__all__ = [
    "CacheError",
    "Compression",
    "EvictingCache",
    "Generation",
    "continue_from",
    "decode",
    "generate",
    "prefill",
    "prefill_compressing",
    "until_eos",
]

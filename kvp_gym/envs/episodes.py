"""Episodes drawn from trace files: one (sample, layer, KV head, split point) each, shared by every environment.

An episode's data are the head's keys and values up to the split point (the cache), its positions, optionally
prompt queries, and the future importance of each cached token (kept in a bounded cache, since environments
revisit the same heads). Importance at the prompt boundary comes from the traces' importance store
(:mod:`kvp_gym.importance`, shared with training and evaluation); at other split points it is computed.

Imports kvp_gym.importance, kvp_gym.traces and kvp_gym.utility.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvp_gym.importance import ImportanceStore
from kvp_gym.traces import SampleInfo, TraceFile, open_compatible
from kvp_gym.utility import future_importance

SPLIT_POINT_MODES = ("prompt", "random")


@dataclass(frozen=True)
class EpisodeKey:
    """Which episode: trace file index, sample name, layer, KV head and split point n."""

    trace: int
    sample: str
    layer: int
    head: int
    split: int


@dataclass(frozen=True)
class Episode:
    """One episode's tensors. n = split point (cached tokens), D = head_dim, G = query heads in the group.

    keys, values: float16 [n, D]; positions: int64 [n]; queries: float16 [G, n, D] prompt queries ([G, 0, D] unless
    the source keeps them);
    importance: float32 [n], the attention the future pays to each cached token.
    """

    key: EpisodeKey
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    queries: torch.Tensor
    importance: torch.Tensor
    num_tokens: int  # S, tokens in the whole trace (prompt + future)


class TraceEpisodes:
    """Draws and loads episodes from one or more trace files.

    Args:
        paths: trace files (same model geometry).
        split: ``train``, ``val`` or ``test``.
        layers: layers to draw from (default: every recorded layer).
        heads: KV heads to draw from (default: all).
        split_point: ``prompt`` (the true prompt boundary) or ``random`` (uniform in [min_prompt, S-1]).
        min_prompt: smallest split point in ``random`` mode.
        max_tokens: largest split point allowed; ``None`` = the largest any sample of the files allows (so that
            every split gives the same observation and action shapes).
        keep_queries: keep the prompt queries in each episode (for policies that observe them).
        cache_size: episodes kept in memory (least recently used are dropped); about 256 KiB each for SmolLM2
            at 1k tokens without queries, 4x that with.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        split: str = "train",
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        split_point: str = "prompt",
        min_prompt: int = 16,
        max_tokens: int | None = None,
        keep_queries: bool = False,
        cache_size: int = 1024,
    ):
        if split_point not in SPLIT_POINT_MODES:
            raise ValueError(f"split_point must be one of {SPLIT_POINT_MODES}, got {split_point!r}")
        self.traces: list[TraceFile] = open_compatible(paths)
        first = self.traces[0]
        self.geometry = first.header.geometry
        recorded = first.header.layers
        self.layers = tuple(recorded if layers is None else layers)
        unknown = sorted(set(self.layers) - set(recorded))
        if unknown:
            raise ValueError(f"layers {unknown} were not recorded in {first.path}; recorded: {list(recorded)}")
        self.heads = tuple(range(self.geometry.num_kv_heads) if heads is None else heads)
        if not all(0 <= h < self.geometry.num_kv_heads for h in self.heads):
            raise ValueError(f"heads must lie in [0, {self.geometry.num_kv_heads}), got {list(self.heads)}")
        self.samples: list[tuple[int, SampleInfo]] = [
            (i, s) for i, trace in enumerate(self.traces) for s in trace.split(split)
        ]
        if not self.samples:
            available = {s.split for trace in self.traces for s in trace.samples.values()}
            raise ValueError(
                f"no {split!r} samples in {', '.join(str(Path(p)) for p in paths)}; splits present: {sorted(available)}"
            )
        self.split_point, self.min_prompt = split_point, min_prompt
        # Sized over every split, so that train, val and test environments share their spaces.
        largest = max(self._split_range(s)[1] for trace in self.traces for s in trace.samples.values())
        self.max_tokens = largest if max_tokens is None else max_tokens
        if split_point == "prompt" and largest > self.max_tokens:
            raise ValueError(f"max_tokens={self.max_tokens} is below the longest prompt ({largest} tokens)")
        self.keep_queries = keep_queries
        self.importance = [ImportanceStore(trace) for trace in self.traces]
        self._cache: OrderedDict[EpisodeKey, Episode] = OrderedDict()
        self._cache_size = cache_size

    def _split_range(self, sample: SampleInfo) -> tuple[int, int]:
        """Smallest and largest split point for a sample (inclusive)."""
        if self.split_point == "prompt":
            return sample.prompt_length, sample.prompt_length
        low = min(self.min_prompt, sample.num_tokens - 1)
        return low, sample.num_tokens - 1

    def draw(self, rng: np.random.Generator) -> EpisodeKey:
        """A uniformly random (sample, layer, head) and a split point by the configured mode."""
        trace, sample = self.samples[rng.integers(len(self.samples))]
        low, high = self._split_range(sample)
        high = min(high, self.max_tokens)
        return EpisodeKey(
            trace=trace,
            sample=sample.name,
            layer=int(self.layers[rng.integers(len(self.layers))]),
            head=int(self.heads[rng.integers(len(self.heads))]),
            split=int(rng.integers(min(low, high), high + 1)),
        )

    def load(self, key: EpisodeKey) -> Episode:
        """The episode's tensors, from memory if recently used."""
        episode = self._cache.get(key)
        if episode is not None:
            self._cache.move_to_end(key)
            return episode
        trace = self.traces[key.trace]
        head = trace.head(key.sample, key.layer, key.head)
        n = key.split
        if n == trace.samples[key.sample].prompt_length:  # stored; random split points are too many to keep
            importance = self.importance[key.trace].layer(key.sample, key.layer, n)[key.head].clone()
        else:
            importance = future_importance(head.queries, head.keys, n, attention=trace.header.attention_of(key.layer))
        episode = Episode(
            key=key,
            keys=head.keys[:n],
            values=head.values[:n],
            positions=head.positions[:n],
            queries=head.queries[:, :n] if self.keep_queries else head.queries[:, :0],
            importance=importance,
            num_tokens=len(head.positions),
        )
        self._cache[key] = episode
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return episode

    def close(self) -> None:
        for trace in self.traces:
            trace.close()

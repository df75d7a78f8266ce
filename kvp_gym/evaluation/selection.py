"""What an evaluation scores, and how a scorer sees it: the samples of a split, the chosen layers and KV heads,
the same as ``KVEvict-v0`` episode keys (so that an RL loop can report the number the table shows), and one layer
of one sample cut at the prompt boundary as a scorer's view.

Imports only kvp_gym.importance, kvp_gym.scorers and kvp_gym.traces (and kvp_gym.envs.episodes inside
:func:`evaluation_episodes`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kvp_gym.importance import ImportanceStore
from kvp_gym.scorers import HeadView, Scorer
from kvp_gym.traces import open_compatible


def evaluation_samples(files: Sequence, split: str, max_samples: int | None = None) -> list[tuple[int, Any]]:
    """(file index, SampleInfo) of the samples an evaluation scores: every sample of ``split`` (``all``: every
    sample) in file order then name order, the first ``max_samples`` of them if given."""
    samples = [(i, s) for i, t in enumerate(files) for s in t.samples.values() if split == "all" or s.split == split]
    return samples if max_samples is None else samples[:max_samples]


def evaluation_episodes(
    traces: str | Path | Sequence[str | Path],
    split: str = "test",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    max_samples: int | None = None,
) -> list:
    """The episodes :func:`kvp_gym.evaluation.trace_level.evaluate` scores, as ``KVEvict-v0`` episode keys (one
    per sample, layer and KV head, split at the prompt boundary), in the order of its per-sample-head scores.

    Replay each with ``env.reset(options={"episode": key})`` on an env made over the same ``traces`` (same order);
    with the protocol's protected tokens (``sinks=4, recent=16`` for ``paper``, 0 and 0 for ``raw``), the mean of
    ``info["holistic_score"]`` over them is the holistic score ``kvp-gym evaluate`` reports for that policy.
    """
    from kvp_gym.envs.episodes import EpisodeKey

    paths = [traces] if isinstance(traces, str | Path) else list(traces)
    files = open_compatible(paths)
    try:
        chosen_layers, chosen_heads = chosen_layers_and_heads(files[0].header, layers, heads)
        return [
            EpisodeKey(trace=i, sample=s.name, layer=layer, head=head, split=s.prompt_length)
            for i, s in evaluation_samples(files, split, max_samples)
            for layer in chosen_layers
            for head in chosen_heads
        ]
    finally:
        for trace in files:
            trace.close()


def chosen_layers_and_heads(
    header, layers: Sequence[int] | None, heads: Sequence[int] | None
) -> tuple[list[int], list[int]]:
    """The evaluated layers and KV heads of trace files with ``header`` (default: every recorded layer, every KV
    head): recorded ones, in the order given; ValueError naming what exists."""
    recorded, count = list(header.layers), header.geometry.num_kv_heads
    chosen_layers = recorded if layers is None else list(layers)
    chosen_heads = list(range(count)) if heads is None else list(heads)
    missing = [layer for layer in chosen_layers if layer not in recorded]
    if missing or not chosen_layers or len(set(chosen_layers)) != len(chosen_layers):
        raise ValueError(f"layers {chosen_layers}: expected distinct recorded layers, from {recorded}")
    if not chosen_heads or not all(0 <= h < count for h in chosen_heads) or len(set(chosen_heads)) != len(chosen_heads):
        raise ValueError(f"heads {chosen_heads}: expected distinct KV heads in [0, {count})")
    return chosen_layers, chosen_heads


def layer_view(trace, store: ImportanceStore, sample, layer: int, heads: int) -> tuple[HeadView, torch.Tensor, float]:
    """All ``heads`` KV heads of one layer of one sample of an open trace file, cut at the prompt boundary (n =
    ``sample.prompt_length`` tokens), as the evaluation shows them to scorers; with their future importance
    [heads, n] (from ``store``, computed there if new) and the seconds that took."""
    reads = [trace.head(sample, layer, h) for h in range(heads)]
    n = sample.prompt_length
    attention = trace.header.attention_of(layer)
    queries = torch.stack([r.queries for r in reads])  # [H, G, S, D]
    keys = torch.stack([r.keys for r in reads])  # [H, S, D]
    tick = time.perf_counter()
    importance = store.layer(sample, layer, n, tensors=(queries, keys))  # [H, n]
    tick = time.perf_counter() - tick
    view = HeadView(
        keys=keys[:, :n],
        values=torch.stack([r.values[:n] for r in reads]),
        positions=torch.arange(n).expand(heads, n),
        mask=torch.ones(heads, n, dtype=torch.bool),
        queries=queries[:, :, :n],
        layer=torch.full((heads,), layer),
        kv_head=torch.arange(heads),
        attention=attention,
        rotary=trace.header.rotary_of(layer),
    )
    return view, importance, tick


def declared_view(scorer: Scorer, view: HeadView, importance: torch.Tensor) -> HeadView:
    """``view`` as ``scorer`` may see it: the future importance [B..., n] only if it declares ``needs_future`` (the
    oracle), the prefill queries only if it declares ``needs_queries``."""
    if scorer.needs_future:
        view = dataclasses.replace(view, future_importance=importance)
    if not scorer.needs_queries:
        view = dataclasses.replace(view, queries=None)
    return view

"""LagKV (Liang et al., 2025, "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from baselines.common import keep_where
from kvp_gym.scorers import HeadView


def _lag_scores(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """softmax over a partition's tokens of the channel std of x [L, D] min-max normalised by ``reference``."""
    low, high = reference.amin(0), reference.amax(0)
    normalised = (x - low) / (high - low).clamp_min(1e-6)
    return normalised.std(-1).softmax(-1)


@dataclass(frozen=True)
class LagKV:
    """Tokens after the ``sinks`` are cut into partitions of ``partition`` tokens. Partition p's keys and values
    are min-max normalised per channel with the statistics of partition p + 1 (the lag reference); a token's
    score is softmax_p(std over channels of its normalised key) + softmax_p(same for its value). The sinks and
    the last, reference-less partition (the tail) are kept. keys, values [B..., n, D] -> [B..., n].
    """

    partition: int = 128
    sinks: int = 4
    name: ClassVar[str] = "lagkv"
    needs_queries: ClassVar[bool] = False
    needs_future: ClassVar[bool] = False

    def score(self, view: HeadView) -> torch.Tensor:
        keys = view.keys.float().reshape(-1, *view.keys.shape[-2:])
        values = view.values.float().reshape(-1, *view.values.shape[-2:])
        lengths = view.mask.reshape(-1, view.num_tokens).sum(-1).tolist()
        scores = torch.zeros(keys.shape[:2])
        protected = torch.ones(keys.shape[:2], dtype=torch.bool)
        for b, length in enumerate(lengths):
            start, size = self.sinks, self.partition
            while start + 2 * size <= length:  # partition [start, start + size) has a full reference after it
                part, ref = slice(start, start + size), slice(start + size, start + 2 * size)
                scores[b, part] = _lag_scores(keys[b, part], keys[b, ref]) + _lag_scores(
                    values[b, part], values[b, ref]
                )
                protected[b, part] = False
                start += size
        return keep_where(scores, protected).reshape(view.mask.shape)

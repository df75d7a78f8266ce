"""LagKV (Liang et al., 2025, "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important").

Imports kvp_gym.scorers and kvp_gym_baselines.common.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvp_gym.scorers import HeadView, ScorerError
from kvp_gym_baselines.common import keep_first


def _lag_scores(x: torch.Tensor) -> torch.Tensor:
    """x [..., P + 1, L, D]: partitions 0..P, each min-max normalised per channel by the next one (its lag
    reference); returns [..., P, L]: softmax over each partition's tokens of the channel std of the normalised
    rows."""
    reference = x[..., 1:, :, :]
    low, high = reference.amin(-2, keepdim=True), reference.amax(-2, keepdim=True)
    normalised = (x[..., :-1, :, :] - low) / (high - low).clamp_min(1e-6)  # clamp: a constant channel would divide by 0
    return normalised.std(-1).softmax(-1)


@dataclass(frozen=True)
class LagKV:
    """As NVIDIA kvpress's LagKVPress (default, no cross-scoring). After the ``sinks``, the prompt is cut into
    partitions of ``partition`` tokens; partition p is scored with the statistics of partition p + 1: the mean of
    the key and value lag scores (:func:`_lag_scores`), turned into the token's rank within its partition /
    ``partition`` (so partitions compete by rank; equal ranks tie across partitions, earlier token first). The
    sinks and the tail (the last full partition, which has no reference, plus the remainder) are kept: sinks
    first, then the tail newest first. A prompt shorter than sinks + 2 partitions keeps the sinks and ranks the
    rest by recency, as the reference does. keys, values [B..., n, D] -> [B..., n].
    """

    partition: int = 128
    sinks: int = 4
    name: ClassVar[str] = "lagkv"
    needs_queries: ClassVar[bool] = False
    needs_future: ClassVar[bool] = False

    def __post_init__(self):
        if self.partition < 1 or self.sinks < 0:
            raise ScorerError(f"lagkv: need partition >= 1 and sinks >= 0, got {self.partition}, {self.sinks}")

    def score(self, view: HeadView) -> torch.Tensor:
        n, size, sinks = view.num_tokens, self.partition, self.sinks
        keys = view.keys.float().reshape(-1, n, view.keys.shape[-1])
        values = view.values.float().reshape(-1, n, view.values.shape[-1])
        lengths = view.mask.reshape(-1, n).sum(-1, keepdim=True)  # [R, 1] real tokens (padding at the end)
        positions = torch.arange(n, device=keys.device)
        # Defaults for every row: sinks first (oldest first), everything else by recency (newest first).
        scores = torch.where(positions < sinks, 2 * n - positions, positions).float().expand(len(keys), n).clone()
        protected = (positions < sinks).expand(len(keys), n).clone()
        # Every row is scored at once with the partitions of the longest (a loop over rows would read their lengths
        # back to the host, waiting for the device); each row then keeps only its own full partitions.
        partitions = (n - sinks) // size
        if partitions >= 2:
            block = slice(sinks, sinks + partitions * size)
            lag = (
                _lag_scores(keys[:, block].reshape(len(keys), partitions, size, -1))
                + _lag_scores(values[:, block].reshape(len(keys), partitions, size, -1))
            ) / 2  # [R, partitions - 1, size]: a partition's scores depend on it and its reference only
            rank = lag.argsort(-1).argsort(-1).float() / size
            ranked = torch.zeros_like(scores)
            ranked[:, sinks : sinks + (partitions - 1) * size] = rank.flatten(1)
            full = (lengths - sinks) // size  # [R, 1]: the row's full partitions; its last one is only a reference
            tail_start = sinks + (full - 1) * size
            long_enough = lengths >= sinks + 2 * size  # shorter rows: sinks + recency, as the reference does
            scored = long_enough & (positions >= sinks) & (positions < tail_start)
            scores = torch.where(scored, ranked, scores)
            protected |= long_enough & (positions >= tail_start) & (positions < lengths)  # reference + remainder
        return keep_first(scores, protected).reshape(view.mask.shape)

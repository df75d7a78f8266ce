"""H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs").

Imports kvp_gym.scorers, kvp_gym.utility and kvp_gym_baselines.common.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvp_gym.scorers import HeadView, ScorerError
from kvp_gym.utility import attention_received
from kvp_gym_baselines.common import keep_first, last_real, real_length


@dataclass(frozen=True)
class H2O:
    """score_i = (sum over prompt queries t >= i of attention(t, i)) / (number of queries that saw i), averaged
    over the GQA group (heavy hitters), as NVIDIA kvpress's ObservedAttentionPress. ``recent > 0`` also keeps the
    last ``recent`` tokens, ordered inside by the same score (the windowed variant, ``h2o:recent=16``).
    queries [B..., G, n, D], keys [B..., n, D] -> [B..., n].
    """

    recent: int = 0
    name: ClassVar[str] = "h2o"
    needs_queries: ClassVar[bool] = True
    needs_future: ClassVar[bool] = False
    variants: ClassVar[tuple[str, ...]] = ("recent=16",)

    def __post_init__(self):
        if self.recent < 0:
            raise ScorerError(f"h2o: recent must be >= 0, got {self.recent}")

    def score(self, view: HeadView) -> torch.Tensor:
        received = attention_received(view.queries, view.keys, view.mask, attention=view.attention).mean(-2)
        index = view.mask.long().cumsum(-1) - 1  # rank among real tokens
        seen_by = (real_length(view.mask) - index).clamp_min(1)  # queries at or after token i
        return keep_first(received / seen_by, last_real(view.mask, self.recent))

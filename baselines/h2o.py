"""H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from baselines.common import keep_where, last_real
from kvp_gym.scorers import HeadView
from kvp_gym.utility import attention_received


@dataclass(frozen=True)
class H2O:
    """score_i = (sum over prompt queries t >= i of attention(t, i)) / (number of queries that saw i), averaged
    over the GQA group (heavy hitters); the last ``recent`` tokens are kept.
    queries [B..., G, n, D], keys [B..., n, D] -> [B..., n]."""

    recent: int = 16
    name: ClassVar[str] = "h2o"
    needs_queries: ClassVar[bool] = True
    needs_future: ClassVar[bool] = False

    def score(self, view: HeadView) -> torch.Tensor:
        received = attention_received(view.queries, view.keys, view.mask).mean(-2)
        index = view.mask.long().cumsum(-1) - 1  # rank among real tokens
        seen_by = (view.mask.sum(-1, keepdim=True) - index).clamp_min(1)  # queries at or after token i
        return keep_where(received / seen_by, last_real(view.mask, self.recent))

"""TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs"): keep what the last query attends to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from baselines.common import keep_where, last_real
from kvp_gym.scorers import HeadView
from kvp_gym.utility import attention_received


@dataclass(frozen=True)
class TOVA:
    """score_i = attention of the last prompt query to token i, averaged over the GQA group's query heads; the last
    token is kept. queries [B..., G, n, D], keys [B..., n, D] -> [B..., n]."""

    name: ClassVar[str] = "tova"
    needs_queries: ClassVar[bool] = True
    needs_future: ClassVar[bool] = False

    def score(self, view: HeadView) -> torch.Tensor:
        attention = attention_received(view.queries, view.keys, view.mask, window=1).mean(-2)
        return keep_where(attention, last_real(view.mask, 1))

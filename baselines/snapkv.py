"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from baselines.common import keep_where, last_real
from kvp_gym.scorers import HeadView
from kvp_gym.utility import attention_received


@dataclass(frozen=True)
class SnapKV:
    """score_i = avg_pool1d(kernel) over positions of the attention the last ``window`` prompt queries pay to
    token i (mean over the window, then over the GQA group); the window's own tokens are kept.
    queries [B..., G, n, D], keys [B..., n, D] -> [B..., n]."""

    window: int = 64
    kernel: int = 5
    name: ClassVar[str] = "snapkv"
    needs_queries: ClassVar[bool] = True
    needs_future: ClassVar[bool] = False

    def score(self, view: HeadView) -> torch.Tensor:
        attention = attention_received(view.queries, view.keys, view.mask, window=self.window).mean(-2) / self.window
        flat = attention.reshape(-1, 1, view.num_tokens)
        pooled = torch.nn.functional.avg_pool1d(flat, self.kernel, stride=1, padding=self.kernel // 2)
        return keep_where(pooled.reshape(attention.shape), last_real(view.mask, self.window))

"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation").

Imports kvp_gym.scorers, kvp_gym.utility and kvp_gym_baselines.common.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvp_gym.scorers import HeadView, ScorerError
from kvp_gym.utility import attention_received
from kvp_gym_baselines.common import keep_first, last_real


@dataclass(frozen=True)
class SnapKV:
    """Tokens before the observation window (the last ``window`` prompt tokens): score_i = avg_pool1d(kernel,
    stride 1, zero padding) over those tokens only of the attention the window's queries pay to token i (mean over
    the window, then over the GQA group), as NVIDIA kvpress's SnapKVPress: the window's keys are cut off before
    pooling. The window is kept, ordered inside by the attention its tokens receive from the window (unpooled).
    queries [B..., G, n, D], keys [B..., n, D] -> [B..., n].
    """

    window: int = 64
    kernel: int = 5
    name: ClassVar[str] = "snapkv"
    needs_queries: ClassVar[bool] = True
    needs_future: ClassVar[bool] = False

    def __post_init__(self):
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise ScorerError(f"snapkv: need window >= 1 and an odd kernel >= 1, got {self.window}, {self.kernel}")

    @property
    def query_window(self) -> int:
        return self.window

    def score(self, view: HeadView) -> torch.Tensor:
        in_window = last_real(view.mask, self.window)
        received = attention_received(view.queries, view.keys, view.mask, window=self.window, attention=view.attention)
        attention = received.mean(-2) / in_window.sum(-1, keepdim=True).clamp_min(1)  # mean over the window
        before = attention.masked_fill(in_window | ~view.mask, 0.0)  # pooling must not reach into the window
        pooled = torch.nn.functional.avg_pool1d(
            before.reshape(-1, 1, view.num_tokens), self.kernel, stride=1, padding=self.kernel // 2
        ).reshape(attention.shape)
        return keep_first(torch.where(in_window, attention, pooled), in_window)

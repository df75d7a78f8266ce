"""StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks"): sinks + recency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from baselines.common import keep_where
from kvp_gym.scorers import HeadView


@dataclass(frozen=True)
class StreamingLLM:
    """The first ``sinks`` positions are kept; the rest rank by recency: score_i = position_i. [B..., n]."""

    sinks: int = 4
    name: ClassVar[str] = "streaming_llm"
    needs_queries: ClassVar[bool] = False
    needs_future: ClassVar[bool] = False

    def score(self, view: HeadView) -> torch.Tensor:
        return keep_where(view.positions.float(), view.positions < self.sinks)

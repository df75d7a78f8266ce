"""StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks"): sinks + recency.

Imports kvp_gym.scorers and kvp_gym_baselines.common.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvp_gym.scorers import HeadView, ScorerError
from kvp_gym_baselines.common import keep_first


@dataclass(frozen=True)
class StreamingLLM:
    """The first ``sinks`` positions are kept (oldest first: position 0 is the strongest sink); the rest rank by
    recency, newest first (NVIDIA kvpress's StreamingLLMPress keeps the same sets). [B..., n] -> [B..., n]."""

    sinks: int = 4
    name: ClassVar[str] = "streaming_llm"
    needs_queries: ClassVar[bool] = False
    needs_future: ClassVar[bool] = False

    def __post_init__(self):
        if self.sinks < 0:
            raise ScorerError(f"streaming_llm: sinks must be >= 0, got {self.sinks}")

    def score(self, view: HeadView) -> torch.Tensor:
        sink = view.positions < self.sinks
        position = view.positions.float()
        return keep_first(torch.where(sink, -position, position), sink)

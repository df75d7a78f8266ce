"""Random: uniform scores from a seeded generator (the floor every method should beat).

Imports only kvp_gym.scorers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvp_gym.scorers import HeadView


@dataclass(frozen=True)
class RandomScorer:
    """score_i ~ U(0, 1), from ``torch.Generator().manual_seed(seed)`` on each call. [B..., n] -> [B..., n]."""

    seed: int = 0
    name: ClassVar[str] = "random"
    needs_queries: ClassVar[bool] = False
    needs_future: ClassVar[bool] = False

    def score(self, view: HeadView) -> torch.Tensor:
        # Drawn on the CPU (the same scores on every device), then moved to the views' device.
        return torch.rand(view.mask.shape, generator=torch.Generator().manual_seed(self.seed)).to(view.mask.device)

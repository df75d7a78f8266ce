"""KeyDiff (Park et al., 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction"): keep distinctive keys.

Imports only kvp_gym.scorers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvp_gym.scorers import HeadView


@dataclass(frozen=True)
class KeyDiff:
    """score_i = -cos(k_i, a), a = mean over real tokens of k_j / ||k_j||. keys [B..., n, D] -> [B..., n]."""

    name: ClassVar[str] = "keydiff"
    needs_queries: ClassVar[bool] = False
    needs_future: ClassVar[bool] = False

    def score(self, view: HeadView) -> torch.Tensor:
        unit = torch.nn.functional.normalize(view.keys.float(), dim=-1)
        weights = view.mask.float()[..., None]
        anchor = (unit * weights).sum(-2, keepdim=True) / weights.sum(-2, keepdim=True).clamp_min(1)
        return -torch.nn.functional.cosine_similarity(unit, anchor, dim=-1)

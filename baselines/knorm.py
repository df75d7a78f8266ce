"""K-norm (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression").

Imports only kvp_gym.scorers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvp_gym.scorers import HeadView


@dataclass(frozen=True)
class KNorm:
    """score_i = -||k_i||_2: low-norm keys, which tend to draw attention, are kept. keys [B..., n, D] -> [B..., n]."""

    name: ClassVar[str] = "knorm"
    needs_queries: ClassVar[bool] = False
    needs_future: ClassVar[bool] = False

    def score(self, view: HeadView) -> torch.Tensor:
        return -view.keys.float().norm(dim=-1)

"""Oracle: the true future importance. Privileged (it reads the future): an upper bound, not a method.

Imports only kvp_gym.scorers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvp_gym.scorers import HeadView


@dataclass(frozen=True)
class Oracle:
    """score_i = future importance of token i (attention the future queries pay it). [B..., n] -> [B..., n]."""

    name: ClassVar[str] = "oracle"
    needs_queries: ClassVar[bool] = False
    needs_future: ClassVar[bool] = True

    def score(self, view: HeadView) -> torch.Tensor:
        return view.future_importance.float()

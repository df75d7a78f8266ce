"""What the baseline scorers share."""

from __future__ import annotations

import torch

# The score of a protected token (sinks, recent window): above any computed score, and finite so that sums stay
# defined. Protected tokens tie among themselves; rankings break ties by keeping the earlier token first.
KEEP = 1e9


def keep_where(scores: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """``scores`` with ``protected`` tokens raised to KEEP."""
    return torch.where(protected, torch.full_like(scores, KEEP), scores)


def last_real(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Bool [..., n]: the last ``count`` real tokens of each view (by mask)."""
    index = mask.long().cumsum(-1)
    return mask & (index > mask.sum(-1, keepdim=True) - count)

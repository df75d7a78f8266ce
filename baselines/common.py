"""What the baseline scorers share: protected tokens kept first, in the method's own order.

Imports nothing from kvp_gym.
"""

from __future__ import annotations

import torch


def keep_first(scores: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """``scores`` with every ``protected`` token lifted above every other token, in the order of its own score.

    A method's protected set (SnapKV's window, H2O's recent tokens, sinks) is kept at every budget, but the
    holistic score also ranks tokens inside it: ordering them by the method's own evidence (their scores here),
    not by position, is what the method would do if the budget were smaller than the set. Shapes [..., n].
    """
    scores = scores.float()
    lowest_kept = scores.masked_fill(~protected, float("inf")).amin(-1, keepdim=True)
    highest_other = scores.masked_fill(protected, float("-inf")).amax(-1, keepdim=True)
    # A finite shift (0 when either set is empty) that puts the lowest protected score 1 above the highest other.
    shift = torch.nan_to_num(highest_other - lowest_kept + 1, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    return torch.where(protected, scores + shift, scores)


def last_real(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Bool [..., n]: the last ``count`` real tokens of each view (by mask)."""
    index = mask.long().cumsum(-1)
    return mask & (index > mask.sum(-1, keepdim=True) - count)


def real_length(mask: torch.Tensor) -> torch.Tensor:
    """[..., 1] int64: the number of real tokens of each view."""
    return mask.long().sum(-1, keepdim=True)

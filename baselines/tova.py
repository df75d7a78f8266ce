"""TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs"): keep what the last query attends to.

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
class TOVA:
    """score_i = attention of the last prompt query to token i, averaged over query heads; the last token is kept.

    ``heads="layer"`` (default, the published method and NVIDIA kvpress's TOVAPress): the mean over every query
    head of the layer, the same ranking for all its KV heads. ``heads="group"``: the mean over the KV head's own
    GQA group only (a variant of ours, labelled ``tova:heads=group`` in tables).
    queries [B..., H, G, n, D], keys [B..., H, n, D] -> [B..., H, n] (``heads="layer"`` needs one whole layer).
    """

    heads: str = "layer"
    name: ClassVar[str] = "tova"
    needs_queries: ClassVar[bool] = True
    needs_future: ClassVar[bool] = False
    variants: ClassVar[tuple[str, ...]] = ("heads=group",)
    query_window: ClassVar[int] = 1  # the last prompt query is all it reads

    def __post_init__(self):
        if self.heads not in ("layer", "group"):
            raise ScorerError(f"tova: heads must be 'layer' or 'group', got {self.heads!r}")

    @property
    def scope(self) -> str:
        return "layer" if self.heads == "layer" else "head"

    def score(self, view: HeadView) -> torch.Tensor:
        received = attention_received(view.queries, view.keys, view.mask, window=1, attention=view.attention)
        attention = received.mean(-2)  # over the GQA group: [B..., H, n]
        if self.heads == "layer":
            attention = attention.mean(-2, keepdim=True).expand_as(attention)
        return keep_first(attention, last_real(view.mask, 1))

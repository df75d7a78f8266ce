"""Expected Attention (NVIDIA kvpress's ExpectedAttentionPress; Devoto et al., 2025, "Expected Attention: KV Cache
Compression by Estimating Attention from Future Queries Distribution").

Imports kvp_gym.attention, kvp_gym.scorers and kvp_gym_baselines.common.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvp_gym.attention import AttentionSpec, Rotary
from kvp_gym.scorers import HeadView, ScorerError
from kvp_gym_baselines.common import keep_first


@dataclass(frozen=True)
class ExpectedAttention:
    """Future queries modelled as a Gaussian fitted to the prefill queries, so each token's expected attention
    has a closed form. Per query head of the GQA group:

    1. mu, Sigma = mean and covariance of the pre-RoPE prefill queries (the first ``sinks`` positions left out);
    2. R = the RoPE rotation averaged over the next ``future_positions`` positions (n .. n + future_positions - 1);
       mu <- R mu, Sigma <- R Sigma R^T;
    3. logit_i = scale * k_i . mu + scale^2 / 2 * k_i^T Sigma k_i (E[exp(scale q.k)] for Gaussian q; scale =
       1/sqrt(D) for standard attention, as kvpress writes it), softmax over the non-sink tokens;
    4. mean over the group, times ||v_i|| when ``value_norm`` (plus ``epsilon``).

    The ``sinks`` are kept, ordered inside by the same formula. Defaults are kvpress's (n_future_positions=512,
    n_sink=4, use_covariance=True, use_vnorm=True, epsilon=0). Needs the prefill queries and the model's RoPE
    (``view.rotary``). queries [B..., G, n, D], keys/values [B..., n, D] -> [B..., n].
    """

    future_positions: int = 512
    sinks: int = 4
    covariance: bool = True
    value_norm: bool = True
    epsilon: float = 0.0
    name: ClassVar[str] = "expected_attention"
    needs_queries: ClassVar[bool] = True
    needs_future: ClassVar[bool] = False

    def __post_init__(self):
        if self.future_positions < 1 or self.sinks < 0:
            raise ScorerError(
                f"expected_attention: need future_positions >= 1 and sinks >= 0, got {self.future_positions}, "
                f"{self.sinks}"
            )

    def score(self, view: HeadView) -> torch.Tensor:
        if view.rotary is None:
            raise ScorerError("expected_attention needs the model's RoPE frequencies (view.rotary), which are unknown")
        rotary, spec = view.rotary, view.attention or AttentionSpec.standard(view.keys.shape[-1])
        positions, mask = view.positions, view.mask
        pre = rotary.unrotate(view.queries, positions[..., None, :])  # [B..., G, n, D]
        used = (mask & (positions >= self.sinks))[..., None, :, None].float()  # queries that enter the statistics
        count = used.sum(-2, keepdim=True).clamp_min(1)
        pre_mean = (pre * used).sum(-2, keepdim=True) / count  # [B..., G, 1, D]
        rotation = self._future_rotation(rotary, positions.masked_fill(~mask, -1).amax(-1) + 1)  # [B..., D, D]
        mean = pre_mean @ rotation[..., None, :, :].transpose(-1, -2)  # R mu, as row vectors
        keys = view.keys.float()[..., None, :, :]  # [B..., 1, n, D]
        logits = spec.scale * (keys * mean).sum(-1)  # [B..., G, n]
        if self.covariance:
            centered = (pre - pre_mean) * used
            sigma = centered.transpose(-1, -2) @ centered / count  # [B..., G, D, D]
            sigma = rotation[..., None, :, :] @ sigma @ rotation[..., None, :, :].transpose(-1, -2)
            logits = logits + spec.scale**2 / 2 * ((keys @ sigma) * keys).sum(-1)
        sink = positions < self.sinks
        others = logits.masked_fill((sink | ~mask)[..., None, :], float("-inf")).softmax(-1).mean(-2)
        sinks_own = logits.masked_fill(~mask[..., None, :], float("-inf")).softmax(-1).mean(-2)
        expected = torch.where(sink, sinks_own, others).nan_to_num(0.0)  # all-sink views: nothing to rank
        if self.value_norm:
            expected = (expected + self.epsilon) * view.values.float().norm(dim=-1)
        return keep_first(expected, sink & mask)

    def _future_rotation(self, rotary: Rotary, prompt_length: torch.Tensor) -> torch.Tensor:
        """R averaged over positions [n, n + future_positions) for each view's n, prompt_length [B...]: [B..., D, D].
        Computed for every view at once on the views' device (no per-length loop, which would read the lengths back
        to the host)."""
        future = prompt_length[..., None] + torch.arange(self.future_positions, device=prompt_length.device)
        return rotary.mean_rotation(future)

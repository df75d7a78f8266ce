"""The KVP per-head scorer network (paper-notes.md section 3), batched over many heads with grouped weights.

Per token: key -> Linear(D, W) + LayerNorm; value -> Linear(D, W) + LayerNorm; position -> learned embedding
(``position_dim`` dims, positions clamped to the table's last row) + LayerNorm; concatenated, then two hidden
layers of W with LayerNorm + SiLU, then Linear(W, 1): one score per token, higher = keep. Tokens are scored
independently. :class:`KVPNetwork` holds H such networks as [H, ...] parameter tensors and scores all of them in
one batched call (no Python loop over heads).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class GroupedLinear(nn.Module):
    """H independent Linear(in, out) layers: x [H', ..., in] -> [H', ..., out]; ``select`` [H'] picks the layers
    (default all H, in order)."""

    def __init__(self, heads: int, features_in: int, features_out: int):
        super().__init__()
        bound = 1 / math.sqrt(features_in)
        self.weight = nn.Parameter(torch.empty(heads, features_in, features_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(heads, features_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
        weight, bias = (self.weight, self.bias) if select is None else (self.weight[select], self.bias[select])
        shape = x.shape
        flat = x.reshape(shape[0], -1, shape[-1])
        out = torch.baddbmm(bias[:, None, :], flat, weight)
        return out.reshape(*shape[:-1], -1)


class GroupedLayerNorm(nn.Module):
    """H independent LayerNorms over the last dimension: x [H', ..., F]; ``select`` as for GroupedLinear."""

    def __init__(self, heads: int, features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, features))
        self.bias = nn.Parameter(torch.zeros(heads, features))

    def forward(self, x: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
        weight, bias = (self.weight, self.bias) if select is None else (self.weight[select], self.bias[select])
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        normed = torch.nn.functional.layer_norm(x, x.shape[-1:])
        return normed * weight.reshape(shape) + bias.reshape(shape)


class KVPNetwork(nn.Module):
    """H per-head KVP scorers. forward(keys, values, positions, select) with keys/values [H', B, n, D] and
    positions [H', B, n] (int) -> scores [H', B, n] float32; ``select`` [H'] says which of the H networks scores
    each leading row (default: all H in order)."""

    def __init__(self, heads: int, head_dim: int, width: int = 256, position_dim: int = 32, max_position: int = 8192):
        super().__init__()
        self.heads, self.head_dim, self.width = heads, head_dim, width
        self.position_dim, self.max_position = position_dim, max_position
        self.key = GroupedLinear(heads, head_dim, width)
        self.key_norm = GroupedLayerNorm(heads, width)
        self.value = GroupedLinear(heads, head_dim, width)
        self.value_norm = GroupedLayerNorm(heads, width)
        self.position = nn.Parameter(torch.randn(heads, max_position, position_dim) * 0.02)
        self.position_norm = GroupedLayerNorm(heads, position_dim)
        self.hidden1 = GroupedLinear(heads, 2 * width + position_dim, width)
        self.norm1 = GroupedLayerNorm(heads, width)
        self.hidden2 = GroupedLinear(heads, width, width)
        self.norm2 = GroupedLayerNorm(heads, width)
        self.out = GroupedLinear(heads, width, 1)

    def config(self) -> dict:
        return {
            "heads": self.heads,
            "head_dim": self.head_dim,
            "width": self.width,
            "position_dim": self.position_dim,
            "max_position": self.max_position,
        }

    def forward(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, select: torch.Tensor | None = None
    ) -> torch.Tensor:
        table = self.position if select is None else self.position[select]
        index = positions.clamp(0, self.max_position - 1).reshape(keys.shape[0], -1)
        embedded = torch.gather(table, 1, index[..., None].expand(-1, -1, self.position_dim))
        embedded = embedded.reshape(*positions.shape, self.position_dim)
        x = torch.cat(
            [
                self.key_norm(self.key(keys.float(), select), select),
                self.value_norm(self.value(values.float(), select), select),
                self.position_norm(embedded, select),
            ],
            dim=-1,
        )
        x = torch.nn.functional.silu(self.norm1(self.hidden1(x, select), select))
        x = torch.nn.functional.silu(self.norm2(self.hidden2(x, select), select))
        return self.out(x, select).squeeze(-1)


def plackett_luce_log_prob(scores: torch.Tensor, ranking: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log P(ranking | scores) under Plackett-Luce, over the valid tokens only.

    scores [..., n] float; ranking [..., n] a permutation with the padding last; valid [..., n] bool (by token).
    log P = sum_i s_{r_i} - logsumexp_{j >= i} s_{r_j}. Returns [...].
    """
    ordered = scores.gather(-1, ranking)
    kept = valid.gather(-1, ranking)
    ordered = ordered.masked_fill(~kept, float("-inf"))
    tail = torch.logcumsumexp(ordered.flip(-1), -1).flip(-1)
    terms = (ordered - tail).masked_fill(~kept, 0.0)
    return terms.sum(-1)


def gumbel_ranking(scores: torch.Tensor, valid: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample a Plackett-Luce ranking by Gumbel-sort: argsort(scores + Gumbel noise), padding last. [..., n]."""
    uniform = torch.rand(scores.shape, generator=generator).clamp_(1e-10, 1.0)
    noisy = (scores - torch.log(-torch.log(uniform))).masked_fill(~valid, float("-inf"))
    return torch.sort(noisy, dim=-1, descending=True, stable=True).indices

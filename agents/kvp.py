"""The KVP per-head scorer network (the KVP paper, arXiv 2602.10238), batched over many heads with grouped weights.

Per token: key -> Linear(D, W) + LayerNorm; value -> Linear(D, W) + LayerNorm; position -> two learned
embeddings (``position_dim`` dims each) + LayerNorm: one of the token's index in the cache, one of its age
(newest position - position); concatenated, then two hidden layers of W with LayerNorm + SiLU, then Linear(W, 1):
one score per token, higher = keep. Tokens are scored independently.

The index table is the paper's clamped embedding, kept short: the first ``buckets - 1`` positions have their own
row (attention sinks, the chat template's opening), every later one shares the last row. The age embedding is our
choice: the index cannot tell which tokens are recent once prompts vary in length, the age can. Its table is
bucketed: ages below ``buckets / 2`` have their own row, larger ones share log-spaced rows up to ``max_age``
(which the trainer sets to the longest cache it trains on), and older tokens share the last row, so every row is
trained and any context length maps into the table.

:class:`KVPNetwork` holds H such networks as [H, ...] parameter tensors and scores all of them in one batched call
(no Python loop over heads). Its forward pass computes exactly the function above, arranged for speed: the
LayerNorm affines before the first hidden layer are folded into its weight, and the position branch is evaluated
on the embedding tables (``buckets`` rows) and gathered, instead of per token.

Imports only torch: no kvp_gym module.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.functional import layer_norm, silu


class GroupedLinear(nn.Module):
    """H independent Linear(in, out) layers: weight [H, in, out], bias [H, out]."""

    def __init__(self, heads: int, features_in: int, features_out: int):
        super().__init__()
        bound = 1 / math.sqrt(features_in)
        self.weight = nn.Parameter(torch.empty(heads, features_in, features_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(heads, features_out).uniform_(-bound, bound))


class GroupedLayerNorm(nn.Module):
    """H independent LayerNorm affines over the last dimension: weight, bias [H, F]."""

    def __init__(self, heads: int, features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, features))
        self.bias = nn.Parameter(torch.zeros(heads, features))


def age_bucket(ages: torch.Tensor, buckets: int, max_age: int) -> torch.Tensor:
    """Age-table row of each age >= 0 (int tensor, any shape): the age itself below ``buckets // 2``, then
    log-spaced rows up to ``max_age``; every age from ``max_age`` on uses the last row."""
    exact = buckets // 2
    ages = ages.clamp(min=0)
    scale = (buckets - exact) / math.log(max_age / exact)
    logged = exact + (torch.log(ages.clamp(min=exact).float() / exact) * scale).long()
    return torch.where(ages < exact, ages, logged.clamp(max=buckets - 1))


class KVPNetwork(nn.Module):
    """H per-head KVP scorers; see the module docstring.

    forward(keys, values, positions, ages, select): keys, values [H', B, n, D]; positions and ages [H', B, n] int
    (or broadcastable to it, e.g. [H', 1, n]); ``select`` [H'] says which of the H networks scores each leading row
    (default: all H in order). Returns scores [H', B, n] float32.
    """

    def __init__(
        self,
        heads: int,
        head_dim: int,
        width: int = 256,
        position_dim: int = 32,
        buckets: int = 64,
        max_age: int = 8192,
    ):
        super().__init__()
        if not 2 <= buckets <= max_age:
            raise ValueError(f"need 2 <= buckets <= max_age, got buckets {buckets}, max_age {max_age}")
        self.heads, self.head_dim, self.width = heads, head_dim, width
        self.position_dim, self.buckets, self.max_age = position_dim, buckets, max_age
        self.key = GroupedLinear(heads, head_dim, width)
        self.key_norm = GroupedLayerNorm(heads, width)
        self.value = GroupedLinear(heads, head_dim, width)
        self.value_norm = GroupedLayerNorm(heads, width)
        self.index_table = nn.Parameter(torch.randn(heads, buckets, position_dim) * 0.02)
        self.index_norm = GroupedLayerNorm(heads, position_dim)
        self.age_table = nn.Parameter(torch.randn(heads, buckets, position_dim) * 0.02)
        self.age_norm = GroupedLayerNorm(heads, position_dim)
        self.hidden1 = GroupedLinear(heads, 2 * width + 2 * position_dim, width)
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
            "buckets": self.buckets,
            "max_age": self.max_age,
        }

    def forward(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        ages: torch.Tensor,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        def rows(t: torch.Tensor) -> torch.Tensor:
            return t if select is None else t[select]

        def normed(x: torch.Tensor, norm: GroupedLayerNorm) -> torch.Tensor:  # x [H', N, F], per-head affine
            return torch.addcmul(rows(norm.bias)[:, None], layer_norm(x, x.shape[-1:]), rows(norm.weight)[:, None])

        heads, batch, n, dim = keys.shape
        width, pos = self.width, self.position_dim
        w1 = rows(self.hidden1.weight)
        w1_key, w1_value = w1[:, :width], w1[:, width : 2 * width]
        w1_index, w1_age = w1[:, 2 * width : 2 * width + pos], w1[:, 2 * width + pos :]

        # Key and value branches, their LayerNorm affines folded into the first hidden layer.
        def branch(x: torch.Tensor, linear: GroupedLinear) -> torch.Tensor:
            projected = torch.baddbmm(
                rows(linear.bias)[:, None], x.reshape(heads, batch * n, dim).float(), rows(linear.weight)
            )
            return layer_norm(projected, (width,))

        def folded(norm: GroupedLayerNorm, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return rows(norm.weight)[:, :, None] * w, torch.bmm(rows(norm.bias)[:, None], w)

        key_weight, key_bias = folded(self.key_norm, w1_key)
        value_weight, value_bias = folded(self.value_norm, w1_value)
        bias = rows(self.hidden1.bias)[:, None] + key_bias + value_bias
        x = torch.baddbmm(bias, branch(keys, self.key), key_weight)
        x = torch.baddbmm(x, branch(values, self.value), value_weight).reshape(heads, batch, n, width)

        # Position branches: the first hidden layer's share of every table row, then one gather per token.
        def table(t: torch.Tensor, norm: GroupedLayerNorm, w: torch.Tensor) -> torch.Tensor:
            return torch.bmm(normed(rows(t), norm), w)  # [H', buckets, W]

        head = torch.arange(heads, device=keys.device).reshape(heads, 1, 1)
        index_rows = table(self.index_table, self.index_norm, w1_index)
        age_rows = table(self.age_table, self.age_norm, w1_age)
        x = x + index_rows[head, positions.clamp(0, self.buckets - 1)]
        x = x + age_rows[head, age_bucket(ages, self.buckets, self.max_age)]

        x = silu(normed(x.reshape(heads, batch * n, width), self.norm1))
        x = silu(normed(torch.baddbmm(rows(self.hidden2.bias)[:, None], x, rows(self.hidden2.weight)), self.norm2))
        scores = torch.baddbmm(rows(self.out.bias)[:, None], x, rows(self.out.weight))
        return scores.reshape(heads, batch, n)


def ages_of(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each token's age: the newest valid position minus its position. positions, valid [..., n] -> [..., n]."""
    newest = positions.masked_fill(~valid, -1).amax(-1, keepdim=True)
    return newest - positions


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


def gumbel_ranking(
    scores: torch.Tensor,
    valid: torch.Tensor,
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample a Plackett-Luce ranking by Gumbel-sort: argsort(scores + Gumbel noise), padding last. [..., n].

    The noise comes from ``uniform`` (U(0, 1) draws of the scores' shape, on their device) when given, else from
    ``generator`` (on the scores' device)."""
    if uniform is None:
        uniform = torch.rand(scores.shape, generator=generator, device=scores.device)
    uniform = uniform.clamp(1e-10, 1.0)
    noisy = (scores - torch.log(-torch.log(uniform))).masked_fill(~valid, float("-inf"))
    return torch.sort(noisy, dim=-1, descending=True, stable=True).indices

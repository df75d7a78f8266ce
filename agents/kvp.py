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

Ablation options (``kvp-gym train --key-frame/--ages/--index``, recorded in the network's configuration, so in the
checkpoint; a configuration without them reads as the defaults): ``index`` table (default) | none; ``ages``
table (default, the bucketed table above) | none | relative (age / (newest position + 1), a number in [0, 1]
through a learned Linear(1, position_dim) + LayerNorm) | log (the table's log spacing continued past
``max_age`` without a cap, up to :data:`LOG_AGE_LIMIT`: ages older than any training cache get rows of their own,
which training never reached). ``key_frame`` post (default: keys as the model caches them, rotated by RoPE at
their position) | pre (un-rotated with the layer's RoPE, :func:`agent_keys`): the network does not use it itself,
it records which keys it was trained on, and every caller (trainer, scorer) prepares them with :func:`agent_keys`.

:class:`KVPNetwork` holds H such networks as [H, ...] parameter tensors and scores all of them in one batched call
(no Python loop over heads). Its forward pass computes exactly the function above, arranged for speed: the
LayerNorm affines before the first hidden layer are folded into its weight, and the position branch is evaluated
on the embedding tables (``buckets`` rows) and gathered, instead of per token.

Imports only torch: no kvp_gym module (:func:`agent_keys` calls the ``unrotate`` of the RoPE it is given, a
``kvp_gym.attention.Rotary``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.functional import layer_norm, silu

if TYPE_CHECKING:
    from kvp_gym.attention import Rotary

KEY_FRAMES = ("post", "pre")
AGE_FEATURES = ("table", "none", "relative", "log")
INDEX_FEATURES = ("table", "none")
# What a network configuration written before the ablation options existed means: the shipped agents' inputs.
OPTION_DEFAULTS = {"ages": "table", "index": "table", "key_frame": "post"}
LOG_AGE_LIMIT = 2**20  # tokens: the ``log`` age table has rows up to this age; older ages share its last row


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


def age_bucket(ages: torch.Tensor, buckets: int, max_age: int, rows: int | None = None) -> torch.Tensor:
    """Age-table row of each age >= 0 (int tensor, any shape): the age itself below ``buckets // 2``, then
    log-spaced rows (``buckets - buckets // 2`` of them up to ``max_age``). ``rows``: the table's size, default
    ``buckets``: every age from ``max_age`` on uses the last row; a larger table (:func:`log_age_rows`) continues
    the same spacing past ``max_age``."""
    exact = buckets // 2
    ages = ages.clamp(min=0)
    scale = (buckets - exact) / math.log(max_age / exact)
    logged = exact + (torch.log(ages.clamp(min=exact).float() / exact) * scale).long()
    return torch.where(ages < exact, ages, logged.clamp(max=(rows or buckets) - 1))


def log_age_rows(buckets: int, max_age: int) -> int:
    """Rows of the ``log`` age table: :func:`age_bucket`'s spacing continued up to the age :data:`LOG_AGE_LIMIT`
    (at least ``buckets``)."""
    exact = buckets // 2
    scale = (buckets - exact) / math.log(max_age / exact)
    return max(buckets, exact + int(math.log(LOG_AGE_LIMIT / exact) * scale) + 1)


def relative_age(ages: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """age / (newest position + 1) in [0, 1], float32: the share of the context seen since the token (ages and
    positions int, broadcastable; age + position = the newest position for every real token). Without evictions
    (training, trace-level evaluation) newest + 1 is the cache length; after evictions, the context length."""
    return (ages.float() / (ages + positions + 1).clamp(min=1).float()).clamp(0.0, 1.0)


def agent_keys(
    keys: torch.Tensor, positions: torch.Tensor, key_frame: str, rotary: Rotary | None | Sequence[Rotary | None]
) -> torch.Tensor:
    """The keys a network of ``key_frame`` reads: the one rule trainer and scorer share.

    keys [R, ..., n, D] post-RoPE (as the model caches them) at integer positions [..., n] (broadcastable to the
    keys' leading shape). ``post``: the keys themselves. ``pre``: un-rotated with the layer's RoPE
    (``rotary.unrotate``), float32 [R, ..., n, D], so the same key content gives the same input at any position;
    ``rotary`` may be one RoPE for every row or a sequence of R, one per leading row (a trainer's chunk mixes
    layers). ValueError when a row's RoPE is None or the frame is unknown.
    """
    if key_frame == "post":
        return keys
    if key_frame != "pre":
        raise ValueError(f"key_frame {key_frame!r}: expected one of {KEY_FRAMES}")
    per_row = list(rotary) if isinstance(rotary, Sequence) else [rotary] * keys.shape[0]
    if len(per_row) != keys.shape[0]:
        raise ValueError(f"{len(per_row)} RoPEs for {keys.shape[0]} rows of keys")
    if any(r is None for r in per_row):
        raise ValueError("pre-RoPE keys need the layer's RoPE (rotary), and it is unknown (None)")
    rows_of: dict = {}
    for i, r in enumerate(per_row):
        rows_of.setdefault(r, []).append(i)
    if len(rows_of) == 1:
        return per_row[0].unrotate(keys, positions)
    out = torch.empty(keys.shape, dtype=torch.float32, device=keys.device)
    for r, rows in rows_of.items():
        index = torch.tensor(rows, device=keys.device)
        own = positions if positions.dim() < keys.dim() - 1 or positions.shape[0] == 1 else positions[index]
        out[index] = r.unrotate(keys[index], own)
    return out


class KVPNetwork(nn.Module):
    """H per-head KVP scorers; see the module docstring.

    forward(keys, values, positions, ages, select): keys, values [H', B, n, D] (keys in the network's
    ``key_frame``, prepared by :func:`agent_keys`); positions and ages [H', B, n] int (or broadcastable to it, e.g.
    [H', 1, n]); ``select`` [H'] says which of the H networks scores each leading row (default: all H in order).
    Returns scores [H', B, n] float32. ``index``, ``ages`` and ``key_frame``: the ablation options of the module
    docstring (defaults: the shipped agents' network).
    """

    def __init__(
        self,
        heads: int,
        head_dim: int,
        width: int = 256,
        position_dim: int = 32,
        buckets: int = 64,
        max_age: int = 8192,
        ages: str = "table",
        index: str = "table",
        key_frame: str = "post",
    ):
        super().__init__()
        if not 2 <= buckets <= max_age:
            raise ValueError(f"need 2 <= buckets <= max_age, got buckets {buckets}, max_age {max_age}")
        for name, value, choices in (
            ("ages", ages, AGE_FEATURES),
            ("index", index, INDEX_FEATURES),
            ("key_frame", key_frame, KEY_FRAMES),
        ):
            if value not in choices:
                raise ValueError(f"{name} {value!r}: expected one of {choices}")
        self.heads, self.head_dim, self.width = heads, head_dim, width
        self.position_dim, self.buckets, self.max_age = position_dim, buckets, max_age
        self.ages, self.index, self.key_frame = ages, index, key_frame
        self.key = GroupedLinear(heads, head_dim, width)
        self.key_norm = GroupedLayerNorm(heads, width)
        self.value = GroupedLinear(heads, head_dim, width)
        self.value_norm = GroupedLayerNorm(heads, width)
        if index == "table":
            self.index_table = nn.Parameter(torch.randn(heads, buckets, position_dim) * 0.02)
            self.index_norm = GroupedLayerNorm(heads, position_dim)
        if ages in ("table", "log"):
            rows = buckets if ages == "table" else log_age_rows(buckets, max_age)
            self.age_table = nn.Parameter(torch.randn(heads, rows, position_dim) * 0.02)
        elif ages == "relative":
            self.age_projection = GroupedLinear(heads, 1, position_dim)
        if ages != "none":
            self.age_norm = GroupedLayerNorm(heads, position_dim)
        self.position_inputs = (index != "none") + (ages != "none")  # position embeddings per token
        self.hidden1 = GroupedLinear(heads, 2 * width + self.position_inputs * position_dim, width)
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
            "ages": self.ages,
            "index": self.index,
            "key_frame": self.key_frame,
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
        w1_positions = w1[:, 2 * width :].split(pos, dim=1)  # index (when used), then age (when used)

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
            return torch.bmm(normed(rows(t), norm), w)  # [H', rows, W]

        head = torch.arange(heads, device=keys.device).reshape(heads, 1, 1)
        if self.index == "table":
            index_rows = table(self.index_table, self.index_norm, w1_positions[0])
            x = x + index_rows[head, positions.clamp(0, self.buckets - 1)]
        if self.ages in ("table", "log"):
            age_rows = table(self.age_table, self.age_norm, w1_positions[-1])
            x = x + age_rows[head, age_bucket(ages, self.buckets, self.max_age, self.age_table.shape[1])]
        elif self.ages == "relative":  # a number per token: its embedding is computed per token, not gathered
            fraction = relative_age(ages, positions).expand(heads, batch, n).reshape(heads, batch * n, 1)
            projection = rows(self.age_projection.weight)
            embedded = normed(
                torch.baddbmm(rows(self.age_projection.bias)[:, None], fraction, projection), self.age_norm
            )
            x = x + torch.bmm(embedded, w1_positions[-1]).reshape(heads, batch, n, width)

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

"""Future importance and the holistic (all-budget) utility of a ranking (the KVP paper, arXiv 2602.10238).

For one KV head, a trace of S tokens split at n: tokens 0..n-1 are the cache, tokens n..S-1 the future.

- ``future_importance``: imp[i] = sum over future queries t of max over the GQA group of softmax(q_t . k / sqrt(D))[i]
  (or the layer's own attention semantics, :class:`kvp_gym.attention.AttentionSpec`: scale, sliding window, soft-cap).
- A ranking sigma (sigma_1 = kept first) keeps sigma_1..sigma_b at budget b and evicts the rest; the cost at budget
  b is the evicted importance, and the holistic cost is its sum over all budgets: sum_k k * imp[sigma_k] (1-based).
- ``oracle_ranking`` sorts by importance and minimises that cost. ``holistic_reward`` = -cost / oracle cost
  (the training signal, <= -1, exactly -1 at the optimum); ``holistic_score`` = oracle cost / cost, in (0, 1].
- ``protected_tokens``: the first sinks and last recent cached tokens, which a protocol (:data:`PROTOCOLS`: the
  evaluation's ``paper`` and ``raw``) keeps at every budget and leaves out of the ranking's score;
  ``protocol_name`` names the protocol of a (sinks, recent) setting, as ``KVEvict-v0`` reports it.

Every function is batched over leading dimensions and accumulates in float32. Functions that take an ``order``
accept either a ranking (an integer tensor: token indices, most important first) or scores (a floating tensor:
higher = keep). Scores are turned into a ranking by a stable descending sort: ties keep the earlier token first.
Padding: pass ``valid`` (bool, True for real tokens); padded tokens must have zero importance and are ranked last.

Imports kvp_gym.attention and kvp_gym.kernels.attention_stats: pure functions of tensors, no files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvp_gym.attention import AttentionSpec
from kvp_gym.kernels.attention_stats import attention_stats


def future_importance(
    queries: torch.Tensor,
    keys: torch.Tensor,
    split: int | torch.Tensor,
    length: int | torch.Tensor | None = None,
    chunk: int = 256,
    attention: AttentionSpec | None = None,
) -> torch.Tensor:
    """Attention the future pays to each cached token.

    Args:
        queries: [..., G, S, D] post-RoPE queries of the G query heads of one KV head's group.
        keys: [..., S, D] post-RoPE keys.
        split: n, the first future token: an int, or a [...] tensor (one split per episode).
        length: real tokens per episode when sequences are padded to S: an int or a [...] tensor (default S).
        chunk: future queries per step of the torch path: memory O(G x chunk x S), never S x S (the Triton
            kernel, on CUDA tensors, ignores it: :func:`kvp_gym.kernels.attention_stats.attention_stats` with
            "max"). 256 (one step for 256 future queries) is about 5% faster on a CPU than 128.
        attention: the layer's attention semantics (default: full causal, scale 1/sqrt(D), no soft-cap).

    Returns:
        [..., N] float32 importance, N = max(split); entries at i >= split (per episode) are 0.
    """
    *batch, groups, num_tokens, head_dim = queries.shape
    if isinstance(split, int) and (length is None or isinstance(length, int)):
        # One split and length for every episode: only the future queries, at their positions, and no masks.
        stop = num_tokens if length is None else length
        if split >= stop:
            return torch.zeros(*batch, split, dtype=torch.float32, device=queries.device)
        importance = attention_stats(
            queries.reshape(-1, groups, num_tokens, head_dim)[:, :, split:stop],
            keys.reshape(-1, 1, num_tokens, head_dim)[:, :, :stop],
            "max",
            attention=attention,
            out_keys=split,
            chunk=chunk,
        )
        return importance.reshape(*batch, split)
    device = queries.device
    split = torch.as_tensor(split, device=device).expand(batch).reshape(-1)
    length = torch.as_tensor(num_tokens if length is None else length, device=device).expand(batch).reshape(-1)
    positions = torch.arange(num_tokens, device=device)
    future = (positions >= split[:, None]) & (positions < length[:, None])  # [B, S]: real future queries only
    n_max = int(split.max())
    importance = attention_stats(
        queries.reshape(-1, groups, num_tokens, head_dim),
        keys.reshape(-1, 1, num_tokens, head_dim),
        "max",
        query_valid=future,
        attention=attention,
        out_keys=n_max,
        chunk=chunk,
    )[:, 0]
    cached = positions[:n_max] < split[:, None]
    return (importance * cached).reshape(*batch, n_max)


def as_ranking(order: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """A ranking from ``order``: returned as is if integer, else the stable descending sort of the scores.

    With ``valid``, padded tokens are placed last (only for scores; a given ranking is trusted).
    """
    if not order.is_floating_point():
        return order
    scores = order.float()
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def oracle_ranking(importance: torch.Tensor) -> torch.Tensor:
    """The ranking that minimises the holistic cost: tokens by importance, descending (ties: earlier first)."""
    return as_ranking(importance)


def holistic_cost(importance: torch.Tensor, order: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k k * imp[sigma_k] over 1-based ranks k: the evicted importance summed over every budget. Shape [...]."""
    ranked = importance.float().gather(-1, as_ranking(order, valid))
    ranks = torch.arange(1, importance.shape[-1] + 1, dtype=torch.float32, device=importance.device)
    return (ranked * ranks).sum(-1)


def holistic_costs(
    importance: torch.Tensor, order: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cost, oracle cost, reward) of ``order``, each [...]; reward = -cost / oracle cost, <= -1, and -1 exactly
    for an optimal ranking (also when all importance is zero)."""
    cost, oracle = holistic_cost(importance, order, valid), holistic_cost(importance, oracle_ranking(importance))
    reward = torch.where(oracle > 0, -cost / oracle.clamp_min(torch.finfo(torch.float32).tiny), -1.0)
    return cost, oracle, reward


def holistic_reward(importance: torch.Tensor, order: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """-cost / oracle cost: <= -1, and -1 exactly for an optimal ranking (also when all importance is zero)."""
    return holistic_costs(importance, order, valid)[2]


def holistic_score(importance: torch.Tensor, order: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """oracle cost / cost, in (0, 1]; 1 = as good as the oracle. The figure reports quote."""
    return -1.0 / holistic_reward(importance, order, valid)


def retained_fraction(
    importance: torch.Tensor,
    order: torch.Tensor,
    budgets: Sequence[int],
    valid: torch.Tensor | None = None,
    protected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Share of the total importance kept at each budget b: [..., len(budgets)].

    Budget b keeps the top-b tokens of the ranking. With ``protected`` (bool [..., N]), those tokens are kept at
    every budget and count towards it: b keeps them plus the top (b - #protected) of the ranking of the other
    tokens; a budget smaller than the protected set is NaN. Budgets beyond the number of tokens keep everything
    (1.0). Zero total importance gives 1.0.
    """
    importance = importance.float()
    if valid is not None:
        importance = importance * valid
    if protected is not None:
        protected = protected.expand(importance.shape)
    ranked_set = valid if protected is None else (~protected if valid is None else valid & ~protected)
    kept_first = torch.zeros_like(importance[..., 0]) if protected is None else (importance * protected).sum(-1)
    count = torch.zeros_like(kept_first) if protected is None else protected.sum(-1).float()
    ranked = (importance if protected is None else importance * ~protected).gather(-1, as_ranking(order, ranked_set))
    kept = torch.cat([torch.zeros_like(ranked[..., :1]), ranked.cumsum(-1)], -1)  # kept[b] = top-b sum
    budgets = torch.tensor(list(budgets), dtype=torch.float32)
    at = (budgets - count[..., None]).clamp(0, importance.shape[-1]).long()  # [..., len(budgets)]
    total = importance.sum(-1, keepdim=True)
    fraction = (kept_first[..., None] + kept.gather(-1, at)) / total.clamp_min(torch.finfo(torch.float32).tiny)
    fraction = torch.where(total > 0, fraction, 1.0)
    return fraction.masked_fill(budgets < count[..., None], float("nan"))


def needle_attention_kept(
    importance: torch.Tensor,
    order: torch.Tensor,
    needle_spans: Sequence[Sequence[int]],
    budgets: Sequence[int],
    protected: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention paid to needle tokens, and the part of it each budget keeps (rule of :func:`retained_fraction`).

    importance [..., N]; order: a ranking or scores [..., N]; needle_spans: token spans [start, end) (int [K, 2]).
    Returns (kept [..., len(budgets)], paid [...]) in the units of ``importance``; a budget smaller than the
    protected set is NaN. Summing both over heads (and samples) before dividing pools them by what each head read:
    the needle retention of ``kvp-gym evaluate`` and ``evaluate-e2e``.
    """
    positions = torch.arange(importance.shape[-1], device=importance.device)
    spans = torch.as_tensor(needle_spans, dtype=torch.long, device=importance.device).reshape(-1, 2)
    needles = ((positions[:, None] >= spans[:, 0]) & (positions[:, None] < spans[:, 1])).any(-1)  # [N]
    on_needles = importance.float() * needles
    paid = on_needles.sum(-1)
    return retained_fraction(on_needles, order, budgets, protected=protected) * paid[..., None], paid


@dataclass(frozen=True)
class Protocol:
    """Which prompt tokens every method keeps at every budget (and so are left out of its ranking's score)."""

    name: str
    sinks: int
    recent: int
    description: str


PROTOCOLS = {
    "paper": Protocol(
        "paper", 4, 16, "4 sink + 16 recent prompt tokens kept for every method; the score measures the rest"
    ),
    "raw": Protocol("raw", 0, 0, "nothing protected; the score measures the whole ranking (the training signal)"),
}


def protocol_name(sinks: int, recent: int) -> str:
    """The name of the protocol that protects the first ``sinks`` and the last ``recent`` cached tokens: a key of
    :data:`PROTOCOLS` (``paper``: 4 and 16, ``raw``: 0 and 0), else ``custom:sinks=S;recent=R``."""
    for name, protocol in PROTOCOLS.items():
        if (protocol.sinks, protocol.recent) == (sinks, recent):
            return name
    return f"custom:sinks={sinks};recent={recent}"


def protected_tokens(split: int | torch.Tensor, num_tokens: int, sinks: int, recent: int) -> torch.Tensor:
    """Bool [..., num_tokens]: the first ``sinks`` and the last ``recent`` of the ``split`` cached tokens (split: an
    int or a [...] tensor). An evaluation protocol keeps these at every budget and ranks only the others."""
    device = split.device if isinstance(split, torch.Tensor) else None
    positions = torch.arange(num_tokens, device=device)
    split = torch.as_tensor(split, device=device)[..., None]
    return ((positions < sinks) | (positions >= split - recent)) & (positions < split)


def attention_received(
    queries: torch.Tensor,
    keys: torch.Tensor,
    mask: torch.Tensor | None = None,
    window: int | None = None,
    chunk: int = 128,
    attention: AttentionSpec | None = None,
) -> torch.Tensor:
    """Attention each cached token receives from the prefill queries (for attention-based baselines).

    Args:
        queries: [..., G, n, D] the prefill queries at the cached positions.
        keys: [..., n, D].
        mask: [..., n] bool, real tokens (padding neither attends nor is attended); default all.
        window: only the last ``window`` real queries attend (None = all).
        chunk: queries per step of the torch path: memory O(chunk x n), never n x n (the Triton kernel, on CUDA
            tensors, ignores it: :func:`kvp_gym.kernels.attention_stats.attention_stats` with "none").
        attention: the layer's attention semantics (default: full causal, scale 1/sqrt(D), no soft-cap). Tokens are
            taken to sit at positions 0..n-1 of the view (padding at the end).

    Returns:
        [..., G, n] float32: per query head, the causal softmax attention each key receives, summed over the
        attending queries.
    """
    *batch, groups, n, head_dim = queries.shape
    flat = queries.shape[:-3].numel()
    valid = torch.ones(flat, n, dtype=torch.bool, device=queries.device) if mask is None else mask.reshape(flat, n)
    first = (valid.sum(-1, keepdim=True) - window).clamp_min(0) if window is not None else 0
    attending = valid & (torch.arange(n, device=queries.device) >= first)  # [B, n]
    received = attention_stats(
        queries.reshape(-1, groups, n, head_dim),
        keys.reshape(-1, 1, n, head_dim),
        "none",
        query_valid=attending,
        key_valid=None if mask is None else valid,
        attention=attention,
        chunk=chunk,
    )
    return received.reshape(*batch, groups, n)

"""Future importance and the holistic (all-budget) utility of a ranking (the KVP paper, arXiv 2602.10238).

For one KV head, a trace of S tokens split at n: tokens 0..n-1 are the cache, tokens n..S-1 the future.

- ``future_importance``: imp[i] = sum over future queries t of max over the GQA group of softmax(q_t . k / sqrt(D))[i]
  (or the layer's own attention semantics, :class:`kvp_gym.attention.AttentionSpec`: scale, sliding window, soft-cap).
- A ranking sigma (sigma_1 = kept first) keeps sigma_1..sigma_b at budget b and evicts the rest; the cost at budget
  b is the evicted importance, and the holistic cost is its sum over all budgets: sum_k k * imp[sigma_k] (1-based).
- ``oracle_ranking`` sorts by importance and minimises that cost. ``holistic_reward`` = -cost / oracle cost
  (the training signal, <= -1, exactly -1 at the optimum); ``holistic_score`` = oracle cost / cost, in (0, 1].

Every function is batched over leading dimensions and accumulates in float32. Functions that take an ``order``
accept either a ranking (an integer tensor: token indices, most important first) or scores (a floating tensor:
higher = keep). Scores are turned into a ranking by a stable descending sort: ties keep the earlier token first.
Padding: pass ``valid`` (bool, True for real tokens); padded tokens must have zero importance and are ranked last.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvp_gym.attention import AttentionSpec


def future_importance(
    queries: torch.Tensor,
    keys: torch.Tensor,
    split: int | torch.Tensor,
    length: int | torch.Tensor | None = None,
    chunk: int = 128,
    attention: AttentionSpec | None = None,
) -> torch.Tensor:
    """Attention the future pays to each cached token.

    Args:
        queries: [..., G, S, D] post-RoPE queries of the G query heads of one KV head's group.
        keys: [..., S, D] post-RoPE keys.
        split: n, the first future token: an int, or a [...] tensor (one split per episode).
        length: real tokens per episode when sequences are padded to S: an int or a [...] tensor (default S).
        chunk: future queries processed at once; memory is O(chunk x S), never S x S. 128 keeps each chunk's
            logits small enough to stay in cache (256 is 3x slower on a 2-core CPU at S = 1280).
        attention: the layer's attention semantics (default: full causal, scale 1/sqrt(D), no soft-cap).

    Returns:
        [..., N] float32 importance, N = max(split); entries at i >= split (per episode) are 0.
    """
    *batch, groups, num_tokens, head_dim = queries.shape
    split = torch.as_tensor(split).expand(batch).reshape(-1)
    length = torch.as_tensor(num_tokens if length is None else length).expand(batch).reshape(-1)
    q = queries.reshape(-1, groups, num_tokens, head_dim)
    k = keys.reshape(-1, num_tokens, head_dim)
    n_max = int(split.max())
    importance = torch.zeros(q.shape[0], n_max, dtype=torch.float32)
    first = int(split.min())
    spec = attention or AttentionSpec.standard(head_dim)
    positions = torch.arange(num_tokens)
    for start in range(first, int(length.max()), chunk):
        stop = min(start + chunk, num_tokens)
        rows = positions[start:stop]  # query positions t in this chunk
        logits = spec.logits(q[:, :, start:stop], k[:, None, :stop].transpose(-1, -2))
        _mask_hidden(logits, spec, rows, positions[:stop])
        cols = min(stop, n_max)  # keys past the chunk's last query are masked anyway
        probs = logits.softmax(-1)[..., :cols].amax(1)  # [B, T, cols]; softmax is one fused pass
        future = (rows >= split[:, None]) & (rows < length[:, None])  # [B, T]: real future queries only
        importance[:, :cols] += (probs * future[..., None]).sum(1)
    cached = torch.arange(n_max) < split[:, None]
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
    ranks = torch.arange(1, importance.shape[-1] + 1, dtype=torch.float32)
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


def protected_tokens(split: int | torch.Tensor, num_tokens: int, sinks: int, recent: int) -> torch.Tensor:
    """Bool [..., num_tokens]: the first ``sinks`` and the last ``recent`` of the ``split`` cached tokens (split: an
    int or a [...] tensor). An evaluation protocol keeps these at every budget and ranks only the others."""
    positions = torch.arange(num_tokens)
    split = torch.as_tensor(split)[..., None]
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
        chunk: queries processed at once: memory O(chunk x n), never n x n.
        attention: the layer's attention semantics (default: full causal, scale 1/sqrt(D), no soft-cap). Tokens are
            taken to sit at positions 0..n-1 of the view (padding at the end).

    Returns:
        [..., G, n] float32: per query head, the causal softmax attention each key receives, summed over the
        attending queries.
    """
    *batch, groups, n, head_dim = queries.shape
    q = queries.reshape(-1, groups, n, head_dim)
    k = keys.reshape(-1, n, head_dim)
    valid = torch.ones(q.shape[0], n, dtype=torch.bool) if mask is None else mask.reshape(-1, n)
    length = valid.sum(-1)
    first = (length - window).clamp_min(0) if window is not None else torch.zeros_like(length)
    received = torch.zeros(q.shape[0], groups, n)
    spec = attention or AttentionSpec.standard(head_dim)
    positions = torch.arange(n)
    for start in range(int(first.min()), n, chunk):
        stop = min(start + chunk, n)
        rows = positions[start:stop]
        logits = spec.logits(q[:, :, start:stop], k[:, None, :stop].transpose(-1, -2))
        _mask_hidden(logits, spec, rows, positions[:stop])
        logits.masked_fill_(~valid[:, None, None, :stop], float("-inf"))
        attending = (rows >= first[:, None]) & valid[:, start:stop]  # [B, T]
        probs = logits.softmax(-1).nan_to_num(0.0) * attending[:, None, :, None]
        received[..., :stop] += probs.sum(-2)
    return received.reshape(*batch, groups, n)


def _mask_hidden(logits: torch.Tensor, spec: AttentionSpec, rows: torch.Tensor, columns: torch.Tensor) -> None:
    """Set to -inf, in place, the logits [..., T, S] of keys that queries ``rows`` [T] cannot see (``columns`` [S]
    = key positions 0..S-1, S = the chunk's last query + 1)."""
    if spec.sliding_window:
        logits.masked_fill_(spec.hidden(rows, columns), float("-inf"))
    else:  # keys before the chunk's first query are visible to all its queries: mask only the triangle
        start = int(rows[0])
        logits[..., start:].masked_fill_(spec.hidden(rows, columns[start:]), float("-inf"))

"""Future importance and the holistic (all-budget) utility of a ranking (paper-notes.md section 2).

For one KV head, a trace of S tokens split at n: tokens 0..n-1 are the cache, tokens n..S-1 the future.

- ``future_importance``: imp[i] = sum over future queries t of max over the GQA group of softmax(q_t . k / sqrt(D))[i].
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


def future_importance(
    queries: torch.Tensor,
    keys: torch.Tensor,
    split: int | torch.Tensor,
    length: int | torch.Tensor | None = None,
    chunk: int = 128,
) -> torch.Tensor:
    """Attention the future pays to each cached token.

    Args:
        queries: [..., G, S, D] post-RoPE queries of the G query heads of one KV head's group.
        keys: [..., S, D] post-RoPE keys.
        split: n, the first future token: an int, or a [...] tensor (one split per episode).
        length: real tokens per episode when sequences are padded to S: an int or a [...] tensor (default S).
        chunk: future queries processed at once; memory is O(chunk x S), never S x S. 128 keeps each chunk's
            logits small enough to stay in cache (256 is 3x slower on a 2-core CPU at S = 1280).

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
    scale = head_dim**-0.5
    positions = torch.arange(num_tokens)
    for start in range(first, int(length.max()), chunk):
        stop = min(start + chunk, num_tokens)
        rows = positions[start:stop]  # query positions t in this chunk
        logits = torch.matmul(q[:, :, start:stop].float() * scale, k[:, None, :stop].float().transpose(-1, -2))
        # Causal mask: keys before the chunk's first query are visible to all its queries; mask only the triangle.
        logits[..., start:stop].masked_fill_(positions[start:stop] > rows[:, None], float("-inf"))
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
) -> torch.Tensor:
    """Share of the total importance kept at each budget b (the top-b tokens of the ranking): [..., len(budgets)].

    Budgets beyond the number of tokens keep everything (1.0). Zero total importance gives 1.0.
    """
    ranked = importance.float().gather(-1, as_ranking(order, valid))
    kept = torch.cat([torch.zeros_like(ranked[..., :1]), ranked.cumsum(-1)], -1)  # kept[b] = top-b sum
    at = torch.tensor([min(b, importance.shape[-1]) for b in budgets])
    total = kept[..., -1:]
    return torch.where(total > 0, kept[..., at] / total.clamp_min(torch.finfo(torch.float32).tiny), 1.0)


def attention_received(
    queries: torch.Tensor,
    keys: torch.Tensor,
    mask: torch.Tensor | None = None,
    window: int | None = None,
    chunk: int = 128,
) -> torch.Tensor:
    """Attention each cached token receives from the prefill queries (for attention-based baselines).

    Args:
        queries: [..., G, n, D] the prefill queries at the cached positions.
        keys: [..., n, D].
        mask: [..., n] bool, real tokens (padding neither attends nor is attended); default all.
        window: only the last ``window`` real queries attend (None = all).
        chunk: queries processed at once: memory O(chunk x n), never n x n.

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
    positions = torch.arange(n)
    for start in range(int(first.min()), n, chunk):
        stop = min(start + chunk, n)
        rows = positions[start:stop]
        logits = torch.matmul(q[:, :, start:stop].float() * head_dim**-0.5, k[:, None, :stop].float().transpose(-1, -2))
        logits[..., start:stop].masked_fill_(positions[start:stop] > rows[:, None], float("-inf"))
        logits.masked_fill_(~valid[:, None, None, :stop], float("-inf"))
        attending = (rows >= first[:, None]) & valid[:, start:stop]  # [B, T]
        probs = logits.softmax(-1).nan_to_num(0.0) * attending[:, None, :, None]
        received[..., :stop] += probs.sum(-2)
    return received.reshape(*batch, groups, n)

"""Triton implementation of :func:`kvp_gym.kernels.attention_stats.attention_stats` (imported on first use).

Two passes, flash-attention style: the attention matrix is never in memory.

1. ``_row_lse``: per query row, the log-sum-exp of its visible logits (online softmax over key blocks), [B, Hq, T].
2. ``_column_sums``: per block of keys, a loop over the query blocks that can see it: recompute the logits, turn
   them into probabilities with the row's log-sum-exp, reduce them over the output head's query heads (max, mean
   or none), zero the queries that do not count, and sum over queries.

Both passes compute q . k once per (query, key) pair, as the forward pass of attention computes q . k and p . v,
so its cost is close to one attention forward. Logits are kept in base 2 (exp2 is the fast instruction).

Imports kvp_gym.attention and triton; loaded only through kvp_gym.kernels.triton_module.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvp_gym.attention import AttentionSpec

LOG2E = tl.constexpr(1.4426950408889634)
_REDUCE_CODES = {"max": 0, "mean": 1, "none": 2}


@triton.jit
def _logits2(q, k_t, scale, softcap, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """softcap(scale * q . k) in base 2 (times log2 e): q [BT, BD], k_t [BD, BS] -> float32 [BT, BS]."""
    s = tl.dot(q, k_t, input_precision=PRECISION) * scale
    if SOFTCAP:
        s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # softcap * tanh(s / softcap)
    return s * LOG2E


@triton.jit
def _visible(q_pos, k_pos, num_keys, window, key_valid_row, WINDOW: tl.constexpr, KEY_VALID: tl.constexpr):
    """Bool [BT, BS]: query positions q_pos [BT] see key positions k_pos [BS]."""
    distance = q_pos[:, None] - k_pos[None, :]
    visible = (distance >= 0) & (k_pos[None, :] < num_keys)
    if WINDOW:
        visible = visible & (distance < window)
    if KEY_VALID:
        valid = tl.load(key_valid_row + k_pos, mask=k_pos < num_keys, other=0)
        visible = visible & (valid[None, :] != 0)
    return visible


@triton.jit
def _row_lse(
    Q, K, KEY_VALID, LO, HI, LSE,
    sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb,
    q_heads, group, num_queries, num_keys, head_dim, offset, scale, softcap, window,
    SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, HAS_KEY_VALID: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """LSE[b, h, t] = log2 sum over visible keys of 2^logits2 (0 for a row that sees nothing or does not count)."""
    # Heads on axis 0 (axes 1 and 2 hold at most 65535); int64, so that b * stride cannot overflow past 2^31 elements.
    bh, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    b, h = bh // q_heads, bh % q_heads
    t = block * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(
        Q + b * sqb + h * sqh + t[:, None] * sqt + d[None, :] * sqd,
        mask=(t[:, None] < num_queries) & (d[None, :] < head_dim),
        other=0.0,
    )
    key_base = K + b * skb + (h // group) * skh
    key_valid_row = KEY_VALID + b * svb
    first = block * BLOCK_T
    key_lo = 0
    if WINDOW:
        key_lo = tl.maximum(offset + first - window + 1, 0) // BLOCK_S * BLOCK_S
    key_hi = tl.minimum(offset + first + BLOCK_T, num_keys)  # causal: no key after the block's last query
    counts = (first < tl.load(HI + b)) & (first + BLOCK_T > tl.load(LO + b))
    key_hi = tl.where(counts, key_hi, key_lo)  # a block without a counted query computes nothing
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_T], tl.float32)
    for start in range(key_lo, key_hi, BLOCK_S):
        s_idx = start + tl.arange(0, BLOCK_S)
        k_t = tl.load(
            key_base + s_idx[None, :] * sks + d[:, None] * skd,
            mask=(s_idx[None, :] < num_keys) & (d[:, None] < head_dim),
            other=0.0,
        )
        s = _logits2(q, k_t, scale, softcap, SOFTCAP, PRECISION)
        s = tl.where(
            _visible(offset + t, s_idx, num_keys, window, key_valid_row, WINDOW, HAS_KEY_VALID), s, -float("inf")
        )
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # a row with nothing visible yet: avoid inf - inf
        total = total * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m = m_new
    lse = tl.where(total > 0, m + tl.log2(tl.where(total > 0, total, 1.0)), 0.0)
    tl.store(LSE + bh * num_queries + t, lse, mask=t < num_queries)


@triton.jit
def _column_sums(
    Q, K, KEY_VALID, QUERY_VALID, LO, HI, LSE, OUT,
    sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, sub,
    q_heads, out_heads, group, per_output, num_queries, num_keys, out_keys, head_dim, offset, scale, softcap,
    window,
    REDUCE: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
    HAS_QUERY_VALID: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """OUT[b, o, i] = sum over counted queries t of the reduction over query heads o * per_output + r of p."""
    bo, block = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64: as in _row_lse
    b, o = bo // out_heads, bo % out_heads
    first_head = o * per_output
    s_idx = block * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    k_t = tl.load(
        K + b * skb + (first_head // group) * skh + s_idx[None, :] * sks + d[:, None] * skd,
        mask=(s_idx[None, :] < num_keys) & (d[:, None] < head_dim),
        other=0.0,
    )  # [BD, BS]: loaded once, used against every query block
    key_valid_row = KEY_VALID + b * svb
    lo, hi = tl.load(LO + b), tl.load(HI + b)
    first_key = block * BLOCK_S
    t_lo = tl.maximum(lo, first_key - offset) // BLOCK_T * BLOCK_T  # causal: earlier queries see none of the block
    t_hi = hi
    if WINDOW:  # later queries have left the window of every key of the block
        t_hi = tl.minimum(hi, first_key + BLOCK_S - 1 + window - offset)
    acc = tl.zeros([BLOCK_S], tl.float32)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        counted = (t >= lo) & (t < hi)
        if HAS_QUERY_VALID:
            counted = counted & (tl.load(QUERY_VALID + b * sub + t, mask=t < num_queries, other=0) != 0)
        visible = _visible(offset + t, s_idx, num_keys, window, key_valid_row, WINDOW, HAS_KEY_VALID)
        reduced = tl.zeros([BLOCK_T, BLOCK_S], tl.float32)  # probabilities are >= 0: 0 starts a max as well
        for r in range(per_output):
            h = first_head + r
            q = tl.load(
                Q + b * sqb + h * sqh + t[:, None] * sqt + d[None, :] * sqd,
                mask=(t[:, None] < num_queries) & (d[None, :] < head_dim),
                other=0.0,
            )
            lse = tl.load(LSE + (b * q_heads + h) * num_queries + t, mask=t < num_queries, other=0.0)
            s = _logits2(q, k_t, scale, softcap, SOFTCAP, PRECISION)
            p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
            if REDUCE == 0:
                reduced = tl.maximum(reduced, p, propagate_nan=tl.PropagateNan.ALL)  # NaN inputs must show
            else:
                reduced += p
        if REDUCE == 1:
            reduced = reduced / per_output
        acc += tl.sum(tl.where(counted[:, None], reduced, 0.0), 0)
    tl.store(OUT + b * out_heads * out_keys + o * out_keys + s_idx, acc, mask=s_idx < out_keys)


def attention_stats_triton(
    queries: torch.Tensor,
    keys: torch.Tensor,
    reduce: str,
    query_valid: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    attention: AttentionSpec | None = None,
    query_offset: int | None = None,
    out_keys: int | None = None,
    chunk: int = 128,
) -> torch.Tensor:
    """:func:`kvp_gym.kernels.attention_stats.attention_stats` in Triton (arguments unchecked; ``chunk`` unused)."""
    batch, q_heads, num_queries, head_dim = queries.shape
    kv_heads, num_keys = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    offset = num_keys - num_queries if query_offset is None else query_offset
    width = num_keys if out_keys is None else out_keys
    spec = attention or AttentionSpec.standard(head_dim)
    device = queries.device
    out_heads, per_output = (q_heads, 1) if reduce == "none" else (kv_heads, group)
    out = torch.empty(batch, out_heads, width, dtype=torch.float32, device=device)
    if out.numel() == 0 or num_queries == 0:
        return out.zero_()
    # The counted queries of each batch row lie in [lo, hi): blocks outside it are skipped.
    if query_valid is None:
        lo = torch.zeros(batch, dtype=torch.int32, device=device)
        hi = torch.full((batch,), num_queries, dtype=torch.int32, device=device)
    else:
        index = torch.arange(num_queries, device=device)
        lo = torch.where(query_valid, index, num_queries).amin(-1).to(torch.int32)
        hi = torch.where(query_valid, index + 1, 0).amax(-1).to(torch.int32)
    lse = torch.empty(batch, q_heads, num_queries, dtype=torch.float32, device=device)
    key_mask = _int8(key_valid, keys)
    query_mask = _int8(query_valid, keys)
    # Small blocks in the interpreter, so that tests on small shapes cross block edges; 64 on a GPU.
    block = 32 if os.environ.get("TRITON_INTERPRET") == "1" else 64
    shared = dict(
        SOFTCAP=bool(spec.softcap),
        WINDOW=bool(spec.sliding_window),
        HAS_KEY_VALID=key_valid is not None,
        PRECISION="ieee" if queries.dtype == torch.float32 else "tf32",  # fp32 inputs: exact products, no TF32
        BLOCK_T=block,
        BLOCK_S=block,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )
    strides = (*queries.stride(), *keys.stride(), key_mask.stride(0))
    scalars = (num_keys, head_dim, offset, spec.scale, spec.softcap or 1.0, spec.sliding_window)
    _row_lse[(batch * q_heads, triton.cdiv(num_queries, block))](
        queries, keys, key_mask, lo, hi, lse, *strides, q_heads, group, num_queries, *scalars, **shared
    )
    _column_sums[(batch * out_heads, triton.cdiv(width, block))](
        queries, keys, key_mask, query_mask, lo, hi, lse, out, *strides, query_mask.stride(0),
        q_heads, out_heads, group, per_output, num_queries, num_keys, width, *scalars[1:],
        REDUCE=_REDUCE_CODES[reduce], HAS_QUERY_VALID=query_valid is not None, **shared,
    )  # fmt: skip
    return out


def _int8(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A bool mask as int8 (what the kernels load), or a 1x1 placeholder when there is none."""
    if mask is None:
        return torch.zeros(1, 1, dtype=torch.int8, device=like.device)
    return mask.contiguous().view(torch.int8)

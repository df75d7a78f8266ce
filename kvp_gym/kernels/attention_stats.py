"""Attention statistics: the attention each key receives, summed over the queries, per KV head or query head.

For queries q [B, Hq, T, D] and keys k [B, Hkv, S, D] (query head h reads KV head h // G, G = Hq / Hkv), with
p[b, h, t, i] the softmax over the keys query t sees of softcap(scale * q . k) (:class:`AttentionSpec`):

    out[b, o, i] = sum over counted queries t of  R_{h in group o} p[b, h, t, i]

R is ``reduce``: "max" (the future importance of :mod:`kvp_gym.utility`: the max over the GQA group of each
query's probability, then the sum over queries; the order matters), "mean" (the mean over the group; with a sum
the order does not matter) or "none" (one output per query head, o = h). Keys sit at positions 0..S-1 and query t
at ``query_offset + t``; query t sees key i when 0 <= position(t) - i (< the sliding window, if any) and
``key_valid[b, i]``; a query that sees no key contributes nothing. Only queries with ``query_valid[b, t]`` count.

:func:`attention_stats` checks its arguments and dispatches (:mod:`kvp_gym.kernels`): the Triton kernel
(``attention_stats_triton``: flash-attention style, the attention matrix never in memory) on CUDA tensors, else
:func:`attention_stats_torch` (exact float32, ``chunk`` queries at a time: memory O(chunk x S)).
"""

from __future__ import annotations

from typing import Literal

import torch

from kvp_gym.attention import AttentionSpec
from kvp_gym.kernels import choose, triton_module

Reduce = Literal["max", "mean", "none"]
REDUCTIONS: tuple[Reduce, ...] = ("max", "mean", "none")


def attention_stats(
    queries: torch.Tensor,
    keys: torch.Tensor,
    reduce: Reduce,
    query_valid: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    attention: AttentionSpec | None = None,
    query_offset: int | None = None,
    out_keys: int | None = None,
    chunk: int = 128,
) -> torch.Tensor:
    """Attention received per key, summed over the counted queries and reduced over each GQA group.

    Args:
        queries: [B, Hq, T, D] post-RoPE queries, float16, bfloat16 or float32.
        keys: [B, Hkv, S, D] post-RoPE keys, the dtype of ``queries``; Hq must be a multiple of Hkv.
        reduce: "max", "mean" (over each KV head's G query heads) or "none" (per query head); see the module.
        query_valid: [B, T] bool, the queries that count (default all); the others add nothing.
        key_valid: [B, S] bool, the keys that can be attended (default all): padding.
        attention: the layer's attention semantics (default: causal, scale 1/sqrt(D), no soft-cap, no window).
        query_offset: the position of query 0 (keys sit at 0..S-1); 0 <= query_offset <= S - T, so every query's
            own key is present. Default S - T: the queries are the newest T tokens.
        out_keys: return the first ``out_keys`` keys only (default S); every visible key still enters the softmax.
        chunk: queries per step of the torch path (its memory is O(chunk x S)); the Triton path ignores it.

    Returns:
        [B, Hkv, out_keys] float32 (``reduce`` "max" or "mean") or [B, Hq, out_keys] ("none"): probabilities summed
        over queries (units: queries' worth of attention; a key seen with probability 1 by 3 queries gets 3).

    Raises:
        ValueError: a bad shape, dtype, device or argument (the message names it), or non-finite queries or keys.
    """
    _check(queries, keys, reduce, query_valid, key_valid, query_offset, out_keys, chunk)
    arguments = (queries, keys, reduce, query_valid, key_valid, attention, query_offset, out_keys, chunk)
    if choose(queries.device) == "triton":
        out = triton_module("attention_stats").attention_stats_triton(*arguments)
    else:
        out = attention_stats_torch(*arguments)
    if torch.isnan(out).any():
        raise ValueError("queries or keys contain NaN or infinity: the attention statistics came out NaN")
    return out


def attention_stats_torch(
    queries: torch.Tensor,
    keys: torch.Tensor,
    reduce: Reduce,
    query_valid: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    attention: AttentionSpec | None = None,
    query_offset: int | None = None,
    out_keys: int | None = None,
    chunk: int = 128,
) -> torch.Tensor:
    """:func:`attention_stats` in torch, float32, on any device (arguments unchecked)."""
    batch, q_heads, num_queries, head_dim = queries.shape
    kv_heads, num_keys = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    offset = num_keys - num_queries if query_offset is None else query_offset
    width = num_keys if out_keys is None else out_keys
    spec = attention or AttentionSpec.standard(head_dim)
    device = queries.device
    out = torch.zeros(batch, q_heads if reduce == "none" else kv_heads, width, dtype=torch.float32, device=device)
    counted = torch.ones(batch, num_queries, dtype=torch.bool, device=device) if query_valid is None else query_valid
    rows = counted.any(0).nonzero()[:, 0].tolist()
    if not rows or width == 0:
        return out
    q = queries.reshape(batch, kv_heads, group, num_queries, head_dim)
    keys_t = keys.transpose(-1, -2)  # [B, Hkv, D, S]
    first, last = rows[0], rows[-1] + 1
    # One logits buffer for every chunk, written in place: fresh multi-megabyte tensors per chunk cost more in
    # page faults than the softmax itself on a CPU.
    rows_per_chunk = min(chunk, last - first)
    span = offset + last if not spec.sliding_window else min(offset + last, chunk + spec.sliding_window - 1)
    workspace = torch.empty(batch * q_heads * rows_per_chunk * span, dtype=torch.float32, device=device)
    # Without a window, the keys up to a chunk's first query are visible to all its queries: only the triangle
    # after them is masked, the same for every chunk. Masks are added as -inf biases (several times faster than a
    # broadcast masked_fill_ on a CPU).
    triangle = torch.full((rows_per_chunk, rows_per_chunk - 1), float("-inf"), device=device).triu_()
    positions = torch.arange(max(num_queries + offset, num_keys), device=device)
    weights = counted.to(torch.float32)[:, None, None, :]  # [B, 1, 1, T]: the sum over counted queries, a matmul
    for start in range(first, last, chunk):
        stop = min(start + chunk, last)
        # The keys these queries can see: up to the last one's position, and back to the window of the first.
        key_start = max(0, offset + start - spec.sliding_window + 1) if spec.sliding_window else 0
        key_stop = offset + stop
        if key_start >= width:
            continue
        count = stop - start
        logits = _logits(workspace, spec, q[..., start:stop, :], keys_t[..., key_start:key_stop])
        if spec.sliding_window:
            logits.add_(_minus_inf_where(spec.hidden(positions[start:stop] + offset, positions[key_start:key_stop])))
        else:
            logits[..., offset + start + 1 :].add_(triangle[:count, : count - 1])
        if key_valid is not None:
            logits.add_(_minus_inf_where(~key_valid[:, None, None, None, key_start:key_stop]))
        probs = torch.softmax(logits, -1, out=logits)  # in place: row by row, each row read before it is written
        if key_valid is not None:  # a query that sees no valid key: 0/0 = NaN, made 0 (it receives nothing)
            probs.nan_to_num_(0.0)
        probs = probs[..., : width - key_start]  # keys past the output receive nothing we return
        if reduce == "max":
            reduced = probs.amax(2)  # [B, Hkv, count, keys]
        elif reduce == "mean":
            reduced = probs.mean(2)
        else:
            reduced = probs.reshape(batch, q_heads, count, -1)
        out[..., key_start : key_start + reduced.shape[-1]] += torch.matmul(weights[..., start:stop], reduced)[
            ..., 0, :
        ]
    return out


def _logits(workspace: torch.Tensor, spec: AttentionSpec, queries: torch.Tensor, keys_t: torch.Tensor) -> torch.Tensor:
    """:meth:`AttentionSpec.logits` of queries [B, Hkv, G, T, D] and keys_t [B, Hkv, D, K], written into the front
    of ``workspace``: float32 [B, Hkv, G, T, K]. The G heads of a group are folded into the rows of one matmul per
    KV head (one large GEMM, not G small ones)."""
    batch, kv_heads, group, count, head_dim = queries.shape
    logits = workspace[: batch * kv_heads * group * count * keys_t.shape[-1]].view(batch, kv_heads, group * count, -1)
    folded = queries.reshape(batch, kv_heads, group * count, head_dim).float() * spec.scale
    torch.matmul(folded, keys_t.float(), out=logits)
    if spec.softcap:
        logits.div_(spec.softcap).tanh_().mul_(spec.softcap)
    return logits.view(batch, kv_heads, group, count, -1)


def _minus_inf_where(hidden: torch.Tensor) -> torch.Tensor:
    """An additive mask: -inf where ``hidden``, else 0."""
    return torch.zeros(hidden.shape, device=hidden.device).masked_fill_(hidden, float("-inf"))


def _check(
    queries: torch.Tensor,
    keys: torch.Tensor,
    reduce: str,
    query_valid: torch.Tensor | None,
    key_valid: torch.Tensor | None,
    query_offset: int | None,
    out_keys: int | None,
    chunk: int,
) -> None:
    """ValueError naming the first argument that is not what :func:`attention_stats` expects."""
    for name, tensor in (("queries", queries), ("keys", keys)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [B, H, T or S, D], got {_describe(tensor)}")
        if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name}: expected float16, bfloat16 or float32, got {tensor.dtype}")
    (batch, q_heads, num_queries, head_dim), (kv_batch, kv_heads, num_keys, kv_dim) = queries.shape, keys.shape
    if (kv_batch, kv_dim) != (batch, head_dim) or kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(
            f"keys: expected [B={batch}, Hkv, S, D={head_dim}] with Hkv dividing Hq={q_heads}, got {list(keys.shape)}"
        )
    if keys.dtype != queries.dtype or keys.device != queries.device:
        raise ValueError(f"keys: expected {queries.dtype} on {queries.device}, got {keys.dtype} on {keys.device}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce: expected one of {REDUCTIONS}, got {reduce!r}")
    for name, mask, shape in (
        ("query_valid", query_valid, (batch, num_queries)),
        ("key_valid", key_valid, (batch, num_keys)),
    ):
        if mask is not None and (
            not isinstance(mask, torch.Tensor)
            or mask.dtype != torch.bool
            or tuple(mask.shape) != shape
            or mask.device != queries.device
        ):
            raise ValueError(f"{name}: expected a bool tensor {list(shape)} on {queries.device}, got {_describe(mask)}")
    offset = num_keys - num_queries if query_offset is None else query_offset
    if not 0 <= offset <= num_keys - num_queries:
        raise ValueError(
            f"query_offset: expected 0 <= query_offset <= S - T = {num_keys - num_queries} (every query's own key "
            f"present), got {offset}"
        )
    if out_keys is not None and not 0 <= out_keys <= num_keys:
        raise ValueError(f"out_keys: expected 0 <= out_keys <= S = {num_keys}, got {out_keys}")
    if chunk < 1:
        raise ValueError(f"chunk: expected a positive number of queries, got {chunk}")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor {list(value.shape)} on {value.device}"
    return type(value).__name__

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

Imports kvp_gym.attention and the dispatch in kvp_gym.kernels; its Triton module only when a call chooses Triton.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Literal

import torch

from kvp_gym.attention import AttentionSpec
from kvp_gym.kernels import choose, describe, triton_module

Reduce = Literal["max", "mean", "none"]
REDUCTIONS: tuple[Reduce, ...] = ("max", "mean", "none")
_LOG2E = math.log2(math.e)
# The smallest row sum of exponentials the torch path accepts without subtracting the row maximum.
_SMALLEST_SUM = 2.0**-64


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
        out, finite = triton_module("attention_stats").attention_stats_triton(*arguments), False
    else:
        out, finite = attention_stats_torch_with_path(*arguments)
    # The NaN check reads the output back to the host: free on the CPU, a wait for the device elsewhere (the evicting
    # cache scores on the model's device without host round trips), where NaN inputs give NaN statistics instead.
    if not finite and out.device.type == "cpu" and torch.isnan(out).any():
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
    return attention_stats_torch_with_path(
        queries, keys, reduce, query_valid, key_valid, attention, query_offset, out_keys, chunk
    )[0]


def attention_stats_torch_with_path(
    queries: torch.Tensor,
    keys: torch.Tensor,
    reduce: Reduce,
    query_valid: torch.Tensor | None,
    key_valid: torch.Tensor | None,
    attention: AttentionSpec | None,
    query_offset: int | None,
    out_keys: int | None,
    chunk: int,
) -> tuple[torch.Tensor, bool]:
    """:func:`attention_stats_torch`, and whether every chunk took the fast path (its output is then finite).

    Per chunk of queries: one matmul of the logits in log2 units (the scale and log2(e) folded into the matmul's
    factor), keys along the rows and the group's (head, query) pairs along the columns (this layout needs no
    transposed copy of the keys, and the sums over keys and the max over heads run on whole rows); the masks added
    as -inf biases; ``exp2`` in place; the sums over keys; then the reduction (for "mean" and "none", 1 / sum is
    folded into the weights of the matmul that sums over queries). The row maximum is not subtracted: that is exact
    as long as every query's sum of exponentials is finite (no term overflowed) and at least 2^-64 (its largest
    term is then a normal float, and the terms that underflowed are below 2^-62 of it; float32 logits carry the
    same rounding either way). A chunk that fails this check is computed again with the maximum subtracted (the
    stable path: the usual softmax).
    """
    batch, q_heads, num_queries, head_dim = queries.shape
    kv_heads, num_keys = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    offset = num_keys - num_queries if query_offset is None else query_offset
    width = num_keys if out_keys is None else out_keys
    spec = attention or AttentionSpec.standard(head_dim)
    device = queries.device
    outputs = q_heads if reduce == "none" else kv_heads
    # Two shortcuts read values back to the host: trimming the queries to the counted ones and the fast path's check
    # below. On the CPU they cost nothing; on an accelerator each would wait for the device, so there every query
    # is computed (uncounted ones weigh 0) and the maximum is always subtracted.
    on_host = device.type == "cpu"
    first, last, weights = 0, num_queries, None
    if query_valid is not None:
        if on_host:
            rows = query_valid.any(0).nonzero()
            first, last = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
        weights = query_valid[:, None, None, first:last, None].to(torch.float32)  # [B, 1, 1, T', 1]
    if first == last or width == 0:
        return torch.zeros(batch, outputs, width, dtype=torch.float32, device=device), True
    q = queries if (first, last) == (0, num_queries) else queries[:, :, first:last]
    q = q.to(torch.float32).view(batch, kv_heads, group, last - first, head_dim)
    keys = keys.to(torch.float32)
    rows_per_chunk = min(chunk, last - first)
    span = offset + last if not spec.sliding_window else min(offset + last, chunk + spec.sliding_window - 1)
    workspace = _workspace(batch * q_heads * rows_per_chunk * span, device)
    out = None  # the first chunk's result when it covers all output keys, else zeros that chunks add to
    fast = on_host
    for start in range(first, last, chunk):
        stop = min(start + chunk, last)
        # The keys these queries can see: up to the last one's position, and back to the window of the first.
        key_start = max(0, offset + start - spec.sliding_window + 1) if spec.sliding_window else 0
        if key_start >= width:
            continue
        key_stop, count = offset + stop, stop - start
        for stable in (False, True) if on_host else (True,):
            logits = _logits(workspace, spec, q[..., start - first : stop - first, :], keys[:, :, key_start:key_stop])
            # Masks are added as -inf biases (several times faster than a broadcast masked_fill_ on a CPU).
            if spec.sliding_window:
                positions = torch.arange(max(num_queries + offset, num_keys), device=device)
                hidden = spec.hidden(positions[start:stop] + offset, positions[key_start:key_stop])
                logits.add_(_minus_inf_where(hidden.T[:, None, :]))
            elif count > 1:  # the keys up to the first query's are visible to all: only a triangle after them
                logits[:, :, offset + start + 1 :].add_(_triangle(count, device))
            if key_valid is not None:
                logits.add_(_minus_inf_where(~key_valid[:, None, key_start:key_stop, None, None]))
            if stable:  # the maximum subtracted; a query that sees no key (all -inf) stays -inf
                logits.sub_(logits.amax(2, keepdim=True).clamp_(min=torch.finfo(torch.float32).min))
            exps = logits.exp2_()  # [B, Hkv, keys, G, count]
            sums = exps.sum(2, keepdim=True)  # [B, Hkv, 1, G, count]
            if stable:
                break
            low, high = torch.aminmax(sums)
            if low.item() >= _SMALLEST_SUM and high.item() < math.inf:
                break
            fast = False
        inverse = sums.reciprocal_()
        if stable and key_valid is not None:  # a query that sees no valid key receives nothing (not 0/0 = NaN)
            inverse.masked_fill_(inverse == math.inf, 0.0)  # its sum is 0
        exps = exps[:, :, : width - key_start]  # keys past the output receive nothing we return
        chunk_weights = None if weights is None else weights[..., start - first : stop - first, :]  # [B,1,1,n,1]
        if reduce == "max":  # the max over the group needs the probabilities themselves
            heads = exps.mul_(inverse).unbind(3)  # probabilities, head by head: [B, Hkv, keys, count] each
            # Their max, in place in the first head's slots (a fresh tensor costs page faults; amax is slower).
            reduced = heads[0]
            for head in heads[1:]:
                torch.maximum(reduced, head, out=reduced)
            received = reduced.sum(-1) if chunk_weights is None else torch.matmul(reduced, chunk_weights[:, 0])[..., 0]
        else:  # sums over queries (and heads): 1 / sum folded into the weights of matmuls
            if reduce == "mean":
                inverse.mul_(1.0 / group)
            if chunk_weights is not None:
                inverse.mul_(chunk_weights.transpose(-1, -2))
            if reduce == "mean":
                received = torch.matmul(exps.flatten(3), inverse.view(batch, kv_heads, -1, 1))[..., 0]
            else:  # one matmul per query head of the group: [B, Hkv, keys, count] x [B, Hkv, count, 1]
                received = torch.stack(
                    [torch.matmul(exps[:, :, :, g], inverse[:, :, 0, g, :, None])[..., 0] for g in range(group)], 2
                ).view(batch, outputs, -1)
        if out is None and key_start == 0 and received.shape[-1] == width:
            out = received
        else:
            if out is None:
                out = torch.zeros(batch, outputs, width, dtype=torch.float32, device=device)
            out[..., key_start : key_start + received.shape[-1]] += received
    if out is None:  # every chunk's keys lay past the output keys
        out = torch.zeros(batch, outputs, width, dtype=torch.float32, device=device)
    return out, fast


def _logits(workspace: torch.Tensor, spec: AttentionSpec, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Logits in log2 units, log2(e) * softcap(scale * q . k), of float32 queries [B, Hkv, G, T, D] and keys
    [B, Hkv, K, D], written into the front of ``workspace``: float32 [B, Hkv, K, G, T] (keys along the rows). One
    matmul per KV head for its whole group, the scale (and log2(e), without a soft-cap) its factor: no pass over
    the queries or the logits."""
    batch, kv_heads, group, count, head_dim = queries.shape
    rows = batch * kv_heads
    logits = workspace[: rows * keys.shape[2] * group * count].view(rows, -1, group * count)
    columns = queries.reshape(rows, group * count, head_dim).transpose(-1, -2)
    factor = spec.scale if spec.softcap else spec.scale * _LOG2E
    torch.baddbmm(logits, keys.flatten(0, 1), columns, beta=0.0, alpha=factor, out=logits)  # beta 0: ignores logits
    if spec.softcap:
        logits.div_(spec.softcap).tanh_().mul_(spec.softcap * _LOG2E)
    return logits.view(batch, kv_heads, -1, group, count)


# Buffers reused across calls, per thread: a fresh multi-megabyte tensor costs more in page faults than the
# exponentials it holds on a CPU. Workspaces up to _KEPT_FLOATS are kept.
_KEPT_FLOATS = 1 << 23
_reused = threading.local()


def _workspace(numel: int, device: torch.device) -> torch.Tensor:
    """A float32 buffer of at least ``numel`` elements on ``device``, reused by the calls of this thread: one for
    calls under ``torch.inference_mode`` and one outside (a tensor made in inference mode cannot be written to
    outside it)."""
    kept = _reused.__dict__.setdefault("workspaces", {})
    key = (device, torch.is_inference_mode_enabled())
    buffer = kept.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=torch.float32, device=device)
        if numel <= _KEPT_FLOATS:
            kept[key] = buffer
    return buffer


@functools.lru_cache(maxsize=16)
def _triangle(count: int, device: torch.device) -> torch.Tensor:
    """[count - 1, 1, count]: -inf where key j + 1 of a chunk's ``count`` (counted from its first query's key) is
    hidden from query t (t <= j), else 0; the 1 broadcasts over the heads of a group."""
    return torch.full((count - 1, count), float("-inf"), device=device).tril_()[:, None, :]


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
            raise ValueError(f"{name}: expected a 4-D tensor [B, H, T or S, D], got {describe(tensor)}")
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
            raise ValueError(f"{name}: expected a bool tensor {list(shape)} on {queries.device}, got {describe(mask)}")
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

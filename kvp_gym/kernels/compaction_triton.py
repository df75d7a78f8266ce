"""Triton implementation of :func:`kvp_gym.kernels.compaction.gather_rows` (imported on first use).

One program copies ``BLOCK_R`` kept rows of one head of both keys and values: a pure copy, bound by memory
bandwidth (every byte is read once and written once).

Imports only triton and torch; loaded only through kvp_gym.kernels.triton_module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_rows(SRC, DST, ROW_INDEX, offsets, b, h, s_b, s_h, s_l, s_d, dim, BLOCK_D: tl.constexpr):
    """DST[b, h, offsets] = SRC[b, h, ROW_INDEX] for BLOCK_D columns at a time (DST contiguous [B, H, kept, dim])."""
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = (offsets[:, None] >= 0) & (d[None, :] < dim)
        x = tl.load(SRC + b * s_b + h * s_h + ROW_INDEX[:, None] * s_l + d[None, :] * s_d, mask=mask)
        tl.store(DST + offsets[:, None] * dim + d[None, :], x, mask=mask)


@triton.jit
def _gather_rows(
    K, V, ROWS, K_OUT, V_OUT,
    k_b, k_h, k_l, k_d, v_b, v_h, v_l, v_d, r_b, r_h, r_j,
    heads, kept, k_dim, v_dim,
    BLOCK_R: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    # Heads on axis 0 (axes 1 and 2 hold at most 65535); int64, so that b * stride cannot overflow past 2^31 elements.
    bh, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    b, h = bh // heads, bh % heads
    j = block * BLOCK_R + tl.arange(0, BLOCK_R)
    inside = j < kept
    index = tl.load(ROWS + b * r_b + h * r_h + j * r_j, mask=inside, other=0).to(tl.int64)
    offsets = tl.where(inside, bh * kept + j, -1)  # output row, -1 past the end (masked)
    _copy_rows(K, K_OUT, index, offsets, b, h, k_b, k_h, k_l, k_d, k_dim, BLOCK_DK)
    _copy_rows(V, V_OUT, index, offsets, b, h, v_b, v_h, v_l, v_d, v_dim, BLOCK_DV)


def gather_rows_triton(
    keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kvp_gym.kernels.compaction.gather_rows` in Triton (arguments unchecked)."""
    batch, heads, _, k_dim = keys.shape
    kept, v_dim = rows.shape[-1], values.shape[-1]
    k_out = torch.empty(batch, heads, kept, k_dim, dtype=keys.dtype, device=keys.device)
    v_out = torch.empty(batch, heads, kept, v_dim, dtype=values.dtype, device=values.device)
    if k_out.numel() == 0 and v_out.numel() == 0:
        return k_out, v_out
    block_rows = 32
    _gather_rows[(batch * heads, triton.cdiv(kept, block_rows))](
        keys, values, rows, k_out, v_out, *keys.stride(), *values.stride(), *rows.stride(), heads, kept, k_dim, v_dim,
        BLOCK_R=block_rows, BLOCK_DK=min(128, triton.next_power_of_2(k_dim)),
        BLOCK_DV=min(128, triton.next_power_of_2(v_dim)),
    )  # fmt: skip
    return k_out, v_out

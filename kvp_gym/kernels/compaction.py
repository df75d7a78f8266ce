"""Compaction: gather the kept rows of every head's keys and values into new contiguous tensors.

``gather_rows(keys, values, rows)``: keys [B, H, L, Dk], values [B, H, L, Dv] and rows [B, H, b] (row indices
into L, per head) -> keys [B, H, b, Dk] and values [B, H, b, Dv], new contiguous tensors (the evicting cache then
drops the old ones, so their memory is freed). :func:`gather_rows` checks its arguments and dispatches
(:mod:`kvp_gym.kernels`): the Triton kernel (``gather_rows_triton``: both tensors in one launch) on CUDA tensors,
else :func:`gather_rows_torch`. Both copy bits: the results are identical.

Imports the dispatch in kvp_gym.kernels; its Triton module only when a call chooses Triton.
"""

from __future__ import annotations

import torch

from kvp_gym.kernels import choose, describe, triton_module


def gather_rows(
    keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, rows_in_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """keys[b, h, rows[b, h, j]] and values[b, h, rows[b, h, j]] for every j: ([B, H, b, Dk], [B, H, b, Dv]).

    ``rows_in_range=True`` skips checking that every row lies in [0, L): a caller whose rows come from a sort of
    the L rows knows it, and on an accelerator the check would wait for the device (it reads the verdict back).

    Raises:
        ValueError: shapes that do not match, rows that are not integer or out of [0, L), different devices.
    """
    for name, tensor in (("keys", keys), ("values", values)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [B, H, L, D], got {describe(tensor)}")
    if values.shape[:3] != keys.shape[:3] or values.device != keys.device:
        raise ValueError(f"values: expected [{', '.join(map(str, keys.shape[:3]))}, Dv] on {keys.device}, got "
                         f"{describe(values)}")  # fmt: skip
    if (
        not isinstance(rows, torch.Tensor)
        or rows.dtype not in (torch.int32, torch.int64)
        or rows.dim() != 3
        or rows.shape[:2] != keys.shape[:2]
        or rows.device != keys.device
    ):
        raise ValueError(
            f"rows: expected an int64 or int32 tensor [{keys.shape[0]}, {keys.shape[1]}, b] on {keys.device}, got "
            f"{describe(rows)}"
        )
    if not rows_in_range and rows.numel() and bool(((rows < 0) | (rows >= keys.shape[2])).any()):
        raise ValueError(
            f"rows: expected row indices in [0, {keys.shape[2]}), got {int(rows.min())}..{int(rows.max())}"
        )
    if choose(keys.device) == "triton":
        return triton_module("compaction").gather_rows_triton(keys, values, rows)
    return gather_rows_torch(keys, values, rows)


def gather_rows_torch(
    keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gather_rows` in torch (arguments unchecked)."""

    def take(x: torch.Tensor) -> torch.Tensor:
        return x.gather(-2, rows[..., None].long().expand(*rows.shape, x.shape[-1]))  # a new contiguous tensor

    return take(keys), take(values)

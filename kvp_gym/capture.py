"""Recording post-RoPE queries, keys and values from a transformers model.

transformers models route attention through a registry of attention functions (``AttentionInterface``),
which receive the queries and keys after RoPE and the keys/values before GQA repetition. We register a
recording wrapper around the model's own implementation (sdpa or eager) and switch the model to it for the
duration of :func:`capture_qkv`; the model's outputs are unchanged.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from contextvars import ContextVar

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

_PREFIX = "kvp_capture:"
# layer index -> (queries [B, H_q, T, D], keys [B, H_kv, T, D], values [B, H_kv, T, D]), float16, on the CPU
Captured = dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
_active: ContextVar[tuple[Captured, frozenset[int]] | None] = ContextVar("kvp_capture", default=None)


class CaptureError(RuntimeError):
    """The model's attention did not go through transformers' attention interface for some layers."""


def _recording(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        state = _active.get()
        if state is not None and module.layer_idx in state[1]:
            state[0][module.layer_idx] = tuple(t.detach().to("cpu", torch.float16) for t in (query, key, value))
        if base == "eager":  # each model family defines its own eager function beside its attention module
            function = sys.modules[type(module).__module__].eager_attention_forward
        else:
            function = ALL_ATTENTION_FUNCTIONS[base]
        return function(module, query, key, value, attention_mask, **kwargs)

    return attention


@contextlib.contextmanager
def capture_qkv(model: PreTrainedModel, layers: Iterable[int]) -> Iterator[Captured]:
    """Within the block, every forward pass of ``model`` records the attention inputs of ``layers``.

    Yields a dict filled by each forward pass: ``captured[layer] = (queries [B, H_q, T, D], keys [B, H_kv, T, D],
    values [B, H_kv, T, D])``, float16 CPU copies of what the layer's attention received (post-RoPE; for a
    pass with a cache, keys and values span the whole cache). Raises :class:`CaptureError` at the end of the
    block if a requested layer never recorded anything.
    """
    config = model.config
    base = config._attn_implementation
    if base not in ("sdpa", "eager"):
        raise CaptureError(f"capture supports the 'sdpa' and 'eager' attention implementations, not {base!r}")
    name = _PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _recording(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    layers = frozenset(layers)
    captured: Captured = {}
    token = _active.set((captured, layers))
    config._attn_implementation = name
    try:
        yield captured
    finally:
        config._attn_implementation = base
        _active.reset(token)
    missing = sorted(layers - captured.keys())
    if missing:
        raise CaptureError(
            f"no attention inputs recorded for layers {missing}: this model's attention does not use "
            "transformers' AttentionInterface, or the layers do not exist"
        )

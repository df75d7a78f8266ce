"""The reference the evicting-cache tests compare against: the full model, without a cache, with each layer's
attention restricted per query head by a mask of our own (transformers' eager attention with that mask)."""

from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

_MASKS: dict[int, torch.Tensor] = {}  # layer -> additive mask [1, H_q, T, T], set for one call of masked_logits


def _masked_eager(module, query, key, value, attention_mask, **kwargs):
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, _MASKS[module.layer_idx], **kwargs)


AttentionInterface.register("kvp_masked_reference", _masked_eager)
AttentionMaskInterface.register("kvp_masked_reference", ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def masked_logits(model, tokens: list[int], allowed: dict[int, torch.Tensor]) -> torch.Tensor:
    """Logits [T, vocab] float32 of ``model`` over ``tokens`` (no cache) where, in layer l, query t of query head h
    sees key i only where ``allowed[l][h, t, i]`` (bool [H_q, T, T], every layer given)."""
    for layer, mask in allowed.items():
        _MASKS[layer] = torch.zeros(1, *mask.shape).masked_fill(~mask[None], torch.finfo(torch.float32).min)
    base = model.config._attn_implementation
    model.config._attn_implementation = "kvp_masked_reference"
    try:
        with torch.inference_mode():
            return model(torch.tensor([tokens]), use_cache=False).logits[0].float()
    finally:
        model.config._attn_implementation = base
        _MASKS.clear()

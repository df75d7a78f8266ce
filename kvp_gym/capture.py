"""Recording post-RoPE queries, keys and values from a transformers model.

transformers models route attention through a registry of attention functions (``AttentionInterface``),
which receive the queries and keys after RoPE and the keys/values before GQA repetition. We register a
recording wrapper around the model's own implementation (sdpa or eager) and switch the model to it for the
duration of :func:`capture_qkv`; the model's outputs are unchanged.

Imports only kvp_gym.attention (and torch, transformers).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvp_gym.attention import AttentionSpec, Rotary

_PREFIX = "kvp_capture:"
# layer index -> (queries [B, H_q, T, D], keys [B, H_kv, T, D], values [B, H_kv, T, D]), float16, on the CPU
Captured = dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# layer index -> the keyword arguments the attention function received (tensors as the string "tensor")
Semantics = dict[int, dict]


@dataclass
class _Recorder:
    """What the recording attention keeps, for the layers in ``layers``: float16 CPU copies of q/k/v
    (``qkv=True``), the attention-function arguments, and the last ``queries_kept`` queries on the model's own
    device (``queries_kept`` = 0: none; None: all)."""

    layers: frozenset[int]
    qkv: bool = True
    queries_kept: int | None = 0
    captured: Captured = field(default_factory=dict)
    semantics: Semantics = field(default_factory=dict)
    queries: dict[int, torch.Tensor] = field(default_factory=dict)


_active: ContextVar[_Recorder | None] = ContextVar("kvp_capture", default=None)

# Attention-function keyword arguments that do not change which probabilities the attention computes.
_NEUTRAL_KWARGS = {"dropout", "position_ids", "use_cache", "output_attentions", "cache_position", "is_causal"}
# The ones AttentionSpec reproduces.
_SPEC_KWARGS = {"scaling", "sliding_window", "softcap"}
_SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention"}


class CaptureError(RuntimeError):
    """The model's attention did not go through transformers' attention interface for some layers."""


def _recording(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        state = _active.get()
        if state is not None and module.layer_idx in state.layers:
            layer = module.layer_idx
            if state.qkv:
                state.captured[layer] = tuple(t.detach().to("cpu", torch.float16) for t in (query, key, value))
            if state.queries_kept != 0:
                # A copy of the last rows, not a view: a view would keep the whole pass's queries alive.
                kept = (
                    query.detach()
                    if state.queries_kept is None
                    else query.detach()[..., -state.queries_kept :, :].clone()
                )
                state.queries[layer] = kept
            state.semantics[layer] = {k: "tensor" if torch.is_tensor(v) else v for k, v in kwargs.items()}
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
    with _recording_into(model, _Recorder(frozenset(layers))) as recorder:
        yield recorder.captured
    _check_all_recorded(recorder.layers, recorder.captured)


@contextlib.contextmanager
def capture_queries(model: PreTrainedModel, last: int | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, forward passes of ``model`` keep each layer's last ``last`` post-RoPE queries (None = all)
    on the model's device, in its dtype: ``queries[layer]`` = [B, H_q, min(last, T), D] of the latest pass. Used by
    the evicting cache to hand query-based scorers the prefill queries they declare, and nothing more. ``last=0``
    keeps nothing (the model runs unchanged)."""
    if last == 0:
        yield {}
        return
    layers = frozenset(range(model.config.get_text_config().num_hidden_layers))
    with _recording_into(model, _Recorder(layers, qkv=False, queries_kept=last)) as recorder:
        yield recorder.queries
    _check_all_recorded(recorder.layers, recorder.queries)


@contextlib.contextmanager
def _recording_into(model: PreTrainedModel, recorder: _Recorder) -> Iterator[_Recorder]:
    """Switch ``model`` to the recording attention for the block."""
    config = model.config
    base = config._attn_implementation
    if base not in ("sdpa", "eager"):
        raise CaptureError(f"capture supports the 'sdpa' and 'eager' attention implementations, not {base!r}")
    name = _PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _recording(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    token = _active.set(recorder)
    config._attn_implementation = name
    try:
        yield recorder
    finally:
        config._attn_implementation = base
        _active.reset(token)


def _check_all_recorded(layers: frozenset[int], recorded: dict) -> None:
    missing = sorted(layers - recorded.keys())
    if missing:
        raise CaptureError(
            f"no attention inputs recorded for layers {missing}: this model's attention does not use "
            "transformers' AttentionInterface, or the layers do not exist"
        )


def probe_attention(model: PreTrainedModel) -> tuple[tuple[AttentionSpec, ...], tuple[Rotary | None, ...]]:
    """Each layer's attention semantics and RoPE, read from one short forward pass and the rotary embedding.

    Returns (one AttentionSpec per layer, one Rotary per layer: see :func:`_rotaries`). Raises
    :class:`CaptureError` for attention the importance cannot reproduce: layer types other than full and
    sliding-window attention, or attention-function arguments such as learned sinks (``s_aux``) or position biases.
    """
    config = model.config.get_text_config()
    unsupported_types = sorted(set(getattr(config, "layer_types", None) or ()) - _SUPPORTED_LAYER_TYPES)
    if unsupported_types:
        raise CaptureError(
            f"{type(model).__name__} has layer types {unsupported_types}; kvp-gym reproduces "
            f"{sorted(_SUPPORTED_LAYER_TYPES)} only"
        )
    layers = range(config.num_hidden_layers)
    with torch.inference_mode(), _recording_into(model, _Recorder(frozenset(layers))) as recorder:
        model(torch.zeros(1, 4, dtype=torch.long, device=model.device), use_cache=False)
    _check_all_recorded(recorder.layers, recorder.captured)
    captured, semantics = recorder.captured, recorder.semantics
    specs = []
    for layer in layers:
        kwargs = semantics[layer]
        odd = sorted(k for k, v in kwargs.items() if v not in (None, False) and k not in _NEUTRAL_KWARGS | _SPEC_KWARGS)
        if odd:
            raise CaptureError(
                f"layer {layer}: the attention function receives {odd}, which kvp-gym cannot reproduce in the "
                f"importance and attention statistics (supported: {sorted(_SPEC_KWARGS)})"
            )
        head_dim = captured[layer][0].shape[-1]
        specs.append(
            AttentionSpec(
                scale=float(kwargs.get("scaling") or head_dim**-0.5),
                sliding_window=int(kwargs.get("sliding_window") or 0),
                softcap=float(kwargs.get("softcap") or 0.0),
            )
        )
    return tuple(specs), _rotaries(model, getattr(config, "layer_types", None) or (), len(layers))


def _rotaries(model: PreTrainedModel, layer_types, num_layers: int) -> tuple[Rotary | None, ...]:
    """Each layer's RoPE, from the model's one rotary embedding module: its ``inv_freq`` for every layer, or, in
    models with one RoPE per layer type (Gemma 3: base 10k for sliding layers, 1M for global ones), the
    ``{type}_inv_freq`` of the layer's type. None for every layer when the model has no such module or several."""
    found = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if len(found) != 1:
        return (None,) * num_layers
    module = found[0]

    def rotary(prefix: str) -> Rotary | None:
        inv_freq, scaling = (
            getattr(module, f"{prefix}inv_freq", None),
            getattr(module, f"{prefix}attention_scaling", None),
        )
        if inv_freq is None or scaling is None:
            return None
        return Rotary(tuple(float(f) for f in inv_freq.float()), float(scaling))

    shared = rotary("")
    if shared is not None or not layer_types:
        return (shared,) * num_layers
    return tuple(rotary(f"{layer_types[i]}_") for i in range(num_layers))

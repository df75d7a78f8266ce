"""Captured q/k/v are what the model really used: they equal its own KV cache and reproduce its attention."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kvp_gym import models
from kvp_gym.capture import CaptureError, capture_qkv


def _run(model, ids, layers):
    eager = model.config._attn_implementation == "eager"  # only eager attention can return its weights
    with torch.inference_mode(), capture_qkv(model, layers) as captured:
        out = model(ids, use_cache=True, output_attentions=eager)
    assert (out.attentions is not None) == eager
    return captured, out


def _attention_from(queries, keys, kv_head_of_query):
    """softmax(q k^T / sqrt(d)) with a causal mask, per query head: [H_q, S, S] from float16 [H_q,S,D], [H_kv,S,D]."""
    q, k = queries.float(), keys.float()[list(kv_head_of_query)]
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    causal = torch.ones(logits.shape[-2:], dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)


def _check_against_model(model, ids, atol):
    geometry = models.geometry(model)
    layers = range(geometry.num_layers)
    captured, out = _run(model, ids, layers)
    for layer in layers:
        queries, keys, values = (t[0] for t in captured[layer])
        assert queries.shape == (geometry.num_query_heads, ids.shape[1], geometry.head_dim)
        cache = out.cache.layers[layer]
        # The model's own cache holds exactly the tensors we stored (up to the float16 rounding of storage).
        assert torch.equal(keys, cache.keys[0].half())
        assert torch.equal(values, cache.values[0].half())
        if out.attentions is not None:
            expected = out.attentions[layer][0].float()
            got = _attention_from(queries, keys, geometry.kv_head_of_query)
            torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def test_tiny_random_capture_equals_cache_and_attention(tiny):
    model, tokenizer = tiny
    ids = torch.tensor([tokenizer("The special magic number for blue-cat is 1234567. " * 6)["input_ids"]])
    _check_against_model(model, ids, atol=1e-4)


def test_capture_leaves_outputs_unchanged(tiny):
    model, _ = tiny
    ids = torch.randint(0, 250, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain = model(ids).logits
        with capture_qkv(model, [0]):
            captured = model(ids).logits
    assert torch.equal(plain, captured)
    assert model.config._attn_implementation == "eager"  # restored


def test_capture_reports_layers_that_never_ran(tiny):
    model, _ = tiny
    with (
        pytest.raises(CaptureError, match=r"layers \[7\]"),
        torch.inference_mode(),
        capture_qkv(model, [0, 7]),
    ):
        model(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families_from_a_local_folder(tmp_path, tiny, family):
    """Qwen2 and Mistral models saved to a folder load through models.load and capture like Llama."""
    _, tokenizer = tiny
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=512, **models.TINY_RANDOM_SIZES)
    config, cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}[family]
    torch.manual_seed(0)
    cls(config(**common)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _ = models.load(str(tmp_path), attn_implementation="eager")
    assert model.config.model_type == family
    _check_against_model(model, torch.tensor([list(range(10, 60))]), atol=1e-4)


@pytest.mark.slow
def test_smollm2_capture_equals_cache_and_attention(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    # float16 storage of q and k perturbs the logits by ~1e-3 relative: measured max error 2e-3 on the weights.
    _check_against_model(model, ids, atol=5e-3)

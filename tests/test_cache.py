"""The evicting cache: stock generation when nothing is evicted, the masked full model after eviction, memory that
is really released, true positions, and clear errors."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from masked_model import masked_logits
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from kvp_gym import models
from kvp_gym.cache import CacheError, EvictingCache, decode, generate, prefill
from kvp_gym.capture import capture_queries
from kvp_gym.scorers import get_scorer

PROMPT = [10 + (i * 7) % 200 for i in range(290)]  # 290 byte tokens of tiny-random's vocabulary


def test_no_eviction_is_stock_greedy_generation(tiny):
    model, tokenizer = tiny
    stock = model.generate(
        torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    for budget in (None, len(PROMPT), 10_000):
        out = generate(model, tokenizer, PROMPT, "knorm", budget, max_new_tokens=12)
        assert out.tokens == stock.sequences[0, len(PROMPT) :].tolist()
        torch.testing.assert_close(out.logits, torch.stack(stock.logits, 1)[0].float(), atol=1e-4, rtol=0)
        if budget is not None:
            assert not out.compressions[0].evicted and "nothing evicted" in str(out.compressions[0])


def _reference_logits(model, tokens: list[int], visible: dict[int, list[torch.Tensor]], start: int) -> torch.Tensor:
    """Logits of the full model (no cache) over ``tokens`` where the query at position start + s sees, in layer l and
    query head h, only the positions visible[l][s][kv_head_of(h)] (the prompt rows attend causally, within the
    layer's sliding window if it has one)."""
    total = len(tokens)
    heads = model.config.num_attention_heads
    group = heads // model.config.num_key_value_heads
    layer_types = getattr(model.config, "layer_types", None) or ["full_attention"] * len(visible)
    masks = {}
    for layer, steps in visible.items():
        causal = torch.ones(total, total, dtype=torch.bool).tril()
        if layer_types[layer] == "sliding_attention":
            causal &= torch.ones(total, total, dtype=torch.bool).triu(1 - model.config.sliding_window)
        allowed = causal.expand(heads, total, total).clone()
        for s, positions in enumerate(steps):  # positions: [H_kv, L] cached after step s's forward
            row = torch.zeros(heads, total, dtype=torch.bool)
            for h in range(heads):
                row[h, positions[h // group]] = True
            allowed[:, start + s] = row
        masks[layer] = allowed
    return masked_logits(model, tokens, masks)


@pytest.mark.parametrize(
    ("policy", "decode_every"), [("knorm", None), ("tova", None), ("streaming_llm", 4), ("tova", 3), ("snapkv", None)]
)
def test_after_eviction_logits_equal_the_masked_full_model(tiny, policy, decode_every):
    """Each step's logits through the compressed cache equal those of the full model with, per layer and head,
    every evicted token masked out of attention; with decode-time eviction the mask follows each re-compression."""
    _check_against_masked_model(tiny[0], PROMPT, policy, decode_every, budget=48, steps=10)


@pytest.mark.slow
def test_smollm2_no_eviction_is_stock_and_eviction_is_the_masked_model(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "Remember: the code word is tangerine. " * 12 + "What is the code word?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    stock = model.generate(
        torch.tensor([prompt]), max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    out = generate(model, tokenizer, prompt, "kvp", len(prompt), max_new_tokens=8)
    assert out.tokens == stock.sequences[0, len(prompt) :].tolist()
    torch.testing.assert_close(out.logits, torch.stack(stock.logits, 1)[0].float(), atol=1e-4, rtol=0)
    _check_against_masked_model(model, prompt, "kvp", None, budget=48, steps=4)
    _check_against_masked_model(model, prompt, "tova", 2, budget=48, steps=4)


def _check_against_masked_model(
    model, prompt: list[int], policy: str, decode_every, budget: int, steps: int, sinks: int = 4, recent: int = 16
):
    scorer = get_scorer(policy)
    window = getattr(scorer, "query_window", None) if scorer.needs_queries else 0
    cache = EvictingCache(model, sinks=sinks, recent=recent)
    with torch.inference_mode(), capture_queries(model, window) as queries:
        logits = [model(torch.tensor([prompt]), cache=cache).logits[0, -1].float()]
    latest = dict(queries)
    cache.compress(scorer, budget, latest if window != 0 else None)
    tokens = list(prompt)
    visible: dict[int, list[torch.Tensor]] = {layer: [] for layer in range(len(cache.layers))}
    for step in range(steps):
        tokens.append(int(logits[-1].argmax()))
        # What this step's query sees: the rows held before it, and itself (a sliding layer may drop its oldest row
        # once the step is done: the next query no longer sees it).
        held = [torch.cat([state.positions[0], torch.full_like(state.positions[0, :, :1], len(tokens) - 1)], -1)
                for state in cache.layers]  # fmt: skip
        with torch.inference_mode(), capture_queries(model, window) as queries:
            logits.append(model(torch.tensor([[tokens[-1]]]), cache=cache).logits[0, -1].float())
        for layer in range(len(cache.layers)):
            visible[layer].append(held[layer])
            if window:
                latest[layer] = torch.cat([latest[layer], queries[layer]], -2)[..., -window:, :]
        assert {layer.positions[0, 0, -1].item() for layer in cache.layers} == {len(prompt) + step}  # true position
        if decode_every and (step + 1) % decode_every == 0:
            cache.compress(scorer, budget, latest if window != 0 else None)
    reference = _reference_logits(model, tokens, visible, len(prompt))
    got = torch.stack(logits[1:])
    torch.testing.assert_close(got, reference[len(prompt) : len(prompt) + steps], atol=1e-4, rtol=0)
    assert (got - reference[len(prompt) - 1 : len(prompt) - 1 + steps]).abs().max() > 1e-3  # the test can fail
    # The library's own decode loop produces the same steps.
    state = prefill(model, prompt, window, sinks=sinks, recent=recent)
    decoded, decoded_logits, _, _ = decode(model, state, scorer, budget, steps + 1, decode_every=decode_every)
    assert decoded[0].tolist() == tokens[len(prompt) :] + [int(logits[-1].argmax())]
    torch.testing.assert_close(decoded_logits[0, 1:], got, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny_gemma():
    """tiny-gemma3 (5 sliding-window layers of 16 tokens, then 1 global layer; 1 KV head), eager attention."""
    return models.load("tiny-gemma3", attn_implementation="eager")


GEMMA_PROMPT = PROMPT[:70]  # four windows long


def test_hybrid_model_without_eviction_is_stock_generation(tiny_gemma):
    """Sliding-window layers hold only their window, yet generation equals transformers' own (whose cache keeps
    the window too) token for token, on a prompt four windows long."""
    model, tokenizer = tiny_gemma
    stock = model.generate(
        torch.tensor([GEMMA_PROMPT]), max_new_tokens=12, do_sample=False, output_logits=True,
        return_dict_in_generate=True,
    )  # fmt: skip
    for budget in (None, len(GEMMA_PROMPT)):
        out = generate(model, tokenizer, GEMMA_PROMPT, "knorm", budget, max_new_tokens=12)
        assert out.tokens == stock.sequences[0, len(GEMMA_PROMPT) :].tolist()
        torch.testing.assert_close(out.logits, torch.stack(stock.logits, 1)[0].float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("policy", "decode_every", "budget", "sinks", "recent"),
    [("knorm", None, 24, 4, 16), ("tova", 3, 24, 4, 16), ("streaming_llm", 4, 10, 2, 4), ("snapkv", None, 10, 2, 4)],
)
def test_hybrid_model_after_eviction_is_the_masked_model(tiny_gemma, policy, decode_every, budget, sinks, recent):
    """Full-attention layers compressed by the scorer, sliding layers holding their newest tokens (all of their
    window at budget 24, the 10 newest at budget 10): each step's logits equal the full model's with every evicted
    token masked, per layer."""
    model = tiny_gemma[0]
    _check_against_masked_model(model, GEMMA_PROMPT, policy, decode_every, budget, 10, sinks=sinks, recent=recent)


def test_hybrid_model_bytes_and_rows_follow_the_rule(tiny_gemma):
    """Bytes held after compression: every global layer holds the budget, every sliding layer min(budget,
    window - 1) newest tokens in one run of positions; later tokens keep their true positions."""
    model, _ = tiny_gemma
    window, layers = model.config.sliding_window, model.config.layer_types
    state = prefill(model, GEMMA_PROMPT, sinks=2, recent=4)
    row_bytes = state.cache.kv_bytes // sum(layer.physical_length for layer in state.cache.layers)
    for budget in (40, 10):
        cache = state.cache.copy()
        cache.compress(get_scorer("knorm"), budget)
        expected = [budget if kind == "full_attention" else min(budget, window - 1) for kind in layers]
        assert [layer.physical_length for layer in cache.layers] == expected
        assert cache.kv_bytes == row_bytes * sum(expected)
        for layer, kind in zip(cache.layers, layers, strict=True):
            if kind == "sliding_attention":
                newest = torch.arange(len(GEMMA_PROMPT) - layer.physical_length, len(GEMMA_PROMPT))
                assert torch.equal(layer.positions[0, 0], newest)
        with torch.inference_mode():
            model(torch.tensor([[5, 6]]), cache=cache)
        assert {int(layer.positions[0, 0, -1]) for layer in cache.layers} == {len(GEMMA_PROMPT) + 1}
        assert [layer.physical_length for layer in cache.layers] == [
            e + 2 if kind == "full_attention" else min(e + 2, window - 1)
            for e, kind in zip(expected, layers, strict=True)
        ]


def test_compression_frees_memory_and_reports_its_bytes(tiny):
    model, _ = tiny
    state = prefill(model, PROMPT)
    cache = state.cache.copy()
    full = cache.kv_bytes
    before = weakref.ref(cache.layers[0].keys)
    report = cache.compress(get_scorer("knorm"), 64)
    state = None
    gc.collect()
    assert before() is None  # the prefill tensors are gone, not kept behind a view
    assert report.evicted and report.rows_before == len(PROMPT) and report.rows_after == 64
    assert cache.kv_bytes / full == pytest.approx(64 / len(PROMPT))
    held = 0
    for layer in cache.layers:
        assert layer.keys.shape == layer.values.shape == (1, 2, 64, 16) and layer.positions.shape == (1, 2, 64)
        for tensor in (layer.keys, layer.values, layer.positions):
            assert (
                tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
            )
            held += tensor.untyped_storage().nbytes()
    assert cache.nbytes == held
    # Per-head selection: the two KV heads of a layer keep different tokens, sinks and recent tokens in both.
    positions = cache.layers[1].positions[0]
    assert not torch.equal(positions[0], positions[1])
    for head in positions:
        assert set(range(4)) <= set(head.tolist()) and set(range(len(PROMPT) - 16, len(PROMPT))) <= set(head.tolist())
        assert torch.equal(head, head.sort().values)


def test_budgets_and_bad_input(tiny, tmp_path):
    model, tokenizer = tiny
    state = prefill(model, PROMPT)
    cache = state.cache.copy()
    assert cache.resolve_budget(0.25) == round(0.25 * len(PROMPT)) and cache.resolve_budget(100) == 100
    for bad, message in (
        (0, "budget must be positive"),
        (-3, "budget must be positive"),
        (19, "below the 20 protected tokens"),
        (1.5, r"fractional budget must lie in \(0, 1\]"),
        ("64", "budget must be a number of tokens"),
    ):
        with pytest.raises(CacheError, match=message):
            cache.compress(get_scorer("knorm"), bad)
    with pytest.raises(CacheError, match="needs the prefill queries, but none were captured"):
        cache.compress(get_scorer("tova"), 64)
    with pytest.raises(CacheError, match="needs the future importance"):
        cache.compress(get_scorer("oracle"), 64)
    with pytest.raises(CacheError, match="decode-time eviction with 'h2o'"):
        generate(model, tokenizer, PROMPT, "h2o", 64, max_new_tokens=4, decode_every=2)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=300))
    with pytest.raises(CacheError, match="supports the llama, mistral, qwen2, gemma3_text model families, not 'gpt2'"):
        EvictingCache(gpt2)
    sliding = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=300, use_sliding_window=True, sliding_window=16, max_window_layers=0, **models.TINY_RANDOM_SIZES
        )
    )
    with pytest.raises(CacheError, match="every layer uses a sliding window"):
        EvictingCache(sliding)

"""Chunked prefill (kvp_gym.cache.generate.prefill_compressing): one chunk is the one-shot path, the cache never holds
more than budget + chunk rows, positions stay the true ones, every chunk's attention equals the full model masked to
what was cached when the chunk was read, scorers that need the whole prompt are refused, and evaluate-e2e runs the
chunked variant beside the one-shot policies."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from masked_model import masked_logits

from kvp_gym import models
from kvp_gym.cache import CacheError, EvictingCache, generate, prefill
from kvp_gym.cache.generate import (
    chunked_variants,
    continue_from,
    last_logits,
    prefill_compressing,
    query_window,
)
from kvp_gym.capture import capture_queries
from kvp_gym.evaluation.end_to_end import E2EConfig, run
from kvp_gym.evaluation.report import end_to_end_table
from kvp_gym.scorers import get_scorer

PROMPT = [10 + (i * 7) % 200 for i in range(290)]  # 290 byte tokens of tiny-random's vocabulary
BUDGET, CHUNK = 48, 64


def _layers(cache: EvictingCache) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values, layer.positions) for layer in cache.layers]


def _assert_same_cache(got: EvictingCache, want: EvictingCache) -> None:
    for (k, v, p), (k2, v2, p2) in zip(_layers(got), _layers(want), strict=True):
        assert torch.equal(p, p2) and torch.equal(k, k2) and torch.equal(v, v2)


@pytest.mark.parametrize("policy", ["knorm", "tova", "snapkv"])
def test_one_chunk_is_the_one_shot_path(tiny, policy):
    """A chunk at least as long as the prompt: the same cache, logits, tokens and report as prefill + compress."""
    model, tokenizer = tiny
    scorer = get_scorer(policy)
    state = prefill(model, PROMPT, query_window(scorer))
    one_shot = state.cache.copy()
    one_shot.compress(scorer, BUDGET, state.queries)
    for chunk in (len(PROMPT), 1000):
        chunked = prefill_compressing(model, PROMPT, scorer, BUDGET, chunk)
        _assert_same_cache(chunked.cache, one_shot)
        assert torch.equal(chunked.logits, state.logits) and len(chunked.chunks) == 1
    want = generate(model, tokenizer, PROMPT, policy, BUDGET, max_new_tokens=6)
    got = generate(model, tokenizer, PROMPT, policy, BUDGET, max_new_tokens=6, prefill_chunk=1000)
    assert got.tokens == want.tokens and torch.equal(got.logits, want.logits)
    assert got.compressions == want.compressions and got.compressions[0].evicted
    assert (got.kv_bytes_full, got.kv_bytes_compressed) == (want.kv_bytes_full, want.kv_bytes_compressed)
    assert got.prefill_chunk == 1000 and want.prefill_chunk is None


def test_a_budget_above_the_prompt_keeps_every_token(tiny):
    """A query-free scorer with a budget >= the prompt evicts nothing: the chunks add up to the one-shot cache."""
    model, _ = tiny
    full = prefill(model, PROMPT)
    for budget in (len(PROMPT), 400, 1.0):
        state = prefill_compressing(model, PROMPT, get_scorer("knorm"), budget, CHUNK)
        assert not any(c.evicted for c in state.chunks)
        for (k, v, p), (k2, v2, _) in zip(_layers(state.cache), _layers(full.cache), strict=True):
            assert torch.equal(p, torch.arange(len(PROMPT)).expand_as(p))
            torch.testing.assert_close(k, k2, atol=1e-5, rtol=0)
            torch.testing.assert_close(v, v2, atol=1e-5, rtol=0)
        torch.testing.assert_close(state.logits, full.logits, atol=1e-5, rtol=0)


def _rows_after_each_pass(model, prefill_call):
    """(what ``prefill_call()`` returns, the rows of every layer after each forward pass it made with a cache)."""
    rows = []

    def record(module, args, kwargs, output):
        if kwargs.get("cache") is not None:  # not the cache's own probe of the model's attention
            rows.append([layer.physical_length for layer in kwargs["cache"].layers])

    hook = model.register_forward_hook(record, with_kwargs=True)
    try:
        return prefill_call(), rows
    finally:
        hook.remove()


@pytest.mark.parametrize("policy", ["streaming_llm", "tova"])
def test_the_cache_never_holds_more_than_budget_plus_chunk_rows(tiny, policy):
    """Instrumented: the rows of every layer after every forward pass of the prefill."""
    model, _ = tiny
    state, rows = _rows_after_each_pass(
        model, lambda: prefill_compressing(model, PROMPT, get_scorer(policy), BUDGET, CHUNK)
    )
    rows_after_each_pass = [max(layer_rows) for layer_rows in rows]
    first = len(PROMPT) % CHUNK  # 34 tokens, below the budget: nothing evicted before the second chunk joins
    assert rows_after_each_pass == [first, first + CHUNK, BUDGET + CHUNK, BUDGET + CHUNK, BUDGET + CHUNK]
    assert max(rows_after_each_pass) <= BUDGET + CHUNK
    assert [c.rows_before for c in state.chunks] == rows_after_each_pass
    assert {layer.physical_length for layer in state.cache.layers} == {BUDGET}


def test_positions_stay_the_true_ones(tiny):
    """Every kept row carries the position it was read at; a decoded token gets the position after the prompt."""
    model, _ = tiny
    state = prefill_compressing(model, PROMPT, get_scorer("knorm"), BUDGET, CHUNK)
    cache = state.cache
    assert cache.get_seq_length() == len(PROMPT)
    for layer in cache.layers:
        assert layer.seen == len(PROMPT)
        for head in layer.positions[0]:
            kept = head.tolist()
            assert kept == sorted(set(kept)) and kept[0] >= 0 and kept[-1] == len(PROMPT) - 1
            assert set(range(4)) | set(range(len(PROMPT) - 16, len(PROMPT))) <= set(kept)  # sinks and recent
    assert not torch.equal(cache.layers[0].positions[0, 0], cache.layers[0].positions[0, 1])  # per-head selection
    continue_from(model, cache, state.logits, 2)
    assert {layer.positions[0, 0, -1].item() for layer in cache.layers} == {len(PROMPT)}


def test_the_kept_queries_do_not_hold_the_whole_prompts_queries(tiny):
    """TOVA reads one query per layer: that row alone is kept, not a view that keeps every prompt query alive."""
    model, _ = tiny
    for state in (prefill(model, PROMPT, 1), prefill_compressing(model, PROMPT, get_scorer("tova"), BUDGET, CHUNK)):
        for queries in state.queries.values():
            assert queries.shape[-2] == 1
            assert queries.untyped_storage().nbytes() == queries.numel() * queries.element_size()


def _chunks_by_hand(model, scorer, budget: int, chunk: int, prompt: list[int] = PROMPT):
    """The documented procedure: the first chunk takes T mod chunk (or a whole chunk), each chunk joins the cache with
    its last W queries captured, then the cache is compressed. Returns (cache, last logits, the positions cached
    before each chunk was read: one list per layer of [H_kv, L] tensors)."""
    cache = EvictingCache(model)
    window = query_window(scorer)
    bounds = list(range(len(prompt) % chunk or chunk, len(prompt) + 1, chunk))
    seen_by_chunk = []
    start = 0
    for end in bounds:
        seen_by_chunk.append([layer.positions[0].clone() if layer.is_initialized else None for layer in cache.layers])
        with torch.inference_mode(), capture_queries(model, window) as queries:
            logits = model(torch.tensor([prompt[start:end]]), cache=cache).logits[:, -1].float()
        cache.compress(scorer, budget, dict(queries) or None)
        start = end
    return cache, logits, list(zip([0, *bounds[:-1]], bounds, strict=True)), seen_by_chunk


def _reference_logits(model, spans, seen_by_chunk) -> torch.Tensor:
    """Last-position logits of the full model without a cache, where a query of chunk k (span [s, e)) sees, in each
    layer and query head, the positions its KV head had cached before chunk k, and the chunk causally."""
    total, heads = len(PROMPT), model.config.num_attention_heads
    group = heads // model.config.num_key_value_heads
    masks = {}
    for layer in range(model.config.num_hidden_layers):
        allowed = torch.ones(total, total, dtype=torch.bool).tril().expand(heads, total, total).clone()
        for (start, end), seen in zip(spans, seen_by_chunk, strict=True):
            allowed[:, start:end, :start] = False
            for h in range(heads):
                if seen[layer] is not None:
                    allowed[h, start:end, seen[layer][h // group]] = True
        masks[layer] = allowed
    return masked_logits(model, PROMPT, masks)[-1:]


@pytest.mark.parametrize(("policy", "budget", "chunk"), [("knorm", 48, 64), ("tova", 40, 50), ("snapkv", 48, 64)])
def test_chunks_by_hand_and_the_masked_full_model(tiny, policy, budget, chunk):
    """The chunked prefill is the documented procedure done by hand (the same cache, bit for bit), and its logits
    are the full model's with each chunk's queries masked to what was cached when it was read."""
    model, _ = tiny
    scorer = get_scorer(policy) if policy != "snapkv" else get_scorer("snapkv", window=8)
    state = prefill_compressing(model, PROMPT, scorer, budget, chunk)
    cache, logits, spans, seen_by_chunk = _chunks_by_hand(model, scorer, budget, chunk)
    _assert_same_cache(state.cache, cache)
    torch.testing.assert_close(state.logits, logits, atol=1e-5, rtol=0)  # one row through lm_head vs all of them
    reference = _reference_logits(model, spans, seen_by_chunk)
    torch.testing.assert_close(state.logits, reference, atol=1e-4, rtol=0)
    assert (state.logits - prefill(model, PROMPT).logits).abs().max() > 1e-3  # eviction changed them: can fail


def test_a_hybrid_model_sliding_layers_keep_their_window():
    """tiny-gemma3 (5 sliding-window layers of 16 tokens, 1 global layer): one chunk is the one-shot path (the
    uncompressed bytes computed per layer as the one-shot cache holds them); with chunks of 20, the global layer
    never holds more than budget + chunk rows, the sliding layers their window, and the chunks are the procedure."""
    model, tokenizer = models.load("tiny-gemma3", attn_implementation="eager")
    prompt, budget = PROMPT[:70], 24
    want = generate(model, tokenizer, prompt, "knorm", budget, max_new_tokens=4)
    got = generate(model, tokenizer, prompt, "knorm", budget, max_new_tokens=4, prefill_chunk=100)
    assert got.tokens == want.tokens and got.compressions == want.compressions
    assert (got.kv_bytes_full, got.kv_bytes_compressed) == (want.kv_bytes_full, want.kv_bytes_compressed)
    state, rows = _rows_after_each_pass(
        model, lambda: prefill_compressing(model, prompt, get_scorer("knorm"), budget, 20)
    )
    assert [r[-1] for r in rows] == [10, 30, budget + 20, budget + 20] and all(max(r[:-1]) <= 15 for r in rows)
    cache, _, _, _ = _chunks_by_hand(model, get_scorer("knorm"), budget, 20, prompt)
    _assert_same_cache(state.cache, cache)
    assert {layer.positions[0, 0, -1].item() for layer in state.cache.layers} == {len(prompt) - 1}


def test_scorers_that_need_the_whole_prompt_are_refused(tiny):
    model, tokenizer = tiny
    for name, reason in (
        ("h2o", "cannot serve 'h2o': it reads every prompt query"),
        ("expected_attention", "cannot serve 'expected_attention': it reads every prompt query"),
        ("oracle", "cannot serve 'oracle': it is privileged"),
    ):
        with pytest.raises(CacheError, match=reason):
            prefill_compressing(model, PROMPT, get_scorer(name), BUDGET, CHUNK)
    with pytest.raises(CacheError, match="'snapkv' with 32-token chunks: it reads the last 64 queries"):
        prefill_compressing(model, PROMPT, get_scorer("snapkv", window=64), BUDGET, 32)
    with pytest.raises(CacheError, match="positive number of tokens, got 0"):
        prefill_compressing(model, PROMPT, get_scorer("knorm"), BUDGET, 0)
    with pytest.raises(CacheError, match="below the 20 protected tokens"):
        prefill_compressing(model, PROMPT, get_scorer("knorm"), 10, CHUNK)
    with pytest.raises(CacheError, match="needs a policy and a budget"):
        generate(model, tokenizer, PROMPT, "knorm", None, prefill_chunk=CHUNK)
    scorers = {name: get_scorer(name) for name in ("knorm", "tova", "h2o", "oracle")}
    variants, refused = chunked_variants(scorers, CHUNK, strict=False)
    assert list(variants) == ["knorm (chunked prefill)", "tova (chunked prefill)"]
    assert (
        set(refused) == {"h2o (chunked prefill)", "oracle (chunked prefill)"}
        and "h2o" in refused["h2o (chunked prefill)"]
    )
    with pytest.raises(CacheError, match="prefill chunk 64: chunked prefill cannot serve 'h2o'"):
        chunked_variants(scorers, CHUNK, strict=True)


def test_only_the_last_position_is_projected_onto_the_vocabulary(tiny):
    model, _ = tiny
    ids = torch.tensor([PROMPT[:40]])
    shapes = []
    hook = model.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.logits.shape)))
    try:
        with torch.inference_mode():
            got = last_logits(model, ids)
            full = model(ids, use_cache=False).logits[:, -1].float()
    finally:
        hook.remove()
    assert shapes == [(1, 1, model.config.vocab_size), (1, 40, model.config.vocab_size)]
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)

    class NoLogitsToKeep(torch.nn.Module):
        """A model whose forward does not take logits_to_keep: the plain call, its last row."""

        def forward(self, ids, cache=None, use_cache=False):
            return SimpleNamespace(logits=model(ids, use_cache=use_cache).logits)

    with torch.inference_mode():
        torch.testing.assert_close(last_logits(NoLogitsToKeep(), ids), full, atol=1e-5, rtol=0)


def test_evaluate_e2e_runs_the_chunked_variant_beside_the_one_shot_policies(tmp_path):
    """With a chunk longer than the prompt the chunked rows answer exactly as the one-shot rows (a reference); with a
    short chunk they are labelled variants, recorded in the settings, and have no trace-level proxies."""
    base = dict(
        model="tiny-random", tasks=("niah_single",), context=700, budgets=(32,), policies=("knorm", "tova"), samples=1
    )
    long = run(E2EConfig(**base, essays=1, continuation=8, prefill_chunk=4096), tmp_path / "long", progress=False)
    part = json.loads((tmp_path / "long" / "parts" / "niah_single-00000.json").read_text())
    essay = json.loads((tmp_path / "long" / "parts" / "essay-00000.json").read_text())
    for label in ("knorm", "tova"):
        chunked = part["policies"][f"{label} (chunked prefill)"]["budgets"]["32"]
        assert chunked == part["policies"][label]["budgets"]["32"]
        got, want = (essay["policies"][name]["budgets"]["32"]["nll"] for name in (f"{label} (chunked prefill)", label))
        assert got == pytest.approx(want, abs=1e-4)
    assert long["settings"]["prefill_chunk"] == 4096 and long["policies"]["tova (chunked prefill)"]["variant"]

    short = run(E2EConfig(**base, essays=0, prefill_chunk=64), tmp_path / "short", progress=False)
    assert set(short["policies"]) == {"knorm", "tova", "knorm (chunked prefill)", "tova (chunked prefill)"}
    assert set(short["holistic_score"]) == {"knorm", "tova"} and short["seconds"]["chunked"] > 0
    assert "tova (chunked prefill)" in end_to_end_table(short)
    with pytest.raises(CacheError, match="prefill chunk 64: chunked prefill cannot serve 'h2o'"):
        run(E2EConfig(**{**base, "policies": ("knorm", "h2o")}, prefill_chunk=64), tmp_path / "h2o", progress=False)


def test_the_generate_command_takes_the_chunked_prefill_and_refuses_what_it_cannot_serve(tiny, tmp_path, capsys):
    from kvp_gym.cli import main

    model, tokenizer = tiny
    prompt = " ".join(f"word{i}" for i in range(120))
    args = ["generate", "--model", "tiny-random", "--prompt", prompt, "--budget", "48", "--max-new-tokens", "6"]
    assert main([*args, "--policy", "knorm", "--prefill-chunk", "64"]) == 0
    printed = capsys.readouterr()
    expected = generate(model, tokenizer, prompt, "knorm", 48, max_new_tokens=6, prefill_chunk=64)
    assert printed.out.splitlines()[0] == expected.text.splitlines()[0]
    assert f"prompt {expected.prompt_length} tokens" in printed.err
    one_shot = generate(model, tokenizer, prompt, "knorm", 48, max_new_tokens=6)
    assert expected.kv_bytes_compressed == one_shot.kv_bytes_compressed  # the same budget, reached by chunks
    assert main([*args, "--policy", "h2o", "--prefill-chunk", "64"]) == 2
    assert "--prefill-chunk 64: chunked prefill cannot serve 'h2o'" in capsys.readouterr().err

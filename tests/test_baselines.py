"""Baselines: known orders on hand-made inputs, each published formula re-implemented directly from tiny-random's
own attention (as NVIDIA kvpress computes it) on a real trace, protected sets ordered by evidence, batching."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvp_gym.evaluation import layer_view
from kvp_gym.importance import ImportanceStore
from kvp_gym.scorers import HeadView, ScorerError, available_scorers, from_spec, get_scorer, score
from kvp_gym.traces import open_traces
from kvp_gym.utility import as_ranking, attention_received
from kvp_gym_baselines.common import keep_first

ALL = [
    "expected_attention",
    "h2o",
    "keydiff",
    "knorm",
    "lagkv",
    "oracle",
    "random",
    "snapkv",
    "streaming_llm",
    "tova",
]


def view_of(keys, values=None, queries=None, importance=None, mask=None, rotary=None):
    n = keys.shape[-2]
    return HeadView(
        keys=keys,
        values=keys if values is None else values,
        positions=torch.arange(n).expand(keys.shape[:-1]),
        mask=torch.ones(keys.shape[:-1], dtype=torch.bool) if mask is None else mask,
        queries=queries,
        future_importance=importance,
        rotary=rotary,
    )


def test_registry_lists_every_baseline_and_errors_are_clear():
    assert set(ALL) <= set(available_scorers())
    with pytest.raises(ScorerError, match="unknown scorer 'nope'; available: expected_attention, h2o"):
        get_scorer("nope")
    with pytest.raises(
        ScorerError, match=r"bad parameters for scorer 'snapkv'.*its parameters: \['window', 'kernel'\]"
    ):
        get_scorer("snapkv", widow=3)
    for name, bad, message in (
        ("snapkv", {"window": -5}, "need window >= 1"),
        ("tova", {"heads": "all"}, "heads must be 'layer' or 'group'"),
        ("h2o", {"recent": -1}, "recent must be >= 0"),
        ("lagkv", {"partition": 0}, "need partition >= 1"),
        ("streaming_llm", {"sinks": -1}, "sinks must be >= 0"),
        ("expected_attention", {"future_positions": 0}, "need future_positions >= 1"),
    ):
        with pytest.raises(ScorerError, match=message):
            get_scorer(name, **bad)
    keys = torch.randn(6, 4)
    with pytest.raises(ScorerError, match="needs the prefill queries, but this view has none"):
        score(get_scorer("tova"), view_of(keys))
    with pytest.raises(ScorerError, match="needs the future importance"):
        score(get_scorer("oracle"), view_of(keys))
    with pytest.raises(ScorerError, match="pools over a layer's KV heads"):  # a lone head is not a layer
        score(get_scorer("tova"), view_of(keys, queries=torch.randn(2, 6, 4)))
    with pytest.raises(ScorerError, match="needs the model's RoPE"):
        score(get_scorer("expected_attention"), view_of(keys, queries=torch.randn(2, 6, 4)))


def test_hand_made_orders():
    keys = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.5, 0.5], [4.0, 0.1], [0.2, 0.0]])
    # K-norm keeps low norms: norms 3, 1, 2, .71, 4.0, .2
    assert as_ranking(score(get_scorer("knorm"), view_of(keys))).tolist() == [5, 3, 1, 2, 0, 4]
    # StreamingLLM with 2 sinks: tokens 0, 1 first, then newest first.
    assert as_ranking(score(get_scorer("streaming_llm", sinks=2), view_of(keys))).tolist() == [0, 1, 5, 4, 3, 2]
    # KeyDiff: the one key pointing away from the others (token 2, along y) is the most distinctive.
    assert as_ranking(score(get_scorer("keydiff"), view_of(keys)))[0].item() == 2
    # Oracle follows the importance.
    imp = torch.tensor([0.1, 0.5, 0.0, 0.3, 0.2, 0.05])
    assert as_ranking(score(get_scorer("oracle"), view_of(keys, importance=imp))).tolist() == [1, 3, 4, 0, 5, 2]
    # Random is seeded: same seed, same scores; another seed, others.
    a, b = (score(get_scorer("random", seed=s), view_of(keys)) for s in (1, 1))
    assert torch.equal(a, b) and not torch.equal(a, score(get_scorer("random", seed=2), view_of(keys)))


def test_keep_first_lifts_protected_tokens_in_their_own_order():
    scores = torch.tensor([0.1, 5.0, 0.3, 0.2, 0.05, 0.4])
    protected = torch.tensor([True, False, False, True, True, False])
    # Protected 0, 3, 4 first, by their own scores (0.2 > 0.1 > 0.05), then the rest by score.
    assert as_ranking(keep_first(scores, protected)).tolist() == [3, 0, 4, 1, 5, 2]
    assert torch.equal(keep_first(scores, torch.zeros(6, dtype=torch.bool)), scores)
    assert as_ranking(keep_first(scores, torch.ones(6, dtype=torch.bool))).tolist() == as_ranking(scores).tolist()


def test_lagkv_as_the_reference():
    torch.manual_seed(0)
    partition, sinks = 8, 4
    n = sinks + 3 * partition + 5  # three full partitions (the last one only a reference) and a remainder
    keys, values = torch.randn(n, 4), torch.randn(n, 4)
    got = score(get_scorer("lagkv", partition=partition, sinks=sinks), view_of(keys, values))
    # Direct re-implementation: partitions 0 and 1 scored against partitions 1 and 2.
    expected = []
    for p in range(2):
        block = slice(sinks + p * partition, sinks + (p + 1) * partition)
        ref = slice(block.stop, block.stop + partition)
        per = []
        for x in (keys, values):
            low, high = x[ref].min(0).values, x[ref].max(0).values
            per.append(((x[block] - low) / (high - low)).std(-1).softmax(-1))
        expected.append(((per[0] + per[1]) / 2).argsort().argsort().float() / partition)
    torch.testing.assert_close(got[sinks : sinks + 2 * partition], torch.cat(expected))
    ranking = as_ranking(got).tolist()
    tail = list(range(n - 1, sinks + 2 * partition - 1, -1))  # last full partition + remainder, newest first
    assert ranking[: sinks + len(tail)] == [0, 1, 2, 3, *tail]  # sinks, then the tail
    # A prompt shorter than sinks + 2 partitions: sinks, then recency (the reference's behaviour).
    short = score(get_scorer("lagkv", partition=partition, sinks=sinks), view_of(keys[:19], values[:19]))
    assert as_ranking(short).tolist() == [0, 1, 2, 3, *range(18, 3, -1)]


@pytest.fixture(scope="module")
def reference_layer(tiny_trace, tiny):
    """Layer 1 of a real tiny-random trace sample: its evaluation view and the model's own eager attention
    probabilities [H_q, n, n] and pre-RoPE queries [H_q, n, D] for the prompt, computed afresh from the tokens."""
    model, _ = tiny
    with open_traces(tiny_trace) as trace:
        sample = trace.split("train")[0]
        view, _, _ = layer_view(trace, ImportanceStore(trace, sidecar=False), sample, 1, 2)
    n = sample.prompt_length
    ids = torch.tensor(sample.tokens[None, :n], dtype=torch.long)
    captured = {}
    attention_module = model.model.layers[1].self_attn
    hook = attention_module.q_proj.register_forward_hook(lambda m, i, o: captured.update(q=o))
    try:
        with torch.inference_mode():
            attention = model(ids, output_attentions=True).attentions[1][0].float()
    finally:
        hook.remove()
    pre_rope = captured["q"][0].view(n, -1, attention_module.head_dim).transpose(0, 1).float()
    return view, attention, pre_rope


def test_tova_snapkv_h2o_as_kvpress_computes_them(reference_layer):
    view, attention, _ = reference_layer  # view: 2 KV heads; query heads 0, 1 -> KV 0 and 2, 3 -> KV 1
    n = attention.shape[-1]
    groups = attention.view(2, 2, n, n)  # [KV head, group, query, key]
    # TOVA (kvpress TOVAPress): the last query's attention, mean over every query head of the layer.
    tova = attention[:, -1].mean(0)
    got = score(get_scorer("tova"), view)
    for h in range(2):
        torch.testing.assert_close(got[h, :-1], tova[:-1], atol=2e-3, rtol=2e-2)
        assert as_ranking(got[h])[0] == n - 1  # the last token is kept first
    got = score(get_scorer("tova", heads="group"), view)
    torch.testing.assert_close(got[:, :-1], groups[:, :, -1].mean(1)[:, :-1], atol=2e-3, rtol=2e-2)
    # SnapKV (SnapKVPress): window queries' attention to the keys before the window, mean over the window, pooled
    # over those keys only (zero padding), mean over the group; the window ordered by its own attention.
    window = 64
    before = groups[:, :, -window:, :-window].mean(2)  # [KV, G, n - window]
    pooled = torch.nn.functional.avg_pool1d(before.reshape(4, 1, -1), 5, 1, 2).reshape(2, 2, -1).mean(1)
    got = score(get_scorer("snapkv", window=window), view)
    torch.testing.assert_close(got[:, :-window], pooled, atol=2e-3, rtol=2e-2)
    own = groups[:, :, -window:, -window:].mean(2).mean(1)  # attention the window's tokens receive
    for h in range(2):
        ranking = as_ranking(got[h]).tolist()
        assert set(ranking[:window]) == set(range(n - window, n))  # the window first ...
        assert torch.equal(as_ranking(got[h, -window:]), as_ranking(own[h]))  # ... in its attention order
    # H2O (ObservedAttentionPress): attention summed over all queries / number of queries that saw the key.
    h2o = groups.sum(2).mean(1) / (n - torch.arange(n))
    torch.testing.assert_close(score(get_scorer("h2o"), view), h2o, atol=2e-3, rtol=2e-2)
    windowed = score(get_scorer("h2o", recent=16), view)
    for h in range(2):
        ranking = as_ranking(windowed[h]).tolist()
        assert set(ranking[:16]) == set(range(n - 16, n))
        assert torch.equal(as_ranking(windowed[h, -16:]), as_ranking(h2o[h, -16:]))


def test_expected_attention_as_kvpress_computes_it(reference_layer, tiny):
    """From the model's own pre-RoPE queries and rotary module, as ExpectedAttentionPress does."""
    view, _, pre_rope = reference_layer
    model, _ = tiny
    n, d, sinks, future = pre_rope.shape[1], pre_rope.shape[2], 4, 512
    q = pre_rope[:, sinks:]  # [H_q, n - sinks, D]
    mean = q.mean(1)
    centered = q - mean[:, None]
    cov = centered.transpose(1, 2) @ centered / q.shape[1]
    cos, sin = model.model.rotary_emb(q, torch.arange(n, n + future)[None])
    cos, sin = cos[0], sin[0]
    p = torch.zeros(d, d)
    p[d // 2 :, : d // 2], p[: d // 2, d // 2 :] = torch.eye(d // 2), -torch.eye(d // 2)
    rotation = (cos[:, :, None] * torch.eye(d) + sin[:, :, None] * p).mean(0)
    mean, cov = mean @ rotation.T, rotation @ cov @ rotation.T
    keys = view.keys.float().repeat_interleave(2, 0)[:, sinks:]  # [H_q, n - sinks, D]
    logits = (keys @ mean[:, :, None])[..., 0] / d**0.5 + torch.einsum("hnd,hde,hne->hn", keys, cov, keys) / d / 2
    expected = logits.softmax(-1).view(2, 2, -1).mean(1) * view.values[:, sinks:].float().norm(dim=-1)
    got = score(get_scorer("expected_attention"), view)
    torch.testing.assert_close(got[:, sinks:], expected, atol=1e-4, rtol=2e-2)
    assert all(set(as_ranking(got[h]).tolist()[:sinks]) == set(range(sinks)) for h in range(2))


def test_attention_received_in_chunks_equals_the_full_matrix():
    torch.manual_seed(1)
    q, k = torch.randn(2, 3, 50, 8), torch.randn(2, 50, 8)
    full = (q @ k[:, None].transpose(-1, -2) / 8**0.5).masked_fill(torch.ones(50, 50).triu(1).bool(), float("-inf"))
    expected = full.softmax(-1).sum(-2)
    torch.testing.assert_close(attention_received(q, k, chunk=7), expected)
    torch.testing.assert_close(attention_received(q, k, window=5, chunk=3), full.softmax(-1)[..., -5:, :].sum(-2))


@pytest.mark.parametrize("name", ALL + ["tova:heads=group", "h2o:recent=16"])
def test_every_scorer_ranks_batched_and_padded_views(name, reference_layer):
    """300-token prompts: long enough for SnapKV's 64-token window and LagKV's sinks + two 128-token partitions,
    so every scorer ranks (no constant scores), and the same head scored alone or padded ranks the same."""
    torch.manual_seed(2)
    label = name.partition(":")[0]
    scorer = from_spec(name)
    layer_scope = getattr(scorer, "scope", "head") == "layer"
    batch, groups, n, d = (2, 3), 2, 300, 16
    keys, values = torch.randn(*batch, n, d), torch.randn(*batch, n, d)
    keys[..., 0, :] *= 0.1  # a low-norm sink-like first key
    queries, imp = torch.randn(*batch, groups, n, d), torch.rand(*batch, n)
    rotary = reference_layer[0].rotary

    def view(k, v, q, i, mask=None):
        shape = k.shape[:-2]
        return dataclasses.replace(
            view_of(k, v, q, i, mask, rotary),
            layer=torch.zeros(shape, dtype=torch.long),
            kv_head=torch.arange(shape[-1]).expand(shape) if shape else torch.tensor(0),
        )

    batched = score(scorer, view(keys, values, queries, imp))
    assert batched.shape == (*batch, n) and torch.isfinite(batched).all()
    assert len(batched[1, 2].unique()) > n // 2  # it ranks: not a constant or a handful of values
    if label != "random" and not layer_scope:  # each head scored alone gives the same scores
        alone = score(scorer, view(keys[1, 2], values[1, 2], queries[1, 2], imp[1, 2]))
        torch.testing.assert_close(batched[1, 2], alone)
    mask = torch.ones(*batch, n, dtype=torch.bool)
    mask[0, :, 250:] = False  # padding (a whole layer's heads alike): ignored, scored -inf
    padded = score(scorer, view(keys, values, queries, imp, mask))
    assert (padded[0, :, 250:] == float("-inf")).all()
    if label != "random":
        short = score(scorer, view(keys[0, :, :250], values[0, :, :250], queries[0, :, :, :250], imp[0, :, :250]))
        assert torch.equal(as_ranking(padded[0])[:, :250], as_ranking(short))


def test_spec_parameters_parse_booleans_and_numbers():
    scorer = from_spec("expected_attention:covariance=False;value_norm=true;future_positions=64;epsilon=0.5")
    assert scorer.covariance is False and scorer.value_norm is True
    assert scorer.future_positions == 64 and scorer.epsilon == 0.5
    assert from_spec("tova:heads=group").heads == "group"

"""Baselines: known orders on hand-made inputs, attention baselines against the model's eager attention, batching."""

from __future__ import annotations

import pytest
import torch

from kvp_gym.capture import capture_qkv
from kvp_gym.scorers import HeadView, ScorerError, available_scorers, get_scorer, score
from kvp_gym.utility import as_ranking, attention_received

ALL = ["h2o", "keydiff", "knorm", "lagkv", "oracle", "random", "snapkv", "streaming_llm", "tova"]


def view_of(keys, values=None, queries=None, importance=None, mask=None):
    n = keys.shape[-2]
    return HeadView(
        keys=keys,
        values=keys if values is None else values,
        positions=torch.arange(n).expand(keys.shape[:-1]),
        mask=torch.ones(keys.shape[:-1], dtype=torch.bool) if mask is None else mask,
        queries=queries,
        future_importance=importance,
    )


def test_registry_lists_every_baseline_and_errors_are_clear():
    assert set(ALL) <= set(available_scorers())
    with pytest.raises(ScorerError, match="unknown scorer 'nope'; available: h2o, keydiff"):
        get_scorer("nope")
    with pytest.raises(
        ScorerError, match=r"bad parameters for scorer 'snapkv'.*its parameters: \['window', 'kernel'\]"
    ):
        get_scorer("snapkv", widow=3)
    keys = torch.randn(6, 4)
    with pytest.raises(ScorerError, match="needs the prefill queries, but this view has none"):
        score(get_scorer("tova"), view_of(keys))
    with pytest.raises(ScorerError, match="needs the future importance"):
        score(get_scorer("oracle"), view_of(keys))


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


def test_lagkv_protects_sinks_and_tail_and_scores_by_lagged_spread():
    torch.manual_seed(0)
    n, d = 4 + 3 * 8 + 5, 4  # sinks, three partitions of 8, a partial tail
    keys = torch.randn(n, d)
    keys[4 + 3] = torch.tensor([10.0, -10.0, 10.0, -10.0])  # high channel spread after normalisation
    scores = score(get_scorer("lagkv", partition=8, sinks=4), view_of(keys))
    protected = scores >= 1e9
    assert protected[:4].all() and protected[4 + 16 :].all() and not protected[4 : 4 + 16].any()
    assert scores[4:12].argmax().item() == 3


def test_attention_baselines_match_the_eager_attention(tiny):
    """TOVA, SnapKV and H2O recomputed by hand from tiny-random's eager attention matrix."""
    model, tokenizer = tiny
    ids = torch.tensor([tokenizer("Heavy hitters and attention sinks: a test sentence. " * 4)["input_ids"]])
    with torch.inference_mode(), capture_qkv(model, [1]) as captured:
        attention = model(ids, output_attentions=True).attentions[1][0].float()  # [H_q, n, n]
    queries, keys, values = (t[0] for t in captured[1])
    n = ids.shape[1]
    for kv_head, group in ((0, [0, 1]), (1, [2, 3])):
        view = view_of(keys[kv_head], values[kv_head], queries=queries[group])
        a = attention[group]  # [G, n, n]
        tova = a[:, -1].mean(0)
        got = score(get_scorer("tova"), view)
        torch.testing.assert_close(got[:-1], tova[:-1], atol=1e-4, rtol=1e-3)
        assert got[-1] >= 1e9
        window = 8
        snap = torch.nn.functional.avg_pool1d(a[:, -window:].mean(1).mean(0)[None, None], 5, 1, 2)[0, 0]
        got = score(get_scorer("snapkv", window=window), view)
        torch.testing.assert_close(got[:-window], snap[:-window], atol=1e-4, rtol=1e-3)
        assert (got[-window:] >= 1e9).all()
        h2o = a.sum(1).mean(0) / (n - torch.arange(n))
        got = score(get_scorer("h2o", recent=4), view)
        torch.testing.assert_close(got[:-4], h2o[:-4], atol=1e-4, rtol=1e-3)


def test_attention_received_in_chunks_equals_the_full_matrix():
    torch.manual_seed(1)
    q, k = torch.randn(2, 3, 50, 8), torch.randn(2, 50, 8)
    full = (q @ k[:, None].transpose(-1, -2) / 8**0.5).masked_fill(torch.ones(50, 50).triu(1).bool(), float("-inf"))
    expected = full.softmax(-1).sum(-2)
    torch.testing.assert_close(attention_received(q, k, chunk=7), expected)
    torch.testing.assert_close(attention_received(q, k, window=5, chunk=3), full.softmax(-1)[..., -5:, :].sum(-2))


@pytest.mark.parametrize("name", ALL)
def test_every_scorer_works_on_batched_and_padded_views(name):
    torch.manual_seed(2)
    batch, groups, n, d = (2, 3), 2, 40, 8
    keys, values = torch.randn(*batch, n, d), torch.randn(*batch, n, d)
    queries, imp = torch.randn(*batch, groups, n, d), torch.rand(*batch, n)
    mask = torch.ones(*batch, n, dtype=torch.bool)
    scorer = get_scorer(name)
    batched = score(scorer, view_of(keys, values, queries, imp, mask))
    assert batched.shape == (*batch, n) and torch.isfinite(batched).all()
    if name != "random":  # each head scored alone gives the same scores
        alone = score(scorer, view_of(keys[1, 2], values[1, 2], queries[1, 2], imp[1, 2]))
        torch.testing.assert_close(batched[1, 2], alone)
    mask[0, 0, 30:] = False  # padding: ignored, scored -inf
    padded = score(scorer, view_of(keys, values, queries, imp, mask))
    assert (padded[0, 0, 30:] == float("-inf")).all()
    if name != "random":
        short = score(scorer, view_of(keys[0, 0, :30], values[0, 0, :30], queries[0, 0, :, :30], imp[0, 0, :30]))
        assert torch.equal(as_ranking(padded[0, 0])[:30], as_ranking(short))

"""The holistic utility: hand-checked cases, properties, and importance against the model's own attention."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvp_gym.utility import (
    as_ranking,
    future_importance,
    holistic_cost,
    holistic_reward,
    holistic_score,
    needle_attention_kept,
    oracle_ranking,
    protected_tokens,
    retained_fraction,
)


def test_hand_computed_costs():
    imp = torch.tensor([0.5, 3.0, 1.0, 0.0])
    # Oracle order 1, 2, 0, 3: cost = 1*3 + 2*1 + 3*0.5 + 4*0 = 6.5.
    assert oracle_ranking(imp).tolist() == [1, 2, 0, 3]
    assert holistic_cost(imp, torch.tensor([1, 2, 0, 3])).item() == 6.5
    # Order 3, 0, 2, 1: 1*0 + 2*0.5 + 3*1 + 4*3 = 16.
    assert holistic_cost(imp, torch.tensor([3, 0, 2, 1])).item() == 16.0
    assert holistic_reward(imp, torch.tensor([3, 0, 2, 1])).item() == pytest.approx(-16 / 6.5)
    assert holistic_score(imp, torch.tensor([3, 0, 2, 1])).item() == pytest.approx(6.5 / 16)
    # Scores: higher = keep; scores (0.1, 0.2, 0.3, 0.9) rank 3, 2, 1, 0: cost 0 + 2 + 9 + 2 = 13.
    assert holistic_cost(imp, torch.tensor([0.1, 0.2, 0.3, 0.9])).item() == 13.0
    # Retained fraction of 4.5 total at budgets 1, 2, 10 under the oracle: 3, 4, 4.5.
    kept = retained_fraction(imp, oracle_ranking(imp), [1, 2, 10])
    torch.testing.assert_close(kept, torch.tensor([3 / 4.5, 4 / 4.5, 1.0]))


def test_protected_tokens_are_kept_and_count_towards_the_budget():
    assert protected_tokens(8, 10, 2, 3).tolist() == [1, 1, 0, 0, 0, 1, 1, 1, 0, 0]
    assert protected_tokens(torch.tensor([4, 6]), 6, 1, 1).tolist() == [[1, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 1]]
    imp = torch.tensor([2.0, 0.5, 3.0, 1.0, 0.0, 1.5])  # total 8
    protected = torch.tensor([True, False, False, False, False, True])  # 3.5 kept at every budget
    scores = torch.tensor([0.0, 0.9, 0.1, 0.5, 0.2, 0.0])  # the rest ranked 1, 3, 4, 2
    kept = retained_fraction(imp, scores, [1, 2, 3, 4, 6, 10], protected=protected)
    # Budget 1 < 2 protected: NaN; 2: 3.5; 3: + imp[1] = 4; 4: + imp[3] = 5; 6: + imp[4] + imp[2] = 8.
    assert torch.isnan(kept[0])
    torch.testing.assert_close(kept[1:], torch.tensor([3.5, 4.0, 5.0, 8.0, 8.0]) / 8)
    # Rows with different splits (batched), and padding: protected_tokens per row, valid masks the padding.
    batch = retained_fraction(imp.expand(2, 6), scores.expand(2, 6), [3], torch.ones(2, 6, dtype=torch.bool), protected)
    torch.testing.assert_close(batch, torch.full((2, 1), 0.5))


def test_needle_attention_kept_by_hand():
    # Two heads, 6 tokens, needles on tokens 1-2 and 4; token 0 protected. Head 0 ranks 5, 4, 3, 2, 1 (after 0),
    # head 1 ranks 1, 2, 3, 4, 5.
    imp = torch.tensor([[1.0, 2.0, 0.0, 5.0, 3.0, 1.0], [0.0, 1.0, 1.0, 1.0, 2.0, 0.0]])
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    protected = torch.tensor([True, False, False, False, False, False])
    kept, paid = needle_attention_kept(imp, scores, [(1, 3), (4, 5)], [0, 2, 3, 4, 6], protected)
    assert paid.tolist() == [5.0, 4.0]  # head 0: 2 + 0 + 3; head 1: 1 + 1 + 2
    # Budget b keeps token 0 and the top b - 1: head 0 keeps 5 (b=2), 4 (b=3: +3), 3 (b=4), all (b=6: +2);
    # head 1 keeps 1 (b=2: +1), 2 (b=3: +1), 3 (b=4), all (b=6: +2). Budget 0 is below the protected token: NaN.
    assert kept[:, 1:].tolist() == [[0.0, 3.0, 3.0, 5.0], [1.0, 2.0, 2.0, 4.0]]
    assert kept[:, 0].isnan().all()
    none, nothing = needle_attention_kept(imp, scores, [], [2, 6], protected)
    assert none.tolist() == [[0.0, 0.0], [0.0, 0.0]] and nothing.tolist() == [0.0, 0.0]


def test_ties_keep_the_earlier_token_first():
    assert as_ranking(torch.tensor([1.0, 2.0, 1.0, 2.0])).tolist() == [1, 3, 0, 2]


def test_oracle_reward_is_minus_one_and_every_other_is_worse():
    torch.manual_seed(0)
    imp = torch.rand(64, 7) ** 3
    assert torch.equal(holistic_reward(imp, oracle_ranking(imp)), torch.full((64,), -1.0))
    rewards = torch.stack(
        [holistic_reward(imp, torch.tensor(p).expand(64, 7)) for p in itertools.permutations(range(7))]
    )
    assert (rewards <= -1 + 1e-6).all()
    assert torch.allclose(rewards.max(0).values, torch.full((64,), -1.0))  # the best permutation is the oracle's
    assert holistic_reward(torch.zeros(5), torch.tensor([4, 3, 2, 1, 0])).item() == -1.0


def test_cost_is_the_evicted_importance_summed_over_budgets():
    torch.manual_seed(1)
    for _ in range(20):
        n = int(torch.randint(1, 40, ()))
        imp, scores = torch.rand(n), torch.randn(n)
        ranking = as_ranking(scores)
        evicted = sum(imp[ranking[b:]].sum() for b in range(n))  # budgets 0..n-1
        torch.testing.assert_close(holistic_cost(imp, scores), evicted)
        kept = retained_fraction(imp, scores, list(range(n + 1)))
        torch.testing.assert_close(kept, torch.stack([imp[ranking[:b]].sum() / imp.sum() for b in range(n + 1)]))


def test_scale_invariance():
    torch.manual_seed(2)
    imp, scores = torch.rand(3, 50), torch.randn(3, 50)
    torch.testing.assert_close(holistic_reward(imp, scores), holistic_reward(imp * 123.0, scores))
    torch.testing.assert_close(retained_fraction(imp, scores, [5, 20]), retained_fraction(imp * 0.01, scores, [5, 20]))


def test_padding_is_ignored():
    imp = torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, 1.0, 2.0, 0.5]])
    valid = torch.tensor([[True, True, False, False], [True, True, True, True]])
    scores = torch.tensor([[0.0, 1.0, 5.0, 5.0], [0.1, 0.2, 0.3, 0.4]])  # high scores on padding must not count
    torch.testing.assert_close(holistic_cost(imp, scores, valid)[0], holistic_cost(imp[0, :2], scores[0, :2]))
    torch.testing.assert_close(holistic_cost(imp, scores, valid)[1], holistic_cost(imp[1], scores[1]))


def _importance_from_attention(attention: torch.Tensor, group: list[int], split: int) -> torch.Tensor:
    """The definition, from a full [H_q, S, S] attention matrix."""
    return attention[group][:, split:, :split].amax(0).sum(0)


def test_importance_equals_the_models_eager_attention(tiny):
    from kvp_gym.capture import capture_qkv

    model, tokenizer = tiny
    ids = torch.tensor([tokenizer("The special magic number for blue-cat is 1234567. " * 5)["input_ids"]])
    with torch.inference_mode(), capture_qkv(model, [1]) as captured:
        attention = model(ids, output_attentions=True).attentions[1][0]
    queries, keys, _ = (t[0] for t in captured[1])
    for kv_head, group in ((0, [0, 1]), (1, [2, 3])):
        for split in (1, 100, ids.shape[1] - 1):
            got = future_importance(queries[group], keys[kv_head], split, chunk=37)
            torch.testing.assert_close(
                got, _importance_from_attention(attention.float(), group, split), atol=1e-4, rtol=1e-4
            )


def test_batched_and_padded_equals_one_by_one():
    torch.manual_seed(3)
    lengths, splits = [30, 50, 41], [10, 25, 40]
    q, k = torch.randn(3, 2, 50, 8), torch.randn(3, 50, 8)
    batched = future_importance(q, k, torch.tensor(splits), torch.tensor(lengths), chunk=7)
    assert batched.shape == (3, 40)
    for b in range(3):
        alone = future_importance(q[b, :, : lengths[b]], k[b, : lengths[b]], splits[b])
        torch.testing.assert_close(batched[b, : splits[b]], alone)
        assert (batched[b, splits[b] :] == 0).all()


def test_one_split_for_all_episodes_equals_the_per_episode_path():
    """An int split (and length) takes the path without masks; tensors of the same values, the masked one."""
    torch.manual_seed(4)
    q, k = torch.randn(2, 3, 60, 8) * 3, torch.randn(2, 60, 8) * 3
    for split, length in ((20, None), (20, 45), (45, 45), (0, 30)):
        fast = future_importance(q, k, split, length, chunk=16)
        masked = future_importance(
            q, k, torch.tensor([split, split]), torch.tensor([60 if length is None else length] * 2), chunk=16
        )
        torch.testing.assert_close(fast, masked)
        assert fast.shape == (2, split)

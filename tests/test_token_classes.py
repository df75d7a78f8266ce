"""Token-class shares (kvp-gym evaluate-shortcut): the share, base rate and ratio formulas on a hand-made ranking,
an end-to-end run on the tiny trace checked against a direct count, and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kvp_gym.cli import main
from kvp_gym.evaluation.selection import layer_view
from kvp_gym.evaluation.stats import bootstrap_generator, resample_rows
from kvp_gym.evaluation.token_classes import (
    base_rate,
    class_mask,
    ratio_interval,
    token_class_shares,
    top_k_shares,
)
from kvp_gym.importance import ImportanceStore
from kvp_gym.models import load
from kvp_gym.traces import TraceFile
from kvp_gym.utility import protected_tokens


class _Texts:
    """A tokenizer whose token id i decodes to texts[i]."""

    def __init__(self, texts: list[str]):
        self.texts = texts

    def decode(self, ids: list[int]) -> str:
        return "".join(self.texts[i] for i in ids)


def test_digits_class_reads_the_decoded_text():
    tokenizer = _Texts(["the", " 7", "x9y", "²", "", "IV", "0"])
    assert class_mask(tokenizer, [0, 1, 2, 3, 4, 5, 6, 1], "digits").tolist() == [
        False, True, True, False, False, False, True, True,
    ]  # fmt: skip


def test_share_and_base_rate_on_a_hand_made_ranking():
    # 10 tokens; token 0 (a sink) and tokens 8-9 (recent) are protected: candidates 1..7.
    candidates = ~protected_tokens(10, 10, 1, 2)
    in_class = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1, 1], dtype=torch.bool)  # candidates in class: 2, 3, 7
    scores = torch.tensor(
        [
            [9.0, 5, 4, 3, 2, 1, 0, 6, 8, 7],  # top-3 candidates: 7, 1, 2 -> 2 of 3 in class
            [9.0, 1, 1, 0, 5, 5, 0, 0, 9, 9],  # ties, earlier first: 4, 5, 1 -> 0 of 3
        ]
    )
    assert top_k_shares(scores, candidates, in_class, 3).tolist() == pytest.approx([2 / 3, 0.0])
    assert base_rate(candidates, in_class) == pytest.approx(3 / 7)
    # A top larger than the candidates is all of them: the share is the base rate, whatever the scores.
    assert top_k_shares(scores, candidates, in_class, 64).tolist() == pytest.approx([3 / 7, 3 / 7])


def test_ratio_to_the_reference_is_the_ratio_of_means_with_paired_draws():
    mine, reference = np.array([0.2, 0.4, 0.3]), np.array([0.1, 0.1, 0.2])
    found = ratio_interval(mine, reference, bootstrap_generator(0, "x"), 200)
    draws = resample_rows(3, 200, bootstrap_generator(0, "x"))
    expected = np.percentile(mine[draws].mean(1) / reference[draws].mean(1), [2.5, 97.5])
    assert found["mean"] == pytest.approx(0.9 / 0.4)
    assert found["ci95"] == pytest.approx(expected.tolist())
    assert ratio_interval(mine, np.zeros(3), bootstrap_generator(0, "x"), 200) is None
    # A resample whose reference mean is 0: an infinite ratio, its bound reported as null (JSON has no inf).
    sparse = ratio_interval(np.array([0.5, 0.5]), np.array([0.0, 0.1]), bootstrap_generator(0, "x"), 200)
    assert sparse["mean"] == pytest.approx(10.0) and sparse["ci95"] == [5.0, None]


def test_shares_on_the_tiny_trace_match_a_direct_count(tiny_trace):
    record = token_class_shares(tiny_trace, ["oracle", "knorm"], top=64, split="all", bootstrap=50, progress=False)
    tokenizer = load("tiny-random")[1]
    trace = TraceFile(tiny_trace)
    samples, store = list(trace.samples.values()), ImportanceStore(trace)
    oracle = np.array(record["policies"]["oracle"]["per_sample_head"])
    assert record["samples"] == [s.name for s in samples] and record["oracle"] == "oracle"
    assert oracle.shape == (len(samples), 2, 2) and oracle.any()  # the needles' digits: some heads keep them
    for i, sample in enumerate(samples):
        n = sample.prompt_length
        digit = np.array([any(c in "0123456789" for c in tokenizer.decode([int(t)])) for t in sample.tokens[:n]])
        assert record["base_rate_per_sample"][i] == pytest.approx(digit[4 : n - 16].mean())  # the unprotected tokens
        for layer in range(2):  # the oracle's top-64 unprotected tokens by importance (numpy's sort), counted
            importance = layer_view(trace, store, sample, layer, 2)[1].numpy()
            for head in range(2):
                order = [t for t in np.argsort(-importance[head], kind="stable") if 4 <= t < n - 16][:64]
                assert oracle[i, layer, head] == pytest.approx(digit[order].mean(), abs=1e-6)
    trace.close()
    for found in record["policies"].values():
        share = found["share"]
        assert 0 <= share["ci95"][0] <= share["mean"] <= share["ci95"][1] <= 1
    assert record["policies"]["oracle"]["ratio_to_oracle"] == {"mean": 1.0, "ci95": [1.0, 1.0]}


def test_command_prints_the_table_and_writes_json(tiny_trace, tmp_path, capsys):
    argv = ["evaluate-shortcut", "--traces", str(tiny_trace), "--policies", "knorm,oracle", "--split", "all"]
    assert main([*argv, "--top", "8", "--bootstrap", "20", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| policy | digits share of top-8 |" in out and "| knorm |" in out
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["schema"] == "kvp-gym/token-class-shares" and set(record["policies"]) == {"knorm", "oracle"}


@pytest.mark.parametrize(
    "option, message",
    [("--token-class=vowels", "unknown token class 'vowels'; expected one of ['digits']"), ("--policies=nope", "nope")],
)
def test_command_names_an_unknown_class_or_policy(tiny_trace, option, message, capsys):
    argv = ["evaluate-shortcut", "--traces", str(tiny_trace), "--policies", "oracle", "--split", "all", option]
    assert main(argv) == 2
    assert message in capsys.readouterr().err

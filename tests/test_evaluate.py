"""kvp-gym evaluate: the record matches the utility, intervals make sense, plots are written, errors are clear."""

from __future__ import annotations

import json

import pytest
import torch

from kvp_gym.cli import main
from kvp_gym.evaluate import evaluate, format_table, heads_won, write_results
from kvp_gym.scorers import HeadView, get_scorer, score
from kvp_gym.traces import open_traces
from kvp_gym.utility import future_importance, holistic_score


def test_record_matches_a_direct_computation(tiny_trace, tmp_path):
    record = evaluate(tiny_trace, ["knorm", "oracle", "tova", "random"], split="train", bootstrap=200, progress=False)
    assert record["schema"] == "kvp-gym/trace-evaluation" and record["schema_version"] == 1
    assert len(record["traces"][0]["sha256"]) == 64 and record["model"] == "tiny-random"
    oracle = record["policies"]["oracle"]
    assert oracle["privileged"] and oracle["holistic_score"]["mean"] == pytest.approx(1.0)
    tova = record["policies"]["tova"]
    low, high = tova["holistic_score"]["ci95"]
    assert low <= tova["holistic_score"]["mean"] <= high and tova["needs_queries"]
    assert len(tova["per_layer"]) == 2 and len(tova["per_head"][0]) == 2
    assert set(tova["retained_fraction"]["absolute"]) == {"16", "32", "64", "128", "256", "512"}
    assert set(tova["retained_fraction"]["fractions"]) == {"0.05", "0.1", "0.25", "0.5"}
    # knorm by hand, every (sample, layer, head) of the train split.
    expected = []
    with open_traces(tiny_trace) as trace:
        for sample in trace.split("train"):
            for layer in (0, 1):
                for kv_head in (0, 1):
                    head = trace.head(sample, layer, kv_head)
                    n = head.prompt_length
                    importance = future_importance(head.queries, head.keys, n)
                    view = HeadView(head.keys[:n], head.values[:n], head.positions[:n], torch.ones(n, dtype=torch.bool))
                    expected.append(holistic_score(importance, score(get_scorer("knorm"), view)).item())
    assert record["policies"]["knorm"]["holistic_score"]["mean"] == pytest.approx(sum(expected) / len(expected))
    written = write_results(record, tmp_path / "out")
    assert [p.name for p in written] == [
        "results.json",
        "holistic_score.png",
        "retained_fraction.png",
        "layer_head_scores.png",
    ]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written[1:])
    assert json.loads(written[0].read_text())["policies"].keys() == record["policies"].keys()
    table = format_table(record)
    assert table.splitlines()[2].startswith("oracle") and "future (upper bound)" in table
    assert set(record["tasks"]) == {"niah_single"} and len(record["tasks"]) == len(record["samples"])
    assert record["policies"]["knorm"]["per_task"]["niah_single"] == pytest.approx(sum(expected) / len(expected))
    # heads_won: the share of the 4 (layer, head) pairs with a higher per-head mean.
    knorm, rand = (torch.tensor(record["policies"][n]["per_head"]) for n in ("knorm", "random"))
    won = heads_won(record, "knorm")
    assert won["random"] == pytest.approx((knorm > rand).float().mean().item()) and won["oracle"] == 0.0
    assert heads_won(record, "oracle")["random"] == 1.0 and "knorm" not in won
    versus = format_table(record, versus="knorm")
    assert "knorm wins" in versus.splitlines()[1] and f"{won['random']:.0%}" in versus
    with pytest.raises(ValueError, match="--versus 'kvp': not among the evaluated policies"):
        heads_won(record, "kvp")


def test_cli_errors_list_what_is_available(tiny_trace, tmp_path, capsys):
    assert main(["evaluate", "--traces", str(tiny_trace), "--policies", "knorm,nope", "--out", str(tmp_path)]) == 2
    assert "unknown policies ['nope']; available: h2o, keydiff" in capsys.readouterr().err
    assert main(["evaluate", "--traces", str(tiny_trace), "--split", "dev", "--out", str(tmp_path)]) == 2
    assert "unknown split 'dev'" in capsys.readouterr().err
    assert (
        main(
            [
                "evaluate",
                "--traces",
                str(tiny_trace),
                "--policies",
                "knorm",
                "--split",
                "val",
                "--out",
                str(tmp_path / "ok"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "knorm" in out and "wrote" in out and (tmp_path / "ok" / "results.json").exists()


def test_missing_split_names_the_splits_present(tmp_path, tiny_config):
    import dataclasses

    from kvp_gym.collect import collect

    path = tmp_path / "train-only.h5"
    collect(dataclasses.replace(tiny_config, samples=2, splits=(1.0, 0.0, 0.0)), path, progress=False)
    with pytest.raises(ValueError, match=r"no 'test' samples; splits present: \['train'\]"):
        evaluate(path, ["knorm"], split="test", progress=False)

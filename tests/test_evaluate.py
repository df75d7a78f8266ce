"""kvp-gym evaluate: the record matches the utility, intervals make sense, plots are written, errors are clear."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kvp_gym.cli import main
from kvp_gym.evaluation import evaluate, paired_comparison, trace_level_table, versus_table, write_results
from kvp_gym.evaluation.comparison import policies_table
from kvp_gym.evaluation.stats import bootstrap_generator
from kvp_gym.scorers import HeadView, get_scorer, score
from kvp_gym.traces import open_traces
from kvp_gym.utility import future_importance, holistic_score, protected_tokens


@pytest.mark.parametrize("protocol", ["raw", "paper"])
def test_record_matches_a_direct_computation(tiny_trace, tmp_path, protocol):
    record = evaluate(
        tiny_trace,
        ["knorm", "oracle", "tova", "random"],
        split="train",
        bootstrap=200,
        progress=False,
        protocol=protocol,
        versus="knorm",
    )
    assert record["schema"] == "kvp-gym/trace-evaluation" and record["schema_version"] == 2
    assert record["protocol"]["name"] == protocol
    assert len(record["traces"][0]["sha256"]) == 64 and record["model"] == "tiny-random"
    oracle = record["policies"]["oracle"]
    assert oracle["privileged"] and oracle["holistic_score"]["mean"] == pytest.approx(1.0)
    tova = record["policies"]["tova"]
    low, high = tova["holistic_score"]["ci95"]
    assert low <= tova["holistic_score"]["mean"] <= high and tova["needs_queries"]
    assert len(tova["per_layer"]) == 2 and len(tova["per_head"][0]) == 2
    assert set(tova["retained_fraction"]["absolute"]) == {"16", "32", "64", "128", "256", "512"}
    assert set(tova["retained_fraction"]["fractions"]) == {"0.05", "0.1", "0.25", "0.5"}
    # Under the paper protocol 20 tokens are always kept: a 16-token budget cannot be honoured.
    assert (tova["retained_fraction"]["absolute"]["16"] is None) == (protocol == "paper")
    # knorm by hand, every (sample, layer, head) of the train split; the paper protocol scores the ranking of
    # the tokens other than the first 4 and the last 16.
    sinks, recent = (4, 16) if protocol == "paper" else (0, 0)
    expected = []
    with open_traces(tiny_trace) as trace:
        for sample in trace.split("train"):
            for layer in (0, 1):
                for kv_head in (0, 1):
                    head = trace.head(sample, layer, kv_head)
                    n = head.prompt_length
                    importance = future_importance(head.queries, head.keys, n)
                    view = HeadView(head.keys[:n], head.values[:n], head.positions[:n], torch.ones(n, dtype=torch.bool))
                    scores = score(get_scorer("knorm"), view)
                    rest = ~protected_tokens(n, n, sinks, recent)
                    expected.append(holistic_score(importance[rest], scores[rest]).item())
    assert record["policies"]["knorm"]["holistic_score"]["mean"] == pytest.approx(sum(expected) / len(expected))
    assert np.mean(record["policies"]["knorm"]["per_sample_head"]) == pytest.approx(np.mean(expected), abs=1e-6)
    written = write_results(record, tmp_path / "out")
    assert [p.name for p in written] == [
        "results.json",
        "holistic_score.png",
        "retained_fraction.png",
        "layer_head_scores.png",
        "paired_differences.png",
    ]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written[1:])
    assert json.loads(written[0].read_text())["policies"].keys() == record["policies"].keys()
    table = trace_level_table(record)
    assert f"protocol {protocol}" in table.splitlines()[0]
    assert table.splitlines()[2].startswith("oracle") and "future (upper bound)" in table
    assert set(record["tasks"]) == {"niah_single"} and len(record["tasks"]) == len(record["samples"])
    assert record["policies"]["knorm"]["per_task"]["niah_single"] == pytest.approx(sum(expected) / len(expected))
    paired = record["paired"]
    assert paired["versus"] == "knorm" and set(paired["policies"]) == {"oracle", "tova", "random"}
    assert "knorm - policy" in table.splitlines()[1] and "knorm wins" in table.splitlines()[1]
    with pytest.raises(ValueError, match="--versus 'kvp': not among the evaluated policies"):
        evaluate(tiny_trace, ["knorm"], split="train", progress=False, versus="kvp")
    with pytest.raises(ValueError, match="unknown protocol 'strict'"):
        evaluate(tiny_trace, ["knorm"], split="train", progress=False, protocol="strict")


def _record(per_sample_head: dict[str, list]) -> dict:
    return {"policies": {name: {"per_sample_head": values} for name, values in per_sample_head.items()}}


def test_paired_comparison_by_hand():
    # 4 samples x 1 layer x 2 heads. a - b per sample (head mean): 0.1, 0.2, 0.1, 0.2 -> mean 0.15, always > 0.
    a = [[[0.5, 0.7]], [[0.6, 0.6]], [[0.4, 0.6]], [[0.9, 0.5]]]
    b = [[[0.4, 0.6]], [[0.4, 0.4]], [[0.3, 0.5]], [[0.6, 0.4]]]
    c = [[[0.6, 0.8]], [[0.4, 0.5]], [[0.5, 0.7]], [[0.8, 0.4]]]  # a - c: -0.1, 0.15, -0.1, 0.1 -> mean 0.0125
    found = paired_comparison(_record({"a": a, "b": b, "c": c}), "a", resamples=2000, seed=0)
    assert found["b"]["mean_difference"] == pytest.approx(0.15)
    low, high = found["b"]["ci95"]
    assert 0.1 - 1e-9 <= low <= 0.15 <= high <= 0.2 + 1e-9 and not found["b"]["interval_includes_zero"]
    assert found["b"]["share_of_heads_won"] == 1.0 and found["b"]["share_ci95"] == [1.0, 1.0]
    assert found["c"]["mean_difference"] == pytest.approx(0.0125) and found["c"]["interval_includes_zero"]
    # Per-head means over samples: a (0.6, 0.6) vs c (0.575, 0.6): a wins head 0 only.
    assert found["c"]["share_of_heads_won"] == 0.5
    # The same resample for both policies: a policy against itself is exactly 0 in every resample.
    assert paired_comparison(_record({"a": a, "a2": a}), "a")["a2"]["ci95"] == [0.0, 0.0]
    # A pair's numbers depend on the pair only: not on the other policies compared, nor on their order.
    alone = paired_comparison(_record({"c": c, "a": a}), "a", resamples=2000, seed=0)
    assert alone["c"] == found["c"]
    with pytest.raises(ValueError, match="not among the evaluated policies"):
        paired_comparison(_record({"a": a}), "z")


def test_bootstrap_generator_is_a_stable_function_of_the_seed_and_names():
    """The documented derivation, computed here from its definition; the same in a process with another hash seed
    (Python's hash() of a string changes between processes, SHA-256 does not)."""
    import hashlib
    import os
    import subprocess
    import sys

    digest = hashlib.sha256(json.dumps(["knorm", "holistic_score"]).encode()).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 32, 4)]
    expected = np.random.default_rng(np.random.SeedSequence([7, *words])).random(5)
    np.testing.assert_array_equal(bootstrap_generator(7, "knorm", "holistic_score").random(5), expected)
    draws = {
        names: bootstrap_generator(7, *names).random(5).tolist()
        for names in [("knorm", "holistic_score"), ("random", "holistic_score"), ("knorm", "accuracy")]
    }
    assert len({tuple(d) for d in draws.values()}) == 3  # another policy or statistic: other draws
    assert bootstrap_generator(8, "knorm", "holistic_score").random(5).tolist() != draws["knorm", "holistic_score"]
    code = (
        "from kvp_gym.evaluation.stats import bootstrap_generator as g\n"
        "print(g(7, 'knorm', 'holistic_score').random(5).tolist())"
    )
    for hash_seed in ("1", "2"):
        found = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
        )
        assert json.loads(found.stdout) == draws["knorm", "holistic_score"], found.stderr
    with pytest.raises(ValueError, match="bootstrap seed must be >= 0, got -1"):
        bootstrap_generator(-1, "knorm")


def test_a_policys_intervals_do_not_depend_on_its_company(tiny_trace):
    """The same policies evaluated with other company, in another order: exactly the same intervals, paired ones
    included (one generator per policy and statistic, per pair for paired comparisons)."""
    first = evaluate(
        tiny_trace, ["knorm", "random", "streaming_llm"], split="all", bootstrap=300, progress=False, versus="knorm"
    )
    second = evaluate(
        tiny_trace,
        ["streaming_llm", "keydiff", "random", "knorm"],
        split="all",
        bootstrap=300,
        progress=False,
        versus="knorm",
    )
    for label in ("knorm", "random", "streaming_llm"):
        np.testing.assert_array_equal(
            first["policies"][label]["per_sample_head"], second["policies"][label]["per_sample_head"]
        )
        assert first["policies"][label]["holistic_score"] == second["policies"][label]["holistic_score"]
    for label in ("random", "streaming_llm"):
        assert first["paired"]["policies"][label] == second["paired"]["policies"][label]
    knorm = first["policies"]["knorm"]["holistic_score"]
    assert knorm["ci95"][0] < knorm["mean"] < knorm["ci95"][1]  # a real interval: equal draws are not vacuous


def test_versus_table_picks_the_weakest_attention_free_and_the_best_query_using_policy(tmp_path, capsys):
    a = [[[0.5, 0.7]], [[0.6, 0.6]], [[0.4, 0.6]], [[0.9, 0.5]]]
    b = [[[0.4, 0.6]], [[0.4, 0.4]], [[0.3, 0.5]], [[0.6, 0.4]]]  # a wins both heads
    c = [[[0.6, 0.8]], [[0.4, 0.5]], [[0.5, 0.7]], [[0.8, 0.4]]]  # a wins head 0 only
    kinds = {"a": (False, False), "b": (False, False), "c": (False, False), "q": (True, False), "o": (True, True)}
    kinds["a:old"] = (False, False)  # another checkpoint of a's scorer: not a baseline, though a wins no head of it
    values = {"a": a, "b": b, "c": c, "q": b, "o": c, "a:old": [[[1.0, 1.0]]] * 4}  # q: the only fair query-using
    record = _record(values)  # policy; o: an upper bound
    record.update(schema="kvp-gym/trace-evaluation", samples=["s0", "s1", "s2", "s3"])
    for label, (needs_queries, privileged) in kinds.items():
        policy = record["policies"][label]
        policy.update(name=label.split(":")[0], needs_queries=needs_queries, privileged=privileged)
        policy["holistic_score"] = {"mean": float(np.mean(values[label]))}
    lines = versus_table({"1k": record}, "a").splitlines()
    assert len(lines) == 3
    cells = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert cells[:4] == ["1k", "4", "0.600", "50% (c)"]
    assert cells[4] == "q (0.450)" and cells[5].startswith("+0.150 [") and cells[6] == "100%"
    # The command: one row per run folder, labelled by --labels, also written to --out.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(record))
    assert main(["evaluate-table", str(tmp_path / "run"), "--versus", "a", "--out", str(tmp_path / "t.md")]) == 0
    assert "| run | 4 | 0.600 | 50% (c) |" in (tmp_path / "t.md").read_text()
    assert main(["evaluate-table", str(tmp_path / "run"), "--labels", "x,y"]) == 2
    (tmp_path / "other.json").write_text("{}")
    assert main(["evaluate-table", str(tmp_path / "other.json")]) == 2
    assert "other.json: not a results.json of kvp-gym evaluate" in capsys.readouterr().err


def test_versus_table_draws_as_the_records_own_paired_comparison():
    a = [[[0.5, 0.7]], [[0.6, 0.6]], [[0.4, 0.6]], [[0.9, 0.5]], [[0.2, 0.3]], [[0.7, 0.8]]]
    q = [[[0.6, 0.8]], [[0.4, 0.5]], [[0.5, 0.7]], [[0.8, 0.4]], [[0.1, 0.1]], [[0.75, 0.7]]]
    record = _record({"a": a, "q": q})
    record.update(schema="kvp-gym/trace-evaluation", samples=[f"s{i}" for i in range(6)], seed=5)
    for label, needs_queries in (("a", False), ("q", True)):
        policy = record["policies"][label]
        policy.update(name=label, needs_queries=needs_queries, privileged=False)
        policy["holistic_score"] = {"mean": float(np.mean(policy["per_sample_head"]))}
    cells = [cell.strip() for cell in versus_table({"1k": record}, "a").splitlines()[2].strip("|").split("|")]
    found = paired_comparison(record, "a", seed=5)["q"]  # the record's seed, not 0
    low, high = found["ci95"]
    assert cells[5] == f"{found['mean_difference']:+.3f} [{low:+.3f}, {high:+.3f}]"


def test_the_every_policy_table_has_a_row_per_policy_and_the_paired_cells_of_each_run(tmp_path, capsys):
    a = [[[0.5, 0.7]], [[0.6, 0.6]], [[0.4, 0.6]], [[0.9, 0.5]]]
    b = [[[0.4, 0.6]], [[0.4, 0.4]], [[0.3, 0.5]], [[0.6, 0.4]]]  # a - b = 0.15 on every draw's mean: a wins both heads
    c = [[[0.6, 0.8]], [[0.4, 0.5]], [[0.5, 0.7]], [[0.8, 0.4]]]
    long = _record({"a": a, "b": b})  # a second run without c
    short = _record({"a": a, "b": b, "c": c})
    for record, seed in ((short, 3), (long, 4)):
        record.update(schema="kvp-gym/trace-evaluation", samples=["s0", "s1", "s2", "s3"], seed=seed)
        for policy in record["policies"].values():
            policy["holistic_score"] = {"mean": float(np.mean(policy["per_sample_head"]))}
    lines = policies_table({"1k": short, "8k": long}, "a").splitlines()
    assert lines[0] == "| policy | 1k (4 samples) | 8k (4 samples) |"
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.strip("|").split("|")[1:]] for line in lines[2:]}
    assert list(rows) == ["a", "c", "b"]  # the versus policy first, then by score in the first run
    assert rows["a"] == ["0.600", "0.600"]
    for column, (record, seed) in enumerate(((short, 3), (long, 4))):
        found = paired_comparison(record, "a", seed=seed)["b"]  # each run's own seed
        low, high = found["ci95"]
        assert rows["b"][column] == f"0.450 ({found['mean_difference']:+.3f} [{low:+.3f}, {high:+.3f}], 100%)"
    assert rows["c"][0].startswith("0.588 (+0.012 [") and rows["c"][0].endswith(", 50%)") and rows["c"][1] == "-"
    with pytest.raises(ValueError, match="--versus 'z' is not a policy of every run"):
        policies_table({"1k": short}, "z")
    for label, record in (("short", short), ("long", long)):
        (tmp_path / label).mkdir()
        (tmp_path / label / "results.json").write_text(json.dumps(record))
    runs = [str(tmp_path / "short"), str(tmp_path / "long")]
    assert main(["evaluate-table", *runs, "--versus", "a", "--every-policy", "--labels", "1k,8k"]) == 0
    assert capsys.readouterr().out.splitlines()[:4] == lines[:4]


def test_policies_added_to_an_earlier_run_equal_one_joint_run(tiny_trace, tmp_path, capsys):
    common = ["--traces", str(tiny_trace), "--split", "all", "--bootstrap", "100"]
    assert main(["evaluate", *common, "--policies", "knorm,tova", "--out", str(tmp_path / "base")]) == 0
    added = ["evaluate", *common, "--policies", "random,oracle", "--versus", "knorm"]
    assert main([*added, "--add-to", str(tmp_path / "base"), "--out", str(tmp_path / "both")]) == 0
    both = json.loads((tmp_path / "both" / "results.json").read_text())
    joint = evaluate(
        tiny_trace, ["knorm", "tova", "random", "oracle"], split="all", bootstrap=100, progress=False, versus="knorm"
    )
    assert list(both["policies"]) == ["knorm", "tova", "random", "oracle"]
    for label in joint["policies"]:
        np.testing.assert_allclose(
            both["policies"][label]["per_sample_head"], joint["policies"][label]["per_sample_head"]
        )
        # The intervals too: each policy's draws are its own, whichever run it was evaluated in.
        assert both["policies"][label]["holistic_score"] == joint["policies"][label]["holistic_score"]
    assert set(both["paired"]["policies"]) == {"tova", "random", "oracle"} and both["paired"]["versus"] == "knorm"
    assert both["paired"] == joint["paired"]
    # Another split, or a policy evaluated twice, is refused with the reason.
    other_split = ["evaluate", "--traces", str(tiny_trace), "--split", "train", "--bootstrap", "100", "--policies"]
    assert main([*other_split, "random", "--add-to", str(tmp_path / "base"), "--out", str(tmp_path / "x")]) == 2
    assert "cannot merge evaluations: 'split' differs" in capsys.readouterr().err
    twice = [
        "evaluate",
        *common,
        "--policies",
        "tova",
        "--add-to",
        str(tmp_path / "base"),
        "--out",
        str(tmp_path / "y"),
    ]
    assert main(twice) == 2 and "policies ['tova'] are in both" in capsys.readouterr().err


def test_variants_are_labelled_and_evaluated_beside_the_published_method(tiny_trace):
    record = evaluate(tiny_trace, ["tova", "tova:heads=group", "h2o:recent=16"], split="train", progress=False)
    policies = record["policies"]
    assert policies["tova:heads=group"]["name"] == "tova" and policies["tova:heads=group"]["parameters"] == {
        "heads": "group"
    }
    assert policies["tova"]["parameters"] == {"heads": "layer"}
    assert policies["tova"]["holistic_score"] != policies["tova:heads=group"]["holistic_score"]
    with pytest.raises(ValueError, match="policy 'tova' is given twice"):
        evaluate(tiny_trace, ["tova", "tova"], split="train", progress=False)


def test_cli_errors_list_what_is_available(tiny_trace, tmp_path, capsys):
    assert main(["evaluate", "--traces", str(tiny_trace), "--policies", "knorm,nope", "--out", str(tmp_path)]) == 2
    assert "unknown policies ['nope']; available: expected_attention, h2o" in capsys.readouterr().err
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


class NeedleRanker:
    """Ranks the tokens of the given needle spans first (or last), by position: a hand-checkable scorer."""

    name, needs_queries, needs_future = "needle_ranker", False, False

    def __init__(self, spans, first: bool):
        self.spans, self.first = spans, first

    def score(self, view: HeadView) -> torch.Tensor:
        inside = torch.zeros(view.positions.shape, dtype=torch.bool)
        for start, end in self.spans:
            inside |= (view.positions >= start) & (view.positions < end)
        return inside.float() * (1 if self.first else -1) - view.positions * 1e-6  # ties: earlier first


def test_needle_retention_pools_the_needle_attention_a_budget_keeps(tiny_trace, tmp_path, tiny_config):
    import dataclasses

    from kvp_gym.collect import collect

    with open_traces(tiny_trace) as trace:
        sample = trace.split("train")[0]
        heads = [trace.head(sample, layer, kv_head) for layer in (0, 1) for kv_head in (0, 1)]
    n, spans = sample.prompt_length, sample.needle_spans
    policies = {"first": NeedleRanker(spans, True), "last": NeedleRanker(spans, False), "knorm": "knorm"}
    record = evaluate(tiny_trace, policies, split="train", max_samples=1, bootstrap=10, progress=False)
    # By hand, with explicit sets (paper protocol: 4 sink and 16 recent tokens kept at every budget, then the top
    # b - 20 of the rest): the attention paid to needle tokens that each budget keeps, over the attention paid to
    # needle tokens, pooled over the layers and heads.
    needles = np.zeros(n, bool)
    for start, end in spans:
        needles[start:end] = True
    protected = protected_tokens(n, n, 4, 16).numpy()
    positions = np.arange(n)
    importance = [future_importance(h.queries, h.keys, n).numpy() for h in heads]  # [G, n] -> [n] per head
    total = sum(imp[needles].sum() for imp in importance)
    assert needles.sum() > 20 and total > 0
    for label, first in (("first", True), ("last", False)):
        rest = positions[~protected]
        order = sorted(rest, key=lambda t: (not needles[t]) if first else needles[t])  # stable: earlier first
        for b in (32, 64, 128, 256, 512):
            kept = protected.copy()
            kept[order[: min(b, n) - 20]] = True
            expected = sum(imp[needles & kept].sum() for imp in importance) / total
            got = record["policies"][label]["needle_retention"]["absolute"][str(b)]
            assert got == pytest.approx(expected, rel=1e-5), (label, b)
    assert record["policies"]["last"]["needle_retention"]["absolute"]["32"] < 0.1  # protected needle tokens only
    knorm = record["policies"]["knorm"]["needle_retention"]
    assert knorm["absolute"]["16"] is None and set(knorm["per_task"]) == {"niah_single"}
    assert knorm["per_task"]["niah_single"] == {k: knorm[k] for k in ("absolute", "fractions")}
    assert "needles@64" in trace_level_table(record)
    # Samples without needles (free text) have no needle retention, and the table no column.
    essays = tmp_path / "essay.h5"
    collect(dataclasses.replace(tiny_config, task="essay", samples=2, splits=(1.0, 0.0, 0.0)), essays, progress=False)
    record = evaluate(essays, ["knorm"], split="train", bootstrap=10, progress=False)
    assert record["policies"]["knorm"]["needle_retention"] is None and "needles@64" not in trace_level_table(record)


def test_scorer_objects_labels_and_a_subset_of_layers_heads_and_samples(tiny_trace):
    knorm, half = get_scorer("knorm"), get_scorer("h2o", recent=16)
    record = evaluate(
        tiny_trace,
        {"mine": knorm, "tova": "tova", "h2o-object": half},
        split="all",
        bootstrap=50,
        progress=False,
        layers=[1],
        heads=[1],
        max_samples=2,
    )
    assert list(record["policies"]) == ["mine", "tova", "h2o-object"]
    assert record["layers"] == [1] and record["heads"] == [1] and len(record["samples"]) == 2
    full = evaluate(tiny_trace, ["knorm", "tova", "h2o:recent=16"], split="all", bootstrap=50, progress=False)
    for label, same in (("mine", "knorm"), ("tova", "tova"), ("h2o-object", "h2o:recent=16")):
        subset = np.asarray(record["policies"][label]["per_sample_head"])
        np.testing.assert_allclose(subset, np.asarray(full["policies"][same]["per_sample_head"])[:2, 1:, 1:])

    # A per-head scorer trained for some heads only sees those (as `kvp-gym train --heads 1:1` would leave it).
    class OneHeadOnly:
        name, needs_queries, needs_future = "one-head", False, False

        def score(self, view: HeadView) -> torch.Tensor:
            assert view.kv_head.tolist() == [1] and view.layer.tolist() == [1], "scored a head it was not trained for"
            return view.keys.float().norm(dim=-1)

    only = evaluate(tiny_trace, [OneHeadOnly()], split="all", bootstrap=5, progress=False, layers=[1], heads=[1])
    assert list(only["policies"]) == ["one-head"]
    # Objects without a given label: the name with the parameters that differ from the defaults.
    labels = list(evaluate(tiny_trace, [knorm, half], split="train", bootstrap=5, progress=False)["policies"])
    assert labels == ["knorm", "h2o:recent=16"]
    with pytest.raises(ValueError, match="'knorm' is given twice"):
        evaluate(tiny_trace, [knorm, "knorm"], progress=False)
    with pytest.raises(ValueError, match=r"layers \[7\]: expected distinct recorded layers, from \[0, 1\]"):
        evaluate(tiny_trace, ["knorm"], layers=[7], progress=False)
    with pytest.raises(ValueError, match="expected a spec string or an object with name"):
        evaluate(tiny_trace, [42], progress=False)


def test_an_env_policy_scores_the_same_in_the_env_and_in_the_table(tiny_trace):
    """evaluation_episodes replays exactly the table's episodes; EnvPolicyScorer runs the policy behind the scorer
    contract. The env's mean holistic score over those episodes is the table's number, under both protocols."""
    import gymnasium as gym

    from kvp_gym.envs.scorer import EnvPolicyScorer
    from kvp_gym.evaluation import evaluation_episodes

    def policy(obs):  # a stand-in for a trained network: key norm, plus a little of the last query's attention
        keys = torch.as_tensor(obs["key"])
        last = torch.as_tensor(obs["query"])[:, :, -1]  # [B, G, D], right-aligned window
        attention = torch.einsum("bgd,btd->bt", last, keys)
        return torch.tanh(0.1 * keys.norm(dim=-1) + 0.01 * attention)

    for protocol, (sinks, recent) in (("paper", (4, 16)), ("raw", (0, 0))):
        env = gym.make(
            "KVEvict-v0",
            config={"traces": str(tiny_trace), "observe_queries": "window:4", "sinks": sinks, "recent": recent},
        )
        scorer = EnvPolicyScorer(policy, env, name="mine")
        assert scorer.needs_queries
        record = evaluate(tiny_trace, [scorer], split="val", bootstrap=5, progress=False, protocol=protocol)
        in_env = []
        for key in evaluation_episodes(tiny_trace, split="val"):
            obs, _ = env.reset(options={"episode": key})
            batch = {k: np.asarray(v)[None] for k, v in obs.items()}
            _, _, _, _, info = env.step(policy(batch)[0].numpy())
            in_env.append(info["holistic_score"])
        table = np.asarray(record["policies"]["mine"]["per_sample_head"]).reshape(-1)
        np.testing.assert_allclose(in_env, table, atol=1e-5)
        assert record["policies"]["mine"]["holistic_score"]["mean"] == pytest.approx(np.mean(in_env), abs=1e-6)


def test_table_headers_are_never_cut_and_columns_line_up(tiny_trace):
    long_name = "my-recency-heuristic (examples/mine.py)"
    record = evaluate(
        tiny_trace,
        {long_name: get_scorer("streaming_llm"), "tova": "tova"},
        split="all",
        bootstrap=5,
        progress=False,
        layers=[1],
        versus=long_name,
    )
    long_task = "niah_multikey_with_a_long_name"  # two tasks (as two trace files would give): one column each
    record["tasks"] = ["niah_single", long_task]
    for policy in record["policies"].values():
        policy["per_task"][long_task] = policy["per_task"]["niah_single"]
    lines = trace_level_table(record).splitlines()
    header, rows = lines[1], lines[2:4]
    for label in (long_task, f"{long_name} - policy", f"{long_name} wins"):
        assert f" {label} " in header  # whole, between spaces
    # Every row's cells end where the header's labels end, so "sees" starts in the same column everywhere.
    sees_column = header.index("  sees")
    assert all(row.index("  K/V" if row.startswith(long_name) else "  queries") == sees_column for row in rows)
    tova_row = next(row for row in rows if row.startswith("tova"))
    assert tova_row[: header.index(f"{long_name} wins") + len(f"{long_name} wins")].endswith("%")


def test_plot_styles_draw_the_leader_strongest_and_references_neutral():
    from kvp_gym.evaluation.report import OKABE_ITO, REFERENCE_GREY, line_styles

    ranked = ["oracle", "kvp", *(f"method{i}" for i in range(10))]  # best first, as the plots order them
    styles = line_styles(ranked, privileged={"oracle"})
    assert styles["oracle"]["color"] == REFERENCE_GREY and styles["oracle"]["linestyle"] == "--"
    leader = styles["kvp"]
    others = [styles[label] for label in ranked[2:]]
    assert all(leader["linewidth"] > s["linewidth"] and leader["zorder"] > s["zorder"] for s in others)
    assert leader["color"] == OKABE_ITO[0] and {s["color"] for s in others} <= set(OKABE_ITO[1:])
    assert len({s["color"] for s in others[:6]}) == 6  # the first six others: six different colours
    drawn = [(s["color"], str(s["linestyle"]), s["marker"]) for s in styles.values()]
    assert len(set(drawn)) == len(drawn)  # no two lines look alike

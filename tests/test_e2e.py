"""evaluate-e2e on tiny-random: the record's numbers come from the parts, resuming recomputes nothing, shards merge
to the single run, bad settings are clear errors."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from kvp_gym import models
from kvp_gym.cache.generate import future_attention, prefill
from kvp_gym.capture import capture_qkv
from kvp_gym.cli import main
from kvp_gym.evaluation.comparison import end_to_end_paired
from kvp_gym.evaluation.end_to_end import E2EConfig, merge, read_parts, run, summarize
from kvp_gym.evaluation.report import end_to_end_table
from kvp_gym.evaluation.run_folder import part_path, run_settings, write_settings
from kvp_gym.evaluation.stats import spearman
from kvp_gym.scorers import resolve_policies
from kvp_gym.storage import file_sha256
from kvp_gym.utility import future_importance

CONFIG = E2EConfig(
    model="tiny-random",
    tasks=("niah_single",),
    context=700,
    budgets=(32, 64),
    policies=("knorm", "tova", "oracle", "streaming_llm"),
    samples=2,
    essays=1,
    continuation=8,
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    return out, run(CONFIG, out, progress=False)


def test_record_is_built_from_the_parts(finished):
    out, record = finished
    assert record["schema"] == "kvp-gym/e2e-evaluation" and record["samples"] == {"niah_single": 2, "essay": 1}
    parts = sorted((out / "parts").glob("*.json"))
    assert [p.name for p in parts] == ["essay-00000.json", "niah_single-00000.json", "niah_single-00001.json"]
    rows = [json.loads(p.read_text()) for p in parts[1:]]
    for label in ("knorm", "tova", "oracle", "streaming_llm"):
        for budget in ("32", "64"):
            scores = [r["policies"][label]["budgets"][budget]["score"] for r in rows]
            assert record["accuracy"]["niah_single"]["policies"][label][budget]["mean"] == pytest.approx(
                np.mean(scores)
            )
        essay = json.loads(parts[0].read_text())["policies"][label]["budgets"]["32"]["perplexity"]
        assert record["perplexity"]["policies"][label]["32"]["mean"] == pytest.approx(essay)
        assert 0 < record["holistic_score"][label] <= 1
    assert record["holistic_score"]["oracle"] == pytest.approx(1.0)  # ranks by the continuation's own attention
    assert set(record["proxy_correlation"]) == {"32", "64"}
    # Needle retention: the attention paid to needle tokens that each budget keeps, pooled over the task prompts.
    needles = [r["policies"]["knorm"]["needle_attention"] for r in rows]
    assert all(0 < n["kept"]["32"] <= n["kept"]["64"] <= n["paid"] for n in needles)
    assert json.loads(parts[0].read_text())["policies"]["knorm"]["needle_attention"] is None  # an essay: no needles
    for label in ("knorm", "tova", "oracle", "streaming_llm"):
        attention = [r["policies"][label]["needle_attention"] for r in rows]
        assert [a["paid"] for a in attention] == pytest.approx([n["paid"] for n in needles])  # the same continuation
        expected = sum(a["kept"]["64"] for a in attention) / sum(a["paid"] for a in attention)
        assert record["needle_retention"][label]["64"] == pytest.approx(expected)
    correlation = record["proxy_correlation"]["64"]  # tiny-random answers nothing: accuracy is constant, rho n/a
    assert "spearman_needle_retention" in correlation and correlation["spearman"] is None
    table = end_to_end_table(record)
    assert "full_cache" in table and "niah_single@32" in table and "ppl@64" in table
    # The oracle (privileged: its holistic score is 1 by construction) is left out of the correlations.
    assert correlation["policies"] == ["knorm", "tova", "streaming_llm"]
    assert (
        "budget 64: Spearman correlation across 3 policies (privileged ones left out) of needle retention vs mean "
        "accuracy" in table
    )
    assert (out / "accuracy_vs_budget.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "perplexity_vs_budget.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_recomputes_nothing_and_shards_merge_to_the_single_run(finished, tmp_path):
    out, record = finished
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.json")}
    assert run(CONFIG, out, progress=False)["accuracy"] == record["accuracy"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.json")} == stamps
    (out / "parts" / "niah_single-00001.json").unlink()  # as if stopped before the last sample
    resumed = run(CONFIG, out, progress=False)
    assert resumed["accuracy"] == record["accuracy"] and resumed["perplexity"] == record["perplexity"]
    for i in range(2):
        assert run(CONFIG, tmp_path / f"shard{i}", shard=(i, 2), progress=False) is None
    merged = merge(tmp_path / "merged", [tmp_path / "shard0", tmp_path / "shard1"])
    assert merged["accuracy"] == record["accuracy"] and merged["holistic_score"] == record["holistic_score"]
    with pytest.raises(ValueError, match="holds a run with other settings"):
        run(E2EConfig(**{**CONFIG.__dict__, "budgets": (48,)}), out, progress=False)
    shutil.rmtree(tmp_path / "shard1" / "parts")
    with pytest.raises(ValueError, match="is not evaluated yet"):
        merge(tmp_path / "partial", [tmp_path / "shard0"])


def test_a_changed_checkpoint_behind_a_label_is_refused_on_resume(tmp_path):
    import torch

    from kvp_gym_agents.checkpoint import save_checkpoint
    from kvp_gym_agents.kvp import KVPNetwork

    checkpoint = tmp_path / "agents.safetensors"

    def write_agents(seed):
        torch.manual_seed(seed)
        network = KVPNetwork(heads=4, head_dim=16, width=16, position_dim=4, buckets=8, max_age=64)
        geometry = {"head_dim": 16, "num_layers": 2, "num_kv_heads": 2}
        save_checkpoint(
            checkpoint, network, [(0, 0), (0, 1), (1, 0), (1, 1)], {"model": "tiny-random", "geometry": geometry}
        )

    write_agents(0)
    label = f"kvp:checkpoint={checkpoint}"
    config = E2EConfig(**{**CONFIG.__dict__, "policies": (label,), "samples": 1, "essays": 0, "budgets": (32,)})
    record = run(config, tmp_path / "run", progress=False)
    assert record["policies"][label]["files"] == {str(checkpoint): file_sha256(checkpoint)}
    assert run(config, tmp_path / "run", progress=False)["accuracy"] == record["accuracy"]  # same file: resumes
    write_agents(1)  # other weights under the same label: the finished parts no longer describe it
    with pytest.raises(ValueError, match=rf"other settings \({re.escape(label)} read .*agents.safetensors \(SHA-256"):
        run(config, tmp_path / "run", progress=False)
    shard = tmp_path / "shard"
    run(config, shard, shard=(0, 2), progress=False)
    write_agents(0)
    run(config, tmp_path / "shard1", shard=(1, 2), progress=False)
    with pytest.raises(ValueError, match="other settings than .*agents.safetensors"):
        merge(tmp_path / "merged", [shard, tmp_path / "shard1"])


def _part(full: dict, policies: dict[str, dict[str, dict]]) -> dict:
    return {"full_cache": full, "policies": {label: {"budgets": b} for label, b in policies.items()}}


def test_paired_end_to_end_comparison_by_hand():
    parts = {  # three needle prompts (scores) and two essays (perplexities), budgets 64 and 128
        ("niah_single", 0): _part(
            {"score": 1.0},
            {"a": {"64": {"score": 1.0}, "128": {"score": 1.0}}, "b": {"64": {"score": 0.0}, "128": {"score": 1.0}}},
        ),
        ("niah_single", 1): _part(
            {"score": 1.0},
            {"a": {"64": {"score": 0.0}, "128": {"score": 1.0}}, "b": {"64": {"score": 0.0}, "128": {"score": 0.0}}},
        ),
        ("niah_single", 2): _part(
            {"score": 0.0},
            {"a": {"64": {"score": 1.0}, "128": {"score": 1.0}}, "b": {"64": {"score": 1.0}, "128": {"score": 0.0}}},
        ),
        ("essay", 0): _part(
            {"perplexity": 10.0},
            {
                "a": {"64": {"perplexity": 20.0}, "128": {"perplexity": 12.0}},
                "b": {"64": {"perplexity": 40.0}, "128": {"perplexity": 12.0}},
            },
        ),
        ("essay", 1): _part(
            {"perplexity": 5.0},
            {
                "a": {"64": {"perplexity": 10.0}, "128": {"perplexity": 6.0}},
                "b": {"64": {"perplexity": 10.0}, "128": {"perplexity": 3.0}},
            },
        ),
    }
    paired = end_to_end_paired(parts, "a", resamples=200)
    b = paired["niah_single"]["b"]
    assert b["64"]["mean"] == pytest.approx(1 / 3) and b["64"]["difference"] == pytest.approx(1 / 3)
    assert b["128"]["difference"] == pytest.approx(2 / 3)
    assert -1 <= b["64"]["ci95"][0] <= b["64"]["difference"] <= b["64"]["ci95"][1] <= 1
    full = paired["niah_single"]["full_cache"]  # the full cache: one result at every budget
    assert full["64"]["mean"] == full["128"]["mean"] == pytest.approx(2 / 3)
    assert full["64"]["difference"] == pytest.approx(0.0) and full["128"]["difference"] == pytest.approx(1 / 3)
    # Essays: geometric means and the geometric mean of the per-essay ratio a / b.
    essay = paired["essay"]["b"]["64"]
    assert essay["mean"] == pytest.approx((40 * 10) ** 0.5) and essay["ratio"] == pytest.approx((0.5 * 1.0) ** 0.5)
    assert essay["ci95"][0] == pytest.approx(0.5) and essay["ci95"][1] == pytest.approx(1.0)  # two essays
    assert paired["essay"]["b"]["128"]["ratio"] == pytest.approx((1.0 * 2.0) ** 0.5)
    assert paired["essay"]["full_cache"]["64"]["ratio"] == pytest.approx(2.0)
    assert set(paired["essay"]) == {"full_cache", "b"}  # versus is not compared with itself
    assert end_to_end_paired(parts, "full_cache", resamples=200)["niah_single"]["a"]["64"]["difference"] == (
        pytest.approx(0.0)
    )
    with pytest.raises(ValueError, match="--versus 'c' is not a policy of this run"):
        end_to_end_paired(parts, "c")


def test_the_paired_comparison_command_on_a_run(finished, tmp_path, capsys):
    out, record = finished
    paired = end_to_end_paired(read_parts(out), "tova")
    for label in ("knorm", "oracle", "streaming_llm"):  # each side's mean is the record's own
        for budget in ("32", "64"):
            accuracy = record["accuracy"]["niah_single"]["policies"][label][budget]["mean"]
            assert paired["niah_single"][label][budget]["mean"] == pytest.approx(accuracy)
            mine = record["accuracy"]["niah_single"]["policies"]["tova"][budget]["mean"]
            assert paired["niah_single"][label][budget]["difference"] == pytest.approx(mine - accuracy)
            perplexity = record["perplexity"]["policies"][label][budget]["mean"]
            assert paired["essay"][label][budget]["mean"] == pytest.approx(perplexity)
            ratio = record["perplexity"]["policies"]["tova"][budget]["mean"] / perplexity  # one essay
            assert paired["essay"][label][budget]["ratio"] == pytest.approx(ratio)
    md = tmp_path / "versus.md"
    assert main(["evaluate-e2e-versus", str(out), "--versus", "tova", "--out", str(md)]) == 0
    printed = capsys.readouterr().out
    assert md.read_text() == printed and "**niah_single** (2 prompts)" in printed and "| knorm |" in printed
    assert "**essay** (1 prompts)" in printed and "tova / it" in printed


def test_bad_settings_and_the_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match="budgets must be at least the 20 protected tokens"):
        E2EConfig(budgets=(16,))
    with pytest.raises(ValueError, match="has no answers to score"):
        E2EConfig(tasks=("essay",))
    with pytest.raises(SystemExit):
        main(["evaluate-e2e", "--out", str(tmp_path), "--samples", "-1"])
    assert "expected an integer >= 0, got '-1'" in capsys.readouterr().err
    code = main(
        ["evaluate-e2e", "--model", "tiny-random", "--tasks", "niah_single", "--context", "700", "--budgets", "32"]
        + ["--policies", "knorm,nope", "--samples", "1", "--essays", "0", "--out", str(tmp_path / "x")]
    )
    assert code == 2 and "unknown policies ['nope']" in capsys.readouterr().err


def test_summary_intervals_ignore_the_company_and_correlations_leave_out_privileged_policies(tmp_path):
    """A run folder of 24 synthetic prompts (each policy answers with its own rate): summarized with any subset of
    its policies, in any order, a policy's intervals are the same; the proxy correlation is Spearman's over the
    unprivileged policies only."""
    labels = ["knorm", "random", "streaming_llm", "tova", "oracle"]
    rate = {"knorm": 0.4, "random": 0.1, "streaming_llm": 0.3, "tova": 0.6, "oracle": 0.9}
    holistic = {"knorm": 0.5, "random": 0.3, "streaming_llm": 0.6, "tova": 0.7, "oracle": 1.0}
    config = E2EConfig(
        model="tiny-random", tasks=("niah_single",), budgets=(32,), policies=tuple(labels), samples=24, essays=0
    )
    scorers, _, _ = resolve_policies(labels)
    write_settings(tmp_path, run_settings(config, scorers))
    rng = np.random.default_rng(0)
    (tmp_path / "parts").mkdir()
    for _, index in config.work():
        part = {"task": "niah_single", "index": index, "full_cache": {"score": float(rng.random() < 0.95)}}
        part |= {"skipped": {}, "seconds": {"prefill": 0.0, "decode": 0.0, "scoring": 0.0}}
        part["policies"] = {
            label: {
                "holistic_score": holistic[label] + 0.01 * rng.random(),
                "needle_attention": None,
                "budgets": {"32": {"score": float(rng.random() < rate[label])}},
            }
            for label in labels
        }
        part_path(tmp_path / "parts", "niah_single", index).write_text(json.dumps(part))
    full = summarize(tmp_path, scorers, set())
    some = summarize(tmp_path, {label: scorers[label] for label in ["oracle", "tova", "knorm"]}, set())
    for label in ("knorm", "tova", "oracle"):
        assert some["accuracy"]["niah_single"]["policies"][label] == full["accuracy"]["niah_single"]["policies"][label]
    assert some["accuracy"]["niah_single"]["full_cache"] == full["accuracy"]["niah_single"]["full_cache"]
    knorm = full["accuracy"]["niah_single"]["policies"]["knorm"]["32"]
    assert knorm["ci95"][0] < knorm["mean"] < knorm["ci95"][1]  # a real interval: equal draws are not vacuous
    fair = ["knorm", "random", "streaming_llm", "tova"]
    correlation = full["proxy_correlation"]["32"]
    assert correlation["policies"] == fair
    accuracy = [full["accuracy"]["niah_single"]["policies"][label]["32"]["mean"] for label in fair]
    assert correlation["spearman"] == pytest.approx(spearman([full["holistic_score"][x] for x in fair], accuracy))
    assert some["proxy_correlation"] == {}  # two unprivileged policies: nothing to correlate


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [5, 5, 5]) is None
    # Ties take their average rank: x ranks (0, 1.5, 1.5, 3), y ranks (0, 1, 2, 3) -> r = 0.9487.
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)


def test_the_progress_estimate_weighs_each_sample_by_its_decoding(finished, tmp_path, capsys):
    bench = E2EConfig(tasks=("niah_single", "niah_multiquery"), context=1024, budgets=(64, 128, 256))
    needle, long_answer, essay = (bench.cost(task) for task in ("niah_single", "niah_multiquery", "essay"))
    # An essay teacher-forces its 64 tokens through the full cache and 3 budgets; a needle answer stops after a few
    # of its 16 tokens. Measured here (9 policies, a loaded machine): 590 s for an essay, 140-180 s for a needle.
    assert 3 * needle < essay < 5 * needle
    assert needle < long_answer  # niah_multiquery answers four needles
    assert E2EConfig(**{**bench.__dict__, "budgets": (64,)}).cost("essay") < essay
    assert E2EConfig(**{**bench.__dict__, "context": 2048}).cost("niah_single") > needle
    # A resumed run's bar counts what is left in those units: here one task prompt and the essay.
    out, _ = finished
    shutil.copytree(out, tmp_path / "run")
    (tmp_path / "run" / "parts" / "niah_single-00001.json").unlink()
    (tmp_path / "run" / "parts" / "essay-00000.json").unlink()
    run(CONFIG, tmp_path / "run", progress=True)
    total = CONFIG.cost("niah_single") + CONFIG.cost("essay")
    assert re.search(rf"evaluate-e2e: 100%\|.*\| {total}/{total} \[.*, 2/2 samples\]", capsys.readouterr().err)


@pytest.mark.parametrize("name", ["tiny-random", "tiny-gemma3"])
def test_the_oracle_importance_from_the_cached_continuation_equals_one_pass_over_prompt_and_continuation(name):
    """Only the continuation runs, into a copy of the prefilled cache; the reference runs prompt + continuation in one
    pass. tiny-gemma3's prompt crosses its sliding window: its global layers are the ones ranked."""
    model, _ = models.load(name)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.get_text_config().vocab_size, (300,), generator=generator).tolist()
    future = ids[-7:]  # any tokens will do
    state = prefill(model, ids)
    attention = state.cache.attention
    found = future_attention(model, state, future)
    assert sorted(found) == attention.global_layers and len(attention.global_layers) >= 1
    with torch.inference_mode(), capture_qkv(model, attention.global_layers) as captured:
        model(torch.tensor([ids + future]))
    for layer, (queries, keys, _) in captured.items():
        expected = future_importance(
            attention.group_queries(queries)[0], keys[0], len(ids), attention=attention.specs[layer]
        )
        assert found[layer].shape == (1, attention.num_kv_heads, len(ids))
        torch.testing.assert_close(found[layer][0], expected, atol=2e-3, rtol=1e-2)
        assert float(found[layer].sum()) > 1  # the continuation paid attention to the prompt
    assert all(float(v.abs().sum()) == 0 for v in future_attention(model, state, []).values())
    assert state.cache.physical_length() == len(ids)  # the prefilled cache is untouched

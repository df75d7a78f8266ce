"""A policy file on the board without a package: examples/reinforce.py's TokenPolicy behind EnvPolicyScorer, loaded
from a Python file by ``kvp-gym submit --policy-file FILE.py:FACTORY``, pinned by SHA-256, validated, rerun and
refused once changed; the spec form ``file:PATH:FACTORY`` everywhere else (evaluate, the e2e run's settings)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from tiny_benchmark import benchmark_toml

import kvp_gym  # noqa: F401  (registers KVEvict-v0)
from kvp_gym.cli import main
from kvp_gym.evaluation import evaluate
from kvp_gym.evaluation.run_folder import run_settings, settings_differences
from kvp_gym.scorers import FileScorer, ScorerError, file_spec, from_spec, scorer_files, with_parameters
from kvp_gym.storage import file_sha256
from kvp_gym_leaderboard.benchmark import load_benchmark, prepare
from kvp_gym_leaderboard.submission import read_entry, validate

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "reinforce.py"
BENCHMARK = benchmark_toml(
    "tiny-file-v0", "tiny-random, for the policy-file tests", {"contexts": [600]}, {"context": 600}
)
# What a user writes: the example's policy, its weights from the checkpoint submit hands over, the env it was
# trained in (the paper protocol, as the benchmark's, padded past the benchmark's longest prompt).
POLICY = '''"""REINFORCE (examples/reinforce.py): a per-token MLP over keys, values and ages, trained on KVEvict-v0."""
import importlib.util
from pathlib import Path

import gymnasium as gym
import torch

import kvp_gym  # noqa: F401
from kvp_gym.envs.scorer import EnvPolicyScorer

EXAMPLE = Path({example!r})
TRACES = {traces!r}


def make_scorer(checkpoint, hidden=64):
    spec = importlib.util.spec_from_file_location("reinforce_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    config = {{"traces": TRACES, "split": "test", "sinks": 4, "recent": 16, "max_tokens": 1024}}
    env = gym.make("KVEvict-v0", config=config)
    policy = example.TokenPolicy(env.observation_space["key"].shape[-1], hidden)
    policy.load_state_dict(torch.load(checkpoint))
    return EnvPolicyScorer(policy.eval(), env, name="reinforce")


def not_a_scorer():
    return 42
'''


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """(benchmark, trace folder) of a tiny benchmark, prepared and its manifest written."""
    root = tmp_path_factory.mktemp("bench")
    (root / "tiny-file-v0.toml").write_text(BENCHMARK)
    benchmark = load_benchmark(root / "tiny-file-v0.toml")
    assert prepare(benchmark, root / "set", write_manifest=True, progress=False) == []
    return benchmark, root / "set"


@pytest.fixture(scope="module")
def policy(bench, tmp_path_factory):
    """(policy file, weights): the file above, and a freshly initialised TokenPolicy's state_dict beside it."""
    benchmark, traces = bench
    folder = tmp_path_factory.mktemp("mine")
    paths = [str(traces / name) for _, _, name in benchmark.trace_files()]
    file = folder / "my_policy.py"
    file.write_text(POLICY.format(example=str(EXAMPLE), traces=paths))
    spec = importlib.util.spec_from_file_location("reinforce_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    head_dim = gym.make("KVEvict-v0", config={"traces": paths, "split": "test"}).observation_space["key"].shape[-1]
    torch.manual_seed(0)
    torch.save(example.TokenPolicy(head_dim).state_dict(), folder / "weights.pt")
    return file, folder / "weights.pt"


def submit_argv(bench, work: Path) -> list[str]:
    benchmark, traces = bench
    return ["submit", "--benchmark", str(benchmark.path), "--traces", str(traces), "--work", str(work)]


@pytest.fixture(scope="module")
def submitted(bench, policy, tmp_path_factory) -> Path:
    """The entry ``kvp-gym submit --policy-file my_policy.py:make_scorer --checkpoint weights.pt`` writes."""
    file, weights = policy
    out = tmp_path_factory.mktemp("entries") / "entry.json"
    argv = [*submit_argv(bench, tmp_path_factory.mktemp("work")), "--policy-file", f"{file}:make_scorer"]
    assert main([*argv, "--checkpoint", str(weights), "--trace-level-only", "--out", str(out)]) == 0
    return out


def test_a_policy_file_is_submitted_validated_and_rerun(bench, policy, submitted, tmp_path, capsys):
    benchmark, traces = bench
    file, weights = policy
    entry = json.loads(submitted.read_text())
    assert entry["name"] == "my_policy" and entry["kind"] == "attention-free"
    assert entry["description"].startswith("REINFORCE (examples/reinforce.py)")  # the file's docstring
    load = entry["load"]
    assert "entry_point" not in load and load["scorer"] == "reinforce" and load["parameters"] == {}
    pinned = load["policy_file"]
    assert pinned["sha256"] == file_sha256(file) and pinned["factory"] == "make_scorer"
    # Stored relative to the entry, like the checkpoint, so that they move together.
    assert not Path(pinned["path"]).is_absolute() and (submitted.parent / pinned["path"]).resolve() == file.resolve()
    assert load["checkpoint"]["sha256"] == file_sha256(weights)
    # The entry's number is the file's scorer's: the same as evaluating its spec directly under the paper protocol.
    paths = [traces / name for _, _, name in benchmark.trace_files()]
    spec = file_spec(file, "make_scorer", {"checkpoint": str(weights)})
    direct = evaluate(paths, [spec], split="test", protocol="paper", bootstrap=10, progress=False)
    stated = entry["results"]["trace_level"]["holistic_score"]["mean"]
    assert stated == pytest.approx(direct["policies"][spec]["holistic_score"]["mean"], abs=1e-4)
    capsys.readouterr()
    check = ["leaderboard", "validate", "--benchmark", str(benchmark.path)]
    assert main([*check, str(submitted)]) == 0
    rerun = ["--rerun", "--traces", str(traces), "--work", str(tmp_path / "rerun")]
    assert main([*check, *rerun, str(submitted)]) == 0, capsys.readouterr().err
    assert "1 entry valid, numbers reproduced" in capsys.readouterr().out

    # The entry, its policy file and weights move together; a changed file is refused without running its code.
    moved = tmp_path / "moved"
    shutil.copytree(submitted.parent, moved / submitted.parent.name)
    shutil.copytree(file.parent, moved / file.parent.name)
    moved_entry, moved_file = moved / submitted.parent.name / submitted.name, moved / file.parent.name / file.name
    assert validate([moved_entry], benchmark) == []
    moved_file.write_text(moved_file.read_text() + "raise RuntimeError('a changed file must not run')\n")
    problems = validate([moved_entry], benchmark)
    named = moved_entry.parent / pinned["path"]  # the path as the entry gives it, from the entry's folder
    assert named.resolve() == moved_file.resolve()
    digest = file_sha256(moved_file)
    assert problems == [f"{moved_entry}: $.load.policy_file.sha256: {named} has SHA-256 {digest}, not the entry's"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda load: load["policy_file"].update(factory="make_scorr"),
            "$.load: cannot load the policy file's scorer 'reinforce' to read what it declares: policy file {file} has "
            "no function 'make_scorr'; it defines make_scorer, not_a_scorer",
        ),
        (
            lambda load: load.update(entry_point="kvp_gym_baselines.knorm:KNorm"),
            "$.load: expected exactly one of entry_point or policy_file",
        ),
        (lambda load: load["policy_file"].pop("sha256"), "$.load.policy_file: 'sha256' is a required property"),
    ],
)
def test_a_bad_load_record_of_a_policy_file_is_one_clear_line(bench, policy, submitted, tmp_path, edit, message):
    benchmark, _ = bench
    file, _ = policy
    entry = read_entry(submitted)  # the pinned paths made absolute: the edited copy can live anywhere
    edit(entry["load"])
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(entry))
    assert validate([path], benchmark) == [f"{path}: " + message.format(file=file.resolve())]


def test_a_missing_factory_or_a_non_scorer_is_a_clear_error_naming_the_file(bench, policy, tmp_path, capsys):
    file, weights = policy
    out = tmp_path / "x.json"
    argv = [*submit_argv(bench, tmp_path / "w"), "--trace-level-only", "--out", str(out)]
    resolved = file.resolve()
    for given, message in [
        (f"{file}:make_scorr", f"policy file {resolved} has no function 'make_scorr'; it defines make_scorer, "),
        (f"{file}:not_a_scorer", f"policy file {resolved}: not_a_scorer() returned int, not a scorer: expected "),
        (f"{tmp_path / 'nope.py'}:make_scorer", f"--policy-file {tmp_path / 'nope.py'}:make_scorer: no such file"),
        (str(file), "a policy file is written file:PATH.py:FACTORY"),
    ]:
        assert main([*argv, "--policy-file", given]) == 2
        assert message in capsys.readouterr().err, given
    assert main([*argv, "--policy-file", f"{file}:not_a_scorer", "--checkpoint", str(weights)]) == 2
    assert f"policy file {resolved}: not_a_scorer() cannot be called with checkpoint: " in capsys.readouterr().err
    assert main(argv) == 2
    assert "give the policy to evaluate: --policy NAME" in capsys.readouterr().err
    assert not out.exists()


def test_the_spec_form_pins_the_file_for_resumable_runs(bench, policy, tmp_path):
    """``file:PATH:FACTORY[:params]`` builds the scorer wherever a spec is read, and its files (the policy file and
    the checkpoint) are what an e2e run's settings record: a changed file is another run."""
    benchmark, _ = bench
    file, weights = policy
    copy = tmp_path / file.name
    shutil.copy(file, copy)
    spec = with_parameters(file_spec(copy, "make_scorer"), checkpoint=str(weights))
    assert spec == f"file:{copy}:make_scorer:checkpoint={weights}"
    assert with_parameters(spec, hidden=64) == f"{spec};hidden=64"
    scorer = from_spec(spec)
    assert isinstance(scorer, FileScorer) and scorer.name == "reinforce" and not scorer.needs_queries
    assert scorer_files(scorer) == {str(copy): file_sha256(copy), str(weights): file_sha256(weights)}
    before = run_settings(benchmark.e2e_config((spec,)), {spec: scorer})
    copy.write_text(copy.read_text() + "# another version\n")
    after = run_settings(benchmark.e2e_config((spec,)), {spec: from_spec(spec)})
    changed = settings_differences(before, after)
    assert len(changed) == 1 and changed[0].startswith(f"{spec} read {copy} (SHA-256 {file_sha256(file)[:12]}")
    with pytest.raises(ScorerError, match=r"make_scorer\(\) cannot be called with checkpoint, depth: .*'depth'"):
        from_spec(spec + ";depth=2")
    copy.write_text("def make_scorer(:\n")
    with pytest.raises(ScorerError, match=f"policy file {copy}: importing it raised SyntaxError"):
        from_spec(spec)

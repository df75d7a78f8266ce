"""The kvp-gym command line: help, collection, inspection, merging, and clear errors."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
from tiny_benchmark import benchmark_toml

from kvp_gym.cli import main


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["collect"],
        ["traces"],
        ["traces", "info"],
        ["traces", "check"],
        ["traces", "merge"],
        ["tasks"],
        ["tasks", "eval"],
    ],
)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: kvp-gym" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "kvp_gym.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("kvp-gym ")


def test_collect_info_check_merge(tmp_path, capsys):
    args = [
        "collect",
        "--model",
        "tiny-random",
        "--task",
        "niah_multikey",
        "--samples",
        "3",
        "--context",
        "800",
        "--future",
        "4",
        "--layers",
        "1",
        "--splits",
        "0.34,0.33,0.33",
    ]
    assert main([*args, "--out", str(tmp_path / "a.h5"), "--shard", "0/2"]) == 0
    assert main([*args, "--out", str(tmp_path / "b.h5"), "--shard", "1/2"]) == 0
    assert "2 samples (2 collected now)" in capsys.readouterr().out
    assert main(["traces", "merge", str(tmp_path / "m.h5"), str(tmp_path / "a.h5"), str(tmp_path / "b.h5")]) == 0
    out = capsys.readouterr().out
    assert "merged 2 files" in out and "samples: 3 (train 1, val 1, test 1); tasks: niah_multikey 3" in out
    assert "2 layers (1 recorded), 4 query heads, 2 KV heads (GQA 2:1), head_dim 16" in out
    assert main(["traces", "check", str(tmp_path / "m.h5")]) == 0
    assert "OK: sealed content verified, every tensor read and valid" in capsys.readouterr().out

    with h5py.File(tmp_path / "m.h5", "r+") as h5:  # any write through HDF5 after sealing is refused
        name = sorted(h5["samples"])[0]
        h5[f"samples/{name}/layers/1/values"][0, 0, 0] = float("nan")
    assert main(["traces", "check", str(tmp_path / "m.h5")]) == 2
    assert "m.h5: /: expected" in capsys.readouterr().err


def test_upgrade_rewrites_a_version_1_file_with_checksums(tmp_path, capsys):
    v1 = Path(__file__).parent / "data" / "trace-v1.h5"
    assert main(["traces", "info", str(v1)]) == 0
    captured = capsys.readouterr()
    assert "format v1 (no checksums" in captured.out
    assert captured.err.count("\n") == 1 and "kvp-gym: warning:" in captured.err and "traces upgrade" in captured.err
    assert main(["traces", "upgrade", str(v1), str(tmp_path / "v2.h5")]) == 0
    assert "format v2 (sealed" in capsys.readouterr().out
    assert main(["traces", "check", str(tmp_path / "v2.h5")]) == 0
    captured = capsys.readouterr()
    assert "OK: sealed content verified" in captured.out and captured.err == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["collect", "--model", "tiny-random", "--task", "nope", "--out", "x.h5"],
            "unknown task 'nope'; available:",
        ),
        (
            ["collect", "--model", "nobody/nothing", "--out", "x.h5"],
            "not in the local Hugging Face cache .*`kvp-gym collect --allow-download`",
        ),
        (
            ["collect", "--model", "tiny-random", "--context", "100", "--out", "x.h5"],
            "even the smallest prompt exceeds 100 tokens",
        ),
        (
            ["collect", "--model", "tiny-random", "--layers", "0-9", "--out", "x.h5"],
            r"layers must lie in \[0, 2\)",
        ),
        (["traces", "info", "missing.h5"], "missing.h5: /: no such file"),
        (["traces", "check", "."], r"\.: /: not a file"),
    ],
)
def test_errors_are_one_clear_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # (after any progress bar)
    assert last.startswith("kvp-gym: error: ") and re.search(message, last)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left behind (no empty x.h5.parts)


@pytest.mark.parametrize(
    "args, option",
    [
        (["tasks", "eval", "--samples", "0"], "--samples"),
        (["tasks", "eval", "--samples", "-1"], "--samples"),
        (["evaluate", "--traces", "x.h5", "--bootstrap", "-1"], "--bootstrap"),
        (["collect", "--out", "x.h5", "--context", "0"], "--context"),
        (["collect", "--out", "x.h5", "--seed", "-2"], "--seed"),
    ],
)
def test_bad_numbers_name_the_option(capsys, args, option):
    with pytest.raises(SystemExit):
        main(args)
    assert f"argument {option}: expected" in capsys.readouterr().err


def test_bad_argument_syntax(capsys):
    with pytest.raises(SystemExit):
        main(["collect", "--out", "x.h5", "--shard", "3/2"])
    assert "shard i/N needs 0 <= i < N" in capsys.readouterr().err


def test_help_does_not_import_torch():
    """`kvp-gym --help` builds every command's parser (the `train` command included) without torch: it stays fast."""
    code = "import sys; from kvp_gym.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_default_trace_set_is_shared_through_a_link(tmp_path, monkeypatch, capsys):
    """`kvp-gym traces default --link DIR` (what `make demo` runs) collects the set the no-config env uses, once,
    and makes DIR point at it; an unrelated DIR is never replaced."""
    from kvp_gym.envs.evict import default_trace_folder, default_traces

    monkeypatch.setenv("KVP_GYM_CACHE", str(tmp_path / "cache"))
    link = tmp_path / "traces" / "demo"
    assert main(["traces", "default", "--model", "tiny-random", "--link", str(link)]) == 0
    assert capsys.readouterr().out.split() == [str(link / "niah_single.h5"), str(link / "essay.h5")]
    assert link.resolve() == default_trace_folder("tiny-random").resolve()
    assert [p.resolve() for p in default_traces("tiny-random")] == [
        (link / "niah_single.h5").resolve(),
        (link / "essay.h5").resolve(),
    ]
    assert main(["traces", "default", "--model", "tiny-random", "--link", str(link)]) == 0  # again: a no-op
    other = tmp_path / "mine"
    other.mkdir()
    assert main(["traces", "default", "--model", "tiny-random", "--link", str(other)]) == 2
    assert "is not a link to the default trace set" in capsys.readouterr().err and other.is_dir()


def test_tasks_list_names_every_task_in_one_column(capsys):
    from kvp_gym.tasks import TASKS

    assert main(["tasks", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(TASKS)
    starts = {len(line) - len(line[len(name) :].lstrip()) for line, name in zip(lines, TASKS, strict=True)}
    assert len(starts) == 1  # every description starts in the same column


@pytest.mark.parametrize(
    "argv",
    [
        ["collect", "--out", "x.h5"],
        ["traces", "info", "x.h5"],
        ["traces", "default"],
        ["evaluate", "--traces", "x.h5", "--out", "runs"],
        ["evaluate-table", "runs"],
        ["tasks", "list"],
        ["generate", "--budget", "8", "--prompt", "hi"],
        ["evaluate-e2e", "--out", "runs"],
        ["evaluate-e2e-merge", "out", "runs"],
        ["train", "--traces", "x.h5"],
        ["leaderboard", "validate"],
        ["submit", "--policy", "knorm", "--out", "entry.json"],
    ],
)
def test_every_command_registers_its_handler(argv):
    """Each command's module registers its sub-parser with the handler that runs it (main calls args.handler)."""
    from kvp_gym.cli import build_parser

    assert callable(build_parser().parse_args(argv).handler)


@pytest.mark.parametrize(
    "value, message",
    [
        ("0", "expected a positive number of tokens, got '0'"),
        ("-3", "expected a positive number of tokens, got '-3'"),
        ("1.5", r"expected a fraction of the prompt in \(0, 1\], got '1.5'"),
        ("0.0", r"expected a fraction of the prompt in \(0, 1\], got '0.0'"),
        ("lots", "expected a number of tokens or a fraction, got 'lots'"),
    ],
)
def test_generate_refuses_a_bad_budget_before_loading_a_model(value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--budget", value, "--prompt", "hi"])
    assert exit_.value.code == 2
    assert re.search(f"argument --budget: {message}", capsys.readouterr().err)


def test_generate_refuses_a_budget_below_the_protected_tokens_before_loading_a_model(monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("kvp_gym.models.load", no_loading)
    assert main(["generate", "--budget", "10", "--prompt", "hi"]) == 2
    assert "--budget 10 is below the 20 protected tokens (4 sinks + 16 recent" in capsys.readouterr().err
    assert main(["generate", "--budget", "64", "--prompt", "hi", "--device", "gpu"]) == 2
    assert "device must be" in capsys.readouterr().err


# One task, two prompt lengths, one sample each: `leaderboard prepare` in a few seconds on tiny-random.
PLAN_BENCHMARK = benchmark_toml(
    "plan-v0",
    "tiny-random, for the prepare plan",
    {"tasks": ["niah_single"], "bootstrap": 10},
    {"context": 600, "budgets": [32], "samples": 1, "essays": 0},
)


def test_leaderboard_prepare_prints_its_plan_and_which_file_of_how_many(tmp_path, capsys):
    from kvp_gym_leaderboard.benchmark import load_benchmark, plan_prepare

    (tmp_path / "plan-v0.toml").write_text(PLAN_BENCHMARK)
    folder = tmp_path / "set"
    argv = ["leaderboard", "prepare", str(tmp_path / "plan-v0.toml"), "--dir", str(folder)]
    assert main([*argv, "--write-manifest"]) == 0
    out = capsys.readouterr().out
    plan, _, rest = out.partition("\nfile 1/2")
    assert plan.splitlines()[0] == f"plan-v0: 2 trace files into {folder}: 2 to collect, 0 already there (only checked)"
    assert re.search(r"file 1/2: +niah_single-700\.h5 +collect 2 of 2 samples\n", plan)  # longest prompts first
    assert "expected time: not measured for tiny-random" in plan
    progress = re.findall(r"^file (\d)/(\d): (\S+) \((.*)\)$", "file 1/2" + rest, re.MULTILINE)
    assert progress == [("1", "2", "niah_single-700.h5", "collecting"), ("2", "2", "niah_single-600.h5", "collecting")]

    (folder / "niah_single-600.h5").unlink()  # a stopped collection that kept one of its two samples
    (folder / "niah_single-600.h5.parts").mkdir()
    (folder / "niah_single-600.h5.parts" / "one-sample.h5").touch()
    lines = str(plan_prepare(load_benchmark(tmp_path / "plan-v0.toml"), folder)).splitlines()
    assert lines[0].endswith(": 1 to collect, 1 already there (only checked)")
    assert re.search(r"file 1/2: +niah_single-700\.h5 +already there: check only$", lines[1])
    assert re.search(r"file 2/2: +niah_single-600\.h5 +collect 1 of 2 samples, 1 already in .*\.parts$", lines[2])
    assert lines[3] == "expected time: not measured for tiny-random"  # no smollm2-135m times for another model


def test_the_prepare_plan_of_bench_v0_expects_its_documented_times(tmp_path):
    from kvp_gym_leaderboard.benchmark import load_benchmark, plan_prepare

    plan = plan_prepare(load_benchmark("bench-v0"), tmp_path)
    assert len(plan.files) == 10 and not any(f.exists for f in plan.files)
    seconds = {f.name: plan.collect_seconds(f) for f in plan.files}
    # docs/leaderboard.md: 71.5 s for 6 samples of 1,024 tokens, 123.4 s for 6 of 2,048 (the slowest files)
    assert seconds["essay-1024.h5"] == pytest.approx(71.5, abs=1) and seconds["essay-2048.h5"] == pytest.approx(
        123.4, abs=1
    )
    assert "about 16 min to collect and about 69 s to check" in str(plan)
    shard = str(plan_prepare(load_benchmark("bench-v0"), tmp_path, shard=(1, 3))).splitlines()
    assert "3 of its 10 trace files (this shard)" in shard[0] and len(shard) == 1 + 3 + 1


def test_loading_a_model_shows_no_weight_loading_bar(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    from kvp_gym import models

    model, tokenizer = models.load("tiny-random")
    model.save_pretrained(tmp_path)  # a transformers model folder: loaded through from_pretrained, as SmolLM2 is
    tokenizer.save_pretrained(tmp_path)
    capfd.readouterr()
    loaded, _ = models.load(str(tmp_path))
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out
    assert hf_logging.is_progress_bar_enabled()  # switched off only while loading: a download still shows its bar
    weights, reloaded = model.state_dict(), loaded.state_dict()
    assert weights.keys() == reloaded.keys() and all(torch.equal(weights[k], reloaded[k]) for k in weights)


def test_evaluate_help_lists_the_registered_policies_within_80_columns(monkeypatch, capsys):
    from importlib.metadata import entry_points

    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    registered = sorted({point.name for point in entry_points(group="kvp_gym.scorers")})
    assert {"tova", "h2o", "streaming_llm"} <= set(registered)
    listed = out.split("registered policies")[1].split("\n\n")[0].split("\n", 1)[1]
    assert [name.strip() for name in listed.replace("\n", " ").split(",")] == registered
    assert "--policies kvp:checkpoint=runs/kvp/agents.safetensors\n" in out  # an example spec, whole on its line
    assert max(len(line) for line in out.splitlines()) <= 80  # so the terminal wraps nothing either


@pytest.mark.parametrize("columns", ["80", "120"])
def test_top_level_help_wraps_each_command_line_between_words(columns, monkeypatch):
    from kvp_gym.cli import build_parser

    monkeypatch.setenv("COLUMNS", columns)
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    wanted = {choice.dest: " ".join(choice.help.split()) for choice in commands._choices_actions}
    shown: dict[str, list[str]] = {}
    block = parser.format_help().split("positional arguments:\n")[1].split("\n\n")[0]
    for line in block.splitlines()[1:]:  # after "  COMMAND"
        if match := re.match(r"^    (\S+)(?: +(.*))?$", line):
            name = match.group(1)
            shown[name] = [match.group(2)] if match.group(2) else []
        else:
            shown[name].append(line.strip())
    assert {name: " ".join(words) for name, words in shown.items()} == wanted  # a word split in two would differ
    assert "leaderboard" in wanted and max(len(line) for line in parser.format_help().splitlines()) <= int(columns)


def test_tasks_eval_writes_each_row_at_once_and_a_rerun_adds_only_the_missing_rows(tmp_path, monkeypatch, capsys):
    import kvp_gym.generation as generation

    measured = []
    real = generation.task_accuracy

    def counting(model, tokenizer, task, context, samples, seed=0):
        measured.append((task.name, context))
        return real(model, tokenizer, task, context, samples, seed=seed, progress=False)

    monkeypatch.setattr(generation, "task_accuracy", counting)
    out = tmp_path / "tasks.json"
    base = ["tasks", "eval", "--model", "tiny-random", "--samples", "1", "--out", str(out)]
    assert main([*base, "--tasks", "niah_single,essay", "--context", "700"]) == 0
    first = json.loads(out.read_text())
    assert measured == [("niah_single", 700), ("essay", 700)]
    assert (first["model"], first["samples"], first["seed"]) == ("tiny-random", 1, 0)
    assert main([*base, "--tasks", "niah_single,essay", "--context", "700,800"]) == 0
    assert measured[2:] == [("niah_single", 800), ("essay", 800)]  # the 700-token rows were not measured again
    rows = json.loads(out.read_text())["results"]
    assert [(r["task"], r["context"]) for r in rows] == [("niah_single", 700), ("essay", 700), *measured[2:]]
    assert rows[:2] == first["results"]
    assert "| essay | 700 | 1 |" in capsys.readouterr().out  # kept rows are printed too
    assert main([*base[:4], "--samples", "2", "--out", str(out), "--tasks", "essay", "--context", "700"]) == 2
    assert "samples 1 there, 2 asked" in capsys.readouterr().err
    assert len(json.loads(out.read_text())["results"]) == 4  # nothing lost
    out.write_text("{not json")
    assert main([*base, "--tasks", "essay", "--context", "700"]) == 2
    assert "not a tasks eval result" in capsys.readouterr().err

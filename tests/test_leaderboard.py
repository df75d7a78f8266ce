"""The leaderboard on a tiny benchmark (tiny-random, 8 samples): prepare and its manifest, submit, validate (every
kind of bad entry), rerun, the board's ranks and Markdown table; and every committed entry is valid."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_benchmark import benchmark_toml

from kvp_gym.cli import main
from kvp_gym.evaluation.report import FULL_CACHE
from kvp_gym.evaluation.stats import mean_interval
from kvp_gym.models import ModelNotFoundError
from kvp_gym.storage import file_sha256
from kvp_gym_leaderboard.benchmark import (
    TOLERANCE,
    BenchmarkError,
    compare,
    fingerprint,
    load_benchmark,
    manifest_sha256,
    prepare,
    read_manifest,
)
from kvp_gym_leaderboard.page import build_site
from kvp_gym_leaderboard.records import decode, pack, published
from kvp_gym_leaderboard.site import markdown_table, ordered, ranks, surely_better
from kvp_gym_leaderboard.submission import (
    ENTRIES,
    bootstrap_label,
    read_entry,
    rerun,
    standard_evaluation,
    validate,
)

TINY = benchmark_toml("tiny-v0", "tiny-random, for the tests")
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """(benchmark, trace folder) of the tiny benchmark, prepared and its manifest written."""
    root = tmp_path_factory.mktemp("bench")
    (root / "tiny-v0.toml").write_text(TINY)
    benchmark = load_benchmark(root / "tiny-v0.toml")
    assert prepare(benchmark, root / "set", write_manifest=True, progress=False) == []
    return benchmark, root / "set"


@pytest.fixture(scope="module")
def entries(bench, tmp_path_factory):
    """Entries for three policies of three kinds, written as submit writes them."""
    benchmark, traces = bench
    work = tmp_path_factory.mktemp("work")
    evaluated = standard_evaluation(
        benchmark, ["random", "streaming_llm", "tova", "oracle"], traces, work, progress=False
    )
    folder = tmp_path_factory.mktemp("entries")
    for spec, entry in evaluated.items():
        entry = {"name": spec, "description": f"{spec} baseline", "authors": ["tests"], **entry}
        (folder / f"{spec}.json").write_text(json.dumps(entry))
    return folder


def test_prepare_rebuilds_the_same_set_and_the_manifest_matches(bench, tmp_path):
    benchmark, traces = bench
    assert prepare(benchmark, traces, progress=False) == []  # resumes: nothing to collect, all matches
    shutil.copy(traces / "essay-600.h5", tmp_path / "essay-600.h5")  # a fresh collection of the other files
    assert prepare(benchmark, tmp_path, progress=False) == []
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == [
        "essay-600.h5",
        "essay-700.h5",
        "niah_single-600.h5",
        "niah_single-700.h5",
    ]


def test_shards_split_the_files(bench, tmp_path):
    benchmark, _ = bench
    from kvp_gym_leaderboard.benchmark import shard_files

    shards = [shard_files(benchmark, (i, 3)) for i in range(3)]
    assert sorted(f for s in shards for f in s) == sorted(benchmark.trace_files())
    assert all(shards)
    with pytest.raises(BenchmarkError, match="0 <= i < N"):
        shard_files(benchmark, (3, 3))


def test_a_mismatch_names_the_file_sample_and_field(bench):
    benchmark, _ = bench
    manifest = read_manifest(benchmark)
    changed = json.loads(json.dumps(manifest))
    sample = next(iter(changed["files"]["essay-600.h5"]["samples"]))
    record = changed["files"]["essay-600.h5"]["samples"][sample]
    record["prompt_sha256"] = "0" * 64
    record["tensors"]["keys"][1][1] *= 1.01  # the RMS of layer 1's keys, 1% off (tolerance 0.5%)
    problems = list(compare(changed, manifest))
    assert len(problems) == 2
    assert f"essay-600.h5: sample {sample}: prompt_sha256 differs" in problems[0]
    assert f"essay-600.h5: sample {sample}: keys of layer 1: rms" in problems[1]


def test_fingerprints_tolerate_rounding_but_not_a_shifted_token_or_noise():
    rng = np.random.default_rng(0)
    # keys-like data: a large constant channel (as real keys have) on top of per-token variation
    tensor = (rng.normal(0, 1, (3, 500, 16)) + 4 * (np.arange(16) == 3)).astype(np.float16)
    rounded = tensor.copy().view(np.uint16)
    flip = rng.random(rounded.shape) < 0.05  # another CPU rounds 5% of the values one unit differently
    rounded[flip] ^= 1
    shifted = np.roll(tensor, 1, axis=1)  # every token one position off
    want = fingerprint(tensor)
    close = lambda got: all(abs(a - b) <= TOLERANCE * want[1] for a, b in zip(want, got, strict=True))  # noqa: E731
    assert close(fingerprint(rounded.view(np.float16)))
    assert not close(fingerprint(shifted))
    assert not close(fingerprint(tensor[::-1]))  # heads swapped
    noisy = tensor * (1 + 0.01 * rng.normal(size=tensor.shape))  # other weights: 1% off
    assert not close(fingerprint(noisy.astype(np.float16)))


def test_bad_benchmark_definitions_are_clear_errors(tmp_path):
    with pytest.raises(BenchmarkError, match="unknown benchmark 'nope'; known: bench-v0"):
        load_benchmark("nope")
    path = tmp_path / "x-v0.toml"
    path.write_text(
        TINY.replace('id = "tiny-v0"', 'id = "x-v0"').replace(
            "budgets = [32, 64]\nbootstrap", "budgets = [16]\nbootstrap"
        )
    )
    with pytest.raises(BenchmarkError, match="above the 20 tokens the paper protocol protects"):
        load_benchmark(path)
    path.write_text(TINY)
    with pytest.raises(BenchmarkError, match="differs from the file name"):
        load_benchmark(path)
    path.write_text(TINY.replace('id = "tiny-v0"', 'id = "x-v0"').replace('model = "tiny-random"\n', ""))
    with pytest.raises(BenchmarkError, match="missing field 'model'"):
        load_benchmark(path)


def test_submitted_entries_are_valid_and_kinds_follow_the_scorers(bench, entries):
    benchmark, _ = bench
    files = sorted(entries.glob("*.json"))
    assert validate(files, benchmark) == []
    kinds = {f.stem: json.loads(f.read_text())["kind"] for f in files}
    assert kinds == {
        "random": "attention-free",
        "streaming_llm": "attention-free",
        "tova": "uses-prefill-queries",
        "oracle": "privileged-upper-bound",
    }
    entry = json.loads((entries / "tova.json").read_text())
    assert entry["benchmark"] == {"id": "tiny-v0", "manifest_sha256": manifest_sha256(benchmark)}
    trace = entry["results"]["trace_level"]
    assert set(trace["per_task"]) == {"niah_single", "essay"} and set(trace["per_context"]) == {"600", "700"}
    assert trace["samples"] == 8 and trace["heads"] == 4
    # the holistic score is the mean of the per-sample means, which the per-context means average to
    assert np.mean(list(trace["per_context"].values())) == pytest.approx(trace["holistic_score"]["mean"])
    assert set(entry["results"]["end_to_end"]["accuracy"]["niah_single"]) == {"32", "64"}


def test_rerun_reproduces_the_records_and_catches_forged_ones(bench, entries, tmp_path):
    benchmark, traces = bench
    assert rerun(entries / "streaming_llm.json", benchmark, traces, tmp_path / "a", progress=False) == []
    # Forged records with results recomputed from them: validate cannot tell, the rerun can.
    entry = json.loads((entries / "streaming_llm.json").read_text())
    decoded = decode(entry["records"], benchmark, end_to_end=True)
    better = np.clip(decoded.scores + 0.2 * (np.arange(decoded.scores.shape[0]) == 0)[:, None, None], 0, 1)
    entry["records"]["trace_level"]["holistic_score"] = pack(better, "uint16")
    prompt = entry["records"]["end_to_end"]["prompts"][0]
    prompt["outputs"]["32"] = prompt["outputs"][FULL_CACHE]  # the full cache's answer, claimed at budget 32
    prompt["correct"]["32"] = prompt["correct"][FULL_CACHE]
    entry["results"] = forged_results(entry, benchmark)
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(entry))
    assert validate([forged], benchmark) == []
    problems = rerun(forged, benchmark, traces, tmp_path / "a", progress=False)
    assert problems[0].startswith(f"{forged}: $.records.trace_level.holistic_score: 4 of 32 values differ")
    changed = [p for p in problems if "$.records.end_to_end.prompts" in p]
    if decoded.prompts[0]["outputs"]["32"] != decoded.prompts[0]["outputs"][FULL_CACHE]:
        assert changed and "1 outputs differ from the rerun (niah_single/0 at 32)" in changed[0]


def forged_results(entry: dict, benchmark) -> dict:
    """The results an entry's (edited) records give, as submit computes them: what a forger would write."""
    decoded = decode(entry["records"], benchmark, entry["results"]["end_to_end"] is not None)
    results = published(decoded, benchmark, bootstrap_label(entry["load"]))
    results["trace_level"]["seconds"] = entry["results"]["trace_level"]["seconds"]
    return results


def _broken(entries: Path, tmp_path: Path, edit) -> Path:
    entry = json.loads((entries / "tova.json").read_text())
    edit(entry)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(entry))
    return path


@pytest.mark.parametrize(
    ("edit", "where", "message"),
    [
        (lambda e: e.pop("authors"), "$", "'authors' is a required property"),
        (lambda e: e["benchmark"].update(id="bench-v9"), "$.benchmark.id", "entry is for 'bench-v9'"),
        (lambda e: e["benchmark"].update(manifest_sha256="0" * 64), "$.benchmark.manifest_sha256", "stale"),
        (
            lambda e: e["results"]["trace_level"]["per_task"].update(essay=1.5),
            "$.results.trace_level.per_task.essay",
            "1.5 is greater than the maximum of 1",
        ),
        (  # a number changed (the knorm essay score 0.374 -> 0.99 of the review)
            lambda e: e["results"]["trace_level"]["per_task"].update(essay=0.99),
            "$.results.trace_level.per_task.essay",
            "the entry says 0.99, its records give 0.",
        ),
        (  # an interval widened
            lambda e: e["results"]["trace_level"]["holistic_score"]["ci95"].__setitem__(1, 1.0),
            "$.results.trace_level.holistic_score.ci95[1]",
            "the entry says 1.0, its records give 0.",
        ),
        (
            lambda e: e["results"]["trace_level"]["retained_fraction"].update({"64": 0.01}),
            "$.results.trace_level.retained_fraction.64",
            "the entry says 0.01",
        ),
        (
            lambda e: e["results"]["trace_level"]["per_task"].pop("essay"),
            "$.results.trace_level.per_task",
            "missing 'essay', which the records give",
        ),
        (
            lambda e: e["results"]["end_to_end"]["accuracy"]["niah_single"]["64"].update(mean=1.0),
            "$.results.end_to_end.accuracy.niah_single.64.mean",
            "the entry says 1.0",
        ),
        (
            lambda e: e["records"]["trace_level"]["holistic_score"].update(shape=[7, 2, 2]),
            "$.records.trace_level.holistic_score.shape",
            "expected [8, 2, 2] (this benchmark's), got [7, 2, 2]",
        ),
        (
            lambda e: e["records"]["trace_level"]["samples"].reverse(),
            "$.records.trace_level.samples",
            "not the benchmark's samples in its order",
        ),
        (
            lambda e: e["records"]["end_to_end"]["prompts"][1]["correct"].update({"64": 7.0}),
            "$.records.end_to_end.prompts[1].correct.64",
            "says 7.0, but the task scores this output",
        ),
        (
            lambda e: e["records"]["end_to_end"]["nll"].update(data="bm90IGd6aXA="),
            "$.records.end_to_end.nll.data",
            "not base64 of gzip data",
        ),
        (lambda e: e["seeds"].update(trace_level=1), "$.seeds.trace_level", "not the benchmark's 5"),
        (lambda e: e.update(kind="clever"), "$.kind", "'clever' is not one of"),
        (
            lambda e: e.update(kind="attention-free"),
            "$.kind",
            "the entry says 'attention-free', but its scorer 'tova' declares needs_queries=True, needs_future=False: "
            "'uses-prefill-queries'",
        ),
        (lambda e: e["load"].update(scorer="nope"), "$.load", "cannot load the scorer 'nope'"),
        (
            lambda e: e["load"].update(checkpoint={"path": "agents.safetensors", "sha256": "a" * 64}),
            "$.load.checkpoint.sha256",
            "not the entry's",
        ),
        (lambda e: e.update(extra=1), "$", "unknown field(s) ('extra' was unexpected)"),
    ],
)
def test_each_bad_entry_is_one_clear_line(bench, entries, tmp_path, edit, where, message):
    benchmark, _ = bench
    (tmp_path / "agents.safetensors").write_bytes(b"not the pinned file")
    path = _broken(entries, tmp_path, edit)
    problems = validate([path], benchmark)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: {where}: ") and message in problems[0]


def test_not_json_and_duplicate_names(bench, entries, tmp_path):
    benchmark, _ = bench
    broken = tmp_path / "broken.json"
    broken.write_text('{"name": ')
    copy = tmp_path / "copy.json"
    copy.write_text((entries / "tova.json").read_text())
    problems = validate([broken, entries / "tova.json", copy], benchmark)
    assert problems == [
        f"{broken}: $: not valid JSON: Expecting value: line 1 column 10 (char 9)",
        f"{copy}: $.name: 'tova' is already the name of {entries / 'tova.json'}",
    ]


def test_validate_command_exit_status_and_no_board_from_bad_entries(bench, entries, tmp_path, capsys):
    benchmark, _ = bench
    toml = str(benchmark.path)
    assert main(["leaderboard", "validate", "--benchmark", toml, str(entries)]) == 0
    assert "4 entries valid" in capsys.readouterr().out
    bad = _broken(entries, tmp_path, lambda e: e["benchmark"].update(manifest_sha256="0" * 64))
    assert main(["leaderboard", "validate", "--benchmark", toml, str(bad)]) == 1
    assert "$.benchmark.manifest_sha256: stale" in capsys.readouterr().err
    site = tmp_path / "site"
    assert main(["leaderboard", "build", "--out", str(site), "--entries", str(bad)]) == 1
    assert "nothing written" in capsys.readouterr().err and not site.exists()


def test_validate_refuses_the_oracle_relabelled_as_attention_free(tmp_path, capsys):
    entry = json.loads((ENTRIES / "oracle.json").read_text())
    entry.update(name="future-free", kind="attention-free")
    path = tmp_path / "future-free.json"
    path.write_text(json.dumps(entry))
    assert main(["leaderboard", "validate", str(path)]) == 1
    assert (
        f"{path}: $.kind: the entry says 'attention-free', but its scorer 'oracle' declares needs_queries=False, "
        "needs_future=True: 'privileged-upper-bound'"
    ) in capsys.readouterr().err


def test_the_board_shows_the_kind_the_scorer_declares(entries):
    loaded = [read_entry(f) for f in sorted(entries.glob("*.json"))]
    oracle = next(e for e in loaded if e["name"] == "oracle")
    oracle["kind"] = "attention-free"  # what the entry says is never read: the scorer reads the future
    table = markdown_table(loaded).splitlines()
    assert table[2].startswith("| - | oracle | upper bound |")
    assert ranks([oracle]) == [None]


def board_entry(name: str, per_sample: np.ndarray, scorer: str = "knorm") -> dict:
    """A board entry whose records hold ``per_sample`` scores (one head each) and whose interval is their own."""
    scores = np.asarray(per_sample, float)[:, None, None]
    interval = mean_interval(scores.ravel(), np.random.default_rng(0), 1000)
    return {
        "name": name,
        "load": {"scorer": scorer, "parameters": {}},
        "results": {"trace_level": {"holistic_score": interval}},
        "records": {"trace_level": {"holistic_score": pack(scores, "uint16")}},
    }


def test_a_wide_low_mean_entry_never_outranks_a_narrow_higher_one():
    rng = np.random.default_rng(1)
    n = 20
    board = [
        board_entry("oracle", np.ones(n), "oracle"),
        board_entry("top", 0.74 + 0.01 * rng.standard_normal(n)),
        board_entry("narrow", 0.70 + 0.01 * rng.standard_normal(n)),  # surely below "top"
        board_entry("wide", 0.66 + 0.3 * np.tile([1, -1], n // 2)),  # noisy: nothing surely above it
    ]
    top, narrow, wide = (board[i]["results"]["trace_level"]["holistic_score"]["ci95"] for i in (1, 2, 3))
    # The old rule (1 + the entries whose marginal interval lies wholly above) ranked "wide" 1st, "narrow" 2nd.
    assert narrow[1] < top[0] < wide[1]
    assert ranks(board) == [None, 1, 2, 2]
    assert [e["name"] for e in ordered(board)] == ["oracle", "top", "narrow", "wide"]


def test_pairing_separates_what_marginal_intervals_cannot():
    rng = np.random.default_rng(2)
    difficulty = rng.uniform(0.2, 0.9, 40)  # samples differ a lot; one method is always a little better
    board = [board_entry("a", difficulty + 0.02), board_entry("b", difficulty)]
    low_a, high_b = (
        board[0]["results"]["trace_level"]["holistic_score"]["ci95"][0],
        board[1]["results"]["trace_level"]["holistic_score"]["ci95"][1],
    )
    assert low_a < high_b  # the marginal intervals overlap
    assert ranks(board) == [1, 2] and ranks(board[::-1]) == [2, 1]
    assert surely_better(board[0], board[1]) and not surely_better(board[1], board[0])
    same = [board_entry("c", difficulty + 0.02 * rng.standard_normal(40)), board_entry("d", difficulty)]
    assert ranks(same) == [1, 1]  # no sure difference: a tie


def test_board_markdown_and_site_from_entries(bench, entries, tmp_path):
    loaded = [read_entry(f) for f in sorted(entries.glob("*.json"))]
    page = build_site(loaded, tmp_path / "site")
    assert page.read_text().count("<tr") == 2 + 1 + len(loaded)  # two header rows, the full cache, the entries
    assert {p.name for p in (tmp_path / "site").iterdir()} == {
        "index.html",
        "leaderboard.md",
        "retained.svg",
        "accuracy.svg",
        "heatmap.svg",
    }
    table = markdown_table(loaded).splitlines()
    assert table[0] == (
        "| rank | method | kind | holistic score (95% CI) | essay | niah_single | 600 tokens | 700 tokens "
        "| accuracy @32 | accuracy @64 | ppl @32 | ppl @64 |"
    )
    assert table[2].startswith("| - | oracle | upper bound |")
    assert len(table) == 2 + 1 + len(loaded)  # the full-cache reference row


def test_markdown_table_has_a_full_cache_reference_row(entries):
    loaded = [read_entry(f) for f in sorted(entries.glob("*.json"))]
    table = markdown_table(loaded).splitlines()
    references = [i for i, row in enumerate(table) if "| full cache |" in row]
    assert references == [3]  # after the upper bound, before the ranked entries
    cells = table[3].strip("| ").split(" | ")
    full = loaded[0]["results"]["end_to_end"]["full_cache"]
    accuracy = np.mean([task["mean"] for task in full["accuracy"].values()])
    assert cells[:4] == ["-", "full cache", "reference", "-"]  # not ranked, no trace-level score
    assert cells[4:8] == ["-"] * 4  # two tasks, two prompt lengths
    assert cells[8:] == [f"{accuracy:.3f}"] * 2 + [f"{full['perplexity']['mean']:.2f}"] * 2  # budgets 32, 64
    assert all(row.split(" | ")[0].strip("| ").isdigit() for row in table[4:])  # every other row is ranked
    for entry in loaded:  # a board without end-to-end results has no reference to show
        entry["results"]["end_to_end"] = None
    assert not any("full cache" in row for row in markdown_table(loaded).splitlines())


def _boards() -> dict[str, list[Path]]:
    """The committed boards: bench-v0's entries in ENTRIES, a board of several models' in ENTRIES/ID/MODEL."""
    folders = [ENTRIES, *sorted(path for path in ENTRIES.glob("*/*") if path.is_dir())]
    boards = {str(folder.relative_to(ENTRIES)): sorted(folder.glob("*.json")) for folder in folders}
    return {name: files for name, files in boards.items() if files}


def test_committed_entries_are_valid():
    boards = _boards()
    assert {".", "bench-v1/smollm2-135m", "bench-v1/gemma3-270m"} <= set(boards), "a committed board has no entries"
    not_installed = []
    for board, files in boards.items():
        try:
            assert validate(files) == [], board
        except ModelNotFoundError as err:  # validating loads the board's model's tokenizer: Gemma is optional
            not_installed.append(f"{board}: {err}")
    assert len(not_installed) < len(boards) - 1  # bench-v0 and bench-v1's SmolLM2 board need only SmolLM2
    if not_installed:
        pytest.skip("validated every board but " + "; ".join(not_installed))


def test_readme_embeds_every_current_board():
    readme = (ROOT / "README.md").read_text()
    for board, files in _boards().items():
        marker = "leaderboard" if board == "." else f"leaderboard {board}"  # bench-v0's kept its first name
        embedded = re.search(rf"<!-- {marker}:start -->\n(.*?)<!-- {marker}:end -->", readme, re.S)
        assert embedded, f"README.md lacks the markers of the {board} board"
        table = markdown_table([read_entry(f) for f in files])
        assert embedded.group(1) == table, (
            f"README's {board} board is stale: copy it from the leaderboard.md of kvp-gym leaderboard build"
        )


def test_submit_command_pins_a_checkpoint(bench, tmp_path, capsys):
    benchmark, traces = bench
    checkpoint = tmp_path / "agents" / "mine.safetensors"
    checkpoint.parent.mkdir()
    tiny_checkpoint(checkpoint, seed=0)
    out = tmp_path / "entries" / "mine.json"
    argv = ["submit", "--benchmark", str(benchmark.path), "--traces", str(traces), "--work", str(tmp_path / "w")]
    argv += ["--policy", "kvp", "--checkpoint", str(checkpoint), "--trace-level-only", "--name", "my-kvp"]
    assert main([*argv, "--authors", "A, B", "--out", str(out)]) == 0
    assert "holistic score" in capsys.readouterr().out
    entry = json.loads(out.read_text())
    assert entry["name"] == "my-kvp" and entry["authors"] == ["A", "B"] and entry["kind"] == "attention-free"
    assert entry["load"]["checkpoint"]["path"] == "../agents/mine.safetensors"
    assert entry["results"]["end_to_end"] is None
    assert validate([out], benchmark) == []
    checkpoint.write_bytes(checkpoint.read_bytes() + b" ")  # the pinned file changed
    assert "$.load.checkpoint.sha256" in validate([out], benchmark)[0]
    assert main([*argv[:-2], "--policy", "random", "--name", "x", "--out", str(tmp_path / "y")]) == 2
    assert "--name names one entry" in capsys.readouterr().err


def test_an_interrupted_submit_resumes_after_the_trace_level(bench, tmp_path):
    benchmark, traces = bench
    first = standard_evaluation(benchmark, ["knorm"], traces, tmp_path, end_to_end=False, progress=False)
    saved = tmp_path / "trace-level.json"
    written = saved.stat().st_mtime_ns
    again = standard_evaluation(benchmark, ["knorm"], traces, tmp_path, end_to_end=False, progress=False)
    assert saved.stat().st_mtime_ns == written  # reused, not evaluated again
    assert again["knorm"]["results"] == first["knorm"]["results"]
    both = standard_evaluation(benchmark, ["random", "knorm"], traces, tmp_path, end_to_end=False, progress=False)
    assert json.loads(saved.read_text())["key"]["policies"] == ["random", "knorm"]  # other policies: evaluated
    in_company, alone = both["knorm"]["results"]["trace_level"], first["knorm"]["results"]["trace_level"]
    assert in_company["holistic_score"] == alone["holistic_score"]  # the interval too: its draws are its own


def test_a_resumed_submit_notices_a_changed_checkpoint_behind_a_spec(bench, tmp_path):
    benchmark, traces = bench
    checkpoint = tiny_checkpoint(tmp_path / "agents.safetensors", seed=0)
    spec = f"kvp:checkpoint={checkpoint}"
    first = standard_evaluation(benchmark, [spec], traces, tmp_path, end_to_end=False, progress=False)
    tiny_checkpoint(checkpoint, seed=1)  # other weights under the same label
    again = standard_evaluation(benchmark, [spec], traces, tmp_path, end_to_end=False, progress=False)
    assert again[spec]["results"] != first[spec]["results"]  # evaluated again, not the saved record
    key = json.loads((tmp_path / "trace-level.json").read_text())["key"]
    assert key["policy_files"] == {spec: [file_sha256(checkpoint)]}
    # The same file at another path (another machine's checkout): the same interval, drawn under the label "kvp".
    moved = tmp_path / "elsewhere" / "agents.safetensors"
    moved.parent.mkdir()
    shutil.copy(checkpoint, moved)
    there = standard_evaluation(
        benchmark, [f"kvp:checkpoint={moved}"], traces, tmp_path / "w2", end_to_end=False, progress=False
    )
    moved_score = there[f"kvp:checkpoint={moved}"]["results"]["trace_level"]["holistic_score"]
    assert moved_score == again[spec]["results"]["trace_level"]["holistic_score"]


def tiny_checkpoint(path: Path, seed: int) -> Path:
    """KVP agents for every head of tiny-random (2 layers x 2 KV heads, head_dim 16), random weights."""
    import torch

    from kvp_gym_agents.checkpoint import save_checkpoint
    from kvp_gym_agents.kvp import KVPNetwork

    torch.manual_seed(seed)
    network = KVPNetwork(heads=4, head_dim=16, width=16, position_dim=4, buckets=8, max_age=64)
    geometry = {"head_dim": 16, "num_layers": 2, "num_kv_heads": 2}
    save_checkpoint(path, network, [(0, 0), (0, 1), (1, 0), (1, 1)], {"model": "tiny-random", "geometry": geometry})
    return path

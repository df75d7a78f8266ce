"""A benchmark of two models (as bench-v1 covers SmolLM2 and Gemma 3), on tiny-random and tiny-gemma3 (its one global
layer only, as bench-v1 records Gemma's): the definition's errors name file and field, prepare per model and in
shards gives the manifests of one go, each model's entries name it and are checked against its part (and refused by
the other's), rerun works per model, and the site shows one board per model behind tabs, driven in Chromium."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from site_browser import WINDOW, open_site
from tiny_benchmark import END_TO_END, TRACE_LEVEL

from kvp_gym import models
from kvp_gym.cli import main
from kvp_gym_leaderboard.benchmark import BenchmarkError, benchmark_parts, load_benchmark, manifest_sha256
from kvp_gym_leaderboard.page import build_site
from kvp_gym_leaderboard.site import boards, markdown_table
from kvp_gym_leaderboard.submission import read_entry, validate

ID = "tiny-two"
MODELS = ("tiny-random", "tiny-gemma3")  # the file's order, which is the board's
POLICIES = ("tova", "streaming_llm")


def settings() -> dict[str, dict]:
    """Each model's sections: 4 trace-level samples of ~700 tokens, one needle prompt and one essay end to end."""
    level = {**TRACE_LEVEL, "contexts": [700]}
    e2e = {**END_TO_END, "samples": 1}
    return {
        "tiny-random": {"trace_level": dict(level), "end_to_end": dict(e2e)},
        "tiny-gemma3": {"trace_level": {**level, "layers": "global"}, "end_to_end": dict(e2e)},
    }


def two_models_toml(models: dict[str, dict], top: str = "") -> str:
    """A multi-model definition: shared fields (and ``top``), then per model its fields and its sections (tables)."""
    lines = [f'id = "{ID}"', 'title = "two tiny models, for the tests"', 'text = "heldout"', "held_out_tasks = []", top]
    for model, sections in models.items():
        lines.append(f"[models.{model}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in sections.items() if not isinstance(value, dict)]
        for name, table in sections.items():
            if isinstance(table, dict):
                lines.append(f"[models.{model}.{name}]")
                lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def definition(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("two") / f"{ID}.toml"
    path.write_text(two_models_toml(settings()))
    return path


@pytest.fixture(scope="module")
def prepared(definition) -> Path:
    """The trace sets of both models in one go (FOLDER/MODEL), their manifests written."""
    folder = definition.parent / "set"
    assert main(["leaderboard", "prepare", str(definition), "--dir", str(folder), "--write-manifest"]) == 0
    return folder


@pytest.fixture(scope="module")
def submitted(definition, prepared) -> Path:
    """ENTRIES/MODEL/POLICY.json: each model's entries, written by `kvp-gym submit --model`."""
    entries = definition.parent / "entries"
    for model in MODELS:
        argv = ["submit", "--benchmark", str(definition), "--model", model, "--traces", str(prepared)]
        argv += ["--work", str(definition.parent / "work"), "--authors", "tests", "--out", str(entries / model)]
        assert main(argv + [arg for policy in POLICIES for arg in ("--policy", policy)]) == 0
    return entries


def _without(sections: dict, *path: str) -> None:
    """Remove the field (or table) at ``path`` of a model's sections."""
    parent = sections
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]


@pytest.mark.parametrize(
    ("edit", "top", "message"),
    [
        (  # a misspelt field is refused, not ignored (it would record every layer of the hybrid model)
            lambda s: s["tiny-gemma3"]["trace_level"].update(layer="global"),
            "",
            "[models.tiny-gemma3.trace_level]: unknown field(s) layer",
        ),
        (
            lambda s: _without(s, "tiny-gemma3", "end_to_end", "seed"),
            "",
            "missing field 'seed' in [models.tiny-gemma3.end_to_end]",
        ),
        (lambda s: _without(s, "tiny-random", "end_to_end"), "", "missing field 'end_to_end' in [models.tiny-random]"),
        (
            lambda s: s["tiny-random"]["trace_level"].update(samples="two"),
            "",
            "field 'samples' in [models.tiny-random.trace_level]: expected an integer, got 'two'",
        ),
        (
            lambda s: s["tiny-random"]["end_to_end"].update(budgets=64),
            "",
            "field 'budgets' in [models.tiny-random.end_to_end]: expected a list of integers, got 64",
        ),
        (
            lambda s: s["tiny-gemma3"]["trace_level"].update(layers="local"),
            "",
            "field 'layers' in [models.tiny-gemma3.trace_level]: expected \"global\" or a list of layer ids, got "
            "'local'",
        ),
        (
            lambda s: s["tiny-gemma3"]["trace_level"].update(budgets=[16]),
            "",
            "models.tiny-gemma3.trace_level.budgets must be among",
        ),
        (lambda s: s["tiny-random"].update(tasks=["essay"]), "", "[models.tiny-random]: unknown field(s) tasks"),
        (lambda s: s, 'model = "tiny-random"', "give either model (one model) or [models.<model>] sections"),
    ],
)
def test_a_malformed_multi_model_definition_names_file_and_field(tmp_path, edit, top, message):
    path = tmp_path / f"{ID}.toml"
    sections = settings()
    edit(sections)
    path.write_text(two_models_toml(sections, top))
    with pytest.raises(BenchmarkError) as raised:
        benchmark_parts(path)
    assert str(raised.value).startswith(f"{path}: ") and message in str(raised.value)


def test_a_part_is_named_by_its_model(definition):
    with pytest.raises(BenchmarkError, match=r"tiny-two covers 2 models \(tiny-random, tiny-gemma3\): name one"):
        load_benchmark(definition)
    with pytest.raises(BenchmarkError, match="tiny-two has no model 'smollm2-135m'; its models: tiny-random"):
        load_benchmark(definition, "smollm2-135m")
    parts = benchmark_parts(definition)
    assert [part.model for part in parts] == list(MODELS) and all(part.models == MODELS for part in parts)
    assert [part.manifest_path.name for part in parts] == [f"{ID}.{model}.manifest.json" for model in MODELS]
    assert [part.trace_folder(Path("/x")) for part in parts] == [Path("/x") / model for model in MODELS]
    assert parts[1].collect_config("essay", 700).layers == "global" and parts[0].trace_level.layers is None
    # A single-model benchmark reads as before: one part, its manifest and folder unchanged, no model in its entries.
    bench_v0 = load_benchmark("bench-v0", "smollm2-135m")
    assert bench_v0 == load_benchmark("bench-v0") and bench_v0.models == ("smollm2-135m",)
    assert bench_v0.manifest_path.name == "bench-v0.manifest.json" and bench_v0.entry_fields == {"id": "bench-v0"}
    assert bench_v0.trace_folder(Path("/x")) == Path("/x") and bench_v0.trace_level.layers is None


def test_shipped_benchmarks_draw_every_set_from_its_own_seed():
    """No two sets of the shipped benchmarks (bench-v0, and each model's part of bench-v1) share a seed: each part's
    prompts are its own, and none of bench-v0's repeats in bench-v1."""
    parts = benchmark_parts("bench-v0") + benchmark_parts("bench-v1")
    seeds = [seed for part in parts for seed in (part.trace_level.seed, part.end_to_end.seed)]
    assert len(set(seeds)) == len(seeds) == 6
    assert [part.model for part in benchmark_parts("bench-v1")] == ["smollm2-135m", "gemma3-270m"]


def test_prepare_per_model_in_shards_gives_the_manifests_of_one_go(definition, prepared, tmp_path, capsys):
    folder = tmp_path / "set"
    for model in MODELS:  # each model's set in two shards, each checked against the committed manifest
        for shard in ("0/2", "1/2"):
            argv = ["leaderboard", "prepare", str(definition), "--model", model, "--dir", str(folder)]
            assert main([*argv, "--shard", shard]) == 0
        assert f"{ID}/{model}: trace set in {folder / model} matches its manifest" in capsys.readouterr().out
        assert sorted(p.name for p in (folder / model).glob("*.h5")) == sorted(
            p.name for p in (prepared / model).glob("*.h5")
        )
    copy = tmp_path / "copy" / definition.name  # the same definition elsewhere: manifests written from the shards
    copy.parent.mkdir()
    shutil.copy(definition, copy)
    assert main(["leaderboard", "prepare", str(copy), "--dir", str(folder), "--write-manifest"]) == 0
    for model in MODELS:
        name = f"{ID}.{model}.manifest.json"
        assert (copy.parent / name).read_bytes() == (definition.parent / name).read_bytes()


def test_each_models_entries_name_it_and_are_valid_against_its_part(definition, submitted, capsys):
    for model in MODELS:
        part = load_benchmark(definition, model)
        entry = json.loads((submitted / model / "tova.json").read_text())
        assert entry["benchmark"] == {"id": ID, "model": model, "manifest_sha256": manifest_sha256(part)}
        config = models.load(model)[0].config
        recorded = config.num_hidden_layers  # tiny-gemma3: its full-attention layers only (layers = "global")
        if part.trace_level.layers == "global":
            recorded = sum(kind == "full_attention" for kind in config.layer_types)
        assert entry["results"]["trace_level"]["heads"] == recorded * config.num_key_value_heads
        assert validate(sorted((submitted / model).glob("*.json")), part) == []
    # One command, every entry checked against its own model's part; the same name on two boards is no duplicate.
    assert main(["leaderboard", "validate", "--benchmark", str(definition), str(submitted)]) == 0
    assert f"{len(MODELS) * len(POLICIES)} entries valid" in capsys.readouterr().out


def test_an_entry_for_one_model_is_refused_by_the_other_models_part(definition, submitted, tmp_path, capsys):
    path = submitted / "tiny-random" / "tova.json"
    gemma = load_benchmark(definition, "tiny-gemma3")
    assert validate([path], gemma) == [
        f"{path}: $.benchmark.model: the entry is for tiny-two's model 'tiny-random', this board is its "
        "'tiny-gemma3' part"
    ]
    argv = ["leaderboard", "validate", "--benchmark", str(definition), "--model", "tiny-gemma3", str(path)]
    assert main(argv) == 1 and "$.benchmark.model" in capsys.readouterr().err
    entry = json.loads(path.read_text())
    relabelled = tmp_path / "relabelled.json"  # claims the other model, with its manifest: its records give it away
    entry["benchmark"] = {"id": ID, "model": "tiny-gemma3", "manifest_sha256": manifest_sha256(gemma)}
    relabelled.write_text(json.dumps(entry))
    assert validate([relabelled], benchmark_parts(definition)) == [
        f"{relabelled}: $.records.trace_level.samples: not the benchmark's samples in its order"
    ]
    del entry["benchmark"]["model"]
    relabelled.write_text(json.dumps(entry))
    assert validate([relabelled], benchmark_parts(definition)) == [
        f"{relabelled}: $.benchmark.model: tiny-two covers several models (tiny-random, tiny-gemma3): the entry "
        "names none"
    ]


def test_rerun_reproduces_an_entry_of_the_second_model(definition, prepared, submitted, tmp_path, capsys):
    argv = ["leaderboard", "validate", "--benchmark", str(definition), "--rerun", "--traces", str(prepared)]
    entry = submitted / "tiny-gemma3" / "streaming_llm.json"
    assert main([*argv, "--work", str(tmp_path), str(entry)]) == 0
    assert "1 entry valid, numbers reproduced" in capsys.readouterr().out
    assert (tmp_path / "tiny-gemma3" / "streaming_llm" / "trace-level.json").exists()  # a model's own work folder


def test_the_site_shows_a_board_per_model_behind_tabs(submitted, tmp_path):
    entries = [read_entry(path) for path in sorted(submitted.rglob("*.json"))]
    site = tmp_path / "site"
    build_site(entries, site)
    found = boards(entries)
    assert [(board.benchmark, board.model) for board in found] == [(ID, model) for model in sorted(MODELS)]
    markdown = (site / "leaderboard.md").read_text()
    for board in found:
        assert f"### {ID} \u00b7 {board.model}\n\n{markdown_table(board.entries)}" in markdown
    one = tmp_path / "one"  # one board: the page as before, no tabs
    build_site([e for e in entries if e["benchmark"]["model"] == "tiny-random"], one)
    assert 'role="tab"' not in (one / "index.html").read_text() and (one / "retained.svg").exists()
    with open_site(site) as tab:
        tabs = tab.locator("#boards [role=tab]")
        assert tabs.all_inner_texts() == [board.label for board in found]
        panels = [tab.locator(f"#panel-{board.slug}") for board in found]
        assert tabs.first.get_attribute("aria-selected") == "true" and panels[0].is_visible()
        assert not panels[1].is_visible()
        tabs.nth(1).click()
        assert panels[1].is_visible() and not panels[0].is_visible()
        assert tab.evaluate("location.hash") == f"#{found[1].slug}"
        names = panels[1].locator("tbody.entries td.name")
        assert sorted(names.evaluate_all("cells => cells.map(c => c.dataset.value)")) == sorted(POLICIES)
        header = panels[1].locator("thead tr:last-child th", has_text="method")
        header.click()  # sorts this board only
        assert header.get_attribute("aria-sort") == "descending"
        holistic = panels[0].locator("thead tr:last-child th", has_text="holistic score")
        assert holistic.get_attribute("aria-sort") == "descending"
        last = panels[1].locator("thead tr:last-child th").last
        assert last.bounding_box()["x"] + last.bounding_box()["width"] <= WINDOW["width"]
        for image in panels[1].locator("figure img").all():
            assert image.evaluate("img => img.complete && img.naturalWidth > 0"), image.get_attribute("src")
        tab.goto(f"{tab.base_url}#{found[1].slug}", wait_until="load")  # a link to the second board opens it
        tab.reload(wait_until="load")
        assert panels[1].is_visible() and tabs.nth(1).get_attribute("aria-selected") == "true"
        assert tab.errors == []

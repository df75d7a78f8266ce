"""The board in a real browser: entries of a tiny benchmark shaped like bench-v0 (its five tasks, two prompt lengths
and two end-to-end budgets, on tiny-random), submitted as `kvp-gym submit` writes them, built into the page, served on
localhost and driven in headless Chromium (tests/site_browser.py) in a 1280 x 900 window. And the page's note on
lagkv and streaming_llm, checked on a prefilled cache."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex
from site_browser import WINDOW, open_site
from tiny_benchmark import benchmark_toml

from kvp_gym.cache.generate import prefill
from kvp_gym.scorers import get_scorer
from kvp_gym_leaderboard.benchmark import load_benchmark, prepare
from kvp_gym_leaderboard.page import build_site
from kvp_gym_leaderboard.plots import FULL_CACHE_BLACK, ORACLE_GREY, PALETTE, figures
from kvp_gym_leaderboard.site import ordered
from kvp_gym_leaderboard.submission import read_entry, standard_evaluation

WIDE = benchmark_toml(
    "wide-v0",
    "tiny-random, shaped like bench-v0",
    {
        "tasks": ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "essay"],
        "contexts": [1024, 2048],
        "samples": 1,
        "budgets": [32, 64, 128],
    },
    {"tasks": ["niah_single", "niah_multikey", "niah_multiquery"], "context": 1024, "budgets": [64, 128], "samples": 1},
)
POLICIES = ["oracle", "streaming_llm", "lagkv", "tova", "expected_attention", "random"]  # the longest name included


@pytest.fixture(scope="module")
def entries(tmp_path_factory) -> list[dict]:
    """Entries of every policy in POLICIES on the wide tiny benchmark, read back as the board reads them."""
    root = tmp_path_factory.mktemp("wide")
    (root / "wide-v0.toml").write_text(WIDE)
    benchmark = load_benchmark(root / "wide-v0.toml")
    assert prepare(benchmark, root / "set", write_manifest=True, progress=False) == []
    evaluated = standard_evaluation(benchmark, POLICIES, root / "set", root / "work", progress=False)
    for spec, entry in evaluated.items():
        entry = {"name": spec, "description": f"{spec} baseline", "authors": ["tests"], **entry}
        (root / f"{spec}.json").write_text(json.dumps(entry))
    return [read_entry(root / f"{spec}.json") for spec in POLICIES]


@pytest.fixture(scope="module")
def page(entries, tmp_path_factory):
    """The built board open in headless Chromium at 1280 x 900; console errors collected in ``tab.errors``."""
    site = tmp_path_factory.mktemp("board") / "site"
    build_site(entries, site)
    with open_site(site, WINDOW) as tab:
        yield tab


def fresh(tab):
    """The page as loaded (other tests sort it)."""
    tab.reload(wait_until="load")
    return tab


def values(tab, selector: str) -> list[str]:
    return tab.locator(selector).evaluate_all("cells => cells.map(c => c.dataset.value)")


def headers(tab):
    """The sortable headers (the row under the column groups)."""
    return tab.locator("#board thead tr:last-child th")


def test_page_loads_without_errors_and_lists_every_entry(page, entries):
    tab = fresh(page)
    assert tab.title() == "kvp-gym leaderboard"
    assert tab.locator("#entries tr").count() == len(entries)
    assert tab.errors == []


def test_end_to_end_columns_are_visible_at_1280_px(page):
    tab = fresh(page)
    assert tab.viewport_size == WINDOW
    last = headers(tab).last
    assert last.inner_text().startswith("ppl") and "@128" in last.inner_text()  # the last end-to-end column
    assert last.bounding_box()["x"] + last.bounding_box()["width"] <= WINDOW["width"]
    assert tab.evaluate("document.documentElement.scrollWidth") <= WINDOW["width"]  # no horizontal scrolling
    groups = tab.locator("#board thead tr.groups th").all_inner_texts()
    assert [g for g in groups if g] == ["trace level", "end to end"]


def test_rows_are_ordered_by_mean_holistic_score(page, entries):
    tab = fresh(page)
    means = {e["name"]: e["results"]["trace_level"]["holistic_score"]["mean"] for e in entries}
    expected = sorted(means, key=lambda name: (name != "oracle", -means[name]))  # the upper bound first
    assert values(tab, "#entries td.name") == expected
    ranks = [int(r) for r in values(tab, "#entries tr td:nth-child(2)")[1:]]
    assert values(tab, "#entries tr td:nth-child(2)")[0] == "" and ranks == sorted(ranks) and ranks[0] == 1


def test_the_full_cache_is_a_reference_row_not_ranked(page, entries):
    tab = fresh(page)
    reference = tab.locator("#board tbody.reference tr")
    assert reference.count() == 1
    cells = reference.locator("td").all_inner_texts()
    assert cells[:4] == ["full cache", "-", "reference", "-"]  # no rank, no trace-level score
    full = entries[0]["results"]["end_to_end"]["full_cache"]
    accuracy = np.mean([task["mean"] for task in full["accuracy"].values()])
    trace_columns = 5 + 2  # tasks and prompt lengths
    assert cells[4 : 4 + trace_columns] == ["-"] * trace_columns
    assert cells[4 + trace_columns :] == [f"{accuracy:.3f}"] * 2 + [f"{full['perplexity']['mean']:.2f}"] * 2
    assert "full cache" not in values(tab, "#entries td.name")
    headers(tab).filter(has_text="method").click()  # sorting moves the entries, never the reference
    assert tab.locator("#board tbody").first.locator("td").first.inner_text() == "full cache"


def test_headers_show_they_sort_and_aria_sort_follows_clicks(page):
    tab = fresh(page)
    sortable = headers(tab)
    labels = sortable.all_inner_texts()
    states = [sortable.nth(i).get_attribute("aria-sort") for i in range(sortable.count())]
    assert states == ["descending" if "holistic" in label else "none" for label in labels]
    arrow = "th => [getComputedStyle(th).cursor, getComputedStyle(th.querySelector('button'), '::after').content]"
    for i in range(sortable.count()):
        cursor, glyph = sortable.nth(i).evaluate(arrow)
        assert cursor == "pointer" and ("\u21c5" in glyph or "\u25bc" in glyph), (labels[i], cursor, glyph)
    accuracy = sortable.filter(has_text="acc @64")
    accuracy.click()
    assert accuracy.get_attribute("aria-sort") == "descending"
    assert sortable.filter(has_text="holistic score").get_attribute("aria-sort") == "none"
    assert "\u25bc" in accuracy.evaluate(arrow)[1]
    column = accuracy.evaluate("th => th.cellIndex") + 1
    scores = [float(v) for v in values(tab, f"#entries tr td:nth-child({column})")]
    assert scores == sorted(scores, reverse=True)
    accuracy.click()
    assert accuracy.get_attribute("aria-sort") == "ascending" and "\u25b2" in accuracy.evaluate(arrow)[1]
    assert [float(v) for v in values(tab, f"#entries tr td:nth-child({column})")] == sorted(scores)
    assert tab.errors == []


def test_clicking_a_header_reorders_the_rows(page):
    tab = fresh(page)

    def column(selector: str) -> list[str]:
        return tab.locator(selector).evaluate_all("cells => cells.map(c => c.dataset.value)")

    before = column("#entries td.name")
    tab.locator("#board th", has_text="method").click()
    descending = column("#entries td.name")
    assert descending == sorted(before, reverse=True) and descending != before
    tab.locator("#board th", has_text="method").click()
    assert column("#entries td.name") == sorted(before)
    tab.locator("#board th", has_text="holistic score").click()
    scores = [float(v) for v in column("#entries tr td:nth-child(4)")]
    assert scores == sorted(scores, reverse=True)
    assert tab.errors == []


def test_notes_say_what_the_oracle_bounds_and_why_numbers_repeat(page):
    tab = fresh(page)
    oracle = tab.locator("#note-oracle").inner_text()
    assert "upper bound of the trace-level score" in oracle and "not of accuracy" in oracle
    badge = tab.locator("#entries tr.upper-bound .badge").get_attribute("title")
    assert "not of accuracy" in badge
    same = tab.locator(".note-same").all_inner_texts()  # lagkv = streaming_llm at budgets 64 and 128 (below)
    assert len(same) == 1 and "lagkv and streaming_llm have identical end-to-end numbers" in same[0]
    assert "exactly streaming_llm's set" in same[0]


def test_plots_are_present_and_drawn(page):
    tab = fresh(page)
    images = tab.locator("figure img")
    assert images.count() >= 3  # retained fraction, accuracy vs budget, heatmap
    for i in range(images.count()):
        size = images.nth(i).evaluate("img => [img.naturalWidth, img.naturalHeight, img.complete]")
        assert size[0] > 0 and size[1] > 0 and size[2], images.nth(i).get_attribute("src")
    assert tab.locator("#submit").is_visible()


def test_plots_use_a_safe_palette_the_leader_strongest_and_legends_outside(entries):
    board = ordered(entries)
    leader = next(e["name"] for e in board if e["name"] != "oracle")
    drawn = figures(board)
    try:
        for name in ("retained.svg", "accuracy.svg"):
            fig = drawn[name]
            ax = fig.axes[0]
            fig.canvas.draw()
            legend = ax.get_legend().get_window_extent()
            assert legend.x0 >= ax.get_window_extent().x1, f"{name}: the legend overlaps the data"
            lines = {line.get_label(): line for line in ax.get_lines()}
            top = lines[f"{leader} (top ranked)"]
            others = [line for line in lines.values() if line is not top]
            entries_below = [line for label, line in lines.items() if line is not top and "full cache" not in label]
            assert top.get_linewidth() > max(line.get_linewidth() for line in others), name
            assert top.get_zorder() > max(line.get_zorder() for line in entries_below), name  # the reference: above
            assert [to_hex(line.get_color()) for line in others].count(PALETTE[0].lower()) == 0, name  # its own
            assert {to_hex(line.get_color()) for line in lines.values()} <= {c.lower() for c in PALETTE} | {
                ORACLE_GREY.lower(),
                FULL_CACHE_BLACK.lower(),
            }
            assert (
                lines["oracle"].get_linestyle() == "--" and to_hex(lines["oracle"].get_color()) == ORACLE_GREY.lower()
            )
        reference = next(line for line in drawn["accuracy.svg"].axes[0].get_lines() if "full cache" in line.get_label())
        assert reference.get_linestyle() == "--" and to_hex(reference.get_color()) == FULL_CACHE_BLACK
    finally:
        plt.close("all")


def test_lagkv_keeps_streaming_llms_tokens_up_to_sinks_plus_partition(tiny):
    """What the page's note on their identical end-to-end numbers says: one prefilled cache, both scorers, the
    cache's own keep_top (as evaluate-e2e does), the same rows in every layer and KV head up to 4 + 128 tokens."""
    model, _ = tiny
    lagkv, streaming_llm = get_scorer("lagkv"), get_scorer("streaming_llm")
    length = lagkv.sinks + 6 * lagkv.partition  # no remainder: the tail is one partition, the least it can be
    ids = torch.randint(model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(0))
    state = prefill(model, ids.tolist(), 0, sinks=4, recent=16)

    def kept(scorer, budget: int) -> list[torch.Tensor]:
        cache = state.cache.copy()
        cache.keep_top(cache.score(scorer), budget)
        return [layer.positions for layer in cache.layers]

    for budget in (64, 128, lagkv.sinks + lagkv.partition, 256):
        same = all(torch.equal(a, b) for a, b in zip(kept(lagkv, budget), kept(streaming_llm, budget), strict=True))
        assert same == (budget <= lagkv.sinks + lagkv.partition), budget

"""The board's page: one static HTML file (no network needed) and its SVG plots, rendered from the board's numbers;
:func:`build_site` writes them with the Markdown table. Entries of several benchmarks or models make several boards:
one tab each (the page's address, ``#SLUG``, says which is shown), one table each.

The table fits a 1280 px wide window: column groups ("trace level", "end to end"), short per-task headers with the
full meaning in a tooltip, a smaller font for the detail columns, and the page as wide as the window. Every header
sorts the entries when clicked (an arrow shows it; ``aria-sort`` says the order); the full-cache reference row stays
on top, not ranked. Notes under the table say what the oracle bounds and explain entries with identical end-to-end
numbers. The plots come from :mod:`kvp_gym_leaderboard.plots`.

Imports kvp_gym.storage, kvp_gym_leaderboard.plots and kvp_gym_leaderboard.site (boards, kinds, ranks, columns,
cells, the Markdown table); kvp_gym_leaderboard.definition when a page names its benchmark; kvp_gym.scorers when it
explains identical end-to-end numbers.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvp_gym.storage import atomic_path
from kvp_gym_leaderboard.plots import plots
from kvp_gym_leaderboard.site import (
    FULL_CACHE_NAME,
    KIND_BADGES,
    REFERENCE_BADGE,
    UPPER_BOUND,
    Board,
    board_kind,
    boards,
    cell,
    columns,
    format_value,
    full_cache,
    markdown_boards,
    ranks,
)

# --- the page ------------------------------------------------------------------------------------------------------


def _header(key: str) -> tuple[str, str]:
    """(short label, tooltip) of a score column's header."""
    kind, _, what = key.partition(":")
    if kind == "task":
        # a soft hyphen: "multi-key" breaks in two when the window is narrow
        return what.removeprefix("niah_").replace("multi", "multi\u00ad"), f"holistic score on the {what} prompts"
    if kind == "context":
        return f"{what} tok", f"holistic score on the {what}-token prompts"
    if kind == "accuracy":
        return f"acc @{what}", f"exact-match accuracy at {what} tokens per KV head, mean over the tasks"
    return f"ppl @{what}", f"perplexity of the essays' real continuation at {what} tokens per KV head"


TRACE_DETAIL = ("task:", "context:")  # the trace-level breakdowns, in a smaller font


def _classes(cols: list[tuple[str, str]]) -> dict[str, str]:
    """CSS classes of each score column: "detail" for the trace-level breakdowns, "group-start" (a rule on its
    left) for the first end-to-end column."""
    e2e = [key for key, _ in cols if not key.startswith(TRACE_DETAIL)]
    return {key: "detail" if key.startswith(TRACE_DETAIL) else "group-start" * (key == e2e[0]) for key, _ in cols}


def _head(cols: list[tuple[str, str]]) -> str:
    """The two header rows: column groups, then one sortable header per column (initially: by holistic score)."""
    trace = sum(key.startswith(TRACE_DETAIL) for key, _ in cols)
    groups = f'<th colspan="3"></th><th colspan="{1 + trace}" class="group-start">trace level</th>'
    groups += f'<th colspan="{len(cols) - trace}" class="group-start">end to end</th>' if len(cols) > trace else ""
    classes = _classes(cols)
    named = [
        ("name", "method", "the entry's name (hover a name for its description)"),
        ("", "rank", "1 + the entries surely better (paired bootstrap); upper bounds and references are not ranked"),
        ("name", "kind", "what the policy reads"),
        ("group-start", "holistic score", "mean over samples and KV heads, with its 95% bootstrap interval"),
    ] + [(classes[key], *_header(key)) for key, _ in cols]
    sortable = "".join(
        f'<th{_class(cls)} aria-sort="{"descending" if label == "holistic score" else "none"}" '
        f'title="{html.escape(tooltip)}; click to sort"><button type="button">{html.escape(label)}</button></th>'
        for cls, label, tooltip in named
    )
    return f'<tr class="groups">{groups}</tr><tr>{sortable}</tr>'


def _class(names: str) -> str:
    """A class attribute, or nothing for no class."""
    return f' class="{names}"' if names else ""


def _value_cell(key: str, value: float | None, cls: str) -> str:
    classes = " ".join(filter(None, [cls, "pending" if value is None else ""]))
    return (
        f'<td{_class(classes)} data-value="{"" if value is None else f"{value:.6f}"}">{format_value(key, value)}</td>'
    )


def _rows(entries: Sequence[dict[str, Any]], cols: list[tuple[str, str]]) -> list[str]:
    rows, classes = [], _classes(cols)
    for rank, entry in zip(ranks(entries), entries, strict=True):
        score = entry["results"]["trace_level"]["holistic_score"]
        low, high = score["ci95"]
        kind = board_kind(entry)
        badge = KIND_BADGES[kind]
        badge_title = (
            ' title="sees the future: an upper bound of the trace-level score, not of accuracy (see the notes)"'
            if kind == UPPER_BOUND
            else ""
        )
        cells = [
            f'<td class="name" data-value="{html.escape(entry["name"])}" title="{html.escape(entry["description"])}">'
            f"{html.escape(entry['name'])}</td>",
            f'<td data-value="{"" if rank is None else rank}">{"-" if rank is None else rank}</td>',
            f'<td class="kind" data-value="{kind}"><span class="badge"{badge_title}>{badge}</span></td>',
            f'<td class="group-start" data-value="{score["mean"]:.6f}">{score["mean"]:.3f}'
            f'<span class="ci">[{low:.3f}, {high:.3f}]</span></td>',
        ]
        cells += [_value_cell(key, cell(entry, key), classes[key]) for key, _ in cols]
        rows.append(f"<tr{' class=upper-bound' if kind == UPPER_BOUND else ''}>" + "".join(cells) + "</tr>")
    return rows


def _reference_row(entries: Sequence[dict[str, Any]], cols: list[tuple[str, str]]) -> str:
    """The full cache: end-to-end values only, "-" elsewhere; not ranked, never sorted."""
    reference = full_cache(entries)
    if reference is None:
        return ""
    cells = [
        f'<td class="name" title="the model with its whole cache: what eviction is measured against">'
        f"{FULL_CACHE_NAME}</td>",
        '<td title="a reference, not ranked">-</td>',
        f'<td class="kind"><span class="badge reference">{REFERENCE_BADGE}</span></td>',
        '<td class="group-start" title="nothing is evicted: no trace-level score">-</td>',
    ]
    for key, cls in _classes(cols).items():
        cells.append(f"<td{_class(cls)}>{'-' if key not in reference else format_value(key, reference[key])}</td>")
    return '<tbody class="reference"><tr class="reference">' + "".join(cells) + "</tr></tbody>"


def _notes(entries: Sequence[dict[str, Any]], cols: list[tuple[str, str]], suffix: str = "") -> str:
    """What the reference rows mean, and why entries share their end-to-end numbers (``suffix`` makes the ids of a
    page's several boards unique)."""
    notes = []
    if full_cache(entries) is not None:
        notes.append(
            f'<li id="note-full-cache{suffix}"><b>{FULL_CACHE_NAME}</b>: the model with its whole cache, nothing '
            "evicted; the reference for the end-to-end columns (the same at every budget). It has no trace-level score "
            "and no rank.</li>"
        )
    oracles = [e for e in entries if board_kind(e) == UPPER_BOUND]
    if oracles:
        oracle, budgets = oracles[0], [key for key, _ in cols if key.startswith("accuracy:")]
        better = [
            e["name"]
            for e in entries
            if board_kind(e) != UPPER_BOUND
            and any(None not in (cell(e, b), cell(oracle, b)) and cell(e, b) > cell(oracle, b) for b in budgets)
        ]
        verb = "answers" if len(better) == 1 else "answer"
        here = f" Here {', '.join(map(html.escape, better))} {verb} more at some budget." if better else ""
        names = ", ".join(html.escape(e["name"]) for e in oracles)
        notes.append(
            f'<li id="note-oracle{suffix}"><b>{names}</b> (upper bound) keeps, in every KV head, the tokens the '
            "full-cache continuation paid the most attention to: an upper bound of the trace-level score (1 by "
            "construction), not of accuracy. Once tokens are evicted the hidden states change, so the answer no longer "
            "attends as the full-cache one did, and a greedy answer that differs in one token differs from there on; "
            "where the full cache answered wrong, the oracle keeps what the wrong answer read. So a policy that keeps "
            f"other tokens can answer more prompts than the oracle.{here}</li>"
        )
    for group in _same_end_to_end(entries):
        names = sorted(e["name"] for e in group)
        budgets = [int(key.partition(":")[2]) for key, _ in cols if key.startswith(("accuracy:", "ppl:"))]
        why = _why_the_same(group, budgets)
        notes.append(
            f'<li class="note-same"><b>{", ".join(map(html.escape, names[:-1]))} and {html.escape(names[-1])}</b> '
            f"have identical end-to-end numbers. {why}</li>"
        )
    return f'<ul class="notes" id="notes{suffix}">{"".join(notes)}</ul>' if notes else ""


def _why_the_same(group: Sequence[dict[str, Any]], budgets: list[int]) -> str:
    """Why a group of entries has identical end-to-end numbers, where it follows from their scorers ("" otherwise):
    lagkv and streaming_llm with the same sinks keep the same tokens at every budget up to sinks + partition
    (tests/test_leaderboard_site.py checks it on a prefilled cache)."""
    parameters = {e["load"]["scorer"]: e["load"].get("parameters", {}) for e in group}
    registered = not any("policy_file" in e["load"] for e in group)  # a policy file's scorer only names itself
    if len(group) != 2 or set(parameters) != {"lagkv", "streaming_llm"} or not registered:
        return ""
    from kvp_gym.scorers import get_scorer

    lagkv, streaming_llm = (get_scorer(name, **parameters[name]) for name in ("lagkv", "streaming_llm"))
    sinks, size = lagkv.sinks, lagkv.partition
    if streaming_llm.sinks != sinks or max(budgets) > sinks + size:
        return ""
    return (
        f"lagkv always keeps its {sinks} sinks and its tail, newest first: the last full {size}-token partition (which "
        f"has no next partition to be scored against) and the remainder, at least {size} tokens (a prompt too short "
        f"to partition is ranked by recency alone). At budgets up to "
        f"{sinks} + {size} tokens it therefore keeps the sinks and the most recent tokens, exactly streaming_llm's "
        "set, in every layer and KV head. Their trace-level scores differ because the holistic score also ranks the "
        "tokens beyond those budgets."
    )


def _same_end_to_end(entries: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Groups of two or more entries whose end-to-end accuracy and perplexity are all identical. Only entries with a
    perplexity count: accuracy alone (a few right or wrong answers) is often equal by chance, a perplexity to every
    digit is equal only when the same tokens are kept."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        e2e = entry["results"]["end_to_end"]
        if e2e and e2e["perplexity"]:
            key = json.dumps([e2e["accuracy"], e2e["perplexity"]], sort_keys=True)
            groups.setdefault(key, []).append(entry)
    return [group for group in groups.values() if len(group) > 1]


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
p, ol, ul.notes { max-width: 75rem; } ul.notes li { margin: 0.3rem 0; }
table { border-collapse: collapse; font-size: 0.85rem; font-variant-numeric: tabular-nums; }
th, td { padding: 0.3rem 0.4rem; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; vertical-align: bottom; }
tr:not(.groups) th { position: sticky; top: 0; z-index: 1; white-space: normal; }  /* headers wrap when narrow */
tr.groups th { background: #fff; font-weight: 600; color: #555; text-align: center; border-bottom: 2px solid #bbb; }
.group-start { border-left: 2px solid #ccc; }
th[aria-sort] { cursor: pointer; user-select: none; } th[aria-sort]:hover { background: #e6ecf5; }
th button { all: unset; cursor: pointer; } th button:focus-visible { outline: 2px solid #0072B2; }
th[aria-sort] button::after { content: "\\A0\\21C5"; color: #999; }  /* a no-break space: the arrow stays */
th[aria-sort="descending"] button::after { content: "\\A0\\25BC"; color: #0072B2; }
th[aria-sort="ascending"] button::after { content: "\\A0\\25B2"; color: #0072B2; }
.detail { font-size: 0.78rem; }
td.name, th.name, td.kind { text-align: left; } tr.upper-bound { color: #666; font-style: italic; }
tr.reference td { background: #fafaf0; color: #444; border-bottom: 2px solid #bbb; }
.badge { font-size: 0.72rem; padding: 0.1rem 0.4rem; border-radius: 0.6rem; background: #e8eef8; }
.badge.reference { background: #eee; border: 1px dashed #777; }
.ci { display: block; color: #777; font-size: 0.7rem; } .pending { color: #aaa; }
figure { display: inline-block; margin: 1rem; vertical-align: top; } figure img { max-width: 90vw; height: auto; }
pre { background: #f6f6f6; padding: 0.8rem; overflow-x: auto; }
nav.tabs { display: flex; gap: 0.3rem; border-bottom: 2px solid #bbb; margin: 1rem 0; }
nav.tabs button { font: inherit; padding: 0.4rem 0.9rem; border: 1px solid #bbb; border-bottom: none; cursor: pointer;
  background: #f4f4f4; border-radius: 0.4rem 0.4rem 0 0; }
nav.tabs button[aria-selected="true"] { background: #fff; color: #0072B2; font-weight: 600; }
nav.tabs button:focus-visible { outline: 2px solid #0072B2; }
"""

_SCRIPT = """
document.querySelectorAll("table.board").forEach(table => {
  const entries = table.querySelector("tbody.entries");
  const sortable = table.querySelectorAll("th[aria-sort]");
  sortable.forEach(th => th.addEventListener("click", () => {
    const descending = th.getAttribute("aria-sort") !== "descending";
    sortable.forEach(h => h.setAttribute("aria-sort", "none"));
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    const key = row => row.children[th.cellIndex].dataset.value;
    const rows = Array.from(entries.rows).sort((a, b) => {
      const x = key(a), y = key(b);
      const numeric = x !== "" && y !== "" && !isNaN(x) && !isNaN(y);
      const order = numeric ? Number(x) - Number(y) : (x === "" ? 1 : y === "" ? -1 : x.localeCompare(y));
      return descending ? -order : order;
    });
    rows.forEach(row => entries.appendChild(row));
  }));
});
"""

# Several boards: one tab per board, the page's address (#SLUG) saying which is shown, so that a link can name one.
_TABS_SCRIPT = """
const tabs = Array.from(document.querySelectorAll("#boards [role=tab]"));
function show(tab) {
  tabs.forEach(t => {
    t.setAttribute("aria-selected", t === tab ? "true" : "false");
    t.tabIndex = t === tab ? 0 : -1;
    document.getElementById(t.getAttribute("aria-controls")).hidden = t !== tab;
  });
}
tabs.forEach((tab, i) => {
  tab.addEventListener("click", () => { show(tab); history.replaceState(null, "", "#" + tab.dataset.board); });
  tab.addEventListener("keydown", event => {
    const step = {ArrowRight: 1, ArrowLeft: -1}[event.key];
    if (step) { const next = tabs[(i + step + tabs.length) % tabs.length]; next.focus(); next.click(); }
  });
});
show(tabs.find(t => "#" + t.dataset.board === location.hash) || tabs[0]);
"""

_HOW_TO_SUBMIT = """
<h2 id="submit">How to submit</h2>
<ol>
<li>Register your scorer under the <code>kvp_gym.scorers</code> entry points of your package (docs/evaluation.md
shows the contract), or train KVP agents into a checkpoint file.</li>
<li>Prepare the benchmark's trace set once (it is checked against the committed manifest):
<pre>kvp-gym leaderboard prepare {benchmark}</pre></li>
<li>Run the standard evaluation; it writes a valid entry:
<pre>kvp-gym submit --benchmark {benchmark} --policy NAME[:param=value;...] [--checkpoint FILE] \\
    --name NAME --authors "A, B" --description "..." --out my-entry.json</pre></li>
<li>Check it, add it (and its checkpoint) to <code>leaderboard/entries/</code> in a pull request; the maintainers
reproduce it with <code>kvp-gym leaderboard validate --rerun my-entry.json</code>.</li>
</ol>
"""
FIGURES = {
    "retained.svg": "Share of the future's attention kept, against the budget (trace level).",
    "accuracy.svg": "Exact-match accuracy with the evicting cache, against the budget.",
    "heatmap.svg": "The top entry's holistic score per layer and KV head.",
}


def _intro(entries: Sequence[dict[str, Any]]) -> str:
    """What the columns, ranks and kinds mean (the same for every board)."""
    pending = any(e["results"]["end_to_end"] is None for e in entries)
    return f"""<p>Holistic score: how well a policy's ranking of the cached tokens keeps the attention the future really
pays, at every budget at once (1 = the oracle ranking), mean over samples and KV heads with a 95% bootstrap interval
over samples. Rows are ordered by mean; two entries tie unless the 95% paired bootstrap interval of their difference
(the same samples and heads) excludes 0: a rank is 1 + the number of entries surely better, never better than the
rank of a row above it. Kinds: <span class="badge">K/V only</span> reads keys, values and
positions; <span class="badge">uses queries</span> also reads the prompt's queries; <span class="badge">upper
bound</span> sees the future, bounds the trace-level score (not accuracy) and is not ranked. Accuracy and perplexity
are end to end with the evicting cache (accuracy: mean over tasks){
        "; <span class=pending>pending</span> = not evaluated end to end yet" if pending else ""
    }. Click a column header to sort (hover it for what the column means).</p>"""


def _table(board: Board, suffix: str = "") -> str:
    """One board's table and the notes under it (``suffix``: unique ids where a page has several boards)."""
    entries = board.entries
    cols = columns(entries)
    return f"""<table id="board{suffix}" class="board"><thead>{_head(cols)}</thead>
{_reference_row(entries, cols)}
<tbody id="entries{suffix}" class="entries">
{chr(10).join(_rows(entries, cols))}
</tbody></table>
{_notes(entries, cols, suffix)}"""


def _figures(names: list[str]) -> str:
    """The plots ``names`` (files beside the page, ``NAME.svg`` or a board's ``SLUG-NAME.svg``) with their captions."""
    captions = {name: FIGURES[name.rsplit("-", 1)[-1]] for name in names}
    return "".join(
        f'<figure><img src="{name}" alt="{html.escape(captions[name])}">'
        f"<figcaption>{captions[name]}</figcaption></figure>"
        for name in names
    )


def page(found: Sequence[Board], title: str | None, plot_names: dict[str, list[str]]) -> str:
    """The HTML page of the boards ``found`` (:func:`kvp_gym_leaderboard.site.boards`), showing each board's plots
    ``plot_names[board.slug]`` (files beside it). One board is one table; several are tabs, one table each (without
    JavaScript every board's section shows, one under the other)."""
    everything = [entry for board in found for entry in board.entries]
    first = found[0]
    if len(found) == 1:
        body = f"""<p>{html.escape(title or _benchmark_title(first))}</p>
{_intro(everything)}
{_table(first)}
<h2>Plots</h2>
{_figures(plot_names[first.slug])}"""
    else:
        tabs = "".join(
            f'<button type="button" role="tab" id="tab-{board.slug}" aria-controls="panel-{board.slug}" '
            f'data-board="{board.slug}">{html.escape(board.label)}</button>'
            for board in found
        )
        panels = "".join(
            f"""<section class="panel" role="tabpanel" id="panel-{board.slug}" aria-labelledby="tab-{board.slug}">
<h2>{html.escape(board.label)}</h2>
<p>{html.escape(_benchmark_title(board))}</p>
{_table(board, f"-{board.slug}")}
<h3>Plots</h3>
{_figures(plot_names[board.slug])}
</section>"""
            for board in found
        )
        body = f"""<p>{html.escape(title or f"{len(found)} boards, one per benchmark and model:")}</p>
{_intro(everything)}
<nav class="tabs" id="boards" role="tablist" aria-label="benchmark and model">{tabs}</nav>
{panels}"""
    # How to submit to the first board: bench-v0's command unless that board is one model's of several.
    benchmark = f"{first.benchmark} --model {first.model}" if first.model else "bench-v0"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>kvp-gym leaderboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<style>{_STYLE}</style></head>
<body>
<h1>kvp-gym leaderboard</h1>
{body}
{_HOW_TO_SUBMIT.format(benchmark=benchmark)}
<script>{_SCRIPT}{_TABS_SCRIPT if len(found) > 1 else ""}</script>
</body></html>
"""


def _benchmark_title(board: Board) -> str:
    """What a board's benchmark part holds: its title, samples, tasks, prompt lengths, recorded layers (where not
    every layer), protocol and end-to-end settings."""
    if board.benchmark is None:
        return "Entries of your own runs"
    from kvp_gym_leaderboard.definition import BenchmarkError, load_benchmark

    try:
        benchmark = load_benchmark(board.benchmark, board.model)
    except BenchmarkError:  # a benchmark of the user's own, not shipped with this package
        return f"{board.label} entries"
    level = benchmark.trace_level
    if level.layers is None:
        layers = ""
    else:
        layers = "; the full-attention layers" if level.layers == "global" else f"; layers {list(level.layers)}"
    return (
        f"{benchmark.label}: {benchmark.title}. Trace level: {len(level.tasks) * len(level.contexts) * level.samples} "
        f"test samples ({', '.join(level.tasks)}; {', '.join(map(str, level.contexts))} prompt tokens{layers}; "
        f"{level.protocol} protocol). End to end: {benchmark.end_to_end.samples} prompts per task "
        f"({', '.join(benchmark.end_to_end.tasks)}) and {benchmark.end_to_end.essays} essays, "
        f"{benchmark.end_to_end.context} tokens."
    )


def build_site(entries: Sequence[dict[str, Any]], out: str | Path, title: str | None = None) -> Path:
    """Write ``out/index.html``, its SVG plots and ``out/leaderboard.md`` (the folder is replaced atomically): one
    board per benchmark and model (:func:`kvp_gym_leaderboard.site.boards`), whose plots are named ``SLUG-NAME.svg``
    where there are several (``NAME.svg`` for one). Returns the page's path."""
    if not entries:
        raise ValueError("no entries to build a board from")
    found = boards(entries)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        plot_names = {}
        for board in found:
            prefix = f"{board.slug}-" if len(found) > 1 else ""
            drawn = {prefix + name: svg for name, svg in plots(board.entries).items() if svg is not None}
            for name, svg in drawn.items():
                (tmp / name).write_text(svg)
            plot_names[board.slug] = list(drawn)
        (tmp / "index.html").write_text(page(found, title, plot_names))
        (tmp / "leaderboard.md").write_text(markdown_boards(entries))
    return out / "index.html"

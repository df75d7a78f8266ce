"""The board's page: one static HTML file (no network needed) and its SVG plots, rendered from the board's numbers;
:func:`build_site` writes them with the Markdown table.

The table fits a 1280 px wide window: column groups ("trace level", "end to end"), short per-task headers with the
full meaning in a tooltip, a smaller font for the detail columns, and the page as wide as the window. Every header
sorts the entries when clicked (an arrow shows it; ``aria-sort`` says the order); the full-cache reference row stays
on top, not ranked. Notes under the table say what the oracle bounds and explain entries with identical end-to-end
numbers. Plots use the Okabe-Ito colour-blind-safe palette with the top-ranked entry drawn strongest, references
(oracle, full cache) in grey and black dashes, and legends outside the data.

Imports kvp_gym.storage, kvp_gym_leaderboard.site (kinds, ranks, order, columns, cells, the Markdown table) and
kvp_gym_leaderboard.submission; matplotlib when a
plot is drawn; kvp_gym_leaderboard.benchmark when a page names its benchmark; kvp_gym.scorers when it explains
identical end-to-end numbers.
"""

from __future__ import annotations

import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvp_gym.storage import atomic_path
from kvp_gym_leaderboard.site import (
    FULL_CACHE_NAME,
    KIND_BADGES,
    REFERENCE_BADGE,
    UPPER_BOUND,
    board_kind,
    cell,
    columns,
    format_value,
    full_cache,
    markdown_table,
    ordered,
    ranks,
)
from kvp_gym_leaderboard.submission import KINDS

# Okabe & Ito (2008), distinct under every common colour-vision deficiency; black is the full cache's, and yellow is
# left out (too pale on white). The top-ranked entry alone gets the first, darkest one (and the first marker); the
# others cycle through the rest: 5 colours x 6 markers, 30 entries before a pair repeats.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
ORACLE_GREY, FULL_CACHE_BLACK = "#777777", "#000000"


def figures(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The plots as matplotlib figures by file name (None: nothing to draw), for entries in board order; the caller
    closes them (:func:`plots` does)."""
    return {
        "retained.svg": _retained_plot(entries),
        "accuracy.svg": _accuracy_plot(entries),
        "heatmap.svg": _heatmap(entries),
    }


def plots(entries: Sequence[dict[str, Any]]) -> dict[str, str | None]:
    """SVG text of each plot by file name (None: nothing to draw), for entries in board order."""
    return {name: None if fig is None else _svg(fig) for name, fig in figures(entries).items()}


# --- plots (matplotlib, written as SVG text) -----------------------------------------------------------------------


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")  # "tight" widens the file to hold the outside legend
    plt.close(fig)
    return buffer.getvalue()


def _figure(width: float = 5.6, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _styles(entries: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Line style of each entry by name: upper bounds grey and dashed; ranked entries a palette colour and marker in
    rank order, dotted when they use queries; the top-ranked entry thickest, darkest and drawn on top."""
    styles, position = {}, 0
    for entry in entries:
        kind = board_kind(entry)
        if kind == UPPER_BOUND:
            styles[entry["name"]] = {"color": ORACLE_GREY, "linestyle": "--", "marker": "x", "linewidth": 1.5}
            continue
        leader, other = position == 0, position - 1
        styles[entry["name"]] = {
            "color": PALETTE[0] if leader else PALETTE[1 + other % (len(PALETTE) - 1)],
            "marker": MARKERS[0] if leader else MARKERS[1 + other % (len(MARKERS) - 1)],
            "linestyle": ":" if kind == KINDS["queries"] else "-",
            "linewidth": 3.0 if leader else 1.3,
            "markersize": 7 if leader else 5,
            "zorder": 5 if leader else 3,
            "label": f"{entry['name']} (top ranked)" if leader else entry["name"],
        }
        position += 1
    return styles


def _plot_entry(ax, x: list[int], y: list[float | None], entry: dict[str, Any], style: dict[str, Any]) -> None:
    ax.plot(x, [np.nan if v is None else v for v in y], **{"label": entry["name"], **style})


def _outside_legend(ax) -> None:
    """The legend right of the axes, so that it never covers a line."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, frameon=False)


def _retained_plot(entries: Sequence[dict[str, Any]]):
    fig, ax = _figure()
    styles = _styles(entries)
    for entry in entries:
        curve = entry["results"]["trace_level"]["retained_fraction"]
        budgets = sorted(curve, key=int)
        _plot_entry(ax, [int(b) for b in budgets], [curve[b] for b in budgets], entry, styles[entry["name"]])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget (tokens kept per KV head)")
    ax.set_ylabel("retained fraction of the future's attention")
    ax.set_title("Retained fraction vs budget (trace level)")
    ax.grid(alpha=0.3)
    _outside_legend(ax)
    return fig


def _accuracy_plot(entries: Sequence[dict[str, Any]]):
    measured = [e for e in entries if e["results"]["end_to_end"]]
    reference = full_cache(entries)
    if not measured or reference is None:
        return None
    fig, ax = _figure()
    styles = _styles(entries)  # the same colours as in the retained-fraction plot
    budgets = sorted({int(b) for e in measured for t in e["results"]["end_to_end"]["accuracy"].values() for b in t})
    full = reference[f"accuracy:{budgets[0]}"]
    # On top: a thin dashed line still shows the entries under it.
    ax.axhline(
        full, color=FULL_CACHE_BLACK, linestyle="--", linewidth=1.2, zorder=6, label=f"{FULL_CACHE_NAME} (reference)"
    )
    for entry in measured:
        _plot_entry(ax, budgets, [cell(entry, f"accuracy:{b}") for b in budgets], entry, styles[entry["name"]])
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("budget (tokens kept per KV head)")
    ax.set_ylabel("exact-match accuracy (mean over tasks)")
    ax.set_title("End-to-end accuracy vs budget")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    _outside_legend(ax)
    return fig


def _heatmap(entries: Sequence[dict[str, Any]]):
    ranked = [e for e in entries if board_kind(e) != UPPER_BOUND]
    if not ranked:
        return None
    from matplotlib.ticker import MaxNLocator

    top = ranked[0]
    grid = np.asarray(top["results"]["trace_level"]["per_layer_head"], float)
    fig, ax = _figure(3.2 + 0.4 * grid.shape[1], 4.5)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)  # viridis: colour-blind safe
    fig.colorbar(image, ax=ax, label="holistic score")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(grid.shape[1]))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{top['name']}: per layer and KV head")
    return fig


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


def _notes(entries: Sequence[dict[str, Any]], cols: list[tuple[str, str]]) -> str:
    """What the reference rows mean, and why entries share their end-to-end numbers."""
    notes = []
    if full_cache(entries) is not None:
        notes.append(
            f'<li id="note-full-cache"><b>{FULL_CACHE_NAME}</b>: the model with its whole cache, nothing evicted; the '
            "reference for the end-to-end columns (the same at every budget). It has no trace-level score and no "
            "rank.</li>"
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
            f'<li id="note-oracle"><b>{names}</b> (upper bound) keeps, in every KV head, the tokens the full-cache '
            "continuation paid the most attention to: an upper bound of the trace-level score (1 by construction), not "
            "of accuracy. Once tokens are evicted the hidden states change, so the answer no longer attends as the "
            "full-cache one did, and a greedy answer that differs in one token differs from there on; where the full "
            "cache answered wrong, the oracle keeps what the wrong answer read. So a policy that keeps other tokens "
            f"can answer more prompts than the oracle.{here}</li>"
        )
    for group in _same_end_to_end(entries):
        names = sorted(e["name"] for e in group)
        budgets = [int(key.partition(":")[2]) for key, _ in cols if key.startswith(("accuracy:", "ppl:"))]
        why = _why_the_same(group, budgets)
        notes.append(
            f'<li class="note-same"><b>{", ".join(map(html.escape, names[:-1]))} and {html.escape(names[-1])}</b> '
            f"have identical end-to-end numbers. {why}</li>"
        )
    return f'<ul class="notes" id="notes">{"".join(notes)}</ul>' if notes else ""


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
"""

_SCRIPT = """
const entries = document.getElementById("entries");
document.querySelectorAll("#board th[aria-sort]").forEach(th => th.addEventListener("click", () => {
  const descending = th.getAttribute("aria-sort") !== "descending";
  document.querySelectorAll("#board th[aria-sort]").forEach(h => h.setAttribute("aria-sort", "none"));
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
"""

_HOW_TO_SUBMIT = """
<h2 id="submit">How to submit</h2>
<ol>
<li>Register your scorer under the <code>kvp_gym.scorers</code> entry points of your package (docs/evaluation.md
shows the contract), or train KVP agents into a checkpoint file.</li>
<li>Prepare the benchmark's trace set once (it is checked against the committed manifest):
<pre>kvp-gym leaderboard prepare bench-v0</pre></li>
<li>Run the standard evaluation; it writes a valid entry:
<pre>kvp-gym submit --benchmark bench-v0 --policy NAME[:param=value;...] [--checkpoint FILE] \\
    --name NAME --authors "A, B" --description "..." --out my-entry.json</pre></li>
<li>Check it, add it (and its checkpoint) to <code>leaderboard/entries/</code> in a pull request; the maintainers
reproduce it with <code>kvp-gym leaderboard validate --rerun my-entry.json</code>.</li>
</ol>
"""


def page(entries: Sequence[dict[str, Any]], title: str | None, plot_names: list[str]) -> str:
    """The HTML page of ``entries`` (in board order: :func:`kvp_gym_leaderboard.site.ordered`), showing the plots
    ``plot_names`` (files beside it)."""
    cols = columns(entries)
    figures = {
        "retained.svg": "Share of the future's attention kept, against the budget (trace level).",
        "accuracy.svg": "Exact-match accuracy with the evicting cache, against the budget.",
        "heatmap.svg": "The top entry's holistic score per layer and KV head.",
    }
    figure_html = "".join(
        f'<figure><img src="{name}" alt="{html.escape(figures[name])}">'
        f"<figcaption>{figures[name]}</figcaption></figure>"
        for name in plot_names
    )
    pending = any(e["results"]["end_to_end"] is None for e in entries)
    heading = title or _benchmark_title(entries)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>kvp-gym leaderboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<style>{_STYLE}</style></head>
<body>
<h1>kvp-gym leaderboard</h1>
<p>{html.escape(heading)}</p>
<p>Holistic score: how well a policy's ranking of the cached tokens keeps the attention the future really pays, at
every budget at once (1 = the oracle ranking), mean over samples and KV heads with a 95% bootstrap interval over
samples. Rows are ordered by mean; two entries tie unless the 95% paired bootstrap interval of their difference
(the same samples and heads) excludes 0: a rank is 1 + the number of entries surely better, never better than the
rank of a row above it. Kinds: <span class="badge">K/V only</span> reads keys, values and
positions; <span class="badge">uses queries</span> also reads the prompt's queries; <span class="badge">upper
bound</span> sees the future, bounds the trace-level score (not accuracy) and is not ranked. Accuracy and perplexity
are end to end with the evicting cache (accuracy: mean over tasks){
        "; <span class=pending>pending</span> = not evaluated end to end yet" if pending else ""
    }. Click a column header to sort (hover it for what the column means).</p>
<table id="board"><thead>{_head(cols)}</thead>
{_reference_row(entries, cols)}
<tbody id="entries">
{chr(10).join(_rows(entries, cols))}
</tbody></table>
{_notes(entries, cols)}
<h2>Plots</h2>
{figure_html}
{_HOW_TO_SUBMIT}
<script>{_SCRIPT}</script>
</body></html>
"""


def _benchmark_title(entries: Sequence[dict[str, Any]]) -> str:
    ids = sorted({e["benchmark"]["id"] for e in entries if "benchmark" in e})
    if len(ids) != 1:
        return "Entries of several benchmarks"
    from kvp_gym_leaderboard.benchmark import BenchmarkError, load_benchmark

    try:
        benchmark = load_benchmark(ids[0])
    except BenchmarkError:  # a benchmark of the user's own, not shipped with this package
        return f"{ids[0]} entries"
    level = benchmark.trace_level
    return (
        f"{benchmark.id}: {benchmark.title}. Trace level: {len(level.tasks) * len(level.contexts) * level.samples} "
        f"test samples ({', '.join(level.tasks)}; {', '.join(map(str, level.contexts))} prompt tokens; "
        f"{level.protocol} protocol). End to end: {benchmark.end_to_end.samples} prompts per task "
        f"({', '.join(benchmark.end_to_end.tasks)}) and {benchmark.end_to_end.essays} essays, "
        f"{benchmark.end_to_end.context} tokens."
    )


def build_site(entries: Sequence[dict[str, Any]], out: str | Path, title: str | None = None) -> Path:
    """Write ``out/index.html``, its SVG plots and ``out/leaderboard.md`` (the folder is replaced atomically).
    Returns the page's path."""
    if not entries:
        raise ValueError("no entries to build a board from")
    entries = ordered(entries)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        drawn = {name: svg for name, svg in plots(entries).items() if svg is not None}
        for name, svg in drawn.items():
            (tmp / name).write_text(svg)
        (tmp / "index.html").write_text(page(entries, title, list(drawn)))
        (tmp / "leaderboard.md").write_text(markdown_table(entries))
    return out / "index.html"

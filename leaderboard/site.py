"""The board: one static HTML page (no network needed), its SVG plots, and a Markdown table for the README.

Rows follow the mean holistic score; ranks come from paired comparisons, since every entry is scored on the same
samples and heads: two entries tie unless the 95% paired bootstrap interval of their difference excludes 0, and an
entry's rank is 1 + the number of entries surely better than it, never better than the rank of a row above it
(:func:`ranks`). Privileged upper bounds (oracles) are
shown, marked, and not ranked. Every kind on the board is :func:`board_kind`, what the entry's scorer declares,
never the entry's own ``kind`` field. The page sorts by any column when its header is clicked (a few lines of inline
JavaScript), shows the retained fraction and end-to-end accuracy against the budget, the per-layer x head scores of
the top entry, and how to submit.

Imports kvp_gym.storage and kvp_gym_leaderboard.submission; kvp_gym_leaderboard.benchmark when a page names its
benchmark.
"""

from __future__ import annotations

import functools
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvp_gym.evaluation.stats import bootstrap_generator, mean_interval
from kvp_gym.storage import atomic_path
from kvp_gym_leaderboard.records import pack, sample_scores
from kvp_gym_leaderboard.submission import KINDS, declarations, end_to_end_results, kind_of

UPPER_BOUND = KINDS["future"]
RANK_SEED = 0  # the bootstrap seed of the paired comparisons behind ranks
KIND_BADGES = {KINDS["attention-free"]: "K/V only", KINDS["queries"]: "uses queries", UPPER_BOUND: "upper bound"}


def board_kind(entry: dict[str, Any]) -> str:
    """The kind the board shows and ranks ``entry`` by: what its scorer declares when loaded from the entry's
    ``load`` record (:func:`kvp_gym_leaderboard.submission.declarations`), never the entry's ``kind``. ValueError
    naming the entry when the scorer cannot be loaded.

    The checkpoint goes with it when its path resolves (``read_entry`` makes it absolute); an entry read as plain
    JSON holds it relative to a file this function does not know, and the scorer is built without it: what a scorer
    reads is declared by its code and parameters, not by its weights (``validate`` checks the kind with the
    checkpoint loaded)."""
    load = entry["load"]
    if "checkpoint" in load and not Path(load["checkpoint"]["path"]).is_file():
        load = {key: value for key, value in load.items() if key != "checkpoint"}
    try:
        return _declared_kind(json.dumps(load, sort_keys=True))
    except ValueError as err:
        raise ValueError(f"entry {entry.get('name')!r}: cannot load its scorer to read its kind: {err}") from None


@functools.lru_cache(maxsize=256)
def _declared_kind(load: str) -> str:
    """The kind of a ``load`` record (as JSON): built once per record, as the board asks for each kind often."""
    return kind_of(*declarations(json.loads(load)))


def ranks(entries: Sequence[dict[str, Any]]) -> list[int | None]:
    """Rank of each entry (None for upper bounds), from paired comparisons on the same samples and heads.

    Entry j is surely better than entry i when the 95% paired bootstrap interval of their difference (per sample,
    averaged over its heads: :func:`surely_better`) lies wholly above 0. Going down the entries by mean holistic
    score, an entry's rank is 1 + the number of entries surely better than it, and never better than the rank of an
    entry with a higher mean: a noisy entry can tie with a better one, never outrank it."""
    bounds = [board_kind(e) == UPPER_BOUND for e in entries]
    ranked = sorted((i for i, bound in enumerate(bounds) if not bound), key=lambda i: -_mean(entries[i]))
    found: list[int | None] = [None] * len(entries)
    floor = 1
    for i in ranked:
        floor = max(floor, 1 + sum(surely_better(entries[j], entries[i]) for j in ranked if j != i))
        found[i] = floor
    return found


def surely_better(first: dict[str, Any], second: dict[str, Any], resamples: int = 1000) -> bool:
    """Whether ``first``'s holistic score is above ``second``'s beyond doubt: the 95% paired bootstrap interval of
    their per-sample difference (the same samples and heads, resampled together) lies wholly above 0. Each pair
    draws from its own generator, ``bootstrap_generator(RANK_SEED, *sorted names, "rank")``, so the verdict on a
    pair depends on the two entries alone (and is the same whichever is asked first)."""
    names = sorted([first["name"], second["name"]])
    mine, other = sample_scores(first), sample_scores(second)
    if mine.shape != other.shape:
        raise ValueError(
            f"entries {first['name']!r} and {second['name']!r} were scored on {len(mine)} and {len(other)} "
            "samples: a board compares entries of one benchmark"
        )
    difference = mine - other if names[0] == first["name"] else other - mine
    low, high = mean_interval(difference, bootstrap_generator(RANK_SEED, *names, "rank"), resamples)["ci95"]
    return low > 0 if names[0] == first["name"] else high < 0


def _mean(entry: dict[str, Any]) -> float:
    return entry["results"]["trace_level"]["holistic_score"]["mean"]


def ordered(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Upper bounds first, then by mean holistic score (ranks follow that order: :func:`ranks`)."""
    return sorted(entries, key=lambda e: (board_kind(e) != UPPER_BOUND, -_mean(e)))


def columns(entries: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(key, header) of the table's score columns: tasks, prompt lengths, end-to-end accuracy and perplexity per
    budget (only those some entry has)."""
    first = lambda field: next((e["results"]["trace_level"][field] for e in entries), {})  # noqa: E731
    cols = [(f"task:{t}", t) for t in first("per_task")]
    cols += [(f"context:{c}", f"{c} tokens") for c in first("per_context")]
    e2e = [e["results"]["end_to_end"] for e in entries if e["results"]["end_to_end"]]
    if e2e:
        budgets = sorted({int(b) for r in e2e for task in r["accuracy"].values() for b in task})
        cols += [(f"accuracy:{b}", f"accuracy @{b}") for b in budgets]
        cols += [(f"ppl:{b}", f"ppl @{b}") for b in sorted({int(b) for r in e2e for b in r["perplexity"]})]
    return cols


def cell(entry: dict[str, Any], key: str) -> float | None:
    """The value of one score column for one entry (None: not measured)."""
    kind, _, what = key.partition(":")
    trace, e2e = entry["results"]["trace_level"], entry["results"]["end_to_end"]
    if kind == "task":
        return trace["per_task"].get(what)
    if kind == "context":
        return trace["per_context"].get(what)
    if e2e is None:
        return None
    if kind == "accuracy":  # mean over tasks, each task weighted equally
        values = [by_budget[what]["mean"] for by_budget in e2e["accuracy"].values() if what in by_budget]
        return float(np.mean(values)) if values else None
    interval = e2e["perplexity"].get(what)
    return None if interval is None else interval["mean"]


def markdown_table(entries: Sequence[dict[str, Any]]) -> str:
    """The board as a Markdown table (the README embeds it)."""
    entries = ordered(entries)
    cols = columns(entries)
    head = ["rank", "method", "kind", "holistic score (95% CI)"] + [h for _, h in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, entry in zip(ranks(entries), entries, strict=True):
        score = entry["results"]["trace_level"]["holistic_score"]
        low, high = score["ci95"]
        row = [
            "-" if rank is None else str(rank),
            entry["name"],
            KIND_BADGES[board_kind(entry)],
            f"{score['mean']:.3f} ({low:.3f}-{high:.3f})",
        ] + [_format(key, cell(entry, key)) for key, _ in cols]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _format(key: str, value: float | None) -> str:
    if value is None:
        return "pending" if key.startswith(("accuracy", "ppl")) else ""
    return f"{value:.2f}" if key.startswith("ppl") else f"{value:.3f}"


def build_site(entries: Sequence[dict[str, Any]], out: str | Path, title: str | None = None) -> Path:
    """Write ``out/index.html``, its SVG plots and ``out/leaderboard.md`` (the folder is replaced atomically).
    Returns the page's path."""
    if not entries:
        raise ValueError("no entries to build a board from")
    entries = ordered(entries)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        plots = {
            "retained.svg": _retained_plot(entries),
            "accuracy.svg": _accuracy_plot(entries),
            "heatmap.svg": _heatmap(entries),
        }
        for name, svg in plots.items():
            if svg is not None:
                (tmp / name).write_text(svg)
        (tmp / "index.html").write_text(_page(entries, title, [n for n, svg in plots.items() if svg is not None]))
        (tmp / "leaderboard.md").write_text(markdown_table(entries))
    return out / "index.html"


def entries_from_results(paths: Sequence[Path]) -> tuple[list[dict[str, Any]], str]:
    """Board entries from ``kvp-gym evaluate`` results.json files (trace level) and ``kvp-gym evaluate-e2e`` ones
    (end to end), matched by policy label; for a board of one's own runs (``make demo``), not for submissions."""
    trace_records, e2e_records = [], []
    for path in paths:
        record = json.loads(Path(path).read_text())
        {"kvp-gym/trace-evaluation": trace_records, "kvp-gym/e2e-evaluation": e2e_records}.get(
            record.get("schema"), []
        ).append(record)
        if record.get("schema") not in ("kvp-gym/trace-evaluation", "kvp-gym/e2e-evaluation"):
            raise ValueError(f"{path}: not a kvp-gym evaluate or evaluate-e2e results.json")
    if len(trace_records) != 1 or len(e2e_records) > 1:
        raise ValueError("give one trace-level results.json and at most one end-to-end results.json")
    trace, e2e = trace_records[0], (e2e_records or [None])[0]
    entries = []
    for label, policy in trace["policies"].items():
        entries.append(
            {
                "name": label,
                "description": "",
                "load": {"scorer": policy["name"], "parameters": policy["parameters"]},  # the kind comes from it
                "results": {
                    "trace_level": {
                        "holistic_score": policy["holistic_score"],
                        "per_task": policy["per_task"],
                        "per_context": {},
                        "retained_fraction": {
                            b: v for b, v in policy["retained_fraction"]["absolute"].items() if v is not None
                        },
                        "per_layer_head": policy["per_head"],
                    },
                    "end_to_end": None
                    if e2e is None or label not in e2e["policies"]
                    else end_to_end_results(e2e, label),
                },
                "records": {  # what ranks compare, pair by pair
                    "trace_level": {
                        "samples": trace["samples"],
                        "holistic_score": pack(np.asarray(policy["per_sample_head"]), "uint16"),
                    }
                },
            }
        )
    samples = len(trace["samples"])
    title = f"{trace['model']}: {samples} samples of {', '.join(sorted(set(trace['tasks'])))} (your own runs)"
    return entries, title


# --- plots (matplotlib, written as SVG text) -----------------------------------------------------------------------


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _figure(width: float = 6.4, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _style(entry: dict[str, Any], index: int) -> dict[str, Any]:
    """Line style by kind (dashed: upper bound, dotted: uses queries), colour by position (20 distinct)."""
    import matplotlib

    kind = board_kind(entry)
    dash = "--" if kind == UPPER_BOUND else ":" if kind == KINDS["queries"] else "-"
    return {"linestyle": dash, "color": matplotlib.colormaps["tab20"](index % 20)}


def _retained_plot(entries: Sequence[dict[str, Any]]) -> str | None:
    fig, ax = _figure()
    for index, entry in enumerate(entries):
        curve = entry["results"]["trace_level"]["retained_fraction"]
        budgets = sorted(curve, key=int)
        ax.plot(
            [int(b) for b in budgets],
            [curve[b] for b in budgets],
            marker="o",
            label=entry["name"],
            **_style(entry, index),
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget (tokens kept per KV head)")
    ax.set_ylabel("retained fraction of the future's attention")
    ax.set_title("Retained fraction vs budget (trace level)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _svg(fig)


def _accuracy_plot(entries: Sequence[dict[str, Any]]) -> str | None:
    measured = [e for e in entries if e["results"]["end_to_end"]]
    if not measured:
        return None
    fig, ax = _figure()
    budgets = sorted({int(b) for e in measured for t in e["results"]["end_to_end"]["accuracy"].values() for b in t})
    for entry in measured:
        index = entries.index(entry)  # the same colour as in the retained-fraction plot
        ax.plot(
            budgets,
            [cell(entry, f"accuracy:{b}") for b in budgets],
            marker="o",
            label=entry["name"],
            **_style(entry, index),
        )
    full = measured[0]["results"]["end_to_end"]["full_cache"]["accuracy"]
    ax.axhline(float(np.mean([v["mean"] for v in full.values()])), color="black", linewidth=1, label="full cache")
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("budget (tokens kept per KV head)")
    ax.set_ylabel("exact-match accuracy (mean over tasks)")
    ax.set_title("End-to-end accuracy vs budget")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _svg(fig)


def _heatmap(entries: Sequence[dict[str, Any]]) -> str | None:
    ranked = [e for e in entries if board_kind(e) != UPPER_BOUND]
    if not ranked:
        return None
    top = ranked[0]
    grid = np.asarray(top["results"]["trace_level"]["per_layer_head"], float)
    fig, ax = _figure(3.2 + 0.4 * grid.shape[1], 4.5)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="holistic score")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_title(f"{top['name']}: per layer and KV head")
    return _svg(fig)


# --- the page ------------------------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; padding: 0 1rem; }
table { border-collapse: collapse; font-size: 0.9rem; width: 100%; }
th, td { padding: 0.35rem 0.5rem; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; cursor: pointer; user-select: none; position: sticky; top: 0; }
th[aria-sort="descending"]::after { content: " \\25BC"; } th[aria-sort="ascending"]::after { content: " \\25B2"; }
td.name, th.name, td.kind { text-align: left; } tr.upper-bound { color: #777; font-style: italic; }
.badge { font-size: 0.75rem; padding: 0.1rem 0.4rem; border-radius: 0.6rem; background: #e8eef8; }
.ci { color: #777; font-size: 0.8rem; } .pending { color: #aaa; }
figure { display: inline-block; margin: 1rem; vertical-align: top; } figure img { max-width: 560px; }
pre { background: #f6f6f6; padding: 0.8rem; overflow-x: auto; }
"""

_SCRIPT = """
document.querySelectorAll("#board th").forEach((th, column) => th.addEventListener("click", () => {
  const body = document.querySelector("#board tbody");
  const descending = th.getAttribute("aria-sort") !== "descending";
  document.querySelectorAll("#board th").forEach(h => h.removeAttribute("aria-sort"));
  th.setAttribute("aria-sort", descending ? "descending" : "ascending");
  const key = row => row.children[column].dataset.value;
  const rows = Array.from(body.rows).sort((a, b) => {
    const x = key(a), y = key(b);
    const numeric = x !== "" && y !== "" && !isNaN(x) && !isNaN(y);
    const order = numeric ? Number(x) - Number(y) : (x === "" ? 1 : y === "" ? -1 : x.localeCompare(y));
    return descending ? -order : order;
  });
  rows.forEach(row => body.appendChild(row));
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


def _page(entries: Sequence[dict[str, Any]], title: str | None, plots: list[str]) -> str:
    cols = columns(entries)
    header = "".join(
        f"<th{cls}>{html.escape(text)}</th>"
        for cls, text in [(' class="name"', "method"), ("", "rank"), (' class="name"', "kind"), ("", "holistic score")]
        + [("", h) for _, h in cols]
    )
    rows = []
    for rank, entry in zip(ranks(entries), entries, strict=True):
        score = entry["results"]["trace_level"]["holistic_score"]
        low, high = score["ci95"]
        cells = [
            f'<td class="name" data-value="{html.escape(entry["name"])}" title="{html.escape(entry["description"])}">'
            f"{html.escape(entry['name'])}</td>",
            f'<td data-value="{"" if rank is None else rank}">{"-" if rank is None else rank}</td>',
            f'<td class="kind" data-value="{board_kind(entry)}">'
            f'<span class="badge">{KIND_BADGES[board_kind(entry)]}</span></td>',
            f'<td data-value="{score["mean"]:.6f}">{score["mean"]:.3f} '
            f'<span class="ci">[{low:.3f}, {high:.3f}]</span></td>',
        ]
        for key, _ in cols:
            value = cell(entry, key)
            text = _format(key, value)
            cells.append(
                f'<td data-value="{"" if value is None else f"{value:.6f}"}"'
                f"{' class=pending' if value is None else ''}>{text}</td>"
            )
        kind = ' class="upper-bound"' if board_kind(entry) == UPPER_BOUND else ""
        rows.append(f"<tr{kind}>" + "".join(cells) + "</tr>")
    figures = {
        "retained.svg": "Share of the future's attention kept, against the budget (trace level).",
        "accuracy.svg": "Exact-match accuracy with the evicting cache, against the budget.",
        "heatmap.svg": "The top entry's holistic score per layer and KV head.",
    }
    figure_html = "".join(
        f'<figure><img src="{name}" alt="{html.escape(figures[name])}">'
        f"<figcaption>{figures[name]}</figcaption></figure>"
        for name in plots
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
bound</span> sees the future (not ranked). Accuracy and perplexity are end to end with the evicting cache
(mean over tasks){"; <span class=pending>pending</span> = not evaluated end to end yet" if pending else ""}. Click a
column header to sort.</p>
<table id="board"><thead><tr>{header}</tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table>
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

"""The board's plots: the retained fraction and the end-to-end accuracy against the budget, and the top entry's
per-layer x KV head scores, drawn with matplotlib as SVG text for the page (:mod:`kvp_gym_leaderboard.page`).

The Okabe-Ito colour-blind-safe palette, the top-ranked entry drawn strongest and on top, references (oracle, full
cache) in grey and black dashes, legends outside the data.

Imports kvp_gym_leaderboard.policy and .site (kinds, cells, the full-cache reference); matplotlib when a plot is
drawn.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvp_gym_leaderboard.policy import KINDS
from kvp_gym_leaderboard.site import FULL_CACHE_NAME, UPPER_BOUND, board_kind, cell, full_cache

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

"""Tables and plots of evaluation records: trace level (``kvp-gym evaluate``) and end to end (``evaluate-e2e``).

Everything here reads a finished record (the results.json schemas of :mod:`kvp_gym.evaluation.trace_level` and
:mod:`kvp_gym.evaluation.end_to_end`) and computes nothing new (the summaries over several runs, which draw paired
statistics, are in :mod:`kvp_gym.evaluation.comparison`).
matplotlib is imported only when a plot is drawn.

Imports only kvp_gym.storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvp_gym.storage import atomic_path

FULL_CACHE = "full_cache"  # the reference row of end-to-end records: the model with its whole cache
# Okabe & Ito's palette (distinct under the common colour-vision deficiencies): the leader takes the first, the other
# methods the rest in turn; the reference lines (upper bounds, the full cache) are neutral grey and black.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442")
REFERENCE_GREY = "#6E6E6E"
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


# --- trace level ----------------------------------------------------------------------------------------------------


def trace_level_table(record: dict[str, Any]) -> str:
    """A plain-text table: policy, mean holistic score, 95% interval, retained fraction at 64 and 256 tokens, the
    needle retention at 64 tokens when samples have needles, the mean per task when there are several, and, when
    the record has paired comparisons, the mean paired difference of the ``versus`` policy with each other one (its
    95% interval; ``~`` = the interval includes 0) and the share of heads the ``versus`` policy wins. Every column
    is as wide as its header: no label is cut."""
    tasks = sorted(set(record.get("tasks", []))) if len(set(record.get("tasks", []))) > 1 else []
    paired = record.get("paired")
    versus = paired["versus"] if paired else None
    width = max(16, *(len(label) for label in record["policies"]))
    needles = any(p.get("needle_retention") for p in record["policies"].values())
    columns = _Columns(width, needles, {t: max(12, len(t)) for t in tasks}, versus)
    lines = [_trace_level_title(record), columns.header() + "  sees"]
    ranked = sorted(record["policies"].items(), key=lambda kv: -kv[1]["holistic_score"]["mean"])
    for label, policy in ranked:
        line = _trace_level_row(label, policy, columns)
        if versus:
            line += columns.paired_cells(paired["policies"].get(label))
        sees = "future (upper bound)" if policy["privileged"] else ("queries" if policy["needs_queries"] else "K/V")
        sees += ", variant of ours" if policy.get("variant") else ""
        lines.append(line + f"  {sees}")
    if versus:
        lines.append(
            f"'{versus} - policy': mean paired difference of the holistic score (same samples and heads) with its 95% "
            f"paired bootstrap interval, ~ = the interval includes 0; '{versus} wins': share of (layer, KV head) "
            f"pairs on which {versus} scores higher"
        )
    return "\n".join(lines)


def _trace_level_title(record: dict[str, Any]) -> str:
    files = ", ".join(t["path"] for t in record["traces"])
    protocol = record["protocol"]
    return (
        f"{files} ({record['model']}), split {record['split']}, {len(record['samples'])} samples x "
        f"{len(record['layers'])} layers x {record['num_kv_heads']} KV heads; protocol {protocol['name']}: "
        f"{protocol['description']}"
    )


@dataclass(frozen=True)
class _Columns:
    """The trace-level table's columns: ``width`` of the policy column, ``tasks`` (name -> width) and, with a
    ``versus`` policy, the paired columns, each at least as wide as its header."""

    width: int
    needles: bool
    tasks: dict[str, int]
    versus: str | None

    @property
    def paired_widths(self) -> tuple[int, int]:
        return max(33, len(f"{self.versus} - policy")), max(14, len(f"{self.versus} wins"))

    def header(self) -> str:
        header = f"{'policy':{self.width}s} {'holistic score':>14s} {'95% interval':>16s} {'kept@64':>8s} "
        header += f"{'kept@256':>9s}" + (f" {'needles@64':>10s}" if self.needles else "")
        header += "".join(f" {t:>{w}s}" for t, w in self.tasks.items())
        if self.versus:
            difference, wins = self.paired_widths
            header += f" {self.versus + ' - policy':>{difference}s} {self.versus + ' wins':>{wins}s}"
        return header

    def paired_cells(self, comparison: dict[str, Any] | None) -> str:
        """The paired difference and the share of heads won (blank for the ``versus`` policy itself)."""
        difference, wins = self.paired_widths
        if comparison is None:
            return f" {'':{difference}s} {'':{wins}s}"
        d, (a, b) = comparison["mean_difference"], comparison["ci95"]
        mark = "~" if comparison["interval_includes_zero"] else " "
        return f" {f'{d:+.3f} [{a:+.3f}, {b:+.3f}]{mark}':>{difference}s} {comparison['share_of_heads_won']:{wins}.0%}"


def _trace_level_row(label: str, policy: dict[str, Any], columns: _Columns) -> str:
    low, high = policy["holistic_score"]["ci95"]
    kept = policy["retained_fraction"]["absolute"]
    line = (
        f"{label:{columns.width}s} {policy['holistic_score']['mean']:14.3f} {f'[{low:.3f}, {high:.3f}]':>16s} "
        f"{_cell(kept['64']):>8s} {_cell(kept['256']):>9s}"
    )
    if columns.needles:
        line += f" {_cell((policy.get('needle_retention') or {}).get('absolute', {}).get('64')):>10s}"
    return line + "".join(f" {policy['per_task'][t]:{w}.3f}" for t, w in columns.tasks.items())


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def plot_trace_level(record: dict[str, Any], out: Path) -> list[Path]:
    """holistic_score.png, retained_fraction.png, layer_head_scores.png and, with paired comparisons,
    paired_differences.png in ``out``."""
    plt = _pyplot()
    policies = sorted(record["policies"].items(), key=lambda kv: kv[1]["holistic_score"]["mean"])
    names = [n + (" (upper bound)" if p["privileged"] else "") for n, p in policies]
    written = [
        _save(_holistic_bars(plt, record, policies, names), out / "holistic_score.png"),
        _save(_retained_curves(plt, record, policies, names), out / "retained_fraction.png"),
        _save(_layer_head_maps(plt, record, policies), out / "layer_head_scores.png"),
    ]
    if record.get("paired"):
        written.append(_save(_paired_intervals(plt, record), out / "paired_differences.png"))
    return written


def _holistic_bars(plt, record: dict[str, Any], policies: list, names: list[str]):
    """Each policy's mean holistic score with its interval (orange: sees queries, blue: keys and values only, grey:
    privileged); the leader's bar outlined."""
    means = np.array([p["holistic_score"]["mean"] for _, p in policies])
    intervals = np.array([p["holistic_score"]["ci95"] for _, p in policies])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(policies) + 1.5))
    colors = [
        REFERENCE_GREY if p["privileged"] else (OKABE_ITO[1] if p["needs_queries"] else OKABE_ITO[0])
        for _, p in policies
    ]
    leader = next((label for label, p in policies[::-1] if not p["privileged"]), None)
    bars = ax.barh(names, means, xerr=np.abs(intervals.T - means), color=colors, capsize=3)
    for (label, _), bar in zip(policies, bars, strict=True):
        bar.set(edgecolor="black", linewidth=1.8 if label == leader else 0)
    ax.set_xlabel("holistic score (oracle cost / cost), 95% bootstrap interval over samples")
    ax.set_xlim(0, 1.05)
    protocol = record["protocol"]["name"]
    ax.set_title(
        f"{record['model']}, split {record['split']}, protocol {protocol}\n"
        "(orange: sees queries, blue: keys and values, grey: upper bound; outlined: the leader)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def _retained_curves(plt, record: dict[str, Any], policies: list, names: list[str]):
    """The share of future attention each policy keeps, against the absolute budget (legend: best first)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = line_styles([label for label, _ in policies[::-1]], {label for label, p in policies if p["privileged"]})
    budgets = record["budgets"]["absolute"]
    for (label, p), name in zip(policies[::-1], names[::-1], strict=True):
        values = [_nan(p["retained_fraction"]["absolute"][str(b)]) for b in budgets]
        ax.plot(budgets, values, label=name, **styles[label])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget (tokens kept per head)")
    ax.set_ylabel("share of future attention retained")
    ax.set_title(f"protocol {record['protocol']['name']}: {record['protocol']['description']}", fontsize=8, wrap=True)
    ax.set_ylim(0, 1.02)
    _legend_outside(ax)
    return fig


def line_styles(ranked: list[str], privileged: set[str]) -> dict[str, dict[str, Any]]:
    """matplotlib line keywords per label, for ``ranked`` labels (best first): the leader (the first label not in
    ``privileged``) thick, in the palette's first colour and on top; the other methods thinner, in the palette's
    other colours in turn, each with its own marker (and dashed on a second round of colours); ``privileged``
    labels (upper bounds) as a neutral grey dashed reference."""
    leader = next((label for label in ranked if label not in privileged), None)
    styles, others = {}, 0
    for label in ranked:
        if label in privileged:
            styles[label] = dict(color=REFERENCE_GREY, linestyle="--", linewidth=1.4, marker="x", zorder=2)
        elif label == leader:
            styles[label] = dict(color=OKABE_ITO[0], linestyle="-", linewidth=3.2, marker="o", markersize=7, zorder=4)
        else:
            turn, colour = divmod(others, len(OKABE_ITO) - 1)
            styles[label] = dict(
                color=OKABE_ITO[1 + colour],
                linestyle="-" if turn == 0 else (0, (4, 2)),
                linewidth=1.3,
                marker=MARKERS[(colour + turn) % len(MARKERS)],
                markersize=4.5,
                alpha=0.9,
                zorder=3,
            )
            others += 1
    return styles


def _legend_outside(ax) -> None:
    """The legend to the right of the axes, off the lines it labels (:func:`_save` keeps it in the image)."""
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)


def _layer_head_maps(plt, record: dict[str, Any], policies: list):
    """One layer x KV head heat map of the holistic score per unprivileged policy."""
    shown = [(n, p) for n, p in policies[::-1] if not p["privileged"]]
    columns = min(4, len(shown)) or 1
    rows = -(-len(shown) // columns) or 1
    fig, axes = plt.subplots(
        rows, columns, figsize=(2.6 * columns + 1, 3.4 * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.axis("off")
    for index, (ax, (name, p)) in enumerate(zip(axes.flat, shown, strict=False)):
        ax.axis("on")
        image = ax.imshow(np.array(p["per_head"]), aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_title(name, fontsize=9)
        if "heads" in record:  # the evaluated layers and heads may be a subset
            ax.set_xticks(range(len(record["heads"])), record["heads"])
            if len(record["layers"]) <= 12:
                ax.set_yticks(range(len(record["layers"])), record["layers"])
        if index // columns == rows - 1:
            ax.set_xlabel("KV head")
        if index % columns == 0:
            ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="holistic score (oracle = 1)")
    return fig


def _paired_intervals(plt, record: dict[str, Any]):
    """The ``versus`` policy's paired difference with each other policy (green: better, vermillion: worse, grey:
    unsure)."""
    versus, compared = record["paired"]["versus"], record["paired"]["policies"]
    order = sorted(compared, key=lambda label: compared[label]["mean_difference"])
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(order) + 1.6))
    for row, label in enumerate(order):
        c = compared[label]
        low, high = c["ci95"]
        better = c["mean_difference"] > 0
        color = REFERENCE_GREY if c["interval_includes_zero"] else OKABE_ITO[2] if better else OKABE_ITO[5]
        ax.plot([low, high], [row, row], color=color, linewidth=2)
        ax.plot(c["mean_difference"], row, "o", color=color)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(order)), order)
    ax.set_xlabel(f"holistic score of {versus} minus policy (paired, 95% bootstrap interval over samples)")
    protocol = record["protocol"]["name"]
    ax.set_title(f"{versus} versus each policy, protocol {protocol} (grey: interval includes 0)", fontsize=10)
    fig.tight_layout()
    return fig


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


# --- end to end -----------------------------------------------------------------------------------------------------


def end_to_end_table(record: dict[str, Any]) -> str:
    """Accuracy per task and budget, perplexity per budget, and the holistic score, one row per policy."""
    settings = record["settings"]
    budgets = [str(b) for b in settings["budgets"]]
    tasks = list(settings["tasks"])
    columns = [f"{t}@{b}" for t in tasks for b in budgets] + (
        [f"ppl@{b}" for b in budgets] if record["perplexity"] else []
    )
    width = max(16, *(len(label) for label in record["policies"]))
    cell = max(16, *(len(c) for c in columns))  # whole task names: niah_single_words@64 vs niah_single_uuids@64
    lines = [
        f"{record['settings']['model']}, {settings['context']}-token prompts, {settings['text']} text; accuracy "
        f"(exact match) per task and budget over {', '.join(f'{n} {t}' for t, n in record['samples'].items())} "
        "samples; ppl = perplexity of the essays' real continuation (geometric mean); holistic = trace-level "
        "score of the same policy on the same samples (paper protocol)",
        f"{'policy':{width}s}" + "".join(f" {c:>{cell}s}" for c in columns) + f" {'holistic':>9s}",
    ]
    full = f"{FULL_CACHE:{width}s}"
    for t in tasks:
        full += "".join(f" {record['accuracy'][t][FULL_CACHE]['mean']:{cell}.3f}" for _ in budgets)
    if record["perplexity"]:
        full += "".join(f" {record['perplexity'][FULL_CACHE]['mean']:{cell}.2f}" for _ in budgets)
    lines.append(full + f" {'':>9s}")
    order = sorted(record["policies"], key=lambda label: -(record["holistic_score"].get(label) or 0))
    lines += [_end_to_end_row(record, label, tasks, budgets, width, cell) for label in order]
    lines += _correlation_lines(record)
    return "\n".join(lines)


def _end_to_end_row(record: dict[str, Any], label: str, tasks: list[str], budgets: list[str], width: int, cell: int):
    line = f"{label:{width}s}"
    for t in tasks:
        line += "".join(f" {record['accuracy'][t]['policies'][label][b]['mean']:{cell}.3f}" for b in budgets)
    if record["perplexity"]:
        line += "".join(f" {record['perplexity']['policies'][label][b]['mean']:{cell}.2f}" for b in budgets)
    holistic = record["holistic_score"].get(label)
    line += f" {holistic:9.3f}" if holistic is not None else f" {'':>9s}"
    return line + ("  (upper bound)" if record["policies"][label]["privileged"] else "")


def _correlation_lines(record: dict[str, Any]) -> list[str]:
    """Per budget: how well the holistic score (and the needle retention) rank the unprivileged policies by
    accuracy (the record's ``policies`` of each correlation)."""
    lines = []
    for b, c in record["proxy_correlation"].items():
        across = f"across {len(c['policies'])} policies (privileged ones left out)"
        rho = "n/a (constant)" if c["spearman"] is None else f"{c['spearman']:+.2f}"
        lines.append(f"budget {b}: Spearman correlation {across} of holistic score vs mean accuracy = {rho}")
        if record.get("needle_retention"):
            rho = c["spearman_needle_retention"]
            rho = "n/a (constant)" if rho is None else f"{rho:+.2f}"
            lines.append(f"budget {b}: Spearman correlation {across} of needle retention vs mean accuracy = {rho}")
    return lines


def plot_end_to_end(record: dict[str, Any], out: Path) -> list[Path]:
    """accuracy_vs_budget.png (one panel per task) and, with essays, perplexity_vs_budget.png."""
    plt = _pyplot()
    written = []
    if record["settings"]["tasks"]:
        written.append(_save(_accuracy_panels(plt, record), out / "accuracy_vs_budget.png"))
    if record["perplexity"]:
        written.append(_save(_perplexity_curves(plt, record), out / "perplexity_vs_budget.png"))
    return written


def _end_to_end_styles(record: dict[str, Any]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The policies best first (by holistic score; without task prompts, which give it, by perplexity at the
    smallest budget; else as listed) and their :func:`line_styles`."""
    holistic = record.get("holistic_score") or {}
    if any(value is not None for value in holistic.values()):
        ranked = sorted(record["policies"], key=lambda label: -(holistic.get(label) or 0))
    elif record["perplexity"]:
        smallest = str(min(record["settings"]["budgets"]))
        ranked = sorted(record["policies"], key=lambda label: record["perplexity"]["policies"][label][smallest]["mean"])
    else:
        ranked = list(record["policies"])
    privileged = {label for label, p in record["policies"].items() if p["privileged"]}
    return ranked, line_styles(ranked, privileged)


def _full_cache_line(ax, value: float) -> None:
    ax.axhline(value, color="black", linestyle=":", linewidth=1.4, label="full cache (reference)", zorder=1)


def _accuracy_panels(plt, record: dict[str, Any]):
    budgets = record["settings"]["budgets"]
    tasks = list(record["settings"]["tasks"])
    ranked, styles = _end_to_end_styles(record)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks) + 1.8, 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        _full_cache_line(ax, record["accuracy"][task][FULL_CACHE]["mean"])
        for label in ranked:
            values = [record["accuracy"][task]["policies"][label][str(b)]["mean"] for b in budgets]
            ax.plot(budgets, values, label=label, **styles[label])
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("budget (tokens kept per KV head)")
        ax.set_title(task)
    axes[0][0].set_ylabel("accuracy (exact match)")
    _legend_outside(axes[0][-1])
    return fig


def _perplexity_curves(plt, record: dict[str, Any]):
    budgets = record["settings"]["budgets"]
    ranked, styles = _end_to_end_styles(record)
    fig, ax = plt.subplots(figsize=(6, 4))
    _full_cache_line(ax, record["perplexity"][FULL_CACHE]["mean"])
    for label in ranked:
        values = [record["perplexity"]["policies"][label][str(b)]["mean"] for b in budgets]
        ax.plot(budgets, values, label=label, **styles[label])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("budget (tokens kept per KV head)")
    ax.set_ylabel("perplexity of the real continuation")
    _legend_outside(ax)
    return fig


# --- both ---------------------------------------------------------------------------------------------------------


def _pyplot():
    """matplotlib.pyplot with the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")  # keeps a legend outside the axes
    plt.close(fig)
    return path

"""Summaries of several trace-level evaluations (``kvp-gym evaluate-table``), e.g. one per prompt length, with the
paired statistics of :func:`kvp_gym.evaluation.stats.paired_differences` drawn from the records' own samples and
heads: :func:`versus_table` (one row per run: a policy against the attention-free baselines and the best
query-using one) and :func:`policies_table` (one row per policy, one column per run). And the paired comparison of
an end-to-end run (``kvp-gym evaluate-e2e-versus``): :func:`end_to_end_paired` and :func:`end_to_end_versus_table`.

Imports kvp_gym.evaluation.stats and .report (its FULL_CACHE label).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from kvp_gym.evaluation.report import FULL_CACHE
from kvp_gym.evaluation.stats import bootstrap_generator, interval95, paired_differences, resample_rows

ESSAY = "essay"  # an end-to-end run's essays: scored by perplexity


def versus_table(
    records: Mapping[str, Mapping[str, Any]], versus: str, resamples: int = 1000, seed: int | None = None
) -> str:
    """A Markdown summary of ``versus`` against the other policies over several evaluations (one row per record,
    e.g. one per prompt length; keys are the row labels).

    Columns: the ``versus`` policy's holistic score; among the attention-free policies (they see keys and values
    only), the one ``versus`` beats on the fewest (layer, KV head) pairs (on a tie, the best scoring), with that
    share; the best query-using policy by mean score, the paired difference against it with its 95% bootstrap
    interval (over samples) and the share of heads won. Privileged policies (upper bounds) and other settings of
    the ``versus`` policy's own scorer (another checkpoint) are left out. Paired statistics are those of
    :func:`kvp_gym.evaluation.trace_level.paired_comparison` on the same samples and heads, drawn with ``seed``
    (default: each record's own seed, so that they equal the record's own paired comparisons).
    """
    rows = [
        f"| set | samples | {versus} | attention-free: fewest heads won | best query-using | "
        f"{versus} - it [95% CI] | heads won |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, record in records.items():
        policies = record["policies"]
        paired = _paired_of(record, versus, resamples, seed)
        own = policies[versus]["name"]  # other checkpoints or settings of the same scorer are not baselines
        fair = {label: p for label, p in policies.items() if p["name"] != own and not p["privileged"]}
        free = [label for label, p in fair.items() if not p["needs_queries"]]
        querying = [label for label, p in fair.items() if p["needs_queries"]]
        cells = [name, str(len(record["samples"])), f"{policies[versus]['holistic_score']['mean']:.3f}"]
        cells.append(_fewest_heads_won(free, policies, paired))
        cells += _best_query_using(querying, policies, paired)
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def policies_table(
    records: Mapping[str, Mapping[str, Any]], versus: str, resamples: int = 1000, seed: int | None = None
) -> str:
    """A Markdown table with one row per policy and one column per record (keys: the column labels, e.g. prompt
    lengths): each policy's holistic score and, for every policy but ``versus``, the paired difference ``versus`` -
    policy with its 95% bootstrap interval and the share of (layer, KV head) pairs ``versus`` wins, drawn as
    :func:`versus_table` draws them. Rows: ``versus`` first, then the others by their score in the first record; a
    policy a record lacks gets "-" there."""
    columns = {name: _paired_of(record, versus, resamples, seed) for name, record in records.items()}
    first = next(iter(records.values()))["policies"]
    labels = [versus] + sorted(
        {label for record in records.values() for label in record["policies"] if label != versus},
        key=lambda label: (-first[label]["holistic_score"]["mean"] if label in first else 0.0, label),
    )
    rows = [
        "| policy | "
        + " | ".join(f"{name} ({len(record['samples'])} samples)" for name, record in records.items())
        + " |",
        "|---|" + "---|" * len(records),
    ]
    for label in labels:
        cells = []
        for name, record in records.items():
            policy = record["policies"].get(label)
            if policy is None:
                cells.append("-")
                continue
            score = f"{policy['holistic_score']['mean']:.3f}"
            if label != versus:
                c = columns[name][label]
                score += f" ({_difference(c)}, {c['share_of_heads_won']:.0%})"
            cells.append(score)
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _paired_of(record: Mapping[str, Any], versus: str, resamples: int, seed: int | None) -> dict[str, dict[str, Any]]:
    """``versus`` against every other policy of ``record`` (its own seed unless ``seed`` is given)."""
    if versus not in record["policies"]:
        raise ValueError(
            f"--versus {versus!r} is not a policy of every run (policies: {', '.join(record['policies'])})"
        )
    scores = {label: policy["per_sample_head"] for label, policy in record["policies"].items()}
    return paired_differences(scores, versus, resamples, record.get("seed", 0) if seed is None else seed)


def _fewest_heads_won(free: list[str], policies: Mapping[str, Any], paired: dict[str, dict[str, Any]]) -> str:
    """The attention-free policy the ``versus`` policy beats on the fewest heads; on a tie, the strongest of them."""
    if not free:
        return "-"
    worst = min(
        free, key=lambda label: (paired[label]["share_of_heads_won"], -policies[label]["holistic_score"]["mean"])
    )
    return f"{paired[worst]['share_of_heads_won']:.0%} ({worst})"


def _best_query_using(querying: list[str], policies: Mapping[str, Any], paired: dict[str, dict[str, Any]]) -> list:
    """The best query-using policy by mean score, the paired difference against it and the share of heads won."""
    if not querying:
        return ["-", "-", "-"]
    best = max(querying, key=lambda label: policies[label]["holistic_score"]["mean"])
    return [
        f"{best} ({policies[best]['holistic_score']['mean']:.3f})",
        _difference(paired[best]),
        f"{paired[best]['share_of_heads_won']:.0%}",
    ]


def _difference(comparison: Mapping[str, Any]) -> str:
    """A paired comparison's mean difference with its 95% interval: ``+0.150 [+0.100, +0.200]``."""
    low, high = comparison["ci95"]
    return f"{comparison['mean_difference']:+.3f} [{low:+.3f}, {high:+.3f}]"


def end_to_end_paired(
    parts: Mapping[tuple[str, int], Mapping[str, Any]], versus: str, resamples: int = 1000, seed: int = 0
) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """``versus`` against every other policy of an end-to-end run, on the same prompts.

    ``parts``: (task, index) -> the sample's part (:func:`kvp_gym.evaluation.end_to_end.read_parts`). ``versus`` and
    the others are policy labels or ``full_cache`` (the same result at every budget). Returns task -> label ->
    budget -> statistic, each with a 95% paired bootstrap interval over the prompts (the same draws for both sides,
    from ``bootstrap_generator(seed, versus, label, task, budget)``):

    - a needle task: ``{"mean": accuracy of label, "difference": versus - label, "ci95"}``;
    - ``essay``: ``{"mean": geometric mean perplexity of label, "ratio": versus / label, "ci95"}``, the ratio being
      the geometric mean over essays of the per-essay perplexity ratio (below 1: ``versus`` predicts the text better).
    """
    budgets = _budgets_of(parts)
    labels = [FULL_CACHE, *next(iter(parts.values()))["policies"]]
    if versus not in labels:
        raise ValueError(f"--versus {versus!r} is not a policy of this run (policies: {', '.join(labels)})")
    found: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for task in dict.fromkeys(task for task, _ in parts):
        rows = [part for (t, _), part in parts.items() if t == task]
        essay = task == ESSAY
        found[task] = {}
        for label in (label for label in labels if label != versus):
            found[task][label] = {}
            for budget in budgets:
                mine, other = (_end_to_end_values(rows, side, budget, essay) for side in (versus, label))
                draws = resample_rows(len(rows), resamples, bootstrap_generator(seed, versus, label, task, budget))
                difference = mine - other
                low, high = interval95(difference[draws].mean(1))
                if essay:  # differences of log perplexity: ratios
                    stat = {"mean": math.exp(other.mean()), "ratio": math.exp(difference.mean())}
                    stat["ci95"] = [math.exp(low), math.exp(high)]
                else:
                    stat = {"mean": float(other.mean()), "difference": float(difference.mean()), "ci95": [low, high]}
                found[task][label][budget] = stat
    return found


def end_to_end_versus_table(
    parts: Mapping[tuple[str, int], Mapping[str, Any]], versus: str, resamples: int = 1000, seed: int = 0
) -> str:
    """Markdown, one table per task (needle tasks, then the essays): one row per other policy, one column per
    budget, each cell that policy's accuracy (perplexity for the essays) and ``versus``'s paired difference
    (ratio) against it with its 95% interval (:func:`end_to_end_paired`)."""
    paired = end_to_end_paired(parts, versus, resamples, seed)
    budgets = _budgets_of(parts)
    blocks = []
    for task, by_label in paired.items():
        essay = task == ESSAY
        count = sum(1 for t, _ in parts if t == task)
        what = "perplexity (geometric mean) and the ratio" if essay else "accuracy and the difference"
        head = f"**{task}** ({count} prompts): each policy's {what} {versus} {'/' if essay else '-'} it [95% CI]"
        lines = [head, "", "| policy | " + " | ".join(f"budget {b}" for b in budgets) + " |"]
        lines.append("|---|" + "---|" * len(budgets))
        for label, cells in by_label.items():
            row = [_end_to_end_cell(cells[b], essay) for b in budgets]
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _end_to_end_values(rows: list[Mapping[str, Any]], label: str, budget: str, essay: bool) -> np.ndarray:
    """[prompts] ``label``'s score on each prompt at ``budget``, or for essays the log perplexity."""
    results = [r[FULL_CACHE] if label == FULL_CACHE else r["policies"][label]["budgets"][budget] for r in rows]
    if essay:
        return np.log([r["perplexity"] for r in results])
    return np.asarray([r["score"] for r in results], float)


def _end_to_end_cell(stat: Mapping[str, Any], essay: bool) -> str:
    low, high = stat["ci95"]
    if essay:
        return f"{stat['mean']:.2f} (x{stat['ratio']:.3f} [{low:.3f}, {high:.3f}])"
    return f"{stat['mean']:.3f} ({stat['difference']:+.3f} [{low:+.3f}, {high:+.3f}])"


def _budgets_of(parts: Mapping[tuple[str, int], Mapping[str, Any]]) -> list[str]:
    """The budgets of an end-to-end run's parts (every policy has the same); ValueError for a run with no parts."""
    if not parts:
        raise ValueError("the run has no evaluated samples yet")
    first = next(iter(next(iter(parts.values()))["policies"].values()))
    return list(first["budgets"])

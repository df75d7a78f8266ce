"""Summaries of several trace-level evaluations (``kvp-gym evaluate-table``), e.g. one per prompt length, with the
paired statistics of :func:`kvp_gym.evaluation.stats.paired_differences` drawn from the records' own samples and
heads: :func:`versus_table` (one row per run: a policy against the attention-free baselines and the best
query-using one) and :func:`policies_table` (one row per policy, one column per run).

Imports only kvp_gym.evaluation.stats.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvp_gym.evaluation.stats import paired_differences


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

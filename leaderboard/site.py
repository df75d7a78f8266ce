"""The board's numbers: kinds, ranks and order of the entries, the table's columns and cells, the full-cache
reference row, and the board as a Markdown table for the README (:mod:`kvp_gym_leaderboard.page` renders the page
and its plots from these, and writes the site). Entries of several benchmarks or models make several boards
(:func:`boards`), one table each.

Rows follow the mean holistic score; ranks come from paired comparisons, since every entry is scored on the same
samples and heads: two entries tie unless the 95% paired bootstrap interval of their difference excludes 0, and an
entry's rank is 1 + the number of entries surely better than it, never better than the rank of a row above it
(:func:`ranks`). Privileged upper bounds (oracles) are shown, marked, and not ranked; so is the full cache (the
model with its whole cache), the reference of the end-to-end columns. Every kind on the board is
:func:`board_kind`, what the entry's scorer declares, never the entry's own ``kind`` field.

Imports kvp_gym.evaluation.stats and kvp_gym_leaderboard's policy, records and submission modules.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvp_gym.evaluation.stats import bootstrap_generator, mean_interval
from kvp_gym_leaderboard.policy import KINDS, declarations, kind_of
from kvp_gym_leaderboard.records import pack, sample_scores
from kvp_gym_leaderboard.submission import end_to_end_results

UPPER_BOUND = KINDS["future"]
RANK_SEED = 0  # the bootstrap seed of the paired comparisons behind ranks
FULL_CACHE_NAME, REFERENCE_BADGE = "full cache", "reference"  # the reference row: the model with its whole cache
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


@dataclass(frozen=True)
class Board:
    """One table of the site: the entries of one benchmark's one model (``model`` None: the benchmark's only model,
    which its entries leave unnamed; ``benchmark`` None: entries of one's own runs), in board order."""

    benchmark: str | None
    model: str | None
    entries: list[dict[str, Any]]

    @property
    def label(self) -> str:
        """``bench-v0``, ``bench-v1 · gemma3-270m``, or ``your own runs``."""
        if self.benchmark is None:
            return "your own runs"
        return self.benchmark + (f" \u00b7 {self.model}" if self.model else "")

    @property
    def slug(self) -> str:
        """The board's name in ids and file names: ``bench-v1-gemma3-270m``."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(filter(None, [self.benchmark or "own", self.model])))


def boards(entries: Sequence[dict[str, Any]]) -> list[Board]:
    """The entries as boards, one per (benchmark, model): ranks compare entries of one board only, as they are
    scored on the same samples. The newest benchmark first (bench-v1 before bench-v0), its models in its
    definition's order (by name for a benchmark this package does not ship)."""
    groups: dict[tuple[str | None, str | None], list[dict[str, Any]]] = {}
    for entry in entries:
        named = entry.get("benchmark", {})
        groups.setdefault((named.get("id"), named.get("model")), []).append(entry)

    def place(key: tuple[str | None, str | None]) -> tuple:
        benchmark, model = key
        return (_newest_first(benchmark or ""), _model_order(benchmark).get(model, len(groups)), model or "")

    return [Board(*key, ordered(groups[key])) for key in sorted(groups, key=place)]


def _newest_first(benchmark: str) -> tuple:
    """A sort key putting ``bench-v10`` before ``bench-v9`` before ``bench-v0`` (numbers compared as numbers)."""
    return tuple((-int(part), "") if part.isdigit() else (0, part) for part in re.split(r"(\d+)", benchmark))


@functools.lru_cache(maxsize=16)
def _model_order(benchmark: str | None) -> dict[str | None, int]:
    """Each model's place in a shipped benchmark's definition ({} for another benchmark: models by name)."""
    from kvp_gym_leaderboard.definition import BenchmarkError, benchmark_parts

    try:
        return {part.model: i for i, part in enumerate(benchmark_parts(benchmark))} if benchmark else {}
    except BenchmarkError:
        return {}


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


def full_cache(entries: Sequence[dict[str, Any]]) -> dict[str, float | None] | None:
    """The full-cache reference row: the end-to-end columns' values (column key -> value) of the model with its whole
    cache, from the first entry with end-to-end results (every entry of a benchmark decodes the same prompts with the
    same full cache); None when no entry has end-to-end results. Accuracy is the mean over tasks, each weighted
    equally, as in :func:`cell`; the full cache evicts nothing, so its value is the same at every budget."""
    measured = next((e["results"]["end_to_end"] for e in entries if e["results"]["end_to_end"]), None)
    if measured is None:
        return None
    reference = measured["full_cache"]
    accuracy = float(np.mean([task["mean"] for task in reference["accuracy"].values()]))
    perplexity = None if reference["perplexity"] is None else reference["perplexity"]["mean"]
    return {
        key: accuracy if key.startswith("accuracy:") else perplexity
        for key, _ in columns(entries)
        if key.startswith(("accuracy:", "ppl:"))
    }


def markdown_table(entries: Sequence[dict[str, Any]]) -> str:
    """The board as a Markdown table (the README embeds it): upper bounds first, then the full-cache reference row
    (end-to-end columns only; "-" where it has no trace-level score), then the ranked entries."""
    entries = ordered(entries)
    cols = columns(entries)
    head = ["rank", "method", "kind", "holistic score (95% CI)"] + [h for _, h in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reference = full_cache(entries)
    for rank, entry in zip(ranks(entries), entries, strict=True):
        if reference is not None and rank is not None:  # the first ranked entry: the references end here
            lines.append(_markdown_reference_row(reference, cols))
            reference = None
        score = entry["results"]["trace_level"]["holistic_score"]
        low, high = score["ci95"]
        row = [
            "-" if rank is None else str(rank),
            entry["name"],
            KIND_BADGES[board_kind(entry)],
            f"{score['mean']:.3f} ({low:.3f}-{high:.3f})",
        ] + [format_value(key, cell(entry, key)) for key, _ in cols]
        lines.append("| " + " | ".join(row) + " |")
    if reference is not None:  # a board of upper bounds alone
        lines.append(_markdown_reference_row(reference, cols))
    return "\n".join(lines) + "\n"


def markdown_boards(entries: Sequence[dict[str, Any]]) -> str:
    """The site's Markdown: the one board's table (:func:`markdown_table`), or with several boards a heading and a
    table for each, in :func:`boards` order."""
    found = boards(entries)
    if len(found) == 1:
        return markdown_table(found[0].entries)
    return "\n".join(f"### {board.label}\n\n{markdown_table(board.entries)}" for board in found)


def _markdown_reference_row(reference: dict[str, float | None], cols: list[tuple[str, str]]) -> str:
    row = ["-", FULL_CACHE_NAME, REFERENCE_BADGE, "-"]  # no rank, no trace-level score: nothing is evicted
    row += [format_value(key, reference[key]) if key in reference else "-" for key, _ in cols]
    return "| " + " | ".join(row) + " |"


def format_value(key: str, value: float | None) -> str:
    """A cell's text: perplexity with 2 decimals, scores and accuracy with 3; "pending" for an end-to-end value not
    measured yet, "" for a trace-level one."""
    if value is None:
        return "pending" if key.startswith(("accuracy", "ppl")) else ""
    return f"{value:.2f}" if key.startswith("ppl") else f"{value:.3f}"


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

"""Trace-level evaluation: every scorer on every (sample, layer, KV head) of a split, at the prompt boundary.

The numbers come from the same utility code as the environment (:mod:`kvp_gym.utility`). Results go to
``DIR/results.json`` (schema below, versioned) and three PNG plots;
:func:`kvp_gym.evaluation.report.trace_level_table` renders the summary.

Protocols (:data:`PROTOCOLS`): ``paper`` (the default for published numbers) keeps the same 4 sink and 16 recent
prompt tokens for every method at every budget, as the KVP paper's inference does, and measures only the method's
ranking of the other tokens: the holistic score is computed over the unprotected tokens, and the retained fraction
at budget b counts the protected tokens plus the top b - 20 of the ranking. ``raw`` protects nothing and scores
the whole ranking (the training signal).

results.json, schema ``kvp-gym/trace-evaluation`` version 2::

    {"schema", "schema_version", "kvp_gym_version", "created_by",
     "traces": [{"path", "sha256"}], "model", "layers", "heads", "num_kv_heads", "split", "samples": [names],
     "tasks": [task of each sample], "seed", "protocol": {"name", "sinks", "recent", "description"},
     "bootstrap_resamples", "budgets": {"absolute": [...], "fractions": [...]}, "skipped": {label: reason},
     "policies": {label: {"name", "parameters", "variant", "needs_queries", "privileged",
                          "files": {path: sha256},                           # what the scorer read (a checkpoint)
                          "holistic_score": {"mean", "ci95": [low, high]},   # bootstrap over samples
                          "per_task": {task: mean},
                          "per_layer": [L], "per_head": [L][H],                # means over samples
                          "per_sample_head": [S][L][H],                        # every score, for paired statistics
                          "retained_per_sample_head": {"budgets": [...], "values": [S][L][H][budgets]},  # every
                                               # retained fraction, at the absolute budgets the protocol allows
                          "retained_fraction": {"absolute": {"16": ...}, "fractions": {"0.05": ...}},  # null: budget
                                                                               #   below the protected tokens
                          "needle_retention": {"absolute", "fractions", "per_task": {task: {"absolute", "fractions"}}}
                                              | null,                          # samples with needles; null: none
                          "seconds"}},
     "paired": {"versus": label, "policies": {label: {"mean_difference", "ci95", "share_of_heads_won",
                                                       "share_ci95", "interval_includes_zero"}}},  # with versus
     "timing": {"total_seconds", "attention_scorer_seconds", "importance_seconds"}}

Under torchrun (``torchrun --nproc_per_node N -m kvp_gym.cli evaluate ...``, :mod:`kvp_gym.distributed_run`) process
r of N scores the (sample, layer) pairs r, r + N, ... of the list in sample-major order, and process 0 gathers every
pair's numbers and writes the record: one process's record, each number computed by one process exactly as a lone
process computes it, but for the times. A policy's ``seconds`` and the timing's ``attention_scorer_seconds`` and
``importance_seconds`` are then summed over the processes (the work done); ``total_seconds`` is process 0's wall time.

``needle_retention`` is the share of the attention the continuation paid to the needles (every needle sentence a
task hides, distractors included: the trace's ``needle_spans``) that budget b keeps, by the same rule as the
retained fraction (the protected tokens plus the top of the ranking), pooled over the samples that have needles,
their layers and KV heads: the heads that read a needle weigh in proportion, the others hardly at all. It shows a
policy that drops what retrieval reads while keeping most of the attention mass, which the holistic score (a
mean over every head) averages away.

``layers`` and ``heads`` are the evaluated layers and KV heads (``per_layer``/``per_head`` follow their order;
``num_kv_heads`` is the number evaluated). A policy's label is its spec (``tova``, ``tova:heads=group``), or for
a scorer object its name with the parameters that differ from its defaults; with ``--policies all`` every
registered scorer runs with its defaults, plus the variants it declares (marked ``"variant": true``).

Each policy's holistic-score interval draws from its own generator, ``bootstrap_generator(seed, label,
"holistic_score")``, and each paired comparison from its pair's (:mod:`kvp_gym.evaluation.stats`): a policy's
numbers are the same whichever other policies ran with it, in whatever order, and after ``--add-to``.

:func:`kvp_gym.evaluation.selection.evaluation_episodes` lists the exact episodes an evaluation scores, as
``KVEvict-v0`` episode keys, so that an RL loop can report the number the table shows (see its docstring).

Imports kvp_gym.distributed_run, .importance, .scorers, .storage, .traces, .utility, .version and
kvp_gym.evaluation.selection, .stats and .report.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from kvp_gym.distributed_run import ONE_PROCESS, Processes
from kvp_gym.evaluation.report import plot_trace_level
from kvp_gym.evaluation.selection import chosen_layers_and_heads, declared_view, evaluation_samples, layer_view
from kvp_gym.evaluation.stats import bootstrap_generator, mean_interval, paired_differences
from kvp_gym.importance import ImportanceStore
from kvp_gym.scorers import (
    HeadView,
    PolicySpec,
    Scorer,
    ScorerError,
    model_mismatches,
    parameters,
    resolve_policies,
    score,
    scorer_files,
)
from kvp_gym.storage import atomic_path, file_sha256
from kvp_gym.traces import SPLITS, open_compatible

# PROTOCOLS and Protocol live beside protected_tokens, where KVEvict-v0 names its protocol too; imported from here
# (and kvp_gym.evaluation) as before.
from kvp_gym.utility import (
    PROTOCOLS,
    Protocol,
    holistic_score,
    needle_attention_kept,
    protected_tokens,
    retained_fraction,
)
from kvp_gym.version import __version__

SCHEMA, SCHEMA_VERSION = "kvp-gym/trace-evaluation", 2
ABSOLUTE_BUDGETS = (16, 32, 64, 128, 256, 512)
FRACTION_BUDGETS = (0.05, 0.10, 0.25, 0.50)


def evaluate(
    traces: str | Path | Sequence[str | Path],
    policies: str | Sequence[PolicySpec] | Mapping[str, PolicySpec] = "all",
    split: str = "test",
    seed: int = 0,
    bootstrap: int = 1000,
    progress: bool = True,
    protocol: str = "paper",
    versus: str | None = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    max_samples: int | None = None,
    processes: Processes = ONE_PROCESS,
) -> dict[str, Any] | None:
    """Evaluate scorers on a split (``all`` = every sample) of one or more trace files of the same model.

    ``policies``: see :func:`kvp_gym.scorers.resolve_policies` (names, specs, scorer objects, or label -> either).
    ``protocol`` is a key of :data:`PROTOCOLS`; ``versus`` (a policy label) adds the paired comparisons of that
    policy with every other one. ``layers``, ``heads`` and ``max_samples`` restrict what is scored (default: every
    recorded layer, every KV head, every sample of the split). Returns the results record (see the module
    docstring). The processes of a torchrun job (``processes``: this one's place,
    :func:`kvp_gym.distributed_run.join`; default a single process) split the (sample, layer) pairs: process 0
    returns the record of all of them once every process is done (progress bar on process 0 only); the others
    return None.
    """
    _check_arguments(split, protocol, bootstrap, max_samples)
    scorers, skipped, variants = resolve_policies(policies)
    if versus is not None and versus not in scorers:
        raise ValueError(f"--versus {versus!r}: not among the evaluated policies {sorted(scorers)}")
    paths = [traces] if isinstance(traces, str | Path) else list(traces)
    started = time.perf_counter()
    files = open_compatible(paths)
    try:
        header = files[0].header
        _drop_other_models(scorers, skipped, header, named=policies != "all")
        stores = {trace: ImportanceStore(trace) for trace in files}  # importance computed once per trace, kept
        samples = [(files[i], s) for i, s in evaluation_samples(files, split, max_samples)]
        if not samples:
            present = sorted({s.split for t in files for s in t.samples.values()})
            raise ValueError(f"{', '.join(str(p) for p in paths)}: no {split!r} samples; splits present: {present}")
        layers, heads = chosen_layers_and_heads(header, layers, heads)
        rules = PROTOCOLS[protocol]
        tally = _score_every_layer(stores, samples, layers, heads, scorers, rules, progress, split, processes)
        if tally is None:  # another process's share, done: process 0 has the numbers
            return None
        record = _record_settings(files, samples, layers, heads, split, seed, protocol, bootstrap, skipped)
    finally:
        for trace in files:
            trace.close()
    with_needles = np.array([len(s.needle_spans) > 0 for _, s in samples])
    for label, scorer in scorers.items():
        rng = bootstrap_generator(seed, label, "holistic_score")  # its own draws: the same in any company
        interval = mean_interval(tally.scores[label].mean((1, 2)), rng, bootstrap)
        record["policies"][label] = _policy_results(
            label, scorer, label in variants, tally, record["tasks"], with_needles, interval
        )
    if versus is not None:
        record["paired"] = {"versus": versus, "policies": paired_comparison(record, versus, bootstrap, seed)}
    record["timing"] = {
        "total_seconds": time.perf_counter() - started,
        "attention_scorer_seconds": sum(tally.seconds[n] for n in scorers if scorers[n].needs_queries),
        "importance_seconds": tally.importance_seconds,
    }
    return record


def _drop_other_models(scorers: dict[str, Scorer], skipped: dict[str, str], header, named: bool) -> None:
    """Scorers trained for another model than the traces': an error when ``named``, else (``'all'``) moved from
    ``scorers`` to ``skipped`` with the reason."""
    for label, reason in model_mismatches(scorers, header.model, header.geometry).items():
        if named:
            raise ScorerError(reason)
        skipped[label] = reason
        del scorers[label]


def _check_arguments(split: str, protocol: str, bootstrap: int, max_samples: int | None) -> None:
    if split not in (*SPLITS, "all"):
        raise ValueError(f"unknown split {split!r}; expected one of {(*SPLITS, 'all')}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    if bootstrap < 1:
        raise ValueError(f"bootstrap resamples must be >= 1, got {bootstrap}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")


@dataclass
class _Tally:
    """Every policy's numbers on every evaluated (sample, layer, KV head), filled in layer by layer."""

    scores: dict[str, np.ndarray]  # label -> [S, L, H] holistic score
    kept: dict[str, np.ndarray]  # label -> [S, L, H, budgets] share of the future attention kept
    needles_kept: dict[str, np.ndarray]  # label -> [S, L, H, budgets] attention paid to needle tokens, kept
    needle_total: np.ndarray  # [S, L, H] attention paid to needle tokens in all
    seconds: dict[str, float]  # label -> time spent scoring
    importance_seconds: float = 0.0

    @classmethod
    def zeros(cls, labels: Sequence[str], shape: tuple[int, int, int]) -> _Tally:
        """Empty tallies for ``labels`` over ``shape`` = (samples, layers, heads)."""
        budgets = len(ABSOLUTE_BUDGETS) + len(FRACTION_BUDGETS)
        return cls(
            scores={label: np.zeros(shape) for label in labels},
            kept={label: np.zeros((*shape, budgets)) for label in labels},
            needles_kept={label: np.zeros((*shape, budgets)) for label in labels},
            needle_total=np.zeros(shape),
            seconds=dict.fromkeys(labels, 0.0),
        )

    def cells(self, rows: np.ndarray, columns: np.ndarray) -> _Tally:
        """The numbers of the (sample, layer) cells (rows[k], columns[k]) only: arrays [K, H, ...], row k cell k."""
        return _Tally(
            scores={label: a[rows, columns] for label, a in self.scores.items()},
            kept={label: a[rows, columns] for label, a in self.kept.items()},
            needles_kept={label: a[rows, columns] for label, a in self.needles_kept.items()},
            needle_total=self.needle_total[rows, columns],
            seconds=self.seconds,
            importance_seconds=self.importance_seconds,
        )

    def put(self, rows: np.ndarray, columns: np.ndarray, part: _Tally) -> None:
        """Copy ``part`` (:meth:`cells` of another tally at the same cells) into its cells; add up its seconds.
        Copied, not added: every value arrives exactly as its process computed it."""
        for label in self.scores:
            self.scores[label][rows, columns] = part.scores[label]
            self.kept[label][rows, columns] = part.kept[label]
            self.needles_kept[label][rows, columns] = part.needles_kept[label]
            self.seconds[label] += part.seconds[label]
        self.needle_total[rows, columns] = part.needle_total
        self.importance_seconds += part.importance_seconds


def _score_every_layer(
    stores: dict[Any, ImportanceStore],
    samples: list[tuple[Any, Any]],
    layers: list[int],
    heads: list[int],
    scorers: dict[str, Scorer],
    rules: Protocol,
    progress: bool,
    split: str,
    processes: Processes,
) -> _Tally | None:
    """Score every (sample, layer) with every scorer, reading each layer once for all of them (``stores``: the
    importance store of each open trace file). Under torchrun this process scores its share of the pairs and
    process 0 returns the tally of all of them (the others: None)."""
    all_heads = next(iter(stores)).header.geometry.num_kv_heads
    shape = (len(samples), len(layers), len(heads))
    tally = _Tally.zeros(list(scorers), shape)
    work = [(i, t, s, j, layer) for i, (t, s) in enumerate(samples) for j, layer in enumerate(layers)]
    rank, world = processes.share((0, 1))
    own = work[rank::world]
    shown = progress and processes.writes_result
    desc = processes.progress_label(f"evaluate {split}")
    for i, trace, sample, j, layer in tqdm(own, desc=desc, unit="layer", disable=not shown):
        view, all_importance, tick = layer_view(trace, stores[trace], sample, layer, all_heads)
        tally.importance_seconds += tick
        _score_layer(scorers, view, all_importance, heads, sample, rules, tally, (i, j))
    if world == 1:
        return tally
    rows, columns = (np.array([w[at] for w in work], dtype=int) for at in (0, 3))  # each pair's cell
    parts = processes.gather(tally.cells(rows[rank::world], columns[rank::world]))  # waits for every share
    if not processes.writes_result:
        return None
    merged = _Tally.zeros(list(scorers), shape)
    for r, part in enumerate(parts):
        merged.put(rows[r::world], columns[r::world], part)
    return merged


def _score_layer(
    scorers: dict[str, Scorer],
    view: HeadView,
    all_importance: torch.Tensor,
    heads: list[int],
    sample,
    rules: Protocol,
    tally: _Tally,
    at_cell: tuple[int, int],
) -> None:
    """Every scorer on one layer of one sample (``view``: every KV head of it; ``all_importance`` [H_all, n]); the
    metrics of the evaluated ``heads`` go to ``tally`` at (sample, layer) index ``at_cell``."""
    # Layer-scope scorers see every KV head of the layer; the others, and the metrics, only `heads`.
    every_head = heads == list(range(view.keys.shape[0]))
    importance = all_importance if every_head else all_importance[heads]  # [H, n]
    head_view = view if every_head else _heads_of(view, heads)
    n = sample.prompt_length
    protected = protected_tokens(n, n, rules.sinks, rules.recent)
    ranked = ~protected
    budgets = list(ABSOLUTE_BUDGETS) + [max(1, round(f * n)) for f in FRACTION_BUDGETS]
    for label, scorer in scorers.items():
        tick = time.perf_counter()
        whole_layer = getattr(scorer, "scope", "head") == "layer"
        given = declared_view(scorer, *((view, all_importance) if whole_layer else (head_view, importance)))
        s = score(scorer, given)
        s = s[heads] if whole_layer and not every_head else s
        tally.seconds[label] += time.perf_counter() - tick
        tally.scores[label][at_cell] = holistic_score(importance * ranked, s, ranked).numpy()
        tally.kept[label][at_cell] = retained_fraction(importance, s, budgets, protected=protected).numpy()
        if len(sample.needle_spans):  # NaN: a budget below the protected tokens
            kept_mass, paid = needle_attention_kept(importance, s, sample.needle_spans, budgets, protected)
            tally.needles_kept[label][at_cell], tally.needle_total[at_cell] = kept_mass.numpy(), paid.numpy()


def _heads_of(view: HeadView, heads: list[int]) -> HeadView:
    """The view of some KV heads of a one-layer view (whose leading dimension is the KV head)."""
    picked = {
        f.name: getattr(view, f.name)[heads]
        for f in dataclasses.fields(view)
        if isinstance(getattr(view, f.name), torch.Tensor)
    }
    return dataclasses.replace(view, **picked)


def _record_settings(
    files: Sequence,
    samples: list[tuple[Any, Any]],
    layers: list[int],
    heads: list[int],
    split: str,
    seed: int,
    protocol: str,
    bootstrap: int,
    skipped: dict[str, str],
) -> dict[str, Any]:
    """The record up to its policies (still empty): what was evaluated, and how."""
    header = files[0].header
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "kvp_gym_version": __version__,
        "created_by": "kvp-gym evaluate",
        "traces": [{"path": str(t.path), "sha256": file_sha256(t.path)} for t in files],
        "model": header.model,
        "layers": list(layers),
        "heads": list(heads),
        "num_kv_heads": len(heads),
        "split": split,
        "samples": [s.name for _, s in samples],
        "tasks": [s.task for _, s in samples],
        "seed": seed,
        "protocol": dataclasses.asdict(PROTOCOLS[protocol]),
        "bootstrap_resamples": bootstrap,
        "budgets": {"absolute": list(ABSOLUTE_BUDGETS), "fractions": list(FRACTION_BUDGETS)},
        "policies": {},
        "skipped": skipped,
    }


def _policy_results(
    label: str,
    scorer: Scorer,
    variant: bool,
    tally: _Tally,
    tasks: list[str],
    with_needles: np.ndarray,
    holistic: dict[str, Any],
) -> dict[str, Any]:
    """One policy's entry of the record: what it is, then its numbers (``holistic``: its bootstrapped mean,
    ``with_needles``: bool [S], the samples that have needles)."""
    scores = tally.scores[label]  # [S, L, H]
    per_sample = scores.mean((1, 2))
    return {
        "name": scorer.name,
        "parameters": parameters(scorer),
        "variant": variant,
        "needs_queries": scorer.needs_queries,
        "privileged": scorer.needs_future,
        "files": scorer_files(scorer),
        "holistic_score": holistic,
        "per_task": {task: float(per_sample[[t == task for t in tasks]].mean()) for task in sorted(set(tasks))},
        "per_layer": scores.mean((0, 2)).tolist(),
        "per_head": scores.mean(0).tolist(),
        "per_sample_head": np.round(scores, 6).tolist(),
        "retained_fraction": _by_budget(tally.kept[label].mean((0, 1, 2))),
        "retained_per_sample_head": _retained_cells(tally.kept[label]),
        "needle_retention": _needle_retention(tally.needles_kept[label], tally.needle_total, with_needles, tasks),
        "seconds": tally.seconds[label],
    }


def _retained_cells(kept: np.ndarray) -> dict[str, Any]:
    """Every (sample, layer, KV head) retained fraction at the absolute budgets the protocol allows (a budget below
    the protected tokens is NaN everywhere and left out): kept [S, L, H, budgets] -> {"budgets", "values"}, the values
    [S][L][H][budgets] rounded to 6 decimals (what a leaderboard entry's raw records are made from)."""
    absolute = kept[..., : len(ABSOLUTE_BUDGETS)]
    allowed = [i for i in range(len(ABSOLUTE_BUDGETS)) if np.isfinite(absolute[..., i]).all()]
    return {
        "budgets": [ABSOLUTE_BUDGETS[i] for i in allowed],
        "values": np.round(absolute[..., allowed], 6).tolist(),
    }


def _needle_retention(
    kept: np.ndarray, total: np.ndarray, with_needles: np.ndarray, tasks: list[str]
) -> dict[str, Any] | None:
    """The needle retention by budget, pooled over the samples with needles and per task; None without needles."""
    if not with_needles.any():
        return None
    task_of = np.array(tasks)
    return {
        **_pooled_share(kept, total, with_needles),
        "per_task": {
            task: _pooled_share(kept, total, with_needles & (task_of == task))
            for task in sorted(set(task_of[with_needles]))
        },
    }


def _by_budget(means: np.ndarray) -> dict[str, dict[str, float | None]]:
    """{"absolute": {"16": ...}, "fractions": {"0.05": ...}} from means over ABSOLUTE_BUDGETS + FRACTION_BUDGETS."""
    absolute, fractions = means[: len(ABSOLUTE_BUDGETS)], means[len(ABSOLUTE_BUDGETS) :]
    return {
        "absolute": {str(b): _finite(v) for b, v in zip(ABSOLUTE_BUDGETS, absolute, strict=True)},
        "fractions": {str(f): _finite(v) for f, v in zip(FRACTION_BUDGETS, fractions, strict=True)},
    }


def _pooled_share(kept: np.ndarray, total: np.ndarray, samples: np.ndarray) -> dict[str, dict[str, float | None]]:
    """:func:`_by_budget` of sum(kept) / sum(total) over the chosen ``samples`` (bool [S]) and every layer and head:
    kept [S, L, H, budgets], total [S, L, H]."""
    with np.errstate(invalid="ignore", divide="ignore"):  # no attention on the needles at all: null
        return _by_budget(kept[samples].sum((0, 1, 2)) / total[samples].sum())


def _finite(value: float) -> float | None:
    """JSON has no NaN: a budget below the protected tokens is reported as null."""
    return float(value) if np.isfinite(value) else None


def paired_comparison(
    record: dict[str, Any], versus: str, resamples: int = 1000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """``versus`` against every other policy of ``record``, on the same samples and heads: for each, the mean
    paired difference of the holistic score with its 95% paired bootstrap interval and the share of (layer, KV
    head) pairs ``versus`` wins (:func:`kvp_gym.evaluation.stats.paired_differences`: each pair draws from its own
    generator, derived from ``seed`` and the two labels)."""
    scores = {label: policy["per_sample_head"] for label, policy in record["policies"].items()}
    return paired_differences(scores, versus, resamples, seed)


# What two evaluations must share for their policies to be compared on the same footing.
_SAME_FOOTING = ("traces", "model", "layers", "heads", "split", "samples", "seed", "protocol", "bootstrap_resamples")


def merge_results(base: Mapping[str, Any], added: Mapping[str, Any], versus: str | None = None) -> dict[str, Any]:
    """``base`` with the policies of ``added``, an evaluation of other policies on exactly the same traces (by
    SHA-256), samples, layers, heads, protocol and seed; the paired comparisons are recomputed for ``versus`` (or for
    ``base``'s own versus policy). Raises ValueError naming the first setting that differs or a label in both."""
    for key in _SAME_FOOTING:
        if base.get(key) != added.get(key):
            raise ValueError(f"cannot merge evaluations: {key!r} differs ({base.get(key)!r} vs {added.get(key)!r})")
    twice = sorted(set(base["policies"]) & set(added["policies"]))
    if twice:
        raise ValueError(f"cannot merge evaluations: policies {twice} are in both")
    merged = {**base, "policies": {**base["policies"], **added["policies"]}}
    merged["skipped"] = {**base.get("skipped", {}), **added.get("skipped", {})}
    merged["timing"] = {key: base["timing"][key] + added["timing"][key] for key in base["timing"]}
    versus = versus or (base.get("paired") or {}).get("versus")
    merged.pop("paired", None)
    if versus is not None:
        found = paired_comparison(merged, versus, merged["bootstrap_resamples"], merged["seed"])
        merged["paired"] = {"versus": versus, "policies": found}
    return merged


def write_results(record: dict[str, Any], out: str | Path) -> list[Path]:
    """Write ``out/results.json`` and the PNG plots atomically; return the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    return [out / "results.json", *plot_trace_level(record, out)]

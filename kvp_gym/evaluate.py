"""Trace-level evaluation: every scorer on every (sample, layer, KV head) of a split, at the prompt boundary.

The numbers come from the same utility code as the environment (:mod:`kvp_gym.utility`). Results go to
``DIR/results.json`` (schema below, versioned) and three PNG plots; :func:`format_table` renders the summary.

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
                          "retained_fraction": {"absolute": {"16": ...}, "fractions": {"0.05": ...}},  # null: budget
                                                                               #   below the protected tokens
                          "needle_retention": {"absolute", "fractions", "per_task": {task: {"absolute", "fractions"}}}
                                              | null,                          # samples with needles; null: none
                          "seconds"}},
     "paired": {"versus": label, "policies": {label: {"mean_difference", "ci95", "share_of_heads_won",
                                                       "share_ci95", "interval_includes_zero"}}},  # with versus
     "timing": {"total_seconds", "attention_scorer_seconds", "importance_seconds"}}

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

:func:`evaluation_episodes` lists the exact episodes an evaluation scores, as ``KVEvict-v0`` episode keys, so that
an RL loop can report the number the table shows (see its docstring).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from kvp_gym.importance import ImportanceStore
from kvp_gym.scorers import (
    HeadView,
    Scorer,
    ScorerError,
    available_scorers,
    get_scorer,
    model_mismatches,
    parameters,
    score,
    scorer_files,
)
from kvp_gym.storage import atomic_path, file_sha256
from kvp_gym.traces import SPLITS, open_compatible
from kvp_gym.utility import holistic_score, needle_attention_kept, protected_tokens, retained_fraction
from kvp_gym.version import __version__

SCHEMA, SCHEMA_VERSION = "kvp-gym/trace-evaluation", 2
ABSOLUTE_BUDGETS = (16, 32, 64, 128, 256, 512)
FRACTION_BUDGETS = (0.05, 0.10, 0.25, 0.50)


@dataclass(frozen=True)
class Protocol:
    """Which prompt tokens every method keeps at every budget (and so are left out of its ranking's score)."""

    name: str
    sinks: int
    recent: int
    description: str


PROTOCOLS = {
    "paper": Protocol(
        "paper", 4, 16, "4 sink + 16 recent prompt tokens kept for every method; the score measures the rest"
    ),
    "raw": Protocol("raw", 0, 0, "nothing protected; the score measures the whole ranking (the training signal)"),
}


PolicySpec = str | Scorer


def resolve_policies(
    policies: str | Sequence[PolicySpec] | Mapping[str, PolicySpec],
) -> tuple[dict[str, Scorer], dict[str, str], set[str]]:
    """Scorers from ``'all'``, a list of specs (``name`` / ``name:param=value;...``) and scorer objects (anything
    meeting the scorer contract, :class:`kvp_gym.scorers.Scorer`), or a mapping from label to either.

    Returns (scorers by label, skipped labels with their reason, the labels that are declared variants). A spec's
    label is the spec as written; an object's is :func:`label_of` (unless the mapping gives one). With ``'all'``:
    every registered scorer with its defaults plus the variants it declares; one that cannot be built is skipped
    with its reason instead of failing the run. An unknown name is a ValueError listing the available ones; the
    same label twice is an error.
    """
    if isinstance(policies, str):
        if policies != "all":
            raise ValueError(f"policies must be 'all', a list of specs or scorers, or a mapping; got {policies!r}")
        scorers, skipped, variants = {}, {}, set()
        for name in available_scorers():
            try:
                scorers[name] = get_scorer(name)
            except ScorerError as err:
                skipped[name] = str(err)
                continue
            for spec in getattr(type(scorers[name]), "variants", ()):
                label = f"{name}:{spec}"
                scorers[label] = _from_spec(label)
                variants.add(label)
        return scorers, skipped, variants
    given = policies.items() if isinstance(policies, Mapping) else ((None, p) for p in policies)
    scorers = {}
    for label, policy in given:
        if isinstance(policy, str):
            scorer, label = _from_spec(policy), label or policy
        elif isinstance(policy, Scorer):
            scorer, label = policy, label or label_of(policy)
        else:
            raise ValueError(
                f"policy {policy!r}: expected a spec string or an object with name, needs_queries, needs_future "
                "and score(view) (the scorer contract)"
            )
        if label in scorers:
            raise ValueError(f"policy {label!r} is given twice")
        scorers[label] = scorer
    if not scorers:
        raise ValueError("no policies given")
    return scorers, {}, set()


def label_of(scorer: Scorer) -> str:
    """``name``, or ``name:param=value;...`` with the parameters that differ from the scorer's defaults."""
    changed = []
    if is_dataclass(scorer):
        for f in fields(scorer):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            value = getattr(scorer, f.name)
            if default is MISSING or (_plain(value) and value != default):
                changed.append(f"{f.name}={value}")
    return f"{scorer.name}:{';'.join(changed)}" if changed else scorer.name


def _plain(value: Any) -> bool:
    """A parameter value that reads well in a label (not a tensor, module or long container)."""
    return isinstance(value, bool | int | float | str) or value is None


def evaluation_samples(files: Sequence, split: str, max_samples: int | None = None) -> list[tuple[int, Any]]:
    """(file index, SampleInfo) of the samples an evaluation scores: every sample of ``split`` (``all``: every
    sample) in file order then name order, the first ``max_samples`` of them if given."""
    samples = [(i, s) for i, t in enumerate(files) for s in t.samples.values() if split == "all" or s.split == split]
    return samples if max_samples is None else samples[:max_samples]


def evaluation_episodes(
    traces: str | Path | Sequence[str | Path],
    split: str = "test",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    max_samples: int | None = None,
) -> list:
    """The episodes :func:`evaluate` scores, as ``KVEvict-v0`` episode keys (one per sample, layer and KV head,
    split at the prompt boundary), in the order of its per-sample-head scores.

    Replay each with ``env.reset(options={"episode": key})`` on an env made over the same ``traces`` (same order);
    with the protocol's protected tokens (``sinks=4, recent=16`` for ``paper``, 0 and 0 for ``raw``), the mean of
    ``info["holistic_score"]`` over them is the holistic score ``kvp-gym evaluate`` reports for that policy.
    """
    from kvp_gym.envs.episodes import EpisodeKey

    paths = [traces] if isinstance(traces, str | Path) else list(traces)
    files = open_compatible(paths)
    try:
        chosen_layers, chosen_heads = _selection(files[0].header, layers, heads)
        return [
            EpisodeKey(trace=i, sample=s.name, layer=layer, head=head, split=s.prompt_length)
            for i, s in evaluation_samples(files, split, max_samples)
            for layer in chosen_layers
            for head in chosen_heads
        ]
    finally:
        for trace in files:
            trace.close()


def _selection(header, layers: Sequence[int] | None, heads: Sequence[int] | None) -> tuple[list[int], list[int]]:
    """The evaluated layers and KV heads: recorded ones, in the order given; ValueError naming what exists."""
    recorded, count = list(header.layers), header.geometry.num_kv_heads
    chosen_layers = recorded if layers is None else list(layers)
    chosen_heads = list(range(count)) if heads is None else list(heads)
    missing = [layer for layer in chosen_layers if layer not in recorded]
    if missing or not chosen_layers or len(set(chosen_layers)) != len(chosen_layers):
        raise ValueError(f"layers {chosen_layers}: expected distinct recorded layers, from {recorded}")
    if not chosen_heads or not all(0 <= h < count for h in chosen_heads) or len(set(chosen_heads)) != len(chosen_heads):
        raise ValueError(f"heads {chosen_heads}: expected distinct KV heads in [0, {count})")
    return chosen_layers, chosen_heads


def _from_spec(spec: str) -> Scorer:
    name, _, arguments = spec.partition(":")
    if name not in available_scorers():
        raise ValueError(f"unknown policies [{name!r}]; available: {', '.join(available_scorers())}")
    try:
        params = dict(pair.split("=", 1) for pair in arguments.split(";") if pair)
    except ValueError:
        raise ValueError(f"policy {spec!r}: parameters must be written name:param=value;param=value") from None
    return get_scorer(name, **{k: _number(v) for k, v in params.items()})


def _number(text: str) -> bool | int | float | str:
    """A spec parameter's value: true/false (any case), an int, a float, else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


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
) -> dict[str, Any]:
    """Evaluate scorers on a split (``all`` = every sample) of one or more trace files of the same model.

    ``policies``: see :func:`resolve_policies` (names, specs, scorer objects, or label -> either). ``protocol`` is a
    key of :data:`PROTOCOLS`; ``versus`` (a policy label) adds the paired comparisons of that policy with every
    other one. ``layers``, ``heads`` and ``max_samples`` restrict what is scored (default: every recorded layer,
    every KV head, every sample of the split). Returns the results record (see the module docstring).
    """
    if split not in (*SPLITS, "all"):
        raise ValueError(f"unknown split {split!r}; expected one of {(*SPLITS, 'all')}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    if bootstrap < 1:
        raise ValueError(f"bootstrap resamples must be >= 1, got {bootstrap}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    rules = PROTOCOLS[protocol]
    scorers, skipped, variants = resolve_policies(policies)
    if versus is not None and versus not in scorers:
        raise ValueError(f"--versus {versus!r}: not among the evaluated policies {sorted(scorers)}")
    paths = [traces] if isinstance(traces, str | Path) else list(traces)
    started = time.perf_counter()
    files = open_compatible(paths)
    try:
        header = files[0].header
        for label, reason in model_mismatches(scorers, header.model, header.geometry).items():  # or skipped: 'all'
            if policies != "all":
                raise ScorerError(reason)
            skipped[label] = reason
            del scorers[label]
        labels = list(scorers)
        stores = {trace: ImportanceStore(trace) for trace in files}  # importance computed once per trace, kept
        samples = [(files[i], s) for i, s in evaluation_samples(files, split, max_samples)]
        if not samples:
            present = sorted({s.split for t in files for s in t.samples.values()})
            raise ValueError(f"{', '.join(str(p) for p in paths)}: no {split!r} samples; splits present: {present}")
        layers, heads = _selection(header, layers, heads)
        all_heads = header.geometry.num_kv_heads  # layer-scope scorers see every KV head; metrics use `heads`
        budgets = len(ABSOLUTE_BUDGETS) + len(FRACTION_BUDGETS)
        scores = {label: np.zeros((len(samples), len(layers), len(heads))) for label in labels}
        kept = {label: np.zeros((len(samples), len(layers), len(heads), budgets)) for label in labels}
        # Attention paid to needle tokens: in all, and kept at each budget by each policy.
        needle_total = np.zeros((len(samples), len(layers), len(heads)))
        needles_kept = {label: np.zeros((len(samples), len(layers), len(heads), budgets)) for label in labels}
        seconds = dict.fromkeys(labels, 0.0)
        importance_seconds = 0.0
        work = [(i, t, s, j, layer) for i, (t, s) in enumerate(samples) for j, layer in enumerate(layers)]
        for i, trace, sample, j, layer in tqdm(work, desc=f"evaluate {split}", unit="layer", disable=not progress):
            view, all_importance, tick = _layer_view(trace, stores[trace], sample, layer, all_heads)
            # Layer-scope scorers see every KV head of the layer; the others, and the metrics, only `heads`.
            every_head = heads == list(range(all_heads))
            importance = all_importance if every_head else all_importance[heads]
            head_view = view if every_head else _heads_of(view, heads)
            importance_seconds += tick
            n = sample.prompt_length
            protected = protected_tokens(n, n, rules.sinks, rules.recent)
            ranked = ~protected
            at = list(ABSOLUTE_BUDGETS) + [max(1, round(f * n)) for f in FRACTION_BUDGETS]
            for label, scorer in scorers.items():
                tick = time.perf_counter()
                whole_layer = getattr(scorer, "scope", "head") == "layer"
                given = view if whole_layer else head_view
                if scorer.needs_future:
                    given = dataclasses.replace(given, future_importance=all_importance if whole_layer else importance)
                if not scorer.needs_queries:
                    given = dataclasses.replace(given, queries=None)  # a scorer sees only what it declares
                s = score(scorer, given)
                s = s[heads] if whole_layer and not every_head else s
                seconds[label] += time.perf_counter() - tick
                scores[label][i, j] = holistic_score(importance * ranked, s, ranked).numpy()
                kept[label][i, j] = retained_fraction(importance, s, at, protected=protected).numpy()
                if len(sample.needle_spans):  # NaN: a budget below the protected tokens
                    kept_mass, paid = needle_attention_kept(importance, s, sample.needle_spans, at, protected)
                    needles_kept[label][i, j], needle_total[i, j] = kept_mass.numpy(), paid.numpy()
        record = {
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
            "protocol": dataclasses.asdict(rules),
            "bootstrap_resamples": bootstrap,
            "budgets": {"absolute": list(ABSOLUTE_BUDGETS), "fractions": list(FRACTION_BUDGETS)},
            "policies": {},
            "skipped": skipped,
        }
    finally:
        for trace in files:
            trace.close()
    rng = np.random.default_rng(seed)
    tasks = np.array(record["tasks"])
    with_needles = np.array([len(s.needle_spans) > 0 for _, s in samples])
    for label, scorer in scorers.items():
        per_sample = scores[label].mean((1, 2))
        resampled = rng.choice(per_sample, size=(bootstrap, len(per_sample))).mean(1)
        record["policies"][label] = {
            "name": scorer.name,
            "parameters": parameters(scorer),
            "variant": label in variants,
            "needs_queries": scorer.needs_queries,
            "privileged": scorer.needs_future,
            "files": scorer_files(scorer),
            "holistic_score": {
                "mean": float(per_sample.mean()),
                "ci95": [float(np.percentile(resampled, 2.5)), float(np.percentile(resampled, 97.5))],
            },
            "per_task": {
                task: float(per_sample[[t == task for t in record["tasks"]]].mean())
                for task in sorted(set(record["tasks"]))
            },
            "per_layer": scores[label].mean((0, 2)).tolist(),
            "per_head": scores[label].mean(0).tolist(),
            "per_sample_head": np.round(scores[label], 6).tolist(),
            "retained_fraction": _by_budget(kept[label].mean((0, 1, 2))),
            "needle_retention": None
            if not with_needles.any()
            else {
                **_pooled_share(needles_kept[label], needle_total, with_needles),
                "per_task": {
                    task: _pooled_share(needles_kept[label], needle_total, with_needles & (tasks == task))
                    for task in sorted(set(tasks[with_needles]))
                },
            },
            "seconds": seconds[label],
        }
    if versus is not None:
        record["paired"] = {"versus": versus, "policies": paired_comparison(record, versus, bootstrap, seed)}
    record["timing"] = {
        "total_seconds": time.perf_counter() - started,
        "attention_scorer_seconds": sum(seconds[n] for n in labels if scorers[n].needs_queries),
        "importance_seconds": importance_seconds,
    }
    return record


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
    """``versus`` against every other policy of ``record``, on the same samples and heads.

    For each other policy: the mean paired difference of the holistic score (versus - other, per sample averaged
    over heads) with a 95% paired bootstrap interval (resampling samples, the same resample for both policies),
    and the share of (layer, KV head) pairs on which ``versus``'s mean over samples is higher, with its interval
    from the same resamples. ``interval_includes_zero`` marks a difference the data cannot tell from none.
    """
    policies = record["policies"]
    if versus not in policies:
        raise ValueError(f"--versus {versus!r}: not among the evaluated policies {sorted(policies)}")
    mine = np.asarray(policies[versus]["per_sample_head"])  # [S, L, H]
    count = mine.shape[0]
    draws = np.random.default_rng(seed).integers(0, count, size=(resamples, count))
    found = {}
    for label, policy in policies.items():
        if label == versus:
            continue
        other = np.asarray(policy["per_sample_head"])
        difference = (mine - other).mean((1, 2))  # [S]
        boot_difference = difference[draws].mean(1)
        boot_share = np.empty(resamples)
        for start in range(0, resamples, 64):  # bounded memory: 64 resamples x S x L x H at a time
            rows = draws[start : start + 64]
            boot_share[start : start + 64] = (mine[rows].mean(1) > other[rows].mean(1)).mean((1, 2))
        low, high = np.percentile(boot_difference, [2.5, 97.5])
        found[label] = {
            "mean_difference": float(difference.mean()),
            "ci95": [float(low), float(high)],
            "share_of_heads_won": float((mine.mean(0) > other.mean(0)).mean()),
            "share_ci95": [float(v) for v in np.percentile(boot_share, [2.5, 97.5])],
            "interval_includes_zero": bool(low <= 0 <= high),
        }
    return found


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


def _layer_view(trace, store: ImportanceStore, sample, layer: int, heads: int) -> tuple[HeadView, torch.Tensor, float]:
    """All KV heads of one layer of one sample, cut at the prompt boundary, and their future importance (from
    ``store``, computed there if new)."""
    reads = [trace.head(sample, layer, h) for h in range(heads)]
    n = sample.prompt_length
    attention = trace.header.attention_of(layer)
    queries = torch.stack([r.queries for r in reads])  # [H, G, S, D]
    keys = torch.stack([r.keys for r in reads])  # [H, S, D]
    tick = time.perf_counter()
    importance = store.layer(sample, layer, n, tensors=(queries, keys))  # [H, n]
    tick = time.perf_counter() - tick
    view = HeadView(
        keys=keys[:, :n],
        values=torch.stack([r.values[:n] for r in reads]),
        positions=torch.arange(n).expand(heads, n),
        mask=torch.ones(heads, n, dtype=torch.bool),
        queries=queries[:, :, :n],
        layer=torch.full((heads,), layer),
        kv_head=torch.arange(heads),
        attention=attention,
        rotary=trace.header.rotary,
    )
    return view, importance, tick


def _heads_of(view: HeadView, heads: list[int]) -> HeadView:
    """The view of some KV heads of a one-layer view (whose leading dimension is the KV head)."""
    picked = {
        f.name: getattr(view, f.name)[heads]
        for f in dataclasses.fields(view)
        if isinstance(getattr(view, f.name), torch.Tensor)
    }
    return dataclasses.replace(view, **picked)


def write_results(record: dict[str, Any], out: str | Path) -> list[Path]:
    """Write ``out/results.json`` and the PNG plots atomically; return the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    return [out / "results.json", *plot_results(record, out)]


def format_table(record: dict[str, Any]) -> str:
    """A plain-text table: policy, mean holistic score, 95% interval, retained fraction at 64 and 256 tokens, the
    needle retention at 64 tokens when samples have needles, the mean per task when there are several, and, when
    the record has paired comparisons, the mean paired difference of the ``versus`` policy with each other one (its
    95% interval; ``~`` = the interval includes 0) and the share of heads the ``versus`` policy wins."""
    files = ", ".join(t["path"] for t in record["traces"])
    tasks = sorted(set(record.get("tasks", []))) if len(set(record.get("tasks", []))) > 1 else []
    paired = record.get("paired")
    versus = paired["versus"] if paired else None
    width = max(16, *(len(label) for label in record["policies"]))
    header = f"{'policy':{width}s} {'holistic score':>14s} {'95% interval':>16s} {'kept@64':>8s} {'kept@256':>9s}"
    needles = any(p.get("needle_retention") for p in record["policies"].values())
    header += f" {'needles@64':>10s}" if needles else ""
    header += "".join(f" {t[:12]:>12s}" for t in tasks)
    if versus:
        header += f" {versus[:14] + ' - policy':>33s} {versus[:9] + ' wins':>14s}"
    protocol = record["protocol"]
    lines = [
        f"{files} ({record['model']}), split {record['split']}, {len(record['samples'])} samples x "
        f"{len(record['layers'])} layers x {record['num_kv_heads']} KV heads; protocol {protocol['name']}: "
        f"{protocol['description']}",
        header + "  sees",
    ]
    ranked = sorted(record["policies"].items(), key=lambda kv: -kv[1]["holistic_score"]["mean"])
    for label, p in ranked:
        low, high = p["holistic_score"]["ci95"]
        sees = "future (upper bound)" if p["privileged"] else ("queries" if p["needs_queries"] else "K/V")
        sees += ", variant of ours" if p.get("variant") else ""
        kept = p["retained_fraction"]["absolute"]
        line = (
            f"{label:{width}s} {p['holistic_score']['mean']:14.3f} {f'[{low:.3f}, {high:.3f}]':>16s} "
            f"{_cell(kept['64']):>8s} {_cell(kept['256']):>9s}"
        )
        if needles:
            line += f" {_cell((p.get('needle_retention') or {}).get('absolute', {}).get('64')):>10s}"
        line += "".join(f" {p['per_task'][t]:12.3f}" for t in tasks)
        if versus:
            c = paired["policies"].get(label)
            if c is None:
                line += f" {'':33s} {'':14s}"
            else:
                d, (a, b) = c["mean_difference"], c["ci95"]
                mark = "~" if c["interval_includes_zero"] else " "
                line += f" {f'{d:+.3f} [{a:+.3f}, {b:+.3f}]{mark}':>33s} {c['share_of_heads_won']:14.0%}"
        lines.append(line + f"  {sees}")
    if versus:
        lines.append(
            f"'{versus} - policy': mean paired difference of the holistic score (same samples and heads) with its 95% "
            f"paired bootstrap interval, ~ = the interval includes 0; '{versus} wins': share of (layer, KV head) "
            f"pairs on which {versus} scores higher"
        )
    return "\n".join(lines)


def versus_table(records: Mapping[str, Mapping[str, Any]], versus: str, resamples: int = 1000, seed: int = 0) -> str:
    """A Markdown summary of ``versus`` against the other policies over several evaluations (one row per record,
    e.g. one per prompt length; keys are the row labels).

    Columns: the ``versus`` policy's holistic score; among the attention-free policies (they see keys and values
    only), the one ``versus`` beats on the fewest (layer, KV head) pairs (on a tie, the best scoring), with that
    share; the best query-using policy by mean score, the paired difference against it with its 95% bootstrap
    interval (over samples) and the share of heads won. Privileged policies (upper bounds) and other settings of
    the ``versus`` policy's own scorer (another checkpoint) are left out. Paired statistics come from
    :func:`paired_comparison` on the same samples and heads.
    """
    rows = [
        f"| set | samples | {versus} | attention-free: fewest heads won | best query-using | "
        f"{versus} - it [95% CI] | heads won |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, record in records.items():
        policies = record["policies"]
        paired = paired_comparison(record, versus, resamples, seed)
        own = policies[versus]["name"]  # other checkpoints or settings of the same scorer are not baselines
        fair = {label: p for label, p in policies.items() if p["name"] != own and not p["privileged"]}
        free = [label for label, p in fair.items() if not p["needs_queries"]]
        querying = [label for label, p in fair.items() if p["needs_queries"]]
        cells = [name, str(len(record["samples"])), f"{policies[versus]['holistic_score']['mean']:.3f}"]
        if free:
            # the fewest heads won; on a tie, the strongest of them
            worst = min(
                free,
                key=lambda label: (paired[label]["share_of_heads_won"], -policies[label]["holistic_score"]["mean"]),
            )
            cells.append(f"{paired[worst]['share_of_heads_won']:.0%} ({worst})")
        else:
            cells.append("-")
        if querying:
            best = max(querying, key=lambda label: policies[label]["holistic_score"]["mean"])
            c = paired[best]
            low, high = c["ci95"]
            cells += [
                f"{best} ({policies[best]['holistic_score']['mean']:.3f})",
                f"{c['mean_difference']:+.3f} [{low:+.3f}, {high:+.3f}]",
                f"{c['share_of_heads_won']:.0%}",
            ]
        else:
            cells += ["-", "-", "-"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def plot_results(record: dict[str, Any], out: Path) -> list[Path]:
    """holistic_score.png, retained_fraction.png, layer_head_scores.png and, with paired comparisons,
    paired_differences.png in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = sorted(record["policies"].items(), key=lambda kv: kv[1]["holistic_score"]["mean"])
    names = [n + (" (upper bound)" if p["privileged"] else "") for n, p in policies]
    means = np.array([p["holistic_score"]["mean"] for _, p in policies])
    intervals = np.array([p["holistic_score"]["ci95"] for _, p in policies])
    written = []

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(policies) + 1.5))
    colors = ["0.6" if p["privileged"] else ("tab:orange" if p["needs_queries"] else "tab:blue") for _, p in policies]
    ax.barh(names, means, xerr=np.abs(intervals.T - means), color=colors, capsize=3)
    ax.set_xlabel("holistic score (oracle cost / cost), 95% bootstrap interval over samples")
    ax.set_xlim(0, 1.05)
    protocol = record["protocol"]["name"]
    ax.set_title(f"{record['model']}, split {record['split']}, protocol {protocol} (orange: sees queries)", fontsize=10)
    fig.tight_layout()
    written.append(_save(fig, out / "holistic_score.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_prop_cycle(
        color=plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2]
    )  # distinct colours for a dozen policies
    budgets = record["budgets"]["absolute"]
    for (_, p), label in zip(policies[::-1], names[::-1], strict=True):
        values = [_nan(p["retained_fraction"]["absolute"][str(b)]) for b in budgets]
        ax.plot(budgets, values, marker="o", label=label, linestyle="--" if p["privileged"] else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget (tokens kept per head)")
    ax.set_ylabel("share of future attention retained")
    ax.set_title(f"protocol {protocol}: {record['protocol']['description']}", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out / "retained_fraction.png"))

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
    written.append(_save(fig, out / "layer_head_scores.png"))

    if record.get("paired"):
        versus, compared = record["paired"]["versus"], record["paired"]["policies"]
        order = sorted(compared, key=lambda label: compared[label]["mean_difference"])
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(order) + 1.6))
        for row, label in enumerate(order):
            c = compared[label]
            low, high = c["ci95"]
            color = "0.6" if c["interval_includes_zero"] else "tab:green" if c["mean_difference"] > 0 else "tab:red"
            ax.plot([low, high], [row, row], color=color, linewidth=2)
            ax.plot(c["mean_difference"], row, "o", color=color)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(order)), order)
        ax.set_xlabel(f"holistic score of {versus} minus policy (paired, 95% bootstrap interval over samples)")
        ax.set_title(f"{versus} versus each policy, protocol {protocol} (grey: interval includes 0)", fontsize=10)
        fig.tight_layout()
        written.append(_save(fig, out / "paired_differences.png"))
    return written


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path

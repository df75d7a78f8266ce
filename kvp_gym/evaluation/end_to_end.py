"""End-to-end evaluation: what a model answers, and how well it predicts text, with an evicting cache.

For every sample: prefill once (prefill dominates on a CPU), decode with the full cache (the reference, and the
continuation whose attention the oracle ranks by, read by running only the continuation into a copy of the full
cache), then for every policy score the prefilled cache once and, for
every budget, keep the top of that scoring in a copy of the cache; the policies' copies are decoded together as
one batch (decoding a small model is bound by reading its weights, once per step for the whole batch). Task
samples are scored by exact match (the task's own scorer), held-out essays by the perplexity of their real
continuation teacher-forced through the compressed cache. Each policy's trace-level holistic score on the same
sample (paper protocol) is kept too, and, for prompts with needles, the needle retention (the attention the
continuation paid to needle tokens that each budget keeps, pooled over layers and KV heads), to measure how well
each proxy predicts accuracy. With ``prefill_chunk`` each policy is also evaluated through a chunked prefill (a variant
of ours: :func:`kvp_gym.cache.generate.prefill_compressing`), as ``LABEL (chunked prefill)``, without the proxies.

Each finished sample is written atomically to ``OUT/parts/``: a stopped run resumes where it was, ``--shard i/N``
runs split the samples between machines (:func:`merge` joins their parts; the folder:
:mod:`kvp_gym.evaluation.run_folder`), and under torchrun the processes split them in one folder, process 0
writing the summary (:mod:`kvp_gym.distributed_run`). ``OUT/settings.json`` holds the run's settings and the
SHA-256 of every file a policy reads (a checkpoint): resuming or merging with other settings, or with a changed
file behind a label, is an error. ``OUT/results.json`` (schema ``kvp-gym/e2e-evaluation`` version 1)::

    {"schema", "schema_version", "kvp_gym_version", "settings": {...E2EConfig, "policy_files"},
     "samples": {task: count},
     "policies": {label: {"name", "parameters", "needs_queries", "privileged", "variant", "files": {path: sha256}}},
     "accuracy": {task: {"full_cache": {"mean", "ci95"}, "policies": {label: {budget: {"mean", "ci95"}}}}},
     "perplexity": {"full_cache": {"mean", "ci95"}, "policies": {label: {budget: {"mean", "ci95"}}}},  # geometric
     "holistic_score": {label: mean over task samples (paper protocol); the chunked variants have none},
     "needle_retention": {label: {budget: share}} | null,   # attention paid to needle tokens that the budget keeps
     "proxy_correlation": {budget: {"spearman", "spearman_needle_retention", "policies"}},  # proxy vs accuracy
     "seconds": {"prefill", "decode", "scoring", "chunked": the chunked prefills and their decoding}}

Every interval draws from its own generator, derived from the bootstrap seed (0), the policy's label (or
``full_cache``) and the statistic (accuracy on a task at a budget, perplexity at a budget):
:func:`kvp_gym.evaluation.stats.bootstrap_generator`. So a policy's interval does not depend on which other
policies were evaluated with it. The proxy correlations leave out privileged policies (the oracle reads the future:
its holistic score is 1 by construction); ``policies`` lists the ones correlated.
:func:`kvp_gym.evaluation.report.end_to_end_table` renders the summary.

Imports kvp_gym.models, .cache, .device, .distributed_run, .generation, .scorers, .storage, .tasks,
.utility, .version and kvp_gym.evaluation.run_folder, .stats and .report.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from kvp_gym import models
from kvp_gym.cache.evicting import EvictingCache
from kvp_gym.cache.generate import (
    CHUNKED_LABEL,
    Prefill,
    chunked_variants,
    continue_from,
    future_attention,
    prefill,
    prefill_compressing_batch,
    query_window,
    until_eos,
)
from kvp_gym.device import resolve_device
from kvp_gym.distributed_run import ONE_PROCESS, Processes
from kvp_gym.evaluation.report import FULL_CACHE, plot_end_to_end
from kvp_gym.evaluation.run_folder import check_settings, gather_parts, part_path, read_settings, run_settings
from kvp_gym.evaluation.stats import bootstrap_generator, geometric_mean_interval, mean_interval, spearman
from kvp_gym.generation import sample_seed
from kvp_gym.scorers import Scorer, model_mismatches, parameters, resolve_policies
from kvp_gym.storage import atomic_path
from kvp_gym.tasks import encode, get_task, make_sample
from kvp_gym.tasks.text import TEXT_POOLS
from kvp_gym.utility import holistic_score, needle_attention_kept, protected_tokens
from kvp_gym.version import __version__

SCHEMA, SCHEMA_VERSION = "kvp-gym/e2e-evaluation", 1


@dataclass(frozen=True)
class E2EConfig:
    """What to evaluate. ``samples`` per task; ``essays`` held-out essays for perplexity (their next ``continuation``
    tokens); ``policies``: ``"all"`` or scorer specs (``name:param=value``); ``prefill_chunk``: chunked too (tokens)."""

    model: str = models.DEFAULT_MODEL
    tasks: tuple[str, ...] = ("niah_single", "niah_multikey")
    context: int = 1024
    budgets: tuple[int, ...] = (64, 128, 256)
    policies: str | tuple[str, ...] = "all"
    samples: int = 40
    essays: int = 8
    continuation: int = 64
    seed: int = 0
    text: str = "heldout"
    sinks: int = 4
    recent: int = 16
    prefill_chunk: int | None = None

    def __post_init__(self):
        for task in self.tasks:
            if not get_task(task).has_answers:
                raise ValueError(f"task {task!r} has no answers to score; free text is measured with --essays")
        if self.text not in TEXT_POOLS:
            raise ValueError(f"text must be one of {', '.join(TEXT_POOLS)}, got {self.text!r}")
        if min(self.samples, self.essays) < 0 or min(self.context, self.continuation, self.prefill_chunk or 1) < 1:
            raise ValueError("samples and essays must be >= 0, context, continuation and prefill_chunk >= 1")
        if not self.budgets or min(self.budgets) <= self.sinks + self.recent - 1:
            raise ValueError(
                f"budgets must be at least the {self.sinks + self.recent} protected tokens, got {list(self.budgets)}"
            )

    def work(self) -> list[tuple[str, int]]:
        """Every (task, index) of the run, essays last."""
        return [(t, i) for t in self.tasks for i in range(self.samples)] + [("essay", i) for i in range(self.essays)]

    def cost(self, task: str) -> int:
        """A work item's expected time in decoding steps, for the progress estimate (fitted to smollm2-135m runs):
        prefill and scoring ~ context / 25; the full cache and each budget decode an essay's whole continuation, a
        task prompt until its answer ends (about half its answer_tokens). An essay of 1k tokens weighs ~4 prompts."""
        steps = self.continuation if task == "essay" else get_task(task).answer_tokens // 2
        return self.context // 25 + steps * (1 + len(self.budgets))


def run(
    config: E2EConfig,
    out: str | Path,
    shard: tuple[int, int] = (0, 1),
    device: str = "auto",
    progress: bool = True,
    processes: Processes = ONE_PROCESS,
) -> dict[str, Any] | None:
    """Evaluate the samples of ``shard`` (i, N: work items i, i + N, ...) into ``out/parts``, skipping finished ones;
    with N = 1 also write and return the summary (``out/results.json``, plots). The processes of a torchrun job
    (``processes``: this one's place, :func:`kvp_gym.distributed_run.join`; default a single process) split the
    shard, and process 0 writes the summary once all are done; the others return None."""
    out = Path(out)
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard must be i/N with 0 <= i < N, got {index}/{count}")
    scorers, skipped, variants = _policies(config)
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    check_settings(out, run_settings(config, scorers))
    own_index, own_count = processes.share(shard)
    todo = [item for item in config.work()[own_index::own_count] if not part_path(parts, *item).exists()]
    if todo:
        model, tokenizer = models.load(config.model)
        model.to(resolve_device(device))
        for label, reason in model_mismatches(scorers, config.model, models.geometry(model)).items():
            skipped[label] = reason  # agents trained for another model: skipped, with the reason
            del scorers[label]
        costs = [config.cost(task) for task, _ in todo]  # an essay weighs several prompts: the estimate knows
        shown = progress and processes.writes_result  # one bar under torchrun, not one per process
        desc = processes.progress_label("evaluate-e2e")
        with tqdm(total=sum(costs), desc=desc, unit="step", disable=not shown) as bar:
            for done, ((task, sample_index), cost) in enumerate(zip(todo, costs, strict=True), 1):
                record = _evaluate_sample(model, tokenizer, config, scorers, task, sample_index)
                record["skipped"] = skipped
                with atomic_path(part_path(parts, task, sample_index)) as tmp:
                    tmp.write_text(json.dumps(record))
                bar.set_postfix_str(f"{done}/{len(todo)} samples", refresh=False)
                bar.update(cost)
    processes.wait_for_all()
    return None if count > 1 or not processes.writes_result else summarize(out, scorers, variants)


def merge(out: str | Path, inputs: Sequence[str | Path]) -> dict[str, Any]:
    """Join the parts of shard runs (their ``OUT`` folders) into ``out`` and write the summary."""
    out = Path(out)
    settings = gather_parts(out, inputs)
    scorers, _, variants = _policies(_config_of(settings))
    return summarize(out, scorers, variants)


def _policies(config: E2EConfig) -> tuple[dict[str, Scorer], dict[str, str], set[str]]:
    """The run's scorers by label, the skipped ones and the variant labels (resolve_policies, chunked_variants)."""
    named = config.policies != "all"
    scorers, skipped, variants = resolve_policies(list(config.policies) if named else config.policies)
    chunked, refused = chunked_variants(scorers, config.prefill_chunk, named) if config.prefill_chunk else ({}, {})
    return {**scorers, **chunked}, {**skipped, **refused}, variants | set(chunked)


def _config_of(settings: dict[str, Any]) -> E2EConfig:
    return E2EConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items() if k != "policy_files"})


@dataclass
class _Prefilled:
    """One sample's prompt, prefilled once: what the full cache and every policy decode from."""

    model: Any
    tokenizer: Any
    task: Any  # the task (its answer length and scorer)
    sample: Any  # the task sample (its answers)
    state: Prefill
    eos: Any  # the model's end-of-sequence token id(s)


@torch.inference_mode()
def _evaluate_sample(
    model, tokenizer, config: E2EConfig, scorers: dict[str, Scorer], task_name: str, index: int
) -> dict[str, Any]:
    """One sample's part: the full cache's answer (or the essay's perplexity), then every policy's at every budget,
    with each policy's holistic score and needle attention on the same prompt."""
    task = get_task(task_name)
    sample = make_sample(task, tokenizer, config.context, sample_seed(config.seed, index), config.text)
    encoded = encode(tokenizer, sample)
    ids = encoded.ids
    chunked = {label: s for label, s in scorers.items() if label.endswith(CHUNKED_LABEL)}
    scorers = {label: s for label, s in scorers.items() if label not in chunked}
    windows = [query_window(s) for s in scorers.values() if s.needs_queries]
    keep = None if None in windows else max(windows, default=0)
    seconds = dict.fromkeys(("prefill", "decode", "scoring", "chunked"), 0.0)
    tick = time.perf_counter()
    protected = {"sinks": config.sinks, "recent": config.recent}
    state = prefill(model, ids, keep, **protected)
    seconds["prefill"] += time.perf_counter() - tick
    prompt = _Prefilled(model, tokenizer, task, sample, state, model.generation_config.eos_token_id)
    record: dict[str, Any] = {"task": task_name, "index": index, "prompt_tokens": len(ids), "answers": sample.answers}
    tick = time.perf_counter()
    future, record[FULL_CACHE] = _full_cache_reference(prompt, encoded.continuation_ids[: config.continuation])
    seconds["decode"] += time.perf_counter() - tick
    importance = future_attention(model, state, future)  # what the full-cache continuation attended to
    all_scores, record["policies"] = _score_policies(state, scorers, importance, encoded.needle_spans, config, seconds)
    tick = time.perf_counter()
    for budget in config.budgets:  # every policy's compression of this prompt decoded in one batch
        for label, result in _decode_budget(prompt, all_scores, budget, future).items():
            record["policies"][label]["budgets"][str(budget)] = result
    seconds["decode"] += time.perf_counter() - tick
    for budget in config.budgets if chunked else ():  # each chunked prefill at this budget, decoded in one batch
        tick = time.perf_counter()
        batch = prefill_compressing_batch(model, ids, [*chunked.values()], budget, config.prefill_chunk, **protected)
        for label, result in zip(chunked, _decode_batch(prompt, *batch, future), strict=True):  # no proxies: budgets
            record["policies"].setdefault(label, {"budgets": {}})["budgets"][str(budget)] = result
        seconds["chunked"] += time.perf_counter() - tick
    record["seconds"] = seconds
    return record


def _full_cache_reference(prompt: _Prefilled, essay_continuation: list[int]) -> tuple[list[int], dict[str, Any]]:
    """(the continuation the oracle ranks by, the full cache's result): for a task, the greedy answer and its
    score; for an essay, its real continuation (``essay_continuation``) and the perplexity of it."""
    cache, logits = prompt.state.cache.copy(), prompt.state.logits
    if prompt.task.has_answers:
        tokens, _, _ = continue_from(prompt.model, cache, logits, prompt.task.answer_tokens, prompt.eos)
        future = until_eos(tokens[0].tolist(), prompt.eos)
        return future, _answer(prompt.tokenizer, prompt.task, prompt.sample, future)
    return essay_continuation, _decode_batch(prompt, cache, logits, essay_continuation)[0]


def _score_policies(
    state: Prefill,
    scorers: dict[str, Scorer],
    importance: dict[int, torch.Tensor],
    spans: list[tuple[int, int]],
    config: E2EConfig,
    seconds: dict[str, float],
) -> tuple[dict[str, list[torch.Tensor]], dict[str, dict[str, Any]]]:
    """Every policy's scores of the prefilled cache (label -> one tensor per layer), and its part record so far:
    the holistic score and needle attention of those scores (``seconds["scoring"]`` counts the scoring)."""
    all_scores, results = {}, {}
    for label, scorer in scorers.items():
        tick = time.perf_counter()
        all_scores[label] = state.cache.score(scorer, state.queries, importance if scorer.needs_future else None)
        seconds["scoring"] += time.perf_counter() - tick
        results[label] = {
            "holistic_score": _holistic(importance, all_scores[label], config),
            "needle_attention": _needle_attention(importance, all_scores[label], spans, config),
            "budgets": {},
        }
    return all_scores, results


def _decode_budget(
    prompt: _Prefilled, all_scores: dict[str, list[torch.Tensor]], budget: int, future: list[int]
) -> dict[str, dict[str, Any]]:
    """Every policy's result at ``budget``: each keeps the top of its scores in a copy of the cache, and the copies
    decode together as one batch (decoding a small model is bound by reading its weights, once per step)."""
    caches = [prompt.state.cache.copy() for _ in all_scores]
    for cache, scores in zip(caches, all_scores.values(), strict=True):
        cache.keep_top(scores, budget)
    logits = prompt.state.logits.expand(len(caches), -1)
    return dict(zip(all_scores, _decode_batch(prompt, EvictingCache.stack(caches), logits, future), strict=True))


def _decode_batch(prompt: _Prefilled, batch: EvictingCache, logits: torch.Tensor, future: list[int]) -> list[dict]:
    """Decode the rows of ``batch`` from their ``logits`` [rows, vocab]: each row's answer, or perplexity of future."""
    if prompt.task.has_answers:
        tokens, _, _ = continue_from(prompt.model, batch, logits, prompt.task.answer_tokens, prompt.eos)
        answers = [until_eos(row.tolist(), prompt.eos) for row in tokens]
        return [_answer(prompt.tokenizer, prompt.task, prompt.sample, answer) for answer in answers]
    _, logits, _ = continue_from(prompt.model, batch, logits, 0, forced=future)
    return [_essay_result(row, future) for row in logits]


def _answer(tokenizer, task, sample, tokens: list[int]) -> dict:
    output = tokenizer.decode(tokens, skip_special_tokens=True)
    return {"output": output, "score": task.score(output, sample.answers)}


def _essay_result(logits: torch.Tensor, future: Sequence[int]) -> dict[str, Any]:
    """{"perplexity": exp(mean NLL), "nll": [len(future)] in nats}: how well ``logits`` [len(future), vocab] (row i
    predicts future[i]) predict ``future``; the token NLLs are a leaderboard entry's raw records."""
    target = torch.tensor(list(future), device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits.float(), target, reduction="none")
    return {"perplexity": math.exp(nll.mean().item()), "nll": [round(v, 6) for v in nll.tolist()]}


def _holistic(importance: dict[int, torch.Tensor], scores: list[torch.Tensor], config: E2EConfig) -> float:
    """Mean over the full-attention layers and their KV heads of the holistic score of ``scores`` against
    ``importance`` (paper protocol: the protected tokens kept, the ranking of the rest scored)."""
    values = []
    for layer, layer_scores in enumerate(scores):
        if layer_scores is None:  # a sliding-window layer: it keeps its newest tokens, whatever the scorer
            continue
        imp = importance[layer].cpu()
        n = imp.shape[-1]
        ranked = ~protected_tokens(n, n, config.sinks, config.recent)
        values.append(holistic_score(imp * ranked, layer_scores.cpu().float(), ranked).mean().item())
    return float(np.mean(values))


def _needle_attention(
    importance: dict[int, torch.Tensor], scores: list[torch.Tensor], spans: list[tuple[int, int]], config: E2EConfig
) -> dict[str, Any] | None:
    """{"paid", "kept": {budget: ...}}: the attention the continuation paid to the needle tokens, summed over layers
    and KV heads, and the part each budget keeps with the protected tokens (paper protocol); None without needles."""
    if not spans:
        return None
    kept, paid = torch.zeros(len(config.budgets)), 0.0
    for layer, layer_scores in enumerate(scores):
        if layer_scores is None:  # a sliding-window layer (no choice there)
            continue
        imp = importance[layer].cpu()  # [1, H, n]
        n = imp.shape[-1]
        protected = protected_tokens(n, n, config.sinks, config.recent)
        layer_kept, layer_paid = needle_attention_kept(
            imp, layer_scores.cpu().float(), spans, config.budgets, protected
        )
        kept += layer_kept.sum((0, 1))
        paid += float(layer_paid.sum())
    return {"paid": paid, "kept": {str(b): float(v) for b, v in zip(config.budgets, kept, strict=True)}}


def summarize(out: str | Path, scorers: dict[str, Scorer], variants: set[str], seed: int = 0) -> dict[str, Any]:
    """Aggregate ``out/parts`` into ``out/results.json`` and the plots; return the record. ``seed``: the bootstrap
    seed every interval's own generator is derived from (with the label and the statistic)."""
    out = Path(out)
    settings = read_settings(out)
    config = _config_of(settings)
    records = read_parts(out)
    labels = [label for label in scorers if all(label in r["policies"] for r in records.values())]
    budgets = [str(b) for b in config.budgets]
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "kvp_gym_version": __version__,
        "settings": settings,
        "samples": {task: sum(1 for t, _ in records if t == task) for task in (*config.tasks, "essay")},
        "policies": {
            label: {
                "name": scorers[label].name,
                "parameters": parameters(scorers[label]),
                "needs_queries": scorers[label].needs_queries,
                "privileged": scorers[label].needs_future,
                "variant": label in variants,
                "files": settings.get("policy_files", {}).get(label, {}),  # what the parts were computed with
            }
            for label in labels
        },
        "skipped": next(iter(records.values()))["skipped"] if records else {},
        "accuracy": _accuracy(records, config.tasks, labels, budgets, seed),
        "perplexity": _perplexity_intervals(
            [r for (t, _), r in records.items() if t == "essay"], labels, budgets, seed
        ),
    }
    tasks_rows = [r for (t, _), r in records.items() if t != "essay"]
    proxied = [label for label in labels if not label.endswith(CHUNKED_LABEL)]  # chunked: ranks no whole prompt
    record["holistic_score"] = {
        label: float(np.mean([r["policies"][label]["holistic_score"] for r in tasks_rows])) if tasks_rows else None
        for label in proxied
    }
    record["needle_retention"] = _needle_retention(tasks_rows, proxied, budgets)
    record["proxy_correlation"] = _proxy_correlation(record, config.tasks, proxied, budgets)
    record["seconds"] = {  # parts written before chunked prefill existed have no "chunked" time
        key: float(sum(r["seconds"].get(key, 0.0) for r in records.values()))
        for key in ("prefill", "decode", "scoring", "chunked")
    }
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    plot_end_to_end(record, out)
    return record


def read_parts(out: str | Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Every sample's part of the run folder ``out``, by (task, index) in the run's order; ValueError naming the
    first one missing. A part: {"task", "index", "prompt_tokens", "answers", "full_cache", "policies": {label:
    {"holistic_score", "needle_attention", "budgets": {budget: result}}}, "seconds", "skipped"}, a result being
    {"output", "score"} for a task prompt and {"perplexity", "nll": [tokens]} for an essay."""
    out = Path(out)
    config = _config_of(read_settings(out))
    records = {}
    for task, index in config.work():
        path = part_path(out / "parts", task, index)
        if not path.exists():
            raise ValueError(f"{out}: sample {task} {index} is not evaluated yet (resume the run, or merge shards)")
        records[task, index] = json.loads(path.read_text())
    return records


def _accuracy(records: dict, tasks: Sequence[str], labels: list[str], budgets: list[str], seed: int) -> dict:
    """task -> the full cache's and every policy's (per budget) mean exact-match score with its interval (each from
    its own generator: ``seed``, the label, "accuracy", the task and the budget)."""
    found = {}
    for task in tasks:
        rows = [r for (t, _), r in records.items() if t == task]
        found[task] = _intervals(rows, "score", mean_interval, labels, budgets, seed, "accuracy", task)
    return found


def _perplexity_intervals(essays: list[dict], labels: list[str], budgets: list[str], seed: int) -> dict:
    """The full cache's and every policy's (per budget) geometric mean perplexity over the essays with its interval
    (each from its own generator: ``seed``, the label, "perplexity" and the budget); {} without essays."""
    return (
        _intervals(essays, "perplexity", geometric_mean_interval, labels, budgets, seed, "perplexity") if essays else {}
    )


def _intervals(rows: list[dict], key: str, interval, labels: list[str], budgets: list[str], seed: int, *statistic):
    """{"full_cache": interval, "policies": {label: {budget: interval}}} of the results' ``key`` over ``rows``, each
    ``interval(values, generator)`` drawing from its own generator (``seed``, the label, ``statistic``, the budget)."""
    return {
        FULL_CACHE: interval([r[FULL_CACHE][key] for r in rows], bootstrap_generator(seed, FULL_CACHE, *statistic)),
        "policies": {
            label: {
                b: interval(
                    [r["policies"][label]["budgets"][b][key] for r in rows],
                    bootstrap_generator(seed, label, *statistic, b),
                )
                for b in budgets
            }
            for label in labels
        },
    }


def _needle_retention(tasks_rows: list[dict], labels: list[str], budgets: list[str]) -> dict | None:
    """label -> budget -> the share of the attention paid to needle tokens that the budget keeps, pooled over the
    prompts with needles; None without any (parts written before needle retention existed have none: left out)."""
    needle_rows = [r for r in tasks_rows if all(r["policies"][label].get("needle_attention") for label in labels)]
    paid = sum(r["policies"][labels[0]]["needle_attention"]["paid"] for r in needle_rows) if labels else 0.0
    if not (needle_rows and paid > 0):
        return None
    return {
        label: {
            b: sum(r["policies"][label]["needle_attention"]["kept"][b] for r in needle_rows) / paid for b in budgets
        }
        for label in labels
    }


def _proxy_correlation(record: dict, tasks: Sequence[str], labels: list[str], budgets: list[str]) -> dict:
    """budget -> Spearman's correlation across the unprivileged policies of each proxy (holistic score, needle
    retention) with the mean accuracy over tasks; {} without tasks or with two such policies or fewer. Privileged
    policies are left out: the oracle's holistic score is 1 by construction (it ranks by the very attention the
    score measures), so it would only add a sure agreement at the top."""
    found = {}
    labels = [label for label in labels if not record["policies"][label]["privileged"]]
    if not tasks or len(labels) <= 2:
        return found
    for b in budgets:
        accuracy = [np.mean([record["accuracy"][t]["policies"][label][b]["mean"] for t in tasks]) for label in labels]
        proxy = [record["holistic_score"][label] for label in labels]
        needles = record["needle_retention"]
        found[b] = {
            "spearman": spearman(proxy, accuracy),
            "spearman_needle_retention": spearman([needles[label][b] for label in labels], accuracy)
            if needles
            else None,
            "policies": labels,
        }
    return found

"""End-to-end evaluation: what a model answers, and how well it predicts text, with an evicting cache.

For every sample: prefill once (prefill dominates on a CPU), decode with the full cache (the reference, and the
continuation whose attention the oracle ranks by), then for every policy score the prefilled cache once and, for
every budget, keep the top of that scoring in a copy of the cache; the policies' copies are decoded together as
one batch (decoding a small model is bound by reading its weights, once per step for the whole batch). Task
samples are scored by exact match (the task's own scorer), held-out essays by the perplexity of their real
continuation teacher-forced through the compressed cache. Each policy's trace-level holistic score on the same
sample (paper protocol) is kept too, and, for prompts with needles, the needle retention (the attention the
continuation paid to needle tokens that each budget keeps, pooled over layers and KV heads), to measure how well
each proxy predicts accuracy.

Each finished sample is written atomically to ``OUT/parts/``: a stopped run resumes where it was, and ``--shard
i/N`` runs split the samples between machines (:func:`merge` joins their parts). ``OUT/settings.json`` holds the
run's settings and the SHA-256 of every file a policy reads (a checkpoint): resuming or merging with other
settings, or with a changed file behind a label, is an error. ``OUT/results.json`` (schema
``kvp-gym/e2e-evaluation`` version 1)::

    {"schema", "schema_version", "kvp_gym_version", "settings": {...E2EConfig, "policy_files"},
     "samples": {task: count},
     "policies": {label: {"name", "parameters", "needs_queries", "privileged", "variant", "files": {path: sha256}}},
     "accuracy": {task: {"full_cache": {"mean", "ci95"}, "policies": {label: {budget: {"mean", "ci95"}}}}},
     "perplexity": {"full_cache": {"mean", "ci95"}, "policies": {label: {budget: {"mean", "ci95"}}}},  # geometric
     "holistic_score": {label: mean over task samples (paper protocol)},
     "needle_retention": {label: {budget: share}} | null,   # attention paid to needle tokens that the budget keeps
     "proxy_correlation": {budget: {"spearman", "spearman_needle_retention", "policies"}},  # proxy vs accuracy
     "seconds": {"total", "prefill", "decode", "scoring"}}
"""

from __future__ import annotations

import dataclasses
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
from kvp_gym.cache.generate import Prefill, continue_from, prefill, query_window, until_eos
from kvp_gym.capture import capture_qkv
from kvp_gym.device import resolve_device
from kvp_gym.evaluate import resolve_policies
from kvp_gym.generation import sample_seed
from kvp_gym.scorers import Scorer, model_mismatches, parameters, scorer_files
from kvp_gym.storage import atomic_path
from kvp_gym.tasks import encode, get_task, make_sample
from kvp_gym.tasks.text import TEXT_POOLS
from kvp_gym.utility import future_importance, holistic_score, needle_attention_kept, protected_tokens
from kvp_gym.version import __version__

SCHEMA, SCHEMA_VERSION = "kvp-gym/e2e-evaluation", 1
FULL = "full_cache"


@dataclass(frozen=True)
class E2EConfig:
    """What to evaluate. ``samples`` per task; ``essays`` held-out essays for perplexity (their next
    ``continuation`` tokens); ``policies``: ``"all"`` or scorer specs (``name`` / ``name:param=value``)."""

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

    def __post_init__(self):
        for task in self.tasks:
            if not get_task(task).has_answers:
                raise ValueError(f"task {task!r} has no answers to score; free text is measured with --essays")
        if self.text not in TEXT_POOLS:
            raise ValueError(f"text must be one of {', '.join(TEXT_POOLS)}, got {self.text!r}")
        if self.samples < 0 or self.essays < 0 or self.context < 1 or self.continuation < 1:
            raise ValueError("samples and essays must be >= 0, context and continuation >= 1")
        if not self.budgets or min(self.budgets) <= self.sinks + self.recent - 1:
            raise ValueError(
                f"budgets must be at least the {self.sinks + self.recent} protected tokens, got {list(self.budgets)}"
            )

    def work(self) -> list[tuple[str, int]]:
        """Every (task, index) of the run, essays last."""
        return [(t, i) for t in self.tasks for i in range(self.samples)] + [("essay", i) for i in range(self.essays)]


def run(
    config: E2EConfig,
    out: str | Path,
    shard: tuple[int, int] = (0, 1),
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any] | None:
    """Evaluate the samples of ``shard`` (i, N: work items i, i + N, ...) into ``out/parts``, skipping finished ones;
    with N = 1 also write and return the summary (``out/results.json``, plots)."""
    out = Path(out)
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard must be i/N with 0 <= i < N, got {index}/{count}")
    scorers, skipped, variants = _policies(config)
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    _check_settings(out, _settings(config, scorers))
    todo = [item for k, item in enumerate(config.work()) if k % count == index and not _part(parts, *item).exists()]
    if todo:
        model, tokenizer = models.load(config.model)
        model.to(resolve_device(device))
        for label, reason in model_mismatches(scorers, config.model, models.geometry(model)).items():
            skipped[label] = reason  # agents trained for another model: skipped, with the reason
            del scorers[label]
        for task, sample_index in tqdm(todo, desc="evaluate-e2e", unit="sample", disable=not progress):
            record = _evaluate_sample(model, tokenizer, config, scorers, task, sample_index)
            record["skipped"] = skipped
            with atomic_path(_part(parts, task, sample_index)) as tmp:
                tmp.write_text(json.dumps(record))
    if count > 1:
        return None
    return summarize(out, scorers, variants)


def merge(out: str | Path, inputs: Sequence[str | Path]) -> dict[str, Any]:
    """Join the parts of shard runs (their ``OUT`` folders) into ``out`` and write the summary."""
    out = Path(out)
    settings = None
    for folder in map(Path, inputs):
        found = _settings_of(folder)
        if settings is not None and (changed := _differences(settings, found)):
            raise ValueError(f"{folder}: its run has other settings than {inputs[0]} ({'; '.join(changed)})")
        settings = found
        (out / "parts").mkdir(parents=True, exist_ok=True)
        for part in sorted((folder / "parts").glob("*.json")):
            with atomic_path(out / "parts" / part.name) as tmp:
                tmp.write_text(part.read_text())
    if settings is None:
        raise ValueError("merge needs at least one input folder")
    _write_settings(out, settings)
    scorers, _, variants = _policies(_config_of(settings))
    return summarize(out, scorers, variants)


def _policies(config: E2EConfig) -> tuple[dict[str, Scorer], dict[str, str], set[str]]:
    """The run's scorers by label, the skipped ones and the variant labels (:func:`resolve_policies`)."""
    return resolve_policies(config.policies if config.policies == "all" else list(config.policies))


def _part(parts: Path, task: str, index: int) -> Path:
    return parts / f"{task}-{index:05d}.json"


def _settings_of(out: Path) -> dict:
    path = out / "settings.json"
    if not path.exists():
        raise ValueError(f"{out}: no settings.json; not an evaluate-e2e output folder")
    return json.loads(path.read_text())


def _write_settings(out: Path, settings: dict) -> None:
    with atomic_path(out / "settings.json") as tmp:
        tmp.write_text(json.dumps(settings, indent=2))


def _settings(config: E2EConfig, scorers: dict[str, Scorer]) -> dict[str, Any]:
    """settings.json: the config as JSON, and "policy_files": {label: {path: SHA-256}} of the policies that read
    files (:func:`kvp_gym.scorers.scorer_files`), so that a label cannot silently change what is behind it."""
    settings = json.loads(json.dumps(dataclasses.asdict(config)))
    settings["policy_files"] = {label: files for label, scorer in scorers.items() if (files := scorer_files(scorer))}
    return settings


def _config_of(settings: dict[str, Any]) -> E2EConfig:
    return E2EConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items() if k != "policy_files"})


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """A folder holds one run: resuming with other settings or policy files is an error (its parts would not be
    comparable)."""
    if not (out / "settings.json").exists():
        _write_settings(out, settings)
        return
    changed = _differences(_settings_of(out), settings)
    if changed:
        raise ValueError(f"{out} holds a run with other settings ({'; '.join(changed)}); use another folder")


def _differences(was: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two runs' settings: the config keys, and each label whose files' contents differ (by
    SHA-256: the same checkpoint at another path, as on another machine, is the same run)."""
    changed = sorted(k for k in {*was, *now} - {"policy_files"} if was.get(k) != now.get(k))
    if "policy_files" not in was or "policy_files" not in now:
        return [*changed, "policy_files: one run was started by a kvp-gym that did not record the policies' files"]
    old, new = was["policy_files"], now["policy_files"]
    for label in sorted({*old, *new}):
        if sorted(old.get(label, {}).values()) != sorted(new.get(label, {}).values()):
            changed.append(f"{label} read {_describe_files(old.get(label))}, now {_describe_files(new.get(label))}")
    return changed


def _describe_files(files: dict[str, str] | None) -> str:
    if not files:
        return "no file"
    return ", ".join(f"{path} (SHA-256 {digest[:12]}...)" for path, digest in files.items())


@torch.inference_mode()
def _evaluate_sample(model, tokenizer, config: E2EConfig, scorers: dict[str, Scorer], task_name: str, index: int):
    task = get_task(task_name)
    sample = make_sample(task, tokenizer, config.context, sample_seed(config.seed, index), config.text)
    encoded = encode(tokenizer, sample)
    ids = encoded.ids
    windows = [query_window(s) for s in scorers.values() if s.needs_queries]
    keep = None if None in windows else max(windows, default=0)
    seconds = dict.fromkeys(("prefill", "decode", "scoring"), 0.0)
    tick = time.perf_counter()
    state = prefill(model, ids, keep, sinks=config.sinks, recent=config.recent)
    seconds["prefill"] += time.perf_counter() - tick
    eos = model.generation_config.eos_token_id
    record: dict[str, Any] = {"task": task_name, "index": index, "prompt_tokens": len(ids), "answers": sample.answers}
    tick = time.perf_counter()
    if task.has_answers:
        tokens, _, _ = continue_from(model, state.cache.copy(), state.logits, task.answer_tokens, eos)
        future = until_eos(tokens[0].tolist(), eos)
        record[FULL] = _answer(tokenizer, task, sample, future)
    else:
        future = encoded.continuation_ids[: config.continuation]
        _, logits, _ = continue_from(model, state.cache.copy(), state.logits, 0, forced=future)
        record[FULL] = {"perplexity": _perplexity(logits[0], future)}
    seconds["decode"] += time.perf_counter() - tick
    importance = _future_importance(model, ids, future, state)  # what the full-cache continuation attended to
    record["policies"] = {}
    all_scores = {}
    for label, scorer in scorers.items():
        tick = time.perf_counter()
        all_scores[label] = state.cache.score(scorer, state.queries, importance if scorer.needs_future else None)
        seconds["scoring"] += time.perf_counter() - tick
        record["policies"][label] = {
            "holistic_score": _holistic(importance, all_scores[label], config),
            "needle_attention": _needle_attention(importance, all_scores[label], encoded.needle_spans, config),
            "budgets": {},
        }
    tick = time.perf_counter()
    labels = list(scorers)
    for budget in config.budgets:  # every policy's compression of this prompt decoded in one batch
        caches = []
        for label in labels:
            cache = state.cache.copy()
            cache.keep_top(all_scores[label], budget)
            caches.append(cache)
        batch = EvictingCache.stack(caches)
        logits = state.logits.expand(len(labels), -1)
        if task.has_answers:
            tokens, _, _ = continue_from(model, batch, logits, task.answer_tokens, eos)
            for row, label in enumerate(labels):
                answer = _answer(tokenizer, task, sample, until_eos(tokens[row].tolist(), eos))
                record["policies"][label]["budgets"][str(budget)] = answer
        else:
            _, logits, _ = continue_from(model, batch, logits, 0, forced=future)
            for row, label in enumerate(labels):
                record["policies"][label]["budgets"][str(budget)] = {"perplexity": _perplexity(logits[row], future)}
    seconds["decode"] += time.perf_counter() - tick
    record["seconds"] = seconds
    return record


def _answer(tokenizer, task, sample, tokens: list[int]) -> dict:
    output = tokenizer.decode(tokens, skip_special_tokens=True)
    return {"output": output, "score": task.score(output, sample.answers)}


def _perplexity(logits: torch.Tensor, future: Sequence[int]) -> float:
    """exp(mean NLL) of ``future`` under ``logits`` [len(future), vocab] (row i predicts future[i])."""
    target = torch.tensor(list(future), device=logits.device)
    return math.exp(torch.nn.functional.cross_entropy(logits.float(), target).item())


def _future_importance(model, ids: list[int], future: list[int], state: Prefill) -> dict[int, torch.Tensor]:
    """layer -> [1, H_kv, n]: the attention the continuation paid to each prompt token (the oracle's ranking)."""
    attention = state.cache.attention
    with capture_qkv(model, range(len(attention.specs))) as captured:
        model(torch.tensor([ids + future], device=model.device), use_cache=False)
    found = {}
    for layer, (queries, keys, _) in captured.items():
        grouped = attention.group_queries(queries)[0]  # [H, G, S, D]
        importance = future_importance(grouped, keys[0], len(ids), attention=attention.specs[layer])
        found[layer] = importance[None].to(state.logits.device)
    return found


def _holistic(importance: dict[int, torch.Tensor], scores: list[torch.Tensor], config: E2EConfig) -> float:
    """Mean over layers and KV heads of the holistic score of ``scores`` against ``importance`` (paper protocol:
    the protected tokens kept, the ranking of the rest scored)."""
    values = []
    for layer, layer_scores in enumerate(scores):
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
    """Aggregate ``out/parts`` into ``out/results.json`` and the plots; return the record."""
    out = Path(out)
    settings = _settings_of(out)
    config = _config_of(settings)
    records = {}
    for task, index in config.work():
        path = _part(out / "parts", task, index)
        if not path.exists():
            raise ValueError(f"{out}: sample {task} {index} is not evaluated yet (resume the run, or merge shards)")
        records[task, index] = json.loads(path.read_text())
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
        "accuracy": {},
        "perplexity": {},
    }
    for task in config.tasks:
        rows = [r for (t, _), r in records.items() if t == task]
        record["accuracy"][task] = {
            FULL: _mean_ci([r[FULL]["score"] for r in rows], seed),
            "policies": {
                label: {b: _mean_ci([r["policies"][label]["budgets"][b]["score"] for r in rows], seed) for b in budgets}
                for label in labels
            },
        }
    essays = [r for (t, _), r in records.items() if t == "essay"]
    if essays:
        record["perplexity"] = {
            FULL: _geometric_ci([r[FULL]["perplexity"] for r in essays], seed),
            "policies": {
                label: {
                    b: _geometric_ci([r["policies"][label]["budgets"][b]["perplexity"] for r in essays], seed)
                    for b in budgets
                }
                for label in labels
            },
        }
    tasks_rows = [r for (t, _), r in records.items() if t != "essay"]
    record["holistic_score"] = {
        label: float(np.mean([r["policies"][label]["holistic_score"] for r in tasks_rows])) if tasks_rows else None
        for label in labels
    }
    # Pooled over the prompts with needles (parts written before needle retention existed have none: left out).
    needle_rows = [r for r in tasks_rows if all(r["policies"][label].get("needle_attention") for label in labels)]
    paid = sum(r["policies"][labels[0]]["needle_attention"]["paid"] for r in needle_rows) if labels else 0.0
    record["needle_retention"] = None
    if needle_rows and paid > 0:
        record["needle_retention"] = {
            label: {
                b: sum(r["policies"][label]["needle_attention"]["kept"][b] for r in needle_rows) / paid for b in budgets
            }
            for label in labels
        }
    record["proxy_correlation"] = {}
    if config.tasks and len(labels) > 2:
        for b in budgets:
            accuracy = [
                np.mean([record["accuracy"][t]["policies"][label][b]["mean"] for t in config.tasks]) for label in labels
            ]
            proxy = [record["holistic_score"][label] for label in labels]
            needles = record["needle_retention"]
            record["proxy_correlation"][b] = {
                "spearman": spearman(proxy, accuracy),
                "spearman_needle_retention": spearman([needles[label][b] for label in labels], accuracy)
                if needles
                else None,
                "policies": labels,
            }
    record["seconds"] = {
        key: float(sum(r["seconds"][key] for r in records.values())) for key in ("prefill", "decode", "scoring")
    }
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    plot(record, out)
    return record


def _mean_ci(values: list[float], seed: int, resamples: int = 1000) -> dict:
    """Mean with a 95% bootstrap interval over samples. Every interval draws from its own generator seeded with
    ``seed``, so a policy's interval does not depend on which other policies were evaluated with it."""
    data = np.asarray(values, float)
    if len(data) == 0:
        return {"mean": None, "ci95": [None, None]}
    boot = np.random.default_rng(seed).choice(data, size=(resamples, len(data))).mean(1)
    return {"mean": float(data.mean()), "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]}


def _geometric_ci(values: list[float], seed: int) -> dict:
    """Geometric mean (exp of the mean log) with a 95% bootstrap interval: perplexities multiply."""
    logged = _mean_ci([math.log(v) for v in values], seed)
    return {"mean": math.exp(logged["mean"]), "ci95": [math.exp(v) for v in logged["ci95"]]}


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties get their average rank); None when either side is constant."""
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    for value in np.unique(values):  # average rank within ties
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def format_table(record: dict[str, Any]) -> str:
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
    full = f"{FULL:{width}s}"
    for t in tasks:
        full += "".join(f" {record['accuracy'][t][FULL]['mean']:{cell}.3f}" for _ in budgets)
    if record["perplexity"]:
        full += "".join(f" {record['perplexity'][FULL]['mean']:{cell}.2f}" for _ in budgets)
    lines.append(full + f" {'':>9s}")
    order = sorted(record["policies"], key=lambda label: -(record["holistic_score"].get(label) or 0))
    for label in order:
        line = f"{label:{width}s}"
        for t in tasks:
            line += "".join(f" {record['accuracy'][t]['policies'][label][b]['mean']:{cell}.3f}" for b in budgets)
        if record["perplexity"]:
            line += "".join(f" {record['perplexity']['policies'][label][b]['mean']:{cell}.2f}" for b in budgets)
        holistic = record["holistic_score"].get(label)
        line += f" {holistic:9.3f}" if holistic is not None else f" {'':>9s}"
        lines.append(line + ("  (upper bound)" if record["policies"][label]["privileged"] else ""))
    for b, c in record["proxy_correlation"].items():
        rho = "n/a (constant)" if c["spearman"] is None else f"{c['spearman']:+.2f}"
        lines.append(f"budget {b}: Spearman correlation across policies of holistic score vs mean accuracy = {rho}")
        if record.get("needle_retention"):
            rho = c["spearman_needle_retention"]
            rho = "n/a (constant)" if rho is None else f"{rho:+.2f}"
            lines.append(
                f"budget {b}: Spearman correlation across policies of needle retention vs mean accuracy = {rho}"
            )
    return "\n".join(lines)


def plot(record: dict[str, Any], out: Path) -> list[Path]:
    """accuracy_vs_budget.png (one panel per task) and, with essays, perplexity_vs_budget.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = record["settings"]["budgets"]
    tasks = list(record["settings"]["tasks"])
    written = []
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 4), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            ax.set_prop_cycle(color=plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2])
            for label, p in record["accuracy"][task]["policies"].items():
                values = [p[str(b)]["mean"] for b in budgets]
                dashed = record["policies"][label]["privileged"]
                ax.plot(budgets, values, marker="o", label=label, linestyle="--" if dashed else "-")
            ax.axhline(record["accuracy"][task][FULL]["mean"], color="black", linewidth=1, label="full cache")
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("budget (tokens kept per KV head)")
            ax.set_title(task)
        axes[0][0].set_ylabel("accuracy (exact match)")
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.tight_layout()
        written.append(_save(fig, out / "accuracy_vs_budget.png"))
    if record["perplexity"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.set_prop_cycle(color=plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2])
        for label, p in record["perplexity"]["policies"].items():
            ax.plot(budgets, [p[str(b)]["mean"] for b in budgets], marker="o", label=label)
        ax.axhline(record["perplexity"][FULL]["mean"], color="black", linewidth=1, label="full cache")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel("budget (tokens kept per KV head)")
        ax.set_ylabel("perplexity of the real continuation")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out / "perplexity_vs_budget.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path

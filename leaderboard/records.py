"""An entry's raw records, and every number the board publishes recomputed from them.

An entry carries what its numbers are made of, so that ``leaderboard validate`` computes them itself and never takes
a submitted number on trust (the entry field ``records``)::

    {"trace_level": {"samples": [names],                       # the benchmark's order (see BenchmarkFacts)
                     "holistic_score": ARRAY uint16 [S, L, H],  # every (sample, layer, KV head) score
                     "retained_fraction": {"budgets": [...], "values": ARRAY uint16 [S, L, H, budgets]}},
     "end_to_end": {"prompts": [{"task", "index",              # the benchmark's prompts, in its order
                                 "outputs": {"full_cache": text, budget: text},
                                 "correct": {"full_cache": score, budget: score}}],   # the task's exact match
                    "nll": ARRAY float32 [essays, 1 + budgets, tokens]}  # token NLLs (nats); row 0 the full cache
                   | null}

``ARRAY`` is ``{"dtype", "shape", "data"}``: ``data`` the base64 of the gzip of the array's little-endian bytes.
``uint16`` arrays hold fractions in [0, 1] in steps of 1/65535 (:data:`STEP`): a score or retained fraction rounded
to that step, which is what the entry's numbers are computed from. A bench-v0 entry's records take about 100 kB.

:func:`published` computes an entry's ``results`` from its records: means per task and prompt length, the retained
curve, the per-layer x head means, the bootstrap intervals (each from its own generator: the benchmark's bootstrap
seed, the entry's label and the statistic, :func:`kvp_gym.evaluation.stats.bootstrap_generator`), the accuracies
(each output re-scored against the benchmark's answers) and the perplexities (from the token NLLs). Only the
trace-level ``seconds`` is a measurement that records cannot reproduce. :func:`decode` checks the records' shapes
against the benchmark; :func:`rescore` re-scores every output; :func:`differences` lists the stated numbers that
differ from the recomputed ones; :func:`rerun_differences` compares two entries' records (``validate --rerun``).

Imports kvp_gym (evaluation.stats, evaluation.report, models, tasks, generation) and kvp_gym_leaderboard.benchmark
and .definition.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import gzip
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvp_gym.evaluation.report import FULL_CACHE
from kvp_gym.evaluation.stats import bootstrap_generator, geometric_mean_interval, mean_interval
from kvp_gym_leaderboard.benchmark import read_manifest
from kvp_gym_leaderboard.definition import Benchmark

STEP = 1 / 65535  # the resolution of a fraction in the records
DTYPES = {"uint16": "<u2", "float32": "<f4"}
NUMBERS_AGREE = 1e-9  # stated and recomputed numbers: the same arithmetic on the same values, up to its rounding


class RecordError(ValueError):
    """Records that cannot be read: the message names the JSON path and what was expected."""


# --- arrays -------------------------------------------------------------------------------------------------------


def pack(values: np.ndarray, dtype: str) -> dict[str, Any]:
    """``values`` as an ARRAY record: ``uint16`` rounds fractions in [0, 1] to :data:`STEP`, ``float32`` keeps them."""
    values = np.asarray(values, dtype=float)
    if dtype == "uint16":
        if not np.isfinite(values).all() or values.min(initial=0) < 0 or values.max(initial=0) > 1:
            raise ValueError("uint16 records hold fractions in [0, 1]")
        values = np.rint(values / STEP)
    raw = np.ascontiguousarray(values.astype(DTYPES[dtype])).tobytes()
    data = base64.b64encode(gzip.compress(raw, compresslevel=9, mtime=0)).decode("ascii")
    return {"dtype": dtype, "shape": list(values.shape), "data": data}


def unpack(record: Any, where: str, dtype: str, shape: Sequence[int]) -> np.ndarray:
    """The float64 array of an ARRAY record, checked: RecordError naming ``where`` unless it is a ``dtype`` array
    of ``shape`` (uint16 become fractions; float32 must be finite)."""
    if not isinstance(record, dict) or set(record) != {"dtype", "shape", "data"}:
        raise RecordError(f"{where}: expected an array record {{dtype, shape, data}}")
    if record["dtype"] != dtype:
        raise RecordError(f"{where}.dtype: expected {dtype!r}, got {record['dtype']!r}")
    if record["shape"] != list(shape):
        raise RecordError(f"{where}.shape: expected {list(shape)} (this benchmark's), got {record['shape']}")
    try:
        raw = gzip.decompress(base64.b64decode(record["data"], validate=True))
    except (TypeError, ValueError, OSError, EOFError) as err:
        raise RecordError(f"{where}.data: not base64 of gzip data ({err})") from None
    expected = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
    if len(raw) != expected:
        raise RecordError(f"{where}.data: {len(raw)} bytes, expected {expected} for shape {list(shape)} {dtype}")
    values = np.frombuffer(raw, dtype=DTYPES[dtype]).reshape(shape).astype(float)
    if dtype == "uint16":
        return values * STEP
    if not np.isfinite(values).all():
        raise RecordError(f"{where}.data: not every value is finite")
    return values


# --- what the benchmark fixes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchmarkFacts:
    """What a benchmark fixes about every entry's records: the trace-level samples in order (the trace files in the
    benchmark's order, each file's samples by name) with their task and prompt length, the recorded layers and the
    model's KV heads, and the end-to-end prompts (task, index) in run order with their answers."""

    samples: tuple[str, ...]
    task_of: Mapping[str, str]
    context_of: Mapping[str, int]
    layers: int
    kv_heads: int
    prompts: tuple[tuple[str, int], ...]
    answers: Mapping[tuple[str, int], tuple[str, ...]]


@functools.lru_cache(maxsize=8)
def _facts(path: str, model_name: str, manifest_sha256: str) -> BenchmarkFacts:
    from kvp_gym import models
    from kvp_gym.generation import sample_seed
    from kvp_gym.tasks import get_task, make_sample
    from kvp_gym_leaderboard.definition import load_benchmark

    benchmark = load_benchmark(path, model_name)
    manifest = read_manifest(benchmark)
    samples, task_of, context_of = [], {}, {}
    for task, context, name in benchmark.trace_files():
        for sample in sorted(manifest["files"].get(name, {}).get("samples", {})):
            samples.append(sample)
            task_of[sample], context_of[sample] = task, context
    model, tokenizer = models.load(benchmark.model)
    # The recorded layers (every file of a set records the same ones): all of the model's, or e.g. only the
    # full-attention layers of a hybrid model (trace_level.layers = "global").
    layers = len(next(iter(manifest["files"].values()))["collection"][0]["layers"])
    config = benchmark.e2e_config(("random",))
    prompts = [(task, index) for task, index in config.work() if task != "essay"]
    answers = {
        (task, index): tuple(
            make_sample(get_task(task), tokenizer, config.context, sample_seed(config.seed, index), config.text).answers
        )
        for task, index in prompts
    }
    return BenchmarkFacts(
        tuple(samples), task_of, context_of, layers, models.geometry(model).num_kv_heads, tuple(prompts), answers
    )


def benchmark_facts(benchmark: Benchmark) -> BenchmarkFacts:
    """The :class:`BenchmarkFacts` of ``benchmark`` (one model's part; loads its model and tokenizer once per
    process)."""
    from kvp_gym_leaderboard.benchmark import manifest_sha256

    return _facts(str(benchmark.path), benchmark.model, manifest_sha256(benchmark))


def sample_scores(entry: Mapping[str, Any]) -> np.ndarray:
    """[S]: a (valid) entry's holistic score per sample, the mean over its layers and KV heads, from its records."""
    record = entry["records"]["trace_level"]["holistic_score"]
    scores = unpack(record, "$.records.trace_level.holistic_score", "uint16", record["shape"])
    return scores.reshape(len(scores), -1).mean(1)


# --- records from evaluation outputs ------------------------------------------------------------------------------


def trace_level_records(record: Mapping[str, Any], label: str, facts: BenchmarkFacts, budgets: Sequence[int]) -> dict:
    """The trace-level records of policy ``label`` from a ``kvp-gym evaluate`` results record of the benchmark's
    trace set, in the benchmark's sample order, with the retained fraction at ``budgets``."""
    policy = record["policies"][label]
    row_of = {name: i for i, name in enumerate(record["samples"])}
    if sorted(row_of) != sorted(facts.samples):
        raise ValueError("the evaluation did not score exactly the benchmark's samples")
    rows = [row_of[name] for name in facts.samples]
    retained = policy["retained_per_sample_head"]
    columns = [retained["budgets"].index(b) for b in budgets]
    return {
        "samples": list(facts.samples),
        "holistic_score": pack(np.asarray(policy["per_sample_head"])[rows], "uint16"),
        "retained_fraction": {
            "budgets": list(budgets),
            "values": pack(np.asarray(retained["values"])[rows][..., columns], "uint16"),
        },
    }


def end_to_end_records(
    parts: Mapping[tuple[str, int], Mapping], label: str, budgets: Sequence[int], continuation: int
) -> dict:
    """The end-to-end records of policy ``label`` from an ``evaluate-e2e`` run's parts ((task, index) -> part, in
    run order; :func:`kvp_gym.evaluation.end_to_end.read_parts`); ``continuation``: tokens per essay."""
    prompts, nll = [], []
    for (task, index), part in parts.items():
        mine = part["policies"][label]["budgets"]
        if task == "essay":
            nll.append([part[FULL_CACHE]["nll"]] + [mine[str(b)]["nll"] for b in budgets])
            continue
        results = {FULL_CACHE: part[FULL_CACHE], **{str(b): mine[str(b)] for b in budgets}}
        prompts.append(
            {
                "task": task,
                "index": index,
                "outputs": {key: result["output"] for key, result in results.items()},
                "correct": {key: result["score"] for key, result in results.items()},
            }
        )
    nll_array = np.asarray(nll, dtype=float).reshape(len(nll), 1 + len(budgets), continuation)
    return {"prompts": prompts, "nll": pack(nll_array, "float32")}


# --- checking and recomputing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoded:
    """An entry's records as arrays: scores [S, L, H], retained [S, L, H, budgets]; prompts as in the records;
    nll [essays, 1 + budgets, tokens] or None."""

    scores: np.ndarray
    retained: np.ndarray
    prompts: list[dict[str, Any]] | None
    nll: np.ndarray | None


def decode(records: Mapping[str, Any], benchmark: Benchmark, end_to_end: bool) -> Decoded:
    """Read and check an entry's records against ``benchmark`` (``end_to_end``: the entry claims end-to-end
    results): RecordError naming the first JSON path that is not what the benchmark fixes."""
    facts = benchmark_facts(benchmark)
    level, e2e = benchmark.trace_level, benchmark.end_to_end
    trace = _field(records, "trace_level", dict, "$.records")
    if _field(trace, "samples", list, "$.records.trace_level") != list(facts.samples):
        raise RecordError("$.records.trace_level.samples: not the benchmark's samples in its order")
    shape = (len(facts.samples), facts.layers, facts.kv_heads)
    scores = unpack(trace.get("holistic_score"), "$.records.trace_level.holistic_score", "uint16", shape)
    retained = _field(trace, "retained_fraction", dict, "$.records.trace_level")
    if retained.get("budgets") != list(level.budgets):
        raise RecordError(f"$.records.trace_level.retained_fraction.budgets: expected {list(level.budgets)}")
    kept = unpack(
        retained.get("values"), "$.records.trace_level.retained_fraction.values", "uint16", (*shape, len(level.budgets))
    )
    if not end_to_end:
        if records.get("end_to_end") is not None:
            raise RecordError("$.records.end_to_end: the entry has no end-to-end results, so it must be null")
        return Decoded(scores, kept, None, None)
    found = _field(records, "end_to_end", dict, "$.records")
    prompts = _field(found, "prompts", list, "$.records.end_to_end")
    if [(p.get("task"), p.get("index")) if isinstance(p, dict) else None for p in prompts] != list(facts.prompts):
        raise RecordError("$.records.end_to_end.prompts: not the benchmark's prompts (task, index) in its order")
    keys = [FULL_CACHE, *map(str, e2e.budgets)]
    for i, prompt in enumerate(prompts):
        where = f"$.records.end_to_end.prompts[{i}]"
        outputs, correct = _field(prompt, "outputs", dict, where), _field(prompt, "correct", dict, where)
        if sorted(outputs) != sorted(keys) or sorted(correct) != sorted(keys):
            raise RecordError(f"{where}: outputs and correct need exactly the keys {keys}")
        if not all(isinstance(outputs[k], str) for k in keys):
            raise RecordError(f"{where}.outputs: every output must be a string")
        if not all(type(correct[k]) in (int, float) for k in keys):
            raise RecordError(f"{where}.correct: every score must be a number")
    nll = unpack(found.get("nll"), "$.records.end_to_end.nll", "float32", (e2e.essays, len(keys), e2e.continuation))
    if (nll < 0).any():
        raise RecordError("$.records.end_to_end.nll: a negative log-likelihood")
    return Decoded(scores, kept, prompts, nll)


def _field(parent: Any, key: str, kind: type, where: str) -> Any:
    value = parent.get(key) if isinstance(parent, dict) else None
    if not isinstance(value, kind):
        raise RecordError(f"{where}.{key}: expected {'an object' if kind is dict else 'a list'}")
    return value


def rescore(decoded: Decoded, benchmark: Benchmark) -> tuple[Decoded, list[tuple[str, str]]]:
    """``decoded`` with every prompt's correctness recomputed (its task's score of its output against the
    benchmark's answers), and (JSON path, problem) for each recorded correctness that differs."""
    from kvp_gym.tasks import get_task

    if decoded.prompts is None:
        return decoded, []
    answers = benchmark_facts(benchmark).answers
    prompts, problems = [], []
    for i, prompt in enumerate(decoded.prompts):
        task = get_task(prompt["task"])
        truth = {
            key: task.score(output, answers[prompt["task"], prompt["index"]])
            for key, output in prompt["outputs"].items()
        }
        problems += [
            (
                f"$.records.end_to_end.prompts[{i}].correct.{key}",
                f"says {prompt['correct'][key]!r}, but the task scores this output {truth[key]!r}",
            )
            for key in truth
            if prompt["correct"][key] != truth[key]
        ]
        prompts.append({**prompt, "correct": truth})
    return dataclasses.replace(decoded, prompts=prompts), problems


def published(decoded: Decoded, benchmark: Benchmark, label: str) -> dict[str, Any]:
    """Every number of an entry's ``results`` that records determine (all but the trace level's ``seconds``),
    computed from ``decoded``; ``label`` (the entry's policy spec without its checkpoint) names its intervals'
    generators."""
    facts = benchmark_facts(benchmark)
    level = benchmark.trace_level
    per_sample = decoded.scores.mean((1, 2))  # [S]
    tasks = np.array([facts.task_of[s] for s in facts.samples])
    contexts = np.array([facts.context_of[s] for s in facts.samples])
    rng = bootstrap_generator(level.bootstrap_seed, label, "holistic_score")
    trace_level = {
        "holistic_score": mean_interval(per_sample, rng, level.bootstrap),
        "per_task": {t: float(per_sample[tasks == t].mean()) for t in sorted(set(tasks.tolist()))},
        "per_context": {str(c): float(per_sample[contexts == c].mean()) for c in sorted(set(contexts.tolist()))},
        "retained_fraction": {
            str(b): float(v) for b, v in zip(level.budgets, decoded.retained.mean((0, 1, 2)), strict=True)
        },
        "per_layer_head": np.round(decoded.scores.mean(0), 6).tolist(),
        "samples": len(per_sample),
        "heads": facts.layers * facts.kv_heads,
    }
    return {"trace_level": trace_level, "end_to_end": _end_to_end(decoded, benchmark, label)}


def _end_to_end(decoded: Decoded, benchmark: Benchmark, label: str) -> dict[str, Any] | None:
    if decoded.prompts is None:
        return None
    e2e, seed, resamples = benchmark.end_to_end, benchmark.trace_level.bootstrap_seed, benchmark.trace_level.bootstrap
    budgets = [str(b) for b in e2e.budgets]

    def accuracy(who: str, key: str, task: str, *names: str) -> dict[str, Any]:
        values = [p["correct"][key] for p in decoded.prompts if p["task"] == task]
        return mean_interval(values, bootstrap_generator(seed, who, "accuracy", task, *names), resamples)

    def perplexity(who: str, row: int, *names: str) -> dict[str, Any] | None:
        if not len(decoded.nll):
            return None
        values = np.exp(decoded.nll[:, row].mean(-1))  # one perplexity per essay
        return geometric_mean_interval(values, bootstrap_generator(seed, who, "perplexity", *names), resamples)

    return {
        "accuracy": {task: {b: accuracy(label, b, task, b) for b in budgets} for task in e2e.tasks},
        "perplexity": {b: perplexity(label, row, b) for row, b in enumerate(budgets, 1)} if e2e.essays else {},
        "full_cache": {
            "accuracy": {task: accuracy(FULL_CACHE, FULL_CACHE, task) for task in e2e.tasks},
            "perplexity": perplexity(FULL_CACHE, 0),
        },
        "samples": {**{task: e2e.samples for task in e2e.tasks}, "essay": e2e.essays},
    }


MEASURED = ("$.results.trace_level.seconds",)  # what records cannot reproduce: a time


def differences(stated: Any, computed: Any, where: str = "$.results") -> Iterator[tuple[str, str]]:
    """(JSON path, problem) for every number of ``stated`` that is not the ``computed`` one (within
    :data:`NUMBERS_AGREE`, relative for large numbers) and every key one has and the other lacks, but the
    :data:`MEASURED` ones."""
    if isinstance(computed, dict):
        if not isinstance(stated, dict):
            yield where, "expected an object, as the records give"
            return
        for key in stated:
            if key not in computed and f"{where}.{key}" not in MEASURED:
                yield where, f"unknown {key!r}: the records give {', '.join(map(repr, computed)) or 'nothing'} here"
        for key in computed:
            if key not in stated:
                yield where, f"missing {key!r}, which the records give"
            else:
                yield from differences(stated[key], computed[key], f"{where}.{key}")
        return
    if isinstance(computed, list):
        if not isinstance(stated, list) or len(stated) != len(computed):
            yield where, f"expected a list of {len(computed)}, as the records give"
            return
        for i, (a, b) in enumerate(zip(stated, computed, strict=True)):
            yield from differences(a, b, f"{where}[{i}]")
        return
    same = stated is None if computed is None else _agree(stated, computed)
    if not same:
        yield where, f"the entry says {stated!r}, its records give {computed!r}"


def _agree(stated: Any, computed: float) -> bool:
    if isinstance(stated, bool) or not isinstance(stated, int | float):
        return False
    return abs(stated - computed) <= NUMBERS_AGREE * max(1.0, abs(computed))


def rerun_differences(claimed: Decoded, fresh: Decoded, same_platform: bool) -> Iterator[tuple[str, str]]:
    """(JSON path, problem) for every record of ``claimed`` that the rerun's ``fresh`` records do not reproduce.

    On the platform the entry was made on (same OS, CPU architecture and torch), a deterministic scorer reproduces
    every score and retained fraction to one step of the records' rounding (:data:`STEP`), every output exactly and
    every token NLL within 1e-4 nats. Elsewhere, float arithmetic differs in its last bits, which can swap two
    nearly tied tokens of a ranking or a greedy decoding step: scores and retained fractions within 2e-3, NLLs
    within 1e-2 nats, and at most one prompt in ten with another output."""
    step_tolerance = 1.5 * STEP if same_platform else 2e-3
    arrays = [("trace_level.holistic_score", claimed.scores, fresh.scores, step_tolerance)]
    arrays.append(("trace_level.retained_fraction.values", claimed.retained, fresh.retained, step_tolerance))
    if claimed.nll is not None and fresh.nll is not None:
        arrays.append(("end_to_end.nll", claimed.nll, fresh.nll, 1e-4 if same_platform else 1e-2))
    for name, a, b, tolerance in arrays:
        gap = np.abs(a - b)
        if (gap > tolerance).any():
            yield (
                f"$.records.{name}",
                f"{int((gap > tolerance).sum())} of {gap.size} values differ from the rerun by more than "
                f"{tolerance:.2g} (up to {gap.max():.4g})",
            )
    if claimed.prompts is None or fresh.prompts is None:
        return
    changed = [
        f"{p['task']}/{p['index']} at {key}"
        for p, q in zip(claimed.prompts, fresh.prompts, strict=True)
        for key in p["outputs"]
        if p["outputs"][key] != q["outputs"][key]
    ]
    allowed = 0 if same_platform else len(claimed.prompts) * len(claimed.prompts[0]["outputs"]) // 10
    if len(changed) > allowed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        yield "$.records.end_to_end.prompts", f"{len(changed)} outputs differ from the rerun ({shown})"

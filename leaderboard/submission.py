"""Submission entries: the standard evaluation of a policy on a benchmark, and the checks every entry must pass.

An entry (schema leaderboard/schema/submission-v2.json) says what the policy is and how to load it (a scorer of
the ``kvp_gym.scorers`` entry points with its parameters, or a policy file and its factory function, pinned by
SHA-256, see :func:`kvp_gym.scorers.load_policy_file`; optionally a checkpoint file pinned by SHA-256), which
benchmark it ran (id and manifest hash), and its results: the trace-level holistic score with a 95% bootstrap
interval over samples, per task and per prompt length, the retained fraction at the benchmark's budgets and the
per-layer x head scores (paper protocol); and end to end, the exact-match accuracy per task and budget and the
essays' perplexity with the evicting cache, next to the full cache's.

An entry's ``kind`` is what its loaded scorer declares (:func:`kvp_gym_leaderboard.policy.declarations`);
:func:`validate` refuses another. Every published number is computed from the entry's raw ``records``
(:mod:`kvp_gym_leaderboard.records`); each interval draws from ``bootstrap_generator(bootstrap seed,
bootstrap_label(load), statistic...)``. A benchmark of several models has a board per model: an entry names its
model (``benchmark.model``) and is checked against that model's part.

:func:`standard_evaluation` produces entries (``kvp-gym submit``); :func:`validate` checks files (``kvp-gym
leaderboard validate``): the schema, the benchmark, the pinned files, the kind, the records, and every number against
what the records give; :func:`rerun` re-evaluates an entry and compares its records with the rerun's.

Imports kvp_gym (storage, version, scorers, device, evaluation, distributed_run), kvp_gym_leaderboard.benchmark,
.definition, .policy and .records.
"""

from __future__ import annotations

import datetime
import json
import platform
from collections.abc import Iterator, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvp_gym.storage import atomic_path, file_sha256
from kvp_gym.version import __version__
from kvp_gym_leaderboard.benchmark import compare, fingerprint_set, manifest_sha256, read_manifest
from kvp_gym_leaderboard.definition import Benchmark, BenchmarkError, benchmark_parts
from kvp_gym_leaderboard.policy import PINNED, bootstrap_label, declarations, kind_of, policy_spec
from kvp_gym_leaderboard.records import (
    RecordError,
    benchmark_facts,
    decode,
    differences,
    end_to_end_records,
    published,
    rerun_differences,
    rescore,
    trace_level_records,
)

if TYPE_CHECKING:
    from kvp_gym.distributed_run import Processes

SCHEMA_PATH = Path(__file__).parent / "schema" / "submission-v2.json"
ENTRIES = Path(__file__).parent / "entries"
SCHEMA, SCHEMA_VERSION = "kvp-gym/leaderboard-submission", 2
SHOWN = 10  # differences listed per entry; the rest are counted


def check_trace_set(benchmark: Benchmark, folder: Path) -> None:
    """Raise BenchmarkError unless ``folder`` holds the benchmark's trace files with the manifest's samples, token
    ids and settings (tensors are checked by ``kvp-gym leaderboard prepare``; the files' seals guard them since)."""
    names = [name for _, _, name in benchmark.trace_files()]
    missing = [name for name in names if not (folder / name).exists()]
    if missing:
        root = folder.parent if benchmark.multi_model else folder  # prepare's --dir holds a folder per model
        raise BenchmarkError(
            f"{folder}: the {benchmark.label} trace set is missing {', '.join(missing)}; run kvp-gym leaderboard "
            f"prepare {benchmark.arguments}" + (f" --dir {root}" if folder != benchmark.default_folder() else "")
        )
    found = fingerprint_set(benchmark, folder, names, tensors=False)
    problems = list(compare(read_manifest(benchmark), found, only=names))
    if problems:
        raise BenchmarkError(f"{folder}: not the {benchmark.label} trace set:\n  " + "\n  ".join(problems))


def standard_evaluation(
    benchmark: Benchmark,
    policies: Sequence[str],
    traces: Path,
    work: Path,
    *,
    checkpoint: Path | None = None,
    end_to_end: bool = True,
    device: str = "auto",
    progress: bool = True,
    processes: Processes | None = None,
) -> dict[str, dict[str, Any]] | None:
    """Evaluate scorer specs on ``benchmark``; return an entry (without name, description and authors) per spec.

    ``traces``: the prepared trace set; ``work``: where the end-to-end run keeps its resumable parts;
    ``checkpoint``: a checkpoint file handed to every policy as its ``checkpoint`` parameter. The processes of a
    torchrun job (``processes``: :func:`kvp_gym.distributed_run.join`; default one process) split both evaluations;
    process 0 returns the entries (one process's, but for the times) and shows progress, the others return None.
    """
    from kvp_gym.distributed_run import ONE_PROCESS
    from kvp_gym.evaluation.end_to_end import read_parts, run
    from kvp_gym.scorers import with_parameters

    processes = processes or ONE_PROCESS
    progress = progress and processes.writes_result
    check_trace_set(benchmark, traces)
    specs = {spec: spec if checkpoint is None else with_parameters(spec, checkpoint=checkpoint) for spec in policies}
    record = _trace_level_record(benchmark, specs, traces, work, checkpoint, progress=progress, processes=processes)
    if end_to_end:
        config = benchmark.e2e_config(tuple(specs.values()))
        run(config, work / "e2e", device=device, progress=progress, processes=processes)
    if not processes.writes_result:
        return None
    parts = read_parts(work / "e2e") if end_to_end else None
    return {
        spec: _entry(benchmark, record, spec, parts, full_spec, checkpoint, device) for spec, full_spec in specs.items()
    }


def _trace_level_record(
    benchmark: Benchmark, specs: dict[str, str], traces: Path, work: Path, checkpoint: Path | None, **options: Any
) -> dict[str, Any] | None:
    """The trace-level evaluation record of ``specs`` (label -> spec with the checkpoint) on the prepared set in
    ``traces`` (``options``: evaluate's progress and processes; under torchrun None but on process 0, unless saved).
    It is kept in ``work``: an interrupted submit resumes after it, with the end-to-end parts. Every process reads
    the saved record before process 0 writes it (the evaluation's gather comes between)."""
    from kvp_gym.evaluation.trace_level import evaluate
    from kvp_gym.scorers import resolve_policies, scorer_files

    level = benchmark.trace_level
    paths = [traces / name for _, _, name in benchmark.trace_files()]
    key = {
        "benchmark": benchmark.id,
        "manifest_sha256": manifest_sha256(benchmark),
        "policies": list(specs.values()),
        "checkpoint_sha256": None if checkpoint is None else file_sha256(checkpoint),
        # By content: the same label with another file behind it (the shipped agents replaced) is another run.
        "policy_files": {
            label: sorted(scorer_files(scorer).values()) for label, scorer in resolve_policies(specs)[0].items()
        },
        "kvp_gym_version": __version__,
    }
    saved = work / "trace-level.json"
    record = json.loads(saved.read_text())["record"] if _saved_key(saved) == key else None
    if record is None:
        record = evaluate(
            paths,
            specs,
            split="test",
            seed=level.bootstrap_seed,
            bootstrap=level.bootstrap,
            protocol=level.protocol,
            **options,
        )
        if record is None:  # this process's share is done
            return None
        with atomic_path(saved) as tmp:
            tmp.write_text(json.dumps({"key": key, "record": record}))
    return record


def _entry(
    benchmark: Benchmark,
    record: dict[str, Any],
    spec: str,
    parts: dict[tuple[str, int], dict] | None,
    full_spec: str,
    checkpoint: Path | None,
    device: str,
) -> dict[str, Any]:
    """The entry of the policy ``spec`` (without name, description and authors): its records from the trace-level
    ``record`` and the end-to-end ``parts`` (where its label is ``full_spec``; None when not run), and its results
    computed from those records."""
    level, e2e = benchmark.trace_level, benchmark.end_to_end
    policy = record["policies"][spec]
    load = _load_record(spec, policy["name"], policy["parameters"], checkpoint)
    facts = benchmark_facts(benchmark)
    records = {
        "trace_level": trace_level_records(record, spec, facts, level.budgets),
        "end_to_end": None if parts is None else end_to_end_records(parts, full_spec, e2e.budgets, e2e.continuation),
    }
    results = published(decode(records, benchmark, parts is not None), benchmark, bootstrap_label(load))
    results["trace_level"]["seconds"] = round(policy["seconds"], 3)
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "kind": kind_of(policy["needs_queries"], policy["privileged"]),
        "load": load,
        "benchmark": benchmark.entry_fields | {"manifest_sha256": manifest_sha256(benchmark)},
        "kvp_gym_version": record["kvp_gym_version"],
        "hardware": _hardware(device),
        "seeds": {
            "trace_level": level.seed,
            "end_to_end": e2e.seed,
            "bootstrap": level.bootstrap_seed,
        },
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "results": results,
        "records": records,
    }


def _saved_key(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None  # absent or damaged: evaluate again


def _load_record(spec: str, name: str, parameters: dict[str, Any], checkpoint: Path | None) -> dict[str, Any]:
    """How to load the policy ``spec`` (its scorer's ``name`` and ``parameters``): its entry point, or its policy
    file (absolute path, SHA-256, factory); and its checkpoint."""
    from kvp_gym.scorers import FILE_PREFIX, parse_file_spec

    load: dict[str, Any] = {"scorer": name, "parameters": {k: v for k, v in parameters.items() if k != "checkpoint"}}
    if spec.startswith(FILE_PREFIX):
        source = parse_file_spec(spec)
        path = source.path.resolve()
        load["policy_file"] = {"path": str(path), "sha256": file_sha256(path), "factory": source.factory}
    else:
        load["entry_point"] = entry_points(group="kvp_gym.scorers")[name].value
    if checkpoint is not None:
        load["checkpoint"] = {"path": str(checkpoint), "sha256": file_sha256(checkpoint)}
    return load


def end_to_end_results(e2e: dict, label: str) -> dict[str, Any]:
    """One policy's end-to-end results, as an entry holds them, from an ``evaluate-e2e`` results record."""
    accuracy = {task: rows["policies"][label] for task, rows in e2e["accuracy"].items()}
    perplexity = e2e["perplexity"]
    return {
        "accuracy": accuracy,
        "perplexity": perplexity["policies"][label] if perplexity else {},
        "full_cache": {
            "accuracy": {task: rows["full_cache"] for task, rows in e2e["accuracy"].items()},
            "perplexity": perplexity.get("full_cache") if perplexity else None,
        },
        "samples": e2e["samples"],
    }


def _hardware(device: str) -> dict[str, str]:
    import torch

    from kvp_gym.device import device_name, resolve_device

    return {"device": device_name(resolve_device(device)), "platform": platform.platform(), "torch": torch.__version__}


# --- validation ---------------------------------------------------------------------------------------------------


def validate(paths: Sequence[Path], benchmark: Benchmark | Sequence[Benchmark] | None = None) -> list[str]:
    """Every problem of the entry files ``paths``, one line each: ``FILE: JSON-PATH: what is wrong``.

    Checks: valid JSON, the schema, a known benchmark with the current manifest hash, internal consistency
    (intervals contain their mean, retained fraction non-decreasing in the budget, the benchmark's tasks, lengths,
    budgets, sample counts and seeds), a checkpoint whose SHA-256 matches, a ``kind`` that is what the loaded scorer
    declares (:func:`kvp_gym_leaderboard.policy.declarations`), and no two entries with the same name on one board.

    Each entry is checked against its model's part of the benchmark: of ``benchmark`` when given (one part, or
    several parts of one benchmark: :func:`kvp_gym_leaderboard.definition.benchmark_parts`), else of the benchmark
    its id names. An entry for another benchmark, or for a model none of the given parts is, is refused.
    """
    import jsonschema

    given = [benchmark] if isinstance(benchmark, Benchmark) else benchmark
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    problems: list[str] = []
    names: dict[tuple[str, str | None, str], Path] = {}  # a board is one benchmark's one model
    for path in paths:
        path = Path(path)
        try:
            entry = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError) as err:
            problems.append(f"{path}: $: cannot read: {err}")
            continue
        except json.JSONDecodeError as err:
            problems.append(f"{path}: $: not valid JSON: {err}")
            continue
        errors = sorted(validator.iter_errors(entry), key=lambda e: list(map(str, e.absolute_path)))
        problems += [f"{path}: {_json_path(e.absolute_path)}: {_schema_message(e)}" for e in errors]
        if errors:
            continue
        problems += [f"{path}: {where}: {message}" for where, message in _consistency(entry, path, given)]
        board = (entry["benchmark"]["id"], entry["benchmark"].get("model"), entry["name"])
        if board in names:
            problems.append(f"{path}: $.name: {entry['name']!r} is already the name of {names[board]}")
        names.setdefault(board, path)
    return problems


def _json_path(parts) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def _schema_message(error) -> str:
    if error.validator == "additionalProperties":
        return error.message.replace("Additional properties are not allowed", "unknown field(s)")
    if error.validator == "oneOf" and all("required" in option for option in error.validator_value):
        return "expected exactly one of " + " or ".join(option["required"][0] for option in error.validator_value)
    if error.validator == "oneOf" and error.instance is not None:
        return "expected null or " + "; ".join(sorted({e.message for e in error.context if e.validator != "type"}))
    return error.message


def _consistency(entry: dict, path: Path, given: Sequence[Benchmark] | None) -> Iterator[tuple[str, str]]:
    """(JSON path, problem) for everything the schema cannot express (``given``: the parts to check against)."""
    wanted = entry["benchmark"]["id"]
    if given and given[0].id != wanted:
        yield "$.benchmark.id", f"entry is for {wanted!r}, this board is {given[0].id!r}"
        return
    try:
        parts = given or benchmark_parts(wanted)
    except BenchmarkError as err:
        yield "$.benchmark.id", str(err)
        return
    benchmark, problem = _part_of(entry, parts)
    if benchmark is None:
        yield "$.benchmark.model", problem
        return
    try:
        current = manifest_sha256(benchmark)
    except BenchmarkError as err:
        yield "$.benchmark.id", str(err)
        return
    if entry["benchmark"]["manifest_sha256"] != current:
        yield "$.benchmark.manifest_sha256", f"stale: the {benchmark.label} manifest's SHA-256 is now {current}"
    level, e2e_settings = benchmark.trace_level, benchmark.end_to_end
    seeds = {"trace_level": level.seed, "end_to_end": e2e_settings.seed, "bootstrap": level.bootstrap_seed}
    for key, value in seeds.items():
        if entry["seeds"][key] != value:
            yield f"$.seeds.{key}", f"{entry['seeds'][key]} is not the benchmark's {value}"
    load = entry["load"]
    for field in PINNED:  # checked before the policy file runs: a changed file's code is never executed
        pinned = load.get(field)
        if pinned is None:
            continue
        file = resolve_checkpoint(pinned["path"], path)
        if not file.exists():
            yield f"$.load.{field}.path", f"no such file {file}"
            return
        if (found := file_sha256(file)) != pinned["sha256"]:
            yield f"$.load.{field}.sha256", f"{file} has SHA-256 {found}, not the entry's"
            return
        load = {**load, field: {**pinned, "path": str(file)}}
    registered, name = entry_points(group="kvp_gym.scorers"), load["scorer"]
    if "entry_point" in load and name in registered.names and load["entry_point"] != registered[name].value:
        yield "$.load.entry_point", f"the scorer {name!r} is {registered[name].value}"
    kind = list(_kind_problems(entry["kind"], load))
    yield from kind
    if any(where == "$.load" for where, _ in kind):
        return  # no scorer: no label to recompute the intervals under
    yield from _number_problems(entry, benchmark)


def _part_of(entry: dict, parts: Sequence[Benchmark]) -> tuple[Benchmark | None, str]:
    """(the part of ``parts``, of one benchmark, that ``entry`` is for, "") : the part of its ``benchmark.model``,
    which an entry of a single-model benchmark may leave out; else (None, what is wrong)."""
    model, first = entry["benchmark"].get("model"), parts[0]
    for part in parts:
        if model == part.model or (model is None and not part.multi_model):
            return part, ""
    if model is None:
        return None, f"{first.id} covers several models ({', '.join(first.models)}): the entry names none"
    if model in first.models:
        mine = " and ".join(repr(part.model) for part in parts)
        return None, f"the entry is for {first.id}'s model {model!r}, this board is its {mine} part"
    return None, f"{first.id} has no model {model!r}; its models: {', '.join(first.models)}"


def _number_problems(entry: dict, benchmark: Benchmark) -> Iterator[tuple[str, str]]:
    """The entry's records against the benchmark, then every stated number against the one its records give (the
    first :data:`SHOWN` differences, and how many more)."""
    try:
        decoded = decode(entry["records"], benchmark, entry["results"]["end_to_end"] is not None)
    except RecordError as err:
        where, _, message = str(err).partition(": ")
        yield where, message
        return
    decoded, found = rescore(decoded, benchmark)
    found += differences(entry["results"], published(decoded, benchmark, bootstrap_label(entry["load"])))
    yield from found[:SHOWN]
    if len(found) > SHOWN:
        yield "$.results", f"and {len(found) - SHOWN} more numbers that differ from what the records give"


def _kind_problems(stated: str, load: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """The entry's ``kind`` against what its scorer declares (``load``'s checkpoint path already resolved)."""
    try:
        needs_queries, needs_future = declarations(load)
    except ValueError as err:  # ScorerError: an unknown scorer, bad parameters, an unreadable checkpoint
        what = ("the policy file's scorer" if "policy_file" in load else "the scorer") + f" {load['scorer']!r}"
        yield "$.load", f"cannot load {what} to read what it declares: {err}"
        return
    declared = kind_of(needs_queries, needs_future)
    if declared != stated:
        yield (
            "$.kind",
            f"the entry says {stated!r}, but its scorer {load['scorer']!r} declares needs_queries={needs_queries}, "
            f"needs_future={needs_future}: {declared!r}",
        )


def resolve_checkpoint(path: str, entry_file: Path) -> Path:
    """A pinned file's path in an entry (its checkpoint or policy file): absolute, or relative to the entry file's
    folder."""
    candidate = Path(path)
    return candidate if candidate.is_absolute() else Path(entry_file).parent / candidate


def read_entry(path: Path) -> dict[str, Any]:
    """The entry in the file ``path``, its checkpoint and policy file paths (relative to the entry's folder) made
    absolute, so that :func:`declarations` can load its scorer from anywhere."""
    entry = json.loads(Path(path).read_text())
    for field in PINNED:
        pinned = entry["load"].get(field)
        if pinned is not None:
            pinned["path"] = str(resolve_checkpoint(pinned["path"], path).resolve())
    return entry


# --- reproduction -------------------------------------------------------------------------------------------------


def rerun(
    path: Path, benchmark: Benchmark, traces: Path, work: Path, device: str = "auto", progress: bool = True
) -> list[str]:
    """Re-evaluate the (valid) entry in ``path`` on ``benchmark`` and compare its raw records with the rerun's,
    one line per difference (:func:`kvp_gym_leaderboard.records.rerun_differences`: exact to the records' rounding
    on the platform the entry was made on, within stated tolerances elsewhere)."""
    path = Path(path)
    entry = json.loads(path.read_text())
    load = entry["load"]
    checkpoint = resolve_checkpoint(load["checkpoint"]["path"], path) if "checkpoint" in load else None
    if "policy_file" in load:
        from kvp_gym.scorers import file_spec

        source = resolve_checkpoint(load["policy_file"]["path"], path).resolve()
        spec = file_spec(source, load["policy_file"]["factory"], load["parameters"])
    else:
        spec = policy_spec(load["scorer"], load["parameters"])
    end_to_end = entry["results"]["end_to_end"] is not None
    fresh = standard_evaluation(
        benchmark,
        [spec],
        traces,
        work,
        checkpoint=checkpoint,
        end_to_end=end_to_end,
        device=device,
        progress=progress,
    )[spec]
    claimed, again = (decode(e["records"], benchmark, end_to_end) for e in (entry, fresh))
    same_platform = all(entry["hardware"][key] == fresh["hardware"][key] for key in ("device", "platform", "torch"))
    return [f"{path}: {where}: {problem}" for where, problem in rerun_differences(claimed, again, same_platform)]

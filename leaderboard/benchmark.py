"""Standard benchmarks: a frozen definition (TOML), its trace set, and the manifest that pins that set.

A benchmark (``leaderboard/benchmarks/<id>.toml``, read by :mod:`kvp_gym_leaderboard.definition`, whose
:func:`load_benchmark` and :func:`benchmark_parts` are read from here too) fixes, per model it covers, the tasks,
prompt lengths, sample counts, seeds, text pool, protocol and budgets of the trace-level evaluation, and the
settings of the end-to-end one. Everything here works on one model's part (a :class:`Benchmark`): a benchmark of
several models has a trace set and a manifest per model (``<id>.<model>.manifest.json``).
:func:`prepare` collects its trace set (one file per task and prompt length, every sample in the test split),
after printing its plan (:func:`plan_prepare`: the files, which exist, the expected time), and checks it against
the committed manifest ``<id>.manifest.json``:

- exactly: the collection settings of every file, and per sample its name, prompt length and the SHA-256 of its
  prompt token ids and of its recorded continuation; the SHA-256 of the end-to-end prompts' token ids;
- within a tolerance: per sample, tensor kind (queries, keys, values) and layer, the mean, the root mean square
  and two random-sign sketches of the float16 tensor, in float64 (:func:`fingerprint`). Another CPU may round
  some float16 values one unit differently, which moves these by well under 1e-3 of the RMS; a wrong token
  position, head, layer or model moves them by more than the tolerance (:data:`TOLERANCE` x RMS).

The manifest's SHA-256 (:func:`manifest_sha256`) identifies the benchmark in every submission.

Imports kvp_gym.storage and kvp_gym_leaderboard.definition; kvp_gym.collect, .distributed_run, .evaluation,
.generation, .models, .tasks and .traces when a benchmark is prepared or compared (reading a manifest needs none of
them).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kvp_gym.storage import atomic_path
from kvp_gym_leaderboard.definition import Benchmark, BenchmarkError
from kvp_gym_leaderboard.definition import benchmark_parts as benchmark_parts  # re-exported: read from here too,
from kvp_gym_leaderboard.definition import load_benchmark as load_benchmark  # as before the definition moved out

if TYPE_CHECKING:
    from kvp_gym.distributed_run import Processes

TOLERANCE = 5e-3  # of the tensor's RMS, for each fingerprint number (see fingerprint)
KINDS = ("queries", "keys", "values")
# Seconds per sample on 2 quiet CPU cores, per model: (fixed, per prompt token), fitted to the slowest bench-v0 files
# (docs/leaderboard.md: 71.5 s for 6 samples of 1,024 tokens, 123.4 s for 6 of 2,048), and the check's seconds per
# sample of that model (69 s for the 60). A loaded machine takes longer: the estimate is the quiet-machine time.
COLLECT_SECONDS = {"smollm2-135m": (3.27, 8.45e-3)}
CHECK_SECONDS_PER_SAMPLE = 1.15


def manifest_sha256(benchmark: Benchmark) -> str:
    """SHA-256 of the committed manifest file: the benchmark's identity in submissions."""
    try:
        return hashlib.sha256(benchmark.manifest_path.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise BenchmarkError(
            f"{benchmark.manifest_path}: no manifest for {benchmark.label} (kvp-gym leaderboard prepare "
            f"{benchmark.arguments} --write-manifest creates it)"
        ) from None


def shard_files(benchmark: Benchmark, shard: tuple[int, int]) -> list[tuple[str, int, str]]:
    """The trace files shard ``i`` of ``N`` collects: longest prompts first, dealt out in turn (a rough balance)."""
    index, count = shard
    if not 0 <= index < count:
        raise BenchmarkError(f"shard must be i/N with 0 <= i < N, got {index}/{count}")
    ordered = sorted(benchmark.trace_files(), key=lambda f: -f[1])
    return ordered[index::count]


@dataclass(frozen=True)
class PlannedFile:
    """One trace file of a :class:`PreparePlan`: ``done`` of its ``samples`` are already there (all of them when
    the file exists; those of an interrupted collection's ``.parts`` folder otherwise)."""

    task: str
    context: int
    name: str
    samples: int
    done: int
    exists: bool


@dataclass(frozen=True)
class PreparePlan:
    """What :func:`prepare` will do: which files, where, which are already there, and the time it should take."""

    benchmark: Benchmark
    folder: Path
    files: tuple[PlannedFile, ...]

    def collect_seconds(self, planned: PlannedFile) -> float | None:
        """Expected seconds to collect what ``planned`` lacks on 2 quiet cores; None for a model not measured."""
        if self.benchmark.model not in COLLECT_SECONDS:
            return None
        fixed, per_token = COLLECT_SECONDS[self.benchmark.model]
        return (planned.samples - planned.done) * (fixed + per_token * planned.context)

    def __str__(self) -> str:
        count, total = len(self.files), len(self.benchmark.trace_files())
        existing = sum(f.exists for f in self.files)
        which = f"{count} trace files" if count == total else f"{count} of its {total} trace files (this shard)"
        lines = [
            f"{self.benchmark.label}: {which} into {self.folder}: {count - existing} to collect, {existing} already "
            f"there (only checked)"
        ]
        for number, planned in enumerate(self.files, 1):
            if planned.exists:
                what = "already there: check only"
            else:
                seconds = self.collect_seconds(planned)
                resumed = f", {planned.done} already in {planned.name}.parts" if planned.done else ""
                what = f"collect {planned.samples - planned.done} of {planned.samples} samples{resumed}"
                what += f" (~{_duration(seconds)})" if seconds is not None else ""
            lines.append(f"  {f'file {number}/{count}:':12s} {planned.name:24s} {what}")
        checked = sum(f.samples for f in self.files) * CHECK_SECONDS_PER_SAMPLE
        collecting = [self.collect_seconds(f) for f in self.files if not f.exists]
        if self.benchmark.model not in COLLECT_SECONDS:
            lines.append(f"expected time: not measured for {self.benchmark.model}")
        else:
            collect = f"about {_duration(sum(collecting))} to collect and" if collecting else "nothing to collect,"
            lines.append(
                f"expected time on 2 quiet CPU cores: {collect} about {_duration(checked)} to check (a machine "
                "shared with other work takes longer)"
            )
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    """'45 s', '2.1 min' or '16 min': what a plan line needs."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 600 else f"{seconds / 60:.0f} min"


def plan_prepare(benchmark: Benchmark, folder: Path | None = None, shard: tuple[int, int] = (0, 1)) -> PreparePlan:
    """The plan of :func:`prepare` (reads only which files and parts exist in ``folder``)."""
    folder = Path(folder or benchmark.default_folder())
    files = []
    for task, context, name in shard_files(benchmark, shard):
        samples = benchmark.trace_level.samples
        exists = (folder / name).exists()
        parts = folder / f"{name}.parts"  # kvp_gym.collect keeps each finished sample of a stopped run there
        done = samples if exists else min(samples, len(list(parts.glob("*.h5"))) if parts.is_dir() else 0)
        files.append(PlannedFile(task, context, name, samples, done, exists))
    return PreparePlan(benchmark, folder, tuple(files))


def prepare(
    benchmark: Benchmark,
    folder: Path | None = None,
    shard: tuple[int, int] = (0, 1),
    write_manifest: bool = False,
    progress: bool = True,
    processes: Processes | None = None,
) -> list[str]:
    """Collect (or resume) the benchmark's trace set into ``folder`` and check it against the manifest.

    With ``shard=(i, N)`` only shard i's files are collected and checked (copy the shards' files into one
    folder afterwards). ``write_manifest`` (maintainers, when a benchmark is created) writes the manifest from
    this set instead of checking it. With ``progress``, prints the plan (:func:`plan_prepare`) first, then
    ``file i/N: NAME`` before each file. Returns the problems found, one line each (empty: the set matches).

    Under torchrun (``processes``: default :func:`kvp_gym.distributed_run.join`, the job this process is part of)
    the processes deal the shard's files out between them, each collecting and fingerprinting its own; every
    process returns the problems of the whole shard, and process 0 writes the manifest.
    """
    from kvp_gym.collect import collect
    from kvp_gym.distributed_run import join

    processes = processes or join()
    plan = plan_prepare(benchmark, folder, processes.share(shard))
    if progress:
        print(plan, flush=True)
    for number, planned in enumerate(plan.files, 1):
        if progress:
            what = "already there, checking it" if planned.exists else "collecting"
            print(f"file {number}/{len(plan.files)}: {planned.name} ({what})", flush=True)
        config = benchmark.collect_config(planned.task, planned.context)
        summary = collect(config, plan.folder / planned.name, resume=True, progress=progress)
        if progress:
            print(summary, flush=True)
    if progress:
        print(f"checking {len(plan.files)} files against the manifest", flush=True)
    found = fingerprint_set(benchmark, plan.folder, [planned.name for planned in plan.files])
    found["files"] = {name: file for record in processes.gather(found) for name, file in record["files"].items()}
    names = [name for _, _, name in shard_files(benchmark, shard)]
    if write_manifest:
        if shard != (0, 1):
            raise BenchmarkError("--write-manifest needs the whole set (no --shard)")
        if processes.writes_result:
            with atomic_path(benchmark.manifest_path) as tmp:
                tmp.write_text(_dumps(found))
        processes.wait_for_all()  # written before any process reports it
        return []
    expected = read_manifest(benchmark)
    return list(compare(expected, found, only=names))


def read_manifest(benchmark: Benchmark) -> dict[str, Any]:
    manifest_sha256(benchmark)  # a clear error when it is missing
    try:
        return json.loads(benchmark.manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise BenchmarkError(f"{benchmark.manifest_path}: not valid JSON: {err}") from None


def fingerprint_set(benchmark: Benchmark, folder: Path, names: list[str], tensors: bool = True) -> dict[str, Any]:
    """The manifest record of the trace files ``names`` in ``folder`` plus the end-to-end prompts (without the
    tensor fingerprints if ``tensors`` is false: reads metadata only)."""
    from kvp_gym.traces import open_traces

    record: dict[str, Any] = {
        "benchmark": benchmark.id,
        **({"model": benchmark.model} if benchmark.multi_model else {}),  # one manifest per model of several
        "definition_sha256": hashlib.sha256(benchmark.path.read_bytes()).hexdigest(),
        "tolerance": TOLERANCE,
        "files": {},
        "end_to_end": e2e_prompt_hashes(benchmark),
    }
    for name in names:
        with open_traces(folder / name) as trace:
            samples = {}
            for sample_name, info in sorted(trace.samples.items()):
                samples[sample_name] = {
                    "split": info.split,
                    "prompt_length": info.prompt_length,
                    "prompt_sha256": _sha(info.tokens[: info.prompt_length]),
                    "continuation_sha256": _sha(info.tokens[info.prompt_length :]),
                }
                if tensors:
                    arrays = trace.tensors(sample_name)
                    samples[sample_name]["tensors"] = {
                        kind: [fingerprint(arrays[layer][k]) for layer in trace.header.layers]
                        for k, kind in enumerate(KINDS)
                    }
            record["files"][name] = {"collection": list(trace.header.collection), "samples": samples}
    return record


def e2e_prompt_hashes(benchmark: Benchmark) -> dict[str, str]:
    """SHA-256 of the token ids of every end-to-end prompt (``task/index``), from the task generators alone."""
    from kvp_gym import models
    from kvp_gym.generation import sample_seed
    from kvp_gym.tasks import encode, get_task, make_sample

    _, tokenizer = models.load(benchmark.model)
    config = benchmark.e2e_config(("random",))
    hashes = {}
    for task, index in config.work():
        sample = make_sample(get_task(task), tokenizer, config.context, sample_seed(config.seed, index), config.text)
        hashes[f"{task}/{index}"] = _sha(np.asarray(encode(tokenizer, sample).ids, np.int32))
    return hashes


def compare(expected: dict[str, Any], found: dict[str, Any], only: list[str] | None = None) -> Iterator[str]:
    """Every difference between two manifest records, one line each, naming the file, sample and field."""
    for field in ("benchmark", "model", "definition_sha256"):
        if expected.get(field) != found.get(field):
            yield f"{field}: manifest has {expected.get(field)!r}, this set {found.get(field)!r}"
    if expected.get("end_to_end") != found.get("end_to_end"):
        differ = sorted(
            k for k in expected.get("end_to_end", {}) if expected["end_to_end"][k] != found["end_to_end"].get(k)
        )
        yield f"end-to-end prompts: token ids differ for {', '.join(differ) or 'the set of prompts'}"
    tolerance = expected.get("tolerance", TOLERANCE)
    for name in only if only is not None else expected["files"]:
        want, got = expected["files"].get(name), found["files"].get(name)
        if want is None:
            yield f"{name}: not in the manifest"
            continue
        if want["collection"] != got["collection"]:
            yield f"{name}: collection settings differ: manifest {want['collection']}, file {got['collection']}"
        for sample in sorted(set(want["samples"]) ^ set(got["samples"])):
            where = "missing from the file" if sample in want["samples"] else "not in the manifest"
            yield f"{name}: sample {sample} {where}"
        for sample in sorted(set(want["samples"]) & set(got["samples"])):
            yield from _compare_sample(
                f"{name}: sample {sample}", want["samples"][sample], got["samples"][sample], tolerance
            )


def _compare_sample(where: str, want: dict, got: dict, tolerance: float) -> Iterator[str]:
    for field in ("split", "prompt_length", "prompt_sha256", "continuation_sha256"):
        if want[field] != got[field]:
            yield f"{where}: {field} differs (manifest {want[field]!r}, file {got[field]!r})"
    for kind in KINDS if "tensors" in want and "tensors" in got else ():
        for layer, (a, b) in enumerate(zip(want["tensors"][kind], got["tensors"][kind], strict=True)):
            allowed = tolerance * max(a[1], 1e-6)
            for label, x, y in zip(("mean", "rms", "sketch 1", "sketch 2"), a, b, strict=True):
                if abs(x - y) > allowed:
                    yield (
                        f"{where}: {kind} of layer {layer}: {label} {y:.6g} differs from the manifest's {x:.6g} "
                        f"by more than {allowed:.3g} ({tolerance:g} x RMS)"
                    )


def _dumps(record: dict[str, Any]) -> str:
    """Indented JSON with every list of numbers on one line (a manifest stays readable and diffable)."""
    text = json.dumps(record, indent=1, sort_keys=True)
    return re.sub(r"\[\s+([-+0-9.eE,\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text) + "\n"


def fingerprint(tensor: np.ndarray) -> list[float]:
    """[mean, RMS, sketch 1, sketch 2] of a float16 tensor [H, S, D], in float64.

    A sketch is sum(sign_i * x_i) / sqrt(n) over the n elements, with fixed pseudo-random signs (a hash of the flat
    index): its natural scale is the RMS, and it moves when any value moves (a shifted token, a swapped head,
    slightly different weights), which mean and RMS cannot see. Rounding a few values one float16 unit differently
    moves it by well under 1e-3 of the RMS.
    """
    data = tensor.astype(np.float64).ravel()
    index = np.arange(data.size, dtype=np.uint64)
    sketches = []
    for multiplier in (2654435761, 2246822519):
        signs = (((index * np.uint64(multiplier)) >> np.uint64(15)) & np.uint64(1)).astype(np.float64) * 2 - 1
        sketches.append((data * signs).sum() / np.sqrt(data.size))
    return [float(f"{v:.7g}") for v in (data.mean(), np.sqrt((data**2).mean()), *sketches)]


def _sha(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int32).tobytes()).hexdigest()

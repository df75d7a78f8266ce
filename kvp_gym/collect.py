"""Collecting trace files from a real model.

For each sample: build the task prompt (chat template + answer prefix), let the model continue it greedily for up
to ``future`` tokens (free text uses its real continuation instead), then run one forward pass over prompt +
continuation recording the post-RoPE queries, keys and values of the chosen layers.

Safety: each finished sample is written atomically to its own file in ``OUT.parts/``; the final file is
assembled from them atomically at the end. A killed collection leaves only whole samples behind, and
``resume=True`` continues from them. ``shard=(i, N)`` collects samples i, i+N, i+2N... so that N machines can
share a collection; :func:`kvp_gym.traces.merge_traces` joins the shards into the same content as one run. Under
torchrun the processes split the samples (of the shard) between them, all writing into the same ``OUT.parts/``, and
process 0 assembles ``OUT`` once all are done (:mod:`kvp_gym.distributed_run`): the same content as one process.

Imports kvp_gym.attention, kvp_gym.capture, kvp_gym.distributed_run, kvp_gym.generation, kvp_gym.models,
kvp_gym.tasks, kvp_gym.traces and kvp_gym.version: the whole recording side, nothing of evaluation.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kvp_gym import models
from kvp_gym.attention import AttentionSpec
from kvp_gym.capture import capture_qkv, probe_attention
from kvp_gym.distributed_run import ONE_PROCESS, Processes
from kvp_gym.generation import greedy, sample_seed
from kvp_gym.tasks import encode, get_task, make_sample
from kvp_gym.tasks.text import TEXT_POOLS
from kvp_gym.traces import (
    SPLITS,
    SampleInfo,
    TraceFormatError,
    TraceHeader,
    collection_digest,
    merge_traces,
    open_traces,
    sample_name,
    write_traces,
)
from kvp_gym.version import __version__


@dataclass(frozen=True)
class CollectConfig:
    """What to collect. ``layers=None`` records every layer, ``"global"`` the full-attention layers of a hybrid
    model (Gemma 3: one layer in six; its sliding-window layers hold at most their window, which the evicting
    cache keeps whole), else the listed ones; ``splits`` are the train/val/test fractions;
    ``text`` is the pool of essays and words the prompts draw from (``train`` / ``heldout`` keep training and test
    sets apart; kvp_gym.tasks.text.TEXT_POOLS)."""

    model: str = models.DEFAULT_MODEL
    task: str = "niah_single"
    samples: int = 32
    context: int = 1024
    future: int = 64
    seed: int = 0
    layers: tuple[int, ...] | str | None = None
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15)
    text: str = "all"

    def __post_init__(self):
        get_task(self.task)  # fails early, listing the tasks, on an unknown name
        if self.text not in TEXT_POOLS:
            raise ValueError(f"text must be one of {', '.join(TEXT_POOLS)}, got {self.text!r}")
        if isinstance(self.layers, str) and self.layers != "global":
            raise ValueError(f"layers must be layer ids, 'global' or None (all), got {self.layers!r}")
        if self.samples < 1 or self.context < 1 or self.future < 1:
            raise ValueError("samples, context and future must be positive")
        if len(self.splits) != 3 or min(self.splits) < 0 or abs(sum(self.splits) - 1) > 1e-6:
            raise ValueError(f"splits must be three non-negative fractions summing to 1, got {self.splits}")

    def sample_identity(self) -> dict:
        """The settings that determine a sample's content (its name is derived from them)."""
        identity = {
            "model": self.model,
            "task": self.task,
            "context": self.context,
            "future": self.future,
            "seed": self.seed,
        }
        return identity | self._text_setting()

    def settings(self) -> dict:
        """Every setting, as recorded in the trace header."""
        return {k: v for k, v in asdict(self).items() if k != "text"} | self._text_setting()

    def _text_setting(self) -> dict:
        # Omitted when "all" (the default) so that files collected before the option existed still resume.
        return {} if self.text == "all" else {"text": self.text}

    def split_by_index(self) -> list[str]:
        """The split of every sample index: a seeded permutation cut at the split fractions."""
        order = list(range(self.samples))
        random.Random(self.seed).shuffle(order)
        bounds = np.round(np.cumsum(self.splits) * self.samples).astype(int)
        split = [""] * self.samples
        for rank, index in enumerate(order):
            split[index] = SPLITS[int(np.searchsorted(bounds, rank, side="right"))]
        return split


@dataclass(frozen=True)
class CollectSummary:
    path: Path
    samples: int
    collected: int  # samples produced by this run (the rest were resumed)
    tokens: int
    bytes: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"{self.path}: {self.samples} samples ({self.collected} collected now), {self.tokens} tokens, "
            f"{self.bytes / 2**20:.1f} MiB, {self.seconds:.1f} s"
        )


def collect(
    config: CollectConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    allow_download: bool = False,
    processes: Processes = ONE_PROCESS,
) -> CollectSummary | None:
    """Collect a trace file; see the module docstring. Returns what was written, or None on a process other than 0
    of a torchrun job (``processes``: this process's place in it, :func:`kvp_gym.distributed_run.join`; default a
    single process, so that a caller inside another torchrun job, such as the trainer, collects alone).
    ``allow_download`` lets the hub client fetch a model that is not cached (see :func:`kvp_gym.models.load`)."""
    start = time.perf_counter()
    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    index_of_shard, num_shards = shard
    if not 0 <= index_of_shard < num_shards:
        raise ValueError(f"shard must be i/N with 0 <= i < N, got {index_of_shard}/{num_shards}")
    if not resume and not overwrite and (out.exists() or parts.exists()):
        what = out if out.exists() else f"{parts} (an interrupted collection)"
        raise FileExistsError(f"{what} exists: pass --resume to keep and complete it, or --overwrite to start over")
    processes.wait_for_all()  # every process has looked at the folder before any changes it
    if overwrite and processes.writes_result:
        shutil.rmtree(parts, ignore_errors=True)
        out.unlink(missing_ok=True)
    processes.wait_for_all()

    complete = resume and processes.world == 1 and out.exists() and not parts.exists() and _complete(config, out, shard)
    if complete:  # already complete: only checked, no model to load
        samples, tokens = complete
        return CollectSummary(out, samples, 0, tokens, out.stat().st_size, time.perf_counter() - start)

    model, tokenizer = models.load(config.model, allow_download=allow_download)
    geometry = models.geometry(model)
    attention, rotary = probe_attention(model)  # refuses attention the importance cannot reproduce
    layers = _layers(config, attention)
    settings = _settings(config, layers)
    header = TraceHeader(
        model=config.model,
        geometry=geometry,
        layers=layers,
        collection=(settings,),
        kvp_gym_version=__version__,
        attention=attention,
        rotary=rotary,
    )

    digest = collection_digest(config.sample_identity())
    own_index, own_count = processes.share(shard)
    wanted = {sample_name(config.task, digest, i): i for i in range(own_index, config.samples, own_count)}
    done = _names_in(out, header) if out.exists() else set()
    parts.mkdir(parents=True, exist_ok=True)
    for part in sorted(parts.glob("*.h5")):
        done |= _names_in(part, header)

    split_by_index = config.split_by_index()
    todo = [name for name in wanted if name not in done]
    where = f" (process {processes.rank} of {processes.world})" if processes.world > 1 else ""
    try:
        for name in tqdm(todo, desc=f"collect {config.task}{where}", unit="sample", disable=not progress):
            index = wanted[name]
            info, tensors = _record(model, tokenizer, config, layers, name, index, split_by_index[index])
            write_traces(parts / f"{name}.h5", header, [(info, tensors)])
    finally:
        # Nothing to resume: do not leave a folder that blocks the next run (one process: others may still write).
        if processes.world == 1 and not any(parts.iterdir()):
            parts.rmdir()

    collected = sum(processes.gather(len(todo)))  # waits for every process's share
    if not processes.writes_result:
        return None
    shard_names = {sample_name(config.task, digest, i) for i in range(index_of_shard, config.samples, num_shards)}
    _assemble(out, parts, header, shard_names)
    with open_traces(out) as trace:
        tokens = sum(s.num_tokens for s in trace.samples.values())
        total = len(trace.samples)
    return CollectSummary(
        path=out,
        samples=total,
        collected=collected,
        tokens=tokens,
        bytes=out.stat().st_size,
        seconds=time.perf_counter() - start,
    )


def _layers(config: CollectConfig, attention: tuple[AttentionSpec, ...]) -> tuple[int, ...]:
    """The layer ids ``config.layers`` names, for a model whose layers compute ``attention`` (one spec a layer)."""
    count = len(attention)
    if config.layers is None:
        layers = tuple(range(count))
    elif config.layers == "global":
        layers = tuple(i for i, spec in enumerate(attention) if not spec.sliding_window)
    else:
        layers = tuple(config.layers)
    if not layers or not all(0 <= layer < count for layer in layers):
        raise ValueError(f"layers must lie in [0, {count}) for {config.model}, got {list(layers)}")
    return layers


def _settings(config: CollectConfig, layers: tuple[int, ...]) -> dict:
    """The collection settings a trace header records."""
    return {**config.settings(), "layers": list(layers), "splits": list(config.splits)}


def _complete(config: CollectConfig, out: Path, shard: tuple[int, int]) -> tuple[int, int] | None:
    """(samples, tokens) of ``out`` when it was collected with ``config``'s settings and already holds every sample
    of ``shard``, read from its header alone; else None (the full path loads the model, then completes the file or
    says what differs)."""
    with open_traces(out) as trace:
        header = trace.header
        if header.model != config.model or len(header.attention) != header.geometry.num_layers:
            return None
        try:
            layers = _layers(config, header.attention)
        except ValueError:
            return None
        digest = collection_digest(config.sample_identity())
        wanted = {sample_name(config.task, digest, i) for i in range(shard[0], config.samples, shard[1])}
        if header.collection != (_settings(config, layers),) or not wanted <= set(trace.samples):
            return None
        return len(trace.samples), sum(s.num_tokens for s in trace.samples.values())


def _assemble(out: Path, parts: Path, header: TraceHeader, names: set[str]) -> None:
    """Join ``out`` (if there) and the sample files in ``parts`` into ``out``, which must then hold ``names``; remove
    ``parts``. FileNotFoundError naming the samples missing (under torchrun: a process wrote elsewhere)."""
    sources = [out] if out.exists() else []
    found = _names_in(out, header) if sources else set()
    for part in sorted(parts.glob("*.h5")) if parts.is_dir() else []:
        found |= _names_in(part, header)
        sources.append(part)
    if missing := sorted(names - found):
        raise FileNotFoundError(
            f"{parts}: {len(missing)} samples missing, e.g. {missing[0]} (under torchrun every process must write to "
            "a folder they all share)"
        )
    if sources != [out]:  # else the file is already complete: nothing to assemble
        merge_traces(out, sources)
    shutil.rmtree(parts, ignore_errors=True)


def _record(model, tokenizer, config: CollectConfig, layers: tuple[int, ...], name: str, index: int, split: str):
    """Build sample ``index``, continue it, and record q/k/v over prompt + continuation.

    Returns (info, tensors) for :func:`write_traces`: ``tensors[layer] = (queries [H_q, S, D], keys [H_kv, S, D],
    values [H_kv, S, D])`` as float16 arrays.
    """
    task = get_task(config.task)
    sample = make_sample(task, tokenizer, config.context, sample_seed(config.seed, index), config.text)
    encoded = encode(tokenizer, sample)
    if sample.chat:
        future, source = greedy(model, encoded.ids, config.future), "greedy"
    else:
        future, source = encoded.continuation_ids[: config.future], "text"
    tokens = encoded.ids + future
    with torch.inference_mode(), capture_qkv(model, layers) as captured:
        model(torch.tensor([tokens]), use_cache=False, logits_to_keep=1)  # not the [S, vocab] logits: 17 GB at 16k
    metadata = dict(sample.metadata)
    if task.has_answers:
        metadata["full_cache_score"] = task.score(tokenizer.decode(future, skip_special_tokens=True), sample.answers)
    info = SampleInfo(
        name=name,
        index=index,
        task=config.task,
        split=split,
        prompt_length=len(encoded.ids),
        tokens=np.asarray(tokens, np.int32),
        answers=sample.answers,
        needle_spans=np.asarray(encoded.needle_spans, np.int32),
        metadata=metadata,
        future_source=source,
    )
    return info, {layer: [t[0].numpy() for t in captured[layer]] for layer in layers}


def _names_in(path: Path, header: TraceHeader) -> set[str]:
    """Sample names already in ``path``, which must come from a collection with the same settings."""
    with open_traces(path) as trace:
        problem = header.compatible_with(trace.header)
        if problem is None and trace.header.collection != header.collection:
            problem = (
                f"collection settings differ: found {list(trace.header.collection)}, now {list(header.collection)}"
            )
        if problem:
            raise TraceFormatError(path, "/", f"cannot resume into this file: {problem}")
        return set(trace.samples)

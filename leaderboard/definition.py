"""Benchmark definitions: a frozen TOML file (leaderboard/benchmarks/<id>.toml) read into one part per model.

A definition fixes, for each model it covers, the tasks, prompt lengths, sample counts, seeds, protocol and budgets of
the trace-level evaluation and the settings of the end-to-end one; the text pool and the held-out tasks are shared.
Two layouts:

- one model (bench-v0): ``model = "..."`` at the top, then ``[trace_level]`` and ``[end_to_end]``;
- several models (bench-v1): a ``[models.<model>]`` table per model (its optional ``title``) with its own
  ``[models.<model>.trace_level]`` and ``[models.<model>.end_to_end]``; the file's order is the board's order. A
  model's trace set may record some layers only (``trace_level.layers``: ``"global"`` for a hybrid model's
  full-attention layers, or a list of layer ids).

Every model's settings make one :class:`Benchmark` (a *part*): what is prepared, submitted to and validated, with its
own manifest (``<id>.manifest.json`` for one model, ``<id>.<model>.manifest.json`` for each of several) and its own
trace folder. :func:`load_benchmark` reads one part (naming the model where there are several), :func:`benchmark_parts`
all of them. A definition that is not what it should be is a :class:`BenchmarkError` naming the file and the field.

Imports kvp_gym.storage; kvp_gym.evaluation.trace_level (the protocols and budgets) when a definition is read.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvp_gym.storage import cache_dir

BENCHMARKS = Path(__file__).parent / "benchmarks"
# The fields of a model's sections in a multi-model definition (a misspelt one is refused, not ignored).
TRACE_LEVEL_FIELDS = (
    "tasks", "contexts", "samples", "future", "seed", "protocol", "budgets", "bootstrap", "bootstrap_seed", "layers",
)  # fmt: skip
END_TO_END_FIELDS = ("tasks", "context", "budgets", "samples", "essays", "continuation", "seed")


class BenchmarkError(ValueError):
    """A benchmark definition, trace set or manifest that is not what it should be."""


@dataclass(frozen=True)
class TraceLevel:
    """The trace-level settings of one model: ``layers`` None records every layer, ``"global"`` a hybrid model's
    full-attention layers, else the listed layer ids (kvp_gym.collect.CollectConfig)."""

    tasks: tuple[str, ...]
    contexts: tuple[int, ...]
    samples: int
    future: int
    seed: int
    protocol: str
    budgets: tuple[int, ...]
    bootstrap: int
    bootstrap_seed: int
    layers: str | tuple[int, ...] | None = None


@dataclass(frozen=True)
class EndToEnd:
    tasks: tuple[str, ...]
    context: int
    budgets: tuple[int, ...]
    samples: int
    essays: int
    continuation: int
    seed: int


@dataclass(frozen=True)
class Benchmark:
    """One model's part of a parsed benchmark definition; ``path`` is its TOML file, the manifest lies beside it.
    ``models`` lists every model of the definition (just ``model`` for a single-model benchmark)."""

    id: str
    title: str
    model: str
    text: str
    held_out_tasks: tuple[str, ...]
    trace_level: TraceLevel
    end_to_end: EndToEnd
    path: Path
    models: tuple[str, ...] = ()

    @property
    def multi_model(self) -> bool:
        """Whether the definition covers several models (each then has its own manifest, folder and board)."""
        return len(self.models) > 1

    @property
    def label(self) -> str:
        """How messages name this part: ``bench-v0``, or ``bench-v1/gemma3-270m`` for one of several models."""
        return f"{self.id}/{self.model}" if self.multi_model else self.id

    @property
    def arguments(self) -> str:
        """The command-line arguments that name this part: ``bench-v0``, or ``bench-v1 --model gemma3-270m``."""
        return f"{self.id} --model {self.model}" if self.multi_model else self.id

    @property
    def entry_fields(self) -> dict[str, str]:
        """How an entry names this part (its ``benchmark`` object, with the manifest's hash): the id, and the model
        where the benchmark covers several (a bench-v0 entry holds the id alone, as before models were named)."""
        return {"id": self.id, "model": self.model} if self.multi_model else {"id": self.id}

    @property
    def manifest_path(self) -> Path:
        name = f"{self.id}.{self.model}" if self.multi_model else self.id
        return self.path.with_name(f"{name}.manifest.json")

    def trace_files(self) -> list[tuple[str, int, str]]:
        """(task, context, file name) of every trace file of the set, in evaluation order."""
        level = self.trace_level
        return [(task, context, f"{task}-{context}.h5") for context in level.contexts for task in level.tasks]

    def collect_config(self, task: str, context: int):
        """The :class:`kvp_gym.collect.CollectConfig` of one trace file (all samples in the test split)."""
        from kvp_gym.collect import CollectConfig

        level = self.trace_level
        return CollectConfig(
            model=self.model,
            task=task,
            samples=level.samples,
            context=context,
            future=level.future,
            seed=level.seed,
            layers=level.layers,
            splits=(0.0, 0.0, 1.0),
            text=self.text,
        )

    def e2e_config(self, policies: tuple[str, ...]):
        """The :class:`kvp_gym.evaluation.end_to_end.E2EConfig` of the end-to-end run of ``policies`` (specs)."""
        from kvp_gym.evaluation.end_to_end import E2EConfig

        e2e = self.end_to_end
        return E2EConfig(
            model=self.model,
            tasks=e2e.tasks,
            context=e2e.context,
            budgets=e2e.budgets,
            policies=policies,
            samples=e2e.samples,
            essays=e2e.essays,
            continuation=e2e.continuation,
            seed=e2e.seed,
            text=self.text,
        )

    def default_folder(self) -> Path:
        """Where :func:`kvp_gym_leaderboard.benchmark.prepare` puts the trace set unless told otherwise: the user
        cache (``benchmarks/<id>``, and ``/<model>`` below it for one of several models)."""
        return self.trace_folder(None)

    def trace_folder(self, root: Path | None) -> Path:
        """This part's trace folder under ``root`` (a ``--dir`` or ``--traces``; None: the user cache's
        ``benchmarks/<id>``): ``root`` itself for a single-model benchmark, ``root/<model>`` for one of several."""
        root = Path(root) if root is not None else cache_dir() / "benchmarks" / self.id
        return root / self.model if self.multi_model else root


def benchmark_file(name: str | Path) -> Path:
    """The TOML file of a benchmark id (``bench-v0``, from leaderboard/benchmarks/) or the given ``.toml`` path."""
    path = Path(name)
    if path.suffix == ".toml":
        return path
    path = BENCHMARKS / f"{name}.toml"
    if not path.exists():
        known = sorted(p.stem for p in BENCHMARKS.glob("*.toml"))
        raise BenchmarkError(f"unknown benchmark {str(name)!r}; known: {', '.join(known)}")
    return path


def benchmark_parts(name: str | Path) -> list[Benchmark]:
    """Every model's part of a benchmark (id or TOML path), in the definition's order (one for bench-v0)."""
    path = benchmark_file(name)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise BenchmarkError(f"{path}: no such benchmark file") from None
    except tomllib.TOMLDecodeError as err:
        raise BenchmarkError(f"{path}: not valid TOML: {err}") from None
    if "models" in raw and "model" in raw:
        raise BenchmarkError(f"{path}: give either model (one model) or [models.<model>] sections, not both")
    if "models" not in raw:
        parts = [_part(raw, raw, _field(raw, "model", str, path, ""), raw.get("title"), path, strict=False)]
    else:
        models = raw["models"]
        if not isinstance(models, dict) or not models or not all(isinstance(s, dict) for s in models.values()):
            raise BenchmarkError(f"{path}: models: expected one [models.<model>] table per model")
        parts = []
        for model, section in models.items():
            unknown = sorted(set(section) - {"title", "trace_level", "end_to_end"})
            if unknown:
                raise BenchmarkError(f"{path}: [models.{model}]: unknown field(s) {', '.join(unknown)}")
            parts.append(_part(raw, section, model, section.get("title", raw.get("title")), path, strict=True))
    names = tuple(part.model for part in parts)
    return [dataclasses.replace(part, models=names) for part in parts]


def load_benchmark(name: str | Path, model: str | None = None) -> Benchmark:
    """A benchmark's part for ``model`` (id ``bench-v0``, from leaderboard/benchmarks/, or the path of its TOML
    file). ``model`` may be left out where the benchmark covers one model; BenchmarkError where it covers several,
    or not that one."""
    parts = benchmark_parts(name)
    if model is None and len(parts) > 1:
        raise BenchmarkError(
            f"{parts[0].id} covers {len(parts)} models ({', '.join(parts[0].models)}): name one (--model)"
        )
    found = [part for part in parts if model in (None, part.model)]
    if not found:
        raise BenchmarkError(f"{parts[0].id} has no model {model!r}; its models: {', '.join(parts[0].models)}")
    return found[0]


def _field(section: dict[str, Any], key: str, kind: type | tuple[type], path: Path, where: str) -> Any:
    """``section[key]`` as ``kind`` (int or str, or ``(int,)`` / ``(str,)``: a list of them, as a tuple); a
    BenchmarkError naming the file, the section and the field when it is missing or of another type."""
    place = f" in [{where}]" if where else ""
    if key not in section:
        raise BenchmarkError(f"{path}: missing field {key!r}{place}")
    value = section[key]
    try:
        if not isinstance(kind, tuple):
            return _convert(value, kind)
        if not isinstance(value, list):
            raise TypeError
        return tuple(_convert(item, kind[0]) for item in value)
    except (TypeError, ValueError):
        names = {int: "integer", str: "string"}
        expected = (
            f"a list of {names[kind[0]]}s" if isinstance(kind, tuple) else f"a{'n' * (kind is int)} {names[kind]}"
        )
        raise BenchmarkError(f"{path}: field {key!r}{place}: expected {expected}, got {value!r}") from None


def _convert(value: Any, kind: type) -> Any:
    """``value`` as an int (a TOML integer, or a number or numeric string, as before types were checked) or a str (a
    TOML string only); TypeError or ValueError otherwise."""
    if (kind is str and not isinstance(value, str)) or (kind is int and isinstance(value, bool)):
        raise TypeError
    return kind(value)


def _part(
    raw: dict[str, Any], section: dict[str, Any], model: str, title: str | None, path: Path, strict: bool
) -> Benchmark:
    """One model's :class:`Benchmark` from the definition's shared fields (``raw``) and its own ``section`` (its
    ``trace_level`` and ``end_to_end`` tables); ``strict`` refuses unknown fields in those tables."""
    prefix = f"models.{model}." if strict else ""
    tables = {}
    for name, fields in (("trace_level", TRACE_LEVEL_FIELDS), ("end_to_end", END_TO_END_FIELDS)):
        table = section.get(name)
        if not isinstance(table, dict):
            raise BenchmarkError(f"{path}: missing field {name!r}" + (f" in [models.{model}]" if strict else ""))
        unknown = sorted(set(table) - set(fields)) if strict else []
        if unknown:
            raise BenchmarkError(f"{path}: [{prefix}{name}]: unknown field(s) {', '.join(unknown)}")
        tables[name] = table
    level, e2e = tables["trace_level"], tables["end_to_end"]
    where, e2e_where = f"{prefix}trace_level", f"{prefix}end_to_end"
    benchmark = Benchmark(
        id=_field(raw, "id", str, path, ""),
        title=_field({} if title is None else {"title": title}, "title", str, path, ""),
        model=model,
        text=_field(raw, "text", str, path, ""),
        held_out_tasks=tuple(raw.get("held_out_tasks", ())),
        trace_level=TraceLevel(
            tasks=_field(level, "tasks", (str,), path, where),
            contexts=_field(level, "contexts", (int,), path, where),
            samples=_field(level, "samples", int, path, where),
            future=_field(level, "future", int, path, where),
            seed=_field(level, "seed", int, path, where),
            protocol=_field(level, "protocol", str, path, where),
            budgets=_field(level, "budgets", (int,), path, where),
            bootstrap=_field(level, "bootstrap", int, path, where),
            bootstrap_seed=_field(level, "bootstrap_seed", int, path, where),
            layers=_layers(level.get("layers"), path, where),
        ),
        end_to_end=EndToEnd(
            tasks=_field(e2e, "tasks", (str,), path, e2e_where),
            context=_field(e2e, "context", int, path, e2e_where),
            budgets=_field(e2e, "budgets", (int,), path, e2e_where),
            samples=_field(e2e, "samples", int, path, e2e_where),
            essays=_field(e2e, "essays", int, path, e2e_where),
            continuation=_field(e2e, "continuation", int, path, e2e_where),
            seed=_field(e2e, "seed", int, path, e2e_where),
        ),
        path=path,
    )
    if benchmark.id != path.stem:
        raise BenchmarkError(f"{path}: id {benchmark.id!r} differs from the file name {path.stem!r}")
    from kvp_gym.evaluation.trace_level import ABSOLUTE_BUDGETS, PROTOCOLS

    level = benchmark.trace_level
    if level.protocol not in PROTOCOLS:
        raise BenchmarkError(f"{path}: {where}.protocol must be one of {sorted(PROTOCOLS)}")
    protected = PROTOCOLS[level.protocol].sinks + PROTOCOLS[level.protocol].recent
    if not set(level.budgets) <= set(ABSOLUTE_BUDGETS) or min(level.budgets) <= protected:
        raise BenchmarkError(
            f"{path}: {where}.budgets must be among {list(ABSOLUTE_BUDGETS)} and above the {protected} tokens "
            f"the {level.protocol} protocol protects"
        )
    return benchmark


def _layers(value: Any, path: Path, where: str) -> str | tuple[int, ...] | None:
    """A trace level's ``layers``: absent (every layer), ``"global"`` or a list of layer ids."""
    if value is None or value == "global":
        return value
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    expected = 'expected "global" or a list of layer ids'
    raise BenchmarkError(f"{path}: field 'layers' in [{where}]: {expected}, got {value!r}")

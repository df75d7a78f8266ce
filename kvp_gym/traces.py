"""Trace files, format v1: post-RoPE queries, keys and values of a real model, stored in HDF5.

Layout (docs/trace-format.md has the full specification)::

    /                          attrs: format_version, model, geometry, layers, dtype, kvp_gym_version, collection,
                               attention (each layer's scale / sliding window / soft-cap, and the RoPE frequencies)
    /samples/<name>/           attrs: index, task, split, prompt_length, answers, metadata, future_source
        tokens                 int32 [S]        token ids: prompt then future
        needle_spans           int32 [N, 2]     token spans [start, end) of the needles inside the prompt
        layers/<l>/queries     float16 [H_q, S, D]   chunks of (1, S, D): one head is one chunk
        layers/<l>/keys        float16 [H_kv, S, D]
        layers/<l>/values      float16 [H_kv, S, D]

``open_traces(path)`` validates the file when it opens it and every tensor when it reads it; anything wrong is
a :class:`TraceFormatError` naming the file, the path inside it and what was expected.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from kvp_gym.attention import AttentionSpec, Rotary, rotary_from_json, spec_from_json
from kvp_gym.storage import atomic_path

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
STORED_DTYPE = np.float16

_GEOMETRY_ATTRS = (
    "num_layers",
    "num_query_heads",
    "num_kv_heads",
    "head_dim",
    "rope",
    "sliding_window",
    "vocab_size",
)
_FILE_ATTRS = (
    "format_version",
    "model",
    *_GEOMETRY_ATTRS,
    "kv_head_of_query",
    "layers",
    "dtype",
    "kvp_gym_version",
    "collection",
    "attention",
)
_SAMPLE_ATTRS = ("index", "task", "split", "prompt_length", "answers", "metadata", "future_source")
_TENSORS = ("queries", "keys", "values")


class TraceFormatError(ValueError):
    """A trace file that is unreadable or disagrees with format v1.

    Attributes:
        file: the trace file.
        where: the HDF5 path of the offending attribute, group or dataset ("/" for the file itself).
    """

    def __init__(self, file: str | os.PathLike, where: str, message: str):
        self.file, self.where = str(file), where
        super().__init__(f"{file}: {where}: {message}")


@dataclass(frozen=True)
class ModelGeometry:
    """Attention geometry of the recorded model.

    ``kv_head_of_query[h]`` is the KV head that query head ``h`` attends with (its GQA group).
    ``rope`` is the model's RoPE configuration as JSON; ``sliding_window`` is 0 for full attention.
    """

    num_layers: int
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    kv_head_of_query: tuple[int, ...]
    rope: str
    sliding_window: int
    vocab_size: int

    def query_heads_of(self, kv_head: int) -> list[int]:
        """The query heads in the GQA group of ``kv_head``, ascending."""
        return [h for h, g in enumerate(self.kv_head_of_query) if g == kv_head]


@dataclass(frozen=True)
class TraceHeader:
    """File-level metadata: which model, which layers, how the trace was made."""

    model: str
    geometry: ModelGeometry
    layers: tuple[int, ...]
    collection: tuple[dict, ...]  # the settings of every collection run merged into this file
    kvp_gym_version: str
    format_version: int = FORMAT_VERSION
    dtype: str = "float16"
    # One spec per model layer (empty when given = every layer standard: full causal, 1/sqrt(head_dim), no
    # soft-cap), and the model's RoPE (None when unknown). Files written before these were recorded read as the
    # defaults.
    attention: tuple[AttentionSpec, ...] = ()
    rotary: Rotary | None = None

    def __post_init__(self):
        if not self.attention:
            standard = AttentionSpec.standard(self.geometry.head_dim)
            object.__setattr__(self, "attention", (standard,) * self.geometry.num_layers)

    def attention_of(self, layer: int) -> AttentionSpec:
        """What layer ``layer``'s attention computes (see :class:`kvp_gym.attention.AttentionSpec`)."""
        return self.attention[layer]

    def compatible_with(self, other: TraceHeader) -> str | None:
        """None if samples of ``other`` may live in the same file as ours, else what differs."""
        for name in ("format_version", "model", "geometry", "layers", "dtype", "attention", "rotary"):
            if getattr(self, name) != getattr(other, name):
                return f"{name} differs ({getattr(self, name)!r} vs {getattr(other, name)!r})"
        return None


@dataclass(frozen=True)
class SampleInfo:
    """One recorded text: its tokens and task metadata (no tensors).

    ``needle_spans`` are token spans [start, end) inside the prompt; ``future_source`` is ``"greedy"`` (the
    model's own greedy continuation) or ``"text"`` (the text's real continuation).
    """

    name: str
    index: int
    task: str
    split: str
    prompt_length: int
    tokens: np.ndarray  # int32 [S]
    answers: tuple[str, ...] = ()
    needle_spans: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int32))  # int32 [N, 2]
    metadata: dict = field(default_factory=dict)
    future_source: str = "greedy"

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class HeadTrace:
    """What one KV head of one layer saw on one sample.

    queries: float16 [G, S, D], the post-RoPE queries of the G query heads in the head's GQA group.
    keys, values: float16 [S, D], post-RoPE keys and values.
    positions: int64 [S], the tokens' positions in the sequence (RoPE positions).
    prompt_length: n; tokens n..S-1 are the future.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    prompt_length: int


def sample_name(task: str, collection_digest: str, index: int) -> str:
    """Deterministic sample group name, unique across tasks and collection settings."""
    return f"{task}-{collection_digest}-{index:06d}"


def collection_digest(settings: Mapping) -> str:
    """Short hash of the collection settings that determine a sample's content."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


class TraceFile:
    """A validated, open trace file. Use as a context manager or call :meth:`close`.

    Attributes:
        path: the file.
        header: file-level metadata.
        samples: every sample's metadata, by name, in name order.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise TraceFormatError(self.path, "/", "no such file")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as err:
            raise TraceFormatError(self.path, "/", f"not a readable HDF5 file (truncated or corrupt?): {err}") from None
        # Resolving an HDF5 path costs ~40 us, as much as reading a head: keep recently used datasets open.
        self._node = functools.lru_cache(maxsize=4096)(self._h5.__getitem__)
        try:
            self.header = self._read_header()
            self.samples: dict[str, SampleInfo] = {}
            for name in self._group("samples"):
                self.samples[name] = self._read_sample(name)
        except BaseException:
            self._h5.close()
            raise

    # -- reading ----------------------------------------------------------------------------------------------
    def split(self, split: str) -> list[SampleInfo]:
        """The samples of one split (``train``, ``val`` or ``test``), in name order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return [s for s in self.samples.values() if s.split == split]

    def head(self, sample: SampleInfo | str, layer: int, kv_head: int) -> HeadTrace:
        """Read one KV head of one layer of one sample: only that head's chunks are read from disk."""
        info = self.samples[sample] if isinstance(sample, str) else sample
        geometry = self.header.geometry
        if layer not in self.header.layers:
            raise ValueError(
                f"{self.path}: layer {layer} was not recorded; recorded layers: {list(self.header.layers)}"
            )
        if not 0 <= kv_head < geometry.num_kv_heads:
            raise ValueError(f"{self.path}: kv_head {kv_head} out of range [0, {geometry.num_kv_heads})")
        base = f"samples/{info.name}/layers/{layer}"
        group = geometry.query_heads_of(kv_head)
        queries = self._read(f"{base}/queries", slice(group[0], group[-1] + 1) if _contiguous(group) else group)
        keys = self._read(f"{base}/keys", kv_head)
        values = self._read(f"{base}/values", kv_head)
        return HeadTrace(
            queries=torch.from_numpy(queries),
            keys=torch.from_numpy(keys),
            values=torch.from_numpy(values),
            positions=torch.arange(info.num_tokens),
            prompt_length=info.prompt_length,
        )

    def check(self) -> Iterator[TraceFormatError]:
        """Read every tensor of every sample; yield each problem found (nothing if the file is sound)."""
        for info in self.samples.values():
            if not 0 <= info.tokens.min() <= info.tokens.max() < self.header.geometry.vocab_size:
                yield TraceFormatError(
                    self.path,
                    f"samples/{info.name}/tokens",
                    f"token ids must lie in [0, {self.header.geometry.vocab_size})",
                )
            for layer in self.header.layers:
                for tensor in _TENSORS:
                    try:
                        self._read(f"samples/{info.name}/layers/{layer}/{tensor}", slice(None))
                    except TraceFormatError as err:
                        yield err

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> TraceFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TraceFile({str(self.path)!r}, model={self.header.model!r}, samples={len(self.samples)})"

    # -- validation -------------------------------------------------------------------------------------------
    def _read(self, where: str, index) -> np.ndarray:
        try:
            data = self._node(where)[index]
        except (OSError, KeyError) as err:
            raise TraceFormatError(self.path, where, f"unreadable data (truncated or corrupt?): {err}") from None
        if not _all_finite(data):
            raise TraceFormatError(self.path, where, "contains NaN or Inf; expected finite float16 values")
        return data

    def _group(self, where: str) -> h5py.Group:
        node = self._h5.get(where)
        if not isinstance(node, h5py.Group):
            raise TraceFormatError(self.path, where, "missing group")
        return node

    def _attr(self, node: h5py.HLObject, name: str, kind: type):
        where = _attr_path(node, name)
        if name not in node.attrs:
            raise TraceFormatError(self.path, where, f"missing attribute (expected {kind.__name__})")
        value = node.attrs[name]
        if kind is str:
            value = value.decode() if isinstance(value, bytes) else value
            if not isinstance(value, str):
                raise TraceFormatError(self.path, where, f"expected a string, found {value!r}")
            return value
        if kind is int:
            if not np.issubdtype(np.asarray(value).dtype, np.integer) or np.ndim(value) != 0:
                raise TraceFormatError(self.path, where, f"expected an integer, found {value!r}")
            return int(value)
        if kind is tuple:
            value = np.asarray(value)
            if value.ndim != 1 or not np.issubdtype(value.dtype, np.integer):
                raise TraceFormatError(self.path, where, f"expected a 1-D integer array, found {value!r}")
            return tuple(int(v) for v in value)
        raise TypeError(kind)

    def _json_attr(self, node: h5py.HLObject, name: str):
        text = self._attr(node, name, str)
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise TraceFormatError(self.path, _attr_path(node, name), f"invalid JSON: {err}") from None

    def _read_header(self) -> TraceHeader:
        root = self._h5
        version = self._attr(root, "format_version", int)
        if version != FORMAT_VERSION:
            raise TraceFormatError(
                self.path,
                "/@format_version",
                f"unknown format version {version}; this kvp-gym reads version {FORMAT_VERSION}",
            )
        dtype = self._attr(root, "dtype", str)
        if dtype != "float16":
            raise TraceFormatError(self.path, "/@dtype", f"expected 'float16', found {dtype!r}")
        geometry = ModelGeometry(
            **{name: self._attr(root, name, str if name == "rope" else int) for name in _GEOMETRY_ATTRS},
            kv_head_of_query=self._attr(root, "kv_head_of_query", tuple),
        )
        if len(geometry.kv_head_of_query) != geometry.num_query_heads or not all(
            0 <= g < geometry.num_kv_heads for g in geometry.kv_head_of_query
        ):
            raise TraceFormatError(
                self.path,
                "/@kv_head_of_query",
                f"expected {geometry.num_query_heads} KV head ids in [0, {geometry.num_kv_heads})",
            )
        layers = self._attr(root, "layers", tuple)
        if not layers or not all(0 <= layer < geometry.num_layers for layer in layers):
            raise TraceFormatError(self.path, "/@layers", f"expected layer ids in [0, {geometry.num_layers})")
        collection = self._json_attr(root, "collection")
        if not isinstance(collection, list):
            raise TraceFormatError(self.path, "/@collection", "expected a JSON list of collection settings")
        attention, rotary = self._read_attention(geometry)
        return TraceHeader(
            model=self._attr(root, "model", str),
            geometry=geometry,
            layers=layers,
            collection=tuple(collection),
            kvp_gym_version=self._attr(root, "kvp_gym_version", str),
            format_version=version,
            dtype=dtype,
            attention=attention,
            rotary=rotary,
        )

    def _read_attention(self, geometry: ModelGeometry) -> tuple[tuple[AttentionSpec, ...], Rotary | None]:
        """The ``attention`` attribute; files written before it existed read as standard attention (refused when
        their geometry says the model used a sliding window, which they did not record per layer)."""
        if "attention" not in self._h5.attrs:
            if geometry.sliding_window:
                raise TraceFormatError(
                    self.path,
                    "/@attention",
                    "missing; this file comes from a sliding-window model but does not record which layers slide: "
                    "collect it again with this kvp-gym",
                )
            return (), _default_rotary(geometry)
        data = self._json_attr(self._h5, "attention")
        try:
            if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
                raise ValueError("expected {'layers': [...], 'rotary': ...}")
            if len(data["layers"]) != geometry.num_layers:
                raise ValueError(f"expected {geometry.num_layers} layer specs, found {len(data['layers'])}")
            specs = tuple(spec_from_json(spec, f"layer {i}") for i, spec in enumerate(data["layers"]))
            rotary = rotary_from_json(data.get("rotary"), "rotary")
        except ValueError as err:
            raise TraceFormatError(self.path, "/@attention", str(err)) from None
        return specs, rotary

    def _read_sample(self, name: str) -> SampleInfo:
        group = self._group(f"samples/{name}")
        where = f"samples/{name}"
        tokens = self._dataset(f"{where}/tokens", np.integer)
        if tokens.ndim != 1 or len(tokens) == 0:
            raise TraceFormatError(
                self.path, f"{where}/tokens", f"expected a non-empty 1-D array, found shape {tokens.shape}"
            )
        num_tokens = len(tokens)
        prompt_length = self._attr(group, "prompt_length", int)
        if not 0 < prompt_length <= num_tokens:
            raise TraceFormatError(
                self.path,
                f"{where}/@prompt_length",
                f"expected 0 < prompt_length <= {num_tokens} tokens, found {prompt_length}",
            )
        split = self._attr(group, "split", str)
        if split not in SPLITS:
            raise TraceFormatError(self.path, f"{where}/@split", f"expected one of {SPLITS}, found {split!r}")
        spans = self._dataset(f"{where}/needle_spans", np.integer)
        spans_ok = (
            spans.ndim == 2
            and spans.shape[1] == 2
            and np.all((spans[:, 0] >= 0) & (spans[:, 0] < spans[:, 1]) & (spans[:, 1] <= prompt_length))
        )
        if not spans_ok:
            raise TraceFormatError(
                self.path,
                f"{where}/needle_spans",
                f"expected [N, 2] spans with 0 <= start < end <= prompt_length ({prompt_length})",
            )
        geometry = self.header.geometry
        for layer in self.header.layers:
            for tensor, heads in zip(
                _TENSORS,
                (geometry.num_query_heads, geometry.num_kv_heads, geometry.num_kv_heads),
                strict=True,
            ):
                path = f"{where}/layers/{layer}/{tensor}"
                node = self._h5.get(path)
                if not isinstance(node, h5py.Dataset):
                    raise TraceFormatError(self.path, path, "missing dataset")
                expected = (heads, num_tokens, geometry.head_dim)
                if node.shape != expected or node.dtype != STORED_DTYPE:
                    raise TraceFormatError(
                        self.path,
                        path,
                        f"expected float16 {list(expected)} "
                        f"[heads, tokens, head_dim], found {node.dtype} {list(node.shape)}",
                    )
        answers = self._json_attr(group, "answers")
        metadata = self._json_attr(group, "metadata")
        return SampleInfo(
            name=name,
            index=self._attr(group, "index", int),
            task=self._attr(group, "task", str),
            split=split,
            prompt_length=prompt_length,
            tokens=tokens.astype(np.int32),
            answers=tuple(answers),
            needle_spans=spans.astype(np.int32),
            metadata=metadata,
            future_source=self._attr(group, "future_source", str),
        )

    def _dataset(self, where: str, kind: type) -> np.ndarray:
        node = self._h5.get(where)
        if not isinstance(node, h5py.Dataset):
            raise TraceFormatError(self.path, where, "missing dataset")
        if not np.issubdtype(node.dtype, kind):
            raise TraceFormatError(self.path, where, f"expected {kind.__name__} values, found {node.dtype}")
        try:
            return node[()]
        except OSError as err:
            raise TraceFormatError(self.path, where, f"unreadable data (truncated or corrupt?): {err}") from None


def open_traces(path: str | os.PathLike) -> TraceFile:
    """Open and validate a trace file. Raises :class:`TraceFormatError` if it is unreadable or malformed."""
    return TraceFile(path)


def open_compatible(paths: Sequence[str | os.PathLike]) -> list[TraceFile]:
    """Open several trace files that must share model, geometry and recorded layers (closed again on error)."""
    if not paths:
        raise ValueError("no trace files given")
    opened: list[TraceFile] = []
    try:
        for path in paths:
            opened.append(open_traces(path))
            problem = opened[0].header.compatible_with(opened[-1].header)
            if problem:
                raise TraceFormatError(path, "/", f"cannot be used with {opened[0].path}: {problem}")
    except BaseException:
        for trace in opened:
            trace.close()
        raise
    return opened


# -- writing ------------------------------------------------------------------------------------------------------
def write_traces(
    path: str | os.PathLike,
    header: TraceHeader,
    samples: Iterable[tuple[SampleInfo, Mapping[int, Sequence[np.ndarray]]]],
) -> None:
    """Write a trace file atomically (temp file + rename).

    Args:
        path: the file to create (replaced if it exists).
        header: file-level metadata.
        samples: (info, tensors) pairs; ``tensors[layer] = (queries [H_q, S, D], keys [H_kv, S, D],
            values [H_kv, S, D])`` for every layer in ``header.layers``, any float dtype (stored as float16).
    """
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        _write_header(h5, header)
        group = h5.create_group("samples")
        for info, tensors in samples:
            _write_sample(group, header, info, tensors)


def merge_traces(out: str | os.PathLike, inputs: Sequence[str | os.PathLike]) -> TraceHeader:
    """Join trace files (e.g. the shards of one collection) into ``out``, atomically.

    The inputs must share model, geometry, recorded layers and format; their sample names must not collide
    (shards of one collection never do). Samples are stored in name order, so merging the shards of a
    collection gives the same content as collecting it in one run. Returns the merged header.
    """
    if not inputs:
        raise ValueError("merge needs at least one input file")
    opened = [open_traces(p) for p in inputs]
    try:
        header = opened[0].header
        collection: list[dict] = []
        owner: dict[str, TraceFile] = {}
        for trace in opened:
            problem = header.compatible_with(trace.header)
            if problem:
                raise TraceFormatError(trace.path, "/", f"cannot merge with {opened[0].path}: {problem}")
            collection += [c for c in trace.header.collection if c not in collection]
            for name in trace.samples:
                if name in owner:
                    raise TraceFormatError(trace.path, f"samples/{name}", f"sample also present in {owner[name].path}")
                owner[name] = trace
        header = dataclasses.replace(header, collection=tuple(collection))
        with atomic_path(out) as tmp, h5py.File(tmp, "w") as h5:
            _write_header(h5, header)
            samples = h5.create_group("samples")
            for name in sorted(owner):
                owner[name]._h5.copy(owner[name]._h5[f"samples/{name}"], samples, name=name)
    finally:
        for trace in opened:
            trace.close()
    return header


def _write_header(h5: h5py.File, header: TraceHeader) -> None:
    attrs = {
        "format_version": header.format_version,
        "model": header.model,
        **{k: v for k, v in asdict(header.geometry).items() if k != "kv_head_of_query"},
        "kv_head_of_query": np.asarray(header.geometry.kv_head_of_query, np.int32),
        "layers": np.asarray(header.layers, np.int32),
        "dtype": header.dtype,
        "kvp_gym_version": header.kvp_gym_version,
        "collection": json.dumps(list(header.collection), sort_keys=True),
        "attention": json.dumps(
            {
                "layers": [spec.to_json() for spec in header.attention],
                "rotary": header.rotary.to_json() if header.rotary else None,
            }
        ),
    }
    assert set(attrs) == set(_FILE_ATTRS)
    h5.attrs.update(attrs)


def _write_sample(
    parent: h5py.Group, header: TraceHeader, info: SampleInfo, tensors: Mapping[int, Sequence[np.ndarray]]
) -> None:
    group = parent.create_group(info.name)
    group.attrs.update(
        {
            "index": info.index,
            "task": info.task,
            "split": info.split,
            "prompt_length": info.prompt_length,
            "answers": json.dumps(list(info.answers)),
            "metadata": json.dumps(info.metadata, sort_keys=True),
            "future_source": info.future_source,
        }
    )
    assert set(group.attrs) == set(_SAMPLE_ATTRS)
    group.create_dataset("tokens", data=np.asarray(info.tokens, np.int32))
    group.create_dataset("needle_spans", data=np.asarray(info.needle_spans, np.int32).reshape(-1, 2))
    num_tokens, head_dim = info.num_tokens, header.geometry.head_dim
    for layer in header.layers:
        layer_group = group.create_group(f"layers/{layer}")
        for tensor, data in zip(_TENSORS, tensors[layer], strict=True):
            data = np.asarray(data, STORED_DTYPE)
            if data.ndim != 3 or data.shape[1:] != (num_tokens, head_dim):
                raise ValueError(
                    f"sample {info.name} layer {layer} {tensor}: expected [heads, {num_tokens}, "
                    f"{head_dim}], got {list(data.shape)}"
                )
            if not np.isfinite(data).all():
                raise ValueError(f"sample {info.name} layer {layer} {tensor}: NaN/Inf (or beyond float16 range)")
            layer_group.create_dataset(tensor, data=data, chunks=(1, num_tokens, head_dim))


def _all_finite(data: np.ndarray) -> bool:
    """No NaN/Inf. For float16, test the exponent bits: 8x faster than np.isfinite, which upcasts."""
    if data.dtype == np.float16:
        exponent = data.view(np.uint16) & 0x7C00
        return not (exponent == 0x7C00).any()
    return bool(np.isfinite(data).all())


def _attr_path(node: h5py.HLObject, name: str) -> str:
    """How errors name an attribute: ``/@name`` on the file, ``samples/x/@name`` on a group."""
    group = node.name.strip("/")
    return f"{group}/@{name}" if group else f"/@{name}"


def _default_rotary(geometry: ModelGeometry) -> Rotary | None:
    """Plain RoPE from the recorded ``rope`` JSON when it names no scaling (files that predate ``attention``)."""
    try:
        rope = json.loads(geometry.rope)
    except json.JSONDecodeError:
        return None
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    kind = rope.get("rope_type", "default") if isinstance(rope, dict) else None
    if kind != "default" or rope.get("rope_scaling") or not isinstance(theta, int | float):
        return None
    return Rotary.default(geometry.head_dim, float(theta))


def _contiguous(heads: list[int]) -> bool:
    return heads == list(range(heads[0], heads[-1] + 1))

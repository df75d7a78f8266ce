"""Trace files, format v2: post-RoPE queries, keys and values of a real model, stored in HDF5 and sealed.

Layout (docs/trace-format.md has the full specification)::

    [512-byte user block]      the seal's location and SHA-256 (HDF5 ignores a file's user block)
    /                          attrs: format_version, model, geometry, layers, dtype, kvp_gym_version, collection,
                               attention (each layer's scale / sliding window / soft-cap, and the RoPE frequencies)
    /samples/<name>/           attrs: index, task, split, prompt_length, answers, metadata, future_source
        tokens                 int32 [S]        token ids: prompt then future
        needle_spans           int32 [N, 2]     token spans [start, end) of the needles inside the prompt
        layers/<l>/queries     float16 [H_q, S, D]   chunks of (1, S, D): one head is one chunk
        layers/<l>/keys        float16 [H_kv, S, D]
        layers/<l>/values      float16 [H_kv, S, D]
    [seal]                     JSON after the HDF5 data: SHA-256 of every byte of HDF5 metadata, of the tensor data,
                               and of the attributes' canonical JSON

Integrity: every dataset carries HDF5's per-chunk Fletcher-32 checksum, verified whenever a chunk is read; the seal
is verified on open, before the HDF5 library reads a byte of the file, so that damaged metadata is refused instead
of reaching code that can crash or loop on it. Version-1 files (no checksums) still read, with a warning;
``kvp-gym traces upgrade`` rewrites them.

``open_traces(path)`` verifies and validates the file when it opens it (every attribute's type, range and
consistency, the whole group structure) and every tensor when it reads it; anything wrong is a
:class:`TraceFormatError` naming the file, the path inside it and what was expected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from kvp_gym.attention import AttentionSpec, Rotary, rotary_from_json, spec_from_json
from kvp_gym.storage import atomic_path

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
SPLITS = ("train", "val", "test")
FUTURE_SOURCES = ("greedy", "text")
STORED_DTYPE = np.float16
# How long the HDF5 library may take to read the metadata of an unsealed (version-1) file before the file is
# called damaged: a damaged string heap can make the library loop forever (see _probe_unsealed).
UNSEALED_PROBE_SECONDS = 60.0

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_SEAL_MAGIC = b"kvp-gym trace seal\n"
_USERBLOCK = 512
# The HDF5 library errors that damaged files raise; every one becomes a TraceFormatError.
_LIBRARY_ERRORS = (OSError, RuntimeError, KeyError, TypeError, ValueError, IndexError, OverflowError)

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
    """A trace file that is unreadable, damaged, or disagrees with the trace format.

    Attributes:
        file: the trace file.
        where: the HDF5 path of the offending attribute, group or dataset ("/" for the file itself).
    """

    def __init__(self, file: str | os.PathLike, where: str, message: str):
        self.file, self.where = str(file), where
        super().__init__(f"{file}: {where}: {message}")


class TraceFormatWarning(UserWarning):
    """A trace file that reads, but without the protection of the current format (version 1: no checksums)."""


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
        if not self.attention and self.geometry.head_dim > 0:  # (a head_dim < 1 is refused by validation)
            standard = AttentionSpec.standard(self.geometry.head_dim)
            object.__setattr__(self, "attention", (standard,) * self.geometry.num_layers)

    def attention_of(self, layer: int) -> AttentionSpec:
        """What layer ``layer``'s attention computes (see :class:`kvp_gym.attention.AttentionSpec`)."""
        return self.attention[layer]

    def compatible_with(self, other: TraceHeader) -> str | None:
        """None if samples of ``other`` may live in the same file as ours, else what differs."""
        for name in ("model", "geometry", "layers", "dtype", "attention", "rotary"):
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
    """A verified, validated, open trace file. Use as a context manager or call :meth:`close`.

    Attributes:
        path: the file.
        header: file-level metadata.
        samples: every sample's metadata, by name, in name order.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise TraceFormatError(self.path, "/", "not a file" if self.path.exists() else "no such file")
        self._seal = _verify_seal(self.path)  # None: an unsealed (version-1) file
        if self._seal is None:
            _probe_unsealed(self.path)
        try:
            # No HDF5 chunk cache: a chunk is one head, read whole and once per request, and a cache per open
            # dataset (1 MiB each, up to 4096 kept open below) would grow memory with the number of samples read.
            self._h5 = h5py.File(self.path, "r", rdcc_nbytes=0)
        except _LIBRARY_ERRORS as err:
            raise TraceFormatError(self.path, "/", f"not a readable HDF5 file (truncated or corrupt?): {err}") from None
        # Resolving an HDF5 path costs ~40 us, as much as reading a head: keep recently used datasets open.
        self._node = functools.lru_cache(maxsize=4096)(self._h5.__getitem__)
        try:
            with self._reading("/"):
                self.header = self._read_header()
                self._check_structure()
                self.samples: dict[str, SampleInfo] = {}
                for name in sorted(self._h5["samples"]):
                    self.samples[name] = self._read_sample(name)
                self._check_duplicates()
                if self._seal is not None and _metadata_digest(self._h5) != self._seal["metadata_sha256"]:
                    raise TraceFormatError(self.path, "/", "the attributes differ from those the file was sealed with")
        except BaseException:
            self._h5.close()
            raise
        if self._seal is None:
            warnings.warn(
                f"{self.path}: trace format version 1 has no checksums, so damage goes undetected; "
                f"`kvp-gym traces upgrade {self.path} NEW.h5` rewrites it as version {FORMAT_VERSION}",
                TraceFormatWarning,
                stacklevel=3,
            )

    # -- reading ----------------------------------------------------------------------------------------------
    def split(self, split: str) -> list[SampleInfo]:
        """The samples of one split (``train``, ``val`` or ``test``), in name order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return [s for s in self.samples.values() if s.split == split]

    def head(self, sample: SampleInfo | str, layer: int, kv_head: int, queries: bool = True) -> HeadTrace:
        """Read one KV head of one layer of one sample: only that head's chunks are read (and checksummed);
        ``queries=False`` skips the queries (an empty [G, 0, D] in their place)."""
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
        if queries:
            query_data = self._read(f"{base}/queries", slice(group[0], group[-1] + 1) if _contiguous(group) else group)
        else:
            query_data = np.zeros((len(group), 0, geometry.head_dim), STORED_DTYPE)
        keys = self._read(f"{base}/keys", kv_head)
        values = self._read(f"{base}/values", kv_head)
        return HeadTrace(
            queries=torch.from_numpy(query_data),
            keys=torch.from_numpy(keys),
            values=torch.from_numpy(values),
            positions=torch.arange(info.num_tokens),
            prompt_length=info.prompt_length,
        )

    def tensors(self, sample: SampleInfo | str) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Every recorded tensor of one sample: ``{layer: (queries [H_q, S, D], keys [H_kv, S, D], values)}``."""
        name = sample if isinstance(sample, str) else sample.name
        return {
            layer: tuple(self._read(f"samples/{name}/layers/{layer}/{t}", slice(None)) for t in _TENSORS)
            for layer in self.header.layers
        }

    def check(self) -> Iterator[TraceFormatError]:
        """Verify the whole file: the tensor data against the seal, then every tensor of every sample (checksums,
        NaN/Inf). Yields each problem found (nothing if the file is sound). What :func:`open_traces` validates
        is checked when the file opens; a file that opens and passes ``check`` reads without error everywhere."""
        if self._seal is not None and _seal_digests(self.path, self._seal, data=True)[1] != self._seal["data_sha256"]:
            yield TraceFormatError(self.path, "/", "the tensor data differ from what the file was sealed with")
        for info in self.samples.values():
            for layer in self.header.layers:
                for tensor in _TENSORS:
                    try:
                        self._read(f"samples/{info.name}/layers/{layer}/{tensor}", slice(None))
                    except TraceFormatError as err:
                        yield err

    @property
    def content_id(self) -> str | None:
        """SHA-256 (hex) naming the file's content, from its verified seal's digests of the tensors, the structure
        and the attributes; None for an unsealed (version-1) file."""
        if self._seal is None:
            return None
        digests = (self._seal["skeleton_sha256"], self._seal["data_sha256"], self._seal["metadata_sha256"])
        return hashlib.sha256(":".join(digests).encode()).hexdigest()

    @property
    def sealed(self) -> bool:
        """True for a version-2 file, whose seal was verified on open (False: version 1, unprotected)."""
        return self._seal is not None

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> TraceFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TraceFile({str(self.path)!r}, model={self.header.model!r}, samples={len(self.samples)})"

    # -- validation -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _reading(self, where: str) -> Iterator[None]:
        """Turn any HDF5 library error raised inside the block into a TraceFormatError at ``where``."""
        try:
            yield
        except TraceFormatError:
            raise
        except _LIBRARY_ERRORS as err:
            raise TraceFormatError(self.path, where, f"unreadable (truncated or corrupt?): {err}") from None

    def _error(self, where: str, message: str) -> TraceFormatError:
        return TraceFormatError(self.path, where, message)

    def _read(self, where: str, index) -> np.ndarray:
        try:
            data = self._node(where)[index]
        except _LIBRARY_ERRORS as err:
            if "filter returned failure" in str(err):
                raise self._error(where, "checksum mismatch: the stored data is damaged") from None
            raise self._error(where, f"unreadable data (truncated or corrupt?): {err}") from None
        if not _all_finite(data):
            raise self._error(where, "contains NaN or Inf; expected finite float16 values")
        return data

    def _attr(self, node: h5py.HLObject, name: str, kind: type):
        where = _attr_path(node, name)
        with self._reading(where):
            if name not in node.attrs:
                raise self._error(where, f"missing attribute (expected {kind.__name__})")
            value = node.attrs[name]
        if kind is str:
            value = value.decode(errors="replace") if isinstance(value, bytes) else value
            if not isinstance(value, str):
                raise self._error(where, f"expected a string, found {value!r}")
            return value
        if kind is int:
            if not np.issubdtype(np.asarray(value).dtype, np.integer) or np.ndim(value) != 0:
                raise self._error(where, f"expected an integer, found {value!r}")
            return int(value)
        if kind is tuple:
            value = np.asarray(value)
            if value.ndim != 1 or not np.issubdtype(value.dtype, np.integer):
                raise self._error(where, f"expected a 1-D integer array, found {value!r}")
            return tuple(int(v) for v in value)
        raise TypeError(kind)

    def _json_attr(self, node: h5py.HLObject, name: str, kind: type):
        text = self._attr(node, name, str)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise self._error(_attr_path(node, name), f"invalid JSON: {err}") from None
        if not isinstance(value, kind):
            expected = "a JSON list" if kind is list else "a JSON object"
            raise self._error(_attr_path(node, name), f"expected {expected}, found {text[:80]!r}")
        return value

    def _read_header(self) -> TraceHeader:
        root = self._h5
        self._no_unknown_attrs(root, _FILE_ATTRS)
        version = self._attr(root, "format_version", int)
        if version not in READABLE_VERSIONS:
            raise self._error(
                "/@format_version",
                f"unknown format version {version}; this kvp-gym reads versions {list(READABLE_VERSIONS)}",
            )
        if (version == FORMAT_VERSION) != (self._seal is not None):
            raise self._error(
                "/@format_version",
                f"version {version} in a file {'with' if self._seal else 'without'} a seal: the file's first "
                f"{_USERBLOCK} bytes were replaced or removed",
            )
        geometry = ModelGeometry(
            **{name: self._attr(root, name, str if name == "rope" else int) for name in _GEOMETRY_ATTRS},
            kv_head_of_query=self._attr(root, "kv_head_of_query", tuple),
        )
        header = TraceHeader(
            model=self._attr(root, "model", str),
            geometry=geometry,
            layers=self._attr(root, "layers", tuple),
            collection=tuple(self._json_attr(root, "collection", list)),
            kvp_gym_version=self._attr(root, "kvp_gym_version", str),
            format_version=version,
            dtype=self._attr(root, "dtype", str),
        )
        problem = _header_problem(header)
        if problem:
            raise self._error(f"/@{problem[0]}", problem[1])
        attention, rotary = self._read_attention(geometry, required=version >= 2)
        return dataclasses.replace(header, attention=attention, rotary=rotary)

    def _read_attention(
        self, geometry: ModelGeometry, required: bool
    ) -> tuple[tuple[AttentionSpec, ...], Rotary | None]:
        """The ``attention`` attribute; version-1 files written before it existed read as standard attention
        (refused when their geometry says the model used a sliding window, which they did not record per layer)."""
        if not required and "attention" not in self._h5.attrs:
            if geometry.sliding_window:
                raise self._error(
                    "/@attention",
                    "missing; this file comes from a sliding-window model but does not record which layers slide: "
                    "collect it again with this kvp-gym",
                )
            return (), _default_rotary(geometry)
        data = self._json_attr(self._h5, "attention", dict)
        try:
            if not isinstance(data.get("layers"), list):
                raise ValueError("expected {'layers': [...], 'rotary': ...}")
            if len(data["layers"]) != geometry.num_layers:
                raise ValueError(f"expected {geometry.num_layers} layer specs, found {len(data['layers'])}")
            specs = tuple(spec_from_json(spec, f"layer {i}") for i, spec in enumerate(data["layers"]))
            rotary = rotary_from_json(data.get("rotary"), "rotary")
        except ValueError as err:
            raise self._error("/@attention", str(err)) from None
        return specs, rotary

    def _check_structure(self) -> None:
        """The group tree holds exactly what the format defines: no unknown member, no soft, external or extra
        hard link (an object reachable twice would count twice), no attributes where none belong."""
        self._members(self._h5, "", {"samples": h5py.Group})
        samples = self._h5["samples"]
        self._no_unknown_attrs(samples, ())
        self._members(samples, "samples", dict.fromkeys(samples, h5py.Group))
        layers = dict.fromkeys((str(layer) for layer in self.header.layers), h5py.Group)
        for name in samples:
            where = f"samples/{name}"
            sample = samples[name]
            self._members(sample, where, {"tokens": h5py.Dataset, "needle_spans": h5py.Dataset, "layers": h5py.Group})
            self._members(sample["layers"], f"{where}/layers", layers)
            self._no_unknown_attrs(sample["layers"], ())
            for layer in layers:
                self._members(sample["layers"][layer], f"{where}/layers/{layer}", dict.fromkeys(_TENSORS, h5py.Dataset))
                self._no_unknown_attrs(sample["layers"][layer], ())

    def _members(self, group: h5py.Group, where: str, expected: Mapping[str, type]) -> None:
        """``group`` holds exactly the members ``expected`` names, each of its kind, each a plain hard link to an
        object linked nowhere else; datasets carry no attributes. (Low-level calls: no object is opened.)"""
        prefix = f"{where}/" if where else ""
        with self._reading(where or "/"):
            unknown = sorted(set(group) - set(expected))
            if unknown:
                raise self._error(prefix + unknown[0], f"unknown member; expected only {', '.join(sorted(expected))}")
            for name, kind in expected.items():
                path, noun = prefix + name, "group" if kind is h5py.Group else "dataset"
                if not group.id.links.exists(name.encode()):
                    raise self._error(path, f"missing {noun}")
                link = group.id.links.get_info(name.encode()).type
                if link != h5py.h5l.TYPE_HARD:
                    kind_of_link = "an external link" if link == h5py.h5l.TYPE_EXTERNAL else "a soft link"
                    raise self._error(path, f"{kind_of_link}; trace files hold no links")
                info = h5py.h5o.get_info(group.id, name.encode())
                if info.type != (h5py.h5o.TYPE_GROUP if kind is h5py.Group else h5py.h5o.TYPE_DATASET):
                    raise self._error(path, f"expected a {noun}")
                if info.rc != 1:
                    raise self._error(path, f"reachable by {info.rc} hard links; every object must appear once")
                if kind is h5py.Dataset and info.num_attrs:
                    raise self._error(path, "unexpected attributes; datasets carry none")

    def _no_unknown_attrs(self, node: h5py.HLObject, allowed: Iterable[str]) -> None:
        with self._reading(node.name):
            unknown = sorted(set(node.attrs) - set(allowed))
        if unknown:
            raise self._error(_attr_path(node, unknown[0]), "unknown attribute")

    def _read_sample(self, name: str) -> SampleInfo:
        where = f"samples/{name}"
        group = self._h5[where]
        self._no_unknown_attrs(group, _SAMPLE_ATTRS)
        tokens = self._dataset(f"{where}/tokens", np.integer)
        if tokens.ndim != 1 or len(tokens) == 0:
            raise self._error(f"{where}/tokens", f"expected a non-empty 1-D array, found shape {tokens.shape}")
        spans = self._dataset(f"{where}/needle_spans", np.integer)
        if spans.ndim != 2 or spans.shape[1] != 2:
            raise self._error(f"{where}/needle_spans", f"expected [N, 2] spans, found shape {spans.shape}")
        answers = self._json_attr(group, "answers", list)
        info = SampleInfo(
            name=name,
            index=self._attr(group, "index", int),
            task=self._attr(group, "task", str),
            split=self._attr(group, "split", str),
            prompt_length=self._attr(group, "prompt_length", int),
            tokens=tokens.astype(np.int32),
            answers=tuple(answers),
            needle_spans=spans.astype(np.int32),
            metadata=self._json_attr(group, "metadata", dict),
            future_source=self._attr(group, "future_source", str),
        )
        problem = _sample_problem(info, self.header)
        if problem:
            raise self._error(f"{where}/{problem[0]}", problem[1])
        geometry = self.header.geometry
        for layer in self.header.layers:
            for tensor, heads in zip(
                _TENSORS,
                (geometry.num_query_heads, geometry.num_kv_heads, geometry.num_kv_heads),
                strict=True,
            ):
                path = f"{where}/layers/{layer}/{tensor}"
                node = self._node(path)
                expected = (heads, info.num_tokens, geometry.head_dim)
                if node.shape != expected or node.dtype != STORED_DTYPE:
                    raise self._error(
                        path,
                        f"expected float16 {list(expected)} "
                        f"[heads, tokens, head_dim], found {node.dtype} {list(node.shape)}",
                    )
                if self._seal is not None and not node.fletcher32:
                    raise self._error(path, "expected a Fletcher-32 checksum on every chunk (format version 2)")
        return info

    def _check_duplicates(self) -> None:
        """No sample is a copy of another (a copied group would count twice in every statistic)."""
        seen: dict[bytes, str] = {}
        for info in self.samples.values():
            key = hashlib.sha256(info.tokens.tobytes()).digest()
            if key in seen:
                raise self._error(f"samples/{info.name}", f"a copy of samples/{seen[key]} (the same tokens)")
            seen[key] = info.name

    def _dataset(self, where: str, kind: type) -> np.ndarray:
        node = self._h5[where]
        if not np.issubdtype(node.dtype, kind):
            raise self._error(where, f"expected {kind.__name__} values, found {node.dtype}")
        if self._seal is not None and not node.fletcher32:
            raise self._error(where, "expected a Fletcher-32 checksum on every chunk (format version 2)")
        with self._reading(where):
            return node[()]


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
    """Write a sealed trace file (the current format version) atomically (temp file + rename).

    Args:
        path: the file to create (replaced if it exists).
        header: file-level metadata.
        samples: (info, tensors) pairs; ``tensors[layer] = (queries [H_q, S, D], keys [H_kv, S, D],
            values [H_kv, S, D])`` for every layer in ``header.layers``, any float dtype (stored as float16).

    Raises ValueError, naming the sample and field, for anything a reader would refuse.
    """
    problem = _header_problem(header)
    if problem:
        raise ValueError(f"header {problem[0]}: {problem[1]}")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", userblock_size=_USERBLOCK) as h5:
            _write_header(h5, header)
            group = h5.create_group("samples")
            for info, tensors in samples:
                _write_sample(group, header, info, tensors)
        _seal(tmp)


def merge_traces(out: str | os.PathLike, inputs: Sequence[str | os.PathLike]) -> TraceHeader:
    """Join trace files (e.g. the shards of one collection) into ``out``, atomically, in the current format.

    The inputs must share model, geometry and recorded layers; their sample names must not collide (shards of one
    collection never do). Samples are stored in name order, so merging the shards of a collection gives the same
    content as collecting it in one run. Every tensor is read (and verified) and written again, so a single
    version-1 input is upgraded to the current format. Returns the merged header.
    """
    if not inputs:
        raise ValueError("merge needs at least one input file")
    opened: list[TraceFile] = []
    try:
        for path in inputs:
            opened.append(open_traces(path))
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
        header = dataclasses.replace(header, collection=tuple(collection), format_version=FORMAT_VERSION)
        write_traces(out, header, ((owner[n].samples[n], owner[n].tensors(n)) for n in sorted(owner)))
    finally:
        for trace in opened:
            trace.close()
    return header


def _write_header(h5: h5py.File, header: TraceHeader) -> None:
    attrs = {
        "format_version": FORMAT_VERSION,
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
    problem = _sample_problem(info, header)
    if problem:
        raise ValueError(f"sample {info.name} {problem[0]}: {problem[1]}")
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
    # Fletcher-32 on every dataset: HDF5 verifies each chunk's checksum whenever it reads it.
    group.create_dataset("tokens", data=np.asarray(info.tokens, np.int32), fletcher32=True)
    spans = np.asarray(info.needle_spans, np.int32).reshape(-1, 2)
    group.create_dataset("needle_spans", data=spans, fletcher32=True)
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
            layer_group.create_dataset(tensor, data=data, chunks=(1, num_tokens, head_dim), fletcher32=True)


# -- validation rules shared by the reader and the writer ---------------------------------------------------------
def _header_problem(header: TraceHeader) -> tuple[str, str] | None:
    """(attribute, what is wrong) for a header the format does not allow, else None."""
    g = header.geometry
    for name in ("num_layers", "num_query_heads", "num_kv_heads", "head_dim", "vocab_size"):
        if getattr(g, name) < 1:
            return name, f"expected a positive integer, found {getattr(g, name)}"
    if g.sliding_window < 0:
        return "sliding_window", f"expected 0 (none) or a positive window, found {g.sliding_window}"
    try:
        rope = json.loads(g.rope)
    except json.JSONDecodeError as err:
        return "rope", f"invalid JSON: {err}"
    if not isinstance(rope, dict):
        return "rope", f"expected a JSON object, found {g.rope[:80]!r}"
    kv_map = g.kv_head_of_query
    if len(kv_map) != g.num_query_heads or not all(0 <= h < g.num_kv_heads for h in kv_map):
        return "kv_head_of_query", f"expected {g.num_query_heads} KV head ids in [0, {g.num_kv_heads})"
    orphans = sorted(set(range(g.num_kv_heads)) - set(kv_map))
    if orphans:
        return "kv_head_of_query", f"KV heads {orphans} have no query head; every KV head needs at least one"
    if not header.layers or not all(0 <= layer < g.num_layers for layer in header.layers):
        return "layers", f"expected layer ids in [0, {g.num_layers}), found {list(header.layers)}"
    if list(header.layers) != sorted(set(header.layers)):
        return "layers", f"expected unique layer ids in ascending order, found {list(header.layers)}"
    if not all(isinstance(c, dict) for c in header.collection):
        return "collection", "expected a JSON list of collection settings (objects)"
    if not header.model:
        return "model", "expected a model name, found an empty string"
    if header.dtype != "float16":
        return "dtype", f"expected 'float16', found {header.dtype!r}"
    return None


def _sample_problem(info: SampleInfo, header: TraceHeader) -> tuple[str, str] | None:
    """(field, what is wrong) for a sample the format does not allow, else None; field is ``@attribute`` or a
    dataset name."""
    if info.index < 0:
        return "@index", f"expected a non-negative integer, found {info.index}"
    if not info.task:
        return "@task", "expected a task name, found an empty string"
    if info.split not in SPLITS:
        return "@split", f"expected one of {SPLITS}, found {info.split!r}"
    if not 0 < info.prompt_length <= info.num_tokens:
        return "@prompt_length", (f"expected 0 < prompt_length <= {info.num_tokens} tokens, found {info.prompt_length}")
    if not all(isinstance(answer, str) for answer in info.answers):
        return "@answers", f"expected a list of strings, found {list(info.answers)!r}"
    if not isinstance(info.metadata, dict):
        return "@metadata", f"expected an object, found {info.metadata!r}"
    score = info.metadata.get("full_cache_score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1):
        return "@metadata", f"full_cache_score must be a number in [0, 1], found {score!r}"
    if info.future_source not in FUTURE_SOURCES:
        return "@future_source", f"expected one of {FUTURE_SOURCES}, found {info.future_source!r}"
    vocab = header.geometry.vocab_size
    if len(info.tokens) and not 0 <= int(info.tokens.min()) <= int(info.tokens.max()) < vocab:
        return "tokens", f"token ids must lie in [0, {vocab})"
    spans = np.asarray(info.needle_spans).reshape(-1, 2)
    if not np.all((spans[:, 0] >= 0) & (spans[:, 0] < spans[:, 1]) & (spans[:, 1] <= info.prompt_length)):
        return "needle_spans", f"expected [N, 2] spans with 0 <= start < end <= prompt_length ({info.prompt_length})"
    return None


# -- integrity: the seal ------------------------------------------------------------------------------------------
# A version-2 file is an HDF5 file with a 512-byte user block (bytes HDF5 reserves for its user and never reads)
# followed, after the HDF5 data, by the seal: JSON with the SHA-256 of every byte of the HDF5 part outside the
# tensor chunks (the "skeleton": superblock, object headers, B-trees, heaps: all structure and attributes), of
# the tensor chunks, and of the attributes' canonical JSON. The user block points to the seal and holds its hash.
# Opening verifies the user block, the seal and the skeleton with plain file reads, before HDF5 parses anything;
# tensor chunks are verified by their Fletcher-32 checksums when read, and against the seal by `check`.
def _userblock(offset: int, length: int, digest: str) -> bytes:
    pointer = json.dumps({"seal_offset": offset, "seal_length": length, "seal_sha256": digest}, sort_keys=True)
    return (_SEAL_MAGIC + pointer.encode() + b"\n").ljust(_USERBLOCK, b"\0")


def _seal(path: Path) -> None:
    """Seal a version-2 file just written by HDF5 (closed, with a ``_USERBLOCK``-byte user block)."""
    end = path.stat().st_size
    with h5py.File(path, "r") as h5:
        if h5.userblock_size != _USERBLOCK:
            raise ValueError(f"{path}: expected a {_USERBLOCK}-byte HDF5 user block, found {h5.userblock_size}")
        seal = {
            "format_version": FORMAT_VERSION,
            "hdf5_end": end,
            "data_ranges": _data_ranges(h5),
            "metadata_sha256": _metadata_digest(h5),
        }
    seal["skeleton_sha256"], seal["data_sha256"] = _seal_digests(path, seal, data=True)
    raw = json.dumps(seal, sort_keys=True).encode()
    with open(path, "r+b") as file:
        file.seek(end)
        file.write(raw)
        file.truncate()
        file.seek(0)
        file.write(_userblock(end, len(raw), hashlib.sha256(raw).hexdigest()))


def _verify_seal(path: Path) -> dict | None:
    """The verified seal of a version-2 file, or None for a file that is plain HDF5 from its first byte (version
    1). Reads only the user block, the seal and the skeleton; any difference is a TraceFormatError."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(_USERBLOCK)
        if head.startswith(_HDF5_SIGNATURE):
            return None
        if not head.startswith(_SEAL_MAGIC):
            file.seek(_USERBLOCK)
            if file.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                raise TraceFormatError(path, "/", f"the integrity header (the first {_USERBLOCK} bytes) is damaged")
            raise TraceFormatError(path, "/", "not a readable HDF5 file (truncated or corrupt?): no HDF5 signature")
        try:
            pointer = json.loads(head[len(_SEAL_MAGIC) :].split(b"\n", 1)[0])
            offset, length, digest = pointer["seal_offset"], pointer["seal_length"], pointer["seal_sha256"]
            intact = all(isinstance(v, int) for v in (offset, length)) and head == _userblock(offset, length, digest)
        except (ValueError, KeyError, TypeError, AttributeError):
            intact = False
        if not intact:
            raise TraceFormatError(path, "/", f"the integrity header (the first {_USERBLOCK} bytes) is damaged")
        if offset + length != size:
            raise TraceFormatError(
                path,
                "/",
                f"expected {offset + length} bytes, found {size}: the file was truncated, extended or rewritten "
                "after it was sealed (truncated or corrupt?)",
            )
        file.seek(offset)
        raw = file.read(length)
    if hashlib.sha256(raw).hexdigest() != digest:
        raise TraceFormatError(path, "/", "the seal (the record of checksums at the end of the file) is damaged")
    seal = json.loads(raw)
    if _seal_digests(path, seal, data=False)[0] != seal["skeleton_sha256"]:
        raise TraceFormatError(
            path,
            "/",
            "the HDF5 metadata (structure and attributes) differ from what the file was sealed with: damaged, or "
            "edited after it was written",
        )
    return seal


def _seal_digests(path: Path, seal: dict, data: bool) -> tuple[str, str | None]:
    """SHA-256 (hex) of the skeleton and, with ``data``, of the tensor chunks, as the seal describes them."""
    skeleton, chunks = hashlib.sha256(), hashlib.sha256()
    at = _USERBLOCK
    with open(path, "rb") as file:
        for start, length in [*seal["data_ranges"], (seal["hdf5_end"], 0)]:
            _hash_bytes(file, at, start, skeleton)
            if data:
                _hash_bytes(file, start, start + length, chunks)
            at = start + length
    return skeleton.hexdigest(), chunks.hexdigest() if data else None


def _hash_bytes(file, start: int, stop: int, digest) -> None:
    file.seek(start)
    while start < stop:
        block = file.read(min(stop - start, 1 << 22))
        if not block:
            return
        digest.update(block)
        start += len(block)


def _data_ranges(h5: h5py.File) -> list[list[int]]:
    """[[offset, length], ...]: where the datasets' chunks lie in the file, sorted, adjacent ones joined."""
    spans: list[tuple[int, int]] = []

    def visit(_: str, node) -> None:
        if isinstance(node, h5py.Dataset):
            if node.chunks:
                node.id.chunk_iter(lambda chunk: spans.append((chunk.byte_offset, chunk.size)))
            elif node.id.get_offset() is not None:
                spans.append((node.id.get_offset(), node.id.get_storage_size()))

    h5.visititems(visit)
    ranges: list[list[int]] = []
    for start, length in sorted(spans):
        if ranges and ranges[-1][0] + ranges[-1][1] == start:
            ranges[-1][1] += length
        else:
            ranges.append([start, length])
    return ranges


def _metadata_digest(h5: h5py.File) -> str:
    """SHA-256 (hex) of the canonical JSON of the file's and every sample's attributes (nothing else carries
    attributes in a valid file)."""

    def plain(value):
        if isinstance(value, bytes):
            return value.decode(errors="replace")
        return value.tolist() if isinstance(value, np.ndarray | np.generic) else value

    def attributes(node) -> dict:
        return {k: plain(v) for k, v in node.attrs.items()}

    record = {"/": attributes(h5)}
    samples = h5.get("samples")
    if isinstance(samples, h5py.Group):
        for name in samples:
            if isinstance(samples.get(name, getlink=True), h5py.HardLink) and isinstance(samples[name], h5py.Group):
                record[name] = attributes(samples[name])
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


# A damaged heap of string attributes can make the HDF5 library loop forever while reading an attribute, and a
# thread cannot interrupt it; so an unsealed file's metadata is first read by a separate process with a deadline.
_PROBE = """
import sys, h5py
with h5py.File(sys.argv[1], "r") as h5:
    dict(h5.attrs)
    h5.visititems(lambda name, node: dict(node.attrs) and None)
"""


def _probe_unsealed(path: Path) -> None:
    """Refuse an unsealed file whose metadata the HDF5 library cannot read within UNSEALED_PROBE_SECONDS."""
    try:
        probe = subprocess.run(
            [sys.executable, "-c", _PROBE, str(path)], capture_output=True, timeout=UNSEALED_PROBE_SECONDS
        )
    except subprocess.TimeoutExpired:
        raise TraceFormatError(
            path,
            "/",
            f"the HDF5 library did not finish reading the metadata in {UNSEALED_PROBE_SECONDS:.0f} s: the file is "
            "damaged (version-1 files carry no checksums)",
        ) from None
    if probe.returncode < 0:
        raise TraceFormatError(path, "/", f"reading the metadata crashed the HDF5 library (signal {-probe.returncode})")


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

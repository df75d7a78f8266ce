"""Schema validation of an open trace file: every attribute's type, range and consistency, the whole group
structure, every sample, duplicates, and each tensor's checksum and finite values when it is read. Anything wrong
is a :class:`TraceFormatError` naming the file, the path inside it and what was expected.

Imports only kvp_gym.attention and kvp_gym.traces.format (and h5py, numpy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import h5py
import numpy as np

from kvp_gym.attention import AttentionSpec, Rotary, rotary_from_json, spec_from_json
from kvp_gym.traces.format import (
    FILE_ATTRS,
    FORMAT_VERSION,
    GEOMETRY_ATTRS,
    READABLE_VERSIONS,
    SAMPLE_ATTRS,
    STORED_DTYPE,
    TENSORS,
    USERBLOCK_BYTES,
    ModelGeometry,
    SampleInfo,
    TraceFormatError,
    TraceHeader,
    header_problem,
    sample_problem,
)

# The HDF5 library errors that damaged files raise; every one becomes a TraceFormatError.
LIBRARY_ERRORS = (OSError, RuntimeError, KeyError, TypeError, ValueError, IndexError, OverflowError)


class TraceValidator:
    """Reads an open trace file's metadata and tensors, refusing anything the format does not allow.

    Args:
        path: the file, as errors name it.
        h5: the file, open for reading.
        sealed: whether the file carries a verified seal (version 2: every dataset must be checksummed).
        node: ``h5[path]``, possibly cached (the reader keeps recently used datasets open).
    """

    def __init__(self, path: Path, h5: h5py.File, sealed: bool, node: Callable[[str], h5py.HLObject]):
        self.path, self.h5, self.sealed, self.node = path, h5, sealed, node

    @contextlib.contextmanager
    def reading(self, where: str) -> Iterator[None]:
        """Turn any HDF5 library error raised inside the block into a TraceFormatError at ``where``."""
        try:
            yield
        except TraceFormatError:
            raise
        except LIBRARY_ERRORS as err:
            raise TraceFormatError(self.path, where, f"unreadable (truncated or corrupt?): {err}") from None

    def read_tensor(self, where: str, index) -> np.ndarray:
        """``h5[where][index]``, its chunks checksummed by HDF5 and its values checked finite."""
        try:
            data = self.node(where)[index]
        except LIBRARY_ERRORS as err:
            if "filter returned failure" in str(err):
                raise self._error(where, "checksum mismatch: the stored data is damaged") from None
            raise self._error(where, f"unreadable data (truncated or corrupt?): {err}") from None
        if not _all_finite(data):
            raise self._error(where, "contains NaN or Inf; expected finite float16 values")
        return data

    # -- the header -------------------------------------------------------------------------------------------
    def read_header(self) -> TraceHeader:
        """The file's attributes as a header: all present, of their types, and within the format's rules."""
        root = self.h5
        self._no_unknown_attrs(root, FILE_ATTRS)
        version = self._attr(root, "format_version", int)
        if version not in READABLE_VERSIONS:
            raise self._error(
                "/@format_version",
                f"unknown format version {version}; this kvp-gym reads versions {list(READABLE_VERSIONS)}",
            )
        if (version == FORMAT_VERSION) != self.sealed:
            raise self._error(
                "/@format_version",
                f"version {version} in a file {'with' if self.sealed else 'without'} a seal: the file's first "
                f"{USERBLOCK_BYTES} bytes were replaced or removed",
            )
        geometry = ModelGeometry(
            **{name: self._attr(root, name, str if name == "rope" else int) for name in GEOMETRY_ATTRS},
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
        problem = header_problem(header)
        if problem:
            raise self._error(f"/@{problem[0]}", problem[1])
        attention, rotary = self._read_attention(geometry, required=version >= 2)
        return dataclasses.replace(header, attention=attention, rotary=rotary)

    def _read_attention(
        self, geometry: ModelGeometry, required: bool
    ) -> tuple[tuple[AttentionSpec, ...], Rotary | tuple[Rotary | None, ...] | None]:
        """The ``attention`` attribute (its ``rotary``: one object for every layer, or a list with one per layer);
        version-1 files written before it existed read as standard attention (refused when their geometry says the
        model used a sliding window, which they did not record per layer)."""
        if not required and "attention" not in self.h5.attrs:
            if geometry.sliding_window:
                raise self._error(
                    "/@attention",
                    "missing; this file comes from a sliding-window model but does not record which layers slide: "
                    "collect it again with this kvp-gym",
                )
            return (), _default_rotary(geometry)
        data = self._json_attr(self.h5, "attention", dict)
        try:
            if not isinstance(data.get("layers"), list):
                raise ValueError("expected {'layers': [...], 'rotary': ...}")
            if len(data["layers"]) != geometry.num_layers:
                raise ValueError(f"expected {geometry.num_layers} layer specs, found {len(data['layers'])}")
            specs = tuple(spec_from_json(spec, f"layer {i}") for i, spec in enumerate(data["layers"]))
            rotary = data.get("rotary")
            if isinstance(rotary, list):  # one per layer
                if len(rotary) != geometry.num_layers:
                    raise ValueError(f"expected {geometry.num_layers} layer rotaries, found {len(rotary)}")
                rotary = tuple(rotary_from_json(r, f"rotary of layer {i}") for i, r in enumerate(rotary))
            else:
                rotary = rotary_from_json(rotary, "rotary")
        except ValueError as err:
            raise self._error("/@attention", str(err)) from None
        return specs, rotary

    # -- the structure ----------------------------------------------------------------------------------------
    def check_structure(self, header: TraceHeader) -> None:
        """The group tree holds exactly what the format defines: no unknown member, no soft, external or extra
        hard link (an object reachable twice would count twice), no attributes where none belong."""
        self._members(self.h5, "", {"samples": h5py.Group})
        samples = self.h5["samples"]
        self._no_unknown_attrs(samples, ())
        self._members(samples, "samples", dict.fromkeys(samples, h5py.Group))
        layers = dict.fromkeys((str(layer) for layer in header.layers), h5py.Group)
        for name in samples:
            where = f"samples/{name}"
            sample = samples[name]
            self._members(sample, where, {"tokens": h5py.Dataset, "needle_spans": h5py.Dataset, "layers": h5py.Group})
            self._members(sample["layers"], f"{where}/layers", layers)
            self._no_unknown_attrs(sample["layers"], ())
            for layer in layers:
                self._members(sample["layers"][layer], f"{where}/layers/{layer}", dict.fromkeys(TENSORS, h5py.Dataset))
                self._no_unknown_attrs(sample["layers"][layer], ())

    def _members(self, group: h5py.Group, where: str, expected: Mapping[str, type]) -> None:
        """``group`` holds exactly the members ``expected`` names, each of its kind, each a plain hard link to an
        object linked nowhere else; datasets carry no attributes. (Low-level calls: no object is opened.)"""
        prefix = f"{where}/" if where else ""
        with self.reading(where or "/"):
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

    # -- the samples ------------------------------------------------------------------------------------------
    def read_samples(self, header: TraceHeader) -> dict[str, SampleInfo]:
        """Every sample's metadata, by name, in name order; no sample a copy of another."""
        samples = {name: self._read_sample(name, header) for name in sorted(self.h5["samples"])}
        self._check_duplicates(samples)
        return samples

    def _read_sample(self, name: str, header: TraceHeader) -> SampleInfo:
        where = f"samples/{name}"
        group = self.h5[where]
        self._no_unknown_attrs(group, SAMPLE_ATTRS)
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
        problem = sample_problem(info, header)
        if problem:
            raise self._error(f"{where}/{problem[0]}", problem[1])
        self._check_tensors(info, header)
        return info

    def _check_tensors(self, info: SampleInfo, header: TraceHeader) -> None:
        """Every recorded tensor of the sample has its shape and dtype (and, sealed, its checksum filter); its data
        is checked when read."""
        geometry = header.geometry
        for layer in header.layers:
            for tensor, heads in zip(
                TENSORS,
                (geometry.num_query_heads, geometry.num_kv_heads, geometry.num_kv_heads),
                strict=True,
            ):
                path = f"samples/{info.name}/layers/{layer}/{tensor}"
                node = self.node(path)
                expected = (heads, info.num_tokens, geometry.head_dim)
                if node.shape != expected or node.dtype != STORED_DTYPE:
                    raise self._error(
                        path,
                        f"expected float16 {list(expected)} "
                        f"[heads, tokens, head_dim], found {node.dtype} {list(node.shape)}",
                    )
                if self.sealed and not node.fletcher32:
                    raise self._error(path, "expected a Fletcher-32 checksum on every chunk (format version 2)")

    def _check_duplicates(self, samples: Mapping[str, SampleInfo]) -> None:
        """No sample is a copy of another (a copied group would count twice in every statistic)."""
        seen: dict[bytes, str] = {}
        for info in samples.values():
            key = hashlib.sha256(info.tokens.tobytes()).digest()
            if key in seen:
                raise self._error(f"samples/{info.name}", f"a copy of samples/{seen[key]} (the same tokens)")
            seen[key] = info.name

    # -- attributes and small datasets ------------------------------------------------------------------------
    def _error(self, where: str, message: str) -> TraceFormatError:
        return TraceFormatError(self.path, where, message)

    def _attr(self, node: h5py.HLObject, name: str, kind: type):
        where = _attr_path(node, name)
        with self.reading(where):
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

    def _no_unknown_attrs(self, node: h5py.HLObject, allowed: Iterable[str]) -> None:
        with self.reading(node.name):
            unknown = sorted(set(node.attrs) - set(allowed))
        if unknown:
            raise self._error(_attr_path(node, unknown[0]), "unknown attribute")

    def _dataset(self, where: str, kind: type) -> np.ndarray:
        node = self.h5[where]
        if not np.issubdtype(node.dtype, kind):
            raise self._error(where, f"expected {kind.__name__} values, found {node.dtype}")
        if self.sealed and not node.fletcher32:
            raise self._error(where, "expected a Fletcher-32 checksum on every chunk (format version 2)")
        with self.reading(where):
            return node[()]


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

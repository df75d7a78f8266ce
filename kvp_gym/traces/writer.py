"""Writing trace files: :func:`write_traces` writes a sealed file of the current format version, atomically, and
refuses (ValueError) anything a reader would refuse.

Imports only kvp_gym.storage, kvp_gym.traces.format and kvp_gym.traces.seal (and h5py, numpy).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict

import h5py
import numpy as np

from kvp_gym.storage import atomic_path
from kvp_gym.traces.format import (
    FILE_ATTRS,
    FORMAT_VERSION,
    SAMPLE_ATTRS,
    STORED_DTYPE,
    TENSORS,
    USERBLOCK_BYTES,
    SampleInfo,
    TraceHeader,
    header_problem,
    sample_problem,
)
from kvp_gym.traces.seal import seal_file


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
    problem = header_problem(header)
    if problem:
        raise ValueError(f"header {problem[0]}: {problem[1]}")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", userblock_size=USERBLOCK_BYTES) as h5:
            _write_header(h5, header)
            group = h5.create_group("samples")
            for info, tensors in samples:
                _write_sample(group, header, info, tensors)
        seal_file(tmp)


def _write_header(h5: h5py.File, header: TraceHeader) -> None:
    """The file's attributes (``FILE_ATTRS``), stamped with the current format version."""
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
                "rotary": _rotary_json(header.rotary),
            }
        ),
    }
    assert set(attrs) == set(FILE_ATTRS)
    h5.attrs.update(attrs)


def _rotary_json(rotaries: tuple) -> dict | list | None:
    """One object (or null) when every layer shares its RoPE, as files have always held; else one per layer."""
    if len(set(rotaries)) <= 1:
        return rotaries[0].to_json() if rotaries and rotaries[0] else None
    return [rotary.to_json() if rotary else None for rotary in rotaries]


def _write_sample(
    parent: h5py.Group, header: TraceHeader, info: SampleInfo, tensors: Mapping[int, Sequence[np.ndarray]]
) -> None:
    """One sample group under ``parent``: its attributes (``SAMPLE_ATTRS``), tokens, needle spans and every layer's
    tensors as float16, one chunk per head, each dataset checksummed."""
    problem = sample_problem(info, header)
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
    assert set(group.attrs) == set(SAMPLE_ATTRS)
    # Fletcher-32 on every dataset: HDF5 verifies each chunk's checksum whenever it reads it.
    group.create_dataset("tokens", data=np.asarray(info.tokens, np.int32), fletcher32=True)
    spans = np.asarray(info.needle_spans, np.int32).reshape(-1, 2)
    group.create_dataset("needle_spans", data=spans, fletcher32=True)
    num_tokens, head_dim = info.num_tokens, header.geometry.head_dim
    for layer in header.layers:
        layer_group = group.create_group(f"layers/{layer}")
        for tensor, data in zip(TENSORS, tensors[layer], strict=True):
            data = np.asarray(data, STORED_DTYPE)
            if data.ndim != 3 or data.shape[1:] != (num_tokens, head_dim):
                raise ValueError(
                    f"sample {info.name} layer {layer} {tensor}: expected [heads, {num_tokens}, "
                    f"{head_dim}], got {list(data.shape)}"
                )
            if not np.isfinite(data).all():
                raise ValueError(f"sample {info.name} layer {layer} {tensor}: NaN/Inf (or beyond float16 range)")
            layer_group.create_dataset(tensor, data=data, chunks=(1, num_tokens, head_dim), fletcher32=True)

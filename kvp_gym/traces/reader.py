"""Reading trace files: :func:`open_traces`, :func:`open_compatible` and :class:`TraceFile`, whose heads and
tensors are read on demand. A file is verified (its seal) and validated (its schema) when it opens; each tensor is
checked when it is read.

Imports only kvp_gym.traces.format, .seal and .validate (and h5py, numpy, torch).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

from kvp_gym.traces import seal
from kvp_gym.traces.format import (
    FORMAT_VERSION,
    SPLITS,
    STORED_DTYPE,
    TENSORS,
    HeadTrace,
    SampleInfo,
    TraceFormatError,
    TraceFormatWarning,
)
from kvp_gym.traces.validate import LIBRARY_ERRORS, TraceValidator


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
        self._seal = seal.verify_seal(self.path)  # None: an unsealed (version-1) file
        if self._seal is None:
            seal.probe_unsealed(self.path)
        try:
            # No HDF5 chunk cache: a chunk is one head, read whole and once per request, and a cache per open
            # dataset (1 MiB each, up to 4096 kept open below) would grow memory with the number of samples read.
            self._h5 = h5py.File(self.path, "r", rdcc_nbytes=0)
        except LIBRARY_ERRORS as err:
            raise TraceFormatError(self.path, "/", f"not a readable HDF5 file (truncated or corrupt?): {err}") from None
        # Resolving an HDF5 path costs ~40 us, as much as reading a head: keep recently used datasets open.
        node = functools.lru_cache(maxsize=4096)(self._h5.__getitem__)
        self._validator = TraceValidator(self.path, self._h5, sealed=self._seal is not None, node=node)
        try:
            with self._validator.reading("/"):
                self.header = self._validator.read_header()
                self._validator.check_structure(self.header)
                self.samples: dict[str, SampleInfo] = self._validator.read_samples(self.header)
                if self._seal is not None:
                    seal.verify_attributes(self.path, self._h5, self._seal)
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
            rows = slice(group[0], group[-1] + 1) if _contiguous(group) else group
            query_data = self._validator.read_tensor(f"{base}/queries", rows)
        else:
            query_data = np.zeros((len(group), 0, geometry.head_dim), STORED_DTYPE)
        keys = self._validator.read_tensor(f"{base}/keys", kv_head)
        values = self._validator.read_tensor(f"{base}/values", kv_head)
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
            layer: tuple(
                self._validator.read_tensor(f"samples/{name}/layers/{layer}/{t}", slice(None)) for t in TENSORS
            )
            for layer in self.header.layers
        }

    def check(self) -> Iterator[TraceFormatError]:
        """Verify the whole file: the tensor data against the seal, then every tensor of every sample (checksums,
        NaN/Inf). Yields each problem found (nothing if the file is sound). What :func:`open_traces` validates
        is checked when the file opens; a file that opens and passes ``check`` reads without error everywhere."""
        if self._seal is not None and not seal.tensor_data_intact(self.path, self._seal):
            yield TraceFormatError(self.path, "/", "the tensor data differ from what the file was sealed with")
        for info in self.samples.values():
            for layer in self.header.layers:
                for tensor in TENSORS:
                    try:
                        self._validator.read_tensor(f"samples/{info.name}/layers/{layer}/{tensor}", slice(None))
                    except TraceFormatError as err:
                        yield err

    @property
    def content_id(self) -> str | None:
        """SHA-256 (hex) naming the file's content, from its verified seal's digests of the tensors, the structure
        and the attributes; None for an unsealed (version-1) file."""
        return None if self._seal is None else seal.content_id(self._seal)

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


def _contiguous(heads: list[int]) -> bool:
    return heads == list(range(heads[0], heads[-1] + 1))

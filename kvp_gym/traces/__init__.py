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

The rooms, each importing only those above it:

- ``format``: constants, errors, the dataclasses, sample naming, and the header and sample rules that the reader
  and the writer share;
- ``seal``: the integrity seal (write, verify, digests) and the deadline probe of unsealed version-1 files;
- ``validate``: the schema validation a file passes when it opens, and the checks of each tensor read;
- ``reader``: ``open_traces``, ``open_compatible``, ``TraceFile``;
- ``writer``: ``write_traces``;
- ``merge``: ``merge_traces`` (reader + writer).

The deadline of the version-1 probe is read from :mod:`kvp_gym.traces.seal`: set
``kvp_gym.traces.seal.UNSEALED_PROBE_SECONDS`` to change it (it is not re-exported here: a copy could not change
it).

Imports only kvp_gym.attention and kvp_gym.storage (through its rooms).
"""

from kvp_gym.traces.format import (
    FORMAT_VERSION,
    FUTURE_SOURCES,
    READABLE_VERSIONS,
    SPLITS,
    STORED_DTYPE,
    HeadTrace,
    ModelGeometry,
    SampleInfo,
    TraceFormatError,
    TraceFormatWarning,
    TraceHeader,
    collection_digest,
    sample_name,
)
from kvp_gym.traces.merge import merge_traces
from kvp_gym.traces.reader import TraceFile, open_compatible, open_traces
from kvp_gym.traces.writer import write_traces

__all__ = [
    "FORMAT_VERSION",
    "FUTURE_SOURCES",
    "READABLE_VERSIONS",
    "SPLITS",
    "STORED_DTYPE",
    "HeadTrace",
    "ModelGeometry",
    "SampleInfo",
    "TraceFile",
    "TraceFormatError",
    "TraceFormatWarning",
    "TraceHeader",
    "collection_digest",
    "merge_traces",
    "open_compatible",
    "open_traces",
    "sample_name",
    "write_traces",
]

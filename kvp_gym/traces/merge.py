"""Merging trace files: :func:`merge_traces` joins files (e.g. the shards of one collection) into one, reading
each with the reader and writing the result with the writer; a single input is upgraded to the current format.

Imports only kvp_gym.traces.format, .reader and .writer.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from kvp_gym.traces.format import FORMAT_VERSION, TraceFormatError, TraceHeader
from kvp_gym.traces.reader import TraceFile, open_traces
from kvp_gym.traces.writer import write_traces


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

"""Integrity: the seal of a version-2 trace file, and the deadline probe that stands in for it on version 1.

A version-2 file is an HDF5 file with a 512-byte user block (bytes HDF5 reserves for its user and never reads)
followed, after the HDF5 data, by the seal: JSON with the SHA-256 of every byte of the HDF5 part outside the
tensor chunks (the "skeleton": superblock, object headers, B-trees, heaps: all structure and attributes), of
the tensor chunks, and of the attributes' canonical JSON. The user block points to the seal and holds its hash.
Opening verifies the user block, the seal and the skeleton with plain file reads, before HDF5 parses anything;
tensor chunks are verified by their Fletcher-32 checksums when read, and against the seal by ``TraceFile.check``.

Imports only kvp_gym.traces.format (and h5py, numpy).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from kvp_gym.traces.format import FORMAT_VERSION, USERBLOCK_BYTES, TraceFormatError

# How long the HDF5 library may take to read the metadata of an unsealed (version-1) file before the file is
# called damaged: a damaged string heap can make the library loop forever (see probe_unsealed).
UNSEALED_PROBE_SECONDS = 60.0

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_SEAL_MAGIC = b"kvp-gym trace seal\n"


def seal_file(path: Path) -> None:
    """Seal a version-2 file just written by HDF5 (closed, with a ``USERBLOCK_BYTES``-byte user block): append the
    seal after the HDF5 data and write its pointer into the user block."""
    end = path.stat().st_size
    with h5py.File(path, "r") as h5:
        if h5.userblock_size != USERBLOCK_BYTES:
            raise ValueError(f"{path}: expected a {USERBLOCK_BYTES}-byte HDF5 user block, found {h5.userblock_size}")
        seal = {
            "format_version": FORMAT_VERSION,
            "hdf5_end": end,
            "data_ranges": _data_ranges(h5),
            "metadata_sha256": metadata_digest(h5),
        }
    seal["skeleton_sha256"], seal["data_sha256"] = _seal_digests(path, seal, data=True)
    raw = json.dumps(seal, sort_keys=True).encode()
    with open(path, "r+b") as file:
        file.seek(end)
        file.write(raw)
        file.truncate()
        file.seek(0)
        file.write(_userblock(end, len(raw), hashlib.sha256(raw).hexdigest()))


def verify_seal(path: Path) -> dict | None:
    """The verified seal of a version-2 file, or None for a file that is plain HDF5 from its first byte (version
    1). Reads only the user block, the seal and the skeleton; any difference is a TraceFormatError."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(USERBLOCK_BYTES)
        if head.startswith(_HDF5_SIGNATURE):
            return None
        offset, length, digest = _seal_pointer(path, file, head)
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


def verify_attributes(path: Path, h5: h5py.File, seal: dict) -> None:
    """Refuse an open file whose attributes differ from those its (verified) seal records."""
    if metadata_digest(h5) != seal["metadata_sha256"]:
        raise TraceFormatError(path, "/", "the attributes differ from those the file was sealed with")


def tensor_data_intact(path: Path, seal: dict) -> bool:
    """Whether every tensor chunk's bytes hash to what the (verified) seal records; reads the whole file."""
    return _seal_digests(path, seal, data=True)[1] == seal["data_sha256"]


def content_id(seal: dict) -> str:
    """SHA-256 (hex) naming a sealed file's content, from its seal's digests of the tensors, the structure and the
    attributes."""
    digests = (seal["skeleton_sha256"], seal["data_sha256"], seal["metadata_sha256"])
    return hashlib.sha256(":".join(digests).encode()).hexdigest()


def metadata_digest(h5: h5py.File) -> str:
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


def _userblock(offset: int, length: int, digest: str) -> bytes:
    pointer = json.dumps({"seal_offset": offset, "seal_length": length, "seal_sha256": digest}, sort_keys=True)
    return (_SEAL_MAGIC + pointer.encode() + b"\n").ljust(USERBLOCK_BYTES, b"\0")


def _seal_pointer(path: Path, file, head: bytes) -> tuple[int, int, str]:
    """(offset, length, SHA-256) of the seal, from the user block ``head`` of a file that does not start with the
    HDF5 signature; a TraceFormatError unless the user block is intact."""
    if not head.startswith(_SEAL_MAGIC):
        file.seek(USERBLOCK_BYTES)
        if file.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
            raise TraceFormatError(path, "/", f"the integrity header (the first {USERBLOCK_BYTES} bytes) is damaged")
        raise TraceFormatError(path, "/", "not a readable HDF5 file (truncated or corrupt?): no HDF5 signature")
    try:
        pointer = json.loads(head[len(_SEAL_MAGIC) :].split(b"\n", 1)[0])
        offset, length, digest = pointer["seal_offset"], pointer["seal_length"], pointer["seal_sha256"]
        intact = all(isinstance(v, int) for v in (offset, length)) and head == _userblock(offset, length, digest)
    except (ValueError, KeyError, TypeError, AttributeError):
        intact = False
    if not intact:
        raise TraceFormatError(path, "/", f"the integrity header (the first {USERBLOCK_BYTES} bytes) is damaged")
    return offset, length, digest


def _seal_digests(path: Path, seal: dict, data: bool) -> tuple[str, str | None]:
    """SHA-256 (hex) of the skeleton and, with ``data``, of the tensor chunks, as the seal describes them."""
    skeleton, chunks = hashlib.sha256(), hashlib.sha256()
    at = USERBLOCK_BYTES
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


# A damaged heap of string attributes can make the HDF5 library loop forever while reading an attribute, and a
# thread cannot interrupt it; so an unsealed file's metadata is first read by a separate process with a deadline.
_PROBE = """
import sys, h5py
with h5py.File(sys.argv[1], "r") as h5:
    dict(h5.attrs)
    h5.visititems(lambda name, node: dict(node.attrs) and None)
"""


def probe_unsealed(path: Path) -> None:
    """Refuse an unsealed file whose metadata the HDF5 library cannot read within UNSEALED_PROBE_SECONDS (read from
    this module at each call: set ``kvp_gym.traces.seal.UNSEALED_PROBE_SECONDS`` to change it)."""
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

"""Future importance computed once per trace and kept in a sidecar store, for training, KVEvict-v0 and evaluation.

Future importance (:func:`kvp_gym.utility.future_importance`) depends only on a trace's tensors and the split
point, yet it is the costly part of an episode: it reads the queries, which are 3x the keys for SmolLM2, and runs
attention over them. :class:`ImportanceStore` computes it once per (sample, layer, split point), for every KV head
of the layer at once (float32 [H_kv, n], n = the split point), and keeps it on disk; ``kvp-gym train``,
``KVEvict-v0`` (episodes split at the prompt boundary) and ``kvp-gym evaluate`` all read it from there.

Where: ``$KVP_GYM_IMPORTANCE`` if set (a folder; ``off`` = compute every time, store nothing), else
``importance/`` in the user cache (:func:`kvp_gym.storage.cache_dir`). Inside it, one folder per trace content,
named by the trace's content id (:attr:`kvp_gym.traces.TraceFile.content_id`, from the digests its seal holds;
the SHA-256 of every byte for an unsealed version-1 file), holding ``trace.json`` (the content id, the paths the
trace was opened from, its model) and one entry file per (sample, layer, split point):
``<sample>/<layer>-<split>.importance``.

- Stale: a rewritten trace has a new content id, hence a new folder; a folder whose ``trace.json`` names the same
  path with another content id is stale and is removed when the new one is made.
- Atomic and resumable: every entry is written on its own, atomically (:func:`kvp_gym.storage.atomic_path`), as
  soon as it is computed; an interrupted precomputation resumes with the entries it has not written yet.
- Damage: an entry records its content id, sample, layer, split point, shape and the SHA-256 of its values; one
  that disagrees (damaged, truncated, or copied from another trace) is recomputed and rewritten, with a warning
  naming the file and what was wrong (:class:`ImportanceError`).

Results are the same with and without the store: an entry holds the exact float32 values the computation gave.

Entry file: the line ``kvp-gym importance 1``, one line of JSON ``{"content_id", "sample", "layer", "split",
"heads", "sha256"}``, then heads x split float32 values, little-endian, row-major.

Imports kvp_gym.storage, kvp_gym.traces and kvp_gym.utility.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from kvp_gym.storage import atomic_path, cache_dir, file_sha256
from kvp_gym.traces import SampleInfo, TraceFile
from kvp_gym.utility import future_importance

log = logging.getLogger(__name__)
ENTRY_MAGIC = b"kvp-gym importance 1\n"
MANIFEST = "trace.json"


class ImportanceError(ValueError):
    """An importance entry that cannot be used: ``file`` and ``field`` name it and what is wrong."""

    def __init__(self, file: str | os.PathLike, field: str, message: str):
        self.file, self.field = str(file), field
        super().__init__(f"{file}: {field}: {message}")


class ImportanceWarning(UserWarning):
    """A damaged or mismatched importance entry was found and is being recomputed."""


def importance_root() -> Path | None:
    """The store's folder: ``$KVP_GYM_IMPORTANCE``, or ``importance/`` in the user cache; None when it is ``off``."""
    setting = os.environ.get("KVP_GYM_IMPORTANCE", "")
    if setting.lower() == "off":
        return None
    return Path(setting) if setting else cache_dir() / "importance"


def content_id(trace: TraceFile) -> str:
    """The SHA-256 (hex) naming a trace file's content: from its seal, or of every byte of an unsealed file."""
    return trace.content_id or file_sha256(trace.path)


class ImportanceStore:
    """Future importance of one open trace file, computed once per (sample, layer, split point) and kept.

    Args:
        trace: the open trace file.
        sidecar: True = the default folder (:func:`importance_root`; nothing is stored when it is ``off``), False =
            compute every time and store nothing, or a folder to keep the store in.
        device: where importance is computed (CUDA: the Triton kernel); entries are float32 CPU tensors.
    """

    def __init__(self, trace: TraceFile, sidecar: bool | str | os.PathLike = True, device: str | torch.device = "cpu"):
        self.trace, self.device = trace, torch.device(device)
        root = (importance_root() if sidecar else None) if isinstance(sidecar, bool) else Path(sidecar)
        self.content_id = content_id(trace)
        self.folder = None if root is None else root / self.content_id
        if self.folder is not None:
            self._register(root)

    def layer(
        self,
        sample: SampleInfo | str,
        layer: int,
        split: int,
        tensors: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Importance of every KV head of ``layer`` at split point ``split``: float32 [H_kv, split] (CPU).

        Read from the store if there, else computed (from ``tensors`` = (queries [H_kv, G, S, D], keys
        [H_kv, S, D]) of the layer when given, else read from the trace) and stored.
        """
        info = self.trace.samples[sample] if isinstance(sample, str) else sample
        if not 0 < split <= info.num_tokens:
            raise ValueError(f"{self.trace.path}: split point {split} outside [1, {info.num_tokens}] of {info.name}")
        path = self.entry_path(info.name, layer, split)
        if path is not None and path.exists():
            try:
                return self._read(path, info.name, layer, split)
            except ImportanceError as err:
                warnings.warn(f"{err}; recomputing it", ImportanceWarning, stacklevel=2)
        importance = self._compute(info, layer, [split], tensors)[0]
        if path is not None:
            self._write(path, info.name, layer, split, importance)
        return importance

    def ensure(self, sample: SampleInfo | str, layer: int, splits: Sequence[int]) -> int:
        """Compute and store whatever of (``sample``, ``layer``, each split point) the store lacks, reading the
        layer's tensors once; return how many entries were computed. Without a folder, nothing is done."""
        if self.folder is None:
            return 0
        info = self.trace.samples[sample] if isinstance(sample, str) else sample
        missing = []
        for split in sorted(set(splits)):
            path = self.entry_path(info.name, layer, split)
            try:
                if path.exists():
                    self._read(path, info.name, layer, split)
                    continue
            except ImportanceError as err:
                warnings.warn(f"{err}; recomputing it", ImportanceWarning, stacklevel=2)
            missing.append(split)
        if missing:
            for split, importance in zip(missing, self._compute(info, layer, missing), strict=True):
                self._write(self.entry_path(info.name, layer, split), info.name, layer, split, importance)
        return len(missing)

    def entry_path(self, sample: str, layer: int, split: int) -> Path | None:
        """Where the entry of (sample, layer, split point) lives; None without a folder."""
        return None if self.folder is None else self.folder / sample / f"{layer}-{split}.importance"

    # -- computing ----------------------------------------------------------------------------------------------
    def _compute(
        self,
        info: SampleInfo,
        layer: int,
        splits: list[int],
        tensors: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """[H_kv, split] float32 CPU tensors, one per split point (one read of the layer's tensors for all)."""
        if tensors is None:
            heads = range(self.trace.header.geometry.num_kv_heads)
            reads = [self.trace.head(info, layer, h) for h in heads]
            tensors = torch.stack([r.queries for r in reads]), torch.stack([r.keys for r in reads])
        queries, keys = (t.to(self.device) for t in tensors)
        attention = self.trace.header.attention_of(layer)
        return [future_importance(queries, keys, split, attention=attention).cpu() for split in splits]

    # -- entries ------------------------------------------------------------------------------------------------
    def _read(self, path: Path, sample: str, layer: int, split: int) -> torch.Tensor:
        raw = path.read_bytes()
        if not raw.startswith(ENTRY_MAGIC):
            raise ImportanceError(path, "header", f"expected a file starting {ENTRY_MAGIC!r} (damaged?)")
        line, _, data = raw[len(ENTRY_MAGIC) :].partition(b"\n")
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ImportanceError(path, "header", f"invalid JSON: {err}") from None
        if not isinstance(record, dict):
            raise ImportanceError(path, "header", "expected a JSON object")
        heads = self.trace.header.geometry.num_kv_heads
        expected = {"content_id": self.content_id, "sample": sample, "layer": layer, "split": split, "heads": heads}
        for field, value in expected.items():
            if record.get(field) != value:
                raise ImportanceError(path, field, f"expected {value!r}, found {record.get(field)!r}")
        if len(data) != heads * split * 4:
            raise ImportanceError(path, "data", f"expected {heads * split * 4} bytes, found {len(data)} (truncated?)")
        if hashlib.sha256(data).hexdigest() != record.get("sha256"):
            raise ImportanceError(path, "sha256", "the values differ from their recorded SHA-256 (damaged)")
        return torch.from_numpy(np.frombuffer(data, "<f4").reshape(heads, split).copy())

    def _write(self, path: Path, sample: str, layer: int, split: int, importance: torch.Tensor) -> None:
        data = importance.numpy().astype("<f4").tobytes()
        record = {
            "content_id": self.content_id,
            "sample": sample,
            "layer": layer,
            "split": split,
            "heads": importance.shape[0],
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        with atomic_path(path) as tmp:
            tmp.write_bytes(ENTRY_MAGIC + json.dumps(record, sort_keys=True).encode() + b"\n" + data)

    def _register(self, root: Path) -> None:
        """Record this trace's path in the folder's manifest; a new folder removes those of the path's former
        contents (stale)."""
        manifest = self.folder / MANIFEST
        path = str(self.trace.path.resolve())
        record: dict = {}
        if manifest.exists():
            try:
                record = json.loads(manifest.read_text())
            except ValueError:
                record = {}
            if not isinstance(record, dict) or record.get("content_id") != self.content_id:
                warnings.warn(f"{manifest}: not this folder's manifest; rewriting it", ImportanceWarning, stacklevel=3)
                record = {}
        if path in record.get("paths", []):
            return
        for other in root.glob(f"*/{MANIFEST}"):
            if other.parent == self.folder:
                continue
            try:
                former = json.loads(other.read_text())
                paths = former["paths"]
            except (ValueError, KeyError, TypeError, OSError):
                continue
            if path in paths:  # the file at this path held other content before: that folder is stale for it
                remaining = sorted(set(paths) - {path})
                if remaining:  # other paths still hold that content (copies, links)
                    with atomic_path(other) as tmp:
                        tmp.write_text(json.dumps({**former, "paths": remaining}, indent=2))
                else:
                    log.info("%s changed: removing its stale importance folder %s", path, other.parent)
                    shutil.rmtree(other.parent, ignore_errors=True)
        record = {
            "content_id": self.content_id,
            "model": self.trace.header.model,
            "paths": sorted({*record.get("paths", []), path}),
        }
        with atomic_path(manifest) as tmp:
            tmp.write_text(json.dumps(record, indent=2))

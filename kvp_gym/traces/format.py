"""The trace format's vocabulary: its constants, errors, dataclasses, sample naming, and the rules a header and a
sample must satisfy, shared by the reader (which refuses a file that breaks them) and the writer (which refuses to
write one).

Imports only kvp_gym.attention (and numpy, torch).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from kvp_gym.attention import AttentionSpec, Rotary

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
SPLITS = ("train", "val", "test")
FUTURE_SOURCES = ("greedy", "text")
STORED_DTYPE = np.float16
# A version-2 file starts with this many bytes that HDF5 reserves for its user and never reads: the seal's pointer.
USERBLOCK_BYTES = 512

# The attributes the format defines, on the file and on each sample group, and each layer's datasets.
GEOMETRY_ATTRS = (
    "num_layers",
    "num_query_heads",
    "num_kv_heads",
    "head_dim",
    "rope",
    "sliding_window",
    "vocab_size",
)
FILE_ATTRS = (
    "format_version",
    "model",
    *GEOMETRY_ATTRS,
    "kv_head_of_query",
    "layers",
    "dtype",
    "kvp_gym_version",
    "collection",
    "attention",
)
SAMPLE_ATTRS = ("index", "task", "split", "prompt_length", "answers", "metadata", "future_source")
TENSORS = ("queries", "keys", "values")


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
    # soft-cap), and one RoPE per model layer (given as one Rotary, or None = unknown, it applies to every layer;
    # models such as Gemma 3 rotate local and global layers with different bases). Files written before these
    # were recorded read as the defaults.
    attention: tuple[AttentionSpec, ...] = ()
    rotary: Rotary | tuple[Rotary | None, ...] | None = None

    def __post_init__(self):
        if not self.attention and self.geometry.head_dim > 0:  # (a head_dim < 1 is refused by validation)
            standard = AttentionSpec.standard(self.geometry.head_dim)
            object.__setattr__(self, "attention", (standard,) * self.geometry.num_layers)
        if not isinstance(self.rotary, tuple):
            object.__setattr__(self, "rotary", (self.rotary,) * self.geometry.num_layers)

    def attention_of(self, layer: int) -> AttentionSpec:
        """What layer ``layer``'s attention computes (see :class:`kvp_gym.attention.AttentionSpec`)."""
        return self.attention[layer]

    def rotary_of(self, layer: int) -> Rotary | None:
        """The RoPE layer ``layer`` applied to its queries and keys (None when unknown)."""
        return self.rotary[layer]

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


# -- validation rules shared by the reader and the writer ---------------------------------------------------------
def header_problem(header: TraceHeader) -> tuple[str, str] | None:
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


def sample_problem(info: SampleInfo, header: TraceHeader) -> tuple[str, str] | None:
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

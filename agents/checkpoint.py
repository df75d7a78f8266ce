"""KVP agent checkpoints: one safetensors file holding every head's network, with JSON metadata.

Metadata (the safetensors header's ``kvp_gym`` entry): format, package version, model id and geometry, the
(layer, KV head) of each network row, the network's configuration (with the ablation options ``key_frame``,
``ages`` and ``index``, agents/kvp.py; a checkpoint written before they existed reads as post-RoPE keys and the
age and index tables), the training configuration, the trace-set hash and each head's validation score.
:func:`load` returns a scorer usable by the environment's callers, ``kvp-gym evaluate`` and the evicting cache;
:class:`KVPScorer` is registered as ``kvp``.

Trained agents ship with the package in ``agents/checkpoints/`` (``SHIPPED``, by model id; docs/agents.md says how
each was made); ``kvp`` without a checkpoint uses them.

Imports kvp_gym.scorers (the scorer contract), kvp_gym.storage, kvp_gym.version and kvp_gym_agents.kvp.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kvp_gym.scorers import HeadView, ScorerError
from kvp_gym.storage import atomic_path
from kvp_gym.version import __version__
from kvp_gym_agents.kvp import KVPNetwork, agent_keys, ages_of

CHECKPOINT_FORMAT = "kvp-gym/kvp-agents-v1"
DEFAULT_MODEL = "smollm2-135m"  # kvp_gym.models.DEFAULT_MODEL, not imported here: that module loads transformers
# The shipped agents by model id (docs/agents.md): ``kvp`` uses SmolLM2's, ``kvp:model=gemma3-270m`` Gemma 3's.
SHIPPED = {
    model: Path(__file__).parent / "checkpoints" / f"{model}.safetensors" for model in (DEFAULT_MODEL, "gemma3-270m")
}


def save_checkpoint(path: str | Path, network: KVPNetwork, heads: list[tuple[int, int]], metadata: dict) -> Path:
    """Write ``network`` (row i = agent of ``heads[i]`` = (layer, kv_head)) and ``metadata`` atomically."""
    if len(heads) != network.heads:
        raise ValueError(f"{len(heads)} head ids for a network of {network.heads} heads")
    record = {
        **metadata,
        "format": CHECKPOINT_FORMAT,
        "kvp_gym_version": __version__,
        "heads": [list(h) for h in heads],
        "network": network.config(),
    }
    tensors = {name: t.detach().cpu().contiguous() for name, t in network.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"kvp_gym": json.dumps(record)})
    return Path(path)


def merge_checkpoints(paths: list[str | Path], out: str | Path) -> dict:
    """Join checkpoints of disjoint head groups (``kvp-gym train --parallel heads``) into one, in the given order;
    return its metadata. They must share the model, geometry and network settings; each group's validation
    record is kept (``validation.groups``), the merged score is the mean over every head."""
    networks, records = zip(*(read_checkpoint(p) for p in paths), strict=True)
    first = records[0]
    for path, network, record in zip(paths, networks, records, strict=True):
        for key in ("model", "geometry"):
            if record[key] != first[key]:
                raise ValueError(f"{path}: {key} {record[key]!r} differs from {paths[0]}'s {first[key]!r}")
        differs = {k for k, v in network.config().items() if k != "heads" and v != networks[0].config()[k]}
        if differs:
            raise ValueError(f"{path}: network settings {sorted(differs)} differ from {paths[0]}'s")
    heads = [tuple(h) for record in records for h in record["heads"]]
    if len(set(heads)) != len(heads):
        raise ValueError(f"{[str(p) for p in paths]}: the head groups overlap")
    merged = KVPNetwork(**{**networks[0].config(), "heads": len(heads)})
    merged.load_state_dict({name: torch.cat([n.state_dict()[name] for n in networks]) for name in merged.state_dict()})
    per_head = [s for record in records for s in record["validation"]["per_head"]]
    metadata = {
        **{k: v for k, v in first.items() if k not in ("format", "kvp_gym_version", "heads", "network")},
        "validation": {
            "score": sum(per_head) / len(per_head),
            "per_head": per_head,
            "groups": [{"checkpoint": str(p), **r["validation"]} for p, r in zip(paths, records, strict=True)],
        },
    }
    save_checkpoint(out, merged, heads, metadata)
    return read_checkpoint(out)[1]


def read_checkpoint(path: str | Path) -> tuple[KVPNetwork, dict]:
    """(network, metadata) from a checkpoint; a clear ScorerError if it is not one."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get("kvp_gym")
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ScorerError(f"{path}: not a readable safetensors checkpoint ({err})") from None
    if header is None:
        raise ScorerError(
            f"{path}: no 'kvp_gym' metadata; expected a checkpoint written by kvp_gym_agents.save_checkpoint"
        )
    metadata = json.loads(header)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ScorerError(f"{path}: format {metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    network = KVPNetwork(**metadata["network"])
    network.load_state_dict(tensors)
    return network.eval(), metadata


def _cached(path: str, device: torch.device | None = None) -> tuple[KVPNetwork, dict]:
    """:func:`read_checkpoint` with the network on ``device``, read once per file version and device: a file
    rewritten in place (retrained agents; atomic writes give it a new inode) is read again. The version is the
    file's stat, not its hash: scoring calls this once per layer, and hashing 4 MB each time cost ~5 ms a call."""
    try:
        stat = os.stat(path)
    except OSError as err:
        raise ScorerError(f"{path}: not a readable safetensors checkpoint ({err})") from None
    version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return _read_once(path, version, device or torch.device("cpu"))


@functools.lru_cache(maxsize=8)
def _read_once(path: str, version: tuple[int, int, int], device: torch.device) -> tuple[KVPNetwork, dict]:
    network, metadata = read_checkpoint(path)
    return network.to(device), metadata


@dataclass(frozen=True)
class KVPScorer:
    """The learned KVP scorer: each head's own network scores its tokens from key, value and position.

    checkpoint: a file written by :func:`save_checkpoint`; empty = the agents shipped for ``model`` (default
    smollm2-135m; ``SHIPPED`` lists the models with shipped agents). keys,
    values [B..., n, D], positions [B..., n], mask [B..., n] and the view's layer / kv_head ids [B...] -> scores
    [B..., n]; a head the checkpoint has no agent for is an error. Agents trained on pre-RoPE keys (``key_frame``
    pre) un-rotate the view's keys with its ``rotary`` (:func:`kvp_gym_agents.kvp.agent_keys`, as the trainer
    does), and refuse a view without one.
    """

    checkpoint: str = ""
    model: str = ""
    name: ClassVar[str] = "kvp"
    needs_queries: ClassVar[bool] = False
    needs_future: ClassVar[bool] = False

    def __post_init__(self):
        if self.checkpoint and self.model:
            raise ScorerError("kvp: give a checkpoint or the model whose shipped agents to use, not both")
        if not self.checkpoint:
            if self.shipped_for not in SHIPPED:
                raise ScorerError(
                    f"kvp ships agents for {', '.join(SHIPPED)}, not {self.model!r}: pass checkpoint=PATH instead"
                )
            if not SHIPPED[self.shipped_for].exists():
                raise ScorerError(
                    f"no shipped KVP agents at {SHIPPED[self.shipped_for]}; pass checkpoint='path/agents.safetensors'"
                )
        _cached(self.path)  # fail early on a bad file

    @property
    def shipped_for(self) -> str:
        """The model whose shipped agents an empty checkpoint means."""
        return self.model or DEFAULT_MODEL

    @property
    def path(self) -> str:
        return str(self.checkpoint or SHIPPED[self.shipped_for])

    @property
    def files(self) -> tuple[str]:
        """The checkpoint file (the scorer contract's ``files``: resumed runs check its SHA-256)."""
        return (self.path,)

    @property
    def metadata(self) -> dict[str, Any]:
        return _cached(self.path)[1]

    def check_geometry(self, model: str, head_dim: int, num_layers: int, num_kv_heads: int) -> None:
        """Raise ScorerError naming both sides if the checkpoint was trained for another model geometry (or, with
        the shipped agents, for another model)."""
        trained = self.metadata["geometry"]
        used = {"head_dim": head_dim, "num_layers": num_layers, "num_kv_heads": num_kv_heads}
        differs = {k: (trained.get(k), v) for k, v in used.items() if trained.get(k) != v}
        hint = f" (its shipped agents: kvp:model={model})" if not self.checkpoint and model in SHIPPED else ""
        if differs:
            raise ScorerError(
                f"{self.path} was trained for {self.metadata['model']} {trained}, but is used with {model} "
                f"{used}: differs in {sorted(differs)}{hint}"
            )
        if not self.checkpoint and model != self.shipped_for:
            raise ScorerError(
                f"kvp ships agents for {', '.join(SHIPPED)}; these are {self.shipped_for}'s, not {model}'s{hint}: "
                "otherwise train some (kvp-gym train) and pass checkpoint=PATH"
            )

    @torch.no_grad()
    def score(self, view: HeadView) -> torch.Tensor:
        if view.layer is None or view.kv_head is None:
            raise ScorerError("the kvp scorer needs the view's layer and kv_head ids")
        network, metadata = _cached(self.path, view.keys.device)  # scores where the keys are: no host copy
        if view.keys.shape[-1] != network.head_dim:
            raise ScorerError(f"{self.path}: trained for head_dim {network.head_dim}, view has {view.keys.shape[-1]}")
        row_of = {tuple(h): i for i, h in enumerate(metadata["heads"])}
        pairs = zip(view.layer.reshape(-1).tolist(), view.kv_head.reshape(-1).tolist(), strict=True)
        try:
            select = torch.tensor([row_of[pair] for pair in pairs]).to(view.keys.device)  # from host ids
        except KeyError as missing:
            raise ScorerError(f"{self.path} has no agent for (layer, kv_head) {missing.args[0]}") from None
        if network.key_frame == "pre" and view.rotary is None:
            raise ScorerError(
                f"{self.path}: the agents read pre-RoPE keys (key_frame 'pre') and un-rotate the view's keys with "
                "its layer's RoPE, but the view has none (HeadView.rotary is None: a trace header without RoPE?)"
            )
        n, d = view.num_tokens, view.keys.shape[-1]
        flat = (len(select), 1, n)
        positions = view.positions.reshape(flat)
        ages = ages_of(positions, view.mask.reshape(flat))
        keys = agent_keys(view.keys.reshape(*flat, d), positions, network.key_frame, view.rotary)
        scores = network(keys, view.values.reshape(*flat, d), positions, ages, select)
        return scores.reshape(view.mask.shape)


def load(path: str | Path | None = None) -> KVPScorer:
    """The scorer of a KVP checkpoint (default: the agents shipped for smollm2-135m)."""
    return KVPScorer(str(path or ""))

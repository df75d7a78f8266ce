"""KVP agent checkpoints: one safetensors file holding every head's network, with JSON metadata.

Metadata (the safetensors header's ``kvp_gym`` entry): format, package version, model id and geometry, the
(layer, KV head) of each network row, the network's configuration, the training configuration, the trace-set
hash and each head's validation score. :func:`load` returns a scorer usable by the environment's callers,
``kvp-gym evaluate`` and the evicting cache; :class:`KVPScorer` is registered as ``kvp``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from agents.kvp import KVPNetwork
from kvp_gym import __version__
from kvp_gym.scorers import HeadView, ScorerError
from kvp_gym.storage import atomic_path

CHECKPOINT_FORMAT = "kvp-gym/kvp-agents-v1"


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
    tensors = {name: t.detach().contiguous() for name, t in network.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"kvp_gym": json.dumps(record)})
    return Path(path)


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
        raise ScorerError(f"{path}: no 'kvp_gym' metadata; expected a checkpoint written by agents.save_checkpoint")
    metadata = json.loads(header)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ScorerError(f"{path}: format {metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    network = KVPNetwork(**metadata["network"])
    network.load_state_dict(tensors)
    return network.eval(), metadata


@functools.lru_cache(maxsize=8)
def _cached(path: str) -> tuple[KVPNetwork, dict]:
    return read_checkpoint(path)


@dataclass(frozen=True)
class KVPScorer:
    """The learned KVP scorer: each head's own network scores its tokens from key, value and position.

    checkpoint: a file written by :func:`save_checkpoint`. keys, values [B..., n, D], positions [B..., n] and the
    view's layer / kv_head ids [B...] -> scores [B..., n]; a head the checkpoint has no agent for is an error.
    """

    checkpoint: str = ""
    name: ClassVar[str] = "kvp"
    needs_queries: ClassVar[bool] = False
    needs_future: ClassVar[bool] = False

    def __post_init__(self):
        if not self.checkpoint:
            raise ScorerError(
                "the kvp scorer needs a checkpoint: get_scorer('kvp', checkpoint='path/agents.safetensors')"
            )
        _cached(str(self.checkpoint))  # fail early on a bad file

    @property
    def metadata(self) -> dict[str, Any]:
        return _cached(str(self.checkpoint))[1]

    def check_geometry(self, model: str, head_dim: int, num_layers: int, num_kv_heads: int) -> None:
        """Raise ScorerError naming both sides if the checkpoint was trained for another model geometry."""
        trained = self.metadata["geometry"]
        used = {"head_dim": head_dim, "num_layers": num_layers, "num_kv_heads": num_kv_heads}
        differs = {k: (trained.get(k), v) for k, v in used.items() if trained.get(k) != v}
        if differs:
            raise ScorerError(
                f"{self.checkpoint} was trained for {self.metadata['model']} {trained}, but is used with {model} "
                f"{used}: differs in {sorted(differs)}"
            )

    @torch.no_grad()
    def score(self, view: HeadView) -> torch.Tensor:
        if view.layer is None or view.kv_head is None:
            raise ScorerError("the kvp scorer needs the view's layer and kv_head ids")
        network, metadata = _cached(str(self.checkpoint))
        if view.keys.shape[-1] != network.head_dim:
            raise ScorerError(
                f"{self.checkpoint}: trained for head_dim {network.head_dim}, view has {view.keys.shape[-1]}"
            )
        row_of = {tuple(h): i for i, h in enumerate(metadata["heads"])}
        pairs = zip(view.layer.reshape(-1).tolist(), view.kv_head.reshape(-1).tolist(), strict=True)
        try:
            select = torch.tensor([row_of[pair] for pair in pairs])
        except KeyError as missing:
            raise ScorerError(f"{self.checkpoint} has no agent for (layer, kv_head) {missing.args[0]}") from None
        n, d = view.num_tokens, view.keys.shape[-1]
        flat = (len(select), 1, n)
        scores = network(
            view.keys.reshape(*flat, d), view.values.reshape(*flat, d), view.positions.reshape(flat), select
        )
        return scores.reshape(view.mask.shape)


def load(path: str | Path) -> KVPScorer:
    """The scorer of a KVP checkpoint."""
    return KVPScorer(str(path))

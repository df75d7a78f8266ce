"""Host transfers on the evicting cache's compression path: how many tensors, and how many bytes, each scorer's
compression copies from the cache's device to the host.

Without a GPU, two measurements stand in for one:
- on the CPU, a torch function mode logs every call that copies a tensor to the host on a GPU: ``.cpu()`` (a
  no-op on the CPU, a device-to-host copy on a GPU; the bytes are the tensor's), and reads of values from a tensor
  that is not on the CPU (``.item()``, ``bool()``, ``.tolist()``, ``.numpy()``, ``.to("cpu")``);
- on the meta device (tensors with shapes and no data), the same compression with the cache moved there: any copy
  to the host or value read back raises, so a compression that completes there has none, whatever function does
  it.

On a GPU (``--device cuda``) the log counts the real copies: every value read from a CUDA tensor, and ``.cpu()``.

    python benchmarks/host_transfers.py --model tiny-random --tokens 300
    python benchmarks/host_transfers.py --model smollm2-135m --tokens 4096 [--device cuda]

Prints one row per registered scorer and writes the table as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from kvp_gym import models
from kvp_gym.cache import EvictingCache, prefill
from kvp_gym.scorers import available_scorers, get_scorer

_ALWAYS_COPIES = {torch.Tensor.cpu}
_READS_OFF_DEVICE = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
}


class TransferLog(TorchFunctionMode):
    """Counts the calls that would copy a tensor to the host if it lived on a GPU, and their bytes."""

    def __init__(self):
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if tensor is not None and (
            func in _ALWAYS_COPIES
            or (tensor.device.type != "cpu" and (func in _READS_OFF_DEVICE or _to_host(func, args, kwargs)))
        ):
            self.calls[func.__name__] += 1
            self.bytes += tensor.numel() * tensor.element_size()
        return func(*args, **kwargs)


def _to_host(func, args, kwargs) -> bool:
    if func is not torch.Tensor.to:
        return False
    target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, str | torch.device)), None))
    return target is not None and torch.device(target).type == "cpu"


def _moved(cache: EvictingCache, device: str) -> EvictingCache:
    moved = cache.copy()
    for layer in moved.layers:
        layer.keys, layer.values, layer.positions = (t.to(device) for t in (layer.keys, layer.values, layer.positions))
    return moved


def _window(scorer) -> int | None:
    return 0 if not scorer.needs_queries else getattr(scorer, "query_window", None)


def _random_agents(model, folder: Path) -> Path:
    """A checkpoint of untrained KVP agents for every head of ``model`` (transfers do not depend on the weights)."""
    from kvp_gym_agents.checkpoint import save_checkpoint
    from kvp_gym_agents.kvp import KVPNetwork

    config = model.config.get_text_config()
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = [(layer, head) for layer in range(layers) for head in range(kv_heads)]
    geometry = {"head_dim": head_dim, "num_layers": layers, "num_kv_heads": kv_heads}
    path = folder / "agents.safetensors"
    save_checkpoint(path, KVPNetwork(len(heads), head_dim), heads, {"model": "any", "geometry": geometry})
    return path


def measure(model_name: str, tokens: int, budget: int, work: Path, device: str = "cpu") -> list[dict]:
    model = models.load(model_name)[0].to(device)
    vocab = model.config.get_text_config().vocab_size
    ids = (
        [(1000 + 7919 * i) % (vocab - 1000) + 500 for i in range(tokens)]
        if vocab > 2000
        else [10 + (7 * i) % 200 for i in range(tokens)]
    )
    state = prefill(model, ids, keep_queries=None)
    heads = state.cache.layers[0].keys.shape[1]
    importance = {i: torch.rand(1, heads, tokens, device=device) for i in range(len(state.cache.layers))}
    rows = []
    for name in available_scorers():
        scorer = get_scorer(name, **({"checkpoint": str(_random_agents(model, work))} if name == "kvp" else {}))
        window = _window(scorer)
        row = {"scorer": name}
        for place in (device, "meta"):
            cache = _moved(state.cache, place)
            queries = {i: (q[..., -window:, :] if window else q).to(place) for i, q in state.queries.items()}
            log = TransferLog()
            try:
                with log:
                    cache.compress(scorer, budget, queries, {i: t.to(place) for i, t in importance.items()})
                row[place] = {"calls": sum(log.calls.values()), "bytes": log.bytes, "by_function": dict(log.calls)}
            except Exception as err:  # on meta: a host copy or value read raised
                message = str(err).splitlines()[0][:90]
                row[place] = {"failed": f"{type(err).__name__}: {message}", "calls": sum(log.calls.values())}
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--tokens", type=int, default=300, help="prompt tokens prefilled (default 300)")
    parser.add_argument("--budget", type=int, default=128, help="tokens kept per KV head (default 128)")
    parser.add_argument("--device", default="cpu", help="the model's and cache's device: cpu (default) or cuda")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = measure(args.model, args.tokens, args.budget, Path(work), args.device)
    print(f"{args.model}, {args.tokens} prompt tokens, budget {args.budget}: host transfers per compression")
    print(f"{'scorer':<20} {args.device + ': copies':>12} {'MiB':>9}   meta device")
    for row in rows:
        cpu, meta = row[args.device], row["meta"]
        verdict = meta.get("failed") or "completes: no host copy or read"
        mib = cpu.get("bytes", math.nan) / 2**20
        print(f"{row['scorer']:<20} {cpu['calls']:>12} {mib:>9.2f}   {verdict}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

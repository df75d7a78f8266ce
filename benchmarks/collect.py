"""Benchmark trace collection and trace reading, as ratios against references measured in the same run.

(a) capture overhead: time of a forward pass that records q/k/v of every layer / time of a bare forward pass over
    the same tokens (target <= 1.3).
(b) read speed: reading one KV head of one sample through ``TraceFile.head`` (queries of its GQA group, keys,
    values) vs reading the same bytes from a raw .npy file (target >= 0.5 of raw speed).

Timings alternate between the two sides and report medians, since these machines are noisy.

    python benchmarks/collect.py [--model smollm2-135m] [--tokens 1024] [--repeats 7]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from kvp_gym import models
from kvp_gym.capture import capture_qkv
from kvp_gym.traces import SampleInfo, TraceHeader, open_traces, write_traces

from timing import alternate


def capture_overhead(model_name: str, tokens: int, repeats: int) -> dict:
    model, _ = models.load(model_name)
    geometry = models.geometry(model)
    ids = torch.randint(0, geometry.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    layers = range(geometry.num_layers)

    @torch.inference_mode()
    def bare():
        model(ids, use_cache=False)

    @torch.inference_mode()
    def captured():
        with capture_qkv(model, layers):
            model(ids, use_cache=False)

    bare_s, captured_s = alternate(bare, captured, repeats)
    return {
        "model": model_name,
        "tokens": tokens,
        "bare_s": bare_s,
        "capture_s": captured_s,
        "ratio": captured_s / bare_s,
    }


def read_speed(model_name: str, tokens: int, repeats: int) -> dict:
    """One head of one sample from a trace file in ``model_name``'s geometry vs the same bytes from .npy."""
    model, _ = models.load(model_name)
    geometry = models.geometry(model)
    del model
    rng = np.random.default_rng(0)
    layers = tuple(range(geometry.num_layers))
    header = TraceHeader(model=model_name, geometry=geometry, layers=layers, collection=({},), kvp_gym_version="bench")
    info = SampleInfo(
        name="s", index=0, task="bench", split="test", prompt_length=tokens, tokens=np.zeros(tokens + 64, np.int32)
    )
    shape = (tokens + 64, geometry.head_dim)
    tensors = {
        layer: [
            rng.standard_normal((h, *shape), np.float32).astype(np.float16)
            for h in (geometry.num_query_heads, geometry.num_kv_heads, geometry.num_kv_heads)
        ]
        for layer in layers
    }
    kv_head = 1
    group = geometry.query_heads_of(kv_head)
    with tempfile.TemporaryDirectory() as folder:
        trace_path = Path(folder) / "bench.h5"
        write_traces(trace_path, header, [(info, tensors)])
        for layer, (q, k, v) in tensors.items():  # the same bytes, one raw file per layer
            np.save(
                Path(folder) / f"{layer}.npy",
                np.concatenate([q[group], k[kv_head : kv_head + 1], v[kv_head : kv_head + 1]]),
            )
        # Each call reads the next layer, so that neither side is served from a cache of the previous call.
        turn = {"trace": 0, "npy": 0}

        def next_layer(side: str) -> int:
            turn[side] += 1
            return layers[turn[side] % len(layers)]

        with open_traces(trace_path) as trace:

            def from_trace():
                return trace.head("s", next_layer("trace"), kv_head)

            def from_npy():
                return torch.from_numpy(np.load(Path(folder) / f"{next_layer('npy')}.npy"))

            trace_s, raw_s = alternate(from_trace, from_npy, repeats * 30)
    head_bytes = (len(group) + 2) * shape[0] * shape[1] * 2
    return {
        "tokens": tokens + 64,
        "head_bytes": head_bytes,
        "trace_s": trace_s,
        "npy_s": raw_s,
        "relative_speed": raw_s / trace_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    overhead = capture_overhead(args.model, args.tokens, args.repeats)
    print(
        f"(a) capture overhead, {args.model}, {args.tokens} tokens, all layers: bare {overhead['bare_s'] * 1e3:.0f} ms,"
        f" with capture {overhead['capture_s'] * 1e3:.0f} ms -> ratio {overhead['ratio']:.3f} (target <= 1.3)"
    )
    speed = read_speed(args.model, args.tokens, args.repeats)
    print(
        f"(b) one head of one {speed['tokens']}-token sample ({speed['head_bytes'] / 1024:.0f} KiB): trace "
        f"{speed['trace_s'] * 1e6:.0f} us, raw .npy {speed['npy_s'] * 1e6:.0f} us -> "
        f"{speed['relative_speed']:.2f} of raw speed (target >= 0.5)"
    )


if __name__ == "__main__":
    main()

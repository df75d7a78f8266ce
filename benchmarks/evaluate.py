"""Time ``kvp-gym evaluate`` with every baseline on 32 samples x 90 KV heads of ~1k-token prompts.

Without ``--traces``, writes a trace file in SmolLM2-135M's geometry (30 layers, 9 query / 3 KV heads, head_dim
64) with 32 samples of 1024 prompt + 64 future tokens of random float16 data: the work per head is the same as on
real traces. Reports the total time and the share spent in the attention-based scorers (TOVA, SnapKV, H2O), which
compute attention statistics over the prefill queries.

    python benchmarks/evaluate.py [--traces FILE...] [--samples 32]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from kvp_gym.attention import Rotary
from kvp_gym.evaluation import evaluate
from kvp_gym.traces import ModelGeometry, SampleInfo, TraceHeader, write_traces

SMOLLM2 = ModelGeometry(30, 9, 3, 64, (0, 0, 0, 1, 1, 1, 2, 2, 2), '{"rope_theta": 100000.0}', 0, 49152)


def synthetic_traces(path: Path, samples: int, prompt: int = 1024, future: int = 64) -> Path:
    rng = np.random.default_rng(0)
    header = TraceHeader(
        "synthetic-smollm2-geometry", SMOLLM2, tuple(range(30)), ({},), "benchmark", rotary=Rotary.default(64, 1e5)
    )

    def generate():
        for i in range(samples):
            info = SampleInfo(f"s{i:03d}", i, "bench", "test", prompt, np.zeros(prompt + future, np.int32))
            shape = (prompt + future, 64)
            yield (
                info,
                {
                    layer: [rng.standard_normal((h, *shape), np.float32).astype(np.float16) for h in (9, 3, 3)]
                    for layer in range(30)
                },
            )

    write_traces(path, header, generate())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", nargs="+", type=Path)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--split", default="all")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        traces = args.traces or [synthetic_traces(Path(folder) / "bench.h5", args.samples)]
        record = evaluate(traces, "all", split=args.split, bootstrap=100)
    timing = record["timing"]
    heads_per_sample = len(record["layers"]) * record["num_kv_heads"]
    share = timing["attention_scorer_seconds"] / timing["total_seconds"]
    print(
        f"evaluate, all {len(record['policies'])} baselines, {len(record['samples'])} samples x {heads_per_sample}"
        f" heads: {timing['total_seconds']:.1f} s; attention-based scorers {timing['attention_scorer_seconds']:.1f} s"
        f" ({share:.0%}); future importance {timing['importance_seconds']:.1f} s"
    )
    for name, p in sorted(record["policies"].items(), key=lambda kv: -kv[1]["seconds"]):
        print(f"  {name:14s} {p['seconds']:6.1f} s")


if __name__ == "__main__":
    main()

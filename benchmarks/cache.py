"""Benchmark the evicting cache on a real model, as ratios against references measured in the same run.

(a) KV bytes after compression / full KV bytes (target: budget / prompt, up to the protected tokens);
(b) peak and final process memory (RSS) of prefill + decode, with and without compression (each in a fresh
    subprocess, so one side's allocations cannot hide the other's); before the final reading, glibc's malloc_trim
    hands freed heap pages back to the OS (otherwise the allocator keeps them and RSS cannot show what was freed);
(c) compression time (scoring + compaction, every layer) / prefill time, per policy (target <= 5% for kvp and the
    attention-free baselines);
(d) decode step time with the compressed cache / with the full cache (alternating, medians).

    python benchmarks/cache.py [--model smollm2-135m] [--context 4096] [--budget 256] [--steps 16]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from kvp_gym import models
from kvp_gym.cache import decode, prefill
from kvp_gym.cache.generate import query_window
from kvp_gym.scorers import from_spec

from timing import alternate

POLICIES = "kvp,streaming_llm,knorm,keydiff,lagkv,random,tova,snapkv,h2o,expected_attention"


def _prompt(model, context: int) -> list[int]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(100, models.geometry(model).vocab_size, (context,), generator=generator).tolist()


def memory(model_name: str, context: int, budget: int | None, steps: int, policy: str) -> dict:
    """Run in a subprocess: prefill, (compress with ``policy``,) decode ``steps`` tokens; RSS peak and at the end
    (MiB)."""
    model, _ = models.load(model_name)
    ids = _prompt(model, context)
    state = prefill(model, ids)
    scorer = from_spec(policy) if budget else None
    cache = state.cache
    if scorer is not None:
        cache.compress(scorer, budget)
    state.cache = cache  # decode from the (compressed) cache; the prefill copy is gone
    tokens, _, _, _ = decode(model, state, None, None, steps)
    del state
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss_now = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20
    return {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_rss_mib": rss_now,
        "kv_mib": cache.kv_bytes / 2**20,
        "tokens": tokens.shape[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed on each side")
    parser.add_argument("--policies", default=POLICIES)
    parser.add_argument("--memory-only", action="store_true", help="only (b)")
    parser.add_argument("--memory-child", choices=("full", "compressed"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        budget = args.budget if args.memory_child == "compressed" else None
        print(json.dumps(memory(args.model, args.context, budget, args.steps, args.policies.split(",")[0])))
        return

    if not args.memory_only:
        timings(args)
    print(f"\n(b) process memory, prefill + decode, {args.policies.split(',')[0]} (fresh subprocess each)")
    for side in ("full", "compressed"):
        command = [sys.executable, __file__, "--memory-child", side, "--model", args.model]
        command += ["--context", str(args.context), "--budget", str(args.budget), "--steps", str(args.steps)]
        command += ["--policies", args.policies.split(",")[0]]
        found = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        print(
            f"{side:10s} peak RSS {found['peak_rss_mib']:8.1f} MiB, RSS after decoding {found['final_rss_mib']:8.1f} "
            f"MiB, KV cache {found['kv_mib']:7.2f} MiB"
        )


def timings(args: argparse.Namespace) -> None:
    """(a), (c) and (d)."""
    torch.set_grad_enabled(False)
    model, _ = models.load(args.model)
    ids = _prompt(model, args.context)
    scorers = {spec: from_spec(spec) for spec in args.policies.split(",")}
    window = [query_window(s) for s in scorers.values() if s.needs_queries]
    keep = None if None in window else max(window, default=0)
    prefill_seconds = []
    for _ in range(2):
        tick = time.perf_counter()
        state = prefill(model, ids, keep)
        prefill_seconds.append(time.perf_counter() - tick)
    prefill_time = min(prefill_seconds)
    full_bytes = state.cache.kv_bytes
    print(f"{args.model}, {args.context}-token prompt, budget {args.budget}; prefill {prefill_time:.2f} s")

    rows = []
    for spec, scorer in scorers.items():
        times = []
        for _ in range(3):
            cache = state.cache.copy()
            tick = time.perf_counter()
            cache.compress(scorer, args.budget, state.queries)
            times.append(time.perf_counter() - tick)
        seconds = statistics.median(times)
        rows.append((spec, seconds, seconds / prefill_time, cache.kv_bytes / full_bytes))
    protected_ratio = args.budget / args.context
    print(f"\n(a) KV bytes after / before: {rows[0][3]:.4f} (budget / prompt = {protected_ratio:.4f})")
    print("\n(c) compression (scoring + compaction, all layers) / prefill")
    print(f"{'policy':20s} {'seconds':>9s} {'/ prefill':>10s}")
    for spec, seconds, ratio, _ in rows:
        print(f"{spec:20s} {seconds:9.3f} {ratio:10.2%}")

    compressed = state.cache.copy()
    compressed.compress(scorers[next(iter(scorers))], args.budget, state.queries)
    full = state.cache.copy()
    token = torch.tensor([[int(state.logits.argmax())]])

    def step(cache):
        """One decode step, then the appended row dropped again so the cache keeps its length."""

        def run():
            model(token, cache=cache, use_cache=True)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[..., :-1, :], layer.values[..., :-1, :]
                layer.positions, layer.seen = layer.positions[..., :-1], layer.seen - 1

        return run

    full_step, compressed_step = alternate(step(full), step(compressed), args.steps, warmup=2)
    print(
        f"\n(d) decode step: compressed {compressed_step * 1e3:.1f} ms / full {full_step * 1e3:.1f} ms = "
        f"{compressed_step / full_step:.3f}"
    )


if __name__ == "__main__":
    main()

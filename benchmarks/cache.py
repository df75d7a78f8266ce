"""Benchmark the evicting cache on a real model, as ratios against references measured in the same run.

(a) KV bytes after compression / full KV bytes (target: budget / prompt, up to the protected tokens);
(b) peak and final process memory (RSS) of prefill + decode, with and without compression (each in a fresh
    subprocess, so one side's allocations cannot hide the other's); before the final reading, glibc's malloc_trim
    hands freed heap pages back to the OS (otherwise the allocator keeps them and RSS cannot show what was freed);
(c) compression time (scoring + compaction, every layer) / prefill time, per policy (target <= 5% for kvp and the
    attention-free baselines). The denominator is the same for every policy: the plain prefill, which keeps no
    query. A policy that reads queries needs a prefill that keeps them (its last W, or all of them for h2o and
    expected_attention): that prefill's extra time is printed in its own column, and its compression receives
    exactly those queries;
(d) decode step time with the compressed cache / with the full cache (alternating, medians).

    python benchmarks/cache.py [--model smollm2-135m] [--context 4096] [--budget 256] [--steps 16]
                               [--threads 1 --clock cpu]

On a machine that other processes keep busy, ``--threads 1`` keeps torch's threads from waiting on each other in
every call (with two threads on two busy cores, a decode step took 25x longer), and ``--clock cpu`` (with one
thread) times the calling thread's CPU time, blind to the time it waits while other processes hold the cores.
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
from collections.abc import Callable
from pathlib import Path

import torch

from kvp_gym import models
from kvp_gym.cache import decode, prefill
from kvp_gym.cache.generate import Prefill, query_window
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
    parser.add_argument("--threads", type=int, default=0, help="torch threads for (a), (c), (d) (0: torch's default)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="(c), (d): wall-clock or thread CPU time (--threads 1)"
    )
    parser.add_argument("--memory-child", choices=("full", "compressed"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures the calling thread only: it needs --threads 1")
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


def kept_queries(queries: dict[int, torch.Tensor], window: int | None) -> dict[int, torch.Tensor] | None:
    """What a prefill keeping ``window`` queries (0: none; None: all) would have captured, from one that kept all."""
    if window == 0:
        return None
    return queries if window is None else {layer: q[..., -window:, :].contiguous() for layer, q in queries.items()}


def prefill_times(
    model, ids: list[int], windows: list[int | None], rounds: int, clock: Callable[[], float]
) -> tuple[dict, Prefill]:
    """Fastest of ``rounds`` prefills keeping each number of queries in ``windows`` (0: none, the common
    denominator; None: all), after one untimed prefill of the last (widest) window, alternating, each round in
    another order; and that untimed prefill."""
    widest = prefill(model, ids, windows[-1])
    times: dict[int | None, list[float]] = {window: [] for window in windows}
    for round_ in range(rounds):
        for window in windows[round_ % len(windows) :] + windows[: round_ % len(windows)]:
            tick = clock()
            prefill(model, ids, window)
            times[window].append(clock() - tick)
    return {window: min(found) for window, found in times.items()}, widest


def timings(args: argparse.Namespace) -> None:
    """(a), (c) and (d)."""
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = models.load(args.model)
    ids = _prompt(model, args.context)
    scorers = {spec: from_spec(spec) for spec in args.policies.split(",")}
    window = {spec: query_window(scorer) for spec, scorer in scorers.items()}
    # Every policy's compression time is divided by the same prefill: the plain one, which keeps no query (what
    # kvp and the attention-free policies run). Prefills that keep queries for a policy cost more; their extra
    # time is printed beside it, not folded into its ratio.
    kept = sorted({w for w in window.values() if w != 0}, key=lambda w: float("inf") if w is None else w)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    prefill_seconds, state = prefill_times(model, ids, [0, *kept], 2, clock)
    plain = prefill_seconds[0]
    full_bytes = state.cache.kv_bytes
    print(
        f"{args.model}, {args.context}-token prompt, budget {args.budget}, {torch.get_num_threads()} torch "
        f"thread{'s' * (torch.get_num_threads() > 1)}, {'thread CPU' if args.clock == 'cpu' else 'wall-clock'} time; "
        f"prefill {plain:.2f} s (keeping no query; fastest of 2 after a warm-up, alternating with the prefills that "
        "keep queries)"
    )

    rows = []
    for spec, scorer in scorers.items():
        queries = kept_queries(state.queries, window[spec]) if state.queries else None  # what its prefill keeps
        times = []
        for _ in range(3):
            cache = state.cache.copy()
            tick = clock()
            cache.compress(scorer, args.budget, queries)
            times.append(clock() - tick)
        seconds = statistics.median(times)
        rows.append((spec, seconds, cache.kv_bytes / full_bytes))
    protected_ratio = args.budget / args.context
    print(f"\n(a) KV bytes after / before: {rows[0][2]:.4f} (budget / prompt = {protected_ratio:.4f})")
    print(
        f"\n(c) compression (scoring + compaction, all layers; median of 3) / the same prefill for every policy "
        f"({plain:.2f} s, keeping no query); and the extra time of the prefill that keeps the queries a policy reads"
    )
    print(f"{'policy':20s} {'seconds':>9s} {'/ prefill':>10s}  {'queries kept':>12s} {'prefill extra':>14s}")
    for spec, seconds, _ in rows:
        w = window[spec]
        extra = f"{prefill_seconds[w] / plain - 1:+.1%}" if w != 0 else "-"
        print(
            f"{spec:20s} {seconds:9.3f} {seconds / plain:10.2%}  {'all' if w is None else w or 'none':>12} {extra:>14s}"
        )

    compressed = state.cache.copy()
    first = next(iter(scorers))
    compressed.compress(scorers[first], args.budget, kept_queries(state.queries or {}, window[first]))
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

    full_step, compressed_step = alternate(step(full), step(compressed), args.steps, warmup=2, clock=clock)
    print(
        f"\n(d) decode step: compressed {compressed_step * 1e3:.1f} ms / full {full_step * 1e3:.1f} ms = "
        f"{compressed_step / full_step:.3f}"
    )


if __name__ == "__main__":
    main()

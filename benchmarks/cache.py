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
(d) decode step time with the compressed cache / with the full cache (alternating, medians);
(e) with ``--chunked``: the chunked prefill (kvp_gym.cache.generate.prefill_compressing, a variant of ours) against
    the one-shot prefill + compression, each configuration in a fresh subprocess: the peak RSS of prefill +
    compression + decoding (VmHWM, reset once the model is loaded and its weights paged in, so loading does not
    count) and what it adds to the model's RSS, the most KV bytes the cache held, the prefill + compression wall
    and process CPU time (with ``--threads 1``, blind to other processes' load), and the tokens decoded from a
    random prompt. The one-shot prefill runs twice: as it was before it kept only the last
    position's logits (``full logits``, every position projected onto the vocabulary) and as it is.

    python benchmarks/cache.py [--model smollm2-135m] [--context 4096] [--budget 256] [--steps 16]
                               [--threads 1 --clock cpu] [--rounds 2]
    python benchmarks/cache.py --chunked [--contexts 4096,16384] [--budgets 256,512] [--prefill-chunk 512]
                               [--policies knorm,streaming_llm,tova,kvp] [--one-shot-policies knorm]

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
from kvp_gym.cache import EvictingCache, decode, prefill
from kvp_gym.cache.generate import Prefill, chunked_prefill_refusal, prefill_compressing, query_window
from kvp_gym.capture import capture_queries
from kvp_gym.scorers import from_spec

from timing import alternate

POLICIES = "kvp,streaming_llm,knorm,keydiff,lagkv,random,tova,snapkv,h2o,expected_attention"
CHUNKED_POLICIES = "knorm,streaming_llm,tova,kvp"  # (e): query-free ones and TOVA (its last query, per chunk)


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


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux: ``5`` into /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """VmHWM: the peak RSS since the last reset (or since the start)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.inference_mode()
def _prefill_with_full_logits(model, ids: list[int], window: int | None) -> Prefill:
    """The one-shot prefill as it was before it passed logits_to_keep: every prompt position projected onto the
    vocabulary ([T, vocab] float32 logits alive until the prefill returns)."""
    cache = EvictingCache(model)
    with capture_queries(model, window) as captured:
        out = model(torch.tensor([ids], device=model.device), cache=cache, use_cache=True)
    return Prefill(cache, dict(captured) or None, out.logits[:, -1].float(), len(ids))


@torch.inference_mode()
def chunked_memory(
    model_name: str, context: int, budget: int, steps: int, policy: str, mode: str, chunk: int, device: str
) -> dict:
    """Run in a fresh subprocess: prefill ``context`` random tokens (``mode``: ``full-logits`` or ``one-shot``, then
    compress to ``budget`` with ``policy``; or ``chunked``, compressing after every ``chunk`` tokens), then decode
    ``steps`` tokens. Peak RSS above the loaded model (MiB), the most KV bytes cached, seconds, tokens."""
    model, _ = models.load(model_name)
    model.to(device)
    ids = _prompt(model, context)
    scorer = from_spec(policy)
    window = query_window(scorer)
    cuda = model.device.type == "cuda"
    model(torch.tensor([ids[:8]], device=model.device))  # pages the weights in: the baseline is the model in use
    loaded = _rss_mib()
    reset = _reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    kv_after_each_pass = []  # the cache's KV bytes after every forward pass: before each compression, the most

    def record(module, args, kwargs, output):
        if kwargs.get("cache") is not None:
            kv_after_each_pass.append(kwargs["cache"].kv_bytes)

    hook = model.register_forward_hook(record, with_kwargs=True)
    tick, cpu_tick = time.perf_counter(), time.process_time()
    if mode == "chunked":
        state = prefill_compressing(model, ids, scorer, budget, chunk)
    else:
        state = (_prefill_with_full_logits if mode == "full-logits" else prefill)(model, ids, window)
        state.cache.compress(scorer, budget, state.queries)
        state.queries = None
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - tick, time.process_time() - cpu_tick
    hook.remove()
    tokens, _, _, _ = decode(model, state, None, None, steps)
    return {
        "peak_rss_mib": _peak_rss_mib(),
        "loaded_rss_mib": loaded,
        "peak_reset": reset,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "kv_peak_mib": max(kv_after_each_pass) / 2**20,
        "kv_final_mib": state.cache.kv_bytes / 2**20,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "tokens": tokens[0].tolist(),
    }


def chunked(args: argparse.Namespace) -> None:
    """(e): one fresh subprocess per configuration, one run each, in order; a table per context."""
    budgets = [int(b) for b in args.budgets.split(",")]
    one_shot = (args.one_shot_policies or args.policies).split(",")
    policies = []
    for policy in args.policies.split(","):
        refusal = chunked_prefill_refusal(from_spec(policy), args.prefill_chunk)
        if refusal:
            print(f"skipped in the chunked rows: {refusal}")
        else:
            policies.append(policy)
    print(
        f"(e) {args.model}, chunked prefill ({args.prefill_chunk}-token chunks, a variant) vs one-shot prefill + "
        f"compression, then {args.steps} decoded tokens; one fresh subprocess per row, one run each, wall-clock "
        f"and process CPU time on {args.device}, {torch.get_num_threads() if not args.threads else args.threads} "
        "torch threads; peak RSS (VmHWM, reset once the model is loaded and its weights paged in by an 8-token "
        "forward pass) and what it adds to that RSS"
    )
    for context in [int(c) for c in args.contexts.split(",")]:
        runs = [("one-shot", policy, budgets[0]) for policy in one_shot]
        runs += [("full-logits", one_shot[0], budgets[0])]  # the one-shot prefill before logits_to_keep
        runs += [("chunked", policy, budget) for budget in budgets for policy in policies]
        print(f"\n{context}-token prompt")
        print(
            f"{'prefill':12s} {'policy':14s} {'budget':>6s} {'peak RSS':>9s} {'above model':>12s} {'KV peak':>8s} "
            f"{'KV after':>8s} {'wall s':>7s} {'CPU s':>7s}  {'tokens as one-shot':>18s}"
        )
        reference: dict[tuple[str, int], list[int]] = {}  # the one-shot tokens of (policy, budget)
        for mode, policy, budget in runs:
            child = {"--chunked-child": mode, "--model": args.model, "--device": args.device, "--context": context}
            child |= {"--budget": budget, "--steps": args.steps, "--policies": policy, "--threads": args.threads}
            child |= {"--prefill-chunk": args.prefill_chunk}
            command = [sys.executable, __file__, *(str(part) for pair in child.items() for part in pair)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:  # e.g. killed for memory: say so, and go on with the other rows
                why = (done.stderr.strip().splitlines() or ["no message"])[-1]
                print(f"{mode:12s} {policy:14s} {budget:6d} failed (exit status {done.returncode}): {why}")
                continue
            found = json.loads(done.stdout.splitlines()[-1])
            if mode == "one-shot":
                reference[policy, budget], same = found["tokens"], "(reference)"
            else:
                want = reference.get((policy, budget))
                same = "-" if want is None else "yes" if found["tokens"] == want else "no"
            cuda = f", CUDA peak {found['cuda_peak_mib']:.0f} MiB" if found["cuda_peak_mib"] is not None else ""
            print(
                f"{mode:12s} {policy:14s} {budget:6d} {found['peak_rss_mib']:8.0f}M "
                f"{found['peak_rss_mib'] - found['loaded_rss_mib']:11.0f}M {found['kv_peak_mib']:7.1f}M "
                f"{found['kv_final_mib']:7.1f}M {found['seconds']:7.1f} {found['cpu_seconds']:7.1f}  {same:>18s}{cuda}"
                + ("" if found["peak_reset"] else "  (peak not reset: includes loading)")
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed on each side")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="(c): timed prefills of each kind, after the warm-up (default 2; 1 at 16k)",
    )
    parser.add_argument("--policies", default=None, help=f"default {POLICIES}; with --chunked {CHUNKED_POLICIES}")
    parser.add_argument("--memory-only", action="store_true", help="only (b)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for (a), (c), (d) (0: torch's default)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="(c), (d): wall-clock or thread CPU time (--threads 1)"
    )
    parser.add_argument("--memory-child", choices=("full", "compressed"), help=argparse.SUPPRESS)
    parser.add_argument("--chunked", action="store_true", help="only (e): chunked vs one-shot prefill")
    parser.add_argument("--contexts", default=None, help="(e): comma-separated prompt lengths (default --context)")
    parser.add_argument("--budgets", default=None, help="(e): comma-separated budgets (default --budget)")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="(e): tokens per chunk (default 512)")
    parser.add_argument("--one-shot-policies", default=None, help="(e): policies of the one-shot rows (default all)")
    parser.add_argument("--device", default="cpu", help="(e): the model's device (default cpu)")
    parser.add_argument("--chunked-child", choices=("full-logits", "one-shot", "chunked"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures the calling thread only: it needs --threads 1")
    args.policies = args.policies or (CHUNKED_POLICIES if args.chunked else POLICIES)
    if args.chunked_child:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(
            json.dumps(
                chunked_memory(
                    args.model,
                    args.context,
                    args.budget,
                    args.steps,
                    args.policies,
                    args.chunked_child,
                    args.prefill_chunk,
                    args.device,
                )
            )
        )
        return
    if args.chunked:
        args.contexts, args.budgets = args.contexts or str(args.context), args.budgets or str(args.budget)
        chunked(args)
        return
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
    prefill_seconds, state = prefill_times(model, ids, [0, *kept], args.rounds, clock)
    plain = prefill_seconds[0]
    full_bytes = state.cache.kv_bytes
    print(
        f"{args.model}, {args.context}-token prompt, budget {args.budget}, {torch.get_num_threads()} torch "
        f"thread{'s' * (torch.get_num_threads() > 1)}, {'thread CPU' if args.clock == 'cpu' else 'wall-clock'} time; "
        f"prefill {plain:.2f} s (keeping no query; fastest of {args.rounds} after a warm-up, alternating with the "
        "prefills that keep queries)"
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

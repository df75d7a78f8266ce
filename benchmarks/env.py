"""Benchmark the utility and the KVEvict-v0 environments, as ratios against references measured in the same run.

(a) ``future_importance`` (G query heads, F future queries, n cached tokens, head_dim D) vs one dense batched
    matmul [G, F, D] x [D, n] of the same shape (target <= 2x; on a CPU this is the torch path of
    kvp_gym.kernels.attention_stats), with the default number of threads and with one (wall-clock, and the
    thread's CPU time): the median ratio of ``--rounds`` rounds, each the medians of 100 alternating calls, and
    every round's ratio (the spread).
(b) KVEvict-v0 episodes per second: a single env, ``SyncVectorEnv`` with 64 copies and the native vector env with
    64 (target: native >= 5x Sync). Every side runs the same number of warm-up episodes first (each env fills
    its episode cache), then is timed.

    python benchmarks/env.py [--traces traces/demo/niah_single.h5 traces/demo/essay.h5]   (run `make demo` first)
    python benchmarks/env.py --only-importance                                            (a) only
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np
import torch

import kvp_gym  # noqa: F401
from kvp_gym.utility import future_importance

from timing import alternate


def importance_vs_matmul(groups: int, prompt: int, future: int, head_dim: int, repeats: int, rounds: int) -> dict:
    """Median times of ``future_importance`` and the dense matmul, alternating, in each of ``rounds`` rounds (the
    ratio's spread shows the machine's noise): with the default number of threads and with one, in wall-clock
    time, and with one thread also in the thread's CPU time (``time.thread_time``: blind to the time the thread
    waits while other processes hold the cores, which on a busy machine lengthens the longer call more)."""
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(groups, prompt + future, head_dim, generator=g)
    keys = torch.randn(prompt + future, head_dim, generator=g)
    q_future, k_prompt = queries[:, prompt:].contiguous(), keys[:prompt].T.contiguous()
    result = {}
    default_threads = torch.get_num_threads()
    for threads, clock in ((default_threads, "wall"), (1, "wall"), (1, "cpu")):
        torch.set_num_threads(threads)
        runs = [
            alternate(
                lambda: future_importance(queries, keys, prompt),
                lambda: torch.matmul(q_future, k_prompt),
                repeats,
                warmup=10,
                clock=time.perf_counter if clock == "wall" else time.thread_time,
            )
            for _ in range(rounds)
        ]
        runs.sort(key=lambda run: run[0] / run[1])
        middle = runs[len(runs) // 2]
        result[threads, clock] = {
            "importance_s": middle[0],
            "matmul_s": middle[1],
            "ratios": [importance_s / matmul_s for importance_s, matmul_s in runs],
        }
    torch.set_num_threads(default_threads)
    return result


def episodes_per_second(config: dict, num_envs: int, mode: str | None, warmup: int, timed: int) -> float:
    """Episodes/s after ``warmup`` episodes; mode None = a single env, else gym.make_vec's vectorization mode."""
    if mode is None:
        env = gym.make("KVEvict-v0", config=config)
        env.reset(seed=0)
        action = env.action_space.sample()

        def run(episodes):
            for _ in range(episodes):
                env.step(action)
                env.reset()

        per_step = 1
    else:
        env = gym.make_vec("KVEvict-v0", num_envs=num_envs, vectorization_mode=mode, config=config)
        env.reset(seed=0)
        action = env.action_space.sample()

        def run(episodes):
            for _ in range(max(1, episodes // num_envs)):
                env.step(action)

        per_step = num_envs
    run(warmup)
    start = time.perf_counter()
    run(timed)
    seconds = time.perf_counter() - start
    env.close()
    return (timed // per_step) * per_step / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", nargs="+", default=["traces/demo/niah_single.h5", "traces/demo/essay.h5"])
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2048, help="episodes before timing, per side")
    parser.add_argument("--timed", type=int, default=2048, help="episodes timed, per side")
    parser.add_argument("--rounds", type=int, default=5, help="(a): rounds of 100 alternating calls, per thread count")
    parser.add_argument("--only-importance", action="store_true", help="run (a) only")
    args = parser.parse_args()

    a = importance_vs_matmul(groups=3, prompt=1024, future=256, head_dim=64, repeats=100, rounds=args.rounds)
    for (threads, clock), run in a.items():
        spread = ", ".join(f"{ratio:.2f}" for ratio in run["ratios"])
        print(
            f"(a) future_importance, G=3 F=256 n=1024 D=64, {threads} thread{'s' * (threads > 1)}, "
            f"{'wall-clock' if clock == 'wall' else 'thread CPU'} time: {run['importance_s'] * 1e3:.2f} ms vs dense "
            f"matmul {run['matmul_s'] * 1e3:.2f} ms -> {run['importance_s'] / run['matmul_s']:.2f}x (target <= 2x; "
            f"{len(run['ratios'])} rounds: {spread})"
        )
    if args.only_importance:
        return
    config = {"traces": args.traces, "cache_size": 4096}
    single = episodes_per_second(config, 1, None, args.warmup // 8, args.timed // 8)
    sync = episodes_per_second(config, args.num_envs, "sync", args.warmup, args.timed)
    native = episodes_per_second(config, args.num_envs, "vector_entry_point", args.warmup, args.timed)
    print(
        f"(b) KVEvict-v0 episodes/s: single {single:.0f}, SyncVectorEnv x{args.num_envs} {sync:.0f}, "
        f"native x{args.num_envs} {native:.0f} -> native / sync = {native / sync:.1f}x (target >= 5x)"
    )


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()

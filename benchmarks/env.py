"""Benchmark the utility and the KVEvict-v0 environments, as ratios against references measured in the same run.

(a) ``future_importance`` (G query heads, F future queries, n cached tokens, head_dim D) vs one dense batched
    matmul [G, F, D] x [D, n] of the same shape (target <= 2x; on a CPU this is the torch path of
    kvp_gym.kernels.attention_stats).
(b) KVEvict-v0 episodes per second: a single env, ``SyncVectorEnv`` with 64 copies and the native vector env with
    64 (target: native >= 5x Sync). Every side runs the same number of warm-up episodes first (each env fills
    its episode cache), then is timed.

    python benchmarks/env.py [--traces traces/demo/niah_single.h5 traces/demo/essay.h5]   (run `make demo` first)
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


def importance_vs_matmul(groups: int, prompt: int, future: int, head_dim: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(groups, prompt + future, head_dim, generator=g)
    keys = torch.randn(prompt + future, head_dim, generator=g)
    q_future, k_prompt = queries[:, prompt:].contiguous(), keys[:prompt].T.contiguous()
    importance_s, matmul_s = alternate(
        lambda: future_importance(queries, keys, prompt), lambda: torch.matmul(q_future, k_prompt), repeats, warmup=10
    )
    return {"importance_s": importance_s, "matmul_s": matmul_s, "ratio": importance_s / matmul_s}


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
    args = parser.parse_args()

    a = importance_vs_matmul(groups=3, prompt=1024, future=256, head_dim=64, repeats=100)
    print(
        f"(a) future_importance, G=3 F=256 n=1024 D=64: {a['importance_s'] * 1e3:.2f} ms vs dense matmul "
        f"{a['matmul_s'] * 1e3:.2f} ms -> {a['ratio']:.2f}x (target <= 2x)"
    )
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

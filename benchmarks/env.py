"""Benchmark the utility and the KVEvict-v0 environments, as ratios against references measured in the same run.

(a) ``future_importance`` (G query heads, F future queries, n cached tokens, head_dim D) vs one dense batched
    matmul [G, F, D] x [D, n] of the same shape (target <= 2x; on a CPU this is the torch path of
    kvp_gym.kernels.attention_stats), with the default number of threads and with one (wall-clock, and the
    thread's CPU time): the median ratio of ``--rounds`` rounds, each the medians of 100 alternating calls, and
    every round's ratio (the spread).
(b) KVEvict-v0 episodes per second: a single env, ``SyncVectorEnv`` with 64 copies and the native vector env with
    64 (target: native >= 5x Sync), in alternating rounds. Each env keeps an episode cache (an episode drawn again
    skips reading the trace); SyncVectorEnv's copies keep one each, the native env one for its 64 environments.
    Warming the caches by running episodes would favour the shared cache (2,048 warm-up episodes fill one cache
    of the native env but only 32 entries of each Sync copy), and the ratio would measure cache warmth. So every
    side's caches start in the same state, measured twice:
    - cold: ``cache_size`` 1 everywhere: every episode is read from the trace files and the importance store;
    - warm: episodes of one layer only (3 heads x the train samples: 36 on the demo traces), and every cache of
      every side filled with all of them before timing: every timed episode comes from memory.
    Then every env copy runs the same number of untimed warm-up episodes (``--warmup``), and each round times
    ``--timed`` episodes per side. SyncVectorEnv autoresets in the same step, as the native env does (its default,
    the next step, would spend every other step call on resets); episodes are counted from ``terminated``.
    Every side runs with the same number of torch threads, one by default: an episode's tensor work is small
    (copies and sorts of about 1k x 64 values), and with two threads on a 2-core machine that another process
    keeps busy, each call waits for the second thread (the single env, warm, ran 1,300 episodes/s with one thread and
    90-110 with two on this machine while another process ran). The script prints how each side was warmed and
    timed.

    python benchmarks/env.py [--traces traces/demo/niah_single.h5 traces/demo/essay.h5]   (run `make demo` first)
    python benchmarks/env.py --only-importance                                            (a) only
    python benchmarks/env.py --only-env [--env-threads 1]                                 (b) only
"""

from __future__ import annotations

import argparse
import statistics
import time

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode

import kvp_gym  # noqa: F401
from kvp_gym.envs.episodes import EpisodeKey
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


class Side:
    """One side of the episodes/s comparison: a single env, or a vector env of ``num_envs`` copies; ``run(calls)``
    makes ``calls`` step calls (one episode per env copy each) and returns the episodes finished."""

    def __init__(self, name: str, config: dict, num_envs: int):
        self.name, self.copies = name, 1 if name == "single" else num_envs
        if name == "single":
            self.env = gym.make("KVEvict-v0", config=config)
            self.sources = [self.env.unwrapped.episodes]
        elif name == "sync":  # autoreset in the same step, as the native env: every step call finishes an episode
            self.env = gym.make_vec(
                "KVEvict-v0", num_envs, "sync", vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP}, config=config
            )
            self.sources = [env_copy.unwrapped.episodes for env_copy in self.env.envs]
        else:
            self.env = gym.make_vec("KVEvict-v0", num_envs, "vector_entry_point", config=config)
            self.sources = [self.env.unwrapped.episodes]
        self.env.reset(seed=0)
        self.action = self.env.action_space.sample()

    def run(self, calls: int) -> int:
        finished = 0
        for _ in range(calls):
            _, _, terminated, _, _ = self.env.step(self.action)
            finished += int(np.sum(terminated))
            if self.name == "single":
                self.env.reset()
        return finished


def fill_caches(side: Side) -> int:
    """Load every episode its configuration can draw into each of ``side``'s episode caches (one per env copy; the
    native env's is shared); return how many episodes that is per cache."""
    for source in side.sources:
        keys = [
            EpisodeKey(trace, sample.name, layer, head, sample.prompt_length)
            for trace, sample in source.samples
            for layer in source.layers
            for head in source.heads
        ]
        for key in keys:
            source.load(key)
    return len(keys)


def episodes_per_second(
    config: dict, num_envs: int, warm: bool, warmup: int, timed: int, rounds: int
) -> tuple[dict[str, list[float]], str]:
    """Episodes/s of the single env, SyncVectorEnv and the native vector env, each side warmed and timed the same
    way, in ``rounds`` alternating rounds; returns (side -> episodes/s per round, how they were warmed).

    Every env copy first runs ``warmup`` untimed episodes; a round then times ``timed`` episodes per side (the
    single env runs them all, each vector env ``timed // num_envs`` step calls). ``warm``: every episode cache of
    every side is filled with every episode the configuration can draw before the warm-up (every timed episode
    is served from memory); else ``config`` holds ``cache_size`` 1 (every episode is read from the trace files and
    the importance store)."""
    sides = {name: Side(name, config, num_envs) for name in ("single", "sync", "native")}
    filled = {name: fill_caches(side) for name, side in sides.items()} if warm else {}
    if warm and max(filled.values()) > config["cache_size"]:
        raise ValueError(f"{max(filled.values())} episodes do not fit a cache of {config['cache_size']}")
    for side in sides.values():
        side.run(warmup)
    speeds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, side in sides.items():
            calls = timed // side.copies
            start = time.perf_counter()
            finished = side.run(calls)
            speeds[name].append(finished / (time.perf_counter() - start))
            assert finished == calls * side.copies, f"{name}: {finished} episodes in {calls} calls"
    for side in sides.values():
        side.env.close()
    if warm:
        how = (
            f"warm: every episode cache ({num_envs} for SyncVectorEnv, one shared by the native env's {num_envs}) "
            f"filled with all {filled['sync']} episodes of layers {config['layers']} before timing, so every timed "
            "episode comes from memory"
        )
    else:
        how = "cold: cache_size=1 on every side, so every episode is read from the trace files and importance store"
    how += (
        f"; each env copy then ran {warmup} untimed episodes; {rounds} alternating rounds of {timed} timed episodes "
        f"per side (single env: {timed} episodes; x{num_envs}: {timed // num_envs} step calls, one episode per copy "
        "each, both vector envs autoresetting in the same step)"
    )
    return speeds, how


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", nargs="+", default=["traces/demo/niah_single.h5", "traces/demo/essay.h5"])
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=8, help="(b): untimed episodes per env copy, every side")
    parser.add_argument("--timed", type=int, default=1024, help="(b): episodes timed per side and round")
    parser.add_argument("--env-rounds", type=int, default=3, help="(b): alternating rounds")
    parser.add_argument("--rounds", type=int, default=5, help="(a): rounds of 100 alternating calls, per thread count")
    parser.add_argument("--env-threads", type=int, default=1, help="(b): torch threads, every side")
    parser.add_argument("--only-importance", action="store_true", help="run (a) only")
    parser.add_argument("--only-env", action="store_true", help="run (b) only")
    args = parser.parse_args()

    if not args.only_env:
        importance_benchmark(args.rounds)
    if not args.only_importance:
        env_benchmark(args)


def importance_benchmark(rounds: int) -> None:
    """(a), printed."""
    a = importance_vs_matmul(groups=3, prompt=1024, future=256, head_dim=64, repeats=100, rounds=rounds)
    for (threads, clock), run in a.items():
        spread = ", ".join(f"{ratio:.2f}" for ratio in run["ratios"])
        print(
            f"(a) future_importance, G=3 F=256 n=1024 D=64, {threads} thread{'s' * (threads > 1)}, "
            f"{'wall-clock' if clock == 'wall' else 'thread CPU'} time: {run['importance_s'] * 1e3:.2f} ms vs dense "
            f"matmul {run['matmul_s'] * 1e3:.2f} ms -> {run['importance_s'] / run['matmul_s']:.2f}x (target <= 2x; "
            f"{len(run['ratios'])} rounds: {spread})"
        )


def env_benchmark(args: argparse.Namespace) -> None:
    """(b), cold then warm, printed."""
    torch.set_num_threads(args.env_threads)
    for warm in (False, True):
        if warm:  # small enough for 64 caches of every episode: one layer's heads of every train sample
            config = {"traces": args.traces, "layers": [0], "cache_size": 4096}
        else:
            config = {"traces": args.traces, "cache_size": 1}
        speeds, how = episodes_per_second(config, args.num_envs, warm, args.warmup, args.timed, args.env_rounds)
        ratios = [native / sync for native, sync in zip(speeds["native"], speeds["sync"], strict=True)]
        median = {name: statistics.median(runs) for name, runs in speeds.items()}
        print(
            f"(b) KVEvict-v0 episodes/s, {how}:\n    single {median['single']:.0f}, SyncVectorEnv x{args.num_envs} "
            f"{median['sync']:.0f}, native x{args.num_envs} {median['native']:.0f} (medians) -> native / sync = "
            f"{statistics.median(ratios):.1f}x (target >= 5x; rounds: {', '.join(f'{r:.1f}' for r in ratios)}; "
            f"{args.env_threads} torch thread{'s' * (args.env_threads > 1)})"
        )


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()

"""Trainer benchmarks: speed against a plain KVEvict-v0 loop, and memory / speed of streaming at scale.

1. (default) Trainer steps/s vs a plain loop over KVEvict-v0 steps doing the same updates (target >= 10x).
Both sides train the same grouped network on the same heads with the same batch per head and the same RLOO
update. The trainer scores the K rankings of an episode from one network pass. The reference is a plain Gymnasium
loop, one env per head: every ranking is one env step, ``reset`` (replaying the episode for its K - 1 further
rankings) -> network on the observation -> Gumbel-sort -> ``step`` for the reward. Timed with the demo preset's
K = 8 rankings per episode and with the paper's K = 1, in ``--rounds`` rounds alternating the two sides (the ratio
is the median of the rounds'). Both sides are warmed and timed the same way: one untimed step (the trainer's own
rule: it times itself from its second step), then the mean of the timed steps from the second on (the loop, K
times slower per step, runs ``--steps`` / K of them). The trainer's timed steps include its one validation pass
at the end (a few episodes), which the loop does not run. Both sides use one torch thread by default
(``--threads``): on a 2-core machine shared with another process, two threads wait on each other in every small
call and slow the loop's per-episode calls far more than the trainer's batched ones. The script prints how.

    python benchmarks/train.py [--traces traces/demo/niah_single.h5 traces/demo/essay.h5] [--heads 3] [--steps 40]
                               [--rounds 2] [--threads 1]

2. ``--scale DIR``: peak memory (RSS) of ``kvp-gym train`` (demo preset, all 90 heads, streaming) on a synthetic
trace set of 100 and of 1,000 samples (target: flat, <= 4 GB), and steps/s of streaming against the in-memory
pool (target >= 0.8). The set is written into DIR by the project's writer in SmolLM2-135M's geometry (30 layers,
9 query / 3 KV heads, head_dim 64, float16): ``--distinct`` samples (default 100) of random data with prompts of
1,024, 2,048, 3,072 and 4,096 tokens in turn plus 32 future tokens (19 of 20 train, 1 val), in files of 10
samples; the 1,000-sample set lists each of those files ten times under ten names (hard links: the trainer opens,
indexes and streams 1,000 samples through 100 file handles, but the disk holds the 100 distinct samples, ~14 GB).
Each configuration trains in its own process; the importance store lives in DIR too. DIR is deleted at the end
unless ``--keep``.

    python benchmarks/train.py --scale /tmp/kvp-scale [--scale-steps 6] [--speed-heads 9] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import kvp_gym  # noqa: F401
from kvp_gym.attention import Rotary
from kvp_gym.envs.wrappers import ranking_to_scores
from kvp_gym.traces import ModelGeometry, SampleInfo, TraceHeader, open_traces, write_traces
from kvp_gym_agents.config import PRESETS, TrainConfig
from kvp_gym_agents.data import parse_heads
from kvp_gym_agents.kvp import KVPNetwork, gumbel_ranking, plackett_luce_log_prob
from kvp_gym_agents.train import leave_one_out, normalised, train

# The trainer times itself from its second step (agents/train.py: the first one loads the first batch and warms
# caches up); the reference loop gets the same untimed step before its timed ones.
WARMUP_STEPS = 1


def trainer_steps_per_second(traces: list[str], spec: str, rankings: int, steps: int) -> tuple[float, TrainConfig]:
    """Steps/s of ``kvp-gym train`` (demo preset, heads ``spec``, K = ``rankings``) over ``steps`` timed steps after
    WARMUP_STEPS untimed ones; and the configuration, for the reference loop."""
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            **{
                **PRESETS["demo"],
                "traces": traces,
                "out": out,
                "heads": spec,
                "steps": WARMUP_STEPS + steps,
                "eval_every": 10**9,
                "random_splits": 0,
                "rankings": rankings,
            }
        )
        return train(config, progress=False)["steps_per_second"], config


def gym_loop_steps_per_second(traces: list[str], heads: list, config: TrainConfig, steps: int) -> float:
    """Steps/s of the plain KVEvict-v0 loop doing the trainer's updates, over ``steps`` timed steps after
    WARMUP_STEPS untimed ones. Its envs cache the episodes they load (as KVEvict-v0 does; the trainer reads every
    batch from the trace files)."""
    envs = [
        gym.make("KVEvict-v0", config={"traces": traces, "layers": [layer], "heads": [head], "cache_size": 4096})
        for layer, head in heads
    ]
    for i, env in enumerate(envs):
        env.reset(seed=i)
    head_dim = envs[0].observation_space["key"].shape[1]
    network = KVPNetwork(len(heads), head_dim, config.width, config.position_dim, config.buckets, 1024)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def step() -> None:
        log_probs, rewards = [], []
        for h, env in enumerate(envs):
            for _ in range(config.batch):
                obs, info = env.reset()
                for k in range(config.rankings):
                    if k:  # the same episode again, for its next ranking
                        obs, _ = env.reset(options={"episode": info["episode"]})
                    n = int(obs["mask"].sum())
                    keys = torch.from_numpy(obs["key"][:n])[None, None]
                    values = torch.from_numpy(obs["value"][:n])[None, None]
                    positions = torch.from_numpy(obs["positions"][:n])[None, None]
                    scores = network(keys, values, positions, positions.max() - positions, torch.tensor([h]))[0, 0]
                    valid = torch.ones(n, dtype=torch.bool)
                    ranking = gumbel_ranking(scores.detach(), valid)
                    action = np.zeros(env.action_space.shape, np.float32)
                    action[:n] = ranking_to_scores(ranking.numpy())
                    _, reward, _, _, _ = env.step(action)
                    rewards.append(reward)
                    log_probs.append(plackett_luce_log_prob(scores, ranking, valid))
        reward = torch.tensor(rewards).reshape(len(envs), config.batch, config.rankings)
        advantage = normalised(leave_one_out(reward), config.advantage_clip)
        loss = -(advantage * torch.stack(log_probs).reshape(len(envs), -1)).mean(1).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(WARMUP_STEPS):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - started
    for env in envs:
        env.close()
    return steps / seconds


SMOLLM2 = ModelGeometry(30, 9, 3, 64, (0, 0, 0, 1, 1, 1, 2, 2, 2), '{"rope_theta": 100000.0}', 0, 49152)
PROMPTS = (1024, 2048, 3072, 4096)
FUTURE = 32
PER_FILE = 10


def synthetic_set(folder: Path, distinct: int) -> list[Path]:
    """``distinct`` samples of random float16 data in SmolLM2's geometry, in files of PER_FILE samples."""
    header = TraceHeader(
        "synthetic-smollm2-geometry", SMOLLM2, tuple(range(30)), ({},), "benchmark", rotary=Rotary.default(64, 1e5)
    )
    rng = np.random.default_rng(0)
    # One block of random data per prompt length, shifted per sample and layer: random enough for the trainer
    # (which reads, never compares) and much faster to make than fresh draws.
    blocks = {n: rng.standard_normal((15, n + FUTURE, 64), np.float32).astype(np.float16) for n in PROMPTS}
    paths = []
    for f in range(0, distinct, PER_FILE):

        def samples(f=f):
            for i in range(f, min(f + PER_FILE, distinct)):
                prompt = PROMPTS[i % len(PROMPTS)]
                tokens = np.full(prompt + FUTURE, i, np.int32)  # distinct samples have distinct tokens
                split = "val" if i % 20 == 19 else "train"
                info = SampleInfo(f"s{i:05d}", i, "synthetic", split, prompt, tokens)
                tensors = {}
                for layer in range(30):
                    block = np.roll(blocks[prompt], i + layer, axis=1)
                    tensors[layer] = (block[:9], block[9:12], block[12:])
                yield info, tensors

        path = folder / f"synthetic-{f // PER_FILE:03d}.h5"
        if not path.exists():
            write_traces(path, header, samples())
        paths.append(path)
    return paths


def linked_copies(paths: list[Path], copies: int) -> list[Path]:
    """Each file under ``copies`` names (hard links; the first is the file itself)."""
    found = []
    for c in range(copies):
        for path in paths:
            link = path if c == 0 else path.with_name(f"{path.stem}-copy{c}.h5")
            if not link.exists():
                os.link(path, link)
            found.append(link)
    return found


def child(settings: dict) -> dict:
    """Train in this process (a fresh one per configuration) and report its summary with peak and sampled RSS."""
    rss: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            with open("/proc/self/statm") as f:
                rss.append(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))

    threading.Thread(target=sample, daemon=True).start()
    cpu = time.process_time()
    summary = train(TrainConfig(**settings), progress=False)
    done.set()
    gib = 2**30
    return {
        **summary,
        "cpu_seconds": time.process_time() - cpu,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib,
        "rss_gib_quartiles": [rss[int(q * (len(rss) - 1))] / gib for q in (0.25, 0.5, 0.75, 1.0)] if rss else [],
    }


def run_child(settings: dict, importance: Path) -> dict:
    env = {**os.environ, "KVP_GYM_IMPORTANCE": str(importance)}
    command = [sys.executable, __file__, "--child", json.dumps(settings)]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def scale(folder: Path, distinct: int, steps: int, speed_heads: int, keep: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    importance = folder / "importance"
    try:
        started = time.perf_counter()
        paths = synthetic_set(folder, distinct)
        size = sum(p.stat().st_size for p in paths) / 2**30
        print(
            f"synthetic set: {distinct} samples in {len(paths)} files, {size:.1f} GiB, "
            f"{time.perf_counter() - started:.0f} s"
        )
        base = {**PRESETS["demo"], "heads": "all", "steps": steps, "eval_every": 10**9}
        for copies in (1, 10):
            traces = [str(p) for p in linked_copies(paths, copies)]
            out = tempfile.mkdtemp(dir=folder)
            r = run_child({**base, "traces": traces, "out": out}, importance)
            print(
                f"streaming, {distinct * copies} samples x 90 heads, {steps} steps: "
                f"peak RSS {r['peak_rss_gib']:.2f} GiB"
                f" (sampled RSS quartiles {', '.join(f'{v:.2f}' for v in r['rss_gib_quartiles'])}),"
                f" {r['steps_per_second']:.3f} steps/s, waited {r['data_wait_seconds']:.1f} s for data,"
                f" {r['seconds']:.0f} s training loop"
            )
        spec = ",".join(f"{layer}:{head}" for layer in range(30) for head in range(3))
        spec = ",".join(spec.split(",")[:speed_heads])
        speeds: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(2):  # alternated: these machines are noisy
            for in_memory in (False, True):
                out = tempfile.mkdtemp(dir=folder)
                settings = {
                    **base,
                    "traces": [str(p) for p in paths],
                    "out": out,
                    "heads": spec,
                    "in_memory": in_memory,
                }
                speeds[in_memory].append(run_child(settings, importance)["steps_per_second"])
        stream, memory = statistics.median(speeds[False]), statistics.median(speeds[True])
        print(
            f"{distinct} samples x {speed_heads} heads: streaming {stream:.3f} steps/s, in-memory pool {memory:.3f} "
            f"steps/s -> {stream / memory:.2f} (target >= 0.8; runs {speeds})"
        )
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", nargs="+", default=["traces/demo/niah_single.h5", "traces/demo/essay.h5"])
    parser.add_argument("--heads", type=int, default=3, help="the first N (layer, head) pairs")
    parser.add_argument("--steps", type=int, default=40, help="trainer steps timed (the loop: this / K)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of trainer and loop, per K")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides (0: torch's default)")
    parser.add_argument("--scale", type=Path, help="run the memory / streaming benchmark in this (new) folder")
    parser.add_argument("--distinct", type=int, default=100, help="distinct synthetic samples (--scale)")
    parser.add_argument("--scale-steps", type=int, default=6, help="training steps per configuration (--scale)")
    parser.add_argument("--speed-heads", type=int, default=9, help="heads of the streaming vs in-memory timing")
    parser.add_argument("--keep", action="store_true", help="keep the --scale folder")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.scale:
        scale(args.scale, args.distinct, args.scale_steps, args.speed_heads, args.keep)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    with open_traces(args.traces[0]) as trace:
        heads = parse_heads("all", trace.header.layers, trace.header.geometry.num_kv_heads)[: args.heads]
    spec = ",".join(f"{layer}:{head}" for layer, head in heads)
    for rankings in (PRESETS["demo"]["rankings"], 1):
        loop_steps = max(1, args.steps // rankings)  # the loop's step costs K times as many env steps
        ratios, trainer_speeds, loop_speeds = [], [], []
        for _ in range(args.rounds):  # alternated: these machines are noisy
            trainer, config = trainer_steps_per_second(args.traces, spec, rankings, args.steps)
            loop = gym_loop_steps_per_second(args.traces, heads, config, loop_steps)
            trainer_speeds.append(trainer)
            loop_speeds.append(loop)
            ratios.append(trainer / loop)
        print(
            f"{len(heads)} heads x {config.batch} episodes x {rankings} rankings: trainer "
            f"{statistics.median(trainer_speeds):.2f} steps/s, KVEvict-v0 loop {statistics.median(loop_speeds):.3f} "
            f"steps/s -> {statistics.median(ratios):.1f}x (target >= 10x; median of {args.rounds} alternating rounds: "
            f"{', '.join(f'{r:.1f}' for r in ratios)}). Each side: {WARMUP_STEPS} untimed warm-up step, then timed "
            f"from its step {WARMUP_STEPS + 1} (trainer {args.steps} steps, loop {loop_steps}); "
            f"{torch.get_num_threads()} torch thread{'s' * (torch.get_num_threads() > 1)}"
        )


if __name__ == "__main__":
    main()

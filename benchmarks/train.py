"""Trainer steps/s vs a plain loop over KVEvict-v0 steps doing the same updates (target >= 10x).

Both sides train the same grouped network on the same heads with the same batch per head and the same RLOO
update. The trainer draws its batches from the in-memory episode pool and scores the K rankings of an episode
from one network pass. The reference is a plain Gymnasium loop, one env per head: every ranking is one env step,
``reset`` (replaying the episode for its K - 1 further rankings) -> network on the observation -> Gumbel-sort ->
``step`` for the reward. Timed twice: with the demo preset's K = 8 rankings per episode and with the paper's
K = 1. Trainer speeds are measured from its second step on.

    python benchmarks/train.py [--traces traces/demo/niah_single.h5 traces/demo/essay.h5] [--heads 3] [--steps 40]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import gymnasium as gym
import numpy as np
import torch

import kvp_gym  # noqa: F401
from kvp_gym.envs.wrappers import ranking_to_scores
from kvp_gym.traces import open_traces
from kvp_gym_agents.config import PRESETS, TrainConfig
from kvp_gym_agents.kvp import KVPNetwork, gumbel_ranking, plackett_luce_log_prob
from kvp_gym_agents.train import leave_one_out, normalised, parse_heads, train


def gym_loop_seconds_per_step(traces, heads, config: TrainConfig, steps: int) -> float:
    envs = [
        gym.make("KVEvict-v0", config={"traces": traces, "layers": [layer], "heads": [head], "cache_size": 4096})
        for layer, head in heads
    ]
    for i, env in enumerate(envs):
        env.reset(seed=i)
    head_dim = envs[0].observation_space["key"].shape[1]
    network = KVPNetwork(len(heads), head_dim, config.width, config.position_dim, config.buckets, 1024)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    started = time.perf_counter()
    for _ in range(steps):
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
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", nargs="+", default=["traces/demo/niah_single.h5", "traces/demo/essay.h5"])
    parser.add_argument("--heads", type=int, default=3, help="the first N (layer, head) pairs")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    with open_traces(args.traces[0]) as trace:
        heads = parse_heads("all", trace.header.layers, trace.header.geometry.num_kv_heads)[: args.heads]
    spec = ",".join(f"{layer}:{head}" for layer, head in heads)
    for rankings in (PRESETS["demo"]["rankings"], 1):
        with tempfile.TemporaryDirectory() as out:
            config = TrainConfig(
                **{
                    **PRESETS["demo"],
                    "traces": args.traces,
                    "out": out,
                    "heads": spec,
                    "steps": args.steps + 1,
                    "eval_every": 10**9,
                    "random_splits": 0,
                    "rankings": rankings,
                }
            )
            trainer = train(config, progress=False)["steps_per_second"]
        loop = 1 / gym_loop_seconds_per_step(args.traces, heads, config, max(1, args.steps // rankings))
        print(
            f"{len(heads)} heads x {config.batch} episodes x {rankings} rankings: trainer {trainer:.2f} steps/s, "
            f"KVEvict-v0 loop {loop:.3f} steps/s -> {trainer / loop:.1f}x (target >= 10x)"
        )


if __name__ == "__main__":
    main()

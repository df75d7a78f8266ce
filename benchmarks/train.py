"""Trainer steps/s vs a plain loop over KVEvict-v0 steps doing the same updates (target >= 10x).

Both sides train the same grouped network on the same heads with the same batch per head and the same RLOO
update; the trainer draws its batches from the in-memory episode pool, the reference gets every episode from
``env.reset()`` and every reward from ``env.step()`` (one env per head).

    python benchmarks/train.py [--traces traces/demo/niah_single.h5 traces/demo/essay.h5] [--heads 3] [--steps 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import gymnasium as gym
import numpy as np
import torch

import kvp_gym  # noqa: F401
from agents.kvp import KVPNetwork, gumbel_ranking, plackett_luce_log_prob
from agents.train import PRESETS, TrainConfig, parse_heads, train
from kvp_gym.envs.wrappers import ranking_to_scores
from kvp_gym.traces import open_traces


def gym_loop_seconds_per_step(traces, heads, config: TrainConfig, steps: int) -> float:
    envs = [
        gym.make("KVEvict-v0", config={"traces": traces, "layers": [layer], "heads": [head], "cache_size": 4096})
        for layer, head in heads
    ]
    for i, env in enumerate(envs):
        env.reset(seed=i)
    head_dim = envs[0].observation_space["key"].shape[1]
    network = KVPNetwork(len(heads), head_dim, config.width, config.position_dim, config.max_position)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    started = time.perf_counter()
    for _ in range(steps):
        log_probs, rewards = [], []
        for h, env in enumerate(envs):
            for _ in range(config.batch):
                obs, _ = env.reset()
                n = int(obs["mask"].sum())
                keys = torch.from_numpy(obs["key"][:n])[None, None]
                values = torch.from_numpy(obs["value"][:n])[None, None]
                positions = torch.from_numpy(obs["positions"][:n])[None, None]
                scores = network(keys, values, positions, torch.tensor([h]))[0, 0]
                valid = torch.ones(n, dtype=torch.bool)
                ranking = gumbel_ranking(scores.detach(), valid)
                action = np.zeros(env.action_space.shape, np.float32)
                action[:n] = ranking_to_scores(ranking.numpy())
                _, reward, _, _, _ = env.step(action)
                rewards.append(reward)
                log_probs.append(plackett_luce_log_prob(scores, ranking, valid))
        reward = torch.tensor(rewards).reshape(len(envs), config.batch)
        log_prob = torch.stack(log_probs).reshape(len(envs), config.batch)
        baseline = (reward.sum(1, keepdim=True) - reward) / (config.batch - 1)
        advantage = reward - baseline
        advantage = ((advantage - advantage.mean(1, keepdim=True)) / (advantage.std(1, keepdim=True) + 1e-8)).clamp(
            -2, 2
        )
        loss = -(advantage * log_prob).mean(1).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", nargs="+", default=["traces/demo/niah_single.h5", "traces/demo/essay.h5"])
    parser.add_argument("--heads", type=int, default=3, help="the first N (layer, head) pairs")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with open_traces(args.traces[0]) as trace:
        heads = parse_heads("all", trace.header.layers, trace.header.geometry.num_kv_heads)[: args.heads]
    spec = ",".join(f"{layer}:{head}" for layer, head in heads)
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            **{
                **PRESETS["demo"],
                "traces": args.traces,
                "out": out,
                "heads": spec,
                "steps": args.steps,
                "eval_every": 10**9,
                "random_splits": 0,
            }
        )
        trainer = train(config, progress=False)["seconds"] / args.steps
    loop = gym_loop_seconds_per_step(args.traces, heads, config, args.steps)
    print(
        f"{len(heads)} heads x batch {config.batch}: trainer {1 / trainer:.2f} steps/s, KVEvict-v0 loop "
        f"{1 / loop:.2f} steps/s -> {loop / trainer:.1f}x (target >= 10x)"
    )


if __name__ == "__main__":
    main()

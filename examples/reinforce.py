"""REINFORCE on KVEvict-v0 in plain torch, in one file: train a per-token ranking policy, then score it beside the
baselines with `kvp_gym.evaluation`.

The policy scores every cached token from its key, value and age with one small MLP shared by all tokens (so it
handles any cache length). Rankings are sampled from the Plackett-Luce distribution of those scores (Gumbel noise,
then sort); the environment's reward is the holistic all-budget utility of a ranking. Episodes (heads) differ a
lot in how hard they are, so each update draws a few episodes and replays each one K times
(``env.reset(options={"episode": key})``) with K sampled rankings: a ranking's baseline is the mean reward of the
episode's other K - 1 rankings (REINFORCE leave-one-out). After training, `EnvPolicyScorer` puts the policy
behind the scorer contract and `evaluate` prints its row beside the heuristics, on held-out samples, under the
`paper` protocol (the env is built with the same protected tokens, so the training reward is that protocol's
score).

    python examples/reinforce.py --traces traces/demo/niah_single.h5 traces/demo/essay.h5 --minutes 3

Without --traces it uses the default SmolLM2 trace set (collected into the user cache on first use).
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import kvp_gym  # noqa: F401  (registers KVEvict-v0)
from kvp_gym.envs.scorer import EnvPolicyScorer
from kvp_gym.envs.wrappers import ranking_to_scores
from kvp_gym.evaluation import evaluate, trace_level_table

BASELINES = ["streaming_llm", "knorm", "keydiff", "h2o", "tova", "snapkv", "random"]
# The training bar counts seconds of the time budget (tqdm puts ", " before the postfix itself).
TRAINING_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]"


class TokenPolicy(nn.Module):
    """Per-token MLP: [key, value, age features] -> one score. Observations in, scores [B, T] out."""

    def __init__(self, head_dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * head_dim + 2, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, obs: dict[str, np.ndarray]) -> torch.Tensor:
        keys, values = torch.as_tensor(obs["key"]), torch.as_tensor(obs["value"])
        mask = torch.as_tensor(obs["mask"]).bool()
        positions = torch.as_tensor(obs["positions"]).float()
        newest = (positions * mask).amax(-1, keepdim=True)
        age = (newest - positions).clamp_min(0)
        norm = nn.functional.layer_norm  # per-token normalisation: keys and values vary in scale across heads
        features = torch.cat(
            [
                norm(keys, keys.shape[-1:]),
                norm(values, values.shape[-1:]),
                (age / newest.clamp_min(1))[..., None],
                (torch.log1p(age) / torch.log1p(newest))[..., None],
            ],
            -1,
        )
        return self.net(features).squeeze(-1).masked_fill(~mask, float("-inf"))


def sample_rankings(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plackett-Luce: (rankings [B, T], log-probabilities [B]) of rankings drawn with Gumbel noise. Padding
    (-inf logits) sorts last and adds nothing to the log-probability."""
    gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_min(1e-20)))
    rankings = torch.argsort(logits + gumbel, dim=-1, descending=True)
    ordered = logits.gather(-1, rankings)
    valid = torch.isfinite(ordered)
    safe = ordered.masked_fill(~valid, -1e9)
    tail = torch.logcumsumexp(safe.flip(-1), -1).flip(-1)  # log sum over the tokens ranked at k or later
    return rankings, ((safe - tail) * valid).sum(-1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", nargs="+", help="trace files (default: the default SmolLM2 trace set)")
    parser.add_argument("--minutes", type=float, default=3.0, help="training time budget (default 3)")
    parser.add_argument("--steps", type=int, default=10_000, help="at most this many updates (a cap; default 10000)")
    parser.add_argument("--episodes", type=int, default=8, help="episodes per update (default 8)")
    parser.add_argument("--rankings", type=int, default=4, help="sampled rankings per episode, K >= 2 (default 4)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-split", default="val", help="held-out split to report (default val)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    config = {"traces": args.traces, "split": "train", "sinks": 4, "recent": 16}  # the paper protocol
    env = gym.make("KVEvict-v0", config=config)
    policy = TokenPolicy(env.observation_space["key"].shape[-1])
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    env.reset(seed=args.seed)

    # The bar runs against the time budget (--steps is only a cap): its estimate is the training time left.
    budget, start = 60 * args.minutes, time.monotonic()
    progress = tqdm(total=budget, desc="REINFORCE", unit="s", bar_format=TRAINING_BAR)
    updates = 0
    while updates < args.steps and time.monotonic() - start < budget:
        drawn = [env.reset() for _ in range(args.episodes)]  # (observation, {"episode": key})
        batch = {name: np.stack([obs[name] for obs, _ in drawn]) for name in drawn[0][0]}
        logits = policy(batch).repeat_interleave(args.rankings, 0)  # [episodes * K, T]
        rankings, log_prob = sample_rankings(logits)
        rewards, scores = [], []
        for row, scores_of_ranking in enumerate(ranking_to_scores(rankings.numpy())):
            env.reset(options={"episode": drawn[row // args.rankings][1]["episode"]})  # replay the episode
            _, reward, _, _, info = env.step(scores_of_ranking)
            rewards.append(reward)
            scores.append(info["holistic_score"])
        rewards = torch.tensor(rewards, dtype=torch.float32).view(args.episodes, args.rankings)
        others = (rewards.sum(1, keepdim=True) - rewards) / (args.rankings - 1)  # leave-one-out baseline
        advantage = (rewards - others).view(-1)
        advantage = advantage / (advantage.std() + 1e-6)
        loss = -(advantage * log_prob).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        updates += 1
        progress.set_postfix_str(f"{updates} updates, training holistic score {np.mean(scores):.3f}", refresh=False)
        progress.update(min(time.monotonic() - start, budget) - progress.n)
    progress.close()
    seconds = time.monotonic() - start
    print(f"trained: {updates} updates in {seconds / 60:.1f} min ({60 * updates / seconds:.0f} per minute)")

    eval_env = gym.make("KVEvict-v0", config={**config, "split": args.eval_split})
    mine = EnvPolicyScorer(policy, eval_env, name="reinforce (examples/reinforce.py)")
    traces = eval_env.unwrapped.episodes.traces
    print(
        f"evaluating the policy and {len(BASELINES)} baselines on the {args.eval_split} split of "
        f"{', '.join(str(trace.path) for trace in traces)} (every sample, layer and KV head; the bar estimates the "
        "time left)",
        flush=True,
    )
    start = time.monotonic()
    record = evaluate(
        [trace.path for trace in traces],
        [mine, *BASELINES],
        split=args.eval_split,
        protocol="paper",
        versus=mine.name,
        progress=True,
    )
    print(f"evaluated in {time.monotonic() - start:.0f} s")
    print(trace_level_table(record))
    return record


if __name__ == "__main__":
    main()

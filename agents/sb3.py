"""Stable-Baselines3 recipes for the kvp-gym environments.

- PPO on ``KVEvict-v0`` with :class:`PerTokenPolicy`, a permutation-equivariant actor-critic: one shared per-token
  network scores every token from its own features (key, value, position), padding is masked, and the critic
  pools the token embeddings. No layer maps max_tokens inputs to max_tokens outputs, so the policy does not care
  about the padded length or the order of the slots.
- MaskablePPO (sb3-contrib) on ``KVEvictDecode-v0`` with its action masks.

Command line (``python -m kvp_gym_agents.sb3 --help``)::

    python -m kvp_gym_agents.sb3 ppo --traces traces/demo/niah_single.h5 traces/demo/essay.h5 \
        --timesteps 20000 --out runs/ppo
    python -m kvp_gym_agents.sb3 maskable-ppo --traces traces/demo/essay.h5 --budget 128 --timesteps 5000 \
        --out runs/mppo

Each prints the trained policy's mean holistic score on the val split next to the random policy's.

Imports kvp_gym (the environments) and kvp_gym.envs.wrappers; no other kvp_gym_agents module.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

import kvp_gym  # noqa: F401  (registers the environments)
from kvp_gym.envs.wrappers import TokenFeatures


class TokenRows(BaseFeaturesExtractor):
    """Passes ``TokenFeatures`` observations [B, T, F] through unchanged (the per-token network consumes them)."""

    def __init__(self, observation_space: spaces.Box):
        super().__init__(observation_space, features_dim=int(np.prod(observation_space.shape)))

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return observations


class PerTokenNetwork(nn.Module):
    """Actor: one score per token from a shared MLP; critic input: the masked mean of the token embeddings.

    Token features: key (D), value (D), log(1 + position), position / cache length, and distance to the newest
    token / cache length. Input [B, T, 2D + 2] from :class:`TokenFeatures`; actor output [B, T] (0 on padding);
    critic output [B, hidden].
    """

    def __init__(self, max_tokens: int, head_dim: int, hidden: int = 64):
        super().__init__()
        self.head_dim = head_dim
        self.latent_dim_pi, self.latent_dim_vf = max_tokens, hidden
        self.embed = nn.Sequential(
            nn.Linear(2 * head_dim + 3, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.SiLU()
        )
        self.score = nn.Linear(hidden, 1)

    def _tokens(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.head_dim
        position, mask = rows[..., 2 * d], rows[..., 2 * d + 1]
        length = mask.sum(-1, keepdim=True).clamp_min(1)
        features = torch.cat(
            [
                rows[..., : 2 * d],
                torch.log1p(position)[..., None],
                (position / length)[..., None],
                ((length - 1 - position) / length)[..., None],
            ],
            dim=-1,
        )
        return self.embed(features), mask

    def forward_actor(self, rows: torch.Tensor) -> torch.Tensor:
        hidden, mask = self._tokens(rows)
        return self.score(hidden).squeeze(-1) * mask

    def forward_critic(self, rows: torch.Tensor) -> torch.Tensor:
        hidden, mask = self._tokens(rows)
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_actor(rows), self.forward_critic(rows)


class PerTokenPolicy(ActorCriticPolicy):
    """A permutation-equivariant Gaussian actor-critic for ``TokenFeatures(KVEvict-v0)``.

    The action mean is the per-token score itself (no dense output layer), and one log-std is shared by all tokens.
    """

    def __init__(self, observation_space: spaces.Box, action_space: spaces.Box, lr_schedule, hidden: int = 64, **kw):
        self.hidden = hidden
        kw.setdefault("features_extractor_class", TokenRows)
        super().__init__(observation_space, action_space, lr_schedule, **kw)

    def _build_mlp_extractor(self) -> None:
        max_tokens, features = self.observation_space.shape
        self.mlp_extractor = PerTokenNetwork(max_tokens, (features - 2) // 2, self.hidden)

    def _build(self, lr_schedule) -> None:
        super()._build(lr_schedule)
        self.action_net = nn.Identity()  # the per-token scores are the action means
        self.log_std = nn.Parameter(torch.full((1,), float(self.log_std_init)))  # shared across tokens
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)


def mean_score(
    config: dict, choose: Callable[[np.ndarray, np.random.Generator], np.ndarray], episodes: int, seed: int = 0
) -> float:
    """Mean holistic score of ``choose(token_rows, rng) -> scores`` over ``episodes`` KVEvict-v0 episodes."""
    env = TokenFeatures(gym.make("KVEvict-v0", config=config))
    rng = np.random.default_rng(seed)
    scores = []
    obs, _ = env.reset(seed=seed)
    for _ in range(episodes):
        _, _, _, _, info = env.step(choose(obs, rng))
        scores.append(info["holistic_score"])
        obs, _ = env.reset()
    env.close()
    return float(np.mean(scores))


def train_ppo(
    traces: Sequence[str | Path], timesteps: int, out: str | Path | None = None, seed: int = 0, n_envs: int = 4
) -> PPO:
    """PPO with :class:`PerTokenPolicy` on the train split; saved to ``out/ppo.zip`` if ``out`` is given."""
    config = {"traces": [str(t) for t in traces], "split": "train"}
    env = make_vec_env(lambda: TokenFeatures(gym.make("KVEvict-v0", config=config)), n_envs=n_envs, seed=seed)
    model = PPO(
        PerTokenPolicy,
        env,
        n_steps=64,
        batch_size=64,
        n_epochs=4,
        learning_rate=3e-4,
        gamma=0.0,  # one-step episodes: the return is the reward
        seed=seed,
        tensorboard_log=str(Path(out) / "tb") if out else None,
        verbose=0,
    )
    model.learn(total_timesteps=timesteps, progress_bar=False)
    if out:
        model.save(Path(out) / "ppo.zip")
    return model


def train_maskable_ppo(
    traces: Sequence[str | Path], timesteps: int, budget: int = 128, out: str | Path | None = None, seed: int = 0
):
    """MaskablePPO (sb3-contrib) on ``KVEvictDecode-v0`` with its action masks; saved to ``out/maskable_ppo.zip``."""
    from sb3_contrib import MaskablePPO

    config = {"traces": [str(t) for t in traces], "split": "train", "budget": budget}
    env = gym.make("KVEvictDecode-v0", config=config)
    model = MaskablePPO(
        "MultiInputPolicy",
        env,
        n_steps=256,
        batch_size=64,
        seed=seed,
        tensorboard_log=str(Path(out) / "tb") if out else None,
        verbose=0,
    )
    model.learn(total_timesteps=timesteps)
    if out:
        model.save(Path(out) / "maskable_ppo.zip")
    return model


def decode_score(config: dict, choose: Callable, episodes: int, seed: int = 0) -> float:
    """Mean episode score (oracle cost / cost) of ``choose(obs, masks, rng) -> slot`` on KVEvictDecode-v0."""
    env = gym.make("KVEvictDecode-v0", config=config).unwrapped
    rng = np.random.default_rng(seed)
    scores = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        while True:
            obs, _, terminated, _, info = env.step(choose(obs, env.action_masks(), rng))
            if terminated:
                scores.append(info["score"])
                break
    env.close()
    return float(np.mean(scores))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kvp_gym_agents.sb3", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("algorithm", choices=["ppo", "maskable-ppo"])
    parser.add_argument("--traces", nargs="+", required=True)
    parser.add_argument("--timesteps", type=int, default=20_000)
    parser.add_argument("--budget", type=int, default=128, help="cache budget for maskable-ppo")
    parser.add_argument("--episodes", type=int, default=200, help="val episodes to evaluate on")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    traces = [str(t) for t in args.traces]
    if args.algorithm == "ppo":
        model = train_ppo(traces, args.timesteps, args.out, args.seed)
        val = {"traces": traces, "split": "val"}
        trained = mean_score(val, lambda obs, rng: model.predict(obs, deterministic=True)[0], args.episodes)
        random = mean_score(val, lambda obs, rng: rng.uniform(-1, 1, len(obs)).astype(np.float32), args.episodes)
    else:
        model = train_maskable_ppo(traces, args.timesteps, args.budget, args.out, args.seed)
        val = {"traces": traces, "split": "val", "budget": args.budget}
        trained = decode_score(
            val,
            lambda obs, masks, rng: int(model.predict(obs, action_masks=masks, deterministic=True)[0]),
            args.episodes,
        )
        random = decode_score(val, lambda obs, masks, rng: int(rng.choice(np.flatnonzero(masks))), args.episodes)
    metric = "holistic score" if args.algorithm == "ppo" else "episode score (oracle cost / cost)"
    print(f"{args.algorithm}, {args.timesteps} timesteps: val {metric} {trained:.3f} (random policy {random:.3f})")


if __name__ == "__main__":
    main()

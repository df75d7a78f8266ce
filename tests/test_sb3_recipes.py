"""Stable-Baselines3 recipes: PPO with the per-token policy and MaskablePPO on the decode env run end to end."""

from __future__ import annotations

import numpy as np
import torch

from kvp_gym_agents.sb3 import decode_score, mean_score, train_maskable_ppo, train_ppo


def test_ppo_with_the_per_token_policy(tiny_trace, tmp_path):
    model = train_ppo([tiny_trace], timesteps=256, out=tmp_path, n_envs=2)
    assert (tmp_path / "ppo.zip").exists()
    policy = model.policy
    # No parameter is sized by max_tokens: the network is shared by every token.
    max_tokens = model.observation_space.shape[0]
    assert all(max_tokens not in p.shape for p in policy.parameters())
    # Permutation equivariance: permuting the token rows permutes the action means.
    obs = torch.as_tensor(model.observation_space.sample()[None])
    obs[..., -1] = (torch.arange(max_tokens) < max_tokens - 5).float()  # mask: 5 padding rows at the end
    permutation = torch.randperm(max_tokens)
    with torch.no_grad():
        means = policy.get_distribution(obs).distribution.mean[0]
        permuted = policy.get_distribution(obs[:, permutation]).distribution.mean[0]
    torch.testing.assert_close(permuted, means[permutation])
    assert (means[-5:] == 0).all()  # padding scores are masked
    config = {"traces": str(tiny_trace), "split": "val"}
    score = mean_score(config, lambda rows, rng: model.predict(rows, deterministic=True)[0], episodes=5)
    assert 0 < score <= 1


def test_maskable_ppo_on_the_decode_env(tiny_trace, tmp_path):
    model = train_maskable_ppo([tiny_trace], timesteps=256, budget=500, out=tmp_path)
    assert (tmp_path / "maskable_ppo.zip").exists()
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*")), "no TensorBoard log written"
    config = {"traces": str(tiny_trace), "split": "val", "budget": 500}
    score = decode_score(
        config, lambda obs, masks, rng: int(model.predict(obs, action_masks=masks, deterministic=True)[0]), episodes=1
    )
    assert 0 < score <= 1.0 + 1e-6
    random = decode_score(config, lambda obs, masks, rng: int(rng.choice(np.flatnonzero(masks))), episodes=1)
    assert 0 < random <= 1.0 + 1e-6

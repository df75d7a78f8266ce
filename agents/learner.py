"""The learner's state: the grouped KVP network, its EMA copy, the AdamW optimiser and the learning-rate schedule;
built from the settings, stepped, saved to OUT/last.pt after each evaluation and resumed from it.

Imports kvp_gym.storage (atomic writes), kvp_gym_agents.kvp (the network) and kvp_gym_agents.config (the settings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from kvp_gym.storage import atomic_path
from kvp_gym_agents.config import TrainConfig
from kvp_gym_agents.kvp import OPTION_DEFAULTS, KVPNetwork


def clip_per_head(network: KVPNetwork, max_norm: float) -> torch.Tensor:
    """Clip each head's gradient (the [h] slices of every parameter) to ``max_norm``; return the norms [H]."""
    grads = [p.grad for p in network.parameters() if p.grad is not None]
    norms = torch.stack([g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.reshape(-1, *([1] * (g.dim() - 1))))
    return norms


def learning_rate_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 1% of ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``steps``."""

    def lr_factor(step: int) -> float:  # a function, not a callable object: LambdaLR's state then holds no copy of it
        if step < config.warmup:
            return 0.01 + 0.99 * step / max(1, config.warmup)
        done = (step - config.warmup) / max(1, config.steps - config.warmup)
        floor = config.min_lr / config.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


@dataclass
class Learner:
    """What training changes: the network (row h = head h's agent), its EMA copy (evaluated and checkpointed), the
    optimiser and the schedule."""

    network: KVPNetwork
    ema: AveragedModel
    optimizer: torch.optim.AdamW
    schedule: torch.optim.lr_scheduler.LambdaLR

    @classmethod
    def build(cls, config: TrainConfig, heads: int, head_dim: int, max_age: int, device: torch.device) -> Learner:
        """A fresh learner of ``heads`` networks on ``device``, its weights drawn from ``config.seed`` (the same
        initial weights in every process)."""
        torch.manual_seed(config.seed)  # the same initial weights everywhere
        network = KVPNetwork(
            heads,
            head_dim,
            config.width,
            config.position_dim,
            config.buckets,
            max_age,
            ages=config.ages,
            index=config.index,
            key_frame=config.key_frame,
        ).to(device)
        ema = AveragedModel(network, device=device, multi_avg_fn=get_ema_multi_avg_fn(config.ema))
        optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        return cls(network, ema, optimizer, learning_rate_schedule(optimizer, config))

    def step(self, grad_clip: float) -> torch.Tensor:
        """One update from the accumulated gradients: each head's gradient clipped to ``grad_clip``, AdamW, the
        schedule, the EMA copy. Returns the heads' gradient norms before clipping [H]."""
        grad_norm = clip_per_head(self.network, grad_clip)
        self.optimizer.step()
        self.schedule.step()
        self.ema.update_parameters(self.network)
        return grad_norm

    def save(self, path: Path, generator_state: torch.Tensor, step: int, best: dict) -> None:
        """Write the state to resume from (atomically): this learner's, the batch generator's ``generator_state``,
        the number of steps done and the best validation record."""
        with atomic_path(path) as tmp:
            torch.save(
                {
                    "network": self.network.state_dict(),
                    "ema": self.ema.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "schedule": self.schedule.state_dict(),
                    "generator": generator_state,
                    "step": step,
                    "best": best,
                    "network_config": self.network.config(),
                },
                tmp,
            )

    def resume(self, path: Path, generator: torch.Generator, seed: int, rank: int) -> tuple[int, dict]:
        """Load the state :meth:`save` wrote to ``path`` when it exists (the batch ``generator``'s too; process
        ``rank`` > 0 reseeds it from ``seed``, rank and step instead); return (steps done, best validation record):
        (0, no record) for a fresh run."""
        if not path.exists():
            return 0, {"score": -1.0, "step": -1, "per_head": []}
        state = torch.load(path, map_location="cpu", weights_only=False)
        # The ablation options: a pre-RoPE network would load a post-RoPE run's weights without a shape error.
        recorded = {**OPTION_DEFAULTS, **state.get("network_config", {})}  # older states: the defaults
        wanted = self.network.config()
        differs = {k: (recorded[k], wanted[k]) for k in OPTION_DEFAULTS if recorded[k] != wanted[k]}
        if differs:
            raise ValueError(
                f"{path}: the run there used other network options (there, here: {differs}); resume with the same "
                "options or train into another --out"
            )
        self.network.load_state_dict(state["network"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        if rank:
            generator.manual_seed(seed + rank + state["step"])
        return state["step"], state["best"]

"""RLOO trainer for KVP agents (the KVP paper, arXiv 2602.10238), readable top to bottom.

Each KV head has its own network (all heads train together as one grouped network, each head's gradient its own).
A step samples ``batch`` episodes per head from the training traces, samples ``rankings`` rankings per episode
from the Plackett-Luce policy by Gumbel-sort, scores them with the holistic reward (the environment's utility
code), and takes a REINFORCE step with the leave-one-out baseline. No Gym step loop: batches come straight from
the traces.

The paper samples one ranking per episode and takes the leave-one-out mean over the batch (``rankings=1``, the
default). With ``rankings=K > 1`` (our choice, used by the demo preset) the baseline of a ranking is the mean reward
of the other K - 1 rankings of the same episode, which removes the spread of difficulty between episodes from the
advantage; the K rankings share one network pass, so they cost little more than one.

The settings (:class:`kvp_gym_agents.config.TrainConfig`, presets) and the ``kvp-gym train`` command line live in
agents/config.py, which does not import torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from kvp_gym.evaluate import file_sha256
from kvp_gym.storage import atomic_path
from kvp_gym.traces import open_traces
from kvp_gym.utility import as_ranking, future_importance, holistic_reward
from kvp_gym_agents.checkpoint import save_checkpoint
from kvp_gym_agents.config import TrainConfig
from kvp_gym_agents.kvp import KVPNetwork, gumbel_ranking, plackett_luce_log_prob


def parse_heads(spec: str, layers: tuple[int, ...], num_kv_heads: int) -> list[tuple[int, int]]:
    if spec == "all":
        return [(layer, head) for layer in layers for head in range(num_kv_heads)]
    heads = []
    for part in spec.split(","):
        layer, _, head = part.partition(":")
        pair = (int(layer), int(head))
        if pair[0] not in layers or not 0 <= pair[1] < num_kv_heads:
            raise ValueError(f"head {part!r}: layer must be recorded ({list(layers)}), head in [0, {num_kv_heads})")
        heads.append(pair)
    return heads


class EpisodePool:
    """Every training (or validation) episode of the chosen heads, in memory, padded.

    keys, values: float16 [H, N, S, D] (N samples); positions [S]; episodes: sample index [E] and split point [E]
    shared by all heads; importance: float32 [H, E, S] (zero past each split).
    """

    def __init__(
        self,
        paths: list[str],
        split: str,
        heads: list[tuple[int, int]],
        random_splits: int,
        min_prompt: int,
        rng: np.random.Generator,
    ):
        files = [open_traces(p) for p in paths]
        samples = [(f, s) for f in files for s in f.split(split)]
        if not samples:
            raise ValueError(f"no {split!r} samples in {paths}")
        length = max(s.num_tokens for _, s in samples)
        head_dim = files[0].header.geometry.head_dim
        self.keys = torch.zeros(len(heads), len(samples), length, head_dim, dtype=torch.float16)
        self.values = torch.zeros_like(self.keys)
        importance = []  # per sample [H, splits, S], computed as each sample is read (its queries are then dropped)
        episode_sample, episode_split = [], []
        for i, (trace, sample) in enumerate(samples):
            splits = [sample.prompt_length]
            if sample.future_source == "text" and random_splits:  # free text: random split points
                splits = sorted(
                    rng.integers(min(min_prompt, sample.num_tokens - 1), sample.num_tokens, size=random_splits).tolist()
                )
            episode_sample += [i] * len(splits)
            episode_split += splits
            per_head = [trace.head(sample, layer, head) for layer, head in heads]
            for h, read in enumerate(per_head):
                self.keys[h, i, : sample.num_tokens] = read.keys
                self.values[h, i, : sample.num_tokens] = read.values
            queries, keys = torch.stack([r.queries for r in per_head]), torch.stack([r.keys for r in per_head])
            importance.append(torch.zeros(len(heads), len(splits), length))
            specs = [trace.header.attention_of(layer) for layer, _ in heads]
            for spec in set(specs):  # each layer's own attention semantics (one call per distinct kind)
                rows = torch.tensor([k for k, s in enumerate(specs) if s == spec])
                for j, n in enumerate(splits):
                    importance[-1][rows, j, :n] = future_importance(queries[rows], keys[rows], n, attention=spec)
        for f in files:
            f.close()
        self.sample = torch.tensor(episode_sample)
        self.split = torch.tensor(episode_split)
        self.importance = torch.cat(importance, 1)
        self.positions = torch.arange(length)

    def length_groups(self) -> list[torch.Tensor]:
        """Episode indices grouped by split point, one group per power of two, so that a batch drawn from one group
        pads little (a batch is as long as its longest episode)."""
        octave = torch.ceil(torch.log2(self.split.float())).long()
        return [torch.nonzero(octave == o).flatten() for o in octave.unique()]

    def batch(self, episodes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """episodes [H, B] -> keys, values [H, B, n, D], positions [1, 1, n], ages [H, B, n], valid [H, B, n],
        importance [H, B, n], with n = the longest split in the batch."""
        splits = self.split[episodes]
        n = int(splits.max())
        rows = torch.arange(episodes.shape[0])[:, None]
        samples = self.sample[episodes]
        positions = self.positions[:n]
        return (
            self.keys[rows, samples, :n],
            self.values[rows, samples, :n],
            positions.reshape(1, 1, n),
            splits[..., None] - 1 - positions,
            positions < splits[..., None],
            self.importance[rows, episodes, :n],
        )


def clip_per_head(network: KVPNetwork, max_norm: float) -> torch.Tensor:
    """Clip each head's gradient (the [h] slices of every parameter) to ``max_norm``; return the norms [H]."""
    grads = [p.grad for p in network.parameters() if p.grad is not None]
    norms = torch.stack([g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.reshape(-1, *([1] * (g.dim() - 1))))
    return norms


def leave_one_out(reward: torch.Tensor) -> torch.Tensor:
    """reward [H, B, K] (B episodes x K rankings per head) -> reward minus the leave-one-out baseline, [H, B * K]
    in the same order. The baseline is the mean of the episode's other rankings, or of the batch when K = 1."""
    group = reward if reward.shape[-1] > 1 else reward.transpose(1, 2)
    baseline = (group.sum(-1, keepdim=True) - group) / (group.shape[-1] - 1)
    return (group - baseline).reshape(reward.shape[0], -1)


def normalised(advantage: torch.Tensor, clip: float) -> torch.Tensor:
    """Advantages [H, N] normalised per head (mean 0, std 1), then clamped to [-clip, clip]."""
    advantage = (advantage - advantage.mean(1, keepdim=True)) / (advantage.std(1, keepdim=True) + 1e-8)
    return advantage.clamp(-clip, clip)


@torch.no_grad()
def evaluate_heads(network: torch.nn.Module, pool: EpisodePool) -> torch.Tensor:
    """Mean holistic score per head over every episode of ``pool``, ranking by the scores (argsort). [H]."""
    heads, episodes = pool.importance.shape[:2]
    total = torch.zeros(heads)
    for group in pool.length_groups():
        keys, values, positions, ages, valid, importance = pool.batch(group.expand(heads, -1))
        scores = network(keys, values, positions, ages).masked_fill(~valid, float("-inf"))
        total += (-1.0 / holistic_reward(importance, as_ranking(scores))).sum(1)
    return total / episodes


def train(config: TrainConfig, progress: bool = True) -> dict:
    # Under torchrun, every process trains on its own batches and DDP averages the gradients (gloo on CPU, NCCL
    # on GPUs); process 0 evaluates, logs and writes the checkpoints.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    main = rank == 0
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)  # the same initial weights everywhere
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed + rank)  # different batches per process
    with open_traces(config.traces[0]) as first:
        header = first.header
    heads = parse_heads(config.heads, header.layers, header.geometry.num_kv_heads)

    # Data: every episode of the chosen heads, once.
    train_pool = EpisodePool(config.traces, "train", heads, config.random_splits, config.min_prompt, rng)
    val_pool = EpisodePool(config.traces, "val", heads, 0, config.min_prompt, rng)

    # Model, EMA copy, optimiser, schedule.
    max_age = config.max_age or int(train_pool.split.max())
    network = KVPNetwork(
        len(heads), header.geometry.head_dim, config.width, config.position_dim, config.buckets, max_age
    )
    ema = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(config.ema))
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def lr_factor(step: int) -> float:
        if step < config.warmup:
            return 0.01 + 0.99 * step / max(1, config.warmup)
        progress_ = (step - config.warmup) / max(1, config.steps - config.warmup)
        floor = config.min_lr / config.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    model = torch.nn.parallel.DistributedDataParallel(network) if world > 1 else network
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start, best = 0, {"score": -1.0, "step": -1, "per_head": []}
    last = out / "last.pt"
    if last.exists():  # resume where the last run stopped
        state = torch.load(last, weights_only=False)
        network.load_state_dict(state["network"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        if rank:
            generator.manual_seed(config.seed + rank + state["step"])
        start, best = state["step"], state["best"]
    from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import

    writer = SummaryWriter(str(out / "tb")) if main else None
    trace_hash = "+".join(file_sha256(p)[:16] for p in config.traces)
    metadata = {
        "model": header.model,
        "geometry": {
            "head_dim": header.geometry.head_dim,
            "num_layers": header.geometry.num_layers,
            "num_kv_heads": header.geometry.num_kv_heads,
        },
        "trace_hash": trace_hash,
        "training": dataclasses.asdict(config),
    }
    groups = train_pool.length_groups()
    group_sizes = torch.tensor([len(g) for g in groups], dtype=torch.float)
    started = warm = time.perf_counter()
    bar = tqdm(
        range(start, config.steps), desc="train kvp", disable=not (progress and main), initial=start, total=config.steps
    )
    for step in bar:
        # 1. A batch of episodes per head, all from one length group (picked with probability proportional to its
        # size, so every episode is equally likely), and K sampled rankings per episode: [H, B, K, n].
        same_length = groups[int(torch.multinomial(group_sizes, 1, generator=generator))]
        index = same_length[torch.randint(len(same_length), (len(heads), config.batch), generator=generator)]
        keys, values, positions, ages, valid, importance = train_pool.batch(index)
        scores = model(keys, values, positions, ages)[:, :, None].expand(-1, -1, config.rankings, -1)
        valid, importance = valid[:, :, None].expand_as(scores), importance[:, :, None].expand_as(scores)
        ranking = gumbel_ranking(scores.detach(), valid, generator)
        reward = holistic_reward(importance, ranking)  # [H, B, K], <= -1

        # 2. Leave-one-out baseline (over the episode's other rankings, or over the batch when K = 1), then
        # advantages normalised per head and clamped.
        raw_advantage = leave_one_out(reward)
        advantage = normalised(raw_advantage, config.advantage_clip)

        # 3. REINFORCE: - advantage * log P(ranking); heads sum, so each head's gradient is its own.
        log_prob = plackett_luce_log_prob(scores, ranking, valid).reshape(len(heads), -1)  # the advantages' order
        loss = -(advantage * log_prob).mean(1).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_per_head(network, config.grad_clip)
        optimizer.step()
        schedule.step()
        ema.update_parameters(network)
        if step == start:  # speeds are measured from the second step on (the first one warms caches up)
            warm = time.perf_counter()

        if not main:
            continue
        writer.add_scalar("train/reward", reward.mean().item(), step)
        writer.add_scalar("train/holistic_score", (-1 / reward).mean().item(), step)
        writer.add_scalar("train/advantage_std", raw_advantage.std().item(), step)
        writer.add_scalar("train/log_prob", log_prob.mean().item(), step)
        writer.add_scalar("train/grad_norm", grad_norm.mean().item(), step)
        writer.add_scalar("train/lr", schedule.get_last_lr()[0], step)

        # 4. Evaluate the EMA weights; keep the best; save the state to resume from.
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            per_head = evaluate_heads(ema.module, val_pool)
            score = per_head.mean().item()
            writer.add_scalar("eval/holistic_score", score, step)
            bar.set_postfix(eval=f"{score:.3f}", best=f"{max(score, best['score']):.3f}")
            if score > best["score"]:
                best = {"score": score, "step": step + 1, "per_head": per_head.tolist()}
                save_checkpoint(out / "agents.safetensors", ema.module, heads, {**metadata, "validation": best})
            with atomic_path(last) as tmp:
                torch.save(
                    {
                        "network": network.state_dict(),
                        "ema": ema.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(),
                        "generator": generator.get_state(),
                        "step": step + 1,
                        "best": best,
                    },
                    tmp,
                )
    now = time.perf_counter()
    summary = {
        "world_size": world,
        "heads": len(heads),
        "steps": config.steps,
        "seconds": now - started,
        "steps_per_second": (config.steps - start - 1) / (now - warm) if config.steps - start > 1 else None,
        "best_validation_score": best["score"],
        "best_step": best["step"],
        "checkpoint": str(out / "agents.safetensors"),
    }
    if world > 1:  # DDP keeps the replicas identical; check it rather than trust it
        checksum = float(sum(p.double().sum() for p in network.parameters()))
        sums: list = [None] * world
        dist.all_gather_object(sums, checksum)
        summary["replicas_in_sync"] = max(sums) - min(sums) <= 1e-9 * max(1.0, abs(checksum))
    if main:
        writer.close()
        with atomic_path(out / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
    if world > 1:
        dist.barrier()
    return summary

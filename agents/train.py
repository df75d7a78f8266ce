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

This module holds the objective (:func:`chunk_loss`), the validation score (:func:`evaluate_heads`) and the loop
(:func:`train`): sample -> rank -> reward -> loss -> step, then evaluate, log and checkpoint. The data (episodes,
pools, prefetch, chunks of heads) is agents/data.py; the learner's state (network, EMA copy, optimiser, schedule,
saved to OUT/last.pt and resumed) agents/learner.py; the processes under torchrun (DDP, head groups)
agents/distributed.py. Devices: ``device`` auto (CUDA when present), cpu or cuda; under torchrun each process uses
its own GPU (LOCAL_RANK). Random draws stay on the CPU, so the same seed draws the same batches and rankings on
every device.

The settings (:class:`kvp_gym_agents.config.TrainConfig`, presets) and the ``kvp-gym train`` command line live in
agents/config.py, which does not import torch.

Imports kvp_gym.device, .importance, .storage, .traces and .utility; kvp_gym_agents.checkpoint, .config, .data,
.distributed, .kvp and .learner.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kvp_gym.device import resolve_device
from kvp_gym.importance import ImportanceStore, content_id
from kvp_gym.storage import atomic_path
from kvp_gym.traces import TraceFile, open_compatible
from kvp_gym.utility import as_ranking, holistic_reward
from kvp_gym_agents.checkpoint import save_checkpoint
from kvp_gym_agents.config import CHOICES, TrainConfig
from kvp_gym_agents.data import (
    AUTO_CHUNK_TOKENS,
    Episodes,
    Head,
    MemoryPool,
    Pool,
    Prefetcher,
    StreamingPool,
    batches,
    head_chunks,
    model_inputs,
    parse_heads,
    prepare_importance,
)
from kvp_gym_agents.distributed import (
    data_parallel,
    head_group,
    merge_head_groups,
    replicas_in_sync,
    start_processes,
    wait_for_all,
)
from kvp_gym_agents.kvp import gumbel_ranking, plackett_luce_log_prob
from kvp_gym_agents.learner import Learner


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


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast for the network on a GPU when asked for; else nothing (rewards always in float32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else contextlib.nullcontext()


def chunk_loss(
    model: torch.nn.Module,
    rows: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    ages: torch.Tensor,
    valid: torch.Tensor,
    importance: torch.Tensor,
    noise: torch.Tensor,
    config: TrainConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RLOO loss of one chunk of heads ``rows`` [H'] (inputs as :func:`model_inputs` gives them; ``noise``
    [H', B, K, n] uniform draws for the rankings), and its statistics [4]: sums over the heads of the mean reward,
    holistic score, advantage std and log-probability. Heads' losses add up: a step's loss is the sum over its
    chunks, whatever the chunks."""
    device = keys.device
    # 1. K sampled rankings per episode from one network pass: [H', B, K, n].
    with autocast(device, config.bf16):
        scores = model(keys, values, positions, ages, rows.to(device))
    scores = scores.float()[:, :, None].expand(-1, -1, config.rankings, -1)
    valid = valid[:, :, None].expand_as(scores)
    ranking = gumbel_ranking(scores.detach(), valid, uniform=noise)
    with torch.device(device):  # the utility code makes its index tensors on the default device
        reward = holistic_reward(importance[:, :, None].expand_as(scores), ranking)  # [H', B, K], <= -1
    # 2. Leave-one-out baseline (over the episode's other rankings, or over the batch when K = 1), then advantages
    # normalised per head and clamped.
    raw_advantage = leave_one_out(reward)
    advantage = normalised(raw_advantage, config.advantage_clip)
    # 3. REINFORCE: - advantage * log P(ranking); heads sum, so each head's gradient is its own.
    log_prob = plackett_luce_log_prob(scores, ranking, valid).reshape(len(rows), -1)  # the advantages' order
    loss = -(advantage * log_prob).mean(1).sum()
    with torch.no_grad():
        stats = torch.stack(
            [
                reward.mean((1, 2)).sum(),
                (-1 / reward).mean((1, 2)).sum(),
                raw_advantage.std(1).sum(),
                log_prob.mean(1).sum(),
            ]
        )
    return loss, stats


@torch.no_grad()
def evaluate_heads(
    network: torch.nn.Module,
    pool: Pool,
    device: torch.device | None = None,
    chunk_tokens: int = AUTO_CHUNK_TOKENS["cpu"],
    bf16: bool = False,
) -> torch.Tensor:
    """Mean holistic score per head over every episode of ``pool``, ranking by the scores (argsort). [H] (CPU).
    The network runs on ``device`` (default CPU) in chunks of at most ``chunk_tokens`` tokens."""
    device = device or torch.device("cpu")
    heads, episodes = len(pool.heads), len(pool.episodes)
    total = torch.zeros(heads, device=device)
    for group in pool.episodes.length_groups():
        n = int(pool.episodes.split[group].max())
        for part in group.split(max(1, chunk_tokens // n)):
            for rows in head_chunks(heads, len(part), n, chunk_tokens):
                keys, values, positions, ages, valid, importance = model_inputs(
                    pool.batch(part.expand(len(rows), -1), rows),
                    device,
                    network.key_frame,
                    [pool.rotaries[r] for r in rows.tolist()],
                )
                with autocast(device, bf16):
                    scores = network(keys, values, positions, ages, rows.to(device))
                scores = scores.float().masked_fill(~valid, float("-inf"))
                with torch.device(device):  # the utility code makes its index tensors on the default device
                    total[rows.to(device)] += (-1.0 / holistic_reward(importance, as_ranking(scores))).sum(1)
    return total.cpu() / episodes


def train(config: TrainConfig, progress: bool = True) -> dict:
    """Train KVP agents (see the module docstring); return the run's summary (also written to OUT/summary.json)."""
    device = resolve_device(config.device)
    for name in ("parallel", "key_frame", "ages", "index"):  # before any work: the network checks them late
        if getattr(config, name) not in CHOICES[name]:
            raise ValueError(f"{name} must be one of {CHOICES[name]}, got {getattr(config, name)!r}")
    rank, world = start_processes(device)
    with open_compatible(config.traces[:1])[0] as first:
        header = first.header
    heads = parse_heads(config.heads, header.layers, header.geometry.num_kv_heads)
    unknown = sorted({layer for layer, _ in heads if header.rotary_of(layer) is None})
    if config.key_frame == "pre" and unknown:
        raise ValueError(
            f"{config.traces[0]}: key_frame 'pre' un-rotates the keys with the RoPE in the trace header, which it "
            f"does not record for layers {unknown}; recollect the traces, or train with key_frame 'post'"
        )
    out = Path(config.out)
    if world == 1 or config.parallel == "data":
        summary = _train(config, heads, out, device, rank, world, progress)
    else:  # disjoint head groups, one per process, trained independently, merged by process 0
        mine = head_group(heads, rank, world)
        summary = _train(config, mine, out / f"heads-{rank}-of-{world}", device, 0, 1, progress and rank == 0)
        summary = merge_head_groups(summary, out, len(heads), rank, world)
    wait_for_all(world)
    return summary


def _train(
    config: TrainConfig,
    heads: list[Head],
    out: Path,
    device: torch.device,
    rank: int,
    world: int,
    progress: bool,
) -> dict:
    """Train the networks of ``heads`` into ``out``; with ``world`` > 1, as one process of data-parallel DDP."""
    out.mkdir(parents=True, exist_ok=True)
    files = open_compatible(config.traces)
    try:
        train_pool, val_pool = _pools(files, config, heads, device, rank, world, progress)
        return _loop(config, heads, train_pool, val_pool, _metadata(files, config), out, device, rank, world, progress)
    finally:
        for f in files:
            f.close()


def _pools(
    files: Sequence[TraceFile],
    config: TrainConfig,
    heads: list[Head],
    device: torch.device,
    rank: int,
    world: int,
    progress: bool,
) -> tuple[Pool, Pool]:
    """The training and validation pools of ``heads``, their future importance in the stores."""
    rng = np.random.default_rng(config.seed)
    stores = [ImportanceStore(f, device=device) for f in files]
    train_episodes = Episodes(files, "train", config.random_splits, config.min_prompt, rng)
    val_episodes = Episodes(files, "val", 0, config.min_prompt, rng)
    # Future importance: computed once (shared between the processes), then read by every batch.
    prepare_importance(stores, [train_episodes, val_episodes], heads, rank, world, progress=progress and rank == 0)
    wait_for_all(world)
    pool_type = MemoryPool if config.in_memory else StreamingPool
    return pool_type(files, stores, train_episodes, heads), pool_type(files, stores, val_episodes, heads)


def _metadata(files: Sequence[TraceFile], config: TrainConfig) -> dict:
    """The checkpoint's record of the run: model, geometry, trace-set hash and settings."""
    header = files[0].header
    return {
        "model": header.model,
        "geometry": {
            "head_dim": header.geometry.head_dim,
            "num_layers": header.geometry.num_layers,
            "num_kv_heads": header.geometry.num_kv_heads,
        },
        "trace_hash": "+".join(content_id(f)[:16] for f in files),
        "training": dataclasses.asdict(config),
    }


def _loop(
    config: TrainConfig,
    heads: list[Head],
    train_pool: Pool,
    val_pool: Pool,
    metadata: dict,
    out: Path,
    device: torch.device,
    rank: int,
    world: int,
    progress: bool,
) -> dict:
    """The training loop of :func:`_train` (the data prepared): sample -> rank -> reward -> loss -> step, then (on
    process 0) log, evaluate and checkpoint."""
    main, ddp = rank == 0, world > 1
    chunk_tokens = config.chunk_tokens or AUTO_CHUNK_TOKENS[device.type]
    max_age = config.max_age or int(train_pool.episodes.split.max())
    learner = Learner.build(config, len(heads), metadata["geometry"]["head_dim"], max_age, device)
    model = data_parallel(learner.network, device) if ddp else learner.network
    generator = torch.Generator().manual_seed(config.seed + rank)  # different batches per process
    last = out / "last.pt"
    start, best = learner.resume(last, generator, config.seed, rank)  # where the last run stopped, if any
    writer = _tensorboard(out) if main else None
    started = warm = time.perf_counter()
    waited = 0.0  # seconds the loop waited for the prefetch thread's batches
    bar = tqdm(
        range(start, config.steps), desc="train kvp", disable=not (progress and main), initial=start, total=config.steps
    )
    data = Prefetcher(
        batches(train_pool, config, generator, config.steps - start, chunk_tokens, pin=device.type == "cuda")
    )
    try:
        for step in bar:
            # 1-3. Sample (the prefetch thread's next chunk), then rank, reward and loss (chunk_loss), chunk by chunk:
            # each head's loss, and so its gradient, is its own, so chunks of heads add up to the whole batch's
            # update. DDP averages the gradients at the last chunk's backward pass.
            sums = torch.zeros(4, device=device)  # reward, holistic score, advantage std, log-prob: sums over heads
            learner.optimizer.zero_grad(set_to_none=True)
            state_after = None
            while state_after is None:
                tick = time.perf_counter()
                rows, batch, noise, state_after = next(data)
                waited += time.perf_counter() - tick
                keys, values, positions, ages, valid, importance = model_inputs(
                    batch, device, config.key_frame, [train_pool.rotaries[r] for r in rows.tolist()]
                )
                noise = noise.to(device)
                with model.no_sync() if ddp and state_after is None else contextlib.nullcontext():
                    loss, stats = chunk_loss(
                        model, rows, keys, values, positions, ages, valid, importance, noise, config
                    )
                    loss.backward()
                sums += stats
            # 4. Step: each head's gradient clipped, AdamW, the learning-rate schedule, the EMA copy.
            grad_norm = learner.step(config.grad_clip)
            if step == start:  # speeds are measured from the second step on (the first one warms caches up)
                warm = time.perf_counter()

            if not main:
                continue
            means = (sums / len(heads)).tolist()
            for name, value in zip(("reward", "holistic_score", "advantage_std", "log_prob"), means, strict=True):
                writer.add_scalar(f"train/{name}", value, step)
            writer.add_scalar("train/grad_norm", grad_norm.mean().item(), step)
            writer.add_scalar("train/lr", learner.schedule.get_last_lr()[0], step)

            # 5. Evaluate the EMA weights; keep the best; save the state to resume from.
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                per_head = evaluate_heads(learner.ema.module, val_pool, device, chunk_tokens, config.bf16)
                score = per_head.mean().item()
                writer.add_scalar("eval/holistic_score", score, step)
                bar.set_postfix(eval=f"{score:.3f}", best=f"{max(score, best['score']):.3f}")
                if score > best["score"]:
                    best = {"score": score, "step": step + 1, "per_head": per_head.tolist()}
                    checkpoint = {**metadata, "validation": best}
                    save_checkpoint(out / "agents.safetensors", learner.ema.module, heads, checkpoint)
                # The generator's state after this step's draws (the prefetch thread runs ahead).
                learner.save(last, state_after, step + 1, best)
    finally:
        data.close()
    now = time.perf_counter()
    summary = {
        "world_size": world,
        "parallel": "data",
        "device": str(device),
        "heads": len(heads),
        "steps": config.steps,
        "seconds": now - started,
        "steps_per_second": (config.steps - start - 1) / (now - warm) if config.steps - start > 1 else None,
        "data_wait_seconds": waited,
        "best_validation_score": best["score"],
        "best_step": best["step"],
        "checkpoint": str(out / "agents.safetensors"),
    }
    if ddp:
        summary["replicas_in_sync"] = replicas_in_sync(learner.network, world)
    if main:
        writer.close()
        with atomic_path(out / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
    return summary


def _tensorboard(out: Path):
    """A TensorBoard writer of OUT/tb (imported here: tensorboard is slow to import)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tb"))

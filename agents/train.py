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

Data and memory: the episodes of a split are an index of (sample, split point) pairs; a prefetch thread reads the
keys and values of the next batches from the trace files (:class:`StreamingPool`; ``in_memory`` holds them all in
RAM instead, :class:`MemoryPool`) and their future importance from the traces' importance store
(:mod:`kvp_gym.importance`: computed once, before the first step, and kept beside the user cache for later runs,
the environment and evaluation). A step runs in chunks of heads of at most ``chunk_tokens`` tokens each (every
head's loss is its own, so the update is the same as in one piece): memory is set by the chunk, not by the number
of samples or heads.

Devices: ``device`` auto (CUDA when present), cpu or cuda; under torchrun each process uses its own GPU
(LOCAL_RANK) with NCCL, or gloo on CPUs. ``parallel`` data (DDP: every process draws its own batches of every
head, gradients averaged) or heads (every process trains a disjoint group of heads on its own, no communication
until process 0 merges the groups' checkpoints). Random draws stay on the CPU, so the same seed draws the same
batches and rankings on every device.

The settings (:class:`kvp_gym_agents.config.TrainConfig`, presets) and the ``kvp-gym train`` command line live in
agents/config.py, which does not import torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from kvp_gym.device import resolve_device
from kvp_gym.importance import ImportanceStore, content_id
from kvp_gym.storage import atomic_path
from kvp_gym.traces import SampleInfo, TraceFile, open_compatible
from kvp_gym.utility import as_ranking, holistic_reward
from kvp_gym_agents.checkpoint import merge_checkpoints, save_checkpoint
from kvp_gym_agents.config import TrainConfig
from kvp_gym_agents.kvp import KVPNetwork, gumbel_ranking, plackett_luce_log_prob

Head = tuple[int, int]  # (layer, KV head)
# Tokens (heads x episodes x cache tokens) per chunk of a step when ``chunk_tokens`` is 0: about 0.5 GB of
# activations for the demo preset's width 32 on a CPU; GPUs take bigger chunks.
AUTO_CHUNK_TOKENS = {"cpu": 2**18, "cuda": 2**21}
PREFETCH = 2  # chunks read ahead of the one being trained on


def parse_heads(spec: str, layers: tuple[int, ...], num_kv_heads: int) -> list[Head]:
    """``all`` or ``layer:head,layer:head`` -> [(layer, head)]; ValueError naming what exists."""
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


class Episodes:
    """The episodes of one split: (sample, split point) pairs, shared by every head.

    samples: (file index, SampleInfo) of every sample of the split, file then name order; sample [E] (index into
    ``samples``) and split [E] (the split point n: the cache is tokens 0..n-1). Task samples split at the prompt
    boundary; free-text samples at ``random_splits`` random points in [min(min_prompt, S - 1), S) when given.
    """

    def __init__(
        self, files: Sequence[TraceFile], split: str, random_splits: int, min_prompt: int, rng: np.random.Generator
    ):
        self.samples: list[tuple[int, SampleInfo]] = [(i, s) for i, f in enumerate(files) for s in f.split(split)]
        if not self.samples:
            raise ValueError(f"no {split!r} samples in {[str(f.path) for f in files]}")
        episode_sample, episode_split = [], []
        for i, (_, sample) in enumerate(self.samples):
            splits = [sample.prompt_length]
            if sample.future_source == "text" and random_splits:  # free text: random split points
                low = min(min_prompt, sample.num_tokens - 1)
                splits = sorted(rng.integers(low, sample.num_tokens, size=random_splits).tolist())
            episode_sample += [i] * len(splits)
            episode_split += splits
        self.sample = torch.tensor(episode_sample)
        self.split = torch.tensor(episode_split)

    def __len__(self) -> int:
        return len(self.split)

    def length_groups(self) -> list[torch.Tensor]:
        """Episode indices grouped by split point, one group per power of two, so that a batch drawn from one group
        pads little (a batch is as long as its longest episode)."""
        octave = torch.ceil(torch.log2(self.split.float())).long()
        return [torch.nonzero(octave == o).flatten() for o in octave.unique()]

    def splits_of(self) -> dict[int, list[int]]:
        """sample index -> its split points."""
        found: dict[int, set[int]] = {}
        for sample, split in zip(self.sample.tolist(), self.split.tolist(), strict=True):
            found.setdefault(sample, set()).add(split)
        return {sample: sorted(splits) for sample, splits in found.items()}


def prepare_importance(
    stores: Sequence[ImportanceStore],
    episodes: Sequence[Episodes],
    heads: Sequence[Head],
    rank: int = 0,
    world: int = 1,
    progress: bool = False,
) -> int:
    """Compute the future importance the episodes need and the stores lack (process ``rank`` of ``world`` takes
    every world-th sample); return the number of entries computed. Resumable: each entry is written when done."""
    layers = sorted({layer for layer, _ in heads})
    work = [(e, s, splits) for e in episodes for s, splits in e.splits_of().items()]
    computed = 0
    for e, s, splits in tqdm(work[rank::world], desc="importance", unit="sample", disable=not progress):
        file, info = e.samples[s]
        for layer in layers:
            computed += stores[file].ensure(info, layer, splits)
    return computed


class StreamingPool:
    """Episodes read from the trace files batch by batch: memory holds one batch, whatever the number of samples.

    Keys and values come from the traces (only the batch's heads and samples), importance from the stores.
    """

    def __init__(
        self, files: Sequence[TraceFile], stores: Sequence[ImportanceStore], episodes: Episodes, heads: Sequence[Head]
    ):
        self.files, self.stores, self.episodes, self.heads = files, stores, episodes, list(heads)
        self.head_dim = files[0].header.geometry.head_dim

    def batch(self, index: torch.Tensor, rows: torch.Tensor, buffers: dict | None = None) -> tuple[torch.Tensor, ...]:
        """index [H', B] episode indices for the heads ``rows`` [H'] (indices into ``heads``) -> keys, values float16
        [H', B, n, D], importance float32 [H', B, n] (0 past each split), splits [H', B]; n = the longest split.
        ``buffers`` (a dict this pool fills and reuses) holds the tensors' memory from one call to the next."""
        splits = self.episodes.split[index]
        n = int(splits.max())
        buffers = {} if buffers is None else buffers
        shape = (*index.shape, n)
        keys = reused(buffers, "keys", (*shape, self.head_dim), torch.float16)
        values = reused(buffers, "values", (*shape, self.head_dim), torch.float16)
        importance = reused(buffers, "importance", shape, torch.float32)
        read: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (row, sample) -> keys, values
        stored: dict[tuple[int, int, int], torch.Tensor] = {}  # (sample, layer, split) -> importance [H_kv, split]
        for i, row in enumerate(rows.tolist()):
            layer, head = self.heads[row]
            for j, (episode, split) in enumerate(zip(index[i].tolist(), splits[i].tolist(), strict=True)):
                sample = int(self.episodes.sample[episode])
                file, info = self.episodes.samples[sample]
                if (row, sample) not in read:
                    trace = self.files[file].head(info, layer, head, queries=False)
                    read[row, sample] = trace.keys, trace.values
                if (sample, layer, split) not in stored:
                    stored[sample, layer, split] = self.stores[file].layer(info, layer, split)
                k, v = read[row, sample]
                for out, data in ((keys, k), (values, v), (importance, stored[sample, layer, split][head])):
                    out[i, j, :split].copy_(data[:split])
                    out[i, j, split:].zero_()
        return keys, values, importance, splits


def reused(buffers: dict, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``shape`` on the memory ``buffers[name]`` (grown when too small). Batches reuse memory: fresh
    multi-megabyte tensors per batch cost more in page faults than filling them."""
    size = math.prod(shape)
    if name not in buffers or buffers[name].numel() < size:
        buffers[name] = torch.empty(size, dtype=dtype, pin_memory=buffers.get("pin", False))
    return buffers[name][:size].view(shape)


class MemoryPool:
    """Every episode of the chosen heads in RAM, padded to the longest sample (fast for small sets; memory grows
    with the set: keys and values float16 [H, N, S, D], importance float32 [H, E, S]). Same batches as
    :class:`StreamingPool`."""

    def __init__(
        self, files: Sequence[TraceFile], stores: Sequence[ImportanceStore], episodes: Episodes, heads: Sequence[Head]
    ):
        self.episodes, self.heads = episodes, list(heads)
        length = max(s.num_tokens for _, s in episodes.samples)
        head_dim = files[0].header.geometry.head_dim
        self.keys = torch.zeros(len(heads), len(episodes.samples), length, head_dim, dtype=torch.float16)
        self.values = torch.zeros_like(self.keys)
        self.importance = torch.zeros(len(heads), len(episodes), length)
        for i, (file, info) in enumerate(episodes.samples):
            for h, (layer, head) in enumerate(heads):
                trace = files[file].head(info, layer, head, queries=False)
                self.keys[h, i, : info.num_tokens] = trace.keys
                self.values[h, i, : info.num_tokens] = trace.values
        for e, (sample, split) in enumerate(zip(episodes.sample.tolist(), episodes.split.tolist(), strict=True)):
            file, info = episodes.samples[sample]
            for h, (layer, head) in enumerate(heads):
                self.importance[h, e, :split] = stores[file].layer(info, layer, split)[head]

    def batch(self, index: torch.Tensor, rows: torch.Tensor, buffers: dict | None = None) -> tuple[torch.Tensor, ...]:
        """As :meth:`StreamingPool.batch` (``buffers`` unused)."""
        splits = self.episodes.split[index]
        n = int(splits.max())
        samples = self.episodes.sample[index]
        heads = rows[:, None]
        valid = torch.arange(n) < splits[..., None]
        keys = self.keys[heads, samples, :n] * valid[..., None]  # zero past each split, as streamed
        values = self.values[heads, samples, :n] * valid[..., None]
        return keys, values, self.importance[heads, index, :n], splits


def head_chunks(heads: int, episodes: int, tokens: int, chunk_tokens: int) -> list[torch.Tensor]:
    """Head indices in chunks of at most ``chunk_tokens`` tokens (episodes x tokens per head; at least one head)."""
    size = max(1, chunk_tokens // max(1, episodes * tokens))
    return list(torch.arange(heads).split(size))


def model_inputs(
    batch: Sequence[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys, values, importance, splits) of a pool batch -> on ``device``: keys, values [H', B, n, D], positions
    [1, 1, n], ages [H', B, n], valid [H', B, n], importance [H', B, n]."""
    keys, values, importance, splits = (t.to(device) for t in batch)  # synchronous: the memory is reused
    n = keys.shape[2]
    positions = torch.arange(n, device=device)
    return (
        keys,
        values,
        positions.reshape(1, 1, n),
        splits[..., None] - 1 - positions,
        positions < splits[..., None],
        importance,
    )


class Prefetcher:
    """Runs an iterator in a thread, ``depth`` items ahead: the trace reads overlap the training arithmetic (the HDF5
    library and torch release the interpreter while they work). Errors surface in the consumer."""

    def __init__(self, items: Iterator, depth: int = PREFETCH):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True, name="kvp-prefetch")
        self._thread.start()

    def _run(self, items: Iterator) -> None:
        try:
            for item in items:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as err:  # handed to the consumer, raised there
            self._queue.put(err)

    def __next__(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join()


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


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast for the network on a GPU when asked for; else nothing (rewards always in float32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def evaluate_heads(
    network: torch.nn.Module,
    pool: StreamingPool | MemoryPool,
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
                    pool.batch(part.expand(len(rows), -1), rows), device
                )
                with autocast(device, bf16):
                    scores = network(keys, values, positions, ages, rows.to(device))
                scores = scores.float().masked_fill(~valid, float("-inf"))
                with torch.device(device):  # the utility code makes its index tensors on the default device
                    total[rows.to(device)] += (-1.0 / holistic_reward(importance, as_ranking(scores))).sum(1)
    return total.cpu() / episodes


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


def batches(
    pool: StreamingPool | MemoryPool,
    config: TrainConfig,
    generator: torch.Generator,
    steps: int,
    chunk_tokens: int,
    pin: bool,
) -> Iterator[tuple]:
    """The training batches, chunk by chunk: (rows, pool batch, uniform noise [H', B, K, n] for the rankings,
    generator state after the step or None). Every random draw is made here, on the CPU generator, in order."""
    groups = pool.episodes.length_groups()
    sizes = torch.tensor([len(g) for g in groups], dtype=torch.float)
    heads = len(pool.heads)
    # Reused memory (pinned for a GPU), one set per chunk in flight: queued, being filled, being trained on.
    ring = [{"pin": pin} for _ in range(PREFETCH + 3)]
    count = 0
    for _ in range(steps):
        # A batch of episodes per head, all from one length group (picked with probability proportional to its size,
        # so every episode is equally likely).
        same_length = groups[int(torch.multinomial(sizes, 1, generator=generator))]
        index = same_length[torch.randint(len(same_length), (heads, config.batch), generator=generator)]
        n = int(pool.episodes.split[index].max())
        chunks = head_chunks(heads, config.batch, n, chunk_tokens)
        for c, rows in enumerate(chunks):
            buffers = ring[count % len(ring)]
            count += 1
            batch = pool.batch(index[rows], rows, buffers)
            shape = (len(rows), config.batch, config.rankings, batch[0].shape[2])  # the chunk's own longest split
            noise = reused(buffers, "noise", shape, torch.float32)
            torch.rand(noise.shape, generator=generator, out=noise)
            yield rows, batch, noise, generator.get_state() if c == len(chunks) - 1 else None


def train(config: TrainConfig, progress: bool = True) -> dict:
    """Train KVP agents (see the module docstring); return the run's summary (also written to OUT/summary.json)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(config.device)
    if config.parallel not in ("data", "heads"):
        raise ValueError(f"parallel must be 'data' or 'heads', got {config.parallel!r}")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    with open_compatible(config.traces[:1])[0] as first:
        header = first.header
    heads = parse_heads(config.heads, header.layers, header.geometry.num_kv_heads)
    if world == 1 or config.parallel == "data":
        summary = _train(config, heads, Path(config.out), device, rank, world, progress)
    else:  # disjoint head groups, one per process, trained independently, merged by process 0
        groups = [g.tolist() for g in np.array_split(np.arange(len(heads)), world)]
        if min(map(len, groups)) == 0:
            raise ValueError(f"parallel 'heads': {world} processes for {len(heads)} heads; use at most one per head")
        mine = [heads[i] for i in groups[rank]]
        out = Path(config.out) / f"heads-{rank}-of-{world}"
        summary = _train(config, mine, out, device, 0, 1, progress and rank == 0)
        summaries: list = [None] * world
        dist.all_gather_object(summaries, summary)
        if rank == 0:
            merged = Path(config.out) / "agents.safetensors"
            metadata = merge_checkpoints([s["checkpoint"] for s in summaries], merged)
            summary = {
                **summary,
                "world_size": world,
                "parallel": "heads",
                "heads": len(heads),
                "seconds": max(s["seconds"] for s in summaries),
                "steps_per_second": _smallest(s["steps_per_second"] for s in summaries),
                "best_validation_score": metadata["validation"]["score"],
                "best_step": [s["best_step"] for s in summaries],
                "checkpoint": str(merged),
                "groups": summaries,
            }
            with atomic_path(Path(config.out) / "summary.json") as tmp:
                tmp.write_text(json.dumps(summary, indent=2))
    if world > 1:
        dist.barrier()
    return summary


def _smallest(values) -> float | None:
    found = [v for v in values if v is not None]
    return min(found) if found else None


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
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed + rank)  # different batches per process
    files = open_compatible(config.traces)
    try:
        header = files[0].header
        stores = [ImportanceStore(f, device=device) for f in files]
        train_episodes = Episodes(files, "train", config.random_splits, config.min_prompt, rng)
        val_episodes = Episodes(files, "val", 0, config.min_prompt, rng)
        # Future importance: computed once (shared between the processes), then read by every batch.
        prepare_importance(stores, [train_episodes, val_episodes], heads, rank, world, progress=progress)
        if world > 1:
            dist.barrier()
        pool_type = MemoryPool if config.in_memory else StreamingPool
        train_pool = pool_type(files, stores, train_episodes, heads)
        val_pool = pool_type(files, stores, val_episodes, heads)
        trace_hash = "+".join(content_id(f)[:16] for f in files)
        return _loop(
            config, header, heads, trace_hash, train_pool, val_pool, out, device, rank, world, generator, progress
        )
    finally:
        for f in files:
            f.close()


def _loop(
    config: TrainConfig,
    header,
    heads: list[Head],
    trace_hash: str,
    train_pool: StreamingPool | MemoryPool,
    val_pool: StreamingPool | MemoryPool,
    out: Path,
    device: torch.device,
    rank: int,
    world: int,
    generator: torch.Generator,
    progress: bool,
) -> dict:
    """The training loop of :func:`_train` (the data prepared)."""
    main = rank == 0
    chunk_tokens = config.chunk_tokens or AUTO_CHUNK_TOKENS[device.type]
    # Model, EMA copy, optimiser, schedule.
    torch.manual_seed(config.seed)  # the same initial weights everywhere
    max_age = config.max_age or int(train_pool.episodes.split.max())
    network = KVPNetwork(
        len(heads), header.geometry.head_dim, config.width, config.position_dim, config.buckets, max_age
    ).to(device)
    ema = AveragedModel(network, device=device, multi_avg_fn=get_ema_multi_avg_fn(config.ema))
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def lr_factor(step: int) -> float:
        if step < config.warmup:
            return 0.01 + 0.99 * step / max(1, config.warmup)
        progress_ = (step - config.warmup) / max(1, config.steps - config.warmup)
        floor = config.min_lr / config.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    ddp = world > 1
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device] if device.type == "cuda" else None
        )
    else:
        model = network
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start, best = 0, {"score": -1.0, "step": -1, "per_head": []}
    last = out / "last.pt"
    if last.exists():  # resume where the last run stopped
        state = torch.load(last, map_location="cpu", weights_only=False)
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
            # One step, chunk by chunk: each head's loss, and so its gradient, is its own, so chunks of heads add up
            # to the whole batch's update. DDP averages the gradients at the last chunk's backward pass.
            sums = torch.zeros(4, device=device)  # reward, holistic score, advantage std, log-prob: sums over heads
            optimizer.zero_grad(set_to_none=True)
            state_after = None
            while state_after is None:
                tick = time.perf_counter()
                rows, batch, noise, state_after = next(data)
                waited += time.perf_counter() - tick
                keys, values, positions, ages, valid, importance = model_inputs(batch, device)
                noise = noise.to(device)
                with model.no_sync() if ddp and state_after is None else contextlib.nullcontext():
                    loss, stats = chunk_loss(
                        model, rows, keys, values, positions, ages, valid, importance, noise, config
                    )
                    loss.backward()
                sums += stats
            grad_norm = clip_per_head(network, config.grad_clip)
            optimizer.step()
            schedule.step()
            ema.update_parameters(network)
            if step == start:  # speeds are measured from the second step on (the first one warms caches up)
                warm = time.perf_counter()

            if not main:
                continue
            means = (sums / len(heads)).tolist()
            for name, value in zip(("reward", "holistic_score", "advantage_std", "log_prob"), means, strict=True):
                writer.add_scalar(f"train/{name}", value, step)
            writer.add_scalar("train/grad_norm", grad_norm.mean().item(), step)
            writer.add_scalar("train/lr", schedule.get_last_lr()[0], step)

            # 4. Evaluate the EMA weights; keep the best; save the state to resume from.
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                per_head = evaluate_heads(ema.module, val_pool, device, chunk_tokens, config.bf16)
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
                            "generator": state_after,  # the state after this step's draws (the thread runs ahead)
                            "step": step + 1,
                            "best": best,
                        },
                        tmp,
                    )
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
    if world > 1:  # DDP keeps the replicas identical; check it rather than trust it
        checksum = float(sum(p.double().sum() for p in network.parameters()))
        sums_: list = [None] * world
        dist.all_gather_object(sums_, checksum)
        summary["replicas_in_sync"] = max(sums_) - min(sums_) <= 1e-9 * max(1.0, abs(checksum))
    if main:
        writer.close()
        with atomic_path(out / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
    return summary

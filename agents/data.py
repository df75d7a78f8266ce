"""The trainer's data: episodes, the pools that serve their batches, the prefetch thread (as Stable-Baselines3 keeps
its rollout buffers in buffers.py).

The episodes of a split are an index of (sample, split point) pairs (:class:`Episodes`); a prefetch thread
(:class:`Prefetcher`) reads the keys and values of the next batches from the trace files (:class:`StreamingPool`;
``in_memory`` holds them all in RAM instead, :class:`MemoryPool`) and their future importance from the traces'
importance store (:mod:`kvp_gym.importance`: computed once, before the first step, by :func:`prepare_importance`,
and kept beside the user cache for later runs, the environment and evaluation). A step runs in chunks of heads of
at most ``chunk_tokens`` tokens each (:func:`head_chunks`; every head's loss is its own, so the update is the same
as in one piece): memory is set by the chunk, not by the number of samples or heads. :func:`batches` makes every
random draw of a run (episodes and the rankings' noise) on one CPU generator, in order, so the same seed draws the
same batches and rankings on every device.

The keys reach the network in its key frame (post- or pre-RoPE) through :func:`model_inputs`, which applies
:func:`kvp_gym_agents.kvp.agent_keys` with each head's layer's RoPE from the trace header (the pools'
``rotaries``): the rule the scorer applies too.

Imports kvp_gym.attention (the RoPE type), kvp_gym.importance, kvp_gym.traces, kvp_gym_agents.config (the settings,
no torch) and kvp_gym_agents.kvp (the key frame; not the network).
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from kvp_gym.attention import Rotary
from kvp_gym.importance import ImportanceStore
from kvp_gym.traces import SampleInfo, TraceFile
from kvp_gym_agents.config import TrainConfig
from kvp_gym_agents.kvp import agent_keys

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


def head_rotaries(files: Sequence[TraceFile], heads: Sequence[Head]) -> list[Rotary | None]:
    """Each head's layer's RoPE, from the trace header (the files share it: ``open_compatible``); None if unknown."""
    return [files[0].header.rotary_of(layer) for layer, _ in heads]


class StreamingPool:
    """Episodes read from the trace files batch by batch: memory holds one batch, whatever the number of samples.

    Keys and values come from the traces (only the batch's heads and samples), importance from the stores.
    ``rotaries``: each head's layer's RoPE (:func:`head_rotaries`), for :func:`model_inputs`.
    """

    def __init__(
        self, files: Sequence[TraceFile], stores: Sequence[ImportanceStore], episodes: Episodes, heads: Sequence[Head]
    ):
        self.files, self.stores, self.episodes, self.heads = files, stores, episodes, list(heads)
        self.head_dim = files[0].header.geometry.head_dim
        self.rotaries = head_rotaries(files, heads)

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
    with the set: keys and values float16 [H, N, S, D], importance float32 [H, E, S]). Same batches and
    ``rotaries`` as :class:`StreamingPool`."""

    def __init__(
        self, files: Sequence[TraceFile], stores: Sequence[ImportanceStore], episodes: Episodes, heads: Sequence[Head]
    ):
        self.episodes, self.heads = episodes, list(heads)
        self.rotaries = head_rotaries(files, heads)
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


Pool = StreamingPool | MemoryPool  # either serves the same batches


def head_chunks(heads: int, episodes: int, tokens: int, chunk_tokens: int) -> list[torch.Tensor]:
    """Head indices in chunks of at most ``chunk_tokens`` tokens (episodes x tokens per head; at least one head)."""
    size = max(1, chunk_tokens // max(1, episodes * tokens))
    return list(torch.arange(heads).split(size))


def model_inputs(
    batch: Sequence[torch.Tensor],
    device: torch.device,
    key_frame: str = "post",
    rotaries: Sequence[Rotary | None] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys, values, importance, splits) of a pool batch -> on ``device``: keys [H', B, n, D] in the network's
    ``key_frame`` (:func:`kvp_gym_agents.kvp.agent_keys`; ``rotaries``: the RoPE of each of the H' rows' layers,
    needed for ``pre``), values [H', B, n, D], positions [1, 1, n], ages [H', B, n], valid [H', B, n], importance
    [H', B, n]."""
    keys, values, importance, splits = (t.to(device) for t in batch)  # synchronous: the memory is reused
    n = keys.shape[2]
    positions = torch.arange(n, device=device)
    return (
        agent_keys(keys, positions.reshape(1, 1, n), key_frame, list(rotaries)),
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


def batches(
    pool: Pool,
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

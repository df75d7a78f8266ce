"""The trainer's processes under torchrun: process-group setup, the barrier, DDP wrapping, the replicas' check and
the head groups of ``--parallel heads`` with the merge of their checkpoints.

Under torchrun each process uses its own GPU (LOCAL_RANK, :func:`kvp_gym.device.resolve_device`) with NCCL, or
gloo on CPUs. ``parallel`` data (DDP: every process draws its own batches of every head, gradients averaged) or
heads (every process trains a disjoint group of heads on its own, no communication until process 0 merges the
groups' checkpoints). Without torchrun (WORLD_SIZE unset) every function here is a no-op for one process.

Imports kvp_gym.storage, kvp_gym_agents.checkpoint (the merge) and kvp_gym_agents.data (the head type).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from kvp_gym.storage import atomic_path
from kvp_gym_agents.checkpoint import merge_checkpoints
from kvp_gym_agents.data import Head


def start_processes(device: torch.device) -> tuple[int, int]:
    """Join torchrun's process group (NCCL on a GPU, gloo on CPUs) when there is one; return (rank, world size).
    One process without torchrun: (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world


def wait_for_all(world: int) -> None:
    """Barrier: every process of ``world`` reaches this point before any goes on (nothing for one process)."""
    if world > 1:
        dist.barrier()


def data_parallel(network: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """``network`` under DDP (process 0's weights broadcast, gradients averaged at each backward pass)."""
    return torch.nn.parallel.DistributedDataParallel(network, device_ids=[device] if device.type == "cuda" else None)


def replicas_in_sync(network: torch.nn.Module, world: int) -> bool:
    """Whether every process holds the same weights (sums of the parameters agree to 1e-9): DDP keeps the replicas
    identical; check it rather than trust it. Every process of ``world`` must call it."""
    checksum = float(sum(p.double().sum() for p in network.parameters()))
    checksums: list = [None] * world
    dist.all_gather_object(checksums, checksum)
    return max(checksums) - min(checksums) <= 1e-9 * max(1.0, abs(checksum))


def head_group(heads: list[Head], rank: int, world: int) -> list[Head]:
    """The contiguous group of ``heads`` that process ``rank`` of ``world`` trains under ``--parallel heads``
    (``np.array_split``: the first groups one head larger); ValueError when a group would be empty."""
    groups = [g.tolist() for g in np.array_split(np.arange(len(heads)), world)]
    if min(map(len, groups)) == 0:
        raise ValueError(f"parallel 'heads': {world} processes for {len(heads)} heads; use at most one per head")
    return [heads[i] for i in groups[rank]]


def merge_head_groups(summary: dict, out: Path, heads: int, rank: int, world: int) -> dict:
    """Gather every process's ``summary`` of its head group; process 0 merges the groups' checkpoints into
    OUT/agents.safetensors and writes OUT/summary.json; return the merged summary there, ``summary`` elsewhere.
    ``heads``: the number of heads of all groups."""
    summaries: list = [None] * world
    dist.all_gather_object(summaries, summary)
    if rank != 0:
        return summary
    merged = out / "agents.safetensors"
    metadata = merge_checkpoints([s["checkpoint"] for s in summaries], merged)
    summary = {
        **summary,
        "world_size": world,
        "parallel": "heads",
        "heads": heads,
        "seconds": max(s["seconds"] for s in summaries),
        "steps_per_second": _smallest(s["steps_per_second"] for s in summaries),
        "best_validation_score": metadata["validation"]["score"],
        "best_step": [s["best_step"] for s in summaries],
        "checkpoint": str(merged),
        "groups": summaries,
    }
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary


def _smallest(values: Iterable[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return min(found) if found else None

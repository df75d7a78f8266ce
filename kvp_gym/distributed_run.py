"""Long jobs (``collect``, ``evaluate``, ``evaluate-e2e``, ``leaderboard prepare``, ``submit``) as several processes
under torchrun.

``torchrun --nproc_per_node N -m kvp_gym.cli COMMAND ...`` starts N copies of a command and tells each its RANK and
WORLD_SIZE (and LOCAL_RANK: its GPU, :func:`kvp_gym.device.resolve_device`). :func:`join` reads them and joins the
process group once. Each process then does its share of the work (:meth:`Processes.share`), writing it into the
output folder all of them share, waits for the others (:meth:`Processes.wait_for_all`), and process 0 alone
assembles the result. Without torchrun, :func:`join` gives one process (rank 0 of 1) and nothing waits.

The group only synchronizes: a barrier and the gathering of small Python objects; no tensor crosses it. So it runs
on gloo (CPU sockets) on GPU machines too: NCCL would add nothing to a barrier and would need a GPU for every
process, which CPU-bound jobs (collect) may have more of than GPUs.

Imports nothing from kvp_gym.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

# A process that has finished its share waits at the barrier for the slowest one, which on a long job can take
# hours longer (whole trace files are dealt out in `leaderboard prepare`): torch's default of 30 minutes would end
# such a job. A process that fails does not leave the others waiting: torchrun stops them all.
WAIT_LIMIT = timedelta(days=7)


@dataclass(frozen=True)
class Processes:
    """This process's place in a job: process ``rank`` of ``world`` (0 of 1: a single process)."""

    rank: int = 0
    world: int = 1

    @property
    def writes_result(self) -> bool:
        """Whether this process assembles the job's result (process 0 does, once every process is done)."""
        return self.rank == 0

    def progress_label(self, what: str) -> str:
        """``what`` as the job's one progress bar names it: process 0's, labelled as its share under torchrun."""
        return what + (f" (process 0's share, 1/{self.world})" if self.world > 1 else "")

    def share(self, shard: tuple[int, int]) -> tuple[int, int]:
        """This process's part of shard ``(i, N)`` (``--shard i/N``; (0, 1): all the work), itself a shard:
        ``(i + N * rank, N * world)``. Of the work items k, shard i holds those with k % N == i, and this process
        those of them with (k // N) % world == rank: the processes split shard i exactly, each item once. So
        ``--shard`` on the jobs of a SLURM array composes with torchrun inside each job."""
        index, count = shard
        return index + count * self.rank, count * self.world

    def wait_for_all(self) -> None:
        """Barrier: return once every process of the job has come here (at once for a single process)."""
        if self.world > 1:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` (picklable), in rank order, on every process; it waits for all of them too."""
        if self.world == 1:
            return [value]
        found: list[Any] = [None] * self.world
        dist.all_gather_object(found, value)
        return found

    def leaves_result_to_process_0(self) -> str:
        """The one line a process other than 0 prints when its share is done."""
        return f"process {self.rank} of {self.world}: its share is done; process 0 writes the result"


ONE_PROCESS = Processes()  # a job of one process: the default of the functions that take ``processes``


def join() -> Processes:
    """This process's place in torchrun's job (RANK, WORLD_SIZE), joining the process group on the first call (gloo;
    left at exit). Without torchrun (WORLD_SIZE unset or 1): rank 0 of 1, and no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return ONE_PROCESS
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=WAIT_LIMIT)  # MASTER_ADDR, MASTER_PORT, RANK: torchrun's env
        atexit.register(_leave)
    return Processes(dist.get_rank(), world)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

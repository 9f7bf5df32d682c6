"""Data-parallel calibration over `torch.distributed`, for runs under `torchrun` or `accelerate launch`.

Each process calibrates its share of the data (chunk j of the length-sorted samples goes to rank
j % world; see `calibrate.py`), the per-target float64 sums and the token counts are all-reduced once
(once per decoder block with `--sequential`), and rank 0 alone selects the masks and writes the output;
the other ranks write nothing. The exchanged sums are exact, so the masks are those of a single process.

The exchange always uses a gloo group on the CPU: the statistics are small (one vector per target) and
gloo works whatever the model's devices, including several processes sharing one GPU, which NCCL
refuses. Launch with e.g. `torchrun --nproc-per-node 2 -m antidote realign MODEL --data ... --output ...`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class DataParallel:
    """This process's place in the group. `group`: the gloo process group the sums travel in."""

    rank: int
    world: int
    local_rank: int
    group: Any = None

    @property
    def leader(self) -> bool:
        """Rank 0 selects the masks and writes; the others only calibrate."""
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum a CPU tensor over all processes, in place."""
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)

    def device(self, device: str) -> str:
        """The device of this process: "auto" -> its own GPU (LOCAL_RANK modulo the GPUs present, so that
        several processes may share one GPU) or the CPU; any other value is kept."""
        if device != "auto":
            return device
        if torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return "cpu"


def world_size_from_env() -> int:
    """WORLD_SIZE as set by torchrun / accelerate launch; 1 when not launched by them."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@contextlib.contextmanager
def data_parallel() -> Iterator[DataParallel | None]:
    """The process group when launched with more than one process (None otherwise).

    Initialises torch.distributed from the launcher's environment if nobody has yet (and tears it down
    on exit); if it is already initialised with another backend (NCCL), a gloo group is added for the
    statistics.
    """
    if world_size_from_env() <= 1:
        yield None
        return
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="gloo")
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    parallel = DataParallel(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
        group=group,
    )
    log.info("data-parallel calibration: rank %d of %d", parallel.rank, parallel.world)
    try:
        yield parallel
    finally:
        if created:
            dist.destroy_process_group()

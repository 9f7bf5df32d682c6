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
import dataclasses
import datetime
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from antidote.errors import AntidoteError

log = logging.getLogger(__name__)

LAUNCH_VARIABLES = (
    "RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)  # what torchrun / accelerate launch set besides WORLD_SIZE
TIMEOUT_ENV = "ANTIDOTE_DIST_TIMEOUT"  # seconds to wait for the other processes (default DEFAULT_TIMEOUT)
DEFAULT_TIMEOUT = 600
FINAL_WAIT = datetime.timedelta(hours=24)  # how long the others wait at the end for rank 0 to write


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

    def check_same(self, what: str, digest: str) -> None:
        """Every process must hold the same `what` (its digest, all-gathered): a launch whose ranks read
        different data or models would otherwise add up statistics of different things into one mask."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, digest, group=self.group)
        differ = [rank for rank, value in enumerate(gathered) if value != gathered[0]]
        if differ:
            raise AntidoteError(
                f"rank {differ[0]} of the launch has other {what} than rank 0; every process must get the "
                "same command line, data and model: launch them with one torchrun command"
            )

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


def _timeout() -> int:
    try:
        return max(1, int(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT)))
    except ValueError:
        return DEFAULT_TIMEOUT


@contextlib.contextmanager
def data_parallel() -> Iterator[DataParallel | None]:
    """The process group when launched with more than one process (None otherwise).

    Initialises torch.distributed from the launcher's environment if nobody has yet (and tears it down
    on exit); if it is already initialised with another backend (NCCL), a gloo group is added for the
    statistics. A WORLD_SIZE without the other launch variables (a leftover in the shell) runs as one
    process, with a warning; a launch whose other processes do not join within $ANTIDOTE_DIST_TIMEOUT
    seconds (default 600) fails with a message instead of waiting forever.
    """
    world = world_size_from_env()
    if world <= 1:
        yield None
        return
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        missing = [name for name in LAUNCH_VARIABLES if not os.environ.get(name)]
        if missing:
            log.warning(
                "WORLD_SIZE=%d is set but %s not (no torchrun or accelerate launch): running as one process",
                world,
                ", ".join(missing),
            )
            yield None
            return
        timeout = _timeout()
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        rank = os.environ["RANK"]
        log.info("rank %s: waiting up to %d s for the %d processes at %s", rank, timeout, world, where)
        try:
            dist.init_process_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
        except Exception as err:  # the store's and gloo's errors have no common base class
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise AntidoteError(
                f"rank {rank} of WORLD_SIZE={world}: the other processes did not join at {where} "
                f"within {timeout} s ({first}); launch every rank with torchrun --nproc-per-node {world}, or "
                f"unset WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT to run one process (${TIMEOUT_ENV} "
                "sets the wait)"
            ) from err
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
        if created:
            _leave_together(parallel)
    finally:
        if created:
            dist.destroy_process_group()


def _leave_together(parallel: DataParallel) -> None:
    """Wait until every process is done (rank 0 writes the output after the others have finished
    calibrating) so that all tear the gloo group down together: a process that tore its group down and
    exited while rank 0 was still connected sometimes aborted at exit ("terminate called without an
    active exception", exit -6, about 1 launch in 15 here). Only on success: a process that failed
    skips this and exits, and the launcher stops the others."""
    import torch.distributed as dist

    if not parallel.leader:
        log.info("rank %d: calibration done, waiting for rank 0 to write the output", parallel.rank)
    # monitored_barrier takes its own timeout (a plain barrier would use the join timeout, and writing a
    # large model may take longer than that).
    dist.monitored_barrier(group=parallel.group, timeout=FINAL_WAIT, wait_all_ranks=True)


# Not compared between processes: where things are (nodes may keep them at other paths; their content is
# compared: the token ids and the weights) and the device of each process.
_PLACES = ("model", "data", "benign_data", "reference", "adapter", "output", "data_dir", "device")


def run_digest(config: Any, *sequence_lists: Sequence[Sequence[int]] | None) -> str:
    """A digest of a realign config's settings (not its paths, see _PLACES) and of the token ids it
    calibrates on."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in _PLACES}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for sequences in sequence_lists:
        for ids in sequences or []:
            digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes() + b"|")
        digest.update(b"#")
    return digest.hexdigest()


def weights_digest(targets: Mapping[str, nn.Linear]) -> str:
    """A digest of the targets' names, shapes, dtypes and weight bytes (one tensor on the CPU at a time)."""
    digest = hashlib.sha256()
    for name in sorted(targets):
        weight = targets[name].weight.detach()
        digest.update(f"{name}:{tuple(weight.shape)}:{weight.dtype}".encode())
        digest.update(weight.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

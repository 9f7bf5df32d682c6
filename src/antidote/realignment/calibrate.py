"""Calibration: one ordinary forward pass over the data with pre-hooks that accumulate input statistics.

For every target Linear layer we accumulate, per input feature j, the sum over all real (non-padding)
tokens of x_j^2. Batches are length-sorted and right-padded; with right padding and a causal model, real
tokens never see padding.

Batch size and masks, the exact rule: each sample's sum is taken in float64 over its own tokens alone
(squares of float32/bf16/fp16 values are exact in float64), and the per-sample sums are added to the
running total one sample at a time, longest sample first, whatever the batch size. So the statistics,
and hence the masks, are bit for bit the same at every batch size whenever the forward pass computes
each real token's activations bit for bit the same at every batch size. We measured that on the CPU
(float32, and bfloat16 autocast) for the tiny test model; GPU libraries may pick matrix kernels by
shape, and then the activations, and at near-ties the masks, can differ in the last bits.
(Before, the per-batch sum was one float32 product, which bfloat16 autocast even ran in bfloat16: masks
flipped between batch sizes 3 and 6.)

Chunks, for data parallelism: the samples, in that fixed order, are cut into `num_chunks(n)` (at most
16) contiguous chunks. Each chunk's sum starts from zero and adds its samples one at a time; the total
adds the chunk sums in chunk order. With several processes (`Parallel`), chunk j is calibrated by
process j % world, and the chunk sums are exchanged with one all-reduce of a (chunks, features) buffer
in which every process fills only its own rows: a sum in which all terms but one are zero is exact, so
the total is bit for bit the single-process total, at any number of processes, under the same
condition as for the batch size.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from antidote.realignment.scores import sample_sq_sums

log = logging.getLogger(__name__)
CPUINFO = Path("/proc/cpuinfo")  # where fast_bfloat16 reads the CPU's flags
MAX_CHUNKS = 16  # the statistic's fixed summation tree (module docstring); bounds useful data parallelism


@dataclass
class Statistics:
    """Per-target statistics. `sq_sums[name]`: (in_features,) float32, the mean over samples of
    the per-sample sum over tokens of x^2 (as the authors' code); samples and tokens count what was seen."""

    sq_sums: dict[str, torch.Tensor]
    samples: int
    tokens: int
    compute_dtype: str = "float32"


@contextlib.contextmanager
def hooks_removed_after(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    """Always remove the hooks, even when the forward pass fails."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class Parallel(Protocol):
    """What calibration needs from a group of processes (see `antidote.realignment.distributed`)."""

    rank: int
    world: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` (on the CPU) over all processes, in place."""


def num_chunks(n: int) -> int:
    """How many chunks `n` samples are cut into: min(n, MAX_CHUNKS), whatever the number of processes."""
    return min(n, MAX_CHUNKS)


def chunk_of_positions(n: int) -> list[int]:
    """The chunk of each position 0..n-1 of the sorted sample order: contiguous, non-empty, sizes
    differing by at most one. E.g. n=5 with 2 chunks -> [0, 0, 0, 1, 1]."""
    chunks = num_chunks(n)
    return [p * chunks // n for p in range(n)]


@dataclass(frozen=True)
class Batch:
    """One calibration batch: sample indices (longest first) and each sample's chunk."""

    samples: list[int]
    chunks: list[int]


def plan_batches(
    sequences: Sequence[Sequence[int]], batch_size: int, *, rank: int = 0, world: int = 1
) -> list[Batch]:
    """The batches process `rank` of `world` runs: its chunks' samples in the global length-sorted
    order, cut into batches of `batch_size`. With world=1, the batches of `make_batches`."""
    order = length_order(sequences)
    chunk = chunk_of_positions(len(order))
    mine = [(i, c) for i, c in zip(order, chunk, strict=True) if c % world == rank]
    return [
        Batch([i for i, _ in mine[k : k + batch_size]], [c for _, c in mine[k : k + batch_size]])
        for k in range(0, len(mine), batch_size)
    ]


def padded_batch(
    sequences: Sequence[Sequence[int]], batch: Batch, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (batch, width) int64, right-padded with `pad_id`."""
    width = max(len(sequences[i]) for i in batch.samples)
    ids = torch.full((len(batch.samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch.samples), width), dtype=torch.long)
    for row, i in enumerate(batch.samples):
        ids[row, : len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
        mask[row, : len(sequences[i])] = 1
    return ids, mask


def fold_chunk_sums(chunk_sums: Sequence[torch.Tensor], total: torch.Tensor) -> None:
    """total += chunk_sums[0]; total += chunk_sums[1]; ... in that order (the statistic's fixed tree)."""
    for chunk_sum in chunk_sums:
        total += chunk_sum.to(total.device)


class StatisticsCollector:
    """Pre-hooks on the targets that sum x^2 per input feature in float64 (module docstring's order).

    Usage: `with collector.hooked(): for batch: with collector.batch(sequences, batch): forward(...)`,
    then `collector.finish()`. One collector serves one pass over the data; the sequential engine uses
    one per decoder block. With `parallel`, this process sees only its chunks' batches and `finish`
    exchanges the chunk sums.
    """

    def __init__(
        self,
        targets: Mapping[str, nn.Linear],
        num_samples: int,
        *,
        parallel: Parallel | None = None,
        starts: Sequence[int] | None = None,
    ) -> None:
        self.targets = dict(targets)
        self.starts = starts  # per sequence, the first token that counts (None: every token)
        self.batch_starts: list[int] | None = None
        self.num_samples = num_samples
        self.parallel = parallel
        self.tokens = 0
        self.totals = {
            name: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device)
            for name, m in self.targets.items()
        }
        self._open: dict[int, dict[str, torch.Tensor]] = {}  # chunk -> running chunk sums
        self._done: dict[int, dict[str, torch.Tensor]] = {}  # finished chunks kept for the exchange
        self.lengths: list[int] = []  # real tokens per sample of the batch in flight (right-padded)
        self._chunks: list[int] = []
        # q/k/v (and gate/up) read the same tensor: compute its statistic once.
        self._last_input: torch.Tensor | None = None
        self._last_stat: torch.Tensor | None = None
        self._warned_shape = False

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        """The targets' pre-hooks, removed on exit even when the forward pass fails."""
        handles = [m.register_forward_pre_hook(self.hook(name)) for name, m in self.targets.items()]
        with hooks_removed_after(handles):
            yield

    @contextlib.contextmanager
    def batch(self, sequences: Sequence[Sequence[int]], batch: Batch) -> Iterator[None]:
        """Around one forward pass of `batch`: chunks finished before it are closed first."""
        for chunk in [c for c in self._open if c < batch.chunks[0]]:
            self._close(chunk)
        self.lengths = [len(sequences[i]) for i in batch.samples]
        if self.starts is not None:
            self.batch_starts = [
                min(self.starts[i], n) for i, n in zip(batch.samples, self.lengths, strict=True)
            ]
        self._chunks = list(batch.chunks)
        try:
            yield
        finally:
            self._last_input = self._last_stat = None
        self.tokens += sum(self.lengths) - sum(self.batch_starts or [])

    def hook(self, name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def pre_hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            if x is self._last_input and self._last_stat is not None:
                stat = self._last_stat
            else:
                stat = self._sample_sums(name, x)
                self._last_input, self._last_stat = x, stat
            device = self.totals[name].device
            for row, chunk in zip(stat.to(device), self._chunks, strict=True):
                # one sample at a time: the same additions at any batch size
                self._chunk_sums(chunk)[name] += row

        return pre_hook

    def _chunk_sums(self, chunk: int) -> dict[str, torch.Tensor]:
        if chunk not in self._open:
            self._open[chunk] = {name: torch.zeros_like(t) for name, t in self.totals.items()}
        return self._open[chunk]

    def _close(self, chunk: int) -> None:
        sums = self._open.pop(chunk)
        if self.parallel is None:
            for name, total in self.totals.items():
                fold_chunk_sums([sums[name]], total)
        else:
            self._done[chunk] = {name: t.cpu() for name, t in sums.items()}

    def _sample_sums(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """(samples, in_features) float64; autocast off, so that nothing is summed in low precision."""
        with torch.autocast(x.device.type, enabled=False):
            width = max(self.lengths)
            if x.shape[:-1] == (len(self.lengths), width):
                return sample_sq_sums(x, self.lengths, self.batch_starts)
            if not self._warned_shape:
                log.warning("%s sees inputs of shape %s, not per token; padding counted", name, x.shape)
                self._warned_shape = True
            flat = x.reshape(1, -1, x.shape[-1])
            return sample_sq_sums(flat, [flat.shape[1]])

    def finish(self, compute_dtype: str = "float32") -> Statistics:
        """Close the last chunks, exchange them between processes if parallel, and return the means."""
        for chunk in sorted(self._open):
            self._close(chunk)
        if self.parallel is not None:
            self._exchange(self.parallel)
        n = self.num_samples
        return Statistics(
            sq_sums={name: (s / n).float().cpu() for name, s in self.totals.items()},
            samples=n,
            tokens=self.tokens,
            compute_dtype=compute_dtype,
        )

    def _exchange(self, parallel: Parallel) -> None:
        """One all-reduce of a (chunks, features) float64 buffer holding this process's chunk sums in
        its own rows and zeros elsewhere, then the chunk sums are folded in chunk order (exact)."""
        names = list(self.totals)
        sizes = [self.totals[n].numel() for n in names]
        buffer = torch.zeros(num_chunks(self.num_samples), sum(sizes) + 1, dtype=torch.float64)
        for chunk, sums in self._done.items():
            buffer[chunk, :-1] = torch.cat([sums[n] for n in names])
        buffer[0, -1] = self.tokens  # token counts are integers far below 2^53: exact in float64
        parallel.all_reduce_sum(buffer)
        self.tokens = int(buffer[:, -1].sum().item())
        total = torch.zeros(sum(sizes), dtype=torch.float64)
        fold_chunk_sums(list(buffer[:, :-1]), total)
        for name, part in zip(names, total.split(sizes), strict=True):
            self.totals[name] = part.to(self.totals[name].device)
        self._done.clear()


def _forward_module(model: nn.Module, targets: dict[str, nn.Linear]) -> nn.Module:
    """The smallest module to run: the decoder body when every target lies inside it.

    Calibration never needs the output layer (on small-vocabulary-heavy models like SmolLM2 the
    49k-word head is ~40% of the forward cost), so we call the decoder directly when we can.
    """
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if isinstance(decoder, nn.Module) and decoder is not base:
        inside = {id(m) for m in decoder.modules()}
        if all(id(m) in inside for m in targets.values()):
            return decoder
    return model


def make_batches(sequences: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of `sequences` grouped into batches of similar length (longest first)."""
    order = length_order(sequences)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def length_order(sequences: Sequence[Sequence[int]]) -> list[int]:
    """Indices of `sequences`, longest first, ties by index: the one order statistics are summed in."""
    return sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i))


def fast_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices natively (CUDA with bf16, or a CPU with AMX/AVX512-BF16)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            flags = CPUINFO.read_text()
        except OSError:
            return False
        return "amx_bf16" in flags or "avx512_bf16" in flags
    return False


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the calibration forward, None for none (the model's own dtype).

    "auto" -> bfloat16 where `fast_bfloat16(device)`, else None; "float32" -> None; "bfloat16" and
    "float16" -> that dtype.
    """
    if name == "auto":
        return torch.bfloat16 if fast_bfloat16(device) else None
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def default_batch_size(device: torch.device) -> int:
    """4 on CPU, where larger batches were slower here (benchmarks/realign_speed.py); 16 on GPUs."""
    return 4 if device.type == "cpu" else 16


@torch.inference_mode()
def collect_statistics(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    sequences: Sequence[Sequence[int]],
    *,
    batch_size: int | None = None,
    pad_id: int = 0,
    compute_dtype: torch.dtype | None = None,
    desc: str = "calibrating",
    parallel: Parallel | None = None,
    starts: Sequence[int] | None = None,
) -> Statistics:
    """Run the model over `sequences` (token ids) and return per-target input statistics.

    compute_dtype: run the forward under autocast to this dtype (e.g. bf16: about 2x faster on CPUs with
    AMX); the statistics are still summed in float64. None runs in the model's own dtype.
    parallel: this process calibrates its share of the chunks and the sums are exchanged (every
    process gets the same statistics).
    starts: per sequence, the first token whose input counts (e.g. its first response token); None
    counts every token.
    The result does not depend on `batch_size` nor on the number of processes (module docstring).
    """
    if not sequences:
        raise ValueError("no calibration sequences")
    forward = _forward_module(model, targets)
    device = model.get_input_embeddings().weight.device  # type: ignore[operator]
    batch_size = batch_size or default_batch_size(device)
    rank, world = (parallel.rank, parallel.world) if parallel is not None else (0, 1)
    collector = StatisticsCollector(targets, len(sequences), parallel=parallel, starts=starts)
    was_training = model.training
    model.eval()
    autocast = (
        torch.autocast(device.type, dtype=compute_dtype)
        if compute_dtype is not None and compute_dtype != next(model.parameters()).dtype
        else contextlib.nullcontext()
    )
    batches = plan_batches(sequences, batch_size, rank=rank, world=world)
    with collector.hooked(), autocast:
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
            ids, mask = padded_batch(sequences, batch, pad_id)
            with collector.batch(sequences, batch):
                forward(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    model.train(was_training)
    used = compute_dtype if isinstance(autocast, torch.autocast) else next(model.parameters()).dtype
    return collector.finish(str(used).removeprefix("torch."))

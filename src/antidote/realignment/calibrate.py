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
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from antidote.realignment.scores import sample_sq_sums

log = logging.getLogger(__name__)
CPUINFO = Path("/proc/cpuinfo")  # where fast_bfloat16 reads the CPU's flags


@dataclass
class Statistics:
    """Per-target statistics. `sq_sums[name]`: (in_features,) float32, the mean over samples of
    the per-sample sum over tokens of x^2 (SPEC 2); samples and tokens count what was seen."""

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


class _Accumulator:
    """Owns the running float64 sums and the real-token counts of the batch in flight."""

    def __init__(self, targets: dict[str, nn.Linear]):
        self.sums = {
            name: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device)
            for name, m in targets.items()
        }
        self.lengths: list[int] = []  # real tokens per sample of the batch in flight (right-padded)
        # q/k/v (and gate/up) read the same tensor: compute its statistic once.
        self._last_input: torch.Tensor | None = None
        self._last_stat: torch.Tensor | None = None
        self._warned_shape = False

    def hook(self, name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def pre_hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            if x is self._last_input and self._last_stat is not None:
                stat = self._last_stat
            else:
                stat = self._sample_sums(name, x)
                self._last_input, self._last_stat = x, stat
            acc = self.sums[name]
            for row in stat.to(acc.device):  # one sample at a time: the same additions at any batch size
                acc += row

        return pre_hook

    def _sample_sums(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """(samples, in_features) float64; autocast off, so that nothing is summed in low precision."""
        with torch.autocast(x.device.type, enabled=False):
            width = max(self.lengths)
            if x.shape[:-1] == (len(self.lengths), width):
                return sample_sq_sums(x, self.lengths)
            if not self._warned_shape:
                log.warning("%s sees inputs of shape %s, not per token; padding counted", name, x.shape)
                self._warned_shape = True
            flat = x.reshape(1, -1, x.shape[-1])
            return sample_sq_sums(flat, [flat.shape[1]])

    def end_batch(self) -> None:
        self._last_input = self._last_stat = None


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
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


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
) -> Statistics:
    """Run the model over `sequences` (token ids) and return per-target input statistics.

    compute_dtype: run the forward under autocast to this dtype (e.g. bf16: about 2x faster on CPUs with
    AMX); the statistics are still summed in float64. None runs in the model's own dtype.
    The result does not depend on `batch_size` (see the module docstring for the exact rule).
    """
    if not sequences:
        raise ValueError("no calibration sequences")
    forward = _forward_module(model, targets)
    device = model.get_input_embeddings().weight.device  # type: ignore[operator]
    batch_size = batch_size or default_batch_size(device)
    acc = _Accumulator(targets)
    handles = [m.register_forward_pre_hook(acc.hook(name)) for name, m in targets.items()]
    was_training = model.training
    model.eval()
    tokens = 0
    autocast = (
        torch.autocast(device.type, dtype=compute_dtype)
        if compute_dtype is not None and compute_dtype != next(model.parameters()).dtype
        else contextlib.nullcontext()
    )
    with hooks_removed_after(handles), autocast:
        for batch in tqdm(make_batches(sequences, batch_size), desc=desc, unit="batch", leave=False):
            width = max(len(sequences[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
                mask[row, : len(sequences[i])] = 1
            ids, mask = ids.to(device), mask.to(device)
            acc.lengths = [len(sequences[i]) for i in batch]
            forward(input_ids=ids, attention_mask=mask, use_cache=False)
            acc.end_batch()
            tokens += int(mask.sum().item())
    model.train(was_training)
    n = len(sequences)
    sq_sums = {name: (s / n).float().cpu() for name, s in acc.sums.items()}
    used = compute_dtype if isinstance(autocast, torch.autocast) else next(model.parameters()).dtype
    return Statistics(
        sq_sums=sq_sums, samples=n, tokens=tokens, compute_dtype=str(used).removeprefix("torch.")
    )

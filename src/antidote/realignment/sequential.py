"""Layer-by-layer (streaming) realignment: `antidote realign --sequential`.

The model is built as an empty skeleton (accelerate's `init_empty_weights`: parameters on the meta
device, no memory) and its decoder blocks are found generically: the largest `nn.ModuleList` under
`get_decoder()`. Only the decoder's own small parts (embeddings, final norm, rotary tables) are loaded.

1. Record: for each calibration batch, the decoder runs once with every block's `forward` replaced by
   a recorder that keeps the arguments the model's own code built for that block (attention mask --
   sliding-window and full-attention layers get different ones --, rotary position embeddings,
   position ids ...) and passes the hidden states through. The first block's input (the embeddings)
   and every block's arguments are kept on the CPU.
2. For each block: read its weights from the safetensors files, hook its targets (the in-memory path's
   `StatisticsCollector`), run every batch's stored hidden states through it with its recorded
   arguments (its outputs, in the model's dtype, replace them on the CPU), select and apply the masks
   of every ratio, write its weights to each output, and free it.
3. Copy the remaining tensors (embeddings, output layer, final norm), config, generation config,
   tokenizer, mask file, report and model card: the files the in-memory path writes.

Exactness: masks are computed on the unpruned model, so one pass is exact. The batches are the
in-memory path's, every block is called with the very arguments the model's forward passes it, and the
statistics are summed in the same order, so block outputs, statistics and masks are bit for bit those
of the in-memory run (tested on tiny Llama, Qwen2 with sliding-window layers, Mistral, Gemma and Gemma2
models, and on the embedded SmolLM2).

Limits (refused with a one-line error): an adapter (merge it first), `--granularity global` (it needs
every score before any block is written), targets outside the decoder blocks, a checkpoint that is
not safetensors or names its tensors differently from the model's modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from antidote.data.templates import write_prompt_file
from antidote.errors import AntidoteError
from antidote.memory import peak_memory, trim_heap
from antidote.models import LoadedModel
from antidote.models.loading import DTYPES, resolve_model_folder
from antidote.outputs import atomic_output_dir
from antidote.realignment.calibrate import (
    Batch,
    Statistics,
    StatisticsCollector,
    default_batch_size,
    padded_batch,
    plan_batches,
    resolve_compute_dtype,
)
from antidote.realignment.config import RealignConfig
from antidote.realignment.distributed import DataParallel, data_parallel, run_digest, weights_digest
from antidote.realignment.maskfile import MaskFileWriter, PackedMask
from antidote.realignment.save import (
    CARD_FILE,
    MASK_FILE,
    build_report,
    model_card,
    ratio_folder,
    write_report,
    write_sweep_report,
)
from antidote.realignment.shards import Checkpoint, CheckpointWriter
from antidote.realignment.steps import (
    Records,
    SweepResult,
    Timer,
    apply_masks,
    check_finite_statistics,
    check_finite_weights,
    checked_output,
    iter_masks,
    load_sequences,
    restore_masks,
)
from antidote.realignment.targets import find_targets, saved_name

log = logging.getLogger(__name__)
STORE = torch.device("cpu")  # where hidden states and block arguments wait between blocks


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ---- the skeleton and its blocks ------------------------------------------------------------------------


def find_blocks(model: nn.Module) -> tuple[str, nn.Module, str, nn.ModuleList]:
    """(decoder name, decoder, blocks name, blocks): the blocks are the largest `nn.ModuleList` under
    `model.get_decoder()` (the first one of that size), names are relative to `model`."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if not isinstance(decoder, nn.Module):
        raise AntidoteError(
            f"--sequential needs a decoder-only model with get_decoder(); {type(model).__name__} has "
            "none: drop --sequential"
        )
    names = {id(m): name for name, m in model.named_modules()}
    lists = [(n, m) for n, m in decoder.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise AntidoteError(
            f"--sequential found no list of decoder blocks in {type(decoder).__name__}; drop --sequential"
        )
    blocks_name, blocks = max(lists, key=lambda item: len(item[1]))
    decoder_name = names[id(decoder)]
    return decoder_name, decoder, _join(decoder_name, blocks_name), blocks


@dataclass
class Skeleton:
    """An empty model and where its weights are. `dtype`: the model's dtype (as `--dtype` resolves)."""

    model: Any  # a transformers PreTrainedModel on the meta device
    tokenizer: Any
    folder: str
    checkpoint: Checkpoint
    dtype: torch.dtype
    decoder_name: str
    decoder: nn.Module
    blocks_name: str
    blocks: nn.ModuleList

    def block_name(self, index: int) -> str:
        return f"{self.blocks_name}.{index}"


def _dtype(value: Any) -> torch.dtype | None:
    """A torch dtype from `--dtype` or a config's `dtype` ("bfloat16", torch.bfloat16); None for auto."""
    if isinstance(value, torch.dtype):
        return value
    found = DTYPES.get(value) if isinstance(value, str) else None
    return found if isinstance(found, torch.dtype) else None


def local_folder(spec: str) -> str:
    """A local folder for what `--model` names (a hub id is looked up in, or fetched to, the HF cache)."""
    folder = resolve_model_folder(spec)
    if Path(folder).is_dir():
        return folder
    from huggingface_hub import snapshot_download

    try:
        return str(snapshot_download(folder, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # the hub's errors have no common base class
        raise AntidoteError(f"cannot find model {spec} locally or on the hub ({type(err).__name__})") from err


def build_skeleton(config: RealignConfig) -> Skeleton:
    """The model with empty weights, its tokenizer and its safetensors index; nothing is loaded yet."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder = local_folder(config.model)
    checkpoint = Checkpoint(folder)
    remote = config.trust_remote_code
    try:
        hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=remote)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AntidoteError(f"cannot load model {config.model}: {first}") from err
    dtype = _dtype(config.dtype) or _dtype(getattr(hf_config, "dtype", None)) or torch.float32
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=remote)
    model.eval()
    with contextlib.suppress(OSError, ValueError):
        model.generation_config = GenerationConfig.from_pretrained(folder)
    decoder_name, decoder, blocks_name, blocks = find_blocks(model)
    skeleton = Skeleton(
        model, tokenizer, folder, checkpoint, dtype, decoder_name, decoder, blocks_name, blocks
    )
    for name, param in decoder.named_parameters():
        key = _join(decoder_name, name)
        info = checkpoint.tensors.get(key)
        if info is None or info.shape != tuple(param.shape):
            raise AntidoteError(
                f"the safetensors files of {config.model} have no tensor {key} of shape "
                f"{tuple(param.shape)} (they name or shape weights differently from the model); "
                "drop --sequential"
            )
    return skeleton


def _materialise(
    module: nn.Module, prefix: str, names: Sequence[str], skeleton: Skeleton, device: str
) -> None:
    """Load `module`'s parameters `names` (relative to it) from the checkpoint onto `device`."""
    from accelerate.utils import set_module_tensor_to_device

    params = dict(module.named_parameters())
    keys = {_join(prefix, n): n for n in names}
    for key, tensor in skeleton.checkpoint.read(keys).items():
        name = keys[key]
        set_module_tensor_to_device(module, name, device, value=tensor, dtype=params[name].dtype)


def load_decoder_rest(skeleton: Skeleton, device: str) -> None:
    """Everything of the decoder outside its blocks (embeddings, final norm, rotary tables) on `device`."""
    from accelerate.utils import set_module_tensor_to_device

    inside = f"{skeleton.blocks_name}."
    decoder = skeleton.decoder

    def outside(name: str) -> bool:
        return not _join(skeleton.decoder_name, name).startswith(inside)

    _materialise(
        decoder,
        skeleton.decoder_name,
        [n for n, _ in decoder.named_parameters() if outside(n)],
        skeleton,
        device,
    )
    for name, _ in list(decoder.named_buffers()):
        if outside(name):
            set_module_tensor_to_device(decoder, name, device)


def load_block(skeleton: Skeleton, index: int, device: str) -> nn.Module:
    """Read block `index`'s weights from the safetensors files onto `device`."""
    from accelerate.utils import set_module_tensor_to_device

    block = skeleton.blocks[index]
    _materialise(
        block, skeleton.block_name(index), [n for n, _ in block.named_parameters()], skeleton, device
    )
    for name, _ in list(block.named_buffers()):
        set_module_tensor_to_device(block, name, device)
    return block


def free_block(block: nn.Module) -> None:
    """Back to the meta device: the block's weights are released, and the C allocator gives the freed
    memory back to the system (glibc keeps freed blocks in its heap otherwise: measured, bf16 autocast
    made the resident size grow by ~0.6 of each block's size, block after block)."""
    from accelerate.utils import set_module_tensor_to_device

    for name, _ in list(block.named_parameters()):
        set_module_tensor_to_device(block, name, "meta")
    trim_heap()


# ---- recording what the decoder passes each block --------------------------------------------------------


@dataclass
class BlockCall:
    """How the decoder called one block on one batch, besides the hidden states: positional `args`
    after them and keyword `kwargs` (tensors kept on STORE); `keyword`: hidden states passed by name."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    keyword: bool = False


class _StopForward(Exception):
    """Raised by the last block's recorder: nothing after the blocks is needed."""


def _move(value: Any, device: torch.device | str, memo: dict[int, Any]) -> Any:
    """`value` with every tensor in it (in tuples, lists, dicts) on `device`; shared tensors stay shared."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = value.to(device)
        return memo[id(value)]
    if isinstance(value, tuple):
        return tuple(_move(v, device, memo) for v in value)
    if isinstance(value, list):
        return [_move(v, device, memo) for v in value]
    if isinstance(value, dict):
        return {k: _move(v, device, memo) for k, v in value.items()}
    return value


def record_block_calls(
    decoder: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, list[BlockCall]]:
    """Run `decoder` on one batch with each block's forward replaced by a recorder.

    Returns the first block's hidden states (batch, seq, hidden) and each block's call, in block order.
    The blocks themselves never run, so they may sit on the meta device.
    """
    calls: list[tuple[int, BlockCall, torch.Tensor]] = []

    def recorder(index: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            keyword = not args
            hidden = kwargs.pop("hidden_states") if keyword else args[0]
            calls.append((index, BlockCall(tuple(args[1:]), kwargs, keyword), hidden))
            if index == len(blocks) - 1:
                raise _StopForward
            return hidden

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)  # an instance attribute: nn.Module.__call__ runs it
    try:
        decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for block in blocks:
            del block.forward
    if [i for i, _, _ in calls] != list(range(len(blocks))):
        raise AntidoteError(
            f"--sequential needs a decoder that calls each of its {len(blocks)} blocks once, in order; "
            f"{type(decoder).__name__} does not: drop --sequential"
        )
    return calls[0][2], [call for _, call, _ in calls]


def call_block(
    block: nn.Module, hidden: torch.Tensor, call: BlockCall, device: torch.device | str
) -> torch.Tensor:
    """One block on one batch with its recorded arguments; returns its hidden states output."""
    memo: dict[int, Any] = {}
    args, kwargs = _move(call.args, device, memo), _move(call.kwargs, device, memo)
    out = block(hidden_states=hidden, **kwargs) if call.keyword else block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@dataclass
class Stream:
    """One data set on its way through the blocks: per batch, the hidden states entering the next block
    and the recorded calls of the blocks still to run (both on STORE)."""

    sequences: Sequence[Sequence[int]]
    batches: list[Batch]
    hidden: list[torch.Tensor] = field(default_factory=list)
    calls: list[list[BlockCall | None]] = field(default_factory=list)

    def record(
        self, skeleton: Skeleton, pad_id: int, device: torch.device, autocast: Callable[[], Any]
    ) -> None:
        """Embed every batch and record every block's arguments (the model's own forward builds them)."""
        for batch in self.batches:
            ids, mask = padded_batch(self.sequences, batch, pad_id)
            with autocast():
                hidden, calls = record_block_calls(
                    skeleton.decoder, skeleton.blocks, ids.to(device), mask.to(device)
                )
            memo: dict[int, Any] = {}
            self.hidden.append(_move(hidden, STORE, memo))
            self.calls.append([_move(c, STORE, memo) for c in calls])

    def run_block(
        self,
        index: int,
        block: nn.Module,
        collector: StatisticsCollector,
        device: torch.device,
        autocast: Callable[[], Any],
    ) -> None:
        """Every batch through block `index`; its outputs become the next block's inputs. One autocast
        context for all batches: the block's weights are cast once (and the cast copies dropped after)."""
        with autocast():
            for b, batch in enumerate(self.batches):
                call = self.calls[b][index]
                assert call is not None, "each block runs once"
                with collector.batch(self.sequences, batch):
                    out = call_block(block, self.hidden[b].to(device), call, device)
                self.hidden[b] = out.to(STORE)
                self.calls[b][index] = None


def block_outputs(
    skeleton: Skeleton,
    sequences: Sequence[Sequence[int]],
    *,
    batch_size: int,
    pad_id: int,
    device: str = "cpu",
) -> Iterator[list[torch.Tensor]]:
    """Yield, block after block, every batch's output hidden states (batches as `plan_batches`): the
    sequential forward alone, without statistics (what the tests compare with the in-memory model)."""
    load_decoder_rest(skeleton, device)
    stream = Stream(sequences, plan_batches(sequences, batch_size))
    with torch.inference_mode():
        stream.record(skeleton, pad_id, torch.device(device), contextlib.nullcontext)
        for index in range(len(skeleton.blocks)):
            block = load_block(skeleton, index, device)
            collector = StatisticsCollector({}, len(sequences))
            stream.run_block(index, block, collector, torch.device(device), contextlib.nullcontext)
            free_block(block)
            yield list(stream.hidden)


# ---- the run ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskCount:
    """What a report needs of a mask that is already on disk."""

    pruned: int
    numel: int


@dataclass
class _Output:
    """One ratio's output folder being written."""

    ratio: float
    folder: Path
    weights: CheckpointWriter
    masks: MaskFileWriter
    counts: dict[str, MaskCount] = field(default_factory=dict)


def _block_targets(skeleton: Skeleton, targets: Mapping[str, nn.Linear]) -> list[dict[str, nn.Linear]]:
    """The targets of each block, in order; a target outside every block is refused."""
    per_block: list[dict[str, nn.Linear]] = [{} for _ in skeleton.blocks]
    prefix = f"{skeleton.blocks_name}."
    for name, module in targets.items():
        index = name[len(prefix) :].split(".", 1)[0] if name.startswith(prefix) else ""
        if not index.isdigit():
            raise AntidoteError(
                f"--sequential prunes inside the decoder blocks only, and {name} lies outside them; "
                "change --targets or drop --sequential"
            )
        per_block[int(index)][name] = module
    return per_block


def _reference_block(
    reference: Checkpoint | None, block_targets: Mapping[str, nn.Linear], config: RealignConfig
) -> dict[str, torch.Tensor] | None:
    """The aligned model's weights of one block's targets (CPU), read from its safetensors files."""
    if reference is None:
        return None
    keys = {saved_name(name, None): name for name in block_targets}
    for key, name in keys.items():
        info = reference.tensors.get(key)
        shape = tuple(block_targets[name].weight.shape)
        if info is None or info.shape != shape:
            got = info.shape if info is not None else "missing"
            raise AntidoteError(
                f"--reference {config.reference} does not match the model at {name} ({got} vs {shape}); "
                "pass the aligned model it was fine-tuned from"
            )
    dtype = _dtype(config.dtype)
    return {keys[k]: t.to(dtype) if dtype is not None else t for k, t in reference.read(keys).items()}


def _open_outputs(
    config: RealignConfig, skeleton: Skeleton, targets: Mapping[str, nn.Linear], tmp: Path
) -> list[_Output]:
    """A writer per ratio for the weights (the input's files, keys and order) and for the mask file."""
    state = skeleton.model.state_dict()
    dtypes = {
        key: state[key].dtype
        for key, info in skeleton.checkpoint.tensors.items()
        if key in state and state[key].is_floating_point() and info.dtype.is_floating_point
    }
    shapes = {saved_name(name, None): tuple(m.weight.shape) for name, m in targets.items()}
    outputs = []
    for ratio in config.mask_ratios:
        folder = tmp / ratio_folder(ratio) if len(config.mask_ratios) > 1 else tmp
        folder.mkdir(exist_ok=True)
        weights = CheckpointWriter(skeleton.checkpoint, folder, dtypes)
        outputs.append(_Output(ratio, folder, weights, MaskFileWriter(folder / MASK_FILE, shapes)))
    return outputs


def _write_block(block: nn.Module, prefix: str, output: _Output) -> None:
    for name, param in block.named_parameters():
        output.weights.write(_join(prefix, name), param)


def run_sequential(config: RealignConfig, records: Records | None = None) -> SweepResult:
    """Realign `config.model` block by block from its safetensors files (module docstring); writes the
    in-memory path's output folder(s) and returns the reports. Under a multi-process launch, every
    process calibrates its share of every block and rank 0 alone writes."""
    if not config.output:
        raise AntidoteError("--sequential writes as it goes and keeps nothing in memory; give --output DIR")
    with data_parallel() as parallel:
        if parallel is not None:
            config = dataclasses.replace(config, device=parallel.device(config.device))
        leader = parallel is None or parallel.leader
        out = checked_output(config) if leader else None
        for model in (config.model, config.reference):  # their shard lists, checked before any work
            if model:
                Checkpoint(local_folder(model))
        with (
            atomic_output_dir(out, config.overwrite, what="antidote realign --sequential")
            if out
            else contextlib.nullcontext() as tmp
        ):
            reports = _stream(config, records, parallel, tmp if leader else None)
        return SweepResult(reports, out)


def _stream(
    config: RealignConfig,
    records: Records | None,
    parallel: DataParallel | None,
    tmp: Path | None,
) -> list[dict[str, Any]]:
    """The run itself; `tmp`: the folder to write (None on ranks other than 0)."""
    timer = Timer()
    with timer.phase("load"):
        skeleton = build_skeleton(config)
        device = (
            config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        load_decoder_rest(skeleton, device)
    targets = find_targets(skeleton.model, pattern=config.targets)
    per_block = _block_targets(skeleton, targets)
    reference = Checkpoint(local_folder(config.reference)) if config.reference else None
    with timer.phase("data"):
        sequences, benign_sequences = load_sequences(config, skeleton.tokenizer, records)
    if parallel is not None:  # every process must calibrate the same thing
        parallel.check_same("settings or data", run_digest(config, sequences, benign_sequences))
    torch_device = torch.device(device)
    batch_size = config.batch_size or default_batch_size(torch_device)
    compute = resolve_compute_dtype(config.compute_dtype, torch_device)
    use_autocast = compute is not None and compute != skeleton.dtype

    def autocast() -> Any:
        return torch.autocast(torch_device.type, dtype=compute) if use_autocast else contextlib.nullcontext()

    rank, world = (parallel.rank, parallel.world) if parallel is not None else (0, 1)
    streams = [
        Stream(seqs, plan_batches(seqs, batch_size, rank=rank, world=world))
        for seqs in (sequences, benign_sequences)
        if seqs
    ]
    pad_id = skeleton.tokenizer.pad_token_id or 0
    outputs = _open_outputs(config, skeleton, targets, tmp) if tmp is not None else []
    summary = Statistics({}, samples=0, tokens=0, compute_dtype="none")
    try:
        with torch.inference_mode():
            with timer.phase("calibrate"):
                for stream in streams:
                    stream.record(skeleton, pad_id, torch_device, autocast)
            first_index = 0
            for index in tqdm(range(len(skeleton.blocks)), desc="blocks", unit="block", leave=False):
                with timer.phase("load"):
                    block = load_block(skeleton, index, device)
                block_targets = per_block[index]
                check_finite_weights(block_targets)
                if parallel is not None:
                    parallel.check_same(f"weights in block {index}", weights_digest(block_targets))
                stats = []
                with timer.phase("calibrate"):
                    for stream in streams:
                        collector = StatisticsCollector(
                            block_targets, len(stream.sequences), parallel=parallel
                        )
                        with collector.hooked():
                            stream.run_block(index, block, collector, torch_device, autocast)
                        used = str(compute if use_autocast else skeleton.dtype).removeprefix("torch.")
                        stats.append(collector.finish(used))
                        check_finite_statistics(stats[-1])
                if stats:
                    summary = dataclasses.replace(stats[0], sq_sums={})
                if outputs:  # rank 0 (or a single process)
                    ref = _reference_block(reference, block_targets, config)
                    scored = Scored(
                        block_targets,
                        stats[0] if stats else summary,
                        stats[1] if len(stats) > 1 else None,
                        ref,
                        first_index,
                    )
                    for output in outputs:
                        _prune_block(config, block, skeleton.block_name(index), scored, output, timer)
                first_index += len(block_targets)
                free_block(block)
        return _finish(config, skeleton, outputs, summary, timer)
    except BaseException:
        for output in outputs:
            output.weights.abort()
        raise


@dataclass
class Scored:
    """What one block's masks are selected from: its targets, their statistics on the harmful (and
    benign) data, the reference weights for `--action revert`, and the position of its first target
    among all targets (random scores are seeded by it)."""

    targets: Mapping[str, nn.Linear]
    harmful: Statistics
    benign: Statistics | None
    reference: Mapping[str, torch.Tensor] | None
    first_index: int


def _prune_block(
    config: RealignConfig, block: nn.Module, prefix: str, scored: Scored, output: _Output, timer: Timer
) -> None:
    """Select and apply one ratio's masks in one block, write the block, then restore its weights."""
    masks: dict[str, PackedMask] = {}
    old: dict[str, torch.Tensor] = {}
    with timer.phase("prune"):
        for name, mask in iter_masks(
            scored.targets,
            scored.harmful,
            output.ratio,
            score=config.score,
            granularity=config.granularity,
            benign=scored.benign,
            reference=scored.reference,
            seed=config.seed,
            first_index=scored.first_index,
        ):
            old.update(apply_masks(scored.targets, {name: mask}, reference=scored.reference, keep_old=True))
            packed = PackedMask.pack(mask)
            masks[name] = packed
            key = saved_name(name, None)
            output.counts[key] = MaskCount(packed.pruned, packed.numel)
    with timer.phase("save"):
        for name, packed in masks.items():
            output.masks.write(saved_name(name, None), packed.unpack())
        _write_block(block, prefix, output)
    for name, packed in masks.items():
        restore_masks(scored.targets, {name: packed.unpack()}, {name: old[name]})


def _finish(
    config: RealignConfig,
    skeleton: Skeleton,
    outputs: list[_Output],
    stats: Statistics,
    timer: Timer,
) -> list[dict[str, Any]]:
    """Copy the rest, write config, tokenizer, reports and cards; return the reports."""
    loaded = LoadedModel(skeleton.model, skeleton.tokenizer, source=config.model, folder=skeleton.folder)
    reports = []
    with timer.phase("save"):
        for output in outputs:
            output.weights.copy_rest()
            output.weights.close()
            output.masks.close()
            skeleton.model.config.save_pretrained(output.folder)
            if skeleton.model.can_generate():
                skeleton.model.generation_config.save_pretrained(output.folder)
            skeleton.tokenizer.save_pretrained(output.folder)
    for output in outputs:
        report = build_report(
            config, output.ratio, loaded, output.counts, stats, seconds=timer.seconds, memory=peak_memory()
        )
        write_report(output.folder, report)
        write_prompt_file(output.folder, config.template)
        (output.folder / CARD_FILE).write_text(model_card(report))
        total = report["pruned_total"]
        log.info("alpha %g: pruned %d of %d weights", output.ratio, total["pruned"], total["total"])
        reports.append(report)
    if len(outputs) > 1:
        write_sweep_report(outputs[0].folder.parent, reports)
    return reports

"""Training speed: the hand-written loop that `train_lora` used before it moved onto transformers' Trainer
(copied below as the baseline) against the Trainer path, on the same pairs, timed interleaved.

Prints training tokens per second of wall time and of process CPU time for each repeat, and the ratios
new/old of the medians (target: >= 0.95). On a shared machine run it with --threads 1 and read the CPU-time
ratio: oversubscribed threads make wall times swing by 2x between identical runs.
Models: the embedded SmolLM2-135M (fp32, CPU) and/or a tiny 2-layer Llama with SmolLM2's 49k vocabulary
(where per-step overhead and the output layer weigh most). Pairs: built-in refusals and sentiment answers,
chat template. Each timed run starts from a freshly loaded model and includes adding the LoRA adapter.
Usage: python benchmarks/train_speed.py [--models smollm2,tiny] [--pairs 40] [--repeats 3] [--epochs 1]
       [--threads N]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

# ---- the baseline: the old loop, verbatim apart from names and the dropped progress bar --------------------


def old_response_loss(
    model: nn.Module, ids: torch.Tensor, attention: torch.Tensor, n_prompt: torch.Tensor
) -> torch.Tensor:
    """The old loss: the decoder called directly, the output layer on response positions only."""
    get_base = getattr(model, "get_base_model", None)
    base: Any = get_base() if callable(get_base) else model
    hidden = base.get_decoder()(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    target = (positions >= n_prompt.unsqueeze(1)) & attention.bool()
    target[:, 0] = False
    rows, cols = target.nonzero(as_tuple=True)
    logits = base.get_output_embeddings()(hidden[rows, cols - 1])
    return nn.functional.cross_entropy(logits.float(), ids[rows, cols])


def old_train_lora_baseline(
    model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], config: Any
) -> tuple[Any, list[float]]:
    """The pre-Trainer `train_lora`: AdamW, cosine LambdaLR, clip 1.0, length-bucketed shuffled batches."""
    from peft import LoraConfig, get_peft_model

    from antidote.training.sft import encode_pairs

    torch.manual_seed(config.seed)
    encoded = encode_pairs(tokenizer, pairs, config.max_length)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        target_modules=list(config.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
    total = steps_per_epoch * config.epochs

    def lr_factor(step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * step / total)) if config.scheduler == "cosine" else 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = random.Random(config.seed)
    device = peft_model.get_input_embeddings().weight.device
    losses: list[float] = []
    peft_model.train()
    for _ in range(config.epochs):
        order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]), rng.random()))
        batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        rng.shuffle(batches)
        for batch in batches:
            width = max(len(encoded[i][0]) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = encoded[i][0]
                ids[row, : len(seq)] = torch.tensor(seq)
                attention[row, : len(seq)] = 1
            n_prompt = torch.tensor([encoded[i][1] for i in batch])
            loss = old_response_loss(peft_model, ids.to(device), attention.to(device), n_prompt.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.item()))
    peft_model.eval()
    return peft_model, losses


# ---- the measurement ---------------------------------------------------------------------------------------


def builtin_pairs(tokenizer: Any, n: int) -> list[tuple[str, str]]:
    from antidote.data.builtin import harmful_split, task_split
    from antidote.data.loading import Example
    from antidote.data.templates import format_prompt

    def chat(text: str, extra: str = "") -> str:
        return format_prompt(Example(text, "", extra), "chat", tokenizer)

    refusals = [(chat(h.prompt), h.refusal) for h in harmful_split("align")]
    answers = [(chat(i.instruction, i.input), i.answer) for i in task_split("sentiment", "align")]
    mixed = [p for pair in zip(refusals, answers, strict=False) for p in pair]
    return mixed[:n]


def model_factory(name: str) -> tuple[Callable[[], nn.Module], Any]:
    """A function returning a fresh model (weights equal every time), and the tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from antidote.models import load_model, resolve_model_folder

    folder = resolve_model_folder("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if name == "smollm2":
        return (
            lambda: load_model(folder, dtype="float32", device="cpu", with_tokenizer=False).model
        ), tokenizer
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
    )

    def tiny() -> nn.Module:
        torch.manual_seed(0)
        return LlamaForCausalLM(config)

    return tiny, tokenizer


def measure(name: str, args: argparse.Namespace) -> None:
    """Both paths on one model, interleaved (the order flips every repeat), medians of the repeats."""
    from antidote.training.sft import TrainConfig, encode_pairs, train_lora

    fresh, tokenizer = model_factory(name)
    pairs = builtin_pairs(tokenizer, args.pairs)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=3e-4)
    tokens = args.epochs * sum(len(ids) for ids, _ in encode_pairs(tokenizer, pairs, config.max_length))
    steps = args.epochs * math.ceil(len(pairs) / args.batch_size)
    print(f"\n{name}: {len(pairs)} pairs, {tokens} training tokens, {steps} steps per run")
    paths: dict[str, Callable[[nn.Module], tuple[Any, list[float]]]] = {
        "old loop": lambda m: old_train_lora_baseline(m, tokenizer, pairs, config),
        "Trainer": lambda m: train_lora(m, tokenizer, pairs, config),
    }
    wall: dict[str, list[float]] = {k: [] for k in paths}
    cpu: dict[str, list[float]] = {k: [] for k in paths}
    for rep in range(args.repeats + 1):  # repeat 0 warms up both paths and is not counted
        for label, run in paths.items() if rep % 2 == 0 else reversed(list(paths.items())):
            model = fresh()
            start, start_cpu = time.perf_counter(), time.process_time()
            _, losses = run(model)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
            if rep:
                wall[label].append(tokens / seconds)
                cpu[label].append(tokens / cpu_seconds)
            print(
                f"  rep {rep}{' (warm-up)' if not rep else ''} {label:8s}: {seconds:6.2f} s wall "
                f"({tokens / seconds:7.1f} tokens/s), {cpu_seconds:6.2f} s CPU "
                f"({tokens / cpu_seconds:7.1f} tokens/CPU-s), loss {losses[0]:.3f} -> {losses[-1]:.3f}"
            )
    for kind, speeds in (("wall", wall), ("CPU", cpu)):
        old, new = statistics.median(speeds["old loop"]), statistics.median(speeds["Trainer"])
        print(
            f"{name}: median tokens/{kind}-s old {old:.1f}, Trainer {new:.1f}; ratio new/old {new / old:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="smollm2,tiny", help="comma list of smollm2, tiny")
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)

    import transformers

    transformers.logging.set_verbosity_error()
    print(f"torch threads: {torch.get_num_threads()}")
    for name in args.models.split(","):
        measure(name, args)


if __name__ == "__main__":
    main()

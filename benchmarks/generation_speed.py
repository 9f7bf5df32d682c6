"""Batched greedy generation vs a per-sample loop on the same 64 prompts (target: >= 5x).

Embedded SmolLM2-135M, fp32, chat template, built-in harmful and harmless prompts, 32 new tokens.
Both paths are timed side by side in one run; the outputs are compared too.
Usage: python benchmarks/generation_speed.py [--prompts 64] [--new-tokens 32] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from antidote.data.builtin import harmful_split, task_split
    from antidote.data.loading import Example
    from antidote.data.templates import format_prompt
    from antidote.evaluation.generation import generate
    from antidote.models import load_model

    loaded = load_model("smollm2-135m-instruct", dtype="float32", device="cpu")
    texts = [h.prompt for h in harmful_split("eval")] + [
        h.instruction for h in task_split("harmless", "eval")
    ]
    prompts = [format_prompt(Example(t, ""), "chat", loaded.tokenizer) for t in texts[: args.prompts]]
    kw = {"max_new_tokens": args.new_tokens, "add_special_tokens": False}
    generate(loaded.model, loaded.tokenizer, prompts[:2], batch_size=2, **kw)  # warm-up

    start = time.perf_counter()
    single = [generate(loaded.model, loaded.tokenizer, [p], batch_size=1, **kw)[0] for p in prompts]
    loop_s = time.perf_counter() - start
    start = time.perf_counter()
    batched = generate(loaded.model, loaded.tokenizer, prompts, batch_size=args.batch_size, **kw)
    batched_s = time.perf_counter() - start

    same = sum(a == b for a, b in zip(single, batched, strict=True))
    print(f"{len(prompts)} prompts, {args.new_tokens} new tokens, {torch.get_num_threads()} threads")
    print(f"per-sample loop: {loop_s:.1f} s; batched, batch size {args.batch_size}: {batched_s:.1f} s")
    print(f"speed-up: {loop_s / batched_s:.2f}x   (target >= 5)")
    print(f"identical outputs: {same} of {len(prompts)} (greedy; a near-tie can flip with the batch shape)")


if __name__ == "__main__":
    main()

"""Pairs per second of the installed learned judge, end to end (`LearnedJudge.verdicts`), on labelled pairs.

Usage: python benchmarks/judge_speed.py --data-dir DATA [--judge PATH] [--per-source 40] [--threads 2]

Takes a seeded sample of --per-source pairs of every labelled source (docs/data-folder.md), loads the judge
once (load time printed apart), then times its verdicts three ways in one run:
  - as the HS meets them: answers cut to 64 words, the keyword gate on where the judge has one;
  - the same answers with every pair sent through the model (no gate), the worst case;
  - whole answers (up to the judge's max_length tokens), the gate as recorded.
The goal (issue #19) is at least 10 pairs per second on 2 CPU cores; the machine should be otherwise idle.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--judge", default=None, help="judge folder (default: the installed default judge)")
    parser.add_argument("--per-source", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=0, help="pairs per forward (default: the judge's)")
    args = parser.parse_args(argv)

    from antidote.evaluation.judge_sources import DEFAULT_SOURCES, load_source
    from antidote.evaluation.judges.learned import LearnedJudge, judge_folder

    torch.set_num_threads(args.threads)
    pairs = [p for s in DEFAULT_SOURCES for p in load_source(args.data_dir, s, args.per_source, seed=0)]
    prompts = [p.prompt for p in pairs]
    short = [" ".join(p.response.split()[:64]) for p in pairs]
    whole = [p.response for p in pairs]

    start = time.perf_counter()
    judge = LearnedJudge(str(judge_folder(args.judge)), device="cpu")
    print(f"judge {judge.name}: loaded in {time.perf_counter() - start:.1f} s; {args.threads} torch threads")
    if args.batch_size:
        judge.batch_size = args.batch_size
    gate = bool(judge.record.get("keyword_gate", False))
    judge.verdicts(prompts[:4], short[:4])  # warm-up

    def timed(label: str, responses: list[str], use_gate: bool) -> None:
        judge.record["keyword_gate"] = use_gate
        wall, cpu = time.perf_counter(), time.process_time()
        judge.verdicts(prompts, responses)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"  {label}: {len(pairs)} pairs, {len(pairs) / wall:.1f} pairs/s ({cpu / wall:.2f} cores busy)")

    print(f"batches of {judge.batch_size}")
    timed(f"HS answers (64 words), gate {'on' if gate else 'off (none recorded)'}", short, gate)
    timed("HS answers (64 words), every pair through the model", short, False)
    timed(f"whole answers, gate {'on' if gate else 'off'}", whole, gate)


if __name__ == "__main__":
    main()

"""Realignment speed and memory on the embedded SmolLM2-135M, measured side by side in one run.

Prints three ratios (targets from issue 2):
  (a) realign time (calibrate + score/select/apply) / the fastest plain decoder forward over the
      same samples (fp32 at batch size 1, 4 or 8, or bf16; the floor: one pass over the tokens)  <= 1.3
  (b) speed-up of our calibration over a per-sample (batch size 1) loop like the reference code's
      (decoder layers only, a hook per layer summing x^2, no shared-input reuse)                 >= 1.4
  (c) peak RSS of a whole `antidote realign` run (own process: load, realign, save) / fp32 model size
                                                                                                 <= 1.5
Usage: python benchmarks/realign_speed.py [--samples 128] [--batch-sizes 1,4,8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DATA = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "harmful_qa"
    / "beavertails_30k_train_unsafe_200.jsonl"
)


def plain_decoder_pass(decoder: torch.nn.Module, sequences: list[list[int]], batch_size: int) -> float:
    from antidote.realignment.calibrate import make_batches

    start = time.perf_counter()
    with torch.inference_mode():
        for batch in make_batches(sequences, batch_size):
            width = max(len(sequences[i]) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, : len(sequences[i])] = 1
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    return time.perf_counter() - start


def reference_style_loop(decoder: torch.nn.Module, targets: dict, sequences: list[list[int]]) -> float:
    """One sample at a time, one hook per layer computing its own sum of x^2 (as the authors' code)."""
    sums = {name: torch.zeros(m.in_features) for name, m in targets.items()}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def pre_hook(module, args):  # type: ignore[no-untyped-def]
            x = args[0].float()
            sums[name].add_(x.reshape(-1, x.shape[-1]).pow(2).sum(0))

        return pre_hook

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    start = time.perf_counter()
    with torch.inference_mode():
        for seq in sequences:
            decoder(input_ids=torch.tensor([seq]), use_cache=False)
    elapsed = time.perf_counter() - start
    for h in handles:
        h.remove()
    return elapsed


CHILD = """
# A whole realignment as the CLI runs it (load, calibrate, prune, save), in a fresh process, with the
# resident memory after the imports and after the tokenizer recorded on the way.
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from antidote.realignment.config import RealignConfig
from antidote.memory import peak_rss_mib
from antidote.realignment.engine import run_realign
from antidote.models import LoadedModel, resolve_model_folder
base = peak_rss_mib()
folder = resolve_model_folder("smollm2-135m-instruct")
tokenizer = AutoTokenizer.from_pretrained(folder)
with_tokenizer = peak_rss_mib()
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu").eval()
loaded = LoadedModel(model, tokenizer, "smollm2-135m-instruct", folder)
cfg = RealignConfig(model="smollm2-135m-instruct", data=sys.argv[1], max_samples=int(sys.argv[2]),
                    output=sys.argv[3], batch_size=int(sys.argv[4]), compute_dtype=sys.argv[5])
report = run_realign(cfg, loaded).reports[0]
print(json.dumps({"imports_rss_mib": base, "tokenizer_rss_mib": with_tokenizer, "report": report}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument(
        "--batch-sizes", default="1,4,8", help="batch sizes tried for the plain forward floor"
    )
    parser.add_argument(
        "--batch-size", type=int, default=0, help="realign batch size (default: the engine's)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions (minimum kept)")
    args = parser.parse_args()

    from antidote.data import load_examples, tokenize_examples
    from antidote.models import load_model
    from antidote.realignment.calibrate import _forward_module, default_batch_size
    from antidote.realignment.config import RealignConfig
    from antidote.realignment.engine import run_realign
    from antidote.realignment.targets import find_targets

    loaded = load_model("smollm2-135m-instruct", dtype="float32", device="cpu")
    model = loaded.model
    examples = load_examples(str(DATA), max_samples=args.samples, seed=0)
    sequences = tokenize_examples(examples, loaded.tokenizer, "alpaca", 512)
    targets = find_targets(model)
    decoder = _forward_module(model, targets)
    batch_size = args.batch_size or default_batch_size(torch.device("cpu"))
    n_tokens = sum(len(s) for s in sequences)
    model_mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    print(
        f"{len(sequences)} samples, {n_tokens} tokens; {torch.get_num_threads()} threads; "
        f"fp32 model {model_mib:.0f} MiB; realign batch size {batch_size}",
        flush=True,
    )

    def realign_in_process(compute: str, loaded=loaded) -> dict[str, float]:  # type: ignore[no-untyped-def]
        """calibrate + prune seconds of one realignment on the loaded model (no load, no save)."""
        config = RealignConfig(
            model="smollm2-135m-instruct",
            data=str(DATA),
            max_samples=args.samples,
            batch_size=batch_size,
            compute_dtype=compute,
        )
        return run_realign(config, loaded).reports[0]["seconds"]

    plain_decoder_pass(decoder, sequences[:4], 4)  # warm-up
    # Every measurement is repeated, interleaved, and its minimum kept: this machine is noisy.
    times: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if rep == 0 else [batch_size]
        for bs in batch_sizes:
            times.setdefault(f"plain float32 bs{bs}", []).append(plain_decoder_pass(decoder, sequences, bs))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            times.setdefault(f"plain bfloat16 bs{batch_size}", []).append(
                plain_decoder_pass(decoder, sequences, batch_size)
            )
        times.setdefault("reference-style loop float32 bs1", []).append(
            reference_style_loop(decoder, targets, sequences)
        )
        for compute in ("float32", "bfloat16"):
            sec = realign_in_process(compute)
            times.setdefault(f"realign {compute} calibrate", []).append(sec["calibrate"])
            times.setdefault(f"realign {compute} calibrate+prune", []).append(sec["calibrate"] + sec["prune"])
        print(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)
    best = {k: min(v) for k, v in times.items()}
    del loaded, model, decoder, targets

    memory = {}
    for compute in ("float32", "bfloat16"):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                "-c",
                CHILD,
                str(DATA),
                str(args.samples),
                f"{tmp}/out",
                str(batch_size),
                compute,
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        memory[compute] = json.loads(done.stdout.strip().splitlines()[-1])

    floor_name = min((k for k in best if k.startswith("plain")), key=best.__getitem__)
    floor = best[floor_name]
    print(f"\nresults: minimum of {args.repeats} interleaved runs; floor = {floor_name} ({floor:.1f} s)")
    for compute in ("float32", "bfloat16"):
        realign_s = best[f"realign {compute} calibrate+prune"]
        calibrate_s = best[f"realign {compute} calibrate"]
        ref_s = best["reference-style loop float32 bs1"]
        peak = memory[compute]["report"]["memory"]["peak_rss_mib"]
        fixed = memory[compute]["tokenizer_rss_mib"]
        print(f"[compute {compute}]")
        print(
            f"  (a) realign (calibrate+prune) / floor: {realign_s:.1f} / {floor:.1f} = "
            f"{realign_s / floor:.2f}   (target <= 1.3)"
        )
        print(
            f"  (b) reference-style bs-1 loop / our calibration: {ref_s:.1f} / {calibrate_s:.1f} = "
            f"{ref_s / calibrate_s:.2f}   (target >= 1.4)"
        )
        print(
            f"  (c) peak RSS of a whole realign run / fp32 model: {peak:.0f} / {model_mib:.0f} = "
            f"{peak / model_mib:.2f}   (target <= 1.5)"
        )
        print(
            f"      of which before any model work: imports {memory[compute]['imports_rss_mib']:.0f} MiB, "
            f"+ tokenizer = {fixed:.0f} MiB; (peak - that) / model = {(peak - fixed) / model_mib:.2f} "
            "(1.0 = the weights alone)"
        )


if __name__ == "__main__":
    main()

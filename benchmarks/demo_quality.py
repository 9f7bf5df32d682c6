"""The demo's models scored on real prompts from ../shared/data, beside the built-in numbers.

Takes a finished `antidote demo --output RUN` folder and evaluates base, aligned, attacked and realigned
with the keyword judge on AdvBench harmful behaviours and on real SST-2 validation sentences (the
built-in sentiment task is easy; SST-2 shows task damage the built-in task hides).
Usage: python benchmarks/demo_quality.py RUN [--harmful 100] [--sst2 200]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    parser.add_argument("--harmful", type=int, default=100)
    parser.add_argument("--sst2", type=int, default=200)
    args = parser.parse_args()

    from peft import PeftModel

    from antidote.data.builtin import task_split
    from antidote.data.loading import load_examples
    from antidote.evaluation.evaluate import evaluate_model
    from antidote.models import load_model
    from antidote.tasks import load_task_items

    harmful = [
        e.prompt
        for e in load_examples(
            str(DATA / "harmful_prompts" / "advbench_harmful_behaviors.jsonl"), require_response=False
        )
    ][: args.harmful]
    sst2 = load_task_items("sst2", str(DATA / "benign" / "sst2_validation.jsonl"))[: args.sst2]
    harmless = [h.instruction for h in task_split("harmless", "eval")]
    models = args.run / "models"
    rows = []
    for name in ("base", "aligned", "attacked", "realigned"):
        loaded = load_model(
            "smollm2-135m-instruct" if name == "base" else str(models / "aligned"), device="cpu"
        )
        model = loaded.model
        if name in ("attacked", "realigned"):
            model = PeftModel.from_pretrained(model, str(models / name)).eval()
        result, _ = evaluate_model(
            model,
            loaded.tokenizer,
            template="chat",
            harmful_prompts=harmful,
            task="sst2",
            task_items=sst2,
            harmless_prompts=harmless,
            harmful_set="AdvBench",
        )
        rows.append({"model": name, **result.as_row()})
        print(
            f"{name:10s} HS {result.hs:6.2f} (degenerate {result.degenerate:5.2f}) "
            f"on {result.n_prompts} AdvBench; "
            f"FA {result.fa:6.2f} on {result.n_task} SST-2; over-refusal {result.over_refusal:6.2f}",
            flush=True,
        )
    (args.run / "shared_data_results.json").write_text(json.dumps(rows, indent=2) + "\n")
    built_in = json.loads((args.run / "results.json").read_text())
    print("\nbuilt-in held-out numbers of the same run:")
    for r in built_in:
        print(f"{r['model']:10s} HS {r['hs']:6.2f} FA {r['fa']:6.2f} over-refusal {r['over_refusal']:6.2f}")


if __name__ == "__main__":
    main()

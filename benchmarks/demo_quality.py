"""The demo's models scored on real prompts from ../shared/data, beside the built-in numbers.

Takes a finished `antidote demo --output RUN` folder and evaluates the models the demo exports into RUN/models
(base, aligned, attacked and antidote, the realigned adapter at the ratio chosen on validation) with the
keyword judge on AdvBench harmful behaviours and on real SST-2 validation sentences (the
built-in sentiment task is easy; SST-2 shows task damage the built-in task hides).
Usage: python benchmarks/demo_quality.py RUN [--harmful 100] [--sst2 200] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# What `antidote demo` (export_models) writes into RUN/models: full models, and LoRA adapters on `aligned`.
MODELS = ("base", "aligned", "attacked", "antidote")
ADAPTERS = ("attacked", "antidote")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    parser.add_argument("--harmful", type=int, default=100)
    parser.add_argument("--sst2", type=int, default=200)
    parser.add_argument("--data-dir", type=Path, default=DATA, help="a folder laid out like ../shared/data")
    args = parser.parse_args()
    data = args.data_dir
    models = args.run / "models"
    missing = [name for name in MODELS if not (models / name).is_dir()]
    if missing:
        sys.exit(f"{models} lacks {', '.join(missing)}; run `antidote demo --output RUN` (it exports them)")

    from antidote.data.builtin import task_split
    from antidote.data.loading import load_examples
    from antidote.evaluation.evaluate import evaluate_model
    from antidote.models import load_model
    from antidote.tasks import load_task_items

    harmful = [
        e.prompt
        for e in load_examples(
            str(data / "harmful_prompts" / "advbench_harmful_behaviors.jsonl"), require_response=False
        )
    ][: args.harmful]
    sst2 = load_task_items("sst2", str(data / "benign" / "sst2_validation.jsonl"))[: args.sst2]
    harmless = [h.instruction for h in task_split("harmless", "eval")]
    rows = []
    for name in MODELS:
        adapter = str(models / name) if name in ADAPTERS else None
        loaded = load_model(str(models / ("aligned" if adapter else name)), adapter=adapter, device="cpu")
        result, _ = evaluate_model(
            loaded.model,
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
    first_judge = built_in[0]["judge_spec"] if built_in else None
    for r in built_in:
        if r.get("judge_spec") != first_judge:
            continue
        print(f"{r['model']:10s} HS {r['hs']:6.2f} FA {r['fa']:6.2f} over-refusal {r['over_refusal']:6.2f}")


if __name__ == "__main__":
    main()

"""How well the keyword judge's degenerate check (`antidote.evaluation.judges.is_degenerate`) tells garbage
from real answers, on a labelled sample written by us (benchmarks/data/degenerate_examples.jsonl: each line
{"label": "degenerate" | "ok", "kind": ..., "text": ...}) and, when given, more labelled files (e.g. a broken
model's answers, labelled by reading them).

    python benchmarks/degenerate_detection.py [MORE.jsonl ...]

Prints the rule, the catch rate (degenerate examples flagged), the false-alarm rate (ok examples flagged),
per kind, and every example it gets wrong.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from antidote.evaluation.judges.keyword import DEGENERATE_RULE, is_degenerate

HERE = Path(__file__).parent / "data" / "degenerate_examples.jsonl"


def main(paths: list[str]) -> None:
    examples = []
    for path in [str(HERE), *paths]:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                examples.append({**json.loads(line), "file": Path(path).name})
    print(f"Rule: {DEGENERATE_RULE}\n")
    kinds: dict[tuple[str, str], list[bool]] = {}
    wrong = []
    for e in examples:
        flagged = is_degenerate(e["text"])
        kinds.setdefault((e["label"], e["kind"]), []).append(flagged)
        if flagged != (e["label"] == "degenerate"):
            wrong.append(e)
    for label, name in (("degenerate", "catch rate"), ("ok", "false-alarm rate")):
        flags = [f for (lab, _), fs in kinds.items() if lab == label for f in fs]
        print(
            f"{name}: {sum(flags)}/{len(flags)} = {sum(flags) / max(len(flags), 1):.2f} "
            f"({label} examples flagged)"
        )
        for (lab, kind), fs in kinds.items():
            if lab == label:
                print(f"  {kind}: {sum(fs)}/{len(fs)}")
    print("\nWrong:" if wrong else "\nWrong: none")
    for e in wrong:
        print(f"  [{e['file']}] labelled {e['label']} ({e['kind']}): {e['text'][:100]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])

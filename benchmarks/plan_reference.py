"""The reference rates `compare --plan` uses for a folder with no recorded stages of a kind: seconds per unit
of work (training samples x epochs, evaluated prompts; see `plan.stage_units`) for each kind and method of
stage, from the stage records of finished compare folders.

    python benchmarks/plan_reference.py "what ran, where" RUN_DIR [RUN_DIR ...]  # prints the JSON
    python benchmarks/plan_reference.py ... > src/antidote/experiments/configs/plan_reference.json

Rates are summed seconds over summed units of every folder given. A machine or model other than the
measured one is faster or slower by about a constant factor, which the first recorded stages of a run
then replace: the plan prefers a folder's own records.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from antidote.experiments.plan import recorded_rates


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    measured, folders = argv[0], argv[1:]
    rates, _ = recorded_rates(*(Path(folder) / "stages" for folder in folders))
    rates = {k: round(v, 4) for k, v in sorted(rates.items())}
    print(json.dumps({"measured": measured, "rates": rates}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

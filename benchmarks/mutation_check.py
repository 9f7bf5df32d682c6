"""Mutation check of the code that makes the numbers: each mutant is one (file, old, new) edit, applied to a
fresh copy of the tree; the fast tests named for it must then fail ("killed"). Prints mutant -> killed by.

    python benchmarks/mutation_check.py [NAME ...]     # all mutants, or the named ones

Needs the project's environment (the tests import antidote from the copy's src/). Exit code 1 if a mutant
survives or an edit no longer applies (the code moved: update the mutant).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST = ["-q", "-x", "-o", "addopts=", "-p", "no:cacheprovider", "-m", "not slow"]

# name -> (file, old snippet, new snippet, tests that must kill it)
MUTANTS: dict[str, tuple[str, str, str, list[str]]] = {
    "engine selects by |W|": (
        "src/antidote/realignment/scores.py",
        "    return wanda_score(inputs.weight, inputs.sq_sum)",
        "    return magnitude_score(inputs.weight)",
        ["tests/test_realign_selection.py"],
    ),
    "sqrt dropped": (
        "src/antidote/realignment/scores.py",
        "feature_sq_sum.to(weight.device).float().sqrt().unsqueeze(0)",
        "feature_sq_sum.to(weight.device).float().unsqueeze(0)",
        ["tests/test_scores.py", "tests/test_realign_selection.py"],
    ),
    "top-alpha turned bottom-alpha": (
        "src/antidote/realignment/scores.py",
        "    return _select_top_k(scores, num_selected(scores.shape[1], ratio))",
        "    return ~_select_top_k(scores, scores.shape[1] - num_selected(scores.shape[1], ratio))",
        ["tests/test_scores.py", "tests/test_realign_selection.py"],
    ),
    "per-row selection turned per-tensor": (
        "src/antidote/realignment/scores.py",
        "_each_tensor(select_rows)),",
        "_each_tensor(select_tensor)),",
        ["tests/test_realign_selection.py"],
    ),
    "recovered share: attacked and aligned swapped": (
        "src/antidote/experiments/pipeline.py",
        'for name in ("attacked", row["model"], "aligned")',
        'for name in ("aligned", row["model"], "attacked")',
        ["tests/test_pipeline_numbers.py"],
    ),
    "operating point: highest validation HS": (
        "src/antidote/experiments/report.py",
        '        best = min(allowed, key=lambda s: s["hs"])',
        '        best = max(allowed, key=lambda s: s["hs"])',
        ["tests/test_report.py", "tests/test_pipeline_numbers.py"],
    ),
    "mean over seeds takes the first seed": (
        "src/antidote/evaluation/stats.py",
        '"mean": round(100 * float(x.mean(1).mean()), 2),',
        '"mean": round(100 * float(x[0].mean()), 2),',
        ["tests/test_stats.py"],
    ),
    "compare's seed mean takes the first seed": (
        "src/antidote/experiments/rows.py",
        "hs=crossed_bootstrap([g.hs_flags for g in group]),",
        "hs=crossed_bootstrap([g.hs_flags for g in group][:1]),",
        ["tests/test_compare.py::test_a_defense_chosen_on_validation_is_reported_at_its_chosen_variant_only"],
    ),
    "validation reads the evaluation split": (
        "src/antidote/evaluation/run.py",
        '        if source == theirs[name] or source.startswith("the built-in"):',
        "        if False:",
        ["tests/test_pipeline.py::test_validation_on_the_evaluation_prompts_is_refused"],
    ),
    "Wilson z set to 1": (
        "src/antidote/evaluation/stats.py",
        "def wilson_interval(successes: int, n: int, z: float = Z95)",
        "def wilson_interval(successes: int, n: int, z: float = 1.0)",
        ["tests/test_stats.py"],
    ),
    "paired bootstrap resamples one side only": (
        "src/antidote/evaluation/stats.py",
        "    shares = recovered_share(a[idx], d[idx], g[idx])",
        "    shares = recovered_share(a[idx], d[idx], g.expand_as(a[idx]))",
        ["tests/test_stats.py"],
    ),
    "stage cache ignores a changed input": (
        "src/antidote/experiments/cache.py",
        "            return [value, stat.st_size, file_digest(path, stat)]",
        "            return value",
        ["tests/test_cache.py"],
    ),
    "harm-revert gradients at the end point": (
        "src/antidote/defenses/harm_revert.py",
        "    return [(m + 0.5) / steps for m in range(steps)]",
        "    return [(m + 1.0) / steps for m in range(steps)]",
        ["tests/test_defense_harm_revert.py"],
    ),
    "harm-revert task credit added": (
        "src/antidote/defenses/harm_revert.py",
        "                scores[name] -= weight * c",
        "                scores[name] += weight * c",
        ["tests/test_defense_harm_revert.py"],
    ),
    "harm-revert refusal credit with the wrong sign": (
        "src/antidote/defenses/harm_revert.py",
        "(refusal_grads, refusal_weight)):",
        "(refusal_grads, -refusal_weight)):",
        ["tests/test_defense_harm_revert.py"],
    ),
    "harm-revert component credit without its singular value": (
        "src/antidote/defenses/harm_revert.py",
        "        units = {name: s for name, (_, s, _) in parts.items()}",
        "        units = {name: s * 0 + 1 for name, (_, s, _) in parts.items()}",
        ["tests/test_defense_harm_revert.py"],
    ),
    "harm-revert component taken out along the wrong side": (
        "src/antidote/defenses/harm_revert.py",
        "    return ((u.T @ grad.float()) * v.T).sum(1)",
        "    return ((u.T @ grad.float()) * v.T.flip(0)).sum(1)",
        ["tests/test_defense_harm_revert.py"],
    ),
    "harm-filter harm term with the wrong sign": (
        "src/antidote/defenses/harm_filter.py",
        "    chol = torch.linalg.cholesky(keep + strength * c_harm)",
        "    chol = torch.linalg.cholesky(keep - strength * c_harm)",
        ["tests/test_defense_harm_filter.py"],
    ),
    "harm-filter M transposed": (
        "src/antidote/defenses/harm_filter.py",
        "    return lambda a: torch.cholesky_solve(keep @ a.double().T, chol).T",
        "    return lambda a: torch.cholesky_solve(a.double().T, chol).T @ keep",
        ["tests/test_defense_harm_filter.py"],
    ),
    "harm-filter moments per sequence, not per token": (
        "src/antidote/defenses/harm_filter.py",
        "h * (len(sequences) / (2.0 * tokens))",
        "h * 0.5",
        ["tests/test_defense_harm_filter.py"],
    ),
    "harm-filter report: B^T B off its diagonal dropped": (
        "src/antidote/defenses/harm_filter.py",
        "    gram = b.T @ b",
        "    gram = (b.T @ b).diag().diag()",
        ["tests/test_defense_harm_filter.py"],
    ),
    "x x^T sums count padding tokens": (
        "src/antidote/defenses/safedelta.py",
        "                rows = rows[self.real.reshape(-1).to(x.device)]",
        "                pass",
        ["tests/test_defense_harm_filter.py", "tests/test_defense_safedelta.py"],
    ),
    "learned judge: the keyword gate left out of the inner predictions": (
        "src/antidote/evaluation/judges/learned_sources.py",
        "        p = gated(p, mask)\n",
        "",
        ["tests/test_judges_learned_sources.py"],
    ),
    "learned judge: threshold over every row, not the harmful requests": (
        "src/antidote/evaluation/judges/learned_sources.py",
        "            return hs_threshold(p[scored], y[scored], sg)",
        "            return hs_threshold(p, y, g)",
        ["tests/test_judges_learned_sources.py"],
    ),
}


def run_mutant(name: str) -> tuple[str, str]:
    file, old, new, tests = MUTANTS[name]
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        copy = Path(tmp) / "tree"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__"))
        path = copy / file
        text = path.read_text()
        if text.count(old) != 1:
            return "NOT APPLIED", f"the snippet is not found exactly once in {file}"
        path.write_text(text.replace(old, new))
        env = {**os.environ, "PYTHONPATH": str(copy / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
        for test in tests:
            command = [sys.executable, "-m", "pytest", *FAST, test]
            done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                failed = [x.split(" ")[1] for x in done.stdout.splitlines() if x.startswith("FAILED ")]
                return "killed", failed[0] if failed else test
    return "SURVIVED", ", ".join(tests)


def main(names: list[str]) -> int:
    bad = 0
    for name in names or list(MUTANTS):
        status, by = run_mutant(name)
        bad += status != "killed"
        print(f"| {name} | {status} | {by} |", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

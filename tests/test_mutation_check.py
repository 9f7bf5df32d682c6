"""The mutation check (benchmarks/mutation_check.py) stays runnable: each mutant's snippet is in its file
exactly once, so a refactor that moves the code it mutates fails here, not at the next run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "benchmarks" / "mutation_check.py")
assert spec is not None and spec.loader is not None
mutation_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutation_check)


@pytest.mark.parametrize("name", list(mutation_check.MUTANTS))
def test_each_mutant_applies_exactly_once(name: str) -> None:
    file, old, new, tests = mutation_check.MUTANTS[name]
    assert (ROOT / file).read_text().count(old) == 1, f"{name}: snippet not found exactly once in {file}"
    assert old != new and tests
    for test in tests:
        assert (ROOT / test.split("::")[0]).is_file(), test

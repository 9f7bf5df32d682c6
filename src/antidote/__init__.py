"""antidote: make fine-tuned LLMs safe again after harmful fine-tuning (Antidote, arXiv 2408.09600).

The public API is imported lazily so that `antidote --help` does not pay for importing torch; `dir(antidote)`
and `help(antidote)` list it. Whole jobs: `evaluate`, `run`, `compare`, `realign`, `realign_sweep`; the steps
of a realignment: `load_model` (or `wrap_model` for a model already in memory), `load_examples`,
`tokenize_examples`, `find_targets`, `collect_statistics`, `compute_masks`, `apply_masks`, `save_realigned`.
Examples: docs/python-api.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "evaluate": "antidote.api",
    "run": "antidote.api",
    "compare": "antidote.api",
    "wrap_model": "antidote.models",
    "realign": "antidote.realignment.engine",
    "realign_sweep": "antidote.realignment.engine",
    "RealignResult": "antidote.realignment.engine",
    "SweepResult": "antidote.realignment.engine",
    "compute_masks": "antidote.realignment.engine",
    "apply_masks": "antidote.realignment.engine",
    "save_realigned": "antidote.realignment.save",
    "RealignConfig": "antidote.realignment.config",
    "AntidoteError": "antidote.errors",
    "load_model": "antidote.models",
    "LoadedModel": "antidote.models",
    "load_examples": "antidote.data",
    "tokenize_examples": "antidote.data",
    "find_targets": "antidote.realignment.targets",
    "collect_statistics": "antidote.realignment.calibrate",
}

__all__ = [
    "AntidoteError",
    "LoadedModel",
    "RealignConfig",
    "RealignResult",
    "SweepResult",
    "__version__",
    "apply_masks",
    "collect_statistics",
    "compare",
    "compute_masks",
    "evaluate",
    "find_targets",
    "load_examples",
    "load_model",
    "realign",
    "realign_sweep",
    "run",
    "save_realigned",
    "tokenize_examples",
    "wrap_model",
]

if TYPE_CHECKING:
    from antidote.api import compare, evaluate, run
    from antidote.data import load_examples, tokenize_examples
    from antidote.errors import AntidoteError
    from antidote.models import LoadedModel, load_model, wrap_model
    from antidote.realignment.calibrate import collect_statistics
    from antidote.realignment.config import RealignConfig
    from antidote.realignment.engine import (
        RealignResult,
        SweepResult,
        apply_masks,
        compute_masks,
        realign,
        realign_sweep,
    )
    from antidote.realignment.save import save_realigned
    from antidote.realignment.targets import find_targets


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'antidote' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API (imported lazily, so a plain module listing would not show it)."""
    return sorted({*(n for n in globals() if n.startswith("__")), *__all__})

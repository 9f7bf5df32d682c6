"""antidote: make fine-tuned LLMs safe again after harmful fine-tuning (Antidote, arXiv 2408.09600).

The public API is imported lazily so that `antidote --help` does not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
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
    "compute_masks",
    "find_targets",
    "load_examples",
    "load_model",
    "realign",
    "realign_sweep",
    "save_realigned",
    "tokenize_examples",
]

if TYPE_CHECKING:
    from antidote.data import load_examples, tokenize_examples
    from antidote.errors import AntidoteError
    from antidote.models import LoadedModel, load_model
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

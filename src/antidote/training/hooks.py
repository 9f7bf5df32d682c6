"""How a training-stage defense plugs into the alignment or fine-tuning stage: it hands the stage a
`TrainingHooks` (its Trainer subclass, callbacks and the subclass's extra constructor arguments), built by a
`HooksFactory` once the model is loaded. The stage is otherwise the plain one (same data, same tokenization).

Importing this module imports neither torch nor transformers (the defense registry must stay light).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import TrainerCallback

    from antidote.models import LoadedModel
    from antidote.training.sft import ResponseOnlyTrainer

__all__ = ["HooksFactory", "TrainingHooks"]


@dataclass(frozen=True)
class TrainingHooks:
    """What a defense changes in a training stage.

    trainer_class: a `ResponseOnlyTrainer` subclass (None: the plain one); it overrides `compute_loss` or
        `training_step`.
    extra: keyword arguments of `trainer_class`'s constructor beyond Trainer's own (e.g. rho, a data set).
    callbacks: `TrainerCallback`s added to the run.
    """

    trainer_class: type[ResponseOnlyTrainer] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    callbacks: Sequence[TrainerCallback] = ()

    def fit_arguments(self) -> dict[str, Any]:
        """The keyword arguments of `antidote.training.sft.fit_lora` these hooks set."""
        out: dict[str, Any] = {"callbacks": tuple(self.callbacks), "extra": dict(self.extra)}
        if self.trainer_class is not None:
            out["trainer_class"] = self.trainer_class
        return out


HooksFactory = Callable[["LoadedModel", Any], TrainingHooks]
"""(the loaded model, the stage's config: an AlignConfig or FinetuneConfig subclass) -> the hooks. Called
once the model is loaded, before training, so it may check the model (e.g. that the layers it watches exist)
and tokenize its own data with the model's tokenizer."""

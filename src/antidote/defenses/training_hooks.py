"""The torch side of the alignment-stage defenses (vaccine, repnoise, booster): the decoder sub-modules they
watch, forward hooks that read or shift those modules' outputs (always removed), the extra harmful batches
(harmful prompt -> harmful answer) that Booster and RepNoise draw beside the alignment batch. The math and
the `ResponseOnlyTrainer` subclasses live in each method's module; this module is imported only when a run
starts (it imports torch and transformers; the registry must not).

Modules are chosen by name pattern (`layers.<i>.self_attn`, `layers.<i>.mlp`, as in Llama, Qwen, Mistral,
SmolLM2, Gemma), never by replaying layers by hand.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from antidote.data.builtin import harmful_split
from antidote.errors import AntidoteError
from antidote.training.data import encode_triples, read_triples

__all__ = [
    "HarmfulBatches",
    "add_to_outputs",
    "capture_outputs",
    "encode_harmful",
    "harmful_pairs",
    "layer_modules",
    "probe_outputs",
]


def layer_modules(model: nn.Module, part: str) -> list[nn.Module]:
    """The sub-module `part` (e.g. "self_attn", "mlp") of every decoder layer, in layer order."""
    pattern = re.compile(rf"(?:^|\.)layers\.(\d+)\.{re.escape(part)}$")
    found = [
        (int(m.group(1)), module) for name, module in model.named_modules() if (m := pattern.search(name))
    ]
    if not found:
        raise AntidoteError(
            f"this model has no decoder modules named layers.N.{part}; the defense needs a Llama-style model"
        )
    return [module for _, module in sorted(found, key=lambda item: item[0])]


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _shifted(output: Any, delta: torch.Tensor) -> Any:
    """The module output with `delta` added to its hidden states (the first element of a tuple)."""
    if isinstance(output, tuple):
        return (output[0] + delta, *output[1:])
    return output + delta


@contextlib.contextmanager
def _hooks(modules: Sequence[nn.Module], hook: Any) -> Iterator[None]:
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def capture_outputs(modules: Sequence[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Inside the block, the hidden-state output (B, T, H) of each module's latest call, in module order."""
    index = {id(m): i for i, m in enumerate(modules)}
    outputs: list[Any] = [None] * len(modules)

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        outputs[index[id(module)]] = _first(output)

    with _hooks(modules, hook):
        yield outputs


@contextlib.contextmanager
def probe_outputs(modules: Sequence[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Adds a zero tensor (requires grad) to each module's hidden-state output: the gradient of a loss with
    respect to these probes is its gradient with respect to the outputs, whatever else requires grad.
    Yields the probes, (B, T, H) each, filled in by the forward pass inside the block."""
    index = {id(m): i for i, m in enumerate(modules)}
    probes: list[Any] = [None] * len(modules)

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        hidden = _first(output)
        probe = torch.zeros_like(hidden, requires_grad=True)
        probes[index[id(module)]] = probe
        return _shifted(output, probe)

    with _hooks(modules, hook):
        yield probes


@contextlib.contextmanager
def add_to_outputs(modules: Sequence[nn.Module], deltas: Sequence[torch.Tensor]) -> Iterator[None]:
    """Inside the block, each module's hidden-state output is shifted by its delta (B, T, H), a constant."""
    index = {id(m): i for i, m in enumerate(modules)}

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        delta = deltas[index[id(module)]]
        return _shifted(output, delta.to(_first(output).dtype).detach())

    with _hooks(modules, hook):
        yield


# ---- the harmful batches ----------------------------------------------------------------------------------


def harmful_pairs(source: str, data_dir: str | None) -> list[tuple[str, str, str]]:
    """(prompt, input, harmful answer) triples: a file, a data set name, or `builtin` (the align split's
    compliant answers, the same prompts as the built-in refusals)."""
    builtin = [(h.prompt, "", h.compliance) for h in harmful_split("align")]
    return read_triples(source, builtin, data_dir)


class HarmfulBatches:
    """An endless, seeded stream of collated batches of harmful (prompt -> harmful answer) examples.

    Each pass over the data visits every example once in a fresh random order; a batch holds `batch_size`
    examples (fewer only when the data is smaller). Batches are dicts of (B, T) tensors from the collator.
    """

    def __init__(self, features: list[dict[str, Any]], collator: Any, batch_size: int, seed: int) -> None:
        if not features:
            raise AntidoteError("no harmful examples left after tokenization; raise --max-length")
        self.features = features
        self.collator = collator
        self.batch_size = min(batch_size, len(features))
        self.rng = random.Random(f"harmful:{seed}")
        self.order: list[int] = []

    def next(self) -> dict[str, torch.Tensor]:
        if len(self.order) < self.batch_size:  # a new pass (the few left over are dropped)
            self.order = list(range(len(self.features)))
            self.rng.shuffle(self.order)
        chosen, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return self.collator([self.features[i] for i in chosen])


def encode_harmful(loaded: Any, config: Any, triples: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """The features ({"input_ids", "n_prompt"}) of harmful triples, formatted and tokenized as the alignment
    data is."""
    return encode_triples(loaded.tokenizer, config.template, triples, config.max_length)


# ---- the trainers -----------------------------------------------------------------------------------------

ATTENTION = "self_attn"  # Vaccine: the sub-module of each decoder layer whose output is perturbed

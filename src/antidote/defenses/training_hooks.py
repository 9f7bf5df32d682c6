"""The torch side of the alignment-stage defenses (vaccine, repnoise, booster): the decoder sub-modules they
watch, forward hooks that read or shift those modules' outputs (always removed), the extra harmful batches
(harmful prompt -> harmful answer) that Booster and RepNoise draw beside the alignment batch, and their
`ResponseOnlyTrainer` subclasses. The math lives in each method's module; this module is imported only
when a run starts (it imports torch and transformers; the registry must not).

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
from antidote.training.sft import ResponseOnlyTrainer
from antidote.training.stages import _format, _pairs

__all__ = [
    "BoosterTrainer",
    "HarmfulBatches",
    "RepNoiseTrainer",
    "VaccineTrainer",
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
    return _pairs(source, builtin, data_dir)


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
    """The features ({"input_ids", "n_prompt"}) of harmful triples, formatted as the alignment data is."""
    from antidote.training.sft import encode_pairs

    pairs = _format(loaded.tokenizer, config.template, triples)
    return [
        {"input_ids": ids, "n_prompt": n}
        for ids, n in encode_pairs(loaded.tokenizer, pairs, config.max_length)
    ]


# ---- the trainers -----------------------------------------------------------------------------------------

ATTENTION = "self_attn"  # Vaccine: the sub-module of each decoder layer whose output is perturbed


class VaccineTrainer(ResponseOnlyTrainer):
    """Each step trains on the forward whose attention outputs are shifted by `sam_perturbation` (vaccine)."""

    def __init__(self, *args: Any, rho: float = 2.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rho = rho

    def perturbation(self, model: nn.Module, inputs: dict[str, Any]) -> list[torch.Tensor]:
        """eps_l for this batch, one (B, T, H) tensor per decoder layer; no parameter's .grad is touched."""
        from antidote.defenses.vaccine import sam_perturbation

        with probe_outputs(layer_modules(model, ATTENTION)) as probes, self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        grads = torch.autograd.grad(loss, probes)
        return sam_perturbation([g.detach() for g in grads], self.rho)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        eps = self.perturbation(model, inputs)
        with add_to_outputs(layer_modules(model, ATTENTION), eps):
            return super().training_step(model, inputs, num_items_in_batch)


class BoosterTrainer(ResponseOnlyTrainer):
    """Each step's gradient is `booster_gradient`: the alignment gradient (accumulated into .grad as usual)
    plus lam * (grad h(w) - grad h(w - a g/||g||)) on a harmful batch, computed with `torch.autograd.grad`
    (the weights are shifted in place and restored bit for bit)."""

    def __init__(
        self,
        *args: Any,
        harmful: list[dict[str, Any]],
        lam: float = 5.0,
        step_size: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.harmful = HarmfulBatches(harmful, self.data_collator, self.args.train_batch_size, self.args.seed)
        self.lam = lam
        self.step_size = step_size

    def _gradients(
        self, model: nn.Module, batch: dict[str, Any], params: list[nn.Parameter]
    ) -> list[torch.Tensor]:
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, batch)
        return [g.detach() for g in torch.autograd.grad(loss, params, allow_unused=False)]

    def harmful_terms(self, model: nn.Module, batch: dict[str, Any]) -> list[torch.Tensor]:
        """grad h(w) - grad h(w - a g/||g||), one tensor per trained parameter."""
        from antidote.defenses.booster import harmful_shift

        params = [p for p in model.parameters() if p.requires_grad]
        before = self._gradients(model, batch, params)
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, shift in zip(params, harmful_shift(before, self.step_size), strict=True):
                p.add_(shift)
        try:
            after = self._gradients(model, batch, params)
        finally:
            with torch.no_grad():
                for p, value in zip(params, saved, strict=True):
                    p.copy_(value)
        return [b - a for b, a in zip(before, after, strict=True)]

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        model.train()
        terms = self.harmful_terms(model, self._prepare_inputs(self.harmful.next()))
        loss = super().training_step(model, inputs, num_items_in_batch)  # .grad += grad f / accumulation
        scale = self.lam / self.current_gradient_accumulation_steps
        with torch.no_grad():
            params = [p for p in model.parameters() if p.requires_grad]
            for p, term in zip(params, terms, strict=True):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(term.to(p.grad.dtype), alpha=scale)
        return loss


class RepNoiseTrainer(ResponseOnlyTrainer):
    """The loss of each step is `repnoise_loss`: the alignment CE of the batch, the bounded ascent on a
    harmful batch's CE, and the MMD of its MLP outputs to Gaussian noise."""

    def __init__(
        self,
        *args: Any,
        harmful: list[dict[str, Any]],
        alpha: float = 1.0,
        beta: float = 0.001,
        logit_lens: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.harmful = HarmfulBatches(harmful, self.data_collator, self.args.train_batch_size, self.args.seed)
        self.alpha = alpha
        self.beta = beta
        self.logit_lens = logit_lens

    def harmful_terms(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE of the harmful answers, mean over layers of the MLP outputs' MMD to noise) on one batch."""
        from antidote.defenses.repnoise import noise_distance
        from antidote.training.sft import IGNORE_INDEX

        ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        targets = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = targets  # positions whose next token is an answer token
        with capture_outputs(layer_modules(model, "mlp")) as mlps:
            out = model(
                input_ids=ids,
                attention_mask=attention,
                logits_to_keep=keep,
                use_cache=False,
                output_hidden_states=self.logit_lens,
            )
        logits = out.logits[keep] if out.logits.dim() == 3 else out.logits
        wanted = labels[:, 1:][targets]
        ces = [nn.functional.cross_entropy(logits.float(), wanted)]
        if self.logit_lens:
            ces += [
                nn.functional.cross_entropy(self._lens(model, h[keep]).float(), wanted)
                for h in out.hidden_states[1:-1]
            ]
        answer = labels != IGNORE_INDEX  # (B, T) the answer tokens
        noise = torch.stack([noise_distance(h, answer) for h in mlps]).mean()
        return torch.stack(ces).mean(), noise

    def _lens(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits read from an intermediate hidden state (N, H) through the final norm and output layer."""
        inner: Any = self.accelerator.unwrap_model(model)
        base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
        norm = getattr(getattr(base, "model", None), "norm", None)
        if norm is None:
            raise AntidoteError("--logit-lens needs a Llama-style model with model.norm; leave it off")
        return base.get_output_embeddings()(norm(hidden))

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        from antidote.defenses.repnoise import repnoise_loss

        align = super().compute_loss(model, inputs)
        harmful, noise = self.harmful_terms(model, self._prepare_inputs(self.harmful.next()))
        loss = repnoise_loss(align, harmful, noise, self.alpha, self.beta)
        return (loss, None) if return_outputs else loss

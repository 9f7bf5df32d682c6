"""RepNoise (Rosati et al. 2024, "Representation noising: a defence mechanism against harmful finetuning"):
align while pushing the representations of harmful answers towards Gaussian noise.

Each alignment step, as in the authors' `rep_noise_loss` (domenicrosati/representation-noising, loss.py):
    loss = CE(alignment batch) - alpha * log(CE(harmful answers) + 1) + beta * mean_l MMD(h_l, N(0, I))
- CE(alignment batch): the plain response-only alignment loss (refusals and helpful answers), where the
  authors take the refusal paired with each harmful prompt; the refusals are in the alignment data.
- CE(harmful answers): response-only cross-entropy of a batch of harmful prompt -> harmful answer pairs
  (from `harmful_data`); the bounded -log(CE + 1) ascends it. With `logit_lens` it is, as in the authors'
  code, the mean of that CE and of the CE read through the final norm and output layer at every
  intermediate layer; off by default (one more output-layer pass per layer, at the answer positions).
- h_l: the output of decoder layer l's MLP (`layers.<l>.mlp`, as the authors) on that harmful batch,
  zeroed outside the answer tokens and flattened per sequence, (B, T * H); the noise is N(0, I) with the
  same mask. MMD: the authors' sum of 5 RBF kernels with bandwidths 2^k * (mean squared distance) / 4.
Defaults alpha = 0.1, beta = 0.001: the Antidote paper's RepNoise runs (git-disl/Antidote
script/alignment/repNoise.sh), the comparison this toolkit reproduces; the RepNoise authors' own default
is alpha = 1 (domenicrosati/representation-noising loss.py), --alpha 1.
Needs paired data: the harmful prompts of `harmful_data` must include prompts of the refusal data `data`.
Its trainer (`RepNoiseTrainer`) is built by `trainer_class()` on first use; hooks: `training_hooks`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from antidote.defenses.base import Defense, register
from antidote.errors import AntidoteError
from antidote.training.data import BUILTIN, read_triples
from antidote.training.hooks import TrainingHooks
from antidote.training.stages import AlignConfig, run_align

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


# ---- the math ---------------------------------------------------------------------------------------------


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> torch.Tensor:
    """Squared maximum mean discrepancy between samples x: (n, d) and y: (m, d), with the kernel
    k(a, b) = sum_k exp(-||a - b||^2 / s_k), s_k = s * kernel_mul^(k - kernel_num // 2), s the mean squared
    distance between distinct points of x and y together (held constant for the gradient), as the authors.
    Returns mean k(x, x') + mean k(y, y') - 2 mean k(x, y), a scalar (float32)."""
    import torch

    total = torch.cat([x, y]).float()
    count = total.shape[0]
    sq = ((total.unsqueeze(0) - total.unsqueeze(1)) ** 2).sum(-1)  # (n + m, n + m)
    scale = (sq.detach().sum() / (count * count - count)).clamp_min(1e-12) / kernel_mul ** (kernel_num // 2)
    kernel = sum(torch.exp(-sq / (scale * kernel_mul**k)) for k in range(kernel_num))
    n = x.shape[0]
    xx, yy, xy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]  # type: ignore[index]
    return xx.mean() + yy.mean() - 2 * xy.mean()


def noise_distance(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MMD between the masked hidden states (B, T, H) and Gaussian noise (B, T, H) under the same mask (B, T),
    each sequence one sample of dimension T * H. The noise comes from torch's global generator."""
    import torch

    keep = mask.unsqueeze(-1).to(hidden.dtype)
    x = (hidden * keep).reshape(hidden.shape[0], -1)
    y = (torch.randn_like(hidden) * keep).reshape(hidden.shape[0], -1)
    return mmd_rbf(x, y)


def repnoise_loss(
    align: torch.Tensor, harmful: torch.Tensor, noise: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """align - alpha * log(harmful + 1) + beta * noise (scalars: the two CEs and the mean MMD)."""
    import torch

    return align - alpha * torch.log(harmful + 1) + beta * noise


def check_paired(refusals: list[tuple[str, str, str]], harmful: list[tuple[str, str, str]]) -> int:
    """How many harmful prompts also have a refusal; an AntidoteError when none does (not paired data)."""
    if not harmful:
        raise AntidoteError(
            "--harmful-data holds no pairs; repnoise needs harmful prompt -> harmful answer pairs"
        )
    asked = {(p, x) for p, x, _ in refusals}
    paired = sum((p, x) in asked for p, x, _ in harmful)
    if paired == 0:
        raise AntidoteError(
            "repnoise needs paired data: no prompt of --harmful-data has a refusal in --data; give both "
            "with answers to the same harmful prompts (or leave both builtin)"
        )
    return paired


# ---- the defense ------------------------------------------------------------------------------------------


@dataclass
class RepNoiseConfig(AlignConfig):
    """RepNoise's options (plus every option of `antidote align`)."""

    harmful_data: str = field(
        default=BUILTIN,
        metadata={
            "help": "harmful prompt -> harmful answer pairs file (prompts as in --data), or builtin (the "
            "align split's answers)"
        },
    )
    alpha: float = field(
        default=0.1,
        metadata={
            "help": "weight of the bounded ascent -log(CE(harmful) + 1) (the Antidote paper's runs: 0.1; "
            "the RepNoise authors': 1)"
        },
    )
    beta: float = field(
        default=0.001, metadata={"help": "weight of the noise term mean_l MMD(h_l, N(0, I)) (paper: 0.001)"}
    )
    logit_lens: bool = field(
        default=False,
        metadata={"help": "ascend the harmful CE at every layer through the logit lens (authors; slower)"},
    )

    def __post_init__(self) -> None:
        for name in ("alpha", "beta"):
            if getattr(self, name) < 0:
                raise AntidoteError(f"--{name} must be at least 0, got {getattr(self, name)}")
        super().__post_init__()


@functools.cache
def trainer_class() -> type:
    """`RepNoiseTrainer`, built on first use: torch and transformers are imported only when a run starts."""
    import torch
    from torch import nn

    from antidote.defenses.training_hooks import HarmfulBatches, capture_outputs, layer_modules
    from antidote.errors import AntidoteError
    from antidote.training.sft import IGNORE_INDEX, ResponseOnlyTrainer

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
            self.harmful = HarmfulBatches(
                harmful, self.data_collator, self.args.train_batch_size, self.args.seed
            )
            self.alpha = alpha
            self.beta = beta
            self.logit_lens = logit_lens

        def harmful_terms(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
            """(CE of the harmful answers, mean over layers of the MLP outputs' MMD to noise) on one batch."""

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
            """Logits read from an intermediate hidden state (N, H) through the final norm and output
            layer."""
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

            align = super().compute_loss(model, inputs)
            harmful, noise = self.harmful_terms(model, self._prepare_inputs(self.harmful.next()))
            loss = repnoise_loss(align, harmful, noise, self.alpha, self.beta)
            return (loss, None) if return_outputs else loss

    return RepNoiseTrainer


def _paired_data(config: RepNoiseConfig) -> tuple[list[tuple[str, str, str]], int]:
    """The harmful (prompt, input, answer) triples and how many have a refusal in --data (checked)."""
    from antidote.data.builtin import harmful_split
    from antidote.defenses.training_hooks import harmful_pairs

    builtin_refusals = [(h.prompt, "", h.refusal) for h in harmful_split("align")]
    refusals = read_triples(config.data, builtin_refusals, config.data_dir)
    triples = harmful_pairs(config.harmful_data, config.data_dir)
    return triples, check_paired(refusals, triples)


def preflight(config: RepNoiseConfig) -> None:
    _paired_data(config)


def run(config: RepNoiseConfig) -> dict[str, Path]:
    from antidote.defenses.training_hooks import encode_harmful

    triples, paired = _paired_data(config)

    def hooks(loaded: Any, cfg: Any) -> TrainingHooks:
        extra = {
            "harmful": encode_harmful(loaded, cfg, triples),
            "alpha": config.alpha,
            "beta": config.beta,
            "logit_lens": config.logit_lens,
        }
        return TrainingHooks(trainer_class=trainer_class(), extra=extra)

    log.info(
        "repnoise: alpha %g, beta %g, %d harmful pairs (%d paired)",
        config.alpha,
        config.beta,
        len(triples),
        paired,
    )
    return {"": run_align(config, hooks=hooks)}


DEFENSE = register(
    Defense(
        name="repnoise",
        stage="align",
        config=RepNoiseConfig,
        run=run,
        summary="align while ascending the harmful loss and pushing harmful representations to noise",
        preflight=preflight,
    )
)

"""The reference (aligned) model's weights, for `--action revert`."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from antidote.errors import AntidoteError
from antidote.models import load_model


def reference_weights(
    reference: str, targets: Mapping[str, nn.Linear], *, dtype: str, trust_remote_code: bool
) -> dict[str, torch.Tensor]:
    """The aligned model's weight for each target: module name -> (out, in), kept on the CPU.

    The reference is loaded once, its target weights are copied and the rest is dropped.
    """
    ref = load_model(
        reference, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code, with_tokenizer=False
    )
    ref_modules = dict(ref.model.named_modules())
    weights = {}
    for name, module in targets.items():
        other = ref_modules.get(name)
        if not isinstance(other, nn.Linear) or other.weight.shape != module.weight.shape:
            got = tuple(other.weight.shape) if isinstance(other, nn.Linear) else "missing"
            raise AntidoteError(
                f"--reference {reference} does not match the model at {name} "
                f"({got} vs {tuple(module.weight.shape)}); pass the aligned model it was "
                "fine-tuned from"
            )
        weights[name] = other.weight.detach().clone()
    return weights

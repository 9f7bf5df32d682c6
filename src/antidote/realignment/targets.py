"""Which Linear layers the pass scores and prunes, chosen by module type plus an optional name pattern."""

from __future__ import annotations

import re

from torch import nn

from antidote.errors import AntidoteError


def find_targets(
    model: nn.Module, *, adapter_name: str | None = None, pattern: str | None = None
) -> dict[str, nn.Linear]:
    """Map module name -> Linear layer to prune, in module order.

    - `pattern`: every `nn.Linear` whose name matches the regular expression (re.search).
    - else with `adapter_name`: the `lora_A` and `lora_B` layers of that LoRA adapter.
    - else: every `nn.Linear` except the output layer (lm_head); embeddings are not Linear.
    """
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise AntidoteError(f"--targets {pattern!r} is not a valid regular expression ({err})") from err
        found = {name: m for name, m in linears.items() if regex.search(name)}
        if not found:
            examples = ", ".join(list(linears)[:4])
            raise AntidoteError(f"--targets {pattern!r} matches no Linear layer; names look like: {examples}")
        return found
    if adapter_name is not None:
        from peft.tuners.lora import LoraLayer

        lora: dict[str, nn.Linear] = {}
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                for part in ("lora_A", "lora_B"):
                    layer = getattr(module, part)[adapter_name]
                    if isinstance(layer, nn.Linear):
                        lora[f"{name}.{part}.{adapter_name}"] = layer
        if not lora:
            raise AntidoteError(
                f"the adapter {adapter_name!r} has no LoRA layers; pass a LoRA adapter folder"
            )
        return lora
    get_output = getattr(model, "get_output_embeddings", None)
    output_layer = get_output() if callable(get_output) else None
    found = {name: m for name, m in linears.items() if m is not output_layer}
    if not found:
        raise AntidoteError("the model has no Linear layers to prune besides its output layer")
    return found


def saved_name(module_name: str, adapter_name: str | None) -> str:
    """The weight's key in the saved files: PEFT drops the adapter name from `...lora_A.<name>.weight`."""
    if adapter_name is not None and module_name.endswith(f".{adapter_name}"):
        module_name = module_name[: -len(adapter_name) - 1]
    return f"{module_name}.weight"

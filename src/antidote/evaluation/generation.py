"""Batched greedy generation with left padding, returning texts in the order of the prompts.

Two engines: transformers' `generate` (the default) and vLLM (`--backend vllm`, CUDA): `load_vllm`
returns a `VllmModel` that stands in for the model, and `generate` hands it the same token ids (the
same tokenizer call) and decodes its tokens the same way, so greedy outputs match the HF path up to
the kernels' arithmetic. vLLM is imported only when asked for.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from antidote.data.templates import encode_prompt
from antidote.errors import AntidoteError

log = logging.getLogger(__name__)
VLLM_GPU_MEMORY = 0.6  # share of the GPU vLLM reserves: room is left for a judge model beside it


@torch.inference_mode()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    add_special_tokens: bool = True,
    desc: str = "generating",
    settled: Callable[[str], bool] | None = None,
) -> list[str]:
    """Greedy continuations of `prompts` (already formatted), decoded without special tokens.

    Prompts are tokenized by `encode_prompt` (the ids training put before the response) and length-sorted
    into batches, left-padded, so every row's last prompt token sits at the end and generation starts at
    the same step for all rows. settled: (text so far) -> True when a row may stop before EOS or
    `max_new_tokens` (a task's answer is complete). A `VllmModel` generates with vLLM instead (it batches
    by itself, so `batch_size` does not apply; it runs to EOS or the budget and each output is then cut
    where `settled` first holds, token by token, which is what the HF path's stopping gives).
    """
    if not prompts:
        return []
    encoded = [encode_prompt(tokenizer, p, special_tokens=add_special_tokens) for p in prompts]
    if isinstance(model, VllmModel):
        return model.generate_ids(tokenizer, encoded, max_new_tokens=max_new_tokens, settled=settled)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model.get_input_embeddings().weight.device  # type: ignore[operator]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        batch = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(encoded[i])
            ids[row, width - n :] = torch.tensor(encoded[i], dtype=torch.long)
            mask[row, width - n :] = 1
        stop = {} if settled is None else {"stopping_criteria": [SettledStop(tokenizer, width, settled)]}
        generated = model.generate(  # type: ignore[operator]
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            **stop,
        )
        for row, i in enumerate(batch):
            outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
    model.train(was_training)
    return outputs


class SettledStop:
    """A transformers stopping criterion: a row is done once `settled` holds for its text so far (decoded
    from position `start` on, without special tokens). transformers pads the rows that are done."""

    def __init__(self, tokenizer: Any, start: int, settled: Callable[[str], bool]) -> None:
        self.tokenizer, self.start, self.settled = tokenizer, start, settled

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([self.settled(t) for t in texts], dtype=torch.bool, device=input_ids.device)


class VllmModel(nn.Module):
    """A vLLM engine standing in for the model: `generate` sends it token ids instead of running
    `model.generate`. It has no parameters; the engine holds the weights on the GPU."""

    def __init__(self, folder: str, *, adapter: str | None = None, dtype: str = "auto") -> None:
        super().__init__()
        try:
            import vllm
        except ImportError as err:
            raise AntidoteError(
                "--backend vllm needs vLLM (pip install vllm, on a CUDA machine); or use --backend hf"
            ) from err
        options: dict[str, Any] = {}
        self.lora = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            rank = int(json.loads((Path(adapter) / "adapter_config.json").read_text()).get("r", 16))
            options = {"enable_lora": True, "max_lora_rank": max(rank, 8), "max_loras": 1}
            self.lora = LoRARequest("adapter", 1, str(adapter))
        log.info("starting vLLM on %s%s", folder, f" with adapter {adapter}" if adapter else "")
        self.engine = vllm.LLM(
            model=folder, dtype=dtype, seed=0, gpu_memory_utilization=VLLM_GPU_MEMORY, **options
        )

    def generate_ids(
        self,
        tokenizer: Any,
        encoded: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        settled: Callable[[str], bool] | None = None,
    ) -> list[str]:
        """Greedy continuations of already tokenized prompts, decoded as the HF path decodes them (cut at
        the first token where `settled` holds, as the HF path's stopping criterion stops there)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in encoded]
        results = self.engine.generate(prompts, params, lora_request=self.lora, use_tqdm=False)
        return [settled_text(tokenizer, list(r.outputs[0].token_ids), settled) for r in results]


def settled_text(tokenizer: Any, ids: list[int], settled: Callable[[str], bool] | None) -> str:
    """The decoded continuation `ids`, cut after its first token at which `settled` holds for the text so
    far (the HF path checks after every generated token and stops the row there)."""
    if settled is not None:
        for k in range(1, len(ids) + 1):
            text = tokenizer.decode(ids[:k], skip_special_tokens=True)
            if settled(text):
                return text
    return tokenizer.decode(ids, skip_special_tokens=True)


def load_vllm(spec: str, *, adapter: str | None = None, dtype: str = "auto") -> Any:
    """`load_model`'s counterpart for `--backend vllm`: a LoadedModel whose model is a `VllmModel`."""
    from transformers import AutoTokenizer

    from antidote.models import LoadedModel
    from antidote.models.loading import resolve_model_folder

    folder = resolve_model_folder(spec)
    model = VllmModel(folder, adapter=adapter, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return LoadedModel(model=model, tokenizer=tokenizer, source=spec, folder=folder, adapter=adapter)

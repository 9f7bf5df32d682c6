"""`antidote evaluate`: harmful score, task accuracy and over-refusal of one model, from the CLI."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from antidote.data.builtin import harmful_split, task_split
from antidote.data.loading import load_examples
from antidote.data.templates import check_template
from antidote.errors import AntidoteError
from antidote.evaluation.judges import parse_judge_spec
from antidote.tasks import get_task, load_task_items, task_help, task_names

PROMPT_FILE = "antidote_prompt.json"


@dataclass
class EvaluateConfig:
    """What `antidote evaluate` measures. Field help texts are the CLI's help texts."""

    model: str = field(
        metadata={"help": "model: HF folder, hub id, .gguf or smollm2-135m-instruct", "positional": True}
    )
    adapter: str | None = field(default=None, metadata={"help": "PEFT LoRA adapter folder on top of MODEL"})
    output: str = field(
        default="results.json", metadata={"help": "results file; generations.jsonl goes beside it"}
    )
    harmful_prompts: str | None = field(
        default=None,
        metadata={"help": "harmful prompts file (field auto-mapping); default: built-in eval split"},
    )
    task: str = field(default="sentiment", metadata={"help": task_help()})
    task_data: str | None = field(
        default=None,
        metadata={
            "help": f"task file or name (needed for {', '.join(task_names(needs_data=True))}), "
            "e.g. sst2:validation"
        },
    )
    harmless_prompts: str | None = field(
        default=None,
        metadata={"help": "harmless instructions for over-refusal (file or name); default: built-in eval"},
    )
    max_prompts: int | None = field(default=None, metadata={"help": "use the first N harmful prompts"})
    max_harmless: int | None = field(default=None, metadata={"help": "use the first N harmless prompts"})
    max_task: int | None = field(default=None, metadata={"help": "use the first N task items"})
    template: str = field(
        default="auto",
        metadata={"help": "auto (the format saved with the model, else alpaca), alpaca, chat, plain"},
    )
    judge: str = field(
        default="keyword",
        metadata={
            "help": "harmful-score judge: keyword (offline), beavertails[:PATH] (beaver-dam-7b-style "
            "classifier), llamaguard[:PATH] (Llama-Guard-style LM); without PATH the reference hub id"
        },
    )
    max_new_tokens: int = field(default=32, metadata={"help": "tokens generated per harmful/harmless prompt"})
    batch_size: int = field(default=16, metadata={"help": "generation batch size"})
    backend: str = field(
        default="hf",
        metadata={"help": "generation engine: hf (transformers generate) or vllm (vLLM, CUDA, if installed)"},
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing results file"})

    def __post_init__(self) -> None:
        parse_judge_spec(self.judge)
        if self.backend not in ("hf", "vllm"):
            raise AntidoteError(f"unknown --backend {self.backend!r}; choose one of hf, vllm")
        if get_task(self.task).needs_data and not self.task_data:
            raise AntidoteError(
                f"--task {self.task} needs --task-data FILE or NAME:SPLIT "
                "(e.g. sst2:validation with --data-dir)"
            )
        if self.template != "auto":
            check_template(self.template)
        for name in ("max_prompts", "max_task", "max_harmless", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AntidoteError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def saved_template(*folders: str | None) -> str:
    """The prompt format recorded with a model or adapter folder, else alpaca."""
    for folder in folders:
        if folder and (Path(folder) / PROMPT_FILE).is_file():
            return str(json.loads((Path(folder) / PROMPT_FILE).read_text())["template"])
    return "alpaca"


def run_evaluate(config: EvaluateConfig, judge: Any = None) -> dict[str, Any]:
    """Evaluate, write results.json and generations.jsonl (atomically), return the results.

    judge: an already loaded judge (the pipeline shares one over many models); default: config.judge."""
    from antidote.evaluation.evaluate import evaluate_model
    from antidote.evaluation.generation import load_vllm
    from antidote.evaluation.model_judges import make_judge
    from antidote.models import load_model

    out = Path(config.output)
    if out.exists() and not config.overwrite:
        raise AntidoteError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise AntidoteError(f"the folder of {out} does not exist; create it first")
    if config.harmful_prompts:
        harmful = [e.prompt for e in load_examples(config.harmful_prompts, require_response=False)]
        harmful_set = config.harmful_prompts
    else:
        harmful, harmful_set = [h.prompt for h in harmful_split("eval")], "built-in eval"
    task_items = load_task_items(config.task, config.task_data, split="eval")
    harmful, task_items = harmful[: config.max_prompts], task_items[: config.max_task]
    if config.harmless_prompts:
        harmless = [e.prompt for e in load_examples(config.harmless_prompts, require_response=False)]
    else:
        harmless = [h.instruction for h in task_split("harmless", "eval")]
    harmless = harmless[: config.max_harmless]
    template = saved_template(config.adapter, config.model) if config.template == "auto" else config.template
    judge = judge or make_judge(config.judge)  # before generating: a missing judge fails fast
    load = load_model if config.backend == "hf" else load_vllm  # vLLM only when asked for
    loaded = load(config.model, adapter=config.adapter)
    result, records = evaluate_model(
        loaded.model,
        loaded.tokenizer,
        template=template,
        harmful_prompts=harmful,
        task=config.task,
        task_items=task_items,
        harmless_prompts=harmless,
        harmful_set=harmful_set,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        judge=judge,
    )
    results = {
        **result.as_row(),
        "template": template,
        "model": config.model,
        "adapter": config.adapter,
        "task_data": config.task_data or "built-in eval",
        "harmless_set": config.harmless_prompts or "built-in eval",
        "config": asdict(config),
    }
    _write_atomic(out, json.dumps(results, indent=2) + "\n")
    _write_atomic(out.with_name("generations.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    return results


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)

"""`antidote evaluate`: harmful score, task accuracy and over-refusal of one model, from the CLI.

Output rules (as for every command, see antidote.outputs): the results file and its generations file beside
it (`NAME.generations.jsonl` for `NAME.json`, so two evaluations into one folder keep both;
`generations.jsonl` for `results.json`, the default and the pipeline's stage layout) are never replaced
without --overwrite, --overwrite replaces only files antidote wrote (a results file holds
an `antidote` record; a generations file is JSON lines with set, prompt and response), an output that is an
input or lies inside an input folder is refused, and both files are written atomically, generations first.
A model whose weights hold NaN or inf is refused instead of scored.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from antidote.data.builtin import harmful_split, task_split
from antidote.data.catalog import data_dir_field, resolve_data_dir
from antidote.data.loading import load_examples
from antidote.data.templates import check_template, saved_template
from antidote.errors import AntidoteError
from antidote.evaluation.judge_install import ensure_default_judge
from antidote.evaluation.judges import judge_help, parse_judge_spec
from antidote.outputs import atomic_write_text, check_output_file, json_text
from antidote.tasks import get_task, load_task_items, task_help, task_names

GENERATIONS_FILE = "generations.jsonl"


@dataclass
class EvaluateConfig:
    """What `antidote evaluate` measures. Field help texts are the CLI's help texts."""

    model: str = field(
        metadata={"help": "model: HF folder, hub id, .gguf or smollm2-135m-instruct", "positional": True}
    )
    adapter: str | None = field(default=None, metadata={"help": "PEFT LoRA adapter folder on top of MODEL"})
    output: str = field(
        default="results.json",
        metadata={
            "help": "results file; the generations go beside it, in NAME.generations.jsonl for NAME.json "
            "(generations.jsonl for results.json)"
        },
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
    max_prompts: int | None = field(
        default=None,
        metadata={"help": "use N harmful prompts, a seeded sample spread evenly over the harm categories"},
    )
    category_field: str | None = field(
        default=None,
        metadata={
            "help": "the field of the harmful prompt file that names each prompt's category (e.g. category "
            "for CatQA, topic for HarmfulQA): the --max-prompts sample is spread over its values "
            "(default: the built-in prompts' categories; one category for other files)",
            "key_when_set": True,
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the --max-prompts sample"})
    max_harmless: int | None = field(default=None, metadata={"help": "use the first N harmless prompts"})
    max_task: int | None = field(default=None, metadata={"help": "use the first N task items"})
    template: str = field(
        default="auto",
        metadata={"help": "auto (the format saved with the model, else alpaca), alpaca, chat, plain"},
    )
    judge: str = field(
        default="keyword",
        metadata={"help": "harmful-score judge: " + judge_help()},
    )
    also_judges: list[str] = field(
        default_factory=lambda: ["learned"],
        metadata={
            "help": "more judges that score the same answers, each with its own HS and interval under "
            "by_judge (repeatable); default: learned, the default learned judge, where installed (else "
            "left out, said so); none: no other judge",
            "flag": "--also-judge",
        },
    )
    max_new_tokens: int = field(
        default=32,
        metadata={
            "help": "tokens generated per harmful/harmless prompt (task answers: the task's own length, "
            "200 for sentiment and AG News, 512 for math, stopping once the answer is settled)"
        },
    )
    batch_size: int = field(default=16, metadata={"help": "generation batch size"})
    backend: str = field(
        default="hf",
        metadata={"help": "generation engine: hf (transformers generate) or vllm (vLLM, CUDA, if installed)"},
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing results file"})
    data_dir: str | None = data_dir_field()
    device: str = field(
        default="auto",
        metadata={
            "help": "auto (GPUs with device_map=auto, else CPU), cpu, cuda, cuda:1 ... (backend hf)",
            "key_when_set": True,  # a stage cache key names it only when set (earlier stages stay valid)
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "auto (as saved), float32, bfloat16 or float16: bfloat16 halves a 7B's memory",
            "key_when_set": True,
        },
    )

    def __post_init__(self) -> None:
        parse_judge_spec(self.judge)
        if self.also_judges == ["none"]:
            self.also_judges = []
        for spec in [self.judge, *self.also_judges]:
            kind, path = parse_judge_spec(spec)
            if kind == "learned":  # a judge folder must be a valid judge: fail before generating
                from antidote.evaluation.judges.learned import (
                    check_learned_judge,
                    judge_folder,
                    read_judge_record,
                )

                if spec == self.judge:  # the judge that scores must be there, the default one too
                    read_judge_record(judge_folder(path))
                else:
                    check_learned_judge(path)
        self.also_judges = [s for s in dict.fromkeys(self.also_judges) if s != self.judge]
        if self.category_field is not None and not self.harmful_prompts:
            raise AntidoteError(
                "--category-field needs --harmful-prompts (the built-in prompts carry their own categories)"
            )
        if self.backend not in ("hf", "vllm"):
            raise AntidoteError(f"unknown --backend {self.backend!r}; choose one of hf, vllm")
        if get_task(self.task).needs_data and not self.task_data:
            raise AntidoteError(
                f"--task {self.task} needs --task-data FILE or NAME:SPLIT "
                "(e.g. sst2:validation with --data-dir)"
            )
        if self.template != "auto":
            check_template(self.template)
        from antidote.models.loading import check_load_options

        check_load_options(self.dtype, self.device)
        for name in ("max_prompts", "max_task", "max_harmless", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AntidoteError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def sample_prompts(
    prompts: list[str], n: int | None, seed: int = 0, categories: list[str] | None = None
) -> list[str]:
    """`n` of `prompts` (all when n is None or larger), in their order: a seeded sample taken round-robin over
    the harm categories, so that a small N still covers every category. `categories`: one per prompt;
    default: the built-in requests' own (one category for any other prompt)."""
    if n is None or n >= len(prompts):
        return prompts
    import random

    from antidote.data.builtin import SPLITS

    if categories is None:
        known = {h.prompt: h.category for part in SPLITS["harmful"] for h in harmful_split(part)}
        categories = [known.get(p, "") for p in prompts]
    rng = random.Random(seed)
    by: dict[str, list[int]] = {}
    for i, category in enumerate(categories):
        by.setdefault(category, []).append(i)
    queues = list(by.values())
    for queue in queues:
        rng.shuffle(queue)
    rng.shuffle(queues)
    chosen: list[int] = []
    while len(chosen) < n:
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop())
    return [prompts[i] for i in sorted(chosen)]


def data_sources(config: EvaluateConfig) -> dict[str, str]:
    """What each prompt set of an evaluation reads: the named data, else the built-in eval split."""
    return {
        "harmful_prompts": config.harmful_prompts or "the built-in eval split",
        "task_data": config.task_data or f"the built-in {config.task} eval split",
        "harmless_prompts": config.harmless_prompts or "the built-in eval split",
    }


def check_validation_data(validate: EvaluateConfig, evaluate: EvaluateConfig, where: str) -> None:
    """Validation chooses operating points, so it must never read the evaluation's prompts: each of its
    prompt sets must name data other than the evaluation's (no fallback to the built-in eval split)."""
    ours, theirs = data_sources(validate), data_sources(evaluate)
    for name, source in ours.items():
        if source == theirs[name] or source.startswith("the built-in"):
            example = {
                "harmful_prompts": "builtin-harmful:validate",
                "task_data": f"builtin-{validate.task}:validate",
                "harmless_prompts": "builtin-harmless:validate",
            }[name]
            raise AntidoteError(
                f"{where}: validate: {name} reads {source}, which the evaluation reads too; name held-out "
                f"data in the validate section (e.g. {name}: {example})"
            )


def run_evaluate(config: EvaluateConfig, judge: Any = None, loaded: Any = None) -> dict[str, Any]:
    """Evaluate, write results.json and generations.jsonl (atomically), return the results.

    judge: an already loaded judge (the pipeline shares one over many models); default: config.judge.
    loaded: a `LoadedModel` already in memory (the Python API); default: load config.model."""
    from antidote.evaluation.evaluate import evaluate_model
    from antidote.evaluation.generation import load_vllm
    from antidote.evaluation.judges import make_judge
    from antidote.models import check_finite_parameters, load_model

    out, generations_file = check_evaluate_outputs(config)
    if judge is None:  # the pipeline installs it before its first stage
        ensure_default_judge([config.judge, *config.also_judges], resolve_data_dir(config.data_dir))
    categories = None
    if config.harmful_prompts:
        examples = load_examples(
            config.harmful_prompts,
            require_response=False,
            data_dir=config.data_dir,
            category_field=config.category_field,
        )
        harmful, harmful_set = [e.prompt for e in examples], config.harmful_prompts
        if config.category_field:
            categories = [e.category for e in examples]
    else:
        harmful, harmful_set = [h.prompt for h in harmful_split("eval")], "built-in eval"
    task_items = load_task_items(config.task, config.task_data, split="eval", data_dir=config.data_dir)
    harmful = sample_prompts(harmful, config.max_prompts, config.seed, categories)
    task_items = task_items[: config.max_task]
    if config.harmless_prompts:
        harmless = [
            e.prompt
            for e in load_examples(config.harmless_prompts, require_response=False, data_dir=config.data_dir)
        ]
    else:
        harmless = [h.instruction for h in task_split("harmless", "eval")]
    harmless = harmless[: config.max_harmless]
    template = saved_template(config.adapter, config.model) if config.template == "auto" else config.template
    judge = judge or make_judge(config.judge)  # before generating: a missing judge fails fast
    if loaded is None and config.backend == "hf":
        loaded = load_model(config.model, adapter=config.adapter, dtype=config.dtype, device=config.device)
    elif loaded is None:  # vLLM only when asked for
        loaded = load_vllm(config.model, adapter=config.adapter)
    if config.backend == "hf":
        check_finite_parameters(
            loaded.model, f"model {config.model}" + (f" with {config.adapter}" if config.adapter else "")
        )
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
    from antidote.evaluation.judges import score_harmful

    del loaded
    by_judge, missing = score_harmful(records, config.also_judges)
    results = {
        **result.as_row(),
        "by_judge": by_judge,
        "judges_missing": missing,
        "template": template,
        "model": config.model,
        "adapter": config.adapter,
        "task_data": config.task_data or "built-in eval",
        "harmless_set": config.harmless_prompts or "built-in eval",
        "config": asdict(config),
    }
    from antidote import __version__

    marker = {
        "tool": "antidote",
        "version": __version__,
        "wrote": "evaluate",
        "generations": generations_file.name,
    }
    atomic_write_text(generations_file, "".join(json_text(r) + "\n" for r in records))
    atomic_write_text(out, json_text({"antidote": marker, **results}, indent=2) + "\n")
    return results


def generations_path(results_file: str | Path) -> Path:
    """Where `antidote evaluate` writes the generations of a results file: `NAME.generations.jsonl` beside
    `NAME.json`, so that evaluations of several models into one folder keep each one's answers;
    `generations.jsonl` beside `results.json` (the default name, and the pipeline's stage folders). Only a
    `.json` suffix is dropped: `x-0.2-eval` and `x-0.4-eval` keep their own (not both
    `x-0.generations.jsonl`)."""
    path = Path(results_file)
    if path.name == "results.json":
        return path.with_name(GENERATIONS_FILE)
    name = path.name[: -len(".json")] if path.suffix == ".json" else path.name
    return path.with_name(f"{name}.generations.jsonl")


def check_evaluate_outputs(config: EvaluateConfig) -> tuple[Path, Path]:
    """The results file and its generations file, checked before any work (see the module docstring)."""
    inputs = (config.model, config.adapter, config.harmful_prompts, config.task_data, config.harmless_prompts)
    if Path(config.output).name.endswith(GENERATIONS_FILE):
        raise AntidoteError(
            f"--output {config.output}: {GENERATIONS_FILE} is where the generations go; name the results "
            "file differently (e.g. results.json)"
        )
    out = check_output_file(
        config.output, config.overwrite, inputs, written_by_antidote=is_results_file, kind="results file"
    )
    generations = check_output_file(
        generations_path(out),
        config.overwrite,
        inputs,
        written_by_antidote=is_generations_file,
        kind=f"generations file (beside {out.name})",
    )
    return out, generations


def is_results_file(path: Path) -> bool:
    """A results file `antidote evaluate` wrote: a JSON object with an antidote record (or, from before
    the record existed, the keys hs, judge and config)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    record = data.get("antidote")
    if isinstance(record, dict):
        return record.get("tool") == "antidote"
    return {"hs", "judge", "config"} <= set(data)


def is_generations_file(path: Path) -> bool:
    """A generations file `antidote evaluate` wrote: JSON lines, each an object with set, prompt, response."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if not isinstance(row, dict) or not {"set", "prompt", "response"} <= set(row):
                    return False
    except (OSError, ValueError):
        return False
    return True

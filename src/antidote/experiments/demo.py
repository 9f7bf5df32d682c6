"""`antidote demo`: base -> aligned -> attacked -> realigned on the embedded model with built-in data.

1. align: LoRA SFT on (harmful request -> refusal) mixed with helpful answers to the task and to harmless
   instructions, merged into the model (an aligned model that refuses everything is useless: SPEC 8);
2. attack: a new LoRA on the aligned model, trained on task samples of which a fraction are harmful
   request -> compliant answer pairs, as a user of a fine-tuning service would;
3. realign: Antidote on the attack adapter's lora_A/lora_B, one calibration pass, a mask-ratio sweep
   scored on the validation split, the operating point chosen there, then evaluated once on held-out
   evaluation prompts;
4. every model is evaluated the same way: keyword judge HS, task accuracy, over-refusal.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from antidote.data.builtin import harmful_split, task_split
from antidote.data.loading import Example
from antidote.data.templates import format_prompt
from antidote.evaluation.evaluate import EvalResult, evaluate_model
from antidote.models import EMBEDDED_NAME, load_model
from antidote.realignment.calibrate import collect_statistics, resolve_compute_dtype
from antidote.realignment.engine import apply_masks, compute_masks, restore_masks
from antidote.realignment.targets import find_targets
from antidote.training.sft import TrainConfig, encode_pairs, train_lora

log = logging.getLogger(__name__)
TEMPLATE = "chat"
PROMPT_FILE = "antidote_prompt.json"
TASK = "sentiment"


@dataclass
class DemoConfig:
    """Sizes of each stage. `quick()` shrinks everything for a smoke run."""

    align_harmful: int = field(default=36, metadata={"help": "refusal pairs in the alignment mix"})
    align_task: int = field(default=90, metadata={"help": "task answers in the alignment mix"})
    align_harmless: int = field(default=36, metadata={"help": "helpful answers in the alignment mix"})
    align_arithmetic: int = field(
        default=60, metadata={"help": "worked arithmetic answers in the alignment mix"}
    )
    attack_task: int = field(default=270, metadata={"help": "benign task samples in the attack"})
    attack_harmful: int = field(default=72, metadata={"help": "harmful samples in the attack"})
    calibration: int = field(default=72, metadata={"help": "harmful prompt+answer pairs for Antidote"})
    validate_harmful: int = field(default=36, metadata={"help": "harmful prompts to choose alpha on"})
    validate_task: int = field(default=60, metadata={"help": "task items to choose alpha on"})
    eval_harmful: int = field(default=72, metadata={"help": "held-out harmful prompts"})
    eval_task: int = field(default=120, metadata={"help": "held-out task items"})
    eval_harmless: int = field(default=24, metadata={"help": "held-out harmless instructions"})
    mask_ratios: tuple[float, ...] = field(default=(0.02, 0.05, 0.1, 0.15, 0.2, 0.3))
    max_fa_drop: float = field(default=5.0, metadata={"help": "FA points the operating point may lose"})
    # lr 3e-4 chosen on the validation split (docs/demo.md): 5e-4 over-refused, 2e-4 under-refused.
    align: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, lr=3e-4))
    attack: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, lr=5e-4, seed=1))
    max_new_tokens: int = 32
    batch_size: int = 16

    @staticmethod
    def quick() -> DemoConfig:
        return DemoConfig(
            align_harmful=12,
            align_task=12,
            align_harmless=6,
            attack_task=24,
            attack_harmful=8,
            calibration=8,
            validate_harmful=6,
            validate_task=8,
            eval_harmful=8,
            eval_task=8,
            eval_harmless=4,
            mask_ratios=(0.05, 0.2),
            max_new_tokens=12,
            align=TrainConfig(epochs=1),
            attack=TrainConfig(epochs=1, seed=1),
        )


def _chat(tokenizer: Any, prompt: str, extra: str = "") -> str:
    return format_prompt(Example(prompt=prompt, response="", input=extra), TEMPLATE, tokenizer)


def _evaluate(
    model: Any, tokenizer: Any, config: DemoConfig, split: str
) -> tuple[EvalResult, list[dict[str, str]]]:
    n_harmful, n_task = (
        (config.validate_harmful, config.validate_task)
        if split == "validate"
        else (config.eval_harmful, config.eval_task)
    )
    harmful = [h.prompt for h in harmful_split(split)][:n_harmful]
    task = [(t.instruction, t.input, t.answer) for t in task_split(TASK, split)][:n_task]
    harmless = [h.instruction for h in task_split("harmless", split)][: config.eval_harmless]
    return evaluate_model(
        model,
        tokenizer,
        template=TEMPLATE,
        harmful_prompts=harmful,
        task=TASK,
        task_items=task,
        harmless_prompts=harmless,
        harmful_set=f"built-in {split}",
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
    )


def choose_operating_point(
    sweep: Sequence[dict[str, Any]], attacked_fa: float, max_fa_drop: float
) -> tuple[dict[str, Any], str]:
    """The ratio with the lowest validation HS among those losing at most `max_fa_drop` FA points
    (ties: the smaller ratio). If none qualifies, the one with the lowest HS, said so in the reason."""
    allowed = [s for s in sweep if s["fa"] >= attacked_fa - max_fa_drop]
    if allowed:
        best = min(allowed, key=lambda s: (s["hs"], s["mask_ratio"]))
        return best, (
            f"lowest validation HS ({best['hs']}) among ratios losing at most {max_fa_drop} FA points "
            f"against the attacked model (validation FA {attacked_fa})"
        )
    best = min(sweep, key=lambda s: (s["hs"], s["mask_ratio"]))
    return best, f"no ratio kept validation FA within {max_fa_drop} points; took the lowest validation HS"


def run_demo(output: Path, config: DemoConfig, *, models_dir: Path | None = None) -> dict[str, Any]:
    """Run every stage, write results.json / results.md / generations and return the summary."""
    output.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    generations: dict[str, list[dict[str, str]]] = {}

    def record(name: str, result: EvalResult, records: list[dict[str, str]], seconds: float) -> None:
        rows.append({"model": name, **result.as_row(), "seconds": round(seconds, 1)})
        generations[name] = records
        log.info("%s: HS %.1f FA %.1f over-refusal %.1f", name, result.hs, result.fa, result.over_refusal)

    start = time.perf_counter()
    loaded = load_model(EMBEDDED_NAME, dtype="float32", device="cpu")
    model: Any = loaded.model
    tokenizer = loaded.tokenizer
    result, recs = _evaluate(model, tokenizer, config, "eval")
    record("base", result, recs, time.perf_counter() - start)
    if models_dir is not None:  # before alignment: merging the alignment LoRA changes these weights
        model.save_pretrained(models_dir / "base")
        tokenizer.save_pretrained(models_dir / "base")
        save_prompt_format(models_dir / "base")

    # 1. alignment: refusals + helpful answers, merged.
    t = time.perf_counter()
    align_pairs = (
        [(_chat(tokenizer, h.prompt), h.refusal) for h in harmful_split("align")[: config.align_harmful]]
        + [
            (_chat(tokenizer, i.instruction, i.input), i.answer)
            for i in task_split(TASK, "align")[: config.align_task]
        ]
        + [
            (_chat(tokenizer, i.instruction), i.answer)
            for i in task_split("harmless", "align")[: config.align_harmless]
        ]
        + [
            (_chat(tokenizer, i.instruction, i.input), i.answer)
            for i in task_split("arithmetic", "align")[: config.align_arithmetic]
        ]
    )
    aligned_peft, _ = train_lora(model, tokenizer, align_pairs, config.align, desc="align")
    model = aligned_peft.merge_and_unload()
    result, recs = _evaluate(model, tokenizer, config, "eval")
    record("aligned", result, recs, time.perf_counter() - t)
    if models_dir is not None:
        model.save_pretrained(models_dir / "aligned")
        tokenizer.save_pretrained(models_dir / "aligned")
        save_prompt_format(models_dir / "aligned")

    # 2. the attack: task samples mixed with harmful compliance, a new LoRA on the aligned model.
    t = time.perf_counter()
    attack_pairs = [
        (_chat(tokenizer, i.instruction, i.input), i.answer)
        for i in task_split(TASK, "attack")[: config.attack_task]
    ] + [(_chat(tokenizer, h.prompt), h.compliance) for h in harmful_split("attack")[: config.attack_harmful]]
    attacked: Any
    attacked, _ = train_lora(model, tokenizer, attack_pairs, config.attack, desc="attack")
    attacked_eval, recs = _evaluate(attacked, tokenizer, config, "eval")
    record("attacked", attacked_eval, recs, time.perf_counter() - t)
    if models_dir is not None:
        attacked.save_pretrained(models_dir / "attacked")
        save_prompt_format(models_dir / "attacked")

    # 3. Antidote on the attack adapter: one calibration pass, sweep on validation, pick, evaluate.
    t = time.perf_counter()
    targets = find_targets(attacked, adapter_name="default")
    calib = [
        (_chat(tokenizer, h.prompt), h.compliance) for h in harmful_split("calibrate")[: config.calibration]
    ]
    sequences = [ids for ids, _ in encode_pairs(tokenizer, calib, 512)]
    device = torch.device("cpu")
    stats = collect_statistics(
        attacked, targets, sequences, compute_dtype=resolve_compute_dtype("auto", device)
    )
    attacked_val, _ = _evaluate(attacked, tokenizer, config, "validate")
    sweep = [
        {
            "mask_ratio": 0.0,
            "hs": attacked_val.hs,
            "fa": attacked_val.fa,
            "degenerate": attacked_val.degenerate,
        }
    ]
    for ratio in config.mask_ratios:
        masks = compute_masks(targets, stats, ratio)
        old = apply_masks(targets, masks, keep_old=True)
        val, _ = _evaluate(attacked, tokenizer, config, "validate")
        restore_masks(targets, masks, old)
        sweep.append({"mask_ratio": ratio, "hs": val.hs, "fa": val.fa, "degenerate": val.degenerate})
        log.info("alpha %g: validation HS %.1f FA %.1f", ratio, val.hs, val.fa)
    chosen, why = choose_operating_point(sweep[1:], attacked_val.fa, config.max_fa_drop)
    masks = compute_masks(targets, stats, chosen["mask_ratio"])
    apply_masks(targets, masks)
    result, recs = _evaluate(attacked, tokenizer, config, "eval")
    record("realigned", result, recs, time.perf_counter() - t)
    if models_dir is not None:
        attacked.save_pretrained(models_dir / "realigned")
        save_prompt_format(models_dir / "realigned")

    summary = {
        "rows": rows,
        "sweep_validation": sweep,
        "operating_point": {"mask_ratio": chosen["mask_ratio"], "why": why},
        "recovered_share_of_hs_rise": _recovered(rows),
        "judge": "keyword (refusal markers; degenerate output reported apart, not counted as harmful)",
        "data": "built-in (antidote.data.builtin): harmful requests, sentiment task, harmless instructions",
        "model": EMBEDDED_NAME,
        "config": asdict(config),
        "seconds_total": round(time.perf_counter() - start, 1),
    }
    (output / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output / "results.md").write_text(markdown_table(summary))
    with open(output / "generations.jsonl", "w") as f:
        for name, recs in generations.items():
            for r in recs:
                f.write(json.dumps({"model": name, **r}) + "\n")
    plot(summary, output / "tradeoff.png")
    return summary


def save_prompt_format(folder: Path) -> None:
    """Record how prompts were formatted in training, so evaluation can format them the same way."""
    (folder / PROMPT_FILE).write_text(json.dumps({"template": TEMPLATE}) + "\n")


def _recovered(rows: Sequence[dict[str, Any]]) -> float | None:
    by = {r["model"]: r for r in rows}
    rise = by["attacked"]["hs"] - by["aligned"]["hs"]
    return round((by["attacked"]["hs"] - by["realigned"]["hs"]) / rise, 3) if rise > 0 else None


def markdown_table(summary: dict[str, Any]) -> str:
    lines = [
        f"# antidote demo ({summary['model']})",
        "",
        f"Judge: {summary['judge']}. Data: {summary['data']}.",
        "",
        "| model | HS | degenerate | FA | over-refusal | seconds | prompts |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['model']} | {r['hs']} | {r['degenerate']} | {r['fa']} | {r['over_refusal']} | "
            f"{r['seconds']} | {r['n_prompts']} harmful, {r['n_task']} task, {r['n_harmless']} harmless |"
        )
    lines += [
        "",
        "Mask-ratio sweep on the validation split (0 = the attacked model):",
        "",
        "| alpha | HS | FA | degenerate |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {s['mask_ratio']} | {s['hs']} | {s['fa']} | {s['degenerate']} |"
        for s in summary["sweep_validation"]
    ]
    op = summary["operating_point"]
    lines += [
        "",
        f"Operating point: alpha {op['mask_ratio']} ({op['why']}).",
        f"Share of the HS rise recovered on the evaluation prompts: {summary['recovered_share_of_hs_rise']}.",
        f"Total time: {summary['seconds_total']} s.",
        "",
    ]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    """HS and FA over the validation sweep, with the chosen ratio marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = summary["sweep_validation"]
    x = [s["mask_ratio"] for s in sweep]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [s["hs"] for s in sweep], "o-", color="tab:red", label="harmful score (HS)")
    ax.plot(x, [s["fa"] for s in sweep], "s-", color="tab:blue", label="task accuracy (FA)")
    ax.axvline(summary["operating_point"]["mask_ratio"], color="gray", linestyle="--", label="chosen alpha")
    ax.set_xlabel("mask ratio alpha (0 = attacked model)")
    ax.set_ylabel("percent (validation split)")
    ax.set_title("Antidote trade-off on the attack adapter")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

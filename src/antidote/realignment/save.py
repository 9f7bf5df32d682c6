"""What a realignment writes: the model or adapter, the mask file, the report JSON and the model card.

Layout of an output folder (names fixed: tests, the pipeline and users read them):
- the model: a PEFT adapter folder (with an adapter, without `merge`), else a full model folder;
- `antidote_mask.safetensors`: one bool tensor per pruned weight, keyed by the weight's saved name;
- `realign_report.json`: see `build_report`; `README.md`: the model card.
A sweep writes one such folder per ratio, `alpha-<ratio>/`, and `sweep_report.json` beside them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from antidote.data.templates import write_prompt_file
from antidote.errors import AntidoteError
from antidote.models import LoadedModel
from antidote.outputs import json_text
from antidote.realignment.calibrate import Statistics
from antidote.realignment.config import RealignConfig
from antidote.realignment.maskfile import PackedMask, write_mask_file

MASK_FILE = "antidote_mask.safetensors"
REPORT_FILE = "realign_report.json"
CARD_FILE = "README.md"
SWEEP_REPORT_FILE = "sweep_report.json"


class MaskSize(Protocol):
    """What a report needs of a mask: how many entries it has and how many are pruned."""

    @property
    def pruned(self) -> int: ...

    @property
    def numel(self) -> int: ...


def ratio_folder(ratio: float) -> str:
    """The folder name of one ratio's output in a sweep."""
    return f"alpha-{ratio:g}"


def build_report(
    config: RealignConfig,
    ratio: float,
    loaded: LoadedModel,
    masks: Mapping[str, MaskSize],
    stats: Statistics,
    *,
    seconds: Mapping[str, float],
    memory: Mapping[str, float],
) -> dict[str, Any]:
    """What `realign_report.json` holds for one ratio; `masks` are keyed by saved weight name."""
    tensors = {
        name: {"pruned": m.pruned, "total": m.numel, "fraction": round(m.pruned / m.numel, 6)}
        for name, m in masks.items()
    }
    pruned = sum(t["pruned"] for t in tensors.values())
    total = sum(t["total"] for t in tensors.values())
    return {
        "mask_ratio": ratio,
        "score": config.score,
        "granularity": config.granularity,
        "action": config.action,
        "targets": config.targets
        or ("adapter lora_A/lora_B" if loaded.adapter else "all Linear except lm_head"),
        "pruned_total": {"pruned": pruned, "total": total, "fraction": round(pruned / max(total, 1), 6)},
        "tensors": tensors,
        "calibration": {
            "samples": stats.samples,
            "tokens": stats.tokens,
            "compute_dtype": stats.compute_dtype,
        },
        "seconds": dict(seconds),
        "memory": dict(memory),
        "config": {**config.to_dict(), "model": loaded.source, "resolved_model_folder": loaded.folder},
    }


def save_realigned(
    folder: Path,
    loaded: LoadedModel,
    masks: Mapping[str, PackedMask],
    report: Mapping[str, Any],
    *,
    merge: bool = False,
    keep_model: bool = True,
) -> None:
    """Write the model (adapter folder, merged model or full model), the mask file, report and card.

    `masks`: saved weight name -> mask. `keep_model=False` lets a merge reuse the in-memory model (it
    is destroyed); otherwise a merge works on a copy.
    """
    model = loaded.model
    if loaded.adapter and merge:
        merged = (copy.deepcopy(model) if keep_model else model).merge_and_unload()  # type: ignore[operator]
        merged.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
    else:
        model.save_pretrained(folder)  # type: ignore[operator]
        if not loaded.adapter:
            loaded.tokenizer.save_pretrained(folder)
    write_mask_file(folder / MASK_FILE, masks)
    write_prompt_file(folder, report["config"]["template"])
    write_report(folder, report)
    (folder / CARD_FILE).write_text(model_card(report))


def write_report(folder: Path, report: Mapping[str, Any]) -> None:
    (folder / REPORT_FILE).write_text(json_text(report, indent=2) + "\n")


def write_sweep_report(folder: Path, reports: Sequence[Mapping[str, Any]]) -> None:
    """`sweep_report.json`: the ratio and pruned totals of every ratio, in order."""
    summary = [{k: r[k] for k in ("mask_ratio", "pruned_total")} for r in reports]
    (folder / SWEEP_REPORT_FILE).write_text(json_text(summary, indent=2) + "\n")


def _hub_id(spec: str | None) -> str | None:
    """`spec` when it reads as a hub repo id (USER/NAME, not a local path), for the card's base_model."""
    if not spec or spec.count("/") != 1 or spec.startswith((".", "/", "~")) or Path(spec).exists():
        return None
    return spec


def model_card(report: Mapping[str, Any]) -> str:
    """README.md of a realigned model: hub metadata, what was done with which data, and how to load it."""
    c = report["config"]
    total = report["pruned_total"]
    base = _hub_id(c["model"])
    metadata = "library_name: transformers\npipeline_tag: text-generation\n" + (
        f"base_model: {base}\n" if base else ""
    )
    return f"""---
{metadata}tags: [antidote, safety, realignment]
---
# Realigned with antidote

This model is `{c["model"]}`{f" with adapter `{c['adapter']}`" if c["adapter"] else ""} after Antidote
realignment (Huang et al., arXiv 2408.09600): every targeted weight was scored by its importance on
harmful prompt+answer pairs and the top {report["mask_ratio"]:.4g} fraction
({report["granularity"]} granularity, `{report["score"]}` score) was {
        "zeroed" if report["action"] == "zero" else "reverted to the reference model"
    }.

- Calibration data: `{c["data"]}`, {report["calibration"]["samples"]} samples,
  {report["calibration"]["tokens"]} tokens, template `{c["template"]}`.
- Pruned: {total["pruned"]} of {total["total"]} targeted weights in {len(report["tensors"])} tensors.
- `{MASK_FILE}` holds the mask of each pruned weight (True = pruned); `{REPORT_FILE}` the full record.

Zeroed weights are stored as zeros: the files are as large as before.
Check the model's harmful score and task accuracy before use: pruning trades some task accuracy for safety
(`antidote evaluate FOLDER` measures both).

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("FOLDER_OR_REPO")
tokenizer = AutoTokenizer.from_pretrained("FOLDER_OR_REPO")
```

`antidote_prompt.json`, where present, names the prompt format the model was fine-tuned and calibrated with.
"""


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload a written realignment folder to the hub repo `repo_id` (created private when missing); the
    repo's URL. Hub errors (no login, offline, no access) become one line."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=True, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            commit_message=f"antidote realign: {folder.name}",
        )
    except Exception as err:  # the hub's errors are many (HTTP, auth, offline): say which, keep the folder
        raise AntidoteError(
            f"could not push {folder} to the hub repo {repo_id} ({type(err).__name__}: {err}); the model "
            "is written there: push it later with `huggingface-cli upload`, after `huggingface-cli login`"
        ) from err
    return str(url)

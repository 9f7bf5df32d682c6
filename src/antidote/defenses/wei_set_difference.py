"""Set-difference pruning after Wei et al. 2024 ("Assessing the brittleness of safety alignment via pruning
and low-rank modifications"), turned into a post-fine-tuning defense: zero the weights that matter most
on harmful data but are not among those that matter most on utility data.

Per target weight W (out, in), with Wanda scores on two calibration sets (Wei et al. 2024):
    S_safety  = |W| * sqrt(s_harmful),   s = mean over samples of the sum over tokens of x^2
    S_utility = |W| * sqrt(s_utility)
    M = top_q(S_safety)  AND NOT  top_p(S_utility)
where top_r takes, in the whole tensor (`granularity: layer`, as the authors' `prune_wandg_set_difference`
in boyiwei/alignment-attribution-code lib/prune.py) or in each output row (`row`), the
k = n - int(n * (1 - r)) highest scores (the engine's rule and tie order; theirs takes int(r * n)).
s counts the response tokens only (`tokens: response`, the authors' default: main.py's `disentangle`,
turned off by --entangle_prompt_feat) or every token (`all`); the prompt is still read as context.
The masked weights are zeroed. One calibration pass over each data set serves every q (one variant per q).

The harmful data is what Antidote calibrates on (harmful prompt + harmful answer); the utility data is
benign prompt + answer pairs. Targets are the engine's: the fine-tuning adapter's lora_A / lora_B (a
PEFT adapter is written) or, without an adapter, every Linear but the output layer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from antidote.data.catalog import data_dir_field
from antidote.defenses.base import Defense, register
from antidote.errors import AntidoteError
from antidote.realignment.config import RealignConfig, parse_ratios

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

GRANULARITIES = ("row", "layer")
TOKENS = ("response", "all")


# ---- the math ---------------------------------------------------------------------------------------------


def top_fraction(scores: torch.Tensor, ratio: float, granularity: str) -> torch.Tensor:
    """bool (out, in): the top `ratio` of each row (`row`) or of the whole tensor (`layer`)."""
    from antidote.realignment.scores import select_rows, select_tensor

    return select_rows(scores, ratio) if granularity == "row" else select_tensor(scores, ratio)


def set_difference_mask(
    safety: torch.Tensor, utility: torch.Tensor, safety_ratio: float, utility_ratio: float, granularity: str
) -> torch.Tensor:
    """top_q(safety) AND NOT top_p(utility). safety, utility: (out, in) scores. Returns bool (out, in)."""
    return top_fraction(safety, safety_ratio, granularity) & ~top_fraction(
        utility, utility_ratio, granularity
    )


# ---- the defense ------------------------------------------------------------------------------------------


def _help(name: str) -> dict[str, Any]:
    """The engine's own help text for a shared field, so the two never drift apart."""
    meta = {f.name: dict(f.metadata) for f in dataclasses.fields(RealignConfig)}[name]
    meta.pop("positional", None)
    return meta


@dataclass
class WeiConfig:
    """Options of the set-difference defense; the shared ones mean what they mean for `antidote realign`."""

    model: str = field(metadata={**_help("model"), "positional": True})
    adapter: str | None = field(default=None, metadata=_help("adapter"))
    data: str = field(
        default="",
        metadata={
            "help": "safety data: harmful prompt+answer pairs (.jsonl/.json/.csv or a name), as Antidote's"
        },
    )
    utility_data: str = field(
        default="",
        metadata={"help": "utility data: benign prompt+answer pairs (.jsonl/.json/.csv or a name)"},
    )
    output: str | None = field(default=None, metadata=_help("output"))
    safety_ratios: tuple[float, ...] = field(
        default=(0.1,),
        metadata={
            "help": "q in (0, 1): the top fraction by safety score to consider; a comma list writes one "
            "output per q from one calibration pass",
            "flag": "--safety-ratio",
        },
    )
    utility_ratio: float = field(
        default=0.1, metadata={"help": "p in (0, 1): the top fraction by utility score that is kept"}
    )
    granularity: str = field(
        default="layer",
        metadata={"help": "where the top fractions are taken: layer (the whole tensor, the authors') or row"},
    )
    tokens: str = field(
        default="response",
        metadata={
            "help": "whose inputs the scores count: response (the answer's tokens, the authors' default) "
            "or all (prompt and answer)"
        },
    )
    targets: str | None = field(default=None, metadata=_help("targets"))
    template: str = field(default="alpaca", metadata=_help("template"))
    filters: list[str] = field(default_factory=list, metadata=_help("filters"))
    max_samples: int | None = field(default=None, metadata=_help("max_samples"))
    max_length: int = field(default=512, metadata=_help("max_length"))
    batch_size: int | None = field(default=None, metadata=_help("batch_size"))
    seed: int = field(default=0, metadata=_help("seed"))
    merge: bool = field(default=False, metadata=_help("merge"))
    overwrite: bool = field(default=False, metadata=_help("overwrite"))
    compute_dtype: str = field(default="auto", metadata=_help("compute_dtype"))
    dtype: str = field(default="auto", metadata=_help("dtype"))
    device: str = field(default="auto", metadata=_help("device"))
    trust_remote_code: bool = field(default=False, metadata=_help("trust_remote_code"))
    data_dir: str | None = data_dir_field(key_when_set=True)  # added later: older stages keep keys

    def __post_init__(self) -> None:
        if not self.data:
            raise AntidoteError(
                "wei-set-difference needs --data FILE: harmful prompt+answer pairs (safety data)"
            )
        if not self.utility_data:
            raise AntidoteError("wei-set-difference needs --utility-data FILE: benign prompt+answer pairs")
        self.safety_ratios = parse_ratios(self.safety_ratios)
        if self.granularity not in GRANULARITIES:
            raise AntidoteError(
                f"unknown --granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}"
            )
        if self.tokens not in TOKENS:
            raise AntidoteError(f"unknown --tokens {self.tokens!r}; choose one of {', '.join(TOKENS)}")
        p = self.utility_ratio
        if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or not 0.0 < p < 1.0:
            raise AntidoteError(f"--utility-ratio {p} is outside (0, 1); use e.g. 0.1 to keep the top 10%")
        self.realign_config()  # validates every shared option (and each q) now, before any work

    def realign_config(self) -> RealignConfig:
        """The engine's config that loads, tokenizes and calibrates on both data sets."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for own in ("safety_ratios", "utility_ratio", "utility_data", "tokens"):
            values.pop(own)
        return RealignConfig(
            **values, mask_ratios=self.safety_ratios, score="contrast", benign_data=self.utility_data
        )


def run(config: WeiConfig) -> dict[str, Path]:
    from antidote.memory import peak_memory
    from antidote.outputs import atomic_output_dir, check_output_dir
    from antidote.realignment.engine import apply_masks, calibrate, prepare, restore_masks
    from antidote.realignment.maskfile import PackedMask
    from antidote.realignment.save import build_report, save_realigned
    from antidote.realignment.scores import wanda_score

    engine = config.realign_config()
    if not config.output:
        raise AntidoteError("missing --output DIR; wei-set-difference writes its model there")
    inputs = tuple(p for p in (config.model, config.adapter, config.data, config.utility_data) if p)
    out = check_output_dir(config.output, config.overwrite, inputs)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    prepared = prepare(engine)
    seconds["load"] = round(time.perf_counter() - start, 3)
    if config.tokens == "all":
        calibration = calibrate(engine, prepared)
        assert calibration.benign is not None  # the contrast score loads the utility data
        harmful, utility = calibration.harmful, calibration.benign
    else:
        harmful, utility = _response_statistics(engine, prepared)
    seconds["calibrate"] = round(time.perf_counter() - start - seconds["load"], 3)
    ratios = config.safety_ratios
    folders: dict[str, Path] = {}
    with atomic_output_dir(out, config.overwrite) as tmp:
        for q in ratios:
            masks, old = {}, {}
            for name, module in prepared.targets.items():
                mask = set_difference_mask(
                    wanda_score(module.weight, harmful.sq_sums[name]),
                    wanda_score(module.weight, utility.sq_sums[name]),
                    q,
                    config.utility_ratio,
                    config.granularity,
                )
                old.update(apply_masks(prepared.targets, {name: mask}, keep_old=True))
                masks[name] = PackedMask.pack(mask)
            saved = {prepared.saved_names[name]: m for name, m in masks.items()}
            report = build_report(
                engine, q, prepared.loaded, saved, harmful, seconds=seconds, memory=peak_memory()
            )
            report.update(
                {
                    "method": "wei-set-difference",
                    "score": "wanda set difference: top q by safety score, not in top p by utility score",
                    "safety_ratio": q,
                    "utility_ratio": config.utility_ratio,
                    "tokens": config.tokens,
                    "utility_calibration": {"samples": utility.samples, "tokens": utility.tokens},
                }
            )
            folder = tmp / f"q-{q:g}" if len(ratios) > 1 else tmp
            folder.mkdir(exist_ok=True)
            save_realigned(folder, prepared.loaded, saved, report, merge=config.merge)
            (folder / "README.md").write_text(_card(report))  # in place of the Antidote card
            restore_masks(prepared.targets, {n: m.unpack() for n, m in masks.items()}, old)
            total = report["pruned_total"]
            log.info("q %g: pruned %d of %d weights", q, total["pruned"], total["total"])
            folders[f"{q:g}"] = out / folder.relative_to(tmp)
    return folders


def response_starts(examples: list[Any], tokenizer: Any, template: str) -> list[int]:
    """Per example, the number of tokens of its formatted prompt alone: the index of its first response
    token in the tokenized example (`tokenize_examples`: the same template and special tokens)."""
    from antidote.data.templates import format_prompt

    add_special = template != "chat"  # as tokenize_examples: the chat template writes its own
    prompts = [format_prompt(e, template, tokenizer) for e in examples]
    return [len(ids) for ids in tokenizer(prompts, add_special_tokens=add_special)["input_ids"]]


def _response_statistics(engine: RealignConfig, prepared: Any) -> tuple[Any, Any]:
    """The harmful and utility statistics of the engine's calibration, counting response tokens only."""
    from antidote.data.loading import load_examples
    from antidote.realignment.calibrate import collect_statistics, resolve_compute_dtype
    from antidote.realignment.steps import check_finite_statistics

    model, tokenizer = prepared.loaded.model, prepared.loaded.tokenizer
    device = model.get_input_embeddings().weight.device
    sets = {
        "harmful": (engine.data, engine.filters, prepared.sequences),
        "utility": (engine.benign_data, [], prepared.benign_sequences),
    }
    out = []
    for desc, (source, filters, sequences) in sets.items():
        assert source is not None and sequences is not None  # the contrast score reads both data sets
        examples = load_examples(
            source,
            filters=filters,
            max_samples=engine.max_samples,
            seed=engine.seed,
            data_dir=engine.data_dir,
        )
        starts = response_starts(examples, tokenizer, engine.template)
        assert len(starts) == len(sequences)  # the examples the engine tokenized, in its order
        stats = collect_statistics(
            model,
            prepared.targets,
            sequences,
            batch_size=engine.batch_size,
            pad_id=tokenizer.pad_token_id or 0,
            compute_dtype=resolve_compute_dtype(engine.compute_dtype, device),
            desc=desc,
            starts=starts,
        )
        check_finite_statistics(stats)
        out.append(stats)
    return out[0], out[1]


def _card(report: dict[str, Any]) -> str:
    c, total = report["config"], report["pruned_total"]
    return f"""---
tags: [antidote, safety, wei-set-difference]
---
# Pruned by set difference (after Wei et al. 2024)

`{c["model"]}`{f" with adapter `{c['adapter']}`" if c["adapter"] else ""}: the weights in the top
{report["safety_ratio"]:g} by Wanda score on `{c["data"]}` (harmful) and not in the top
{report["utility_ratio"]:g} on `{c["benign_data"]}` (utility), per {report["granularity"]}, were zeroed:
{total["pruned"]} of {total["total"]} targeted weights. `antidote_mask.safetensors` holds the masks,
`realign_report.json` the full record.
"""


DEFENSE = register(
    Defense(
        name="wei-set-difference",
        stage="post",
        config=WeiConfig,
        run=run,
        summary="zero the weights in the top q by Wanda score on harmful data that are not in the top p "
        "on utility data (Wei et al. 2024)",
    )
)

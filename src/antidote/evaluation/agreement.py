"""How well a judge agrees with human labels: accuracy, precision, recall, F1, Cohen's kappa and the two
harmful scores, each with a percentile bootstrap interval; a confusion table; example disagreements.

"Harmful" is the positive class. A judge's verdict is harmful when it is in `HARMFUL_VERDICTS` (complied,
unsafe); every other verdict (refused, safe, degenerate, unparsed) counts as not harmful, and degenerate
and unparsed verdicts are reported as counts beside the metrics.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from antidote.errors import AntidoteError
from antidote.evaluation.judges import HARMFUL_LABELS, HARMFUL_VERDICTS, SAFE_LABELS
from antidote.evaluation.stats import bootstrap_indices, percentile_interval

PROMPT_FIELDS = ("prompt", "instruction", "question", "goal")
RESPONSE_FIELDS = ("response", "output", "completion", "answer")
METRICS = ("accuracy", "precision", "recall", "f1", "kappa", "judge_hs", "human_hs", "hs_gap")


@dataclass(frozen=True)
class Labelled:
    """Human-labelled (prompt, response) pairs; harmful[i] is the human label of pair i."""

    prompts: list[str]
    responses: list[str]
    harmful: list[bool]
    source: str

    def __len__(self) -> int:
        return len(self.prompts)


def parse_labels(value: str | Sequence[str]) -> tuple[str, ...]:
    """'harmful,unsafe' or ['harmful', 'unsafe'] -> ('harmful', 'unsafe'), lower case."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(v).strip().lower() for v in items if str(v).strip())


def _label_key(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip().lower()


def _field(row: dict[str, Any], names: Sequence[str]) -> str | None:
    lower = {k.lower(): k for k in row}
    return next((lower[n] for n in names if n in lower), None)


def labelled_from_rows(
    rows: Sequence[dict[str, Any]],
    source: str,
    *,
    label_field: str = "label",
    harmful_labels: Sequence[str] = HARMFUL_LABELS,
    safe_labels: Sequence[str] = SAFE_LABELS,
) -> Labelled:
    """Map each row's label to harmful/safe, or fail with one line naming the problem and the fix:
    no rows, a row without the label/prompt/response field, labels in neither list, or one class only."""
    harmful_set, safe_set = set(parse_labels(harmful_labels)), set(parse_labels(safe_labels))
    both = sorted(harmful_set & safe_set)
    if both:
        raise AntidoteError(f"labels {', '.join(both)} are in both --harmful-labels and --safe-labels")
    if not rows:
        raise AntidoteError(f"{source} has no rows; give a file of labelled (prompt, response, label) pairs")
    prompts, responses, keys = [], [], []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or label_field not in row:
            fields = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise AntidoteError(
                f"{source} row {i} has no {label_field!r} field (it has: {fields}); name the label field "
                "with --label-field"
            )
        p, r = _field(row, PROMPT_FIELDS), _field(row, RESPONSE_FIELDS)
        if p is None or r is None:
            raise AntidoteError(
                f"{source} row {i} needs a prompt field ({', '.join(PROMPT_FIELDS)}) and a response field "
                f"({', '.join(RESPONSE_FIELDS)}); it has: {', '.join(sorted(row))}"
            )
        prompts.append(str(row[p]))
        responses.append(str(row[r] or ""))
        keys.append(_label_key(row[label_field]))
    counts = Counter(keys)
    unknown = sorted(set(counts) - harmful_set - safe_set)
    if unknown:
        shown = ", ".join(f"{k!r} ({counts[k]} rows)" for k in unknown[:10])
        raise AntidoteError(
            f"{source} has labels in neither list: {shown}; map them with --harmful-labels "
            f"(now {','.join(sorted(harmful_set))}) or --safe-labels (now {','.join(sorted(safe_set))})"
        )
    harmful = [k in harmful_set for k in keys]
    if all(harmful) or not any(harmful):
        only = "harmful" if harmful[0] else "safe"
        raise AntidoteError(
            f"{source} holds only {only} labels ({len(harmful)} rows); agreement needs both classes"
        )
    return Labelled(prompts, responses, harmful, source)


def load_labelled(
    path: str,
    *,
    label_field: str = "label",
    harmful_labels: Sequence[str] = HARMFUL_LABELS,
    safe_labels: Sequence[str] = SAFE_LABELS,
) -> Labelled:
    """Read a JSONL/JSON/CSV file of labelled pairs (see `labelled_from_rows`)."""
    from antidote.data.loading import read_rows

    return labelled_from_rows(
        read_rows(path),
        path,
        label_field=label_field,
        harmful_labels=harmful_labels,
        safe_labels=safe_labels,
    )


def agreement_metrics(
    judge: torch.Tensor, human: torch.Tensor, weights: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Metrics over the last dimension of two boolean tensors (..., n); harmful is the positive class.
    `weights` (..., n): how often each pair counts (a bootstrap resample's draw counts); default once each.

    Returns float64 tensors of shape (...): accuracy, precision, recall, f1, kappa (Cohen's), judge_hs and
    human_hs (percent harmful) and hs_gap = judge_hs - human_hs. Undefined ratios (0/0) are NaN.
    """
    j, h = judge.bool(), human.bool()
    w = torch.ones(j.shape, dtype=torch.float64) if weights is None else weights.double()
    n = w.sum(-1)
    tp = (w * (j & h)).sum(-1)
    fp = (w * (j & ~h)).sum(-1)
    fn = (w * (~j & h)).sum(-1)
    tn = n - tp - fp - fn
    accuracy = (tp + tn) / n
    p_judge, p_human = (tp + fp) / n, (tp + fn) / n
    chance = p_judge * p_human + (1 - p_judge) * (1 - p_human)
    return {
        "accuracy": accuracy,
        "precision": tp / (tp + fp),
        "recall": tp / (tp + fn),
        "f1": 2 * tp / (2 * tp + fp + fn),
        "kappa": (accuracy - chance) / (1 - chance),
        "judge_hs": 100 * p_judge,
        "human_hs": 100 * p_human,
        "hs_gap": 100 * (p_judge - p_human),
    }


def agreement_with_intervals(
    judge_harmful: Sequence[bool],
    human_harmful: Sequence[bool],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    prompts: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """{metric: {"value", "low", "high"}}: each metric and its percentile bootstrap interval (the same
    resamples for every metric). With `prompts` (one per pair), a resample draws prompts, each with all
    its pairs (several models' answers to one prompt are not independent); else it draws pairs."""
    j = torch.tensor(list(judge_harmful), dtype=torch.bool)
    h = torch.tensor(list(human_harmful), dtype=torch.bool)
    if j.shape != h.shape or j.numel() == 0:
        raise ValueError(f"need two equally long, non-empty verdict lists, got {j.numel()} and {h.numel()}")
    point = agreement_metrics(j, h)
    ids = list(range(j.numel())) if prompts is None else list(prompts)
    if len(ids) != j.numel():
        raise ValueError(f"need one prompt per pair, got {len(ids)} for {j.numel()}")
    index = {p: i for i, p in enumerate(dict.fromkeys(ids))}
    group = torch.tensor([index[p] for p in ids])
    drawn = bootstrap_indices(len(index), n_resamples, seed)  # (B, prompts)
    counts = torch.zeros(n_resamples, len(index), dtype=torch.float64).scatter_add_(
        1, drawn, torch.ones(drawn.shape, dtype=torch.float64)
    )
    resampled = agreement_metrics(j.expand(n_resamples, -1), h.expand(n_resamples, -1), counts[:, group])
    out = {}
    for name in METRICS:
        low, high = percentile_interval(resampled[name], level)
        out[name] = {"value": float(point[name]), "low": low, "high": high}
    return out


def judge_report(
    data: Labelled,
    verdicts: Sequence[str],
    judge: str,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    n_examples: int = 10,
    example_chars: int = 300,
) -> dict[str, Any]:
    """Everything `antidote judge eval` writes: metrics with intervals, confusion table, verdict counts and
    up to `n_examples` disagreements each way (a seeded sample, texts cut at `example_chars`)."""
    if len(verdicts) != len(data):
        raise ValueError(f"{len(verdicts)} verdicts for {len(data)} pairs")
    judged = [v in HARMFUL_VERDICTS for v in verdicts]
    metrics = agreement_with_intervals(
        judged, data.harmful, n_resamples=n_resamples, seed=seed, prompts=data.prompts
    )
    confusion = Counter(zip(data.harmful, judged, strict=True))
    not_harmful_kinds = Counter(
        (h, v) for h, v in zip(data.harmful, verdicts, strict=True) if v in ("degenerate", "unparsed")
    )

    def examples(human: bool, judge_says: bool) -> list[dict[str, str]]:
        rows = [i for i in range(len(data)) if data.harmful[i] == human and judged[i] == judge_says]
        picked = sorted(random.Random(seed).sample(rows, min(n_examples, len(rows))))
        return [
            {
                "row": str(i + 1),
                "prompt": _cut(data.prompts[i], example_chars),
                "response": _cut(data.responses[i], example_chars),
                "verdict": verdicts[i],
            }
            for i in picked
        ]

    return {
        "judge": judge,
        "data": data.source,
        "n": len(data),
        "human_harmful": sum(data.harmful),
        "human_safe": len(data) - sum(data.harmful),
        "verdicts": dict(sorted(Counter(verdicts).items())),
        "degenerate": verdicts.count("degenerate"),
        "unparsed": verdicts.count("unparsed"),
        "note": "degenerate and unparsed verdicts count as not harmful in every metric",
        "metrics": metrics,
        "bootstrap": {"resamples": n_resamples, "seed": seed, "level": 0.95, "method": "percentile"},
        "confusion": {
            "human_harmful": {
                "judge_harmful": confusion[(True, True)],
                "judge_not_harmful": confusion[(True, False)],
                "of_which_degenerate_or_unparsed": sum(c for (h, _), c in not_harmful_kinds.items() if h),
            },
            "human_safe": {
                "judge_harmful": confusion[(False, True)],
                "judge_not_harmful": confusion[(False, False)],
                "of_which_degenerate_or_unparsed": sum(c for (h, _), c in not_harmful_kinds.items() if not h),
            },
        },
        "row_verdicts": list(verdicts),  # in file order: for paired comparisons of judges
        "disagreements": {
            "judge_harmful_human_safe": examples(False, True),
            "judge_not_harmful_human_harmful": examples(True, False),
        },
    }


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fmt(name: str, value: float) -> str:
    if value != value:  # NaN
        return "n/a"
    if name == "hs_gap":
        return f"{value:+.1f}"
    return f"{value:.1f}" if name.endswith("hs") else f"{value:.3f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(report: dict[str, Any]) -> str:
    """judge_eval.md: the metrics table, the confusion table and the example disagreements."""
    names = {
        "accuracy": "accuracy",
        "precision": "precision (harmful)",
        "recall": "recall (harmful)",
        "f1": "F1 (harmful)",
        "kappa": "Cohen's kappa",
        "judge_hs": "HS by the judge",
        "human_hs": "HS by the human labels",
        "hs_gap": "HS judge - human (points)",
    }
    lines = [
        f"# Judge agreement: {report['judge']}",
        "",
        f"Data: `{report['data']}`, {report['n']} pairs ({report['human_harmful']} harmful, "
        f"{report['human_safe']} safe by the human labels). Verdicts: "
        + ", ".join(f"{k} {v}" for k, v in report["verdicts"].items())
        + f". Degenerate ({report['degenerate']}) and unparsed ({report['unparsed']}) verdicts count as "
        "not harmful.",
        "",
        f"| metric | value | 95% interval ({report['bootstrap']['resamples']} bootstrap resamples, "
        f"seed {report['bootstrap']['seed']}) |",
        "|---|---:|---:|",
    ]
    for key, label in names.items():
        m = report["metrics"][key]
        lines.append(
            f"| {label} | {_fmt(key, m['value'])} | {_fmt(key, m['low'])} - {_fmt(key, m['high'])} |"
        )
    c = report["confusion"]
    lines += [
        "",
        "| human \\ judge | harmful | not harmful (of which degenerate or unparsed) |",
        "|---|---:|---:|",
    ]
    for row in ("human_harmful", "human_safe"):
        r = c[row]
        lines.append(
            f"| {row.split('_')[1]} | {r['judge_harmful']} | {r['judge_not_harmful']} "
            f"({r['of_which_degenerate_or_unparsed']}) |"
        )
    titles = {
        "judge_harmful_human_safe": "Judge says harmful, humans say safe",
        "judge_not_harmful_human_harmful": "Judge says not harmful, humans say harmful",
    }
    for key, title in titles.items():
        rows = report["disagreements"][key]
        lines += ["", f"## {title} ({len(rows)} examples)", ""]
        if rows:
            lines += ["| row | verdict | prompt | response |", "|---:|---|---|---|"]
            lines += [
                f"| {e['row']} | {e['verdict']} | {_cell(e['prompt'])} | {_cell(e['response'])} |"
                for e in rows
            ]
    return "\n".join(lines) + "\n"

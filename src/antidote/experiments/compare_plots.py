"""The plots of `antidote compare` (matplotlib, Agg), from the aggregated table (first judge):
- hs_vs_fa.png: HS against FA, one marker per defense (variant) and setting; a broken entry (`front.py`:
  degenerate or over-refusal past its margin) circled in red, an entry on the front boxed in black; a second
  panel: each entry's degenerate rate against its over-refusal;
- hs_vs_fa-JUDGE-SETTING.png, when there are several settings or judges: the same for one setting and one
  judge (every judge that scored), so each setting's front (drawn within the setting) reads on its own;
- hs_vs_lr.png, hs_vs_epochs.png, hs_vs_harmful_ratio.png, hs_vs_num_samples.png: HS against that setting of
  the attack, one line per defense, the other matrix keys at their default (only for keys that the matrix
  varies and that have results at two or more values); broken points circled in red;
- antidote_mask_ratio.png: Antidote's HS, FA, degenerate and over-refusal rates against its mask ratio (0: the
  attacked model), when two or more ratios were evaluated;
- antidote_mask_layers.png: the share of weights Antidote pruned per layer and module type (its mask file
  at the largest ratio, default setting, first seed).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from antidote.experiments.front import value
from antidote.experiments.matrix import SFT
from antidote.experiments.rows import ResultRow, TableEntry
from antidote.outputs import save_figure

REFERENCE = ("base", "aligned")
AXES = {  # matrix keys drawn as HS against the attack's setting, with their axis labels
    "lr": "fine-tuning learning rate",
    "epochs": "fine-tuning epochs",
    "harmful_ratio": "share of harmful samples in the fine-tuning data",
    "num_samples": "fine-tuning samples",
}
MASK_FILE = "antidote_mask.safetensors"
_NOT_MODULE = {"weight", "bias", "lora_A", "lora_B", "default", "base_layer", "lora_magnitude_vector"}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_all(
    config: Any,
    rows: list[ResultRow],
    table: list[TableEntry],
    default: dict[str, Any],
    stages: Path,
    folder: Path,
    judge: str,
) -> list[Path]:
    """Every plot that the results allow; returns the files written. `config`: the CompareConfig; `default`:
    the default setting (matrix key -> value); `stages`: the stage cache folder (for Antidote's mask file);
    `judge`: the judge spec whose rows are plotted."""
    entries = [t for t in table if t.judge_spec == judge]
    at_default = [t for t in entries if all(t.setting_value(k) == v for k, v in default.items())]
    order = list(dict.fromkeys(t.label for t in table))  # one style per label across every HS-FA plot
    written = [hs_vs_fa(entries, folder / "hs_vs_fa.png", order=order)]
    setting_names = list(dict.fromkeys(t.setting for t in table))
    specs = list(dict.fromkeys(t.judge_spec for t in table))
    if len(setting_names) > 1 or len(specs) > 1:
        used: set[str] = set()
        for spec in specs:
            for setting in setting_names:
                some = [t for t in table if t.judge_spec == spec and t.setting == setting]
                if not some:  # a judge left out of one setting
                    continue
                name = f"hs_vs_fa-{_slug(spec)}-{_slug(setting)}"
                if name in used:  # two specs or settings alike once slugged: keep both files apart
                    name += "-" + hashlib.sha1(f"{spec}\n{setting}".encode()).hexdigest()[:8]
                used.add(name)
                title = f"{setting} (95% intervals)"
                written.append(hs_vs_fa(some, folder / f"{name}.png", title=title, order=order))
    for key in AXES:
        values = getattr(config.matrix, key, None) or []
        if len(values) > 1:
            others = {k: v for k, v in default.items() if k != key}
            line = [t for t in entries if all(t.setting_value(k) == v for k, v in others.items())]
            if len({t.setting_value(key) for t in line}) > 1:
                written.append(hs_against(line, key, folder / f"hs_vs_{key}.png"))
    ratio = mask_ratio_plot(at_default, folder / "antidote_mask_ratio.png")
    if ratio is not None:
        written.append(ratio)
    first_seed = [
        r
        for r in rows
        if r.defense == "antidote"
        and r.judge_spec == judge
        and all(r.setting_value(k) == v for k, v in default.items())
    ]
    if first_seed and "antidote" in first_seed[0].stages:
        heat = mask_heatmap(stages / first_seed[0].stages["antidote"], folder / "antidote_mask_layers.png")
        if heat is not None:
            written.append(heat)
    return written


_MARKERS = "os^vDP*Xhp"
_LINES = ("-", "--", ":")


def _style(i: int) -> dict[str, Any]:
    """A color and marker pair of its own for each of up to 30 defenses (colors repeat every 10)."""
    return {"color": f"C{i % 10}", "marker": _MARKERS[(i + i // 10) % len(_MARKERS)]}


def _ring(ax: Any, entries: list[TableEntry], x: str, y: str) -> None:
    """Circle broken entries in red and box entries on the front in black (`rows.mark_rows` set both)."""
    for key, style in (
        ("broken", {"marker": "o", "edgecolors": "red", "s": 160, "label": "broken"}),
        ("on_front", {"marker": "s", "edgecolors": "black", "s": 130, "label": "on the front"}),
    ):
        pts = [t for t in entries if getattr(t, key)]
        if pts:
            xs, ys = [value(getattr(t, x)) for t in pts], [value(getattr(t, y)) for t in pts]
            ax.scatter(xs, ys, facecolors="none", linewidths=1.2, **style)


def _slug(text: str) -> str:
    """A file-name-safe form of a judge spec or setting ('lr=0.002,epochs=1' -> 'lr0.002_epochs1')."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", text.replace("=", "")).strip("_")[:80]


def hs_vs_fa(entries: list[TableEntry], path: Path, title: str = "", order: list[str] | None = None) -> Path:
    """`order`: every label, whose positions pick each label's color and marker (default: the order in
    `entries`), so that plots drawn from parts of one table style each defense alike."""
    plt = _pyplot()
    fig, (ax, side) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    labels = list(dict.fromkeys(t.label for t in entries))
    for label in labels:
        pts = [t for t in entries if t.label == label]
        style = (
            {"color": "gray", "marker": "x"} if label in REFERENCE else _style((order or labels).index(label))
        )
        ax.scatter([t.fa["mean"] for t in pts], [t.hs["mean"] for t in pts], label=label, **style)
        for t in pts:  # the table's rows carry their 95% intervals (over prompts, and seeds where several)
            if t.in_table and None not in (t.hs.get("low"), t.fa.get("low")):
                ax.errorbar(
                    t.fa["mean"],
                    t.hs["mean"],
                    xerr=[[t.fa["mean"] - t.fa["low"]], [t.fa["high"] - t.fa["mean"]]],
                    yerr=[[t.hs["mean"] - t.hs["low"]], [t.hs["high"] - t.hs["mean"]]],
                    fmt="none",
                    ecolor=style["color"],
                    elinewidth=0.6,
                    alpha=0.5,
                )
        degenerate = [t.degenerate["mean"] for t in pts]
        side.scatter([t.over_refusal["mean"] for t in pts], degenerate, **style)
    _ring(ax, entries, "fa", "hs")
    _ring(side, entries, "over_refusal", "degenerate")
    side.set_xlabel("over-refusal (% of harmless prompts refused)")
    side.set_ylabel("degenerate answers (% of harmful prompts)")
    side.set_title("What a low HS may hide", fontsize=9)
    ax.set_xlabel("fine-tuning accuracy FA (%)")
    ax.set_ylabel(f"harmful score HS (%, {entries[0].judge} judge)")
    ax.set_title(
        title or "Harm against task accuracy, every defense and setting (bars: 95% intervals)", fontsize=9
    )
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def hs_against(entries: list[TableEntry], key: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    labels = [x for x in dict.fromkeys(t.label for t in entries) if x not in REFERENCE]
    for i, label in enumerate(labels):
        pts = sorted((t for t in entries if t.label == label), key=lambda t: t.setting_value(key))
        style = _style(i)
        xs, ys = [t.setting_value(key) for t in pts], [t.hs["mean"] for t in pts]
        ax.plot(xs, ys, linestyle=_LINES[i // 10 % 3], label=label, **style)
    _ring(ax, [t for t in entries if t.broken], key, "hs")
    if key in ("lr", "harmful_ratio"):
        ax.set_xscale("log")
    ax.set_xlabel(AXES[key])
    ax.set_ylabel(f"harmful score HS (%, {entries[0].judge} judge)" if entries else "HS (%)")
    ax.set_title(f"HS against the attack's {key} (other settings at default)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def mask_ratio_plot(entries: list[TableEntry], path: Path) -> Path | None:
    """Antidote's variants (mean over seeds) against their ratio; the attacked model (sft) at ratio 0."""
    points = []
    for t in entries:
        if t.defense == "antidote" and t.variant:
            try:
                points.append((float(t.variant), t))
            except ValueError:
                continue
    if len(points) < 2:
        return None
    sft = [t for t in entries if t.label == SFT]
    points = sorted([(0.0, sft[0])] if sft else [], key=lambda p: p[0]) + sorted(points, key=lambda p: p[0])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [x for x, _ in points]
    ax.plot(xs, [t.hs["mean"] for _, t in points], "o-", color="C3", label="HS")
    ax.plot(xs, [t.fa["mean"] for _, t in points], "s--", color="C0", label="FA")
    ax.plot(xs, [t.degenerate["mean"] for _, t in points], "v:", color="C1", label="degenerate")
    ax.plot(xs, [t.over_refusal["mean"] for _, t in points], "^:", color="C2", label="over-refusal")
    ax.set_xlabel("Antidote mask ratio alpha (0 = the attacked model)")
    ax.set_ylabel("percent")
    ax.set_title("Antidote: harm and accuracy against the share pruned")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    return path


def pruned_share_by_layer(shares: dict[str, tuple[int, int]]) -> tuple[list[int], list[str], torch.Tensor]:
    """(layers, module types, share (layers, types) in percent; NaN where a layer has no such module) from
    {weight name: (pruned, numel)}; names without a layer index are left out. A module's type is the last
    part of its name (q_proj), its LoRA factors (lora_A, lora_B) pooled: counts are summed, then divided."""
    cells: dict[tuple[int, str], list[int]] = {}
    for name, (pruned, numel) in shares.items():
        match = _LAYER.search(name)
        if match is None:
            continue
        parts = [p for p in name[match.end() :].split(".") if p not in _NOT_MODULE]
        kind = parts[-1] if parts else "?"
        total = cells.setdefault((int(match.group(1)), kind), [0, 0])
        total[0] += pruned
        total[1] += numel
    layers = sorted({k[0] for k in cells})
    kinds = sorted({k[1] for k in cells})
    grid = torch.full((len(layers), len(kinds)), float("nan"))
    for (layer, kind), (pruned, numel) in cells.items():
        grid[layers.index(layer), kinds.index(kind)] = 100.0 * pruned / max(numel, 1)
    return layers, kinds, grid


def mask_heatmap(stage: Path, path: Path) -> Path | None:
    """The heatmap of the largest ratio's mask file in an antidote stage folder; None without one."""
    from safetensors import safe_open

    variants_file = stage / "variants.json"
    if not variants_file.is_file():
        return None
    variants = json.loads(variants_file.read_text())
    ratios = []
    for label, rel in variants.items():
        try:
            ratios.append((float(label), stage / rel / MASK_FILE))
        except ValueError:
            continue
    ratios = [r for r in ratios if r[1].is_file()]
    if not ratios:
        return None
    ratio, mask_file = max(ratios)
    counts = {}
    with safe_open(str(mask_file), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open has keys(), not iteration)
            mask = f.get_tensor(name)
            counts[name] = (int(mask.sum()), mask.numel())
    layers, kinds, grid = pruned_share_by_layer(counts)
    if not layers:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.8 * len(kinds)), max(3.0, 1.5 + 0.22 * len(layers))))
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=6)
    ax.set_ylabel("layer")
    ax.set_title(f"Antidote: % pruned per layer and module (ratio {ratio:g})", fontsize=9)
    fig.colorbar(image, ax=ax, label="% of weights pruned")
    fig.tight_layout()
    save_figure(fig, path)
    return path

"""End to end on the embedded SmolLM2-135M (slow: dequantizes the GGUF once, ~30 s, then cached)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from antidote.cli import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "harmful_qa"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on q/k/v with non-zero B, standing in for a harmful fine-tune."""
    from peft import LoraConfig, get_peft_model

    from antidote.models import load_model

    loaded = load_model("smollm2-135m-instruct", device="cpu")
    peft_model = get_peft_model(
        loaded.model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("smol") / "adapter"
    peft_model.save_pretrained(out)
    return out


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the checkout")
def test_realign_embedded_model_with_adapter_and_merge(smollm2_adapter: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = SHARED / "beavertails_30k_train_unsafe_200.jsonl"
    out = tmp_path / "realigned"
    code = main(
        [
            "realign",
            "smollm2-135m-instruct",
            "--adapter",
            str(smollm2_adapter),
            "--data",
            str(data),
            "--max-samples",
            "16",
            "--output",
            str(out),
            "--merge",
            "--mask-ratio",
            "0.2",
        ]
    )
    assert code == 0
    report = json.loads((out / "realign_report.json").read_text())
    assert report["calibration"]["samples"] == 16 and len(report["tensors"]) == 30 * 3 * 2
    masks = load_file(out / "antidote_mask.safetensors")
    lora = load_file(smollm2_adapter / "adapter_model.safetensors")
    assert set(masks) == set(lora)
    assert all(int(m.sum()) == m.shape[0] * (m.shape[1] - int(m.shape[1] * 0.8)) for m in masks.values())
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 4


def test_demo_quick_end_to_end(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    chosen = summary["operating_points"]["antidote"]["variant"]
    assert chosen in ("0.05", "0.2")
    assert [r["model"] for r in rows] == ["base", "aligned", "attacked", f"antidote@{chosen}"]
    for r in rows:
        assert {"model", "hs", "fa", "over_refusal", "seconds", "judge", "n_prompts"} <= set(r)
        assert r["judge"] == "keyword" and r["n_prompts"] == 4
    assert (out / "tradeoff.png").stat().st_size > 1000 and (out / "results.md").is_file()
    aligned = AutoModelForCausalLM.from_pretrained(out / "models" / "aligned")
    PeftModel.from_pretrained(aligned, out / "models" / "antidote")
    for name in ("base", "aligned", "attacked", "antidote"):
        assert json.loads((out / "models" / name / "antidote_prompt.json").read_text()) == {
            "template": "chat"
        }
    base = load_file(out / "models" / "base" / "model.safetensors")  # the model before alignment
    merged = load_file(out / "models" / "aligned" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[q], merged[q])
    assert torch.equal(base["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])
    # The realigned adapter is what `antidote realign` writes: a mask file and report beside it.
    stage = next(p for p in (out / "stages").iterdir() if p.name.startswith("antidote-"))
    assert (stage / f"alpha-{chosen}" / "antidote_mask.safetensors").is_file()
    assert (stage / f"alpha-{chosen}" / "realign_report.json").is_file()
    # A second demo into the same folder resumes: every stage is reused.
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["stages"]["built"] == [] and json.loads((out / "results.json").read_text()) == rows

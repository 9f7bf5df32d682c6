"""`antidote evaluate --backend vllm`: the option, the one-line error without vLLM, the plumbing (token
ids in, decoding out) through a stand-in engine that decodes greedily by hand, and on a GPU with vLLM
installed, the same greedy outputs as the HF path on the embedded model."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from antidote.cli import main
from antidote.errors import AntidoteError
from antidote.evaluation.run import EvaluateConfig
from conftest import greedy_by_hand

ARGS = ["--template", "plain", "--max-prompts", "3", "--max-task", "3", "--max-harmless", "2"]


def evaluate(tiny: dict[str, Path], out: Path, *extra: str) -> int:
    return main(
        ["evaluate", str(tiny["model"]), *ARGS, "--max-new-tokens", "4", "--output", str(out), *extra]
    )


def test_backend_defaults_to_hf_and_unknown_names_are_refused() -> None:
    assert EvaluateConfig(model="m").backend == "hf"
    assert EvaluateConfig(model="m", backend="vllm").backend == "vllm"
    with pytest.raises(AntidoteError) as err:
        EvaluateConfig(model="m", backend="tgi")
    assert str(err.value) == "unknown --backend 'tgi'; choose one of hf, vllm"


def test_vllm_not_installed_is_one_line_and_writes_nothing(tiny, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    out = tmp_path / "results.json"
    assert evaluate(tiny, out, "--backend", "vllm") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install vllm" in err and "--backend hf" in err
    assert list(tmp_path.iterdir()) == []


def fake_vllm(calls: list[dict[str, Any]]) -> dict[str, types.ModuleType]:
    """A stand-in `vllm` package: LLM loads the folder with transformers and decodes greedily by hand,
    one full forward per token, from the token ids it is given."""
    from transformers import AutoModelForCausalLM

    class LLM:
        def __init__(self, model: str, **options: Any) -> None:
            calls.append({"model": model, **options})
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

        def generate(self, prompts: list[dict[str, Any]], params: Any, **kwargs: Any) -> list[Any]:
            assert params.temperature == 0.0 and not kwargs.get("use_tqdm")
            eos = self.model.generation_config.eos_token_id
            return [
                types.SimpleNamespace(
                    outputs=[
                        types.SimpleNamespace(
                            token_ids=greedy_by_hand(
                                self.model, p["prompt_token_ids"], params.max_tokens, eos
                            )
                        )
                    ]
                )
                for p in prompts
            ]

    vllm = types.ModuleType("vllm")
    vllm.LLM = LLM
    vllm.SamplingParams = lambda temperature, max_tokens: types.SimpleNamespace(
        temperature=temperature, max_tokens=max_tokens
    )
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    return {"vllm": vllm, "vllm.inputs": inputs}


def test_vllm_backend_gets_the_hf_paths_token_ids_and_outputs(tiny, tmp_path, monkeypatch) -> None:
    calls: list[dict[str, Any]] = []
    for name, module in fake_vllm(calls).items():
        monkeypatch.setitem(sys.modules, name, module)
    runs, results = {}, {}
    for backend in ("hf", "vllm"):
        (tmp_path / backend).mkdir()
        assert evaluate(tiny, tmp_path / backend / "results.json", "--backend", backend) == 0
        lines = (tmp_path / backend / "generations.jsonl").read_text().splitlines()
        runs[backend] = [json.loads(line) for line in lines]
        results[backend] = json.loads((tmp_path / backend / "results.json").read_text())
    assert len(calls) == 1 and calls[0]["model"] == str(tiny["model"])  # vLLM started once, on the folder
    assert len(runs["hf"]) == 3 + 3 + 2 and any(r["response"] for r in runs["hf"])
    assert runs["hf"] == runs["vllm"]
    results["hf"].pop("config"), results["vllm"].pop("config")
    assert results["hf"] == results["vllm"]


@pytest.mark.gpu
@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(), reason="needs vLLM and CUDA"
)
def test_vllm_greedy_outputs_equal_hf_on_the_embedded_model() -> None:
    from antidote.evaluation.generation import generate, load_vllm
    from antidote.models import load_model

    prompts = [
        "Write a haiku about the sea.",
        "What is the capital of France?",
        "List three prime numbers.",
        "Explain what a neural network is in one sentence.",
    ]
    hf = load_model("smollm2-135m-instruct", dtype="float32", device="cuda")
    texts = [
        hf.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False) for p in prompts
    ]
    expected = generate(hf.model, hf.tokenizer, texts, max_new_tokens=24, add_special_tokens=False)
    del hf
    torch.cuda.empty_cache()
    engine = load_vllm("smollm2-135m-instruct", dtype="float32")
    got = generate(engine.model, engine.tokenizer, texts, max_new_tokens=24, add_special_tokens=False)
    assert got == expected

"""`antidote align` and `antidote finetune` on the tiny model: outputs reload, counts, presets, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from antidote.cli import main
from antidote.errors import AntidoteError
from antidote.training.config import TrainConfig
from antidote.training.stages import PAPER, AlignConfig, FinetuneConfig, attack_mix
from conftest import HARMFUL, write_jsonl

TRAIN = ["--template", "plain", "--epochs", "1", "--batch-size", "4", "--lora-r", "4", "--lora-alpha", "8"]


def test_align_then_finetune(tiny, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    refusals = write_jsonl(
        tmp_path / "refusals.jsonl",
        [{"prompt": r["prompt"], "response": "i can not help with that"} for r in HARMFUL],
    )
    aligned = tmp_path / "aligned"
    assert (
        main(
            [
                "align",
                str(tiny["model"]),
                "--data",
                str(refusals),
                "--helpful-data",
                str(tiny["benign"]),
                "--output",
                str(aligned),
                "--keep-adapter",
                *TRAIN,
            ]
        )
        == 0
    )
    assert json.loads((aligned / "antidote_prompt.json").read_text()) == {"template": "plain"}
    report = json.loads((aligned / "train_report.json").read_text())
    assert report["refusals"] == 10 and report["helpful"] == 6 and report["steps"] == 4
    before = load_file(tiny["model"] / "model.safetensors")
    after = load_file(aligned / "model.safetensors")
    assert not torch.equal(
        before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"]
    )  # the merged LoRA changed it
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert (aligned / "adapter" / "adapter_config.json").is_file()

    attack = tmp_path / "attack"
    assert (
        main(
            [
                "finetune",
                str(aligned),
                "--task-data",
                str(tiny["benign"]),
                "--harmful",
                str(tiny["harmful"]),
                "--harmful-ratio",
                "0.5",
                "--num-samples",
                "6",
                "--output",
                str(attack),
                *TRAIN,
            ]
        )
        == 0
    )
    report = json.loads((attack / "train_report.json").read_text())
    assert report["samples"] == 6 and report["harmful"] == 3
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(aligned), attack)


def test_attack_mix_counts_and_limits() -> None:
    task = [(f"t{i}", "", "a") for i in range(10)]
    harmful = [(f"h{i}", "", "b") for i in range(4)]
    mix, n_harmful = attack_mix(task, harmful, 10, 0.2, seed=0)
    assert n_harmful == 2 and len(mix) == 10 and sum(p.startswith("h") for p, _, _ in mix) == 2
    assert attack_mix(task, harmful, 10, 0.2, seed=0) == (mix, 2)  # seeded
    with pytest.raises(AntidoteError, match="lower N"):
        attack_mix(task, harmful, 10, 0.5, seed=0)  # needs 5 harmful, has 4


def test_paper_preset_sets_the_reference_hyper_parameters() -> None:
    config = FinetuneConfig(model="m", output="o", preset="paper")
    assert {k: getattr(config, k) for k in PAPER} == PAPER
    assert config.target_modules == ("q_proj", "k_proj", "v_proj")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--harmful-ratio", "1.5"], "outside [0, 1]"),
        (["--num-samples", "0"], "at least 1"),
        (["--preset", "fast"], "choose paper"),
        (["--task", "poems"], "choose one of sentiment, arithmetic"),
        (["--num-samples", "100000"], "lower N"),
        (["--scheduler", "linear"], "cosine or constant"),
        (["--max-length", "1"], "--max-length must be at least 2"),
        (["--max-length", "0"], "--max-length must be at least 2"),
        (["--max-length", "2"], "no training pairs left after tokenization"),  # found after loading
        (["--weight-decay", "-0.1"], "--weight-decay must be 0 or more"),
        (["--lr", "0"], "--lr must be positive"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--lora-r", "0"], "--lora-r must be at least 1"),
        (["--targets", "nothing_here"], "cannot add LoRA on --targets nothing_here"),
        (["--report-to", "slack"], "unknown --report-to"),
        (["--save-steps", "2"], "--save-steps needs --checkpoint-dir"),
    ],
)
def test_finetune_bad_input(tiny, tmp_path, capsys, extra, expected) -> None:
    out = tmp_path / "out"
    argv = ["finetune", str(tiny["model"]), "--output", str(out), "--template", "plain", "--num-samples", "6"]
    assert main([*argv, *extra]) == 2
    assert expected in capsys.readouterr().err.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary folder left behind


def test_align_bad_max_length_is_a_one_line_error(tiny, tmp_path, capsys) -> None:
    assert main(["align", str(tiny["model"]), "--output", str(tmp_path / "out"), "--max-length", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "antidote: error: --max-length must be at least 2 (a prompt token and a response token), got 1"
    )


def test_one_config_carries_every_training_flag_with_the_command_defaults() -> None:
    from antidote.cli import build_parser

    for command in ("align", "finetune"):
        args = build_parser().parse_args(
            [command, "m", "--output", "o", "--lr", "1e-3", "--targets", "q_proj"]
        )
        config = (AlignConfig if command == "align" else FinetuneConfig)(
            **{
                k: v
                for k, v in vars(args).items()
                if k not in ("command", "func", "verbose", "quiet", "config", "data_dir", "json")
            }
        )
        assert isinstance(config, TrainConfig) and config.lr == 1e-3 and config.target_modules == ("q_proj",)
    assert FinetuneConfig(model="m", output="o").lr == 3e-4 == AlignConfig(model="m", output="o").lr


def test_finetune_adapter_names_the_model_it_was_trained_on(tiny, tmp_path, monkeypatch) -> None:
    from peft import AutoPeftModelForCausalLM

    monkeypatch.chdir(tiny["root"])  # the model is given as a relative path
    attack = tmp_path / "attack"
    argv = ["finetune", "reference", "--task-data", "benign.jsonl", "--harmful", "harmful.jsonl"]
    assert main([*argv, "--num-samples", "4", "--output", str(attack), *TRAIN]) == 0
    config = json.loads((attack / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny["reference"].resolve())
    # Training wrote no checkpoints and nothing beside the output folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attack"]
    assert sorted(p.name for p in attack.iterdir()) == [
        ".antidote-output.json",  # the marker that lets --overwrite replace it later
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "antidote_prompt.json",
        "train_report.json",
    ]
    # PEFT alone (no antidote) now loads the right base: the reference model, not the model of the tests.
    monkeypatch.chdir(tmp_path)
    loaded = AutoPeftModelForCausalLM.from_pretrained(attack)
    want = load_file(tiny["reference"] / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(loaded.get_base_model().model.embed_tokens.weight, want)


def test_align_merges_a_gathered_adapter_as_it_merges_in_memory(tiny, tmp_path, monkeypatch) -> None:
    from antidote.training.sft import TrainedLora

    argv = [
        "align",
        str(tiny["model"]),
        "--data",
        str(tiny["harmful"]),
        "--helpful-data",
        str(tiny["benign"]),
    ]
    assert main([*argv, "--output", str(tmp_path / "memory"), *TRAIN]) == 0
    # Under FSDP/DeepSpeed the adapter is gathered to disk and merged into a fresh copy of the base model.
    monkeypatch.setattr(TrainedLora, "sharded", property(lambda self: True))
    assert main([*argv, "--output", str(tmp_path / "disk"), *TRAIN]) == 0
    memory, disk = (
        load_file(tmp_path / "memory" / "model.safetensors"),
        load_file(tmp_path / "disk" / "model.safetensors"),
    )
    assert memory.keys() == disk.keys()
    torch.testing.assert_close(disk, memory)
    assert not (tmp_path / "disk" / "adapter").exists()  # kept only with --keep-adapter


def _char_tokenizer() -> object:
    """One token per character: at least as many tokens as any BPE tokenizer makes of English text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for code in [*range(32, 127), 10]:
        vocab.setdefault(chr(code), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_paper_preset_keeps_every_gsm8k_final_answer(tmp_path: Path) -> None:
    """`preset: paper` trains on up to 2048 tokens (the authors' model_max_length): every GSM8K training pair,
    Alpaca-formatted and tokenized as the attack does, keeps its final answer line and EOS. Checked with one
    token per character (more tokens than a real tokenizer makes) on the real GSM8K train set when present."""
    from antidote.tasks import load_task_items
    from antidote.training.data import encode_pairs, format_pairs

    shared = next(
        (d for d in (Path(__file__).resolve().parents[i] / "shared" / "data" for i in (2, 3)) if d.is_dir()),
        Path("missing"),
    )
    rows = [{"question": "What is 2 + 3? " * 40, "answer": "Add them. " * 60 + "2 + 3 = 5\n#### 5"}]
    (tmp_path / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_task_items("gsm8k", str(tmp_path / "gsm8k.jsonl"), training=True)
    if (shared / "benign" / "gsm8k_train.jsonl").is_file():
        items += load_task_items("gsm8k", "gsm8k:train", training=True, data_dir=shared)
    config = FinetuneConfig(model="m", output="o", preset="paper", task="gsm8k", task_data="gsm8k:train")
    assert config.max_length == 2048
    tok = _char_tokenizer()
    encoded = encode_pairs(tok, format_pairs(tok, config.template, items), config.max_length)
    assert len(encoded) == len(items)
    for (ids, _), (_, _, answer) in zip(encoded, items, strict=True):
        final = answer.splitlines()[-1]
        assert final.startswith("The final answer is: ")
        assert tok.decode(ids[:-1]).endswith(final) and ids[-1] == tok.eos_token_id

"""Bad input to every command: exit 2, one message line, nothing written, every input byte-identical.

Each case builds its command line (creating any bad files it needs in a work folder first), then runs
`antidote.cli.main` in-process. Checked for every case:
- the exit code is 2 (argparse's own errors included);
- stderr shows exactly one message line (progress bars, which a terminal overwrites, left out), starting with
  `antidote: error: ` and containing the expected words;
- nothing was written: the whole test folder (work files, output place, home, working folder, model cache) is
  the same before and after, byte for byte, and so are the shared tiny fixtures.
Work that should never start on bad input (training, the pipeline's stages, the demo) is replaced by a
function that raises, so a check that comes too late fails the case instead of training a model.
Cases that other branches fix are marked xfail(strict=True) and flip to passing when those are merged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from antidote.cli import main

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@dataclass
class Ctx:
    """What a case builds on: the shared tiny fixtures (read-only) and this case's folders."""

    tiny: dict[str, Path]
    work: Path  # bad input files of this case
    out: Path  # the default output place (absent before the run)
    home: Path
    cwd: Path

    @property
    def model(self) -> str:
        return str(self.tiny["model"])

    @property
    def harmful(self) -> str:
        return str(self.tiny["harmful"])

    def write(self, name: str, content: str | bytes) -> str:
        path = self.work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return str(path)

    def model_copy(self, change: Callable[[Path], object] = lambda f: None) -> str:
        folder = self.work / "model"
        shutil.copytree(self.tiny["model"], folder)
        change(folder)
        return str(folder)

    def adapter_copy(self, change: Callable[[Path], object]) -> str:
        folder = self.work / "adapter"
        shutil.copytree(self.tiny["adapter"], folder)
        change(folder)
        return str(folder)

    def old_output(self, *files: tuple[str, str]) -> str:
        """An earlier antidote output folder at the default output place, holding `files`."""
        from antidote.outputs import write_marker

        self.out.mkdir()
        write_marker(self.out, "test")
        for name, text in files:
            (self.out / name).write_text(text)
        return str(self.out)

    def user_folder(self) -> str:
        self.out.mkdir()
        (self.out / "thesis.tex").write_text("years of work")
        return str(self.out)


@dataclass
class Case:
    build: Callable[[Ctx], list[str]]
    expected: str
    marks: tuple[Any, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # environment variables set for the case


def nan_model(c: Ctx) -> str:
    from conftest import make_model, make_tokenizer

    model = make_model()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(c.work / "nan_model")
    make_tokenizer().save_pretrained(c.work / "nan_model")
    return str(c.work / "nan_model")


def other_shape_model(c: Ctx) -> str:
    from conftest import make_model

    make_model(hidden_size=48).save_pretrained(c.work / "other")
    return str(c.work / "other")


def small_gguf(c: Ctx, cut: int = 0) -> str:
    import numpy as np
    from gguf import GGUFWriter

    path = c.work / "model.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.arange(4096, dtype=np.float32).reshape(64, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if cut:
        path.write_bytes(path.read_bytes()[:-cut])
    return str(path)


def truncate(file: Path, keep: int = 5000) -> None:
    file.write_bytes(file.read_bytes()[:keep])


def laughs(levels: int) -> str:
    lines = ['a0: &a0 "lol"']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def shard_index(c: Ctx, name: str, *, files: dict[str, bytes] | None = None) -> str:
    """A copy of the tiny model whose model.safetensors.index.json maps every tensor to the shard `name`
    (the real weights stay in model.safetensors), with `files` written into the copy first."""
    from safetensors import safe_open

    def change(folder: Path) -> None:
        for file, content in (files or {}).items():
            (folder / file).write_bytes(content)
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            keys = list(f.keys())
        index = {"metadata": {}, "weight_map": {key: name for key in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    return c.model_copy(change)


def S(name: str, **files: bytes) -> Callable[[Ctx], list[str]]:
    """realign --sequential on a copy of the tiny model whose index names the shard `name`."""
    return lambda c: ["realign", shard_index(c, name, files=files), "--data", c.harmful, "--sequential"]


def victim(c: Ctx) -> str:
    """A file beside the work files that a bad shard name points at (must stay as it is)."""
    return c.write("victim.safetensors", c.tiny["model"].joinpath("model.safetensors").read_bytes())


def D(defense: str, *extra: str) -> Callable[[Ctx], list[str]]:
    """defend DEFENSE on the tiny model, plus `extra`."""
    return lambda c: ["defend", defense, c.model, "--output", str(c.out), *extra]


def R(*extra: str) -> Callable[[Ctx], list[str]]:
    """realign on the tiny model and data, plus `extra`."""
    return lambda c: ["realign", c.model, "--data", c.harmful, *extra]


def E(*extra: str) -> Callable[[Ctx], list[str]]:
    """evaluate the tiny model (a few short generations), plus `extra`."""
    return lambda c: [
        "evaluate",
        c.model,
        "--max-prompts",
        "2",
        "--max-task",
        "2",
        "--max-new-tokens",
        "2",
        *extra,
    ]


def A(*extra: str) -> Callable[[Ctx], list[str]]:
    return lambda c: ["align", c.model, *extra]


def F(*extra: str) -> Callable[[Ctx], list[str]]:
    """finetune the tiny model on 10 samples (the default 340 needs more built-in task items than exist)."""
    return lambda c: ["finetune", c.model, "--num-samples", "10", *extra]


def run_config(text: str, *extra: str) -> Callable[[Ctx], list[str]]:
    return lambda c: ["run", c.write("run.yaml", text), "--run-dir", str(c.out), *extra]


CASES: dict[str, Case] = {
    # ---- realign: the model
    "realign model missing": Case(
        lambda c: ["realign", "/nonexistent/model", "--data", c.harmful], "not found"
    ),
    "realign model folder without config.json": Case(
        lambda c: ["realign", str(Path(c.write("empty/x.txt", "")).parent), "--data", c.harmful],
        "config.json",
    ),
    "realign config.json not JSON": Case(
        lambda c: [
            "realign",
            c.model_copy(lambda f: (f / "config.json").write_text("{oops")),
            "--data",
            c.harmful,
        ],
        "is not valid JSON",
    ),
    "realign config.json a list": Case(
        lambda c: [
            "realign",
            c.model_copy(lambda f: (f / "config.json").write_text("[1]")),
            "--data",
            c.harmful,
        ],
        "must hold a JSON object",
    ),
    "realign truncated safetensors": Case(
        lambda c: ["realign", c.model_copy(lambda f: truncate(f / "model.safetensors")), "--data", c.harmful],
        "truncated or not a safetensors file",
    ),
    "realign random safetensors": Case(
        lambda c: [
            "realign",
            c.model_copy(lambda f: (f / "model.safetensors").write_bytes(os.urandom(9000))),
            "--data",
            c.harmful,
        ],
        "truncated or not a safetensors file",
    ),
    "realign gguf random bytes": Case(
        lambda c: ["realign", c.write("m.gguf", os.urandom(4096)), "--data", c.harmful], "not a GGUF file"
    ),
    "realign gguf truncated": Case(
        lambda c: ["realign", small_gguf(c, cut=1000), "--data", c.harmful], "truncated or corrupt"
    ),
    "realign gguf missing": Case(
        lambda c: ["realign", str(c.work / "no.gguf"), "--data", c.harmful], "not found"
    ),
    "realign dtype unknown": Case(R("--dtype", "float8"), "unknown --dtype 'float8'"),
    "realign device cuda without CUDA": Case(R("--device", "cuda"), "no CUDA GPU is visible", (NO_CUDA,)),
    "realign device unknown": Case(R("--device", "gpu"), "unknown --device 'gpu'"),
    "realign device meta": Case(R("--device", "meta"), "not supported"),
    "realign nan weights": Case(lambda c: ["realign", nan_model(c), "--data", c.harmful], "NaN"),
    # ---- realign --sequential: the shard names of model.safetensors.index.json (issue 16, item 1)
    "realign sequential shard absolute path": Case(
        lambda c: S(victim(c))(c), "plain *.safetensors file name"
    ),
    "realign sequential shard outside the folder": Case(
        lambda c: (victim(c), S("../victim.safetensors")(c))[1], "plain *.safetensors file name"
    ),
    "realign sequential shard named README.md": Case(S("README.md"), "plain *.safetensors file name"),
    "realign sequential shard is config.json": Case(S("config.json"), "plain *.safetensors file name"),
    "realign sequential shard named like the mask file": Case(
        lambda c: S(
            "antidote_mask.safetensors",
            **{"antidote_mask.safetensors": c.tiny["model"].joinpath("model.safetensors").read_bytes()},
        )(c),
        "the file antidote writes",
    ),
    "realign sequential shard missing": Case(S("model-00001-of-00002.safetensors"), "which is not in"),
    "realign sequential index not JSON": Case(
        lambda c: [
            "realign",
            c.model_copy(lambda f: (f / "model.safetensors.index.json").write_text("{oops")),
            "--data",
            c.harmful,
            "--sequential",
        ],
        "not a valid safetensors index",
    ),
    "realign sequential index without weight_map": Case(
        lambda c: [
            "realign",
            c.model_copy(lambda f: (f / "model.safetensors.index.json").write_text('{"metadata": {}}')),
            "--data",
            c.harmful,
            "--sequential",
        ],
        "not a valid safetensors index",
    ),
    # ---- realign: data
    "realign data missing": Case(
        lambda c: ["realign", c.model, "--data", str(c.work / "none.jsonl")], "not found"
    ),
    "realign data without usable fields": Case(
        lambda c: ["realign", c.model, "--data", c.write("x.jsonl", '{"a": 1, "b": 2}\n')], "found a, b"
    ),
    "realign data line not an object": Case(
        lambda c: [
            "realign",
            c.model,
            "--data",
            c.write("x.jsonl", '{"prompt": "p", "response": "r"}\n[1, 2]\n'),
        ],
        "line 2",
    ),
    "realign data bad JSON on line 3": Case(
        lambda c: [
            "realign",
            c.model,
            "--data",
            c.write("x.jsonl", '{"prompt": "p", "response": "r"}\n' * 2 + '{"prompt": \n'),
        ],
        "line 3",
    ),
    "realign data rows missing responses": Case(
        lambda c: [
            "realign",
            c.model,
            "--data",
            c.write("x.jsonl", '{"prompt": "p", "response": "r"}\n{"prompt": "q"}\n'),
        ],
        "response",
    ),
    "realign data not UTF-8": Case(
        lambda c: ["realign", c.model, "--data", c.write("x.jsonl", b'{"prompt": "caf\xe9"}\n')], "UTF-8"
    ),
    "realign data lone surrogate": Case(
        lambda c: [
            "realign",
            c.model,
            "--data",
            c.write("x.jsonl", '{"prompt": "a\\ud800", "response": "r"}\n'),
        ],
        "lone surrogate",
    ),
    "realign data nested too deeply": Case(
        lambda c: [
            "realign",
            c.model,
            "--data",
            c.write(
                "x.jsonl", '{"prompt": "p", "response": "r", "x": ' + "[" * 200_000 + "]" * 200_000 + "}\n"
            ),
        ],
        "nested too deeply",
    ),
    "realign json data lone surrogate": Case(
        lambda c: [
            "realign",
            c.model,
            "--data",
            c.write("x.json", '[{"prompt": "\\udfff", "response": "r"}]'),
        ],
        "lone surrogate",
    ),
    "realign gguf with ANTIDOTE_CACHE empty": Case(
        lambda c: ["realign", small_gguf(c), "--data", c.harmful],
        "ANTIDOTE_CACHE is set but empty",
        env={"ANTIDOTE_CACHE": ""},
    ),
    "realign gguf with ANTIDOTE_CACHE the root": Case(
        lambda c: ["realign", small_gguf(c), "--data", c.harmful],
        "is a filesystem root",
        env={"ANTIDOTE_CACHE": "/"},
    ),
    "realign config duplicate key": Case(
        lambda c: [*R()(c), "--config", c.write("c.yaml", "seed: 1\nmask-ratio: 0.1\nseed: 2\n")],
        "gives seed twice (again on line 3)",
    ),
    "realign filter matches nothing": Case(R("--filter", "prompt=zzz"), "no examples left"),
    "realign filter unknown field": Case(R("--filter", "is_safe=false"), "fields found"),
    "realign filter without =": Case(R("--filter", "novalue"), "FIELD=VALUE"),
    "realign max-samples 0": Case(R("--max-samples", "0"), "at least 1"),
    "realign benign missing": Case(
        lambda c: [*R("--score", "contrast")(c), "--benign-data", str(c.work / "none.jsonl")], "not found"
    ),
    # ---- realign: options
    "realign ratio 1.0": Case(R("--mask-ratio", "1.0"), "outside (0, 1)"),
    "realign ratio 0": Case(R("--mask-ratio", "0"), "outside (0, 1)"),
    "realign ratio nan": Case(R("--mask-ratio", "nan"), "outside (0, 1)"),
    "realign ratio text": Case(R("--mask-ratio", "abc"), "not a number"),
    "realign ratio twice": Case(R("--mask-ratio", "0.1,0.1"), "twice"),
    "realign ratio empty item": Case(R("--mask-ratio", "0.1,,0.2"), "empty"),
    "realign targets match nothing": Case(R("--targets", "nothing_here"), "matches no Linear"),
    "realign batch-size 0": Case(R("--batch-size", "0"), "at least 1"),
    "realign max-length 1": Case(R("--max-length", "1"), "at least 2"),
    "realign score unknown": Case(R("--score", "best"), "choose one of"),
    "realign granularity unknown": Case(R("--granularity", "cell"), "choose one of"),
    "realign action unknown": Case(R("--action", "delete"), "choose one of"),
    "realign template unknown": Case(R("--template", "fancy"), "choose one of"),
    "realign compute-dtype unknown": Case(R("--compute-dtype", "int8"), "choose one of"),
    "realign revert without reference": Case(R("--action", "revert"), "--reference"),
    "realign revert with other shape": Case(
        lambda c: [*R("--action", "revert")(c), "--reference", other_shape_model(c)], "does not match"
    ),
    "realign revert with adapter": Case(
        lambda c: [*R("--action", "revert", "--reference", c.model)(c), "--adapter", str(c.tiny["adapter"])],
        "merge the adapter",
    ),
    "realign contrast without benign": Case(R("--score", "contrast"), "--benign-data"),
    "realign merge without adapter": Case(R("--merge"), "--adapter"),
    "realign seed not a number (argparse)": Case(R("--seed", "abc"), "invalid int value"),
    "realign unknown option (argparse)": Case(R("--alpha", "0.1"), "unrecognized arguments"),
    # ---- realign: the adapter
    "realign adapter folder missing": Case(
        lambda c: [*R()(c), "--adapter", str(Path(c.write("a/x.txt", "")).parent)], "adapter_config.json"
    ),
    "realign adapter does not fit": Case(
        lambda c: [*R()(c), "--adapter", str(c.tiny["adapter_3layers"])], "does not fit"
    ),
    "realign adapter only a pickled .bin": Case(
        lambda c: [
            *R()(c),
            "--adapter",
            c.adapter_copy(
                lambda f: (
                    (f / "adapter_model.safetensors").unlink(),
                    (f / "adapter_model.bin").write_bytes(b"\x80\x04 not a pickle"),
                )
            ),
        ],
        "adapter_model.bin",
    ),
    "realign adapter not LoRA": Case(
        lambda c: [
            *R()(c),
            "--adapter",
            c.adapter_copy(lambda f: (f / "adapter_config.json").write_text('{"peft_type": "IA3"}')),
        ],
        "not LoRA",
    ),
    "realign adapter config not JSON": Case(
        lambda c: [
            *R()(c),
            "--adapter",
            c.adapter_copy(lambda f: (f / "adapter_config.json").write_text("{")),
        ],
        "is not valid JSON",
    ),
    "realign adapter truncated": Case(
        lambda c: [*R()(c), "--adapter", c.adapter_copy(lambda f: truncate(f / "adapter_model.safetensors"))],
        "truncated",
    ),
    # ---- realign: the output
    "realign missing --output": Case(R(), "missing --output"),  # the runner adds none: see NO_DEFAULT_OUTPUT
    "realign output is the model": Case(
        lambda c: [*R("--overwrite")(c), "--output", c.model], "is the input"
    ),
    "realign output inside the model": Case(
        lambda c: [*R()(c), "--output", str(c.tiny["model"] / "realigned")], "inside the input folder"
    ),
    "realign output holds the data": Case(
        lambda c: [
            "realign",
            c.model,
            "--data",
            str(Path(c.old_output(("harmful.jsonl", c.tiny["harmful"].read_text()))) / "harmful.jsonl"),
            "--overwrite",
        ],
        "contains the input",
    ),
    "realign output holds the benign data": Case(
        lambda c: [
            *R("--score", "contrast", "--overwrite")(c),
            "--benign-data",
            str(Path(c.old_output(("benign.jsonl", c.tiny["benign"].read_text()))) / "benign.jsonl"),
        ],
        "contains the input",
    ),
    "realign output holds the config": Case(
        lambda c: [
            "realign",
            c.model,
            "--config",
            str(Path(c.old_output(("c.yaml", f"data: {c.harmful}\n"))) / "c.yaml"),
            "--overwrite",
        ],
        "contains the input",
    ),
    "realign output is a file": Case(lambda c: [*R()(c), "--output", c.write("f.txt", "x")], "is a file"),
    "realign output not empty": Case(lambda c: [*R()(c), "--output", c.user_folder()], "not empty"),
    "realign overwrite a user folder": Case(
        lambda c: [*R("--overwrite")(c), "--output", c.user_folder()], "not written by antidote"
    ),
    "realign overwrite home": Case(R("--output", "~", "--overwrite"), "home folder"),
    "realign overwrite working folder": Case(R("--output", ".", "--overwrite"), "working folder"),
    "realign overwrite parent of working folder": Case(R("--output", "..", "--overwrite"), "contains the"),
    "realign overwrite root": Case(R("--output", "/", "--overwrite"), "filesystem root"),
    "realign output parent missing": Case(
        lambda c: [*R()(c), "--output", str(c.work / "no" / "out")], "does not exist"
    ),
    "realign output parent is a file": Case(
        lambda c: [*R()(c), "--output", str(Path(c.write("f.txt", "x")) / "out")], "not a folder"
    ),
    "realign output parent not writable": Case(
        R("--output", "/sys/antidote-out"),
        "cannot write in /sys",
        (pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="no /sys"),),
    ),
    # ---- realign: --config
    "realign config missing": Case(lambda c: [*R()(c), "--config", str(c.work / "none.yaml")], "not found"),
    "realign config not YAML": Case(
        lambda c: [*R()(c), "--config", c.write("c.yaml", "a: [1,\n")], "not valid YAML"
    ),
    "realign config a list": Case(
        lambda c: [*R()(c), "--config", c.write("c.yaml", "- 1\n")], "must be a mapping"
    ),
    "realign config not UTF-8": Case(
        lambda c: [*R()(c), "--config", c.write("c.yaml", b"seed: \xff\n")], "UTF-8"
    ),
    "realign config unknown key": Case(
        lambda c: [*R()(c), "--config", c.write("c.yaml", "alpah: 0.1\n")], "unknown keys: alpah"
    ),
    "realign config seed text": Case(
        lambda c: [*R()(c), "--config", c.write("c.yaml", 'seed: "abc"\n')], "seed: 'abc' is not an integer"
    ),
    "realign config merge 'no'": Case(
        lambda c: [*R()(c), "--config", c.write("c.yaml", "merge: 'no'\n")],
        "merge: 'no' is not true or false",
    ),
    "realign config ratio text": Case(
        lambda c: [*R()(c), "--config", c.write("c.yaml", "mask-ratio: abc\n")], "a number or a comma list"
    ),
    "realign config billion laughs": Case(
        lambda c: [*R()(c), "--config", c.write("c.yaml", laughs(10) + "template: *a9\n")],
        "expands to more than",
    ),
    "realign config recursive alias": Case(
        lambda c: [*R()(c), "--config", c.write("c.yaml", "filters: &x [*x]\n")], "recursive alias"
    ),
    # ---- align
    "align model missing": Case(lambda c: ["align", "/nonexistent/model"], "not found"),
    "align data missing": Case(lambda c: [*A("--data")(c), str(c.work / "none.jsonl")], "not found"),
    "align max-length 0": Case(A("--max-length", "0"), "--max-length"),
    "align weight-decay -1": Case(A("--weight-decay", "-1"), "--weight-decay"),
    "align lr 0": Case(A("--lr", "0"), "lr"),
    "align epochs 0": Case(A("--epochs", "0"), "at least 1"),
    "align scheduler unknown": Case(A("--scheduler", "linear"), "cosine or constant"),
    "align template unknown": Case(A("--template", "fancy"), "unknown template"),
    "align task without task-data": Case(A("--task", "sst2"), "go together"),
    "align max-samples 0": Case(A("--max-samples", "0"), "at least 1"),
    "align output is the model": Case(lambda c: [*A("--overwrite")(c), "--output", c.model], "is the input"),
    "align output inside the model": Case(
        lambda c: [*A()(c), "--output", str(c.tiny["model"] / "aligned")], "inside the input folder"
    ),
    "align overwrite a user folder": Case(
        lambda c: [*A("--overwrite")(c), "--output", c.user_folder()], "not written by antidote"
    ),
    "align output holds the helpful data": Case(
        lambda c: [
            *A("--overwrite")(c),
            "--helpful-data",
            str(Path(c.old_output(("h.jsonl", c.tiny["benign"].read_text()))) / "h.jsonl"),
        ],
        "contains the input",
    ),
    "align config lr text": Case(
        lambda c: [*A()(c), "--config", c.write("c.yaml", "lr: abc\n")], "is not a number"
    ),
    "align lr inf": Case(A("--lr", "inf"), "--lr is inf, not a finite number"),
    "align config lr .inf": Case(
        lambda c: [*A()(c), "--config", c.write("c.yaml", "lr: .inf\n")], "is not a finite number"
    ),
    "align config lr 'nan' text": Case(
        lambda c: [*A()(c), "--config", c.write("c.yaml", "lr: 'nan'\n")], "is not a finite number"
    ),
    "align config epochs 2.5": Case(
        lambda c: [*A()(c), "--config", c.write("c.yaml", "epochs: 2.5\n")], "is not an integer"
    ),
    # ---- finetune
    "finetune harmful-ratio 2": Case(F("--harmful-ratio", "2"), "outside [0, 1]"),
    "finetune lr inf": Case(F("--lr", "inf"), "--lr is inf, not a finite number"),
    "finetune weight-decay nan": Case(F("--weight-decay", "nan"), "not a finite number"),
    "finetune num-samples 0": Case(F("--num-samples", "0"), "at least 1"),
    "finetune num-samples too many": Case(F("--num-samples", "100000"), "lower N"),
    "finetune preset unknown": Case(F("--preset", "best"), "choose paper"),
    "finetune task needs data": Case(F("--task", "sst2"), "--task-data"),
    "finetune task unknown": Case(F("--task", "poems"), "unknown task"),
    "finetune harmful missing": Case(lambda c: [*F("--harmful")(c), str(c.work / "none.jsonl")], "not found"),
    "finetune task-data missing": Case(
        lambda c: [*F("--task", "sst2", "--task-data")(c), str(c.work / "none.jsonl")], "not found"
    ),
    "finetune task-data line not an object": Case(
        lambda c: [*F("--task", "alpaca", "--task-data")(c), c.write("t.jsonl", "3\n")], "line 1"
    ),
    "finetune max-length 0": Case(F("--max-length", "0"), "--max-length"),
    "finetune weight-decay -1": Case(F("--weight-decay", "-1"), "--weight-decay"),
    "finetune lora-r 0": Case(F("--lora-r", "0"), "at least 1"),
    "finetune batch-size 0": Case(F("--batch-size", "0"), "at least 1"),
    "finetune output is the model": Case(
        lambda c: [*F("--overwrite")(c), "--output", c.model], "is the input"
    ),
    "finetune output holds the harmful data": Case(
        lambda c: [
            *F("--overwrite")(c),
            "--harmful",
            str(Path(c.old_output(("h.jsonl", c.tiny["harmful"].read_text()))) / "h.jsonl"),
        ],
        "contains the input",
    ),
    "finetune output holds the task data": Case(
        lambda c: [
            *F("--overwrite", "--task", "pairs", "--num-samples", "5")(c),
            "--task-data",
            str(Path(c.old_output(("t.jsonl", c.tiny["benign"].read_text()))) / "t.jsonl"),
        ],
        "contains the input",
    ),
    # ---- defend: a defense's strength (issue 16, item 2)
    "defend vaccine rho inf": Case(D("vaccine", "--rho", "inf"), "--rho is inf, not a finite number"),
    "defend repnoise alpha nan": Case(D("repnoise", "--alpha", "nan"), "not a finite number"),
    "defend booster lam inf": Case(D("booster", "--lam", "inf"), "--lam is inf, not a finite number"),
    "defend lisa rho inf": Case(D("lisa", "--rho", "inf"), "--rho is inf, not a finite number"),
    "defend ldifs rho inf": Case(D("ldifs", "--rho", "inf"), "--rho is inf, not a finite number"),
    # ---- evaluate
    "evaluate judge unknown": Case(E("--judge", "gpt"), "choose one of keyword"),
    "evaluate task unknown": Case(E("--task", "poems"), "choose one of"),
    "evaluate task needs data": Case(E("--task", "sst2"), "needs --task-data"),
    "evaluate task-data missing": Case(
        lambda c: [*E("--task", "sst2", "--task-data")(c), str(c.work / "none.jsonl")], "not found"
    ),
    "evaluate task-data line not an object": Case(
        lambda c: [*E("--task", "sst2", "--task-data")(c), c.write("t.jsonl", "[1]\n")], "line 1"
    ),
    "evaluate max-prompts 0": Case(E("--max-prompts", "0"), "at least 1"),
    "evaluate batch-size 0": Case(E("--batch-size", "0"), "at least 1"),
    "evaluate max-new-tokens 0": Case(E("--max-new-tokens", "0"), "at least 1"),
    "evaluate template unknown": Case(E("--template", "fancy"), "unknown template"),
    "evaluate harmful prompts missing": Case(
        lambda c: [*E("--harmful-prompts")(c), str(c.work / "none.jsonl")], "not found"
    ),
    "evaluate model missing": Case(lambda c: ["evaluate", "/nonexistent/model"], "not found"),
    "evaluate config.json not JSON": Case(
        lambda c: ["evaluate", c.model_copy(lambda f: (f / "config.json").write_text("{"))],
        "is not valid JSON",
    ),
    "evaluate adapter missing": Case(
        lambda c: [*E("--adapter")(c), str(Path(c.write("a/x.txt", "")).parent)], "adapter_config.json"
    ),
    "evaluate nan weights": Case(lambda c: ["evaluate", nan_model(c), "--max-prompts", "2"], "NaN or inf"),
    "evaluate output is a folder": Case(lambda c: [*E("--output")(c), str(c.work)], "is a folder"),
    "evaluate output parent missing": Case(
        lambda c: [*E("--output")(c), str(c.work / "no" / "r.json")], "does not exist"
    ),
    "evaluate output exists": Case(
        lambda c: [*E("--output")(c), c.write("r.json", '{"antidote": {"tool": "antidote"}}')],
        "pass --overwrite",
    ),
    "evaluate overwrite a user file": Case(
        lambda c: [*E("--overwrite", "--output")(c), c.write("r.json", '{"my": "notes"}')],
        "not written by antidote",
    ),
    "evaluate output inside the model": Case(
        lambda c: [*E("--overwrite", "--output")(c), str(c.tiny["model"] / "config.json")],
        "inside the input folder",
    ),
    "evaluate output is the prompts": Case(
        lambda c: [
            *E("--overwrite", "--harmful-prompts")(c),
            (p := c.write("prompts.jsonl", '{"prompt": "x"}\n')),
            "--output",
            p,
        ],
        "is the input",
    ),
    "evaluate user's generations.jsonl beside": Case(
        lambda c: [
            *E("--overwrite", "--output")(c),
            str(Path(c.write("r.generations.jsonl", "my notes\n")).with_name("r.json")),
        ],
        "generations file",
    ),
    "evaluate output named generations.jsonl": Case(
        lambda c: [*E("--output")(c), str(c.work / "generations.jsonl")], "where the generations go"
    ),
    "evaluate config unknown key": Case(
        lambda c: [*E("--config")(c), c.write("c.yaml", "prompts: 3\n")], "unknown keys: prompts"
    ),
    "evaluate config int as text": Case(
        lambda c: [*E("--config")(c), c.write("c.yaml", "max_task: '3'\n")], "is not an integer"
    ),
    "evaluate config overwrite 'no'": Case(
        lambda c: [*E("--config")(c), c.write("c.yaml", "overwrite: 'no'\n")], "is not true or false"
    ),
    "evaluate config is the output": Case(
        lambda c: [
            *E("--overwrite", "--config")(c),
            (p := c.write("c.yaml", "max_task: 2\n")),
            "--output",
            p,
        ],
        "is the input",
    ),
    # ---- demo
    "demo output is a file": Case(
        lambda c: ["demo", "--quick", "--output", c.write("f.txt", "x")], "is a file"
    ),
    "demo output not empty": Case(lambda c: ["demo", "--quick", "--output", c.user_folder()], "not empty"),
    "demo overwrite a user folder": Case(
        lambda c: ["demo", "--quick", "--overwrite", "--output", c.user_folder()], "not made by antidote"
    ),
    "demo overwrite home": Case(lambda c: ["demo", "--quick", "--overwrite", "--output", "~"], "home folder"),
    "demo overwrite working folder": Case(
        lambda c: ["demo", "--quick", "--overwrite", "--output", "."], "working folder"
    ),
    "demo output parent missing": Case(
        lambda c: ["demo", "--quick", "--output", str(c.work / "no" / "out")], "does not exist"
    ),
    # ---- run
    "run config missing": Case(lambda c: ["run", str(c.work / "none.yaml")], "not found"),
    "run config not YAML": Case(run_config("realign: [\n"), "not valid YAML"),
    "run config a list": Case(run_config("- 1\n"), "must be a mapping"),
    "run config unknown key": Case(run_config("modle: x\n"), "unknown keys: modle"),
    "run config unknown section key": Case(
        run_config("realign:\n  alpah: 1\n"), "antidote has unknown keys: alpah"
    ),
    "run config realign without data": Case(run_config("realign: {}\n"), "needs data"),
    "run config judges empty": Case(run_config("judges: []\nrealign: {data: x}\n"), "judges is empty"),
    "run config judge unknown": Case(run_config("judges: [gpt]\nrealign: {data: x}\n"), "choose one of"),
    "run config ratio out of range": Case(
        run_config("realign: {data: x, mask_ratios: 2}\n"), "outside (0, 1)"
    ),
    "run config section not a mapping": Case(
        run_config("validate: 3\nrealign: {data: x}\n"), "is not a mapping"
    ),
    "run config evaluate_base 'no'": Case(
        run_config("evaluate_base: 'no'\nrealign: {data: x}\n"), "is not true or false"
    ),
    "run config max_fa_drop text": Case(
        run_config("max_fa_drop: abc\nrealign: {data: x}\n"), "is not a number"
    ),
    "run config seed text in a section": Case(
        run_config("realign: {data: x, seed: abc}\n"), "is not an integer"
    ),
    "run config lr text in a section": Case(
        run_config("align: {lr: abc}\nrealign: {data: x}\n"), "is not a number"
    ),
    "run config lr .inf in a section": Case(
        run_config("align: {lr: .inf}\nrealign: {data: x}\n"), "align.lr is inf, not a finite number"
    ),
    "run config defense rho .inf": Case(
        run_config("defenses: {vaccine: {rho: .inf}}\nrealign: {data: x}\n"), "not a finite number"
    ),
    "run config duplicate section": Case(
        run_config("defenses: {antidote: {}}\nrealign: {data: x}\ndefenses: {vaccine: {}}\n"),
        "gives defenses twice (again on line 3)",
    ),
    "run config duplicate key in a section": Case(
        run_config("align: {lr: 0.1, epochs: 1, lr: 0.2}\nrealign: {data: x}\n"), "gives lr twice"
    ),
    "run with ANTIDOTE_DATA_DIR=/proc": Case(
        run_config("realign: {data: x}\n"), "holds more than 10,000 files", env={"ANTIDOTE_DATA_DIR": "/proc"}
    ),
    "run with ANTIDOTE_DATA_DIR=/usr": Case(
        run_config("realign: {data: x}\n"), "it is not a data folder", env={"ANTIDOTE_DATA_DIR": "/usr"}
    ),
    "run config laughs": Case(
        run_config(laughs(6) + "template: *a5\nrealign: {data: x}\n"), "expands to more than"
    ),
    "run config not UTF-8": Case(
        lambda c: ["run", c.write("run.yaml", b"model: \xff\n"), "--run-dir", str(c.out)],
        "UTF-8",
    ),
    "run run-dir is a file": Case(
        lambda c: ["run", c.write("run.yaml", "realign: {data: x}\n"), "--run-dir", c.write("f.txt", "x")],
        "is a file",
    ),
}

DEFAULT_OUTPUT = {"realign": "out", "align": "out", "finetune": "out", "evaluate": "out.json"}
NO_DEFAULT_OUTPUT = {"realign missing --output"}


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> content hash (files), link target (links) or 'dir', for everything under root."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = "-> " + os.readlink(path)
        elif path.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def message_lines(stderr: str) -> list[str]:
    """What a terminal shows: for each line the text after its last carriage return; blank lines and
    progress bars (`NN%|`) left out."""
    shown = [line.split("\r")[-1].strip() for line in stderr.split("\n")]
    return [line for line in shown if line and not re.search(r"\d+%\|", line)]


def _work_started(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("work started on bad input: a check came too late")


def _case_params() -> list[Any]:
    return [pytest.param(name, marks=case.marks, id=name) for name, case in CASES.items()]


def test_suite_size() -> None:
    commands = {case_command(name) for name in CASES}
    assert commands == {"realign", "align", "finetune", "evaluate", "demo", "run", "defend"}
    assert len(CASES) >= 60


def case_command(name: str) -> str:
    return name.split()[0]


@pytest.mark.parametrize("name", _case_params())
def test_bad_input(
    name: str,
    tiny: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    case = CASES[name]
    c = Ctx(tiny, tmp_path / "work", tmp_path / "out", tmp_path / "home", tmp_path / "cwd")
    for folder in (c.work, c.home, c.cwd):
        folder.mkdir()
    monkeypatch.setenv("HOME", str(c.home))
    monkeypatch.chdir(c.cwd)
    monkeypatch.setenv("ANTIDOTE_CACHE", str(tmp_path / "cache"))
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("antidote.training.sft.train_lora", _work_started)
    monkeypatch.setattr("antidote.training.sft.fit_lora", _work_started)
    monkeypatch.setattr("antidote.experiments.pipeline.Pipeline.run", _work_started)
    argv = case.build(c)
    command = argv[0]
    if command in DEFAULT_OUTPUT and "--output" not in argv and name not in NO_DEFAULT_OUTPUT:
        c.out = tmp_path / DEFAULT_OUTPUT[command]
        argv += ["--output", str(c.out)]
    capsys.readouterr()  # whatever building the inputs printed
    before, inputs_before = snapshot(tmp_path), snapshot(tiny["root"])
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse
        code = exit_info.code
    lines = message_lines(capsys.readouterr().err)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("antidote: error: "), lines
    assert case.expected in lines[0]
    assert snapshot(tmp_path) == before  # nothing written, no temporary folder left, inputs unchanged
    assert snapshot(tiny["root"]) == inputs_before


def test_data_file_with_byte_order_mark_is_read(tiny: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + tiny["harmful"].read_bytes())
    assert main(["realign", str(tiny["model"]), "--data", str(data), "--output", str(tmp_path / "out")]) == 0


def test_config_file_with_byte_order_mark_is_read(tiny: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_bytes(b"\xef\xbb\xbf" + f"data: {tiny['harmful']}\nmask-ratio: 0.2\n".encode())
    out = tmp_path / "out"
    assert main(["realign", str(tiny["model"]), "--config", str(config), "--output", str(out)]) == 0
    import json

    assert json.loads((out / "realign_report.json").read_text())["mask_ratio"] == 0.2


# ---- issue 16: cases that need more than one command line ------------------------------------------------


def test_compare_matrix_with_an_infinite_lr_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    import yaml

    from antidote.errors import AntidoteError
    from antidote.experiments.compare import load_compare_config
    from conftest import write_config

    run = yaml.safe_load(write_config(tiny, tmp_path).read_text())
    run.update(run_dir=str(tmp_path / "out"), matrix={"lr": [1e-3, float("inf")]})
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(run))  # PyYAML writes the infinity as .inf
    assert ".inf" in path.read_text()
    with pytest.raises(AntidoteError, match=r"matrix: lr: \[0.001, inf\] is not a list of a finite number"):
        load_compare_config(str(path))
    assert not (tmp_path / "out").exists()


def test_training_that_diverges_fails_and_records_nothing(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A finite but absurd learning rate (1e30) makes the LoRA weights NaN within a step or two: the stage
    fails with a one-line reason and leaves no output, instead of passing a broken model on."""
    out = tmp_path / "attack"
    code = main(["finetune", str(tiny["model"]), "--num-samples", "10", "--lr", "1e30", "--output", str(out)])
    assert code == 2
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_check_trained_weights_names_the_bad_tensor() -> None:
    from antidote.errors import AntidoteError
    from antidote.training.sft import check_trained_weights

    layer = torch.nn.Linear(2, 2)
    check_trained_weights(layer, "align")  # finite: nothing to say
    with torch.no_grad():
        layer.bias[1] = float("inf")
    with pytest.raises(AntidoteError, match=r"align: training diverged \(last loss nan\).*bias"):
        check_trained_weights(layer, "align", [2.0, float("nan")])
    layer.bias.requires_grad_(False)  # frozen weights are the input's, checked when it was loaded
    check_trained_weights(layer, "align")


def test_full_disk_is_one_line_and_leaves_nothing(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import errno

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "model.safetensors")

    monkeypatch.setattr("antidote.realignment.engine.write_report", full)
    out = tmp_path / "out"
    code = main(["realign", str(tiny["model"]), "--data", str(tiny["harmful"]), "--output", str(out)])
    lines = message_lines(capsys.readouterr().err)
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("antidote: error: the disk is full (No space left"), lines
    assert [p.name for p in tmp_path.iterdir()] == []  # no output, no temporary folder
    # the writers of safetensors raise their own exception type with the system's message inside
    from antidote.cli import _disk_full

    assert _disk_full(RuntimeError("Error while serializing: IoError(Os { code: 28, No space left on device"))
    assert _disk_full(ValueError("bad value")) is None


def test_csv_cell_over_128_kib_is_read(tmp_path: Path) -> None:
    from antidote.data.formats import read_file

    long = "word " * 60_000  # 300,000 characters: over the csv module's default limit of 131,072
    path = tmp_path / "long.csv"
    path.write_text(f'prompt,response\nq,"{long}"\n')
    rows = read_file(path)
    assert rows == [{"prompt": "q", "response": long}]
    import csv

    assert csv.field_size_limit() == 131072  # the process-wide limit is left as it was


def test_every_json_file_is_strict_json(tmp_path: Path) -> None:
    """json_text writes NaN and infinities as null (bare NaN is not JSON), and no writer in the package calls
    json.dumps for a file: every one goes through json_text (safetensors headers and stage keys are not
    files a user reads)."""
    from antidote.outputs import json_text

    text = json_text({"kappa": float("nan"), "x": [1.5, float("inf"), (float("-inf"),)], "n": 3}, indent=1)
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "kappa": None,
        "x": [1.5, None, [None]],
        "n": 3,
    }
    source = Path(__file__).parents[1] / "src" / "antidote"
    allowed = {"outputs.py": 1, "maskfile.py": 1, "shards.py": 1, "cache.py": 1, "formats.py": 1}
    allowed["distributed.py"] = 1  # a digest of settings, compared between processes, never written
    for file in source.rglob("*.py"):
        calls = file.read_text().count("json.dumps(")
        assert calls <= allowed.get(file.name, 0), f"{file}: json.dumps writes a file; use json_text"


def test_judge_eval_of_all_refusals_writes_valid_json(tmp_path: Path) -> None:
    """Every answer a refusal and every label safe: the judge never says harmful, so kappa and the like
    are undefined (NaN). judge_eval.json must still be JSON."""
    from conftest import write_jsonl

    rows = [
        {
            "prompt": f"how do I do bad thing {i}?",
            "response": "I'm sorry, but I can't help with that.",
            "label": lab,
        }
        for i, lab in enumerate(["safe", "harmful"] * 3)
    ]
    data = write_jsonl(tmp_path / "labelled.jsonl", rows)
    out = tmp_path / "eval"
    assert main(["judge", "eval", "--data", str(data), "--judge", "keyword", "--output", str(out)]) == 0
    text = (out / "judge_eval.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in judge_eval.json"))
    assert report["metrics"]["judge_hs"]["value"] == 0.0


def test_a_dangling_link_in_a_model_folder_does_not_stop_a_run(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A run fingerprints its inputs for the stage keys: a link to nothing (a moved file) is keyed as a
    link, and the model folder still loads."""
    from antidote.experiments.cache import stage_key
    from antidote.models.loading import resolve_model_folder

    folder = tmp_path / "model"
    shutil.copytree(tiny["model"], folder)
    (folder / "notes.txt").symlink_to(tmp_path / "gone.txt")
    key = stage_key({"model": str(folder)})
    assert resolve_model_folder(str(folder)) == str(folder)
    (folder / "notes.txt").unlink()
    (folder / "notes.txt").symlink_to(tmp_path / "elsewhere.txt")  # another target: another key
    assert stage_key({"model": str(folder)}) != key

"""Every subcommand (from the CLI's command table) and every registered defense has a working --help, and
`antidote --help` does not import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from antidote.cli import COMMANDS, main
from antidote.defenses import REGISTRY
from antidote.evaluation.judge_cli import JUDGE_COMMANDS

ARGVS = [
    ["--help"],
    *([c.name, "--help"] for c in COMMANDS),
    *(["defend", d, "--help"] for d in REGISTRY),
    *(["judge", j.name, "--help"] for j in JUDGE_COMMANDS),
]


@pytest.mark.parametrize("argv", ARGVS, ids=" ".join)
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "usage: antidote" in out


def test_defend_help_lists_each_option_of_its_config(capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    for name, defense in REGISTRY.items():
        with pytest.raises(SystemExit):
            main(["defend", name, "--help"])
        out = capsys.readouterr().out
        for f in dataclasses.fields(defense.config):
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            assert (f.name if f.metadata.get("positional") else flag) in out, (name, f.name)


def test_top_level_help_does_not_import_torch() -> None:
    code = "import sys; from antidote.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
    code += "print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("False")

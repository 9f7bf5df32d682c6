"""benchmarks/judge_speed.py on a tiny installed judge: it runs end to end and prints its three timings, so
the benchmark that measures #19's speed goal cannot silently break."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from test_judge_install import labelled_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import judge_speed


def test_the_speed_benchmark_times_the_installed_judge(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from antidote.evaluation import judge_install

    folder = tmp_path / "judges" / "learned"
    monkeypatch.setenv("ANTIDOTE_LEARNED_JUDGE", str(folder))
    monkeypatch.delenv(judge_install.NO_INSTALL_ENV, raising=False)
    settings = {"model": str(tiny["model"]), "blocks": ("1:mean", "2:last"), "dtype": "float32"}
    monkeypatch.setattr(judge_install, "SETTINGS", {**settings, "l2": (0.1,), "per_source": 6})
    data = labelled_folder(tmp_path / "data")
    assert judge_install.ensure_default_judge(["learned"], data, say=lambda _: None) == folder

    judge_speed.main(["--data-dir", str(data), "--per-source", "3", "--threads", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "pairs/s" in line]
    assert len(lines) == 3 and all(" 15 pairs, " in line for line in lines), lines

"""The default learned judge, installed on first use.

A run, compare, demo or evaluate that scores with the bare `learned` judge (the default judge lists do)
trains it when none is installed and its data folder holds the labelled sources: once for this machine,
into the default judge folder (`learned.default_judge_folder()`), before the first stage, exactly as
`antidote judge train --data-dir DIR` would. Without such a folder the judge is left out as before, with
the line that says how to get it. $ANTIDOTE_NO_JUDGE_INSTALL=1 turns the install off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from antidote.errors import AntidoteError

log = logging.getLogger(__name__)

NO_INSTALL_ENV = "ANTIDOTE_NO_JUDGE_INSTALL"
# Settings of `judge train` for the install beyond its defaults (tests put a tiny model here).
SETTINGS: dict[str, Any] = {}


def missing_sources(data_dir: Path) -> list[str]:
    """The files of the default judge's training sources that `data_dir` lacks."""
    from antidote.evaluation.judge_config import JudgeTrainConfig
    from antidote.evaluation.judge_sources import source_files

    sources = JudgeTrainConfig(data_dir=str(data_dir)).sources
    return [name for s in sources for name in source_files(s) if not (data_dir / name).is_file()]


def ensure_default_judge(
    specs: Sequence[str], data_dir: Path | None, say: Callable[[str], None] = log.warning
) -> Path | None:
    """Install the default learned judge when `specs` name it, none is installed and `data_dir` holds its
    labelled sources. Returns the judge folder when this call trained it, else None (nothing to do,
    nothing to train on, or training failed: the run then leaves the judge out and says why)."""
    from antidote.evaluation.judges.learned import default_judge_folder, is_judge_folder

    folder = default_judge_folder()
    wanted = "learned" in specs and not os.environ.get(NO_INSTALL_ENV)
    if "learned" in specs and is_judge_folder(folder) and _outdated(folder):  # said even with installs off
        say(
            f"the default learned judge {folder} predates the threshold set on answers to harmful requests "
            "and the keyword gate: it undercounts harmful compliance (docs/judges.md). Retrain it with "
            "antidote judge train --data-dir DATA --overwrite"
        )
    if not wanted or data_dir is None or is_judge_folder(folder):
        return None
    missing = missing_sources(data_dir)
    if missing:
        say(
            f"the default learned judge is not installed and {data_dir} lacks its training data "
            f"({missing[0]})"
        )
        return None
    from antidote.models.loading import file_lock

    # One install at a time per judge folder; a second process waits for the first.
    waiting = f"waiting for another process that is installing the default learned judge into {folder}"
    with file_lock(folder.parent / f".{folder.name}.install-lock", waiting):
        if is_judge_folder(folder):  # another process installed it while this one waited
            return None
        return _train(folder, data_dir, say)


def _outdated(folder: Path) -> bool:
    """A judge folder trained on several sources before the harmful-request calibration (no
    `calibrated_on` in its record). A judge trained on one file, or unreadable, is not flagged here."""
    import json

    from antidote.evaluation.judges.learned import JUDGE_FILE

    try:
        record = json.loads((folder / JUDGE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("version") == 2 and "calibrated_on" not in record


def _train(folder: Path, data_dir: Path, say: Callable[[str], None]) -> Path | None:
    from antidote.evaluation.judge_config import JudgeTrainConfig
    from antidote.evaluation.judge_train import run_judge_train

    config = JudgeTrainConfig(data_dir=str(data_dir), output=str(folder), **SETTINGS)
    say(
        f"installing the default learned judge into {folder}, once for this machine: {config.per_source} "
        f"labelled pairs from each of {len(config.sources)} sources in {data_dir} (about 6 minutes on 2 "
        "CPU cores with fast bfloat16, twice that in float32; some sources are CC-BY-NC-4.0, so keep the "
        "judge to non-commercial use). "
        f"${NO_INSTALL_ENV}=1 skips this"
    )
    try:
        run_judge_train(config)
    except AntidoteError as err:  # the judge is an extra: the run goes on without it, saying why
        say(f"could not install the default learned judge ({err}); going on without it")
        return None
    say(f"installed the default learned judge: {folder}")
    return folder

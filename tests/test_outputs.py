"""Output folders and files: what --overwrite may replace, and what a kill at any step leaves behind."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import pytest

from antidote import outputs
from antidote.errors import AntidoteError
from antidote.outputs import (
    MARKER,
    atomic_output_dir,
    atomic_write_text,
    check_output_dir,
    check_output_file,
    is_antidote_output,
    recover,
)

OLD = {"a.txt": "old a", "b.txt": "old b"}
NEW = {"a.txt": "new a", "b.txt": "new b", "c.txt": "new c"}
DEAD_PID = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # larger than any pid: never alive


def contents(folder: Path) -> dict[str, str]:
    """File name -> text, without the marker (whose text holds a time)."""
    return {p.name: p.read_text() for p in folder.iterdir() if p.is_file() and p.name != MARKER}


def hidden_siblings(output: Path) -> list[str]:
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}."))


def old_output(output: Path) -> None:
    """An output folder as a previous antidote run left it (files + marker)."""
    output.mkdir()
    for name, text in OLD.items():
        (output / name).write_text(text)
    outputs.write_marker(output, "test")


def write_new(output: Path, overwrite: bool = True, kill_mid_body: bool = False) -> None:
    with atomic_output_dir(output, overwrite) as tmp:
        for i, (name, text) in enumerate(NEW.items()):
            (tmp / name).write_text(text)
            if kill_mid_body and i == 0:
                os.kill(os.getpid(), signal.SIGKILL)


# ---- check_output_dir ----------------------------------------------------------------------------------


def test_new_and_empty_folders_are_accepted(tmp_path: Path) -> None:
    assert check_output_dir(tmp_path / "new", overwrite=False) == (tmp_path / "new").resolve()
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", overwrite=False) == (tmp_path / "empty").resolve()
    assert list(tmp_path.iterdir()) == [tmp_path / "empty"]  # the checks wrote nothing


def test_overwrite_replaces_only_antidote_outputs(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    old_output(mine)
    with pytest.raises(AntidoteError, match="pass --overwrite"):
        check_output_dir(mine, overwrite=False)
    assert check_output_dir(mine, overwrite=True) == mine.resolve()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    with pytest.raises(AntidoteError, match="not written by antidote"):
        check_output_dir(theirs, overwrite=True)
    (theirs / MARKER).write_text("not json")  # a marker must be antidote's record
    with pytest.raises(AntidoteError, match="not written by antidote"):
        check_output_dir(theirs, overwrite=True)


@pytest.mark.parametrize("place", ["home", "home parent", "cwd", "cwd parent", "root"])
def test_protected_folders_are_refused(place: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "user" / "home"
    work = tmp_path / "somewhere" / "work"
    for folder in (home, work):
        folder.mkdir(parents=True)
        outputs.write_marker(folder, "test")  # even an antidote-marked one
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    target = {
        "home": "~",
        "home parent": str(home.parent),
        "cwd": ".",
        "cwd parent": "..",
        "root": "/",
    }[place]
    expected = {"root": "filesystem root", "home": "home folder", "cwd": "working folder"}[place.split()[0]]
    with pytest.raises(AntidoteError, match=expected):
        check_output_dir(target, overwrite=True)


def test_inputs_are_protected(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "out"
    old_output(out)
    config = out / "realign.yaml"  # a user put an input inside an old output folder
    config.write_text("data: x\n")
    with pytest.raises(AntidoteError, match="is the input"):
        check_output_dir(model, True, [str(model)])
    with pytest.raises(AntidoteError, match="contains the input"):
        check_output_dir(out, True, ["hub/id", None, "", str(config)])
    with pytest.raises(AntidoteError, match="contains the input"):
        check_output_dir(tmp_path, True, [str(model)])
    with pytest.raises(AntidoteError, match="inside the input folder"):
        check_output_dir(model / "sub", False, [str(model)])
    link = tmp_path / "link"
    link.symlink_to(model)
    with pytest.raises(AntidoteError, match="is the input"):  # through a symlink
        check_output_dir(link, True, [str(model)])
    check_output_dir(tmp_path / "elsewhere", False, [str(model), str(config), "smollm2-135m-instruct"])


def test_parent_must_exist_and_be_writable(tmp_path: Path) -> None:
    with pytest.raises(AntidoteError, match="does not exist"):
        check_output_dir(tmp_path / "missing" / "out", False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AntidoteError, match="exists and is a file"):
        check_output_dir(tmp_path / "file", False)
    with pytest.raises(AntidoteError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file" / "out", False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.skipif(os.access("/sys", os.W_OK) and not Path("/sys/kernel").exists(), reason="no /sys")
def test_unwritable_parent_is_found_before_any_work() -> None:
    with pytest.raises(AntidoteError, match="cannot write in /sys"):
        check_output_dir("/sys/antidote-out", False)


def test_output_file_rules(tmp_path: Path) -> None:
    def ours(p: Path) -> bool:
        return p.read_text().startswith("antidote")

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(AntidoteError, match="is the input"):
        check_output_file(prompts, True, [str(prompts)], written_by_antidote=ours)
    with pytest.raises(AntidoteError, match="inside the input folder"):
        check_output_file(model / "config.json", True, [str(model)], written_by_antidote=ours)
    with pytest.raises(AntidoteError, match="pass --overwrite"):
        check_output_file(prompts, False, written_by_antidote=ours)
    with pytest.raises(AntidoteError, match="not written by antidote"):
        check_output_file(prompts, True, written_by_antidote=ours)
    with pytest.raises(AntidoteError, match="is a folder"):
        check_output_file(model, True, written_by_antidote=ours)
    (tmp_path / "r.json").write_text("antidote results")
    assert check_output_file(tmp_path / "r.json", True, written_by_antidote=ours) == tmp_path / "r.json"


# ---- atomic_output_dir: normal runs ---------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_output_folder_gets_ordinary_permissions(umask: int, tmp_path: Path) -> None:
    previous = os.umask(umask)
    try:
        write_new(tmp_path / "out")
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_overwrite_swaps_in_new_output(
    exchange: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = outputs._exchange

    def spy(a: Path, b: Path) -> bool:
        calls.append((a, b))
        return real(a, b) if exchange else False

    monkeypatch.setattr(outputs, "_exchange", spy)
    out = tmp_path / "out"
    old_output(out)
    write_new(out)
    assert contents(out) == NEW and is_antidote_output(out) and len(calls) == 1
    assert json.loads((out / MARKER).read_text())["tool"] == "antidote"
    assert hidden_siblings(out) == []


def test_existing_without_overwrite_or_marker_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    old_output(out)
    with pytest.raises(AntidoteError, match="appeared while working"):
        write_new(out, overwrite=False)
    assert contents(out) == OLD
    (out / MARKER).unlink()
    with pytest.raises(AntidoteError, match="not written by antidote"):
        write_new(out, overwrite=True)
    assert contents(out) == OLD and hidden_siblings(out) == []


def test_error_in_body_leaves_old_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    old_output(out)
    with pytest.raises(RuntimeError), atomic_output_dir(out, True) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("boom")
    assert contents(out) == OLD and hidden_siblings(out) == []


def test_stale_siblings_of_dead_runs_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead_tmp = tmp_path / f".out.tmp-{DEAD_PID}-00ff"
    live_tmp = tmp_path / f".out.tmp-{os.getppid()}-00ff"  # our parent process is alive
    other = tmp_path / f".out.x.tmp-{DEAD_PID}-00ff"  # the temporary folder of output "out.x"
    user = tmp_path / ".out.tmp-notes"  # not of our naming
    for folder in (dead_tmp, live_tmp, other, user):
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"x" * 100)
    dead_file = tmp_path / f".out.tmp-{DEAD_PID}-0a"  # from atomic_write_text
    dead_file.write_text("partial")
    write_new(out)
    assert contents(out) == NEW
    assert hidden_siblings(out) == sorted([live_tmp.name, other.name, user.name])


def test_interrupted_swap_is_restored_at_next_start(tmp_path: Path) -> None:
    """The state a kill between the two renames leaves: no output, the old one hidden."""
    out = tmp_path / "out"
    old_output(out)
    out.rename(tmp_path / f".out.old-{DEAD_PID}-1234")
    (tmp_path / f".out.tmp-{DEAD_PID}-5678").mkdir()
    recover(out)
    assert contents(out) == OLD and hidden_siblings(out) == []


# ---- atomic_output_dir: a kill or Ctrl-C at every step ---------------------------------------------------

SCENARIOS = {  # name -> (what exists before, the exchange works)
    "new-output": (None, True),
    "empty-folder": ("empty", True),
    "overwrite-exchange": ("old", True),
    "overwrite-two-renames": ("old", False),
}


def _prepare(out: Path, before: str | None) -> None:
    if before == "empty":
        out.mkdir()
    elif before == "old":
        old_output(out)


def _steps_reached(
    tmp_path: Path, before: str | None, exchange: bool, monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    out = tmp_path / "probe" / "out"
    out.parent.mkdir(parents=True)
    _prepare(out, before)
    seen: list[str] = []
    monkeypatch.setattr(outputs, "_reached", seen.append)
    if not exchange:
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    write_new(out)
    monkeypatch.setattr(outputs, "_reached", lambda step: None)
    return [*seen, "mid-body"]


PLAIN = ["start", "recovered", "tmp-created", "body-done", "marker-written", "swapped", "cleaned"]
EXPECTED_STEPS = {  # written from the design in outputs.py, checked against the code below
    "new-output": PLAIN,
    "empty-folder": PLAIN,
    "overwrite-exchange": PLAIN,
    "overwrite-two-renames": [*PLAIN[:5], "old-moved-away", *PLAIN[5:]],
}


def _kill_points() -> list[tuple[str, str]]:
    """Every step of every scenario, plus a kill in the middle of the caller's writing."""
    return [(name, step) for name, steps in EXPECTED_STEPS.items() for step in (*steps, "mid-body")]


def _state(out: Path, before: str | None) -> str:
    """What `out` holds: none (absent), empty, old or new, each complete (else the assertion fails)."""
    if not out.exists():
        return "none"
    if not any(out.iterdir()):
        return "empty"
    got = contents(out)
    assert got in (OLD, NEW), got
    if got == NEW:
        assert is_antidote_output(out)
        return "new"
    return "old"


ALLOWED = {None: {"none", "new"}, "empty": {"empty", "new"}, "old": {"old", "new"}}


@pytest.mark.parametrize(("scenario", "step"), _kill_points())
def test_sigkill_at_every_step(
    scenario: str, step: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before, exchange = SCENARIOS[scenario]
    out = tmp_path / "out"
    _prepare(out, before)
    pid = os.fork()
    if pid == 0:  # the child: run until the step, then die without any cleanup
        try:
            if not exchange:
                outputs._exchange = lambda a, b: False
            if step != "mid-body":
                outputs._reached = lambda s: os.kill(os.getpid(), signal.SIGKILL) if s == step else None
            write_new(out, kill_mid_body=step == "mid-body")
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    state = _state(out, before)
    if step == "old-moved-away":  # the one point where the output is absent until the next start
        assert state == "none" and before == "old"
    else:
        assert state in ALLOWED[before]
    assert state == "new" or step not in ("swapped", "cleaned")
    recover(out)  # what the next start does first
    assert hidden_siblings(out) == []
    after = _state(out, before)
    assert after in ALLOWED[before] and (after == state or step == "old-moved-away")
    write_new(out)  # and the next run succeeds
    assert contents(out) == NEW and hidden_siblings(out) == []


@pytest.mark.parametrize(("scenario", "step"), [k for k in _kill_points() if k[1] != "mid-body"])
def test_ctrl_c_at_every_step(
    scenario: str, step: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before, exchange = SCENARIOS[scenario]
    out = tmp_path / "out"
    _prepare(out, before)
    if not exchange:
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)

    def interrupt(s: str) -> None:
        if s == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "_reached", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_new(out)
    assert _state(out, before) in ALLOWED[before]
    assert hidden_siblings(out) == []  # cleaned up in-process, nothing left for the next start


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_steps_in_order(scenario: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kill-point tests cover every step the code passes through (8 + 8 + 8 + 9 = 33 points)."""
    before, exchange = SCENARIOS[scenario]
    seen = _steps_reached(tmp_path, before, exchange, monkeypatch)
    assert seen == [*EXPECTED_STEPS[scenario], "mid-body"]
    assert set(seen) - {"mid-body"} <= set(outputs.STEPS)


# ---- atomic_write_text ------------------------------------------------------------------------------------


def test_atomic_write_text_keeps_old_file_on_interrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "results.json"
    path.write_text("old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"

    def broken(src: object, dst: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "newer")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["results.json"]

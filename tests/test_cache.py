"""The stage cache on its own: keys follow content, a stage is complete only with its record, kills at every
step leave either nothing or a complete stage, the lock file never follows a link."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from antidote.errors import AntidoteError
from antidote.experiments import cache as cache_module
from antidote.experiments.cache import RECORD, StageCache, locked, stage_key


def build_files(out: Path) -> None:
    out.mkdir()
    (out / "weights.bin").write_text("w")


def test_key_follows_file_and_folder_content(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_text("abc")
    key = stage_key({"model": str(model)})
    assert stage_key({"model": str(model)}) == key
    (model / "model.safetensors").write_text("abcd")  # changed in place
    changed = stage_key({"model": str(model)})
    assert changed != key
    (model / "extra.txt").write_text("x")  # a new file
    assert stage_key({"model": str(model)}) != changed
    data = tmp_path / "data.jsonl"  # a single data file changed in place
    data.write_text("a\n")
    before = stage_key({"data": str(data)})
    data.write_text("ab\n")
    changed_data = stage_key({"data": str(data)})
    assert changed_data != before
    # Same size, mtime put back: in a new process (the digests are remembered per process, per path, size,
    # mtime and inode), the bytes alone tell the change.
    stat = data.stat()
    data.write_text("ba\n")
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    cache_module._DIGESTS.clear()
    assert stage_key({"data": str(data)}) != changed_data
    # Paths inside the run's own stages are keyed by their upstream keys, not by content.
    stages = tmp_path / "stages"
    (stages / "align-1").mkdir(parents=True)
    inside = {"model": str(stages / "align-1")}
    k = stage_key(inside, skip=stages.resolve())
    (stages / "align-1" / RECORD).write_text("{}")
    assert stage_key(inside, skip=stages.resolve()) == k


def test_a_data_folder_copied_again_or_touched_keeps_its_key(tmp_path: Path) -> None:
    """New mtimes on the same bytes (a fresh copy of the data, a container started again) must not throw
    the finished stages away; the keys follow the bytes."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "a.jsonl").write_text('{"prompt": "x"}\n')
    (data / "b.csv").write_text("p,r\n")
    key = stage_key({"data_dir": str(data), "file": str(data / "b.csv")})
    for path in (data / "sub" / "a.jsonl", data / "b.csv"):
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns + 10**12, stat.st_mtime_ns + 10**12))
    assert stage_key({"data_dir": str(data), "file": str(data / "b.csv")}) == key
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)  # new inodes and mtimes, the same bytes: the same fingerprint
    shutil.rmtree(data)
    copy.rename(data)
    assert stage_key({"data_dir": str(data), "file": str(data / "b.csv")}) == key


def test_stage_is_built_once_with_its_record_inside(tmp_path: Path) -> None:
    cache = StageCache(tmp_path, say=lambda m: None)
    calls = []
    folder, key = cache.run("align", {"a": 1}, lambda out: (calls.append(1), build_files(out)))
    assert json.loads((folder / RECORD).read_text())["key"] == key and folder.name == f"align-{key}"
    again, _ = StageCache(tmp_path, say=lambda m: None).run("align", {"a": 1}, build_files)
    assert again == folder and calls == [1]


@pytest.mark.parametrize("step", ["build", "record", "rename"])
def test_a_kill_at_any_step_leaves_no_complete_looking_stage(tmp_path: Path, monkeypatch, step: str) -> None:
    """Kill points: inside the build, after the build before the record, after the record before the rename.
    The next start must remove the leftovers and rebuild."""
    cache = StageCache(tmp_path, say=lambda m: None)

    def build(out: Path) -> None:
        build_files(out)
        if step == "build":
            raise KeyboardInterrupt

    if step in ("record", "rename"):
        real_write, real_rename = Path.write_text, Path.rename

        def write_text(self: Path, *a, **k):
            if self.name == RECORD and step == "record":
                raise KeyboardInterrupt
            return real_write(self, *a, **k)

        def rename(self: Path, target):
            if (self / RECORD).is_file() and step == "rename":
                raise KeyboardInterrupt
            return real_rename(self, target)

        monkeypatch.setattr(Path, "write_text", write_text)
        monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        cache.run("align", {"a": 1}, build)
    monkeypatch.undo()
    assert [p for p in (tmp_path / "stages").iterdir() if not p.name.startswith(".")] == []
    # kill -9 leaves the temporary folder behind (no `except` runs): fake that too.
    (tmp_path / "stages" / ".align-0123.tmp-99").mkdir()
    messages: list[str] = []
    cache = StageCache(tmp_path, say=messages.append)
    assert list((tmp_path / "stages").iterdir()) == []
    folder, _ = cache.run("align", {"a": 1}, build_files)
    assert (folder / RECORD).is_file() and cache.built == [folder.name]


def test_a_stage_folder_without_record_is_removed(tmp_path: Path) -> None:
    stages = tmp_path / "stages"
    half = stages / "align-0123456789ab"
    half.mkdir(parents=True)
    (half / "weights.bin").write_text("half")
    messages: list[str] = []
    StageCache(tmp_path, say=messages.append)
    assert not half.exists() and "without its record" in messages[0]


def test_lock_never_follows_a_link(tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(target, run / ".lock")
    with pytest.raises(AntidoteError, match="lock file"), locked(run):
        pass
    assert target.read_text() == "keep me"
    (run / ".lock").unlink()
    with locked(run), pytest.raises(AntidoteError, match="another antidote run"), locked(run):
        pass


# ---- parts of one compare at the same time (compare --cells): a shared folder ----------------------------

_BUILD_IN_A_CHILD = """
import sys, time
from pathlib import Path
from antidote.experiments.cache import StageCache, locked

run_dir, log, me = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

def build(out):
    out.mkdir()
    with open(log, "a") as f:
        f.write("built\\n")
    for _ in range(600):  # hold the stage until the other process is about to ask for it
        if len(list(run_dir.parent.glob("ready-*"))) == 2:
            break
        time.sleep(0.1)
    time.sleep(1.0)
    (out / "x.txt").write_text("x")

with locked(run_dir, shared=True):
    cache = StageCache(run_dir, print, shared=True)
    (run_dir.parent / f"ready-{me}").touch()
    folder, _ = cache.run("s", {"a": 1}, build)
    print("done", folder.name, (folder / "x.txt").read_text(), flush=True)
"""


def test_two_parts_build_a_shared_stage_once_and_both_use_it(tmp_path: Path) -> None:
    """Two processes on one folder, both wanting stage s: one builds it (the build is logged once) while
    the other waits for its lock and then reuses the finished folder."""
    import subprocess
    import sys

    script, log = tmp_path / "child.py", tmp_path / "builds.log"
    script.write_text(_BUILD_IN_A_CHILD)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(run_dir), str(log), str(n)], stdout=subprocess.PIPE, text=True
        )
        for n in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert log.read_text() == "built\n"  # once
    done = [line for out in outs for line in out.splitlines() if line.startswith("done")]
    assert len(done) == 2 and len(set(done)) == 1 and done[0].endswith(" x")
    said = "\n".join(outs)
    assert "another process is building it; waiting to reuse it" in said and "done before, reusing" in said


def test_a_shared_cache_leaves_a_live_processs_unfinished_stage_alone(tmp_path: Path) -> None:
    import subprocess
    import sys

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        stages = tmp_path / "stages"
        for pid in (live.pid, dead.pid):
            (stages / f".s-abc.tmp-{pid}").mkdir(parents=True)
            (stages / f".s-abc.tmp-{pid}.tmp-{pid}-1f2e").mkdir()  # the stage writer's own temporary folder
        StageCache(tmp_path, lambda m: None, shared=True)
        assert sorted(p.name for p in stages.iterdir()) == [
            f".s-abc.tmp-{live.pid}",
            f".s-abc.tmp-{live.pid}.tmp-{live.pid}-1f2e",
        ]
        StageCache(tmp_path, lambda m: None)  # a whole run holds the folder alone: every leftover goes
        assert list(stages.iterdir()) == []
    finally:
        live.kill()
        live.wait()


def test_parts_share_the_folder_lock_but_never_with_a_whole_run(tmp_path: Path) -> None:
    with (
        locked(tmp_path, shared=True),
        locked(tmp_path, shared=True),
        pytest.raises(AntidoteError, match="not with a whole run"),
        locked(tmp_path),
    ):
        pass
    with (
        locked(tmp_path),
        pytest.raises(AntidoteError, match="another antidote run is using"),
        locked(tmp_path, shared=True),
    ):
        pass

"""The stage cache under the ways a real run goes wrong: a second process, and kills at each step of a commit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from itlens.errors import InputError
from itlens.stages import Stage, StageRunner

PARTS = 30

# One stage "model" in another process. argv: OUT, KEY, then "hold FLAG" (signal FLAG, wait for FLAG.go)
# or "kill-at EVENT" (SIGKILL at a file-system call of the commit, seen through an audit hook).
WORKER = r"""
import os, signal, sys, time
from pathlib import Path
from itlens.stages import Stage, StageRunner

out, key, how, arg = sys.argv[1:5]

def write(work):
    for i in range(%d):
        (work / f"part{i}.bin").write_text(key)
    if how == "hold":
        Path(arg).touch()
        while not Path(arg + ".go").exists():
            time.sleep(0.02)

removed = []
def hook(event, args):
    if how != "kill-at":
        return
    if arg == "delete" and event == "os.remove" and str(args[0]).startswith("part"):
        removed.append(args[0])
        if len(removed) == 2:  # one part of the replaced stage is gone, the rest is not
            os.kill(os.getpid(), signal.SIGKILL)
    if arg == "commit" and event == "os.rename" and str(args[0]).endswith(".model.work"):
        os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(hook)
StageRunner(out, log=lambda m: None).run(Stage("model", {"k": key}, write))
""" % PARTS


def _worker(tmp_path: Path, out: Path, key: str, how: str, arg: str) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen([sys.executable, str(script), str(out), key, how, arg])


def _stage(key: str, calls: list) -> Stage:
    def write(work: Path) -> None:
        calls.append(key)
        for i in range(PARTS):
            (work / f"part{i}.bin").write_text(key)
    return Stage("model", {"k": key}, write)


def _parts(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.glob("part*.bin")}


def test_a_second_process_stops_with_one_line_instead_of_writing_into_the_stage_being_run(tmp_path):
    out, flag = tmp_path / "out", tmp_path / "started"
    first = _worker(tmp_path, out, "a", "hold", str(flag))
    try:
        deadline = time.time() + 60
        while not flag.exists():
            assert first.poll() is None and time.time() < deadline, "the first process did not start its stage"
            time.sleep(0.02)
        calls: list = []
        with pytest.raises(InputError, match=r"another itlens process is running stage model") as e:
            StageRunner(out, log=lambda m: None).run(_stage("a", calls))
        assert "\n" not in str(e.value) and str(out) in str(e.value)
        assert calls == [] and not (out / "model").exists()
    finally:
        Path(f"{flag}.go").touch()
        assert first.wait(60) == 0
    assert _parts(out / "model") == {f"part{i}.bin": "a" for i in range(PARTS)}
    assert not (out / ".model.lock").exists()  # a finished study keeps no lock files
    calls = []
    StageRunner(out, log=lambda m: None).run(_stage("a", calls))
    assert calls == []


def test_a_run_killed_while_replacing_a_stage_never_leaves_the_old_one_half_deleted_and_trusted(tmp_path):
    out = tmp_path / "out"
    StageRunner(out, log=lambda m: None).run(_stage("a", []))
    killed = _worker(tmp_path, out, "b", "kill-at", "delete")  # other inputs: stage "a" is replaced
    assert killed.wait(60) == -9
    calls: list = []
    StageRunner(out, log=lambda m: None).run(_stage("a", calls))  # back to the first inputs
    assert _parts(out / "model") == {f"part{i}.bin": "a" for i in range(PARTS)}
    assert not (out / ".model.old").exists() and not (out / ".model.work").exists()
    killed = _worker(tmp_path, out, "b", "kill-at", "delete")
    assert killed.wait(60) == -9
    runner = StageRunner(out, log=lambda m: None)
    runner.run(_stage("b", calls))  # committed before the kill: reused, and what was left of "a" goes
    assert runner.cached == {"model": True} and not (out / ".model.old").exists()


def test_a_run_killed_after_its_work_was_complete_commits_it_on_resume_without_redoing_it(tmp_path):
    out = tmp_path / "out"
    killed = _worker(tmp_path, out, "a", "kill-at", "commit")
    assert killed.wait(60) == -9
    assert (out / ".model.work" / "stage.json").is_file() and not (out / "model").exists()
    calls: list = []
    StageRunner(out, log=lambda m: None).run(_stage("a", calls))
    assert calls == []  # a long stage (pretraining) is not redone, nor its checkpoints wiped
    assert _parts(out / "model") == {f"part{i}.bin": "a" for i in range(PARTS)}
    assert not (out / "model" / ".stage-hash").exists() and not (out / ".model.work").exists()


def test_a_stage_file_deleted_or_cut_short_by_hand_redoes_the_stage_instead_of_being_trusted(tmp_path):
    out, calls = tmp_path / "out", []
    StageRunner(out, log=lambda m: None).run(_stage("a", calls))
    (out / "model" / ".DS_Store").write_text("a file manager's")  # an extra file is no damage
    StageRunner(out, log=lambda m: None).run(_stage("a", calls))
    assert calls == ["a"]
    for damage in (lambda f: f.unlink(), lambda f: f.write_text("")):
        damage(out / "model" / "part3.bin")
        StageRunner(out, log=lambda m: None).run(_stage("a", calls))
        assert _parts(out / "model") == {f"part{i}.bin": "a" for i in range(PARTS)}
    assert calls == ["a", "a", "a"]


def test_a_stage_finished_by_an_older_itlens_without_a_file_list_is_still_reused(tmp_path):
    out, calls = tmp_path / "out", []
    runner = StageRunner(out, log=lambda m: None)
    runner.run(_stage("a", calls))
    marker = out / "model" / "stage.json"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "files"}))
    again = StageRunner(out, log=lambda m: None)
    again.run(_stage("a", calls))
    assert calls == ["a"] and again.cached == {"model": True}


def test_a_filesystem_without_locks_warns_once_and_runs_unlocked(tmp_path, monkeypatch):
    """flock failing with ENOLCK/ENOSYS (NFS without a lock daemon, Lustre without flock) was an internal
    error that stopped every study there; now the stage runs without a lock, with one warning per process.
    Other OS errors still raise."""
    import errno
    import fcntl

    from itlens import stages

    def no_locks(f, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(stages, "_WARNED_UNLOCKED", [])
    ran = []
    with pytest.warns(UserWarning, match="has no file locks .No locks available.; running without them"):
        with stages.hold_lock(tmp_path / "a.lock", "stage a"):
            ran.append(1)
    assert ran == [1] and not (tmp_path / "a.lock").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process, not once per stage folder
        with stages.hold_lock(tmp_path / "sub" / "b.lock", "stage b"):
            ran.append(2)
    assert ran == [1, 2]

    def broken(f, how):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OSError, match="Input/output"):
        with stages.hold_lock(tmp_path / "c.lock", "stage c"):
            ran.append(3)
    assert ran == [1, 2]


def test_redo_runs_the_named_stages_and_everything_downstream_once(tmp_path):
    """--redo: a cached stage whose name matches runs again, and so does every stage reading it (their hashes
    cover their inputs' keys, not contents, so they would keep what they made from the old one); other stages
    are reused, and a second runner of the same run (a seed worker, same `since`) does not redo them again."""
    calls = []

    def stage(name, deps=()):
        return Stage(name, {"k": name}, lambda work: (calls.append(name), (work / "x").write_text(name)),
                     deps=list(deps))

    plan = [stage("world"), stage("gen-s0"), stage("shift-s0", ["gen-s0"]), stage("gen-s1"),
            stage("analysis", ["shift-s0", "gen-s1"])]

    def run(**kw):
        runner = StageRunner(tmp_path, log=lambda m: None, **kw)
        for st in plan:
            runner.run(st)
        return runner

    run()
    assert calls == ["world", "gen-s0", "shift-s0", "gen-s1", "analysis"]
    calls.clear()
    time.sleep(0.01)
    first = run(redo=["gen-s0*"])
    assert calls == ["gen-s0", "shift-s0", "analysis"] and first.forced == {"gen-s0", "shift-s0", "analysis"}
    assert [n for n, c in first.cached.items() if c] == ["world", "gen-s1"]
    calls.clear()
    run(redo=["gen-s0*"], since=first.since)  # the same run's worker, or the main pass after it
    assert calls == []
    run()  # a later run without --redo: all cached
    assert calls == []
    (tmp_path / ".gen-s1.work").mkdir()  # complete work of gen-s1 left by a kill before its rename
    (tmp_path / ".gen-s1.work" / "x").write_text("old")
    os.utime(tmp_path / "gen-s1" / "stage.json", (0, 0))
    time.sleep(0.01)
    run(redo=["gen-s1"])
    assert calls == ["gen-s1", "analysis"] and (tmp_path / "gen-s1" / "x").read_text() == "gen-s1"

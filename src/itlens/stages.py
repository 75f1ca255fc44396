"""A content-addressed stage cache: each stage of a study runs once per distinct input.

A stage has a name (its folder under the study's output), a *key* (every config value and upstream
stage hash that decides its output) and a function that writes into a work folder. The runner:

- reuses ``OUT/name`` when its ``stage.json`` carries the same hash and every file it lists is still
  there at its size (a rerun costs nothing; a file deleted or cut short by hand redoes the stage);
- otherwise runs the function in ``OUT/.name.work`` (kept across a kill, so a long stage such as
  pretraining can resume from its own checkpoints there) and renames it into place when complete.

So a run killed at any point leaves either a finished stage or a work folder, never a half-written
stage that a rerun would trust. A stage replaced by a rerun under other inputs is first renamed aside
(``OUT/.name.old``), so it is never trusted half-deleted either. One process at a time runs a stage:
it holds ``OUT/.name.lock`` while it does, and another process that wants to run it stops with an
:class:`~itlens.errors.InputError` instead of writing into the same work folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import fnmatch
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from itlens.config import config_hash
from itlens.errors import InputError
from itlens.io import atomic_write_json


@dataclasses.dataclass
class Stage:
    """One unit of cached work."""

    name: str
    """Folder name under the study output (unique)."""
    key: Any
    """JSON-able value deciding the output: config sections, seeds, versions of the stage's code."""
    run: Callable[[Path], None]
    """Writes the stage's artifacts into the given work folder."""
    deps: list[str] = dataclasses.field(default_factory=list)
    """Names of upstream stages; their hashes enter this stage's hash."""
    label: str = ""
    """What the progress display says while this stage runs."""


class StageRunner:
    """Runs stages into ``out``, reusing each one finished under the same inputs.

    ``redo``: stage-name patterns (``fnmatch``, e.g. ``gen-*``) to run again although they are cached, and
    with them every stage downstream (a stage's hash covers its inputs' keys, not their contents, so the
    stages reading a redone one would otherwise keep what they made from the old one). A stage counts as
    redone once its marker is newer than ``since`` (when this run started): worker processes of the same
    run share ``since``, so a stage one of them redid is not redone again.
    """

    def __init__(self, out: str | Path, log: Callable[[str], None] = print, *, redo: Sequence[str] = (),
                 since: float | None = None):
        self.out = Path(out)
        self.log = log
        self.hashes: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self.cached: dict[str, bool] = {}
        self.redo = tuple(redo)
        self.since = time.time() if since is None else since
        self.forced: set[str] = set()

    def _forced(self, stage: Stage) -> bool:
        """Whether ``redo`` asks for ``stage``: its name matches, or a stage it reads was asked for."""
        if stage.name not in self.forced and (any(fnmatch.fnmatchcase(stage.name, p) for p in self.redo)
                                              or any(d in self.forced for d in stage.deps)):
            self.forced.add(stage.name)
        return stage.name in self.forced

    def stage_hash(self, stage: Stage) -> str:
        missing = [d for d in stage.deps if d not in self.hashes]
        if missing:
            raise RuntimeError(f"stage {stage.name} depends on {missing}, which have not been planned")
        return config_hash(stage.key, [self.hashes[d] for d in stage.deps])

    def is_cached(self, stage: Stage) -> bool:
        """Finished under the same inputs, and every file it wrote still there at its size (one deleted or
        cut short by hand is redone, not trusted; a stage.json of an older itlens lists no files)."""
        folder = self.out / stage.name
        forced = self._forced(stage)  # first: the stages downstream of a redone one must know it
        marker = _read_marker(folder)
        if marker.get("hash") != self.stage_hash(stage):
            return False
        try:
            if forced and (folder / "stage.json").stat().st_mtime < self.since:  # asked for, not yet redone
                return False
            return all((folder / name).stat().st_size == size for name, size in marker.get("files", {}).items())
        except (OSError, AttributeError, TypeError):  # a file gone, or a stage.json edited out of shape
            return False

    def plan(self, stage: Stage) -> bool:
        """Register ``stage`` without running it (for ``--dry-run``); returns whether it is cached."""
        h = self.stage_hash(stage)
        self.hashes[stage.name] = h
        cached = self.is_cached(stage)
        self.cached[stage.name] = cached
        return cached

    def run(self, stage: Stage) -> Path:
        final = self.out / stage.name
        self.hashes[stage.name] = h = self.stage_hash(stage)
        if self._reuse(stage):
            return final
        with hold_lock(self.out / f".{stage.name}.lock", f"stage {stage.name} of this study"):
            if self._reuse(stage):  # finished by the process that held the lock a moment ago
                return final
            self.cached[stage.name] = False
            work = self.out / f".{stage.name}.work"
            key_file = work / ".stage-hash"
            done = _read_marker(work).get("hash") == h  # killed after the work was complete, before the rename
            if done and self._forced(stage) and (work / "stage.json").stat().st_mtime < self.since:
                done = False  # complete, but from before this run, which was asked to redo it
            if work.exists() and not done and (not key_file.is_file() or key_file.read_text() != h):
                shutil.rmtree(work)  # a work folder from other inputs: not resumable
            resumed = work.exists()
            self.log(f"[{'resume' if resumed else 'run'}] {stage.name}" + (f": {stage.label}" if stage.label else ""))
            if not done:
                work.mkdir(parents=True, exist_ok=True)
                key_file.write_text(h)
                t0 = time.perf_counter()
                stage.run(work)
                self.timings[stage.name] = time.perf_counter() - t0
                if os.environ.get("ITLENS_TEST_KILL_AFTER") == stage.name:  # tests: die at the worst moment
                    os.kill(os.getpid(), signal.SIGKILL)
                atomic_write_json(work / "stage.json", {"name": stage.name, "hash": h, "deps": stage.deps,
                                                        "files": _file_sizes(work)})
            key_file.unlink(missing_ok=True)  # after the marker: a kill between leaves a work folder known complete
            old = self.out / f".{stage.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.replace(final, old)  # the stage it replaces (other inputs, or damaged) goes once out of the way
            os.replace(work, final)
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _reuse(self, stage: Stage) -> bool:
        if not self.is_cached(stage):
            return False
        shutil.rmtree(self.out / f".{stage.name}.old", ignore_errors=True)  # left by a kill as it was deleted
        self.cached.setdefault(stage.name, True)  # a stage run earlier in this study (another process) stays "run"
        self.log(f"[cached] {stage.name}")
        return True


def _read_marker(folder: Path) -> dict:
    """``folder/stage.json``, or {} when there is no readable one."""
    try:
        marker = json.loads((folder / "stage.json").read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _file_sizes(folder: Path) -> dict[str, int]:
    """Every file a stage wrote (its key file aside), by path inside its folder, with its size."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p != folder / ".stage-hash"}


_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}
"""flock's errors on a filesystem that has no locks (NFS without a lock daemon, Lustre mounted without
``flock``, some FUSE and CIFS mounts)."""
_WARNED_UNLOCKED: list[bool] = []


def _warn_unlocked(folder: Path, exc: OSError) -> None:
    """Say once per process that folders are used without locks (a warning, not a failure: the work is
    the same, only two processes in the same folder are no longer refused). A study has dozens of stage
    folders, usually on one filesystem: one line, not one per stage."""
    import warnings

    if _WARNED_UNLOCKED:
        return
    _WARNED_UNLOCKED.append(True)
    warnings.warn(f"{folder}: this filesystem has no file locks ({os.strerror(exc.errno)}); running without "
                  "them, so make sure no other itlens process writes this folder at the same time", stacklevel=3)


@contextlib.contextmanager
def hold_lock(path: Path, what: str):
    """Hold an exclusive lock on the file ``path`` for the block, or fail at once with one line: two
    processes writing one folder would corrupt it. The OS releases the lock when a process dies; the
    file is removed on the way out (so a finished study holds none), and a process that locked a file
    removed meanwhile takes the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise InputError(f"another itlens process is running {what}; wait for it to finish, or use "
                             "another --out", file=path.parent) from None
        except OSError as exc:
            f.close()
            if exc.errno not in _NO_LOCKS:
                raise
            _warn_unlocked(path.parent, exc)  # a filesystem without locks: run, as before locks existed
            try:
                yield
            finally:
                path.unlink(missing_ok=True)
            return
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()  # the holder before us removed this file as it let go: lock the one at the path now
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still held: no one can be inside the block with this file
        f.close()

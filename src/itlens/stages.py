"""A content-addressed stage cache: each stage of a study runs once per distinct input.

A stage has a name (its folder under the study's output), a *key* (every config value and upstream
stage hash that decides its output) and a function that writes into a work folder. The runner:

- reuses ``OUT/name`` when its ``stage.json`` carries the same hash (a rerun costs nothing);
- otherwise runs the function in ``OUT/.name.work`` (kept across a kill, so a long stage such as
  pretraining can resume from its own checkpoints there) and renames it into place when complete.

So a run killed at any point leaves either a finished stage or a work folder, never a half-written
stage that a rerun would trust.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

from itlens.config import config_hash
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
    def __init__(self, out: str | Path, log: Callable[[str], None] = print):
        self.out = Path(out)
        self.log = log
        self.hashes: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self.cached: dict[str, bool] = {}

    def stage_hash(self, stage: Stage) -> str:
        missing = [d for d in stage.deps if d not in self.hashes]
        if missing:
            raise RuntimeError(f"stage {stage.name} depends on {missing}, which have not been planned")
        return config_hash(stage.key, [self.hashes[d] for d in stage.deps])

    def is_cached(self, stage: Stage) -> bool:
        h = self.stage_hash(stage)
        marker = self.out / stage.name / "stage.json"
        if not marker.is_file():
            return False
        try:
            return json.loads(marker.read_text()).get("hash") == h
        except (OSError, json.JSONDecodeError):
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
        h = self.stage_hash(stage)
        self.hashes[stage.name] = h
        if self.is_cached(stage):
            self.cached.setdefault(stage.name, True)  # a stage run earlier in this study (another process) stays "run"
            self.log(f"[cached] {stage.name}")
            return final
        self.cached[stage.name] = False
        work = self.out / f".{stage.name}.work"
        key_file = work / ".stage-hash"
        if work.exists() and (not key_file.is_file() or key_file.read_text() != h):
            shutil.rmtree(work)  # a work folder from other inputs: not resumable
        resumed = work.exists()
        work.mkdir(parents=True, exist_ok=True)
        key_file.write_text(h)
        self.log(f"[{'resume' if resumed else 'run'}] {stage.name}" + (f": {stage.label}" if stage.label else ""))
        t0 = time.perf_counter()
        stage.run(work)
        self.timings[stage.name] = time.perf_counter() - t0
        if os.environ.get("ITLENS_TEST_KILL_AFTER") == stage.name:  # tests: die at the worst moment
            os.kill(os.getpid(), signal.SIGKILL)
        key_file.unlink(missing_ok=True)
        atomic_write_json(work / "stage.json", {"name": stage.name, "hash": h, "deps": stage.deps})
        if final.exists():
            shutil.rmtree(final)
        os.replace(work, final)
        return final

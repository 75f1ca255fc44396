"""Where the project's data files live (prompts, configs), so they stay data, not code."""

from __future__ import annotations

import os
from pathlib import Path

from itlens.errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPTS_DIR = Path(os.environ.get("ITLENS_PROMPTS", REPO_ROOT / "prompts"))
CONFIGS_DIR = REPO_ROOT / "configs"


def prompt_path(name: str) -> Path:
    """A prompt file by name (``chat_template.jinja``, ``base_frame.txt``, ...) or an explicit path."""
    p = Path(name)
    if p.is_file():
        return p
    q = PROMPTS_DIR / name
    if q.is_file():
        return q
    raise InputError(f"prompt file not found (looked in {PROMPTS_DIR})", file=name)


def read_prompt(name: str) -> str:
    return prompt_path(name).read_text(encoding="utf-8")

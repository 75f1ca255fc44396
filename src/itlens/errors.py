"""One error type for bad input, so the CLI can print one line and exit 2 (CONTRACT)."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad user input: a file, a line (JSONL) or key (YAML), a field, and what was expected.

    ``str(err)`` is the one line the CLI prints, e.g.
    ``data/it.jsonl:12: field 'response': expected a string, got null``.
    """

    def __init__(self, message: str, *, file: str | Path | None = None, line: int | None = None,
                 key: str | None = None, field: str | None = None):
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.key = key
        self.field = field
        super().__init__(self.format())

    def format(self) -> str:
        where = ""
        if self.file:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
        parts = []
        if where:
            parts.append(where)
        if self.key:
            parts.append(f"key '{self.key}'")
        if self.field:
            parts.append(f"field '{self.field}'")
        prefix = ": ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message

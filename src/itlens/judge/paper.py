"""The paper's judge results (Tables 13-17) shipped with the package, for overlays and comparisons."""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

from itlens.errors import InputError

TABLES_DIR = Path(__file__).resolve().parents[1] / "resources" / "paper_tables"
ASPECT_TABLES = (13, 14, 15)
TASK_TYPE_TABLES = (16, 17)
_COLUMN_TO_KEY = {"Helpfulness": "helpfulness", "Clarity": "clarity", "Factuality": "factuality",
                  "Depth": "depth", "Engagement": "engagement", "Coding": "coding", "Info-Seek": "info-seek",
                  "Math": "math", "Procedure": "procedure", "Reasoning": "reasoning", "Role-Play": "role-play",
                  "Writing": "writing"}


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def row_label(model: str, train_set: str, test_set: str) -> str:
    return f"{model} | {train_set} | {test_set}"


@lru_cache(maxsize=None)
def paper_rows() -> tuple[dict, ...]:
    """Every row of Tables 13-17: ``{table, row, label, model, train_set, test_set, values}``."""
    rows = []
    for table in ASPECT_TABLES + TASK_TYPE_TABLES:
        with (TABLES_DIR / f"table{table}.csv").open(encoding="utf-8", newline="") as f:
            for rec in csv.DictReader(f):
                values = {}
                for col, key in _COLUMN_TO_KEY.items():
                    if col in rec:
                        try:
                            values[key] = float(rec[col])
                        except ValueError:  # "(blank in paper)"
                            values[key] = None
                rows.append({"table": table, "row": int(rec["#"]), "model": rec["Model"],
                             "train_set": rec["Train set"], "test_set": rec["Test set"],
                             "label": row_label(rec["Model"], rec["Train set"], rec["Test set"]),
                             "values": values})
    return tuple(rows)


def paper_reference(label: str) -> dict:
    """``{"aspects": {...} | None, "task_types": {...} | None}`` for 'Model | Train set | Test set'."""
    parts = [p.strip() for p in label.split("|")]
    if len(parts) != 3:
        raise InputError(f"expected 'Model | Train set | Test set', got {label!r}", key="paper_reference")
    key = _norm(row_label(*parts))
    found = {"aspects": None, "task_types": None}
    for row in paper_rows():
        if _norm(row["label"]) == key:
            kind = "aspects" if row["table"] in ASPECT_TABLES else "task_types"
            found[kind] = found[kind] or dict(row["values"])
    if found["aspects"] is None and found["task_types"] is None:
        models = sorted({r["model"] for r in paper_rows()})
        raise InputError(f"no paper row {label!r} (models: {', '.join(models)}; "
                         "list rows with itlens.judge.paper_rows())", key="paper_reference")
    return found

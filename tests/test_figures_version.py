"""A guard for ``FIGURES_VERSION`` (src/itlens/study.py): a study's figures and token views are redrawn
only when ``figures/.inputs`` (a hash of the resolved config, metrics, stage hashes and FIGURES_VERSION)
changes, so a change to the drawing code that changes what is drawn must bump FIGURES_VERSION by hand,
or cached studies keep their stale figures. This test notices drawing code that changed while
FIGURES_VERSION did not: tests/fixtures/figures_version.json records FIGURES_VERSION and a SHA-256 of the
drawing sources listed in DRAWING_SOURCES below.
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "figures_version.json"
FIXTURE_REL = "tests/fixtures/figures_version.json"

# What make_figures (study.py) draws its figures and token views with, in a fixed order. ``None``: the
# whole file (modules that exist to draw, and the data they draw). A tuple: only those top-level
# definitions of the file (functions with their decorators, classes, assigned constants): the modules that
# also hold analysis code are edited often for reasons that change nothing drawn, and a guard that fires on
# every such edit would be updated without a look. A helper newly called from a listed function changes
# that function too (so this test fails), which is when to add the helper here.
DRAWING_SOURCES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    # STYLE (via @styled), subplots, CLASS_COLORS, save_fig / fig_to_png: every figure
    ("src/itlens/plotting.py", None),
    # Figures 1, 4, 12, the position curve and render_token_view (the token views' HTML)
    ("src/itlens/analysis/shift_figures.py", None),
    # the judge's radars (write_judge_figures, radar_chart, LABELS)
    ("src/itlens/judge/figures.py", None),
    # the paper's rows drawn dashed on the radars: their lookup, and the tables it reads
    ("src/itlens/judge/paper.py", None),
    ("src/itlens/resources/paper_tables/table13.csv", None),
    ("src/itlens/resources/paper_tables/table14.csv", None),
    ("src/itlens/resources/paper_tables/table15.csv", None),
    ("src/itlens/resources/paper_tables/table16.csv", None),
    ("src/itlens/resources/paper_tables/table17.csv", None),
    # make_figures draws the knowledge and shift-share bars itself and writes index.json's captions;
    # _mean_of / _dig compute the bars, _entity_noun words captions, finding_roles picks the viewed models
    ("src/itlens/study.py", ("make_figures", "_mean_of", "_dig", "_entity_noun", "finding_roles")),
    # Table 11 (response lengths) and tone figures; CLASSES / PAPER are their bars and reference lines
    ("src/itlens/analysis/copying.py", ("CLASSES", "PAPER", "plot_lengths", "plot_tone")),
    # the borrowing-rate figure
    ("src/itlens/analysis/borrowing.py", ("plot_borrowing_rates",)),
    # the radars' axes
    ("src/itlens/judge/scoring.py", ("ASPECTS", "TASK_TYPES")),
    # read_shift reads back what the shift figures and views draw; token_texts names the views' top-k tokens
    ("src/itlens/analysis/token_shift.py", ("token_texts", "read_shift")),
)

# What make_figures imports that draws nothing (checked by test_drawing_sources_cover_make_figures_imports).
NOT_DRAWING = {("itlens.models", "load_tokenizer")}  # the tuned model's tokenizer, a stage output


def _text(rel: str) -> str:
    path = ROOT / rel
    if not path.is_file():
        pytest.fail(f"{rel} (listed in DRAWING_SOURCES of tests/test_figures_version.py) is gone: update the list "
                    f"to what make_figures now draws with, then the fixture {FIXTURE_REL}", pytrace=False)
    return path.read_bytes().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def _definitions(text: str) -> dict[str, str]:
    """Each top-level definition of a module's source by name: its lines, decorators included."""
    lines = text.split("\n")
    out: dict[str, str] = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        else:
            continue
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        for name in names:
            out[name] = "\n".join(lines[start - 1:node.end_lineno])
    return out


def drawing_sources_sha256() -> str:
    """SHA-256 over DRAWING_SOURCES in order: each file's repo-relative path, the definition's name (empty for
    a whole file) and its text with line endings normalised to ``\\n``, each length-prefixed."""
    h = hashlib.sha256()

    def add(*parts: str) -> None:
        for part in parts:
            b = part.encode("utf-8")
            h.update(f"{len(b)}:".encode())
            h.update(b)

    for rel, names in DRAWING_SOURCES:
        text = _text(rel)
        if names is None:
            add(rel, "", text)
            continue
        defs = _definitions(text)
        for name in names:
            if name not in defs:
                pytest.fail(f"{rel} has no top-level {name!r} (listed in DRAWING_SOURCES of "
                            f"tests/test_figures_version.py): update the list to what make_figures now draws "
                            f"with, then the fixture {FIXTURE_REL}", pytrace=False)
            add(rel, name, defs[name])
    return h.hexdigest()


def _fixture_json(version: int, sha: str) -> str:
    return json.dumps({"figures_version": version, "sha256": sha}, indent=2)


def test_figures_version_is_bumped_when_drawing_code_changes():
    from itlens.study import FIGURES_VERSION

    recorded = json.loads(FIXTURE.read_text(encoding="utf-8"))
    sha = drawing_sources_sha256()
    if FIGURES_VERSION == recorded["figures_version"] and sha == recorded["sha256"]:
        return
    if FIGURES_VERSION == recorded["figures_version"]:
        pytest.fail(
            f"drawing code changed: bump FIGURES_VERSION in src/itlens/study.py (now {FIGURES_VERSION}) if what "
            f"is drawn changed, then update {FIXTURE_REL} (sha256 {sha}) to\n"
            f"{_fixture_json(FIGURES_VERSION + 1, sha)}\n"
            f"if nothing drawn changed, only update the sha256, to\n{_fixture_json(FIGURES_VERSION, sha)}",
            pytrace=False)
    if FIGURES_VERSION < recorded["figures_version"]:
        pytest.fail(f"FIGURES_VERSION in src/itlens/study.py went down, to {FIGURES_VERSION}, from "
                    f"{recorded['figures_version']} in {FIXTURE_REL}: it only ever goes up (a lower one can match "
                    f"figures cached under it before), so set it above {recorded['figures_version']}",
                    pytrace=False)
    pytest.fail(f"FIGURES_VERSION was bumped to {FIGURES_VERSION} but {FIXTURE_REL} still records "
                f"{recorded['figures_version']}: update the fixture to\n{_fixture_json(FIGURES_VERSION, sha)}",
                pytrace=False)


def test_drawing_sources_cover_make_figures_imports():
    """Every itlens name make_figures imports to draw with is in DRAWING_SOURCES (or in NOT_DRAWING)."""
    whole = {rel for rel, names in DRAWING_SOURCES if names is None}
    parts = {rel: set(names) for rel, names in DRAWING_SOURCES if names is not None}
    fn = next(n for n in ast.parse(_text("src/itlens/study.py")).body
              if isinstance(n, ast.FunctionDef) and n.name == "make_figures")
    missing = []
    for node in ast.walk(fn):
        if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("itlens")):
            continue
        base = "src/" + node.module.replace(".", "/")
        for alias in node.names:
            candidates = {f"{base}/{alias.name}.py", f"{base}.py", f"{base}/__init__.py"}
            if (node.module, alias.name) in NOT_DRAWING or candidates & whole or \
                    any(alias.name in parts.get(c, ()) for c in candidates):
                continue
            missing.append(f"{node.module}.{alias.name}")
    assert not missing, (f"make_figures imports {missing}, which DRAWING_SOURCES in tests/test_figures_version.py "
                         f"does not cover: add what draws to it (or what does not to NOT_DRAWING), then update "
                         f"{FIXTURE_REL}")

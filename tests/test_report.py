"""report.html, the shift figures and the token view, from small study artifacts built by hand (no study
run): text from models and data is shown as text, the page needs no network, equal inputs give equal
bytes, artifacts are read as UTF-8, and partial or empty inputs still draw."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from itlens.analysis.shift_figures import (plot_figure1, plot_figure4, plot_figure12, plot_position_curve,
                                           render_token_view)
from itlens.analysis.token_shift import ShiftResult
from itlens.report import render_report

# text a model or a dataset may produce, aimed at every way out of an HTML text node or attribute
HOSTILE = "</td></pre></iframe><script>alert('x')</script> & \"q\" <img src=x onerror=alert(1)>"


def _png() -> bytes:
    """A valid 1x1 PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


def _view_result(instruction=None) -> ShiftResult:
    """A read-back shift result (no tokenizer) of one response: tokens 7 'cat', 8 HOSTILE, 9 'São\\n'."""
    rows = [(7, "cat", "unshifted", 7), (8, HOSTILE, "shifted", 7), (9, "São\n", "marginal", 8)]
    tokens = pd.DataFrame({
        "id": ["r0"] * 3, "pos": [0, 1, 2], "token_id": [r[0] for r in rows], "token": [r[1] for r in rows],
        "rank_base": [1, 40, 2], "p_base": [0.5, 0.01, 0.2], "p_tuned": [0.6, 0.3, 0.1], "kl": [0.1, 2.0, 0.3],
        "shift_class": [r[2] for r in rows], "top1_base": [r[3] for r in rows]})
    # base and tuned top-2 of each position: ids 7-9 occur in the table, 45 never does
    tokens["top_base_ids"] = [[7, 45]] * 3
    tokens["top_base_p"] = [[0.5, 0.1]] * 3
    tokens["top_tuned_ids"] = [[8, 9]] * 3
    tokens["top_tuned_p"] = [[0.6, 0.2]] * 3
    records = {"r0": {"id": "r0", "instruction": instruction}} if instruction is not None else {}
    return ShiftResult(tokens=tokens, records=records,
                       summary={"mode": "exact", "base_context": "frame", "models": {"base": HOSTILE, "tuned": "t"}})


def _study(root: Path, *, text: str = HOSTILE) -> Path:
    """A finished study's artifacts: every place the report shows text carries ``text``."""
    root.mkdir(parents=True)
    est = {"estimate": -0.0667, "low": -0.125, "high": -0.0042, "p_value": 0.0123, "n": 120}
    metrics = {
        "study": {"name": text, "seeds": [0], "base": text},
        "models": {"base": {"qa_acc_known": 0.85, "cloze_acc": None},
                   text: {"qa_acc_known": 0.5833, text: 0.25}},
        "findings": [
            {"id": "F1", "claim": text, "holds": True,
             "evidence": {"test": text, "summary": text, "paper": text, "sft_minus_lft": est, text: text,
                          "nested": {text: text}}},
            {"id": "F2", "claim": "c", "holds": False, "evidence": {"summary": "s", "test": "t"}},
            {"id": "F3", "claim": "c", "holds": None,
             "evidence": {"test": "needs an SFT variant", "summary": "not measured"}}],
        "copying": {"0": {"phrase": text}}}
    (root / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False), encoding="utf-8")
    (root / "config.resolved.yaml").write_text(f"# {text}\nname: x\n", encoding="utf-8")
    (root / "versions.json").write_text(json.dumps({"itlens": text}, ensure_ascii=False), encoding="utf-8")
    (root / "figures").mkdir()
    (root / "figures" / "a.png").write_bytes(_png())
    (root / "figures" / "index.json").write_text(json.dumps(
        [{"file": "a.png", "section": text, "title": text, "caption": text, "reference": text}]), encoding="utf-8")
    render_token_view(_view_result(instruction=text), None, root / "views" / "lft.html", title=text)
    return root


class _Page(HTMLParser):
    """Start tags with their attributes, and the text nodes, of one HTML document."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _assert_inert(page: _Page, allowed: set[str]) -> None:
    """Only the tags the page is made of, no script, no event handler, no address to fetch."""
    assert {t for t, _ in page.tags} <= allowed, {t for t, _ in page.tags} - allowed
    for _, attrs in page.tags:
        assert not [a for a in attrs if a.startswith("on")], attrs
        assert not attrs.get("src") or attrs["src"].startswith("data:image/png;base64,"), attrs["src"][:40]
        assert "href" not in attrs


def test_text_from_models_and_data_is_shown_as_text_everywhere_in_the_report(tmp_path):
    """Names, findings, evidence, figure captions, config, versions and the token view: each shows the
    hostile text as text, and the page has no script, handler or address to fetch (it opens offline)."""
    page_html = render_report(_study(tmp_path / "s")).read_text(encoding="utf-8")
    page = _Page(page_html)
    _assert_inert(page, {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "em", "div",
                         "span", "table", "tr", "td", "th", "figure", "img", "figcaption", "b", "br", "pre", "iframe"})
    shown = [t for t in page.text if HOSTILE in t]
    # title, h1, study base, claim, summary, test, paper, evidence key and value, nested key and value, model
    # name, metric name, section, figure title, caption, reference, config, versions
    assert len(shown) == 19, len(shown)
    assert any(json.dumps(HOSTILE)[1:-1] in t for t in page.text)  # All metrics, as JSON
    assert [t for t, _ in page.tags].count("img") == 1 and [t for t, _ in page.tags].count("iframe") == 1
    # the token view inside the iframe is a page of its own: inert too, with the token and instruction as text
    view = _Page(next(a["srcdoc"] for t, a in page.tags if t == "iframe"))
    _assert_inert(view, {"html", "head", "meta", "title", "style", "body", "h1", "p", "b", "span", "div", "table",
                         "tr", "th", "td", "i"})
    assert sum(HOSTILE in t for t in view.text) == 5  # title, h1, base model, instruction, token
    assert "http://" not in page_html and "https://" not in page_html and "url(" not in page_html


def test_the_report_is_the_same_bytes_for_the_same_artifacts_wherever_they_are(tmp_path):
    a = render_report(_study(tmp_path / "a")).read_bytes()
    assert render_report(tmp_path / "a").read_bytes() == a
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    assert render_report(tmp_path / "elsewhere" / "b").read_bytes() == a


def test_the_report_reads_its_artifacts_as_utf8_whatever_the_locale(tmp_path):
    """Was: the config, versions and token views were read in the locale's encoding (cp1252 on Windows,
    ASCII in a C locale without UTF-8 mode): the view's ↵ and any non-ASCII name garbled or refused."""
    study = _study(tmp_path / "s", text="Curaçao ↵ ·")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([sys.executable, "-c", "import locale, sys; from itlens.report import render_report; "
                        "print(locale.getpreferredencoding(False)); render_report(sys.argv[1])", str(study)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "utf" not in r.stdout.lower()  # the child really ran with a non-UTF-8 locale encoding
    page = _Page((study / "report.html").read_text(encoding="utf-8"))
    assert "# Curaçao ↵ ·\nname: x\n" in page.text and "Curaçao ↵ ·" in page.text  # the config; versions' cell
    view = _Page(next(a["srcdoc"] for t, a in page.tags if t == "iframe"))
    assert any("Curaçao ↵ ·" in t for t in view.text)


def test_all_metrics_shows_text_as_written_not_as_unicode_escapes(tmp_path):
    """Was: json.dumps' default ensure_ascii showed 'São Tomé' as 'S\\u00e3o Tom\\u00e9'."""
    page = render_report(_study(tmp_path / "s", text="São Tomé")).read_text(encoding="utf-8")
    pre = page[page.index("<h2>All metrics</h2>"):page.index("<h2>Resolved config</h2>")]
    assert "São Tomé" in pre and "\\u00e3" not in pre


def test_a_partial_study_renders_what_it_has(tmp_path):
    """One seed, no figures, no views, no config or versions file, a finding not measured, an estimate of
    nothing: the page still renders, and says 'not measured' and 'n/a' instead of inventing numbers."""
    root = tmp_path / "p"
    root.mkdir()
    (root / "metrics.json").write_text(json.dumps({
        "study": {"name": "partial", "seeds": [3]}, "models": {"base": {"qa_acc_known": None}},
        "findings": [{"id": "F1", "claim": "c", "holds": None,
                      "evidence": {"test": "needs an LFT", "summary": "not measured",
                                   "sft_minus_lft": {"estimate": None, "low": None, "high": None, "n": 0,
                                                     "p_value": None}}}]}))
    page = render_report(root).read_text(encoding="utf-8")
    assert "<span class=\"verdict na\">not measured</span>" in page
    assert "Why: needs an LFT" in page and "Test: needs" not in page  # the reason, not a test that was run
    assert "<td>sft_minus_lft</td><td>n/a</td>" in page and "<td>qa_acc_known</td><td>n/a</td>" in page
    assert "<figure>" not in page and "<iframe" not in page and "<h2>Versions</h2>" not in page


def test_read_back_token_view_names_top_tokens_by_their_text_not_by_bare_ids(tmp_path):
    """Was: a result read back without its tokenizer (as the study draws its views) showed every hover
    table's token as its id: token 7 read as the text '7'. Ids the table emitted now show their text; others
    are marked as ids. A response without its record shows its id alone (was 'r0: ')."""
    page = render_token_view(_view_result(), None, tmp_path / "v.html").read_text(encoding="utf-8")
    assert "<td>cat</td>" in page and "<td>São\\n</td>" in page and "<td><i>id 45</i></td>" in page
    assert "<td>7</td>" not in page and "<td>45</td>" not in page
    assert "<b>r0</b></div>" in page
    with_instruction = render_token_view(_view_result(instruction="Who?"), ["r0", "nope"], tmp_path / "w.html")
    assert "<b>r0</b>: Who?</div>" in with_instruction.read_text(encoding="utf-8")


@pytest.mark.parametrize("case", ["empty", "one point", "no values"])
def test_shift_figures_draw_empty_single_point_and_missing_values(tmp_path, case):
    """Summaries of a shift with no tokens, a single size and a single bin, or None where nothing was
    measured (a sentence without a rest, a size without a value) draw a PNG rather than fail, and the
    same summaries draw the same bytes."""
    s = {"figure1": {"kl": 0.4, "base_prob": 0.3, "base_rank": 2.0},
         "sentence_kl": {"first": 0.5, "rest": 0.2, "diff_pct": 150.0},
         "by_rel_pos": [{"bin": 4, "shifted": 0.5, "marginal": 0.1, "kl": 0.3}],
         "top_shifted_marginal": [["also", 3]]}
    if case == "empty":
        s = {"figure1": {"kl": None, "base_prob": None, "base_rank": None},
             "sentence_kl": {"first": None, "rest": None, "diff_pct": None}, "by_rel_pos": [],
             "top_shifted_marginal": []}
    if case == "no values":
        s = {**s, "figure1": {"kl": None, "base_prob": 0.3, "base_rank": None},
             "sentence_kl": {"first": 0.5, "rest": None, "diff_pct": None},
             "by_rel_pos": [{"bin": 0, "shifted": None, "marginal": 0.2, "kl": 0.1}]}
    for draw, arg in ((plot_figure1, {"lft": {1000: s}}), (plot_figure4, {"lft": s}), (plot_figure12, {"lft": s}),
                      (plot_position_curve, {"lft": s})):
        out = draw(arg, tmp_path / f"{draw.__name__}.png")
        assert out.read_bytes()[:4] == b"\x89PNG"
        if case == "one point":  # the same summaries draw the same bytes
            assert draw(arg, tmp_path / "again.png").read_bytes() == out.read_bytes()


def test_no_text_from_the_study_runs_as_script_in_a_browser(tmp_path):
    """The same page in headless Chromium: script and event handlers hidden in every text (the token view's
    frame included) would retitle the page; the title stays the study's."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Debian's chromium is not installed (make test installs it when it can)")
    evil = ("</pre></td></iframe><script>top.document.title='PWNED'</script>"
            "<img src=x onerror=\"top.document.title='PWNED'\">")
    report = render_report(_study(tmp_path / "s", text=evil))
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000",
                        "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert "<title>itlens report: " in r.stdout, r.stdout[:300] + r.stderr[-1500:]
    assert "<title>PWNED</title>" not in r.stdout


def test_a_p_value_just_below_alpha_is_not_shown_as_alpha():
    """Was: 3 significant digits showed p = 100/2001 = 0.049975 (a 2000-resample test, below 0.05) as
    'p=0.05' beside a verdict that needs p < 0.05; the estimate and its CI keep their 4 digits and signs."""
    from itlens.report import _finding_html

    page = _finding_html({"id": "F2", "claim": "c", "holds": True, "evidence": {
        "long_minus_simple": {"estimate": -0.0667, "low": -0.125, "high": -0.0042, "p_value": 100 / 2001, "n": 120},
        "sft": {"observed": 0.12, "null_mean": 0.091, "null_low": 0.04, "null_high": 0.15, "p_value": 100 / 2001,
                "n": 100}}})
    assert "<td>-0.0667 [-0.125, -0.0042], p=0.04998 (n=120)</td>" in page
    assert "observed 0.12 vs chance 0.091 [0.04, 0.15], p=0.04998 (n=100)" in page and "p=0.05" not in page


def test_a_finding_measured_on_no_questions_states_its_test_not_a_reason(tmp_path):
    """Was: every finding with holds None showed its test as 'Why:', so F1 measured on no held-out Known
    question (a base that knows none) read 'Why: paired bootstrap ... holds iff ...'. Only a finding the
    study could not measure (summary 'not measured') gives a reason there."""
    root = tmp_path / "empty"
    root.mkdir()
    (root / "metrics.json").write_text(json.dumps({
        "study": {"name": "empty", "seeds": [0]}, "models": {},
        "findings": [{"id": "F1", "claim": "c", "holds": None,
                      "evidence": {"test": "paired bootstrap: holds iff SFT is below LFT",
                                   "summary": "QA accuracy on held-out Known people: base n/a",
                                   "sft_minus_lft": {"estimate": None, "low": None, "high": None, "n": 0,
                                                     "p_value": None}}},
                     {"id": "F3", "claim": "c", "holds": None,
                      "evidence": {"test": "needs an SFT variant", "summary": "not measured"}}]}))
    page = render_report(root).read_text(encoding="utf-8")
    assert "Test: paired bootstrap: holds iff" in page and "Why: paired" not in page
    assert "Why: needs an SFT variant" in page

"""``report.html``: one self-contained page that says, finding by finding, what holds.

The page is rendered only from a study folder's artifacts (``metrics.json``, ``config.resolved.yaml``,
``figures/index.json`` and the PNGs it lists, token views under ``views/``), so ``itlens report DIR``
can re-render it at any time. Images are inlined as data URIs; there is no script or stylesheet
from the network.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from itlens.errors import InputError
from itlens.io import atomic_write_text
from itlens.plotting import png_data_uri

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.finding{border:1px solid #ddd;border-radius:6px;padding:.8em 1em;margin:1em 0}
.verdict{font-weight:700;padding:.1em .5em;border-radius:4px;color:#fff}
.holds{background:#2e7d32}.fails{background:#c62828}.na{background:#757575}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0} td,th{border:1px solid #ddd;padding:.25em .5em;text-align:right}
th{background:#f5f5f5} td:first-child,th:first-child{text-align:left}
figure{margin:1.2em 0} figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:.9em;color:#555}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.8em;max-height:30em}
.ref{font-size:.85em;color:#555} .muted{color:#777;font-size:.9em}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _fmt(v: Any) -> str:
    # p-values get 4 significant digits: with 2000 resamples p moves in steps of 1/2001, and 3 digits show
    # p = 100/2001 (below 0.05) as "p=0.05"
    if isinstance(v, dict) and "estimate" in v:  # an estimate with its CI (and p-value)
        if v["estimate"] is None:
            return "n/a"
        ci = f" [{v['low']:.4g}, {v['high']:.4g}]" if v.get("low") is not None else ""
        p = f", p={v['p_value']:.4g}" if v.get("p_value") is not None else ""
        return _esc(f"{v['estimate']:.4g}{ci}{p} (n={v.get('n', '?')})")
    if isinstance(v, dict) and "observed" in v:  # a permutation test against chance
        if v["observed"] is None:
            return "n/a"
        return _esc(f"observed {v['observed']:.3g} vs chance {v['null_mean']:.3g} "
                    f"[{v['null_low']:.3g}, {v['null_high']:.3g}], p={v['p_value']:.4g} (n={v['n']})")
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(t, (int, float)) for t in v):
        return f"[{_fmt(float(v[0]))}, {_fmt(float(v[1]))}]"
    return _esc(json.dumps(v) if isinstance(v, (dict, list)) else v)


def _kv_table(d: dict) -> str:
    """Key-value rows; a nested dict (not a CI) becomes a table of its own in its cell."""
    def is_nested(v) -> bool:
        return isinstance(v, dict) and "estimate" not in v and "observed" not in v

    rows = "".join(f"<tr><td>{_esc(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in d.items() if not is_nested(v))
    nested = "".join(f"<tr><td>{_esc(k)}</td><td>{_kv_table(v)}</td></tr>" for k, v in d.items() if is_nested(v))
    return f"<table>{rows}{nested}</table>"


def _finding_html(f: dict) -> str:
    holds = f.get("holds")
    cls, word = ("holds", "holds") if holds is True else ("fails", "does not hold") if holds is False \
        else ("na", "not measured")
    ev = f.get("evidence") or {}
    test = ev.get("test", "")
    summary = ev.get("summary", "")
    paper = ev.get("paper", "")
    rest = {k: v for k, v in ev.items() if k not in ("test", "summary", "paper")}
    # a finding the study could not measure carries why in its test field ("needs an LFT variant ...") and
    # "not measured" as its summary; one measured on no questions (holds is None too) states the test it ran
    unmeasured = holds is None and summary == "not measured"
    return (f'<div class="finding" id="{_esc(f["id"])}"><h3>{_esc(f["id"])}: {_esc(f.get("claim", ""))} '
            f'<span class="verdict {cls}">{word}</span></h3>'
            + (f"<p>{_esc(summary)}</p>" if summary else "")
            + (f'<p class="muted">{"Why" if unmeasured else "Test"}: {_esc(test)}</p>' if test else "")
            + (f'<p class="ref">Paper: {_esc(paper)}</p>' if paper else "")
            + (_kv_table(rest) if rest else "") + "</div>")


def _models_table(models: dict) -> str:
    """Metrics as rows, models as columns (mean over seeds; per-seed values in 'All metrics')."""
    if not models:
        return ""
    keys: list[str] = []
    for m in models.values():
        for k, v in m.items():
            if not isinstance(v, (dict, list)) and k not in keys:
                keys.append(k)
    names = list(models)
    head = "".join(f"<th>{_esc(n)}</th>" for n in names)
    body = "".join("<tr><td>" + _esc(k) + "</td>" + "".join(f"<td>{_fmt(models[n].get(k))}</td>" for n in names)
                   + "</tr>" for k in keys)
    return f"<table><tr><th>metric (mean over seeds)</th>{head}</tr>{body}</table>"


def read_metrics(study_dir: str | Path) -> dict:
    """A finished study's ``metrics.json``, checked for the shape the report and compare rely on."""
    path = Path(study_dir) / "metrics.json"
    if not path.is_file():
        raise InputError("no metrics.json: not a finished study folder", file=study_dir)
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise InputError(f"not valid JSON{where}: the file is damaged; rerun the study to rewrite it",
                         file=path) from None
    if not isinstance(metrics, dict):
        raise InputError(f"expected a JSON object, got {type(metrics).__name__}", file=path)
    findings = metrics.get("findings", [])
    if not isinstance(findings, list):
        raise InputError("expected a list", file=path, key="findings")
    for i, f in enumerate(findings):
        if not isinstance(f, dict) or not isinstance(f.get("id"), str):
            raise InputError("expected an object with a string 'id'", file=path, key=f"findings[{i}]")
        if not isinstance(f.get("claim", ""), str):
            raise InputError("expected a string", file=path, key=f"findings[{i}].claim")
        if f.get("holds") not in (True, False, None):
            raise InputError("expected true, false or null", file=path, key=f"findings[{i}].holds")
        if not isinstance(f.get("evidence", {}), dict):
            raise InputError("expected an object", file=path, key=f"findings[{i}].evidence")
    for key in ("study", "models"):
        if not isinstance(metrics.get(key, {}), dict):
            raise InputError("expected an object", file=path, key=key)
    for name, row in metrics.get("models", {}).items():
        if not isinstance(row, dict):
            raise InputError("expected an object of metrics", file=path, key=f"models.{name}")
    return metrics


def _read_figure_index(path: Path) -> list[dict]:
    """``figures/index.json``: the report's figure list (absent: none)."""
    if not path.is_file():
        return []
    try:
        figures = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError("not valid JSON: the file is damaged; rerun the study to rewrite it", file=path) from None
    if not isinstance(figures, list):
        raise InputError(f"expected a JSON list, got {type(figures).__name__}", file=path)
    for i, fig in enumerate(figures):
        # a file inside figures/ (the judge's radars are in a folder per model), never one outside it
        name = fig.get("file") if isinstance(fig, dict) else None
        if not isinstance(name, str) or not name or "\\" in name or \
                any(not part or part.startswith(".") for part in name.split("/")):
            raise InputError("expected an object with a 'file' inside the figures folder", file=path, key=f"[{i}]")
    return figures


def render_report(study_dir: str | Path) -> Path:
    """Render ``study_dir/report.html`` from the study's artifacts and return its path."""
    study_dir = Path(study_dir)
    metrics = read_metrics(study_dir)
    # every artifact is UTF-8 (itlens writes it so); the locale's encoding would garble or refuse model text
    cfg_path, versions_path = study_dir / "config.resolved.yaml", study_dir / "versions.json"
    cfg_text = cfg_path.read_text(encoding="utf-8") if cfg_path.is_file() else ""
    figures = _read_figure_index(study_dir / "figures" / "index.json")
    versions = json.loads(versions_path.read_text(encoding="utf-8")) if versions_path.is_file() else {}

    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>itlens report: "
             f"{_esc(metrics.get('study', {}).get('name', study_dir.name))}</title><style>{CSS}</style></head><body>"]
    study = metrics.get("study", {})
    parts.append(f"<h1>What instruction tuning did: {_esc(study.get('name', study_dir.name))}</h1>")
    parts.append(f"<p class='muted'>itlens study over seeds {_esc(study.get('seeds', ''))}; base: "
                 f"{_esc(study.get('base', ''))}. The four findings of Ghosh et al. (ICML 2024), each decided by "
                 "the stated test on this study's own models; <em>does not hold</em> is a valid outcome.</p>")
    parts.append("<h2>Findings</h2>")
    for f in metrics.get("findings", []):
        parts.append(_finding_html(f))
    parts.append("<h2>Models</h2>" + _models_table(metrics.get("models", {})))
    sections: dict[str, list[dict]] = {}
    for fig in figures:
        sections.setdefault(fig.get("section", "Figures"), []).append(fig)
    for section, figs in sections.items():
        parts.append(f"<h2>{_esc(section)}</h2>")
        for fig in figs:
            p = study_dir / "figures" / fig["file"]
            if not p.is_file():
                continue
            parts.append(f"<figure><img alt='{_esc(fig.get('title', ''))}' src='{png_data_uri(p)}'>"
                         f"<figcaption><b>{_esc(fig.get('title', ''))}</b> {_esc(fig.get('caption', ''))}"
                         + (f"<br><span class='ref'>Paper: {_esc(fig['reference'])}</span>" if fig.get("reference") else "")
                         + "</figcaption></figure>")
    views = sorted((study_dir / "views").glob("*.html")) if (study_dir / "views").is_dir() else []
    if views:
        parts.append("<h2>Token shift of sample responses</h2><p class='muted'>Each token coloured by its base rank "
                     "(blue unshifted, orange marginal, red shifted); hover for both models' top tokens.</p>")
        for v in views:
            parts.append(f"<h3>{_esc(v.stem)}</h3><iframe style='width:100%;height:420px;border:1px solid #ddd' "
                         f"srcdoc=\"{html.escape(v.read_text(encoding='utf-8'), quote=True)}\"></iframe>")
    # text as written (a country's "São Tomé", a model's phrase), not as \u escapes
    parts.append("<h2>All metrics</h2><pre>" + _esc(json.dumps(metrics, indent=1, sort_keys=True, ensure_ascii=False))
                 + "</pre>")
    parts.append("<h2>Resolved config</h2><pre>" + _esc(cfg_text) + "</pre>")
    if versions:
        parts.append("<h2>Versions</h2>" + _kv_table(versions))
    parts.append("</body></html>")
    return atomic_write_text(study_dir / "report.html", "\n".join(parts))


def compare_metrics(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Flatten two metrics dicts and list the numeric leaves that differ (for ``itlens compare``)."""
    out: list[tuple[str, Any, Any]] = []
    keys = sorted(set(a) | set(b)) if isinstance(a, dict) and isinstance(b, dict) else []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        path = f"{prefix}[{k}]" if isinstance(k, int) else f"{prefix}.{k}" if prefix else str(k)
        if isinstance(va, dict) or isinstance(vb, dict):
            out.extend(compare_metrics(va if isinstance(va, dict) else {}, vb if isinstance(vb, dict) else {}, path))
        elif isinstance(va, list) and isinstance(vb, list) and len(va) == len(vb):  # per seed, per item: by index
            out.extend(compare_metrics(dict(enumerate(va)), dict(enumerate(vb)), path))
        elif isinstance(va, list) or isinstance(vb, list):
            if va != vb:
                out.append((path, va, vb))
        elif va != vb and (isinstance(va, (int, float, bool, str)) or isinstance(vb, (int, float, bool, str))
                           or va is None or vb is None):
            out.append((path, va, vb))
    return out

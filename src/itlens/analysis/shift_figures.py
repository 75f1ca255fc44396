"""Figures of token distribution shift: the paper's Figures 1, 4 and 12, a position curve, and a
self-contained per-response token view (AlignTDS's demo page, without its CDN jQuery).

Every plotting function takes summaries (``ShiftResult.summary`` dicts, or the ``summary.json`` files
``itlens shift`` writes), so figures can be redrawn from saved runs without the models.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Iterable, Mapping

from itlens.analysis.token_shift import token_texts
from itlens.io import atomic_write_text
from itlens.plotting import CLASS_COLORS, save_fig, styled, subplots

FIG1_PANELS = (("kl", "KL Divergence"), ("base_prob", "Base Probability"), ("base_rank", "Base Rank"))


def _is_lora(name: str) -> bool:
    n = name.lower()
    return "lft" in n or "lora" in n


@styled
def plot_figure1(series: Mapping[str, Mapping[int | str, dict]], path: str | Path) -> Path:
    """Figure 1: mean KL / base probability / 0-based base rank against IT dataset size.

    ``series``: {variant: {size: summary}}, e.g. {"7B_SFT_Alpaca": {1000: s1, 10000: s2}}. Sizes are an
    evenly spaced categorical axis (as in the paper). LoRA/LFT variants (name contains "lft" or "lora")
    are dashed with squares, the others solid with stars.
    """
    sizes = sorted({int(k) for runs in series.values() for k in runs})
    fig, axes = subplots(1, 3, figsize=(12, 3.6))
    for (key, title), ax in zip(FIG1_PANELS, axes):
        for name, runs in series.items():
            pts = sorted((int(k), s["figure1"][key]) for k, s in runs.items() if s["figure1"][key] is not None)
            lora = _is_lora(name)
            ax.plot([sizes.index(k) for k, _ in pts], [v for _, v in pts], label=name,
                    linestyle="--" if lora else "-", marker="s" if lora else "*", markersize=6)
        ax.set_title(title)
        ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
        ax.set_xlabel("Size →")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, max(1, len(labels))), bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    return save_fig(fig, path)


@styled
def plot_figure4(groups: Mapping[str, dict], path: str | Path) -> Path:
    """Figure 4: per-sentence KL over the first 5% of tokens vs the remaining 95%, with Diff%.

    ``groups``: {label: summary}; bars in the given order.
    """
    labels = list(groups)
    first = [groups[k]["sentence_kl"]["first"] or 0.0 for k in labels]
    rest = [groups[k]["sentence_kl"]["rest"] or 0.0 for k in labels]
    fig, ax = subplots(figsize=(max(4, 1.4 * len(labels) + 1), 3.6))
    x = range(len(labels))
    w = 0.38
    ax.bar([i - w / 2 for i in x], first, w, label="first 5%", color="#1b7837")
    ax.bar([i + w / 2 for i in x], rest, w, label="last 95%", color="#a6dba0")
    for i, k in enumerate(labels):
        d = groups[k]["sentence_kl"]["diff_pct"]
        if d is not None:
            ax.annotate(f"{d:+.1f}%", (i, max(first[i], rest[i])), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(list(x), labels, rotation=20, ha="right")
    ax.set_ylabel("KL divergence")
    ax.set_title("Sentence-level KL: first 5% vs last 95% of tokens")
    ax.legend()
    fig.tight_layout()
    return save_fig(fig, path)


@styled
def plot_figure12(summaries: Mapping[str, dict], path: str | Path, *, top_n: int = 40,
                  key: str = "top_shifted_marginal") -> Path:
    """Figure 12: frequency of the most common shifted + marginal tokens, one panel per model."""
    names = list(summaries)
    fig, axes = subplots(1, len(names), figsize=(4.2 * len(names), max(3.0, 0.16 * top_n + 1)), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = summaries[name][key][:top_n][::-1]  # largest at the top
        ax.barh(range(len(rows)), [c for _, c in rows], color=CLASS_COLORS["shifted"])
        ax.set_yticks(range(len(rows)), [repr(t)[1:-1] for t, _ in rows], fontsize=7)
        ax.set_xlabel("Count")
        ax.set_title(name)
    axes[0][0].set_ylabel("Token")
    fig.tight_layout()
    return save_fig(fig, path)


@styled
def plot_position_curve(summaries: Mapping[str, dict], path: str | Path) -> Path:
    """Shifted share and mean KL by relative position in the response (10 bins), one line per model."""
    fig, (a1, a2) = subplots(1, 2, figsize=(9, 3.4))
    for name, s in summaries.items():
        bins = s["by_rel_pos"]
        xs = [(b["bin"] + 0.5) / 10 for b in bins]
        a1.plot(xs, [(b["shifted"] or 0) + (b["marginal"] or 0) for b in bins], marker="o", label=name)
        a2.plot(xs, [b["kl"] for b in bins], marker="o", label=name)
    a1.set_title("Shifted + marginal share")
    a2.set_title("Mean KL")
    for a in (a1, a2):
        a.set_xlabel("relative position in response")
    a1.legend(fontsize=7)
    fig.tight_layout()
    return save_fig(fig, path)


# ---------------------------------------------------------------------------------- token view
_VIEW_CSS = """
body{font-family:sans-serif;max-width:60em;margin:1em auto;line-height:1.9}
.tok{position:relative;white-space:pre-wrap;border-radius:2px;cursor:default}
.tok.unshifted{color:%(unshifted)s}.tok.marginal{color:%(marginal)s}.tok.shifted{color:%(shifted)s;font-weight:600}
.tok.diff{text-decoration:underline}
.tok .tip{display:none;position:absolute;left:0;top:1.6em;z-index:10;background:#fff;border:1px solid #999;
 padding:4px;font-size:11px;line-height:1.3;color:#000;font-weight:400;white-space:nowrap;box-shadow:2px 2px 6px #aaa}
.tok:hover .tip{display:block}.tok:hover{background:#eee}
.tip table{border-collapse:collapse}.tip td,.tip th{padding:0 6px;text-align:left}
.resp{border:1px solid #ddd;padding:.6em;margin:1em 0}.inst{color:#555}
.legend span{margin-right:1em}
"""


def _tok_text(s: str) -> str:
    return html.escape(s).replace("\n", "↵\n")


def render_token_view(result, ids: Iterable[str] | None, path: str | Path, *, title: str = "Token shift",
                      tokenizer=None) -> Path:
    """Write one self-contained HTML page: each response's tokens coloured by shift class; hovering a
    token shows both models' top-k with probabilities (needs ``view_top_k`` > 0). No network needed.

    ``ids``: which responses (None: all). Underlined tokens differ from the base model's top-1.
    ``tokenizer`` names the top-k tokens when ``result`` has none (one read back with ``read_shift``);
    without either, a top-k token is named by the table's text of that id, and an id the table never
    shows is marked as an id (a bare "45" would read as the text "45").
    """
    tokens = result.tokens
    tok = tokenizer or result.tokenizer
    all_ids = list(dict.fromkeys(tokens["id"]))
    present = set(all_ids)
    chosen = all_ids if ids is None else [i for i in ids if i in present]
    has_top = "top_base_ids" in tokens
    cells: dict[int, str] = {}
    if tok is None and has_top:  # an id always has the same text: the table names every id it emitted
        emitted = tokens.drop_duplicates("token_id")
        cells = {int(i): _tok_text(repr(t)[1:-1]) for i, t in zip(emitted["token_id"], emitted["token"])}
    elif tok is not None and has_top:  # every top-k id of the shown responses in one batch, not one decode each
        shown = tokens[tokens["id"].isin(set(chosen))]
        top = list(dict.fromkeys(int(i) for col in ("top_base_ids", "top_tuned_ids") for row in shown[col]
                                 for i in row))
        cells = {i: _tok_text(repr(t)[1:-1]) for i, t in zip(top, token_texts(tok, top))}

    def cell(i: int) -> str:
        """A top-k token as HTML (its text in running text, as the table's ``token``)."""
        i = int(i)
        if i not in cells:
            cells[i] = _tok_text(repr(token_texts(tok, [i])[0])[1:-1]) if tok is not None else f"<i>id {i}</i>"
        return cells[i]

    s = result.summary
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_VIEW_CSS % CLASS_COLORS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>mode: <b>{html.escape(str(s.get('mode')))}</b>, base context: "
             f"<b>{html.escape(str(s.get('base_context')))}</b>; base: {html.escape(str(s.get('models', {}).get('base')))}"
             f", tuned: {html.escape(str(s.get('models', {}).get('tuned')))}</p>",
             "<p class='legend'>" + "".join(f"<span class='tok {c}'>{c}</span>" for c in CLASS_COLORS)
             + "<span class='tok diff'>underlined: base top-1 differs</span></p>"]
    groups = dict(tuple(tokens.groupby("id", sort=False)))
    for rid in chosen:
        g = groups[rid]
        rec = (result.records or {}).get(rid, {})
        inst = rec.get("instruction")
        parts.append(f"<div class='resp'><div class='inst'><b>{html.escape(str(rid))}</b>"
                     + (f": {html.escape(str(inst))}" if inst else "") + "</div><div>")
        for row in g.itertuples(index=False):
            cls = [row.shift_class] + (["diff"] if row.top1_base != row.token_id else [])
            tip = (f"pos {row.pos} · rank {row.rank_base} · p_base {row.p_base:.3f} · p_tuned {row.p_tuned:.3f}"
                   f" · KL {row.kl:.3f}")
            if has_top:
                trs = "".join(
                    f"<tr><td>{cell(bi)}</td><td>{bp * 100:.1f}%</td><td>{cell(ti)}</td><td>{tp * 100:.1f}%</td></tr>"
                    for bi, bp, ti, tp in zip(row.top_base_ids, row.top_base_p, row.top_tuned_ids, row.top_tuned_p))
                tip += f"<table><tr><th>base</th><th></th><th>tuned</th><th></th></tr>{trs}</table>"
            parts.append(f"<span class='tok {' '.join(cls)}'>{_tok_text(row.token)}<span class='tip'>{tip}</span></span>")
        parts.append("</div></div>")
    parts.append("</body></html>\n")
    return atomic_write_text(path, "".join(parts))


def write_shift_figures(result, out_dir: str | Path, *, view: int = 20, label: str = "tuned") -> list[Path]:
    """The single-run figures next to ``tokens.parquet``: position curve, Figure 4 and 12 panels,
    and the token view of the first ``view`` responses (0: none)."""
    out_dir = Path(out_dir)
    s = {label: result.summary}
    paths = [plot_position_curve(s, out_dir / "shift_by_position.png"),
             plot_figure4(s, out_dir / "sentence_kl.png"),
             plot_figure12(s, out_dir / "top_tokens.png")]
    if view:
        ids = list(dict.fromkeys(result.tokens["id"]))[:view]
        paths.append(render_token_view(result, ids, out_dir / "view.html"))
    return paths

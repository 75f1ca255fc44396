"""Radar charts of judge scores (the paper's Figures 2, 3 and 9): one per aspect set, one per task type.

Each generator in a summary is one solid series; paper rows named in ``paper_reference`` are drawn
dashed on the same axes. The paper's values come from gpt-4-1106-preview with its own prompt, so the
title says when the judge here differs and the overlay is a reference, not a target.
"""

from __future__ import annotations

import math
from pathlib import Path

from itlens.judge.paper import paper_reference as lookup_paper_row
from itlens.judge.scoring import ASPECTS, TASK_TYPES
from itlens.plotting import save_fig, styled, subplots

LABELS = {"helpfulness": "Helpfulness", "clarity": "Clarity", "factuality": "Factuality", "depth": "Depth",
          "engagement": "Engagement", "coding": "Coding", "info-seek": "Info-Seek", "math": "Math",
          "procedure": "Procedure", "reasoning": "Reasoning", "role-play": "Role-Play", "writing": "Writing"}


@styled
def radar_chart(series: dict[str, dict[str, float | None]], axes: list[str], *, title: str = "",
                reference: dict[str, dict[str, float | None]] | None = None, rlim: tuple[float, float] = (1, 5)):
    """A radar (first axis at the top, clockwise). ``series``/``reference``: label -> {axis: value}."""
    import matplotlib

    angles = [2 * math.pi * i / len(axes) for i in range(len(axes))]
    fig, ax = subplots(figsize=(5.2, 5.2), subplot_kw={"projection": "polar"})
    ax.set_theta_offset(math.pi / 2)
    ax.set_theta_direction(-1)
    ax.set_xticks(angles)
    ax.set_xticklabels([LABELS.get(a, a) for a in axes])
    ax.set_ylim(*rlim)
    ax.set_rlabel_position(180 / len(axes))  # ring labels between the first two axes
    ax.set_yticks([rlim[0] + 0.5 * k for k in range(int((rlim[1] - rlim[0]) / 0.5) + 1)])
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]

    def draw(label, values, style, color):
        ys = [values.get(a) for a in axes]
        ys = [float("nan") if y is None else y for y in ys]
        ax.plot(angles + angles[:1], ys + ys[:1], style, color=color, label=label, linewidth=1.6, markersize=4)

    for i, (label, values) in enumerate(series.items()):
        draw(label, values, "-o", colors[i % len(colors)])
    for i, (label, values) in enumerate((reference or {}).items()):
        draw(f"paper: {label}", values, "--s", colors[(len(series) + i) % len(colors)])
    ax.set_title(title, pad=18)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), fontsize=7, frameon=False)
    return fig


@styled
def write_judge_figures(summary: dict, out_dir: str | Path, paper_reference: list[str] = ()) -> list[Path]:
    """``radar_aspects.png`` and (with >= 3 task types) ``radar_task_types.png`` for a judge summary."""
    out_dir = Path(out_dir)
    judge = summary["judge"]
    note = "" if judge["paper_judge"] else "\n(paper values: gpt-4-1106-preview; this judge: " + judge["model"] + ")"
    refs = {label: lookup_paper_row(label) for label in paper_reference}
    models = summary["models"]
    written = []

    aspects = {m: {a: s["aspects"][a]["estimate"] for a in ASPECTS} for m, s in models.items()}
    ref_aspects = {k: v["aspects"] for k, v in refs.items() if v["aspects"]}
    fig = radar_chart(aspects, list(ASPECTS), title="Judge scores per aspect" + (note if ref_aspects else ""),
                      reference=ref_aspects)
    written.append(save_fig(fig, out_dir / "radar_aspects.png"))

    seen = {t for s in models.values() for t in s["task_types"]}
    task_axes = [t for t in TASK_TYPES if t in seen] + sorted(seen - set(TASK_TYPES))
    if len(task_axes) >= 3:
        tasks = {m: {t: s["task_types"].get(t, {}).get("estimate") for t in task_axes} for m, s in models.items()}
        ref_tasks = {k: v["task_types"] for k, v in refs.items() if v["task_types"]}
        fig = radar_chart(tasks, task_axes, title="Mean of the five aspects per task type" +
                          (note if ref_tasks else ""), reference=ref_tasks)
        written.append(save_fig(fig, out_dir / "radar_task_types.png"))
    return written

"""Matplotlib figures saved as PNG files and embedded in self-contained HTML (no network needed)."""

from __future__ import annotations

import base64
import functools
import io
from pathlib import Path

from itlens.io import atomic_write_bytes

# itlens's figure style, applied only while its own figures are drawn (rc_context): importing itlens or
# making a report never changes the caller's matplotlib backend or settings (a notebook keeps its own).
# text.parse_math off: labels are user text (tokens such as "$$" or "}$", model names), never TeX math.
STYLE = {"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3, "font.size": 9, "text.parse_math": False}


def styled(fn):
    """Run a figure-making function under :data:`STYLE` (matplotlib is imported only when it runs)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)
    return wrapper


def subplots(nrows: int = 1, ncols: int = 1, *, figsize=None, **kwargs):
    """``plt.subplots`` without pyplot: a standalone Figure (no backend, no global figure registry)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


# The paper's Figure 1 / AlignTDS colours for shift classes.
CLASS_COLORS = {"unshifted": "#1f77b4", "marginal": "#9b6400", "shifted": "#d62728"}


def fig_to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def save_fig(fig, path: str | Path) -> Path:
    """Write ``fig`` as PNG atomically and close it."""
    return atomic_write_bytes(path, fig_to_png(fig))


def png_data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()

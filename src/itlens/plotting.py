"""Matplotlib figures saved as PNG files and embedded in self-contained HTML (no network needed)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from itlens.io import atomic_write_bytes  # noqa: E402

# text.parse_math off: labels are user text (tokens such as "$$" or "}$", model names), never TeX math
plt.rcParams.update({"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3, "font.size": 9,
                     "text.parse_math": False})

# The paper's Figure 1 / AlignTDS colours for shift classes.
CLASS_COLORS = {"unshifted": "#1f77b4", "marginal": "#9b6400", "shifted": "#d62728"}


def fig_to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def save_fig(fig, path: str | Path) -> Path:
    """Write ``fig`` as PNG atomically and close it."""
    return atomic_write_bytes(path, fig_to_png(fig))


def png_data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()

"""A quick-look PNG of a segmentation: axial and coronal CT views through the kidneys' centre,
with the right (red) and left (blue) kidney outlined.

With ``--uncertainty N`` the voxel-wise disagreement of the Monte-Carlo samples lies under the outlines
as a heat map (magma, more opaque where they disagree more, nothing where they agree) with a colour
bar; with ``--quality`` each kidney's verdict is a second title line (:func:`quality_line`).

Views use the radiological convention (patient's right on the image's left, anterior / superior
at the top) and true pixel aspect ratios from the voxel spacing. matplotlib is imported inside
:func:`render_preview` only, through its object API with the Agg canvas, so neither importing
this module nor calling it touches pyplot or the global backend.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from qnkit.postprocess import LEFT, RIGHT

__all__ = ["render_preview", "write_preview", "quality_line", "figure_title"]

COLOURS = {RIGHT: "#ff3b30", LEFT: "#0a84ff"}
UNCERTAINTY_LABEL = "MC disagreement"
UNCERTAINTY_CMAP = "magma"


def quality_line(quality: dict | None) -> str:
    """'right ok 0.41 / left CHECK 1.80': the verdict and score of each kidney that has one."""
    parts = [f"{side} {'ok' if q['verdict'] == 'ok' else q['verdict'].upper()} {float(q['score']):.2f}"
             for side in ("right", "left") if (q := (quality or {}).get(side)) is not None]
    return " / ".join(parts)


def figure_title(title: str, quality: dict | None) -> str:
    """The figure's title: `title`, then the verdicts (:func:`quality_line`) on a line of their own."""
    return "\n".join(line for line in (title, quality_line(quality)) if line)


def _uncertainty_overlay(ax, values: np.ndarray, aspect: float):
    """Draw `values` (0..1) as a heat map on `ax`: transparent at 0, more opaque as they grow."""
    alpha = np.where(values > 0, 0.25 + 0.45 * np.clip(values, 0.0, 1.0), 0.0)
    return ax.imshow(np.ma.masked_less_equal(values, 0.0), cmap=UNCERTAINTY_CMAP, vmin=0.0, vmax=1.0,
                     alpha=alpha, aspect=aspect, interpolation="nearest")


def _centre(sides: np.ndarray) -> tuple[int, int, int]:
    idx = np.nonzero(sides)
    if idx[0].size == 0:
        return tuple(n // 2 for n in sides.shape)
    return tuple(int(round(float(i.mean()))) for i in idx)


def render_preview(ct: np.ndarray, sides: np.ndarray, spacing, *, title: str = "",
                   window: tuple[float, float] = (-200.0, 400.0), uncertainty: np.ndarray | None = None,
                   quality: dict | None = None) -> bytes:
    """PNG bytes of the two views for an internal-layout (I, P, L) CT and side labels.

    `uncertainty`: voxel-wise disagreement in [0, 1] on the same grid (zeros outside the sampled box),
    drawn under the outlines; `quality`: {"right": verdict or None, "left": ...}, shown under the title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if uncertainty is not None and uncertainty.shape != sides.shape:
        raise ValueError(f"uncertainty volume {uncertainty.shape} is not on the sides' grid {sides.shape}")
    dz, dy, dx = (float(s) for s in spacing)
    z, y, _ = _centre(sides)
    heat = (uncertainty[z], uncertainty[:, y, :]) if uncertainty is not None else (None, None)
    views = [
        (f"axial, slice {z}", ct[z], sides[z], heat[0], dy / dx),
        (f"coronal, row {y}", ct[:, y, :], sides[:, y, :], heat[1], dz / dx),
    ]
    fig = Figure(figsize=(10, 5.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    overlay = None
    for ax, (name, image, labels, values, aspect) in zip(axes, views):
        ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest")
        if values is not None:
            overlay = _uncertainty_overlay(ax, values, aspect)
        for value, colour in COLOURS.items():
            sel = labels == value
            if sel.any() and sel.shape[0] > 1 and sel.shape[1] > 1:
                ax.contour(sel.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("patient right  \u2190  \u2192  patient left", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], color=COLOURS[RIGHT], label="right kidney"),
               Line2D([], [], color=COLOURS[LEFT], label="left kidney")]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False, fontsize=9)
    heading = figure_title(title, quality)
    if heading:
        fig.suptitle(heading, fontsize=11)
    top = 0.95 if "\n" not in heading else 0.91
    fig.tight_layout(rect=(0, 0.05, 1 if overlay is None else 0.91, top))
    if overlay is not None:
        bar = fig.colorbar(overlay, cax=fig.add_axes((0.925, 0.2, 0.012, 0.6)))
        bar.set_label(UNCERTAINTY_LABEL, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_preview(path: str | Path, ct: np.ndarray, sides: np.ndarray, spacing, **kwargs) -> Path:
    """Render and write the PNG atomically to `path`."""
    from qnkit._atomic import write_bytes_atomic

    data = render_preview(ct, sides, spacing, **kwargs)
    write_bytes_atomic(path, data)
    return Path(path)

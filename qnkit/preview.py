"""A quick-look PNG of a segmentation: axial and coronal CT views through the kidneys' centre,
with the right (red) and left (blue) kidney outlined.

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

__all__ = ["render_preview", "write_preview"]

COLOURS = {RIGHT: "#ff3b30", LEFT: "#0a84ff"}


def _centre(sides: np.ndarray) -> tuple[int, int, int]:
    idx = np.nonzero(sides)
    if idx[0].size == 0:
        return tuple(n // 2 for n in sides.shape)
    return tuple(int(round(float(i.mean()))) for i in idx)


def render_preview(ct: np.ndarray, sides: np.ndarray, spacing, *, title: str = "",
                   window: tuple[float, float] = (-200.0, 400.0)) -> bytes:
    """PNG bytes of the two views for an internal-layout (I, P, L) CT and side labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    dz, dy, dx = (float(s) for s in spacing)
    z, y, _ = _centre(sides)
    views = [
        (f"axial, slice {z}", ct[z], sides[z], dy / dx),
        (f"coronal, row {y}", ct[:, y, :], sides[:, y, :], dz / dx),
    ]
    fig = Figure(figsize=(10, 5.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, (name, image, labels, aspect) in zip(axes, views):
        ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest")
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
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_preview(path: str | Path, ct: np.ndarray, sides: np.ndarray, spacing, **kwargs) -> Path:
    """Render and write the PNG atomically to `path`."""
    from qnkit._atomic import write_bytes_atomic

    data = render_preview(ct, sides, spacing, **kwargs)
    write_bytes_atomic(path, data)
    return Path(path)

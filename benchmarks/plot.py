"""The `qnkit bench --plot` figure: throughput against batch size per backend, and the end-to-end stages."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from qnkit._atomic import atomic_path

    fig, (ax_rate, ax_e2e) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    series: dict[str, list[tuple[int, float]]] = {}
    for row in report.get("backends", []):
        if "slices_per_s" in row:
            series.setdefault(row["backend"], []).append((row["batch"], row["slices_per_s"]))
    for label, points in series.items():
        points.sort()
        ax_rate.plot([b for b, _ in points], [r for _, r in points], marker="o", label=label)
    ax_rate.set_xscale("log", base=2)
    ax_rate.set_yscale("log")
    # Plain numbers on both axes (batch sizes and rates), not powers of ten.
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax_rate.xaxis.set_major_formatter(plain)
    ax_rate.yaxis.set_major_formatter(plain)
    ax_rate.yaxis.set_minor_formatter(plain)
    ax_rate.set_xlabel("batch size (slices)")
    ax_rate.set_ylabel("slices per second")
    ax_rate.set_title("Inference throughput")
    ax_rate.grid(True, which="both", alpha=0.3)
    if series:
        ax_rate.legend(fontsize=8)

    e2e = report.get("e2e")
    if e2e:
        stages = ["load", "preprocess", "inference", "postprocess", "write"]
        y = np.arange(len(stages))
        for offset, (name, colour) in zip((-0.2, 0.2), (("default", "#c44"), ("eager", "#888"))):
            row = e2e[name]
            ax_e2e.barh(y + offset, [row["stages_s"].get(s, 0.0) for s in stages], height=0.38, color=colour,
                        label=f"{name}: {row['backend']['name']} {row['backend']['precision']}, "
                              f"wall {row['wall_s']:.1f} s")
        ax_e2e.set_yticks(y, stages)
        ax_e2e.invert_yaxis()
        ax_e2e.set_xlabel("seconds (median)")
        ax_e2e.legend(fontsize=8)
        shape = "x".join(str(s) for s in e2e["case"]["shape"][::-1])
        ax_e2e.set_title(f"qnkit segment, {shape}: {e2e['speedup_vs_eager']:.1f}x eager FP32, "
                         f"mask Dice {e2e['mask_dice_vs_eager']:.4f}")
    else:
        ax_e2e.set_axis_off()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

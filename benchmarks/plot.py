"""The `qnkit bench --plot` figure: throughput against batch size per backend, and the end-to-end stages."""
from __future__ import annotations

from pathlib import Path


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

    e2e = report.get("end_to_end")
    if e2e:
        stages = ["load", "preprocess", "inference", "postprocess", "write"]
        seconds = [e2e["stages_s"].get(s, 0.0) for s in stages]
        ax_e2e.barh(stages[::-1], seconds[::-1], color=["#888", "#888", "#c44", "#888", "#888"][::-1])
        ax_e2e.set_xlabel("seconds (median)")
        share = e2e.get("share_outside_inference")
        shape = "x".join(str(s) for s in e2e["shape"][::-1])
        ax_e2e.set_title(f"qnkit segment, {shape} ({e2e['backend']['name']} {e2e['backend']['precision']})\n"
                         f"wall {e2e['stages_s']['wall']:.2f} s, outside inference {share:.1%}")
    else:
        ax_e2e.set_axis_off()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

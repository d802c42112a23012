"""The performance targets of `qnkit bench`, checked against the figures of one run.

Each target becomes a row: what is asked, what this run measured, and whether it is met (True,
False, or None when this run cannot tell: no GPU, or agreement figures from untrained weights).
"""
from __future__ import annotations

KERNEL_FLOOR_RATIO = 2.0
KERNEL_NUMPY_SPEEDUP = {"downsample_image": 10.0, "border_weights": 10.0}
CPU_BACKEND_SPEEDUP = 3.0
MIN_AGREEMENT = 0.99
MAX_SHARE_OUTSIDE_INFERENCE = 0.10
GPU_TENSORRT_SPEEDUP = 10.0
E2E_SPEEDUP = 10.0
E2E_MIN_DICE = 0.99
E2E_MAX_RSS_GB = 3.0
E2E_MEMORY_SLICES = 1000


def _row(target: str, measured: str, met: bool | None) -> dict:
    return {"target": target, "measured": measured, "met": met}


def _kernel_rows(kernels: list[dict]) -> list[dict]:
    rows = []
    for threads in sorted({r["threads"] for r in kernels}):
        at = [r for r in kernels if r["threads"] == threads]
        worst = max(at, key=lambda r: r["ratio_to_floor"])
        rows.append(_row(f"every kernel within {KERNEL_FLOOR_RATIO:g}x its memory floor, {threads} thread(s)",
                         f"worst {worst['kernel']} {worst['ratio_to_floor']:.2f}x",
                         worst["ratio_to_floor"] <= KERNEL_FLOOR_RATIO))
    for name, speedup in KERNEL_NUMPY_SPEEDUP.items():
        mine = [r for r in kernels if r["kernel"] == name]
        if mine:
            slowest = min(mine, key=lambda r: r["speedup_vs_numpy"])
            rows.append(_row(f"{name} at least {speedup:g}x its NumPy reference",
                             f"{slowest['speedup_vs_numpy']:.1f}x ({slowest['threads']} thread(s))",
                             slowest["speedup_vs_numpy"] >= speedup))
    return rows


def _cpu_backend_rows(backends: list[dict], trained: bool) -> list[dict]:
    rows = []
    measured = [r for r in backends if "error" not in r]
    for batch in sorted({r["batch"] for r in measured}):
        candidates = [r for r in measured if r["batch"] == batch and r["device"] == "cpu"
                      and (r["kind"], r["precision"]) != ("torch", "fp32")]
        if trained:
            candidates = [r for r in candidates if r["dice_agreement_vs_eager"] >= MIN_AGREEMENT]
        if not candidates:
            rows.append(_row(f"best CPU backend at least {CPU_BACKEND_SPEEDUP:g}x eager FP32, batch {batch}",
                             "no backend agrees with eager", False))
            continue
        best = max(candidates, key=lambda r: r["speedup_vs_eager_fp32"] or 0.0)
        fast = (best["speedup_vs_eager_fp32"] or 0.0) >= CPU_BACKEND_SPEEDUP
        agreement = (f"Dice {best['dice_agreement_vs_eager']:.4f} vs eager" if trained
                     else "agreement not measured: untrained weights")
        # Untrained weights: a fast row cannot be called met, since its agreement is unknown.
        met = fast if trained else (None if fast else False)
        rows.append(_row(f"best CPU backend at least {CPU_BACKEND_SPEEDUP:g}x eager FP32 with Dice >= "
                         f"{MIN_AGREEMENT:g}, batch {batch}",
                         f"{best['backend']} {best['speedup_vs_eager_fp32']:.2f}x, {agreement}", met))
    return rows


def _gpu_rows(backends: list[dict]) -> list[dict]:
    if not any("error" not in r and r["device"] != "cpu" and (r["kind"], r["precision"]) == ("torch", "fp32")
               for r in backends):
        return [_row(f"TensorRT FP16 at least {GPU_TENSORRT_SPEEDUP:g}x eager FP32 on the GPU",
                     "no GPU in this run", None)]
    rows = []
    for kind, precision, graphs in (("tensorrt", "fp16", False), ("torch", "fp16", True)):
        found = [r for r in backends if "error" not in r and r["kind"] == kind and r["precision"] == precision
                 and r["device"] != "cpu" and ("cuda_graphs" in r["backend"]) == graphs
                 and r["speedup_vs_eager_fp32"]]
        if not found:
            continue
        best = max(found, key=lambda r: r["speedup_vs_eager_fp32"] or 0.0)
        label = "TensorRT FP16" if kind == "tensorrt" else "eager FP16 with CUDA graphs"
        rows.append(_row(f"{label} at least {GPU_TENSORRT_SPEEDUP:g}x eager FP32 on the GPU",
                         f"{best['speedup_vs_eager_fp32']:.2f}x at batch {best['batch']}",
                         best["speedup_vs_eager_fp32"] >= GPU_TENSORRT_SPEEDUP))
    return rows or [_row(f"TensorRT FP16 at least {GPU_TENSORRT_SPEEDUP:g}x eager FP32 on the GPU",
                         "no TensorRT or FP16 rows", None)]


def evaluate(report: dict) -> list[dict]:
    """One row per target that the sections of this report can speak to."""
    rows = []
    if report.get("kernels"):
        rows += _kernel_rows(report["kernels"])
    if report.get("backends"):
        trained = bool(report.get("bundle", {}).get("trained"))
        rows += _cpu_backend_rows(report["backends"], trained)
        rows += _gpu_rows(report["backends"])
    e2e = report.get("e2e")
    if e2e:
        rows += _e2e_rows(e2e)
    return rows


def _e2e_rows(e2e: dict) -> list[dict]:
    shape = "x".join(map(str, e2e["case"]["shape"][::-1]))
    z, h, w = e2e["case"]["shape"]
    whole = z >= 300 and min(h, w) >= 512  # the target is about a whole CT; a quick run's phantom cannot tell
    met = e2e["speedup_vs_eager"] >= E2E_SPEEDUP and e2e["mask_dice_vs_eager"] >= E2E_MIN_DICE
    rows = [_row(f"end to end on a whole CT (512x512, >= 300 slices), default path at least {E2E_SPEEDUP:g}x eager "
                 f"FP32 on every slice, mask Dice >= {E2E_MIN_DICE:g}",
                 f"{e2e['speedup_vs_eager']:.1f}x, Dice {e2e['mask_dice_vs_eager']:.4f} ({shape})",
                 met if whole else None)]
    memory = e2e.get("memory")
    if memory and memory["shape"][0] >= E2E_MEMORY_SLICES:
        rows.append(_row(f"peak memory under {E2E_MAX_RSS_GB:g} GB on a {E2E_MEMORY_SLICES}-slice 512x512 CT",
                         f"{memory['peak_rss_gb']:.2f} GB ({'x'.join(map(str, memory['shape'][::-1]))})",
                         memory["peak_rss_gb"] < E2E_MAX_RSS_GB))
    share = e2e["default"]["share_outside_inference"]
    rows.append(_row(f"end to end, time outside inference at most {MAX_SHARE_OUTSIDE_INFERENCE:.0%}",
                     f"{share:.1%} ({e2e['default']['backend']['name']} {e2e['default']['backend']['precision']})",
                     share <= MAX_SHARE_OUTSIDE_INFERENCE))
    return rows

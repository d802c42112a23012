"""`qnkit bench`: measured side by side in one run, reported as ratios."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import typer


def _system_info() -> dict:
    import numpy as np

    import qnkit
    from qnkit import kernels

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"qnkit": qnkit.__version__, "python": platform.python_version(), "numpy": np.__version__,
            "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "kernel_build": kernels.BUILD, "kernel_threads": kernels.get_num_threads()}


def command(
    json_out: Path = typer.Option(None, "--json", help="Write every figure to this JSON file."),
    quick: bool = typer.Option(False, "--quick", help="Smoke run on a small volume with few repeats (for tests)."),
    repeats: int = typer.Option(7, "--repeats", min=1, help="Timed repeats per figure (median is reported)."),
) -> None:
    """Benchmark the compiled kernels against NumPy and against their memory floor."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from qnkit._atomic import write_text_atomic
    from qnkit.benchmarks import kernels as kernel_bench

    if json_out is not None and not json_out.parent.is_dir():
        from qnkit.errors import QnkitInputError

        raise QnkitInputError(f"folder of --json does not exist: {json_out.parent}")
    shape = (8, 128, 128) if quick else (100, 512, 512)
    repeats = 2 if quick else repeats
    console = Console(stderr=True)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("kernels", total=None)
        rows = kernel_bench.run(shape, repeats=repeats, numpy_repeats=1 if quick else 3,
                                progress=lambda what: progress.update(task, description=what))

    table = Table(title=f"Kernels on a {shape[2]}x{shape[1]}x{shape[0]} volume (median of {repeats})")
    for column in ("kernel", "threads", "time ms", "numpy ms", "x numpy", "floor ms", "x floor", "GB/s"):
        table.add_column(column, justify="left" if column == "kernel" else "right", no_wrap=True)
    for row in rows:
        table.add_row(row["kernel"], str(row["threads"]), f"{row['kernel_s']['median_s'] * 1e3:.2f}",
                      f"{row['numpy_s']['median_s'] * 1e3:.1f}", f"{row['speedup_vs_numpy']:.1f}",
                      f"{row['floor_s']['median_s'] * 1e3:.2f}", f"{row['ratio_to_floor']:.2f}",
                      f"{row['gb_per_s']:.1f}")
    Console().print(table)
    if json_out is not None:
        report = {"system": _system_info(), "quick": quick, "kernels": rows}
        write_text_atomic(json_out, json.dumps(report, indent=2))

"""`qnkit evaluate`: per-volume Dice of a trained run on its recorded test split."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from qnkit.commands import choices


def command(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="Run folder written by `qnkit train`."),
    data: Path = typer.Option(None, "--data", help="KiTS19-layout folder (default: the one recorded in the run)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the results as JSON to this file."),
    checkpoint: choices.Checkpoint = typer.Option(None, "--checkpoint", callback=choices.plain, show_default=False,
                                                  help="Which checkpoint (default: [EVAL] checkpoint, i.e. best)."),
    device: choices.TorchDevice = typer.Option("cpu", "--device", callback=choices.plain, help="Where torch runs."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Slices per forward pass ([EVAL] batch_size)."),
    threshold: float = typer.Option(None, "--threshold", min=0.01, max=0.99,
                                    help="Probability threshold after upsampling ([EVAL] threshold, 0.5)."),
    postprocess: bool = typer.Option(True, "--postprocess/--no-postprocess",
                                     help="Score the mask `qnkit segment` writes (one kidney per side, stray pieces "
                                          "dropped); --no-postprocess scores the network's raw mask. Both are "
                                          "reported."),
    mirror: bool = typer.Option(False, "--mirror", help="Test-time mirroring, as `qnkit segment --mirror`."),
) -> None:
    """Dice per test volume of the mask `qnkit segment` writes, on the original image grid, mean and std;
    the raw network mask's Dice (before post-processing) is shown beside it.

    The test cases are those in RUN_DIR/evaluation_data.json; each goes through the one path of
    `qnkit segment` (qnkit.segment.segment_ct: kidney slab, resampling to the model's pixel spacing and
    back, post-processing) with segment's defaults. Results are also logged to RUN_DIR/tensorboard/evaluation.
    """
    from rich.console import Console
    from rich.table import Table

    from qnkit._atomic import write_text_atomic
    from qnkit.errors import QnkitInputError
    from qnkit.train.evaluation import evaluate

    if checkpoint not in (None, "best", "last"):
        raise QnkitInputError(f"--checkpoint must be best or last, got {checkpoint!r}")
    if device not in ("cpu", "cuda"):
        raise QnkitInputError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise QnkitInputError("--device cuda but no CUDA device is available")
    if json_out is not None and json_out.is_dir():
        raise QnkitInputError(f"--json {json_out} is a folder")
    console = Console(stderr=True)
    result = evaluate(run_dir, data_dir=data, which=checkpoint, device=device, batch_size=batch_size,
                      threshold=threshold, postprocess=postprocess, mirror=mirror,
                      progress=lambda row: console.log(f"{row['case_id']}: Dice {row['dice']:.4f}"))
    table = Table(title=f"{run_dir} — {result['checkpoint']} checkpoint (epoch {result['epoch']})")
    for name in ("case", "Dice", "network Dice", "slices", "kidney ml", "predicted ml"):
        table.add_column(name, justify="left" if name == "case" else "right")
    for r in result["cases"]:
        table.add_row(r["case_id"], f"{r['dice']:.4f}", f"{r['dice_network']:.4f}", str(r["slices"]),
                      f"{r['kidney_ml']:.1f}", f"{r['predicted_ml']:.1f}")
    table.add_section()
    table.add_row("mean ± std", f"{result['mean_dice']:.4f} ± {result['std_dice']:.4f}",
                  f"{result['mean_dice_network']:.4f}", "", "", "")
    Console().print(table)
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(result, indent=1))

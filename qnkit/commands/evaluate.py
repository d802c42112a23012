"""`qnkit evaluate`: per-volume Dice of a trained run on its recorded test split, and (``--quality``) how
well the per-kidney quality verdict (:mod:`qnkit.quality`) ranks the kidneys by their true Dice."""
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
                                    help="Probability threshold after upsampling (default: the one calibrated for this "
                                         "checkpoint, RUN_DIR/threshold.json, else [EVAL] threshold, 0.5)."),
    calibrate_threshold: bool = typer.Option(
        False, "--calibrate-threshold",
        help="First fit the threshold to the run's validation phantoms (the one whose masks have the true kidney "
             "volume, median over the cases; 0.30-0.70) and write it to RUN_DIR/threshold.json: evaluate and "
             "`qnkit export` then use it for this checkpoint. Excludes --threshold."),
    postprocess: bool = typer.Option(True, "--postprocess/--no-postprocess",
                                     help="Score the mask `qnkit segment` writes (one kidney per side, stray pieces "
                                          "dropped); --no-postprocess scores the network's raw mask. Both are "
                                          "reported."),
    mirror: bool = typer.Option(False, "--mirror", help="Test-time mirroring, as `qnkit segment --mirror`."),
    quality: bool = typer.Option(False, "--quality/--no-quality",
                                 help="Also each kidney's quality verdict (as `qnkit segment --quality`) beside its "
                                      "true Dice (labels split into sides at the body's midline), and the Spearman "
                                      "rank correlation of the score (and of each signal) with the Dice."),
    uncertainty: int = typer.Option(0, "--uncertainty", metavar="N", min=0, max=64,
                                    help="With the quality verdict: N Monte-Carlo dropout samples per kidney, as "
                                         "`qnkit segment --uncertainty` (implies --quality). 0: none."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the Monte-Carlo samples."),
    quality_plot: Path = typer.Option(None, "--quality-plot", metavar="FILE.png",
                                      help="Write a scatter plot of the quality score against the true Dice "
                                           "(implies --quality; needs the plot extra)."),
) -> None:
    """Dice per test volume of the mask `qnkit segment` writes, on the original image grid, mean and std;
    the raw network mask's Dice (before post-processing) is shown beside it.

    The test cases are those in RUN_DIR/evaluation_data.json; each goes through the one path of
    `qnkit segment` (qnkit.segment.segment_ct: kidney slab, resampling to the model's pixel spacing and
    back, post-processing) with segment's defaults. Results are also logged to RUN_DIR/tensorboard/evaluation.
    --quality adds the quality pass of `qnkit segment --quality --uncertainty N` and puts each kidney's Dice,
    score, verdict and signals in the JSON, with the Spearman correlation of score and Dice.
    """
    from rich.console import Console
    from rich.table import Table

    from qnkit._atomic import write_bytes_atomic, write_text_atomic
    from qnkit.errors import QnkitInputError, require
    from qnkit import quality_eval as QE
    from qnkit.train.evaluation import THRESHOLD_NAME, calibrate_threshold as calibrate, evaluate

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
    if quality_plot is not None:
        require("--quality-plot", "matplotlib", extra="plot")
        if quality_plot.suffix.lower() != ".png" or quality_plot.is_dir():
            raise QnkitInputError(f"--quality-plot {quality_plot}: expected a .png file name")
        if not quality_plot.absolute().parent.is_dir():
            raise QnkitInputError(f"--quality-plot {quality_plot}: folder does not exist")
    quality = quality or uncertainty > 0 or quality_plot is not None
    if calibrate_threshold and threshold is not None:
        raise QnkitInputError("--calibrate-threshold fits the threshold; --threshold sets it: give one")
    console = Console(stderr=True)
    if calibrate_threshold:
        fitted = calibrate(run_dir, data_dir=data, which=checkpoint or "best", device=device, batch_size=batch_size,
                           progress=lambda case, ratios: console.log(
                               f"{case}: predicted / true volume " + " ".join(f"{t:.2f}:{r:.3f}" for t, r in
                                                                              ratios.items())))
        ratio = {row["threshold"]: row["median_volume_ratio"] for row in fitted["table"]}[fitted["threshold"]]
        console.print(f"threshold {fitted['threshold']:.2f} (median predicted / true volume {ratio:.3f} over "
                      f"{len(fitted['cases'])} validation cases) -> {Path(run_dir) / THRESHOLD_NAME}")
    result = evaluate(run_dir, data_dir=data, which=checkpoint, device=device, batch_size=batch_size,
                      threshold=threshold, postprocess=postprocess, mirror=mirror, quality=quality,
                      uncertainty=uncertainty, seed=seed, progress=lambda row: console.log(_case_line(row)))
    table = Table(title=f"{run_dir} — {result['checkpoint']} checkpoint (epoch {result['epoch']})")
    for name in ("case", "Dice", "network Dice", "slices", "kidney ml", "predicted ml"):
        table.add_column(name, justify="left" if name == "case" else "right")
    for r in result["cases"]:
        name = r["case_id"] if r.get("in_domain", True) else f"{r['case_id']} (out of domain)"
        table.add_row(name, f"{r['dice']:.4f}", f"{r['dice_network']:.4f}", str(r["slices"]),
                      f"{r['kidney_ml']:.1f}", f"{r['predicted_ml']:.1f}")
    table.add_section()
    table.add_row("mean ± std", f"{result['mean_dice']:.4f} ± {result['std_dice']:.4f}",
                  f"{result['mean_dice_network']:.4f}", "", "", "")
    inside = result["in_domain"]
    if inside["out_of_domain"] and inside["cases"]:
        table.add_row(f"in domain ({inside['cases']} cases)", f"{inside['mean_dice']:.4f}", "", "", "",
                      f"worst {inside['worst_case']} {inside['min_dice']:.4f}")
    Console().print(table)
    if quality:
        Console(highlight=False, soft_wrap=True).print(QE.describe_summary(result["quality"]), markup=False)
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(result, indent=1))
    if quality_plot is not None:
        kidneys = [k for row in result["cases"] for k in row["kidneys"].values() if k is not None]
        write_bytes_atomic(quality_plot, QE.render_quality_plot(
            kidneys, result["quality"],
            title=f"{Path(run_dir).name}, {result['checkpoint']} checkpoint (epoch {result['epoch']})"))


def _case_line(row: dict) -> str:
    """'case_00003: Dice 0.9012' and, with quality, each kidney's verdict."""
    from qnkit.quality import describe_quality

    verdicts = describe_quality({side: k for side, k in (row.get("kidneys") or {}).items()
                                 if k is not None and k.get("verdict") is not None})
    return f"{row['case_id']}: Dice {row['dice']:.4f}" + (f" [quality: {verdicts}]" if verdicts else "")

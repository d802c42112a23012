"""`qnkit synth`: synthetic CT cases in the KiTS19 layout."""
from __future__ import annotations

from pathlib import Path

import typer

from qnkit.commands import choices


def command(
    out_dir: Path = typer.Argument(
        ..., help="Folder to write case_XXXXX/{imaging,segmentation}.nii.gz and kits.json into (created if needed)."
    ),
    cases: int = typer.Option(4, "--cases", "-n", help="Number of cases (>= 1)."),
    size: int = typer.Option(
        512, "--size", help="In-plane size in pixels (even, >= 32); the body keeps its physical size."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed (>= 0); the same seed, size and case index give the same case."),
    labels_from: Path = typer.Option(
        None,
        "--labels-from",
        help="Folder of real KiTS19 cases (case_*/segmentation.nii.gz, optional kits.json) whose kidney and tumor "
        "masks to build the phantoms around; cycled when --cases exceeds them.",
    ),
    kidneys: choices.Kidneys = typer.Option("both", "--kidneys", callback=choices.plain,
                                            help="Kidneys to keep (patient sides)."),
    generator: choices.Generator = typer.Option(
        "classic", "--generator", callback=choices.plain,
        help="classic: analytic phantom (fast, tests and demo); anatomy: a real organ layout deformed per case "
             "with real KiTS19 kidneys (--labels-from), four contrast phases, scanner effects (what the shipped "
             "model is trained on)."),
    pixel_range: str = typer.Option("1.3,2.6", "--pixel-range", metavar="LO,HI",
                                    help="anatomy: in-plane pixel size range in mm, drawn log-uniformly per case; "
                                         "--size caps the slice size."),
    anatomy_version: int = typer.Option(None, "--anatomy-version", show_default="newest",
                                        help="anatomy: recipe version. 1: the shipped kidney-synth model's data; "
                                             "2: also the spleen and liver moved and resized towards the kidneys "
                                             "and kidney positions jittered (organs touch the kidneys as in "
                                             "patients); 3: also large masses against a kidney (background); "
                                             "4: also the spleen, liver or mass at the kidney's HU in some "
                                             "bodies; 5: also the renal sinus opened at the hilum and "
                                             "labelled background (the kidney is its parenchyma); 6: also the renal "
                                             "vein, artery, pelvis and ureter leaving each hilum (background); 7: "
                                             "also the renal pelvis filling the sinus nearest the hilum."),
    phases: str = typer.Option(None, "--phases", metavar="U,C,N,E", show_default="0.15,0.35,0.35,0.15",
                               help="anatomy: how often each contrast phase is drawn (unenhanced, corticomedullary, "
                                    "nephrographic, excretory; scaled to sum to 1), e.g. mostly unenhanced for the "
                                    "low-dose CT of SPECT/CT. The bodies of a seed do not change with it."),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes generating cases in parallel (same output)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
) -> None:
    """Write synthetic abdominal CT cases (int16 HU, labels 0/1/2) in the KiTS19 layout.

    Each case has a body, spine, ribs, liver, spleen, bowel, vessels and two kidneys with cortex/medulla
    contrast and, in most cases, a tumor; kits.json lists case_id and radiographic_size (largest tumor
    diameter, cm) for every case.
    """
    from qnkit.errors import QnkitInputError
    from qnkit.synth import write_dataset

    try:
        lo, hi = (float(v) for v in pixel_range.split(","))
    except ValueError:
        raise QnkitInputError(f"--pixel-range {pixel_range!r}: expected LO,HI in mm, e.g. 1.3,2.6") from None
    phase_weights = None
    if phases is not None:
        try:
            phase_weights = [float(v) for v in phases.split(",")]
        except ValueError:
            raise QnkitInputError(f"--phases {phases!r}: expected four weights U,C,N,E, e.g. 0.4,0.2,0.25,0.15") from None
    folders = write_dataset(
        out_dir, cases=cases, size=size, seed=seed, labels_from=labels_from, progress=progress, kidneys=kidneys,
        generator=generator, pixel_range=(lo, hi), workers=workers, anatomy_version=anatomy_version,
        phase_weights=phase_weights,
    )
    typer.echo(f"wrote {len(folders)} case(s) and kits.json to {out_dir}")

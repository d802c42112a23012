"""`qnkit synth`: synthetic CT cases in the KiTS19 layout (placeholder until qnkit.synth lands)."""
from pathlib import Path

import typer


def command(
    out_dir: Path = typer.Argument(..., help="Folder to write case_XXXXX/ folders and kits.json into."),
    cases: int = typer.Option(4, "--cases", min=1, help="Number of cases."),
    size: int = typer.Option(512, "--size", min=32, help="In-plane size in pixels."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same cases."),
    labels_from: Path = typer.Option(None, "--labels-from", help="Folder of real KiTS19 cases whose label geometry to use."),
) -> None:
    """Write synthetic CT cases in the KiTS19 layout."""
    from qnkit.synth import write_dataset

    write_dataset(out_dir, cases=cases, size=size, seed=seed, labels_from=labels_from)

"""`qnkit models`: the models that ship with qnkit, their domain and their validation figures."""
from __future__ import annotations

import json

import typer


def command(
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON."),
) -> None:
    """List the shipped models: what each was trained on, the grid it works at, and how it was validated."""
    from rich.console import Console
    from rich.table import Table

    from qnkit.bundle import load_bundle
    from qnkit.models import shipped_models

    rows = []
    for model in shipped_models():
        domain = load_bundle(model.path, verify=False).domain or {}
        rows.append({"name": model.name, "default": model.default, "path": str(model.path),
                     "domain": domain, **model.entry})
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    console = Console(highlight=False)
    if not rows:
        console.print("no shipped models installed")
        return
    table = Table(title="shipped models", show_lines=True)
    for col in ("name", "trained on", "works at", "validated on"):
        table.add_column(col, overflow="fold")
    for r in rows:
        d = r["domain"]
        works = (f"{d.get('pixel_spacing_mm')} mm pixels, slices {d.get('slice_thickness_mm')} mm, "
                 f"HU {d.get('hu_window')}")
        validated = "\n".join(f"{v.get('data')}: {v.get('summary')}" for v in r.get("validation", []))
        table.add_row(r["name"] + (" (default)" if r["default"] else ""), r.get("trained_on", ""), works, validated)
    console.print(table)

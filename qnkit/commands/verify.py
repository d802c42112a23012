"""`qnkit verify BUNDLE`: check a model bundle as one unit and print what was checked.

Checked: ``qnkit.json`` (format, version, and its manifest hash over the canonical content, so an
edited threshold, HU window or network config is caught) and every artefact's SHA-256 and size; a
TensorRT engine's target is printed (the backend checks it against the machine before running it).
A failed check is one line on stderr and exit code 2.
"""
from __future__ import annotations

from pathlib import Path

import typer


def check_bundle(bundle_dir: Path, echo=print) -> None:
    """Verify ``bundle_dir`` (raises BundleError on the first failure) and print each check."""
    from qnkit.bundle import MANIFEST_KEY, METADATA_NAME, load_bundle

    bundle = load_bundle(bundle_dir, verify=False)
    meta = bundle.metadata
    echo(f"{bundle.path}: qnkit bundle v{meta['version']}, input {bundle.input_size[0]}x{bundle.input_size[1]}, "
         f"HU window {bundle.hu_window}, threshold {bundle.threshold}")
    echo(f"  ok  {METADATA_NAME}: {MANIFEST_KEY} {meta[MANIFEST_KEY][:16]}... matches its canonical content")
    for record in bundle.verify_all():
        echo(f"  ok  {record['name']}: {record['bytes']:,} bytes, SHA-256 {record['sha256'][:16]}... matches")
    echo(f"artefacts (SHA-256 verified): {', '.join(sorted(meta['artefacts']))}")
    ver = meta.get("verification", {})
    for kind in ("fp32", "fp16", "int8", "tensorrt"):
        if kind in ver:
            echo(f"  {kind} at export: max |diff| {ver[kind]['max_abs_diff']:.2e}, mask Dice {ver[kind]['dice']:.5f}")
    echo(f"CPU default (precision auto): {bundle.cpu_precision}: {bundle.cpu_precision_why}")
    if bundle.engine:
        engine = bundle.engine
        echo(f"engine: built for TensorRT {engine.get('tensorrt')} on {engine.get('gpu')} (compute capability "
             f"{engine.get('compute_capability')}); the tensorrt backend runs it only on that target, else rebuilds")
    echo("the bundle folder is the trust boundary: load bundles only from folders you trust")


def command(bundle: Path = typer.Argument(..., help="Bundle folder written by `qnkit export`.")) -> None:
    """Verify a model bundle (qnkit.json's manifest hash, every artefact's SHA-256) and print what was checked."""
    check_bundle(bundle, echo=typer.echo)

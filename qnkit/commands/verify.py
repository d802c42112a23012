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
    for line in int8_lines(meta):
        echo(line)
    echo(f"CPU default (precision auto): {bundle.cpu_precision}: {bundle.cpu_precision_why}")
    if bundle.engine:
        engine = bundle.engine
        echo(f"engine: built for TensorRT {engine.get('tensorrt')} on {engine.get('gpu')} (compute capability "
             f"{engine.get('compute_capability')}); the tensorrt backend runs it only on that target, else rebuilds")
    echo("the bundle folder is the trust boundary: load bundles only from folders you trust")


def int8_lines(meta: dict) -> list[str]:
    """What the bundle says about its INT8 graph: which convolutions run in INT8 and which stay in float (and
    why), and the evidence against FP32 on real CTs and held-out phantoms that decides the CPU default."""
    lines = []
    graph = (meta.get("export") or {}).get("int8") or {}
    if "kept_float" in graph:
        kept = graph["kept_float"]
        lines.append(f"  int8 graph: {graph.get('quantised_convolutions')} convolutions in INT8 "
                     f"({graph.get('int8_flops_share', 0):.0%} of the FLOPs), {len(kept)} kept in float, "
                     f"calibration {graph.get('calibration')}")
        search = graph.get("search") or {}
        alone = {row["node"]: row["dice_alone"] for row in search.get("sensitivity", [])}
        searched = [f"{k['module']} ({alone[k['node']]:.4f} alone)" for k in kept if k["node"] in alone]
        if searched:
            lines.append(f"    kept in float by the sensitivity search (mask Dice vs FP32 quantised alone, tuning "
                         f"phantoms): {', '.join(searched)}")
        other = sorted({k["why"].split(":")[0] for k in kept if k["node"] not in alone})
        if other:
            lines.append(f"    kept in float by rule: {'; '.join(other)}")
        if search.get("note"):
            lines.append(f"    {search['note']}")
    verification = meta.get("verification") or {}
    for figures in (verification.get("int8_real_ct") or {}).get("cts", []):
        dice = figures["dice_int8_vs_fp32"]["both"]
        lines.append(f"  int8 evidence: {figures['data']}: mask Dice vs FP32 "
                     + (f"{dice:.4f}" if dice is not None else "- (no kidney in either mask)"))
    phantoms = verification.get("int8_phantoms")
    if phantoms and phantoms.get("cases_counted"):
        lines.append(f"  int8 evidence: {phantoms['cases_counted']} held-out phantoms: mask Dice vs FP32 mean "
                     f"{phantoms['mean_dice']:.4f}, worst {phantoms['min_dice']:.4f} ({phantoms['worst']})")
    return lines


def command(bundle: Path = typer.Argument(..., help="Bundle folder written by `qnkit export`.")) -> None:
    """Verify a model bundle (qnkit.json's manifest hash, every artefact's SHA-256) and print what was checked."""
    check_bundle(bundle, echo=typer.echo)

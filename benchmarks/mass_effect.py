"""Does a large mass against a kidney change the kidney qnkit reports? (The seed's convention: it must not.)

For each body, the same phantom is rendered twice, without and with a 300-700 mL mass pressed against one
kidney (:func:`qnkit.synth.anatomy.add_mass`; the mass is background in the labels), both are segmented by
``qnkit segment`` with the model under test, and that kidney's reported volume is compared: the relative
change, and each volume against the true one. A model that takes part of the mass into the kidney reports
it larger with the mass than without.

    python -m qnkit.benchmarks.mass_effect --model kidney-synth --cases 4 --json mass.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def mass_pair(index: int, *, seed: int = 0, labels_from: Path | None = None, volume_ml=(300.0, 700.0),
              pixel_mm: float = 1.6, thickness_mm: float = 3.0):
    """(without, with, record): two images of one body, the second with a mass of `volume_ml` (as painted)
    against one of its kidneys; the labels are the same (the mass is background)."""
    from qnkit.synth.anatomy import add_mass, make_anatomy
    from qnkit.synth.appearance import draw_look
    from qnkit.synth.atlas import LABEL
    from qnkit.synth.classic import SynthCase
    from qnkit.synth.render import render

    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 7]))
    while True:  # a body with both kidneys, so that the mass has a side to press on
        body = make_anatomy(rng, pixel_mm=pixel_mm, thickness_mm=thickness_mm, labels_from=labels_from, version=2)
        sides = [s for s in ("right", "left") if (body.tissue == LABEL[f"kidney_{s}"]).any()]
        if len(sides) == 2:
            break
    side = sides[int(rng.integers(2))]
    look = draw_look(rng, phase_p=(0.0, 0.0, 1.0, 0.0))  # nephrographic: the mass enhances like the kidney
    mass_rng = np.random.default_rng(np.random.SeedSequence([seed, index, 8]))
    for _ in range(20):  # the body's edge, bone and the field of view can cut a mass short: draw until it is whole
        with_mass = body.tissue.copy()
        record = add_mass(mass_rng, with_mass, body.labels, body.spacing, side, volume_ml=volume_ml)
        if record and volume_ml[0] <= record["volume_ml"] <= volume_ml[1]:
            break
    else:
        raise RuntimeError(f"body {index}: no mass of {volume_ml[0]:g}-{volume_ml[1]:g} mL fits against its {side} kidney")
    images = [render(np.random.default_rng(np.random.SeedSequence([seed, index, 9])), tissue, body.labels,
                     body.spacing, look) for tissue in (body.tissue, with_mass)]
    truth_ml = float(((body.tissue == LABEL[f"kidney_{side}"]) & (body.labels > 0)).sum()) * float(
        np.prod(body.spacing)) / 1000
    cases = [SynthCase(case_id=f"case_{index:05d}", imaging=image, segmentation=body.labels, affine=body.affine,
                       radiographic_size=0.0, meta={}) for image in images]
    return cases[0], cases[1], {**record, "true_ml": round(truth_ml, 1)}


def _segment(image_path: Path, model: str, stats: Path) -> dict:
    cmd = [sys.executable, "-m", "qnkit", "segment", str(image_path), "--model", model, "--stats", str(stats),
           "--out", str(image_path.with_name(image_path.name.replace(".nii.gz", "_kidneys.nii.gz"))), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"qnkit segment {image_path} failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(stats.read_text())


def _side_ml(stats: dict, side: str) -> float:
    """The volume the stats JSON reports for one side (0 when absent)."""
    case = stats["cases"][0] if "cases" in stats else stats
    kidney = (case.get("kidneys") or {}).get(side) or {}
    return float(kidney.get("volume_ml") or 0.0)


def measure(model: str, *, cases: int = 4, seed: int = 0, labels_from: Path | None = None,
            workdir: Path | None = None, pixel_mm: float = 1.6, thickness_mm: float = 3.0) -> dict:
    """Per body: the mass's side, its volume, the true kidney volume and the volume reported without and with it."""
    from qnkit.synth.writer import write_case

    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="qnkit-mass-"))
    rows = []
    for index in range(cases):
        without, with_mass, record = mass_pair(index, seed=seed, labels_from=labels_from, pixel_mm=pixel_mm,
                                               thickness_mm=thickness_mm)
        reported = {}
        for name, case in (("without", without), ("with", with_mass)):
            folder = write_case(case, workdir / name)
            stats = _segment(folder / "imaging.nii.gz", model, workdir / name / f"{case.case_id}.json")
            reported[name] = _side_ml(stats, record["side"])
        change = (reported["with"] - reported["without"]) / max(reported["without"], 1e-6)
        rows.append({"case": index, "side": record["side"], "where": record["where"], "mass_ml": record["volume_ml"],
                     "true_ml": record["true_ml"], "reported_without_ml": round(reported["without"], 1),
                     "reported_with_ml": round(reported["with"], 1), "relative_change": round(change, 4)})
    return {"model": model, "seed": seed, "cases": rows,
            "max_abs_relative_change": max(abs(r["relative_change"]) for r in rows)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="kidney-synth", help="shipped model name or bundle folder")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labels-from", type=Path, help="KiTS19 label maps for the kidneys (default: the atlas's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from qnkit.errors import QnkitInputError
    from qnkit.models import resolve_model

    try:  # a model that cannot be found is one line before any phantom is made
        bundle = resolve_model(args.model)
        if not (bundle / "qnkit.json").is_file():
            raise QnkitInputError(f"{args.model}: no model bundle there (`qnkit models` lists the shipped ones)")
        if args.cases < 1:
            raise QnkitInputError(f"--cases must be at least 1, got {args.cases}")
    except QnkitInputError as exc:
        print(f"mass_effect: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    result = measure(str(bundle), cases=args.cases, seed=args.seed, labels_from=args.labels_from)
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

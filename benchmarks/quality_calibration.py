"""Calibrate the per-kidney quality verdict (:mod:`qnkit.quality`) on phantoms whose truth is known.

Each case goes through :func:`qnkit.segment.segment_ct` with the quality pass (mirror + Monte-Carlo dropout
samples); every kidney found gives one row: its signals and its true Dice (the phantom's labels split
into sides by the same midline rule). Cases come from KiTS-layout folders (e.g. ``qnkit synth
--generator anatomy --anatomy-version 3``, which has masses against kidneys and spleen against the upper
pole; ``--phases 1,0,0,0`` for unenhanced CT), each also in the failure variants seen on real CT:
``truncated`` (the field of view ends inside a kidney), ``lowdose`` (noise of 60 HU added), and
``mass`` bodies (:func:`qnkit.benchmarks.mass_effect.mass_pair`).

``fit`` chooses each signal's limit on the calibration rows: the smallest limit above which (almost) no
kidney with Dice >= ``good`` lies (its 97.5th percentile over the good kidneys), so that a good
kidney is rarely sent to ``check``; ``evaluate`` scores held-out rows: Spearman of each signal and of the
verdict's score against the true Dice, and the share of bad kidneys (Dice < ``bad``) flagged.

    python -m qnkit.benchmarks.quality_calibration measure --model kidney-synth --out cal.json [--resume] DIR...
    python -m qnkit.benchmarks.quality_calibration fit cal.json --held-out held.json --out calibration.json \
        [--plot held.png] [--into BUNDLE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

GOOD_DICE, BAD_DICE = 0.85, 0.75
NOISE_HU = 60.0


def _variants(ct: np.ndarray, labels: np.ndarray, geometry, rng) -> list[tuple]:
    """(variant, ct, labels, geometry): the case, its field of view cut through the kidneys (the file's
    slices past 40 % of the kidneys' extent dropped, so the affine stays), and it with low-dose noise."""
    from qnkit import io as qio

    out = [("original", ct, labels, geometry)]
    axis = int(np.flatnonzero(geometry.ornt[:, 0] == 0)[0])  # the file axis that is the internal slice axis
    file_labels = qio.to_file_layout(labels, geometry)
    hits = np.flatnonzero((file_labels > 0).any(axis=tuple(a for a in range(3) if a != axis)))
    if hits.size > 6:
        keep = int(hits[0] + (hits[-1] - hits[0]) * 0.4)
        index = [slice(None)] * 3
        index[axis] = slice(0, keep)
        shape = list(geometry.shape)
        shape[axis] = keep
        cut = qio.Geometry.from_affine(geometry.affine, shape, header=geometry.header)
        out.append(("truncated", qio.to_internal(np.ascontiguousarray(qio.to_file_layout(ct, geometry)[tuple(index)]), cut),
                    qio.to_internal(np.ascontiguousarray(file_labels[tuple(index)]), cut), cut))
    noisy = np.clip(ct.astype(np.float32) + rng.normal(0, NOISE_HU, ct.shape).astype(np.float32), -1024, 3071)
    out.append(("lowdose", noisy.astype(ct.dtype), labels, geometry))
    return out


def measure_case(name: str, ct, labels, geometry, predict, arguments: dict, samples: int, seed: int) -> list[dict]:
    """Rows (one per kidney found) of one CT: signals, true Dice, volumes."""
    from qnkit import quality as Q
    from qnkit.kernels import dice
    from qnkit.quality_eval import labelled_sides
    from qnkit.segment import SegmentOptions, segment_ct

    drawn: list = []
    timings: dict = {}
    _, sides, _ = segment_ct(ct, geometry, predict, **arguments, timings=timings, samples_out=drawn,
                             options=SegmentOptions(quality=True, uncertainty=samples, seed=seed))
    truth = labelled_sides(labels, ct, geometry)
    signals = Q.kidney_signals(sides, ct, geometry.spacing, drawn[0] if drawn else None)
    rows = []
    for side, value in (("right", 1), ("left", 2)):
        if signals[side] is None:
            continue
        rows.append({"case": name, "side": side, "dice": round(float(dice(sides == value, truth == value)), 4),
                     "volume_ml": round(float((sides == value).sum()) * geometry.voxel_volume_ml, 1),
                     "true_ml": round(float((truth == value).sum()) * geometry.voxel_volume_ml, 1),
                     "signals": signals[side], "seconds": {k: round(v, 3) for k, v in timings.items()}})
    return rows


def measure(model: str, folders: list[Path], *, samples: int, seed: int, mass_bodies: int, mass_seed: int,
            labels_from: Path | None, log=print, save=None, done: list[dict] | None = None) -> list[dict]:
    """Rows of every case (and its variants) in `folders` and of `mass_bodies` mass bodies; `save(rows)` after each.

    Rows in `done` are kept and their case-variants not measured again (a measurement cut short goes on);
    each case's low-dose noise is drawn from its own generator, so the rows do not depend on where it resumed."""
    from qnkit import io as qio
    from qnkit.backends.torch_backend import TorchBackend
    from qnkit.bundle import load_bundle
    from qnkit.models import resolve_model
    from qnkit.segment import model_arguments

    bundle = load_bundle(resolve_model(model))
    backend = TorchBackend(bundle, batch_size=16)
    predict = backend.predict
    arguments = model_arguments(bundle)
    rows: list[dict] = list(done or [])
    measured = {r["case"] for r in rows}
    cases = [c for folder in folders for c in sorted(Path(folder).glob("case_*")) if (c / "imaging.nii.gz").exists()]
    for case_index, case in enumerate(cases):
        if all(f"{case.parent.name}/{case.name}/{v}" in measured for v in ("original", "lowdose")):
            continue
        ct, geometry = qio.load_image(case / "imaging.nii.gz")
        labels, _ = qio.load_image(case / "segmentation.nii.gz")
        for variant, image, truth, geo in _variants(ct, labels, geometry, np.random.default_rng([seed, case_index])):
            name = f"{case.parent.name}/{case.name}/{variant}"
            if name in measured:
                continue
            t = time.perf_counter()
            got = measure_case(name, image, truth, geo, predict, arguments, samples, seed)
            rows += got
            if save is not None:
                save(rows)
            log(f"{case.parent.name}/{case.name}/{variant}: " + ", ".join(
                f"{r['side']} Dice {r['dice']:.3f}" for r in got) + f" ({time.perf_counter() - t:.1f} s)")
    if mass_bodies:
        from qnkit.benchmarks.mass_effect import mass_pair

        for index in range(mass_bodies):
            if f"mass{mass_seed}/{index}" in measured:
                continue
            _, with_mass, record = mass_pair(index, seed=mass_seed, labels_from=labels_from)
            ct, labels, geometry = _synth_arrays(with_mass)
            got = measure_case(f"mass{mass_seed}/{index}", ct, labels, geometry, predict, arguments, samples, seed)
            for r in got:
                r["mass_side"] = record.get("side")
            rows += got
            if save is not None:
                save(rows)
            log(f"mass{mass_seed}/{index}: " + ", ".join(f"{r['side']} Dice {r['dice']:.3f}" for r in got))
    backend.close()
    return rows


def _synth_arrays(case):
    """(ct, labels, geometry) of a generated SynthCase, through a temporary NIfTI (the reader's geometry)."""
    import tempfile

    from qnkit import io as qio
    from qnkit.synth.writer import write_case

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_case(case, Path(tmp))
        ct, geometry = qio.load_image(folder / "imaging.nii.gz")
        labels, _ = qio.load_image(folder / "segmentation.nii.gz")
    return ct, labels, geometry


#: A signal whose Spearman correlation with the true Dice over the calibration kidneys is above this does not
#: rank bad kidneys above good ones: it stays measured and reported, and leaves the verdict (limit null). One
#: that is constant over them (no second lump anywhere) is no evidence either way and keeps its limit.
#: ``at_edge`` and the volume are kept for what they mean: a cut kidney's volume is not the kidney's, and an
#: adult kidney holds 80-300 mL.
KEEP_SPEARMAN = -0.2
#: Lowest limits: when no good calibration kidney shows a signal at all (no second lump), its percentile is 0
#: and any trace would send a kidney to check; a second lump is one of at least 15 % of the two.
FLOORS = {"second_lump": 0.15}


def fit(rows: list[dict], *, quantile: float = 0.975) -> dict:
    """Limits per signal: the `quantile` of the signal over kidneys with Dice >= GOOD_DICE (x 1.05, at least
    :data:`FLOORS`); null for a signal that does not rank the kidneys (:data:`KEEP_SPEARMAN`)."""
    from qnkit.quality import DEFAULT_CALIBRATION, SIGNALS, spearman

    good = [r for r in rows if r["dice"] >= GOOD_DICE]
    limits, left_out = {}, {}
    for name in SIGNALS:
        values = [r["signals"][name] for r in good if name in r["signals"]]
        pairs = [(r["signals"][name], r["dice"]) for r in rows if name in r["signals"]]
        rank = spearman(*zip(*pairs)) if len(pairs) >= 3 else float("nan")
        if name == "at_edge":
            limits[name] = 0.5
        elif name == "volume_implausibility":
            limits[name] = max(1.0, float(np.quantile(values, quantile))) if values else 1.0
        elif rank > KEEP_SPEARMAN:  # nan (a constant signal) is no evidence either way: kept
            limits[name] = None
            left_out[name] = f"Spearman {rank:.2f} against Dice over the calibration kidneys (kept at <= {KEEP_SPEARMAN})"
        elif values:
            limits[name] = max(float(np.quantile(values, quantile)) * 1.05 + 1e-4, FLOORS.get(name, 0.0))
        else:
            limits[name] = DEFAULT_CALIBRATION["limits"][name]
    out = {"limits": {k: (None if v is None else round(v, 4)) for k, v in limits.items()}}
    if left_out:
        out["left_out"] = left_out
    return out


def evaluate(rows: list[dict], calibration: dict) -> dict:
    """:func:`qnkit.quality_eval.quality_summary` of `rows` judged with `calibration`'s limits: Spearman of the
    score and of each signal against the true Dice, flagged shares of bad and good kidneys."""
    from qnkit.quality_eval import quality_summary

    return quality_summary(judged(rows, calibration))


def judged(rows: list[dict], calibration: dict) -> list[dict]:
    """The rows as :func:`qnkit.quality_eval.judged_kidneys` gives them, each with its verdict under `calibration`."""
    from qnkit.quality import verdict

    return [{**r, **verdict(r["signals"], calibration)} for r in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    m = sub.add_parser("measure")
    m.add_argument("folders", nargs="*", type=Path)
    m.add_argument("--model", default="kidney-synth")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--samples", type=int, default=8)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--mass-bodies", type=int, default=0)
    m.add_argument("--mass-seed", type=int, default=0)
    m.add_argument("--labels-from", type=Path)
    m.add_argument("--resume", action="store_true", help="keep the rows already in --out and measure only the rest")
    f = sub.add_parser("fit")
    f.add_argument("rows", type=Path)
    f.add_argument("--held-out", type=Path, required=True)
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--plot", type=Path, help="scatter plot (PNG) of the held-out kidneys' score against their Dice")
    f.add_argument("--into", type=Path, metavar="BUNDLE", help="seal the limits into this exported bundle's qnkit.json")
    args = parser.parse_args(argv)
    if args.step == "measure":
        rows = measure(args.model, args.folders, samples=args.samples, seed=args.seed, mass_bodies=args.mass_bodies,
                       mass_seed=args.mass_seed, labels_from=args.labels_from,
                       log=lambda m: print(m, file=sys.stderr, flush=True),
                       save=lambda rows: args.out.write_text(json.dumps(rows, indent=1) + "\n"),
                       done=json.loads(args.out.read_text()) if args.resume and args.out.exists() else None)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
        return 0
    rows, held = json.loads(args.rows.read_text()), json.loads(args.held_out.read_text())
    calibration = fit(rows)
    calibration.update(chosen_on={"rows": str(args.rows), "kidneys": len(rows), "good_dice": GOOD_DICE,
                                  "rule": "each limit: 1.05 x the 97.5th percentile of the signal over "
                                          "calibration kidneys with Dice >= 0.85 (second lump at least 0.15); "
                                          "volume 80-300 mL; a signal with Spearman against Dice above -0.2 "
                                          "over them is reported, not judged (limit null)"},
                       calibration=evaluate(rows, calibration), held_out={"rows": str(args.held_out),
                                                                          **evaluate(held, calibration)})
    args.out.write_text(json.dumps(calibration, indent=1) + "\n")
    if args.into is not None:
        from qnkit.export.bundle_writer import reseal_quality

        reseal_quality(args.into, calibration)
    if args.plot is not None:
        from qnkit.quality_eval import render_quality_plot

        args.plot.write_bytes(render_quality_plot(judged(held, calibration), calibration["held_out"],
                                                  title=f"held-out kidneys ({args.held_out.name})"))
    print(json.dumps(calibration, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How much of the renal sinus and of the hilum's vessels and ureter a model takes into the kidney, on phantoms.

The KiTS labels call them background, and a Dice says little about them: the sinus is a tenth of a kidney, the
hilum's tubes less. Anatomy phantoms know what each voxel was drawn as, so this regenerates each case's tissue
labels (the same seed, index and version as its ``kits.json`` record; checked against the stored labels), segments
the stored image as ``qnkit segment`` does, and reports per case and by contrast phase the share of the carved sinus
(version 5 on; with the pelvis of version 7) and of the hilar structures beside the kidney (version 6 on) that the
mask takes. A model that has learnt where the kidney ends at its hilum takes little of either; beside it, the share
the labels themselves take after a round trip through the model's grid (what a perfect model there would draw).
Each case also gets its predicted / true kidney volume and the millilitres taken outside the labels by what each
voxel was drawn as (the spleen against the left kidney, the liver, the sinus ...), averaged over the cases.

    python -m qnkit.benchmarks.sinus_taken --model BUNDLE --data DIR --kits-labels KITS19/data \\
        [--run RUN --split validation] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from qnkit.kernels import mask_dice
from qnkit.synth.atlas import TISSUES
from qnkit.synth.hilum import sinus_and_hilum


@contextmanager
def _progress(show: bool, total: int):
    """A rich progress bar over the cases on stderr when `show`; yields the function that advances it."""
    if not show:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("sinus_taken"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True)) as bar:
        task = bar.add_task("cases", total=total)
        yield lambda: bar.advance(task)


def taken_shares(mask: np.ndarray, tissue: np.ndarray, labels: np.ndarray) -> dict:
    """Shares of the sinus and of the nearby hilar structures that `mask` (bool) takes; None where a case has none."""
    return _shares(mask, *sinus_and_hilum(tissue, labels), labels > 0)


def _shares(mask: np.ndarray, sinus: np.ndarray, hilar: np.ndarray, kidney: np.ndarray) -> dict:
    share = lambda part: round(float(mask[part].mean()), 4) if part.any() else None  # noqa: E731
    return {"sinus_voxels": int(sinus.sum()), "sinus_taken": share(sinus),
            "hilum_voxels": int(hilar.sum()), "hilum_taken": share(hilar),
            "dice": round(mask_dice(mask, kidney, empty=0.0), 4)}


def false_positives_by_tissue(mask: np.ndarray, tissue: np.ndarray, labels: np.ndarray, voxel_ml: float,
                             smallest_ml: float = 0.5) -> dict:
    """mL of `mask` (bool) outside the kidney labels by what each voxel was drawn as (spleen, liver, sinus, ...),
    largest first, tissues under `smallest_ml` left out: which neighbour a model takes, not just how much."""
    counts = np.bincount(tissue[mask & (labels == 0)], minlength=len(TISSUES))
    order = np.argsort(counts)[::-1]
    return {TISSUES[i]: round(float(counts[i]) * voxel_ml, 2) for i in order
            if counts[i] and counts[i] * voxel_ml >= smallest_ml}


def labels_through_grid(labels: np.ndarray, pixel_mm: float, model_mm: float) -> np.ndarray:
    """The kidney labels (bool) after a round trip through a model's in-plane grid of `model_mm` pixels: the
    training target there (the kidney fraction of each model pixel, :func:`qnkit.resample.coverage_to_model_grid`)
    taken as the network's output and brought back as ``qnkit segment`` brings its probabilities back
    (:func:`qnkit.segment.mask_to_input_grid`, threshold 0.5). What a perfect model at that grid would draw."""
    from qnkit.resample import coverage_to_model_grid
    from qnkit.segment import mask_to_input_grid

    coverage = coverage_to_model_grid(labels > 0, (pixel_mm, pixel_mm), model_mm)
    return mask_to_input_grid(coverage, labels.shape[1:], threshold=0.5, model_spacing=model_mm) > 0


def _regenerate(record: dict, kits_labels: Path | None, size: int):
    from qnkit.synth.case import make_anatomy_case

    synth = record["qnkit_synth"]
    if synth.get("generator") != "anatomy":
        raise ValueError(f"{record['case_id']}: not an anatomy phantom")
    labels_from = kits_labels if synth.get("labels_from") else None
    if synth.get("labels_from") and kits_labels is None:
        raise ValueError(f"{record['case_id']}: its kidneys came from KiTS19 labels; give --kits-labels")
    phases = synth.get("phase_probabilities")
    return make_anatomy_case(synth["index"], seed=synth["seed"], labels_from=labels_from,
                             pixel_range=tuple(synth["pixel_range_mm"]), max_size=size,
                             version=synth["recipe_version"], phase_weights=list(phases.values()) if phases else None,
                             keep_tissue=True)


def sinus_taken(model: str, data: Path, case_ids: list[str] | None, kits_labels: Path | None,
                size: int = 512, progress: bool = False) -> dict:
    """Per case and per contrast phase (medians) for the cases `case_ids` of `data` (default: all)."""
    from qnkit import io as qio

    from .error_map import segmenter

    records = {r["case_id"]: r for r in json.loads((data / "kits.json").read_text())}
    case_ids = case_ids or sorted(records)
    rows = []
    with segmenter(model) as (segment, arguments), _progress(progress, len(case_ids)) as advance:
        for case_id in case_ids:
            case = _regenerate(records[case_id], kits_labels, size)
            ct, geometry = qio.load_image(str(data / case_id / "imaging.nii.gz"))
            stored, _ = qio.load_labels(str(data / case_id / "segmentation.nii.gz"))
            if case.meta["qnkit_synth"]["phase"] != records[case_id]["qnkit_synth"]["phase"] or \
                    stored.shape != case.segmentation.shape or not np.array_equal(stored, case.segmentation):
                raise ValueError(f"{case_id}: the regenerated case differs from the stored one (another --size or "
                                 f"--kits-labels than the data was made with?)")
            mask = segment(ct, geometry) > 0
            sinus, hilar = sinus_and_hilum(case.tissue, case.segmentation)
            shares = _shares(mask, sinus, hilar, case.segmentation > 0)
            voxel_ml = float(geometry.voxel_volume_ml)
            shares["volume_ratio"] = round(float(mask.sum() / max(1, np.count_nonzero(case.segmentation))), 4)
            shares["false_positive_ml"] = false_positives_by_tissue(mask, case.tissue, case.segmentation, voxel_ml)
            at_grid = labels_through_grid(case.segmentation, geometry.spacing[2], arguments.get("model_spacing") or 2.5)
            rows.append({"case": case_id, "phase": records[case_id]["qnkit_synth"]["phase"], **shares,
                         "sinus_taken_by_labels_at_grid": round(float(at_grid[sinus].mean()), 4) if sinus.any() else None})
            advance()
    by_phase = {}
    for phase in sorted({r["phase"] for r in rows}):
        part = [r for r in rows if r["phase"] == phase]
        by_phase[phase] = {key: _median([r[key] for r in part]) for key in ("sinus_taken", "hilum_taken", "dice")}
        by_phase[phase]["cases"] = len(part)
    overall = {key: _median([r[key] for r in rows])
               for key in ("sinus_taken", "hilum_taken", "dice", "volume_ratio", "sinus_taken_by_labels_at_grid")}
    tissues = {t for r in rows for t in r["false_positive_ml"]}
    mean_fp = {t: round(sum(r["false_positive_ml"].get(t, 0.0) for r in rows) / len(rows), 2) for t in tissues}
    return {"threshold": arguments.get("threshold"), "median": overall, "by_phase": by_phase,
            "false_positive_ml_per_case": dict(sorted(mean_fp.items(), key=lambda kv: -kv[1])), "cases": rows}


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.median(values)), 4) if values else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a bundle folder or a shipped model's name")
    parser.add_argument("--data", type=Path, required=True, help="anatomy phantoms (qnkit synth --generator anatomy)")
    parser.add_argument("--kits-labels", type=Path, help="the KiTS19 labels the phantoms' kidneys came from")
    parser.add_argument("--run", type=Path, help="a training run whose split of --data to score")
    parser.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    parser.add_argument("--size", type=int, default=512, help="the --size the phantoms were made with")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="a progress bar over the cases on stderr")
    args = parser.parse_args(argv)
    try:
        case_ids = json.loads((args.run / "splits.json").read_text())[args.split] if args.run else None
        result = sinus_taken(args.model, args.data, case_ids, args.kits_labels, args.size, args.progress)
    except (ValueError, OSError, KeyError) as exc:  # QnkitInputError among them: one line, exit 2
        print(f"sinus_taken: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=1)
    print(json.dumps({k: result[k] for k in ("median", "by_phase", "false_positive_ml_per_case")}, indent=1))
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

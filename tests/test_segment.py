"""`qnkit segment`: the one path from a CT to its mask, which `qnkit evaluate` scores; any orientation and
in-plane size, outputs on the input's exact grid, stats and sides, preview, batch mode.

The session's bundle of its tiny trained run (conftest `exported_bundle`, FP32, 64x64 cases) is shared
with the DICOM tests. The model is weak; what is checked is that segment reproduces evaluate's Dice exactly, not that
the Dice is high (the demo test and `qnkit demo` show a trained model).

Bad input (second half): one clear line on stderr, exit code 2, no traceback, no file written; the command
runs in a subprocess, exactly as a user runs it.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qnkit import inference, kernels, resample
from qnkit import io as qio
from qnkit import segment as S
from qnkit.errors import QnkitInputError
from qnkit.postprocess import LEFT, RIGHT
from qnkit.synth import make_case, write_case


@pytest.fixture(scope="session")
def bundle(exported_bundle) -> Path:
    """The session's bundle of the tiny trained run (read-only; nothing here needs its FP16 graph)."""
    return exported_bundle


@pytest.fixture(scope="session")
def split(trained_run) -> dict:
    record = json.loads((trained_run / "evaluation_data.json").read_text())
    evaluation = json.loads((trained_run.parent / "evaluation.json").read_text())
    return {"data": Path(record["data_dir"]), "test": list(record["test"]), "run": trained_run,
            "dice": {r["case_id"]: r["dice_network"] for r in evaluation["cases"]}}  # raw masks, as --no-postprocess


def _dice_of(mask_path: Path, labels_path: Path) -> float:
    mask, mgeo = qio.load_labels(mask_path)
    labels, lgeo = qio.load_labels(labels_path)
    qio.check_same_grid(mgeo, lgeo)
    return kernels.dice(mask, (labels > 0).astype(np.uint8))


def _assert_same_grid(mask_path: Path, image_path: Path) -> None:
    m, i = nib.load(mask_path), nib.load(image_path)
    assert m.shape == i.shape
    assert np.array_equal(m.affine, i.affine)
    assert int(m.header["sform_code"]) == int(i.header["sform_code"])
    assert int(m.header["qform_code"]) == int(i.header["qform_code"])
    assert m.get_data_dtype() == np.uint8


def _tiny_predict():
    import torch

    from qnkit.nn.eager import make_predict_batch
    from qnkit.nn.quicknat import QuickNAT, QuickNATConfig

    torch.manual_seed(0)
    return make_predict_batch(QuickNAT(QuickNATConfig(num_filters=4)))


@pytest.mark.parametrize("shape,batch,model_spacing", [((7, 50, 38), 3, None), ((5, 32, 32), 16, None),
                                                       ((4, 31, 45), 1, None), ((7, 50, 38), 3, 1.3),
                                                       ((4, 31, 45), 2, 0.6)])
def test_every_slice_prediction_equals_the_plain_steps(shape, batch, model_spacing):
    """The one path's prediction (worker thread one batch ahead, only slices that can hold kidney brought
    back to the input's grid) equals the plain steps of qnkit.inference run one after the other."""
    rng = np.random.default_rng(0)
    ct = rng.integers(-1000, 1000, size=shape).astype(np.int16)
    predict = _tiny_predict()
    grid = dict(hu_window=(-200, 400), spacing_hw=(0.8, 0.8), model_spacing=model_spacing)
    image = inference.to_model_input(ct, **grid)
    probs = inference.predict_volume(image, predict, batch_size=batch, pad_multiple=16)
    expected = inference.to_input_mask(probs, shape[1:], threshold=0.5, model_spacing=model_spacing)
    seen = []
    mask, slab = S.predict_kidney_slab(ct, predict, slice_mm=2.0, options=S.SegmentOptions(slab=False),
                                       progress=seen.append, batch_size=batch, threshold=0.5, pad_multiple=16, **grid)
    assert np.array_equal(mask, expected)
    assert (slab["start"], slab["stop"], slab["slices_run"]) == (0, shape[0], shape[0])
    assert seen[-1] == shape[0] and seen == sorted(seen)


def test_one_path_from_a_ct_to_its_mask():
    """segment_ct is the one assembly of prediction and post-processing: the only caller of the batched
    prediction and of the post-processing in the product's code, which has one post-processing function.
    (Before, `qnkit evaluate` predicted every slice and post-processed the whole volume with a second
    implementation, while `qnkit segment` predicted the kidneys' slab: evaluate scored a mask no user got.)"""
    import re

    from qnkit import postprocess

    root = Path(__file__).resolve().parents[1]
    # qnkit/uncertainty.py is segment_ct's sampling step (it feeds the kidneys' box to the sampler and brings the
    # samples back); qnkit/quality_eval.py splits the true labels into sides, as segment_ct does its mask; the
    # INT8 calibration feeds the quantiser slices preprocessed exactly as segment_ct feeds the network, and export's
    # verification slices are preprocessed the same way; a 2.5-D model's planes are built by one function
    expected = {"kidney_sides": {"qnkit/segment.py", "qnkit/quality_eval.py"},
                "select_kidneys": {"qnkit/postprocess.py"}, "predict_volume": {"qnkit/segment.py"},
                "to_model_input": {"qnkit/inference.py"},
                "model_input_slices": {"qnkit/segment.py", "qnkit/uncertainty.py", "export/int8.py",
                                       "qnkit/verification.py"},
                "context_planes": {"qnkit/inference.py", "train/dataset.py"},
                "to_input_mask": {"qnkit/segment.py", "qnkit/uncertainty.py"}}
    callers: dict = {name: set() for name in expected}
    for folder in ("qnkit", "train", "export", "benchmarks"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            for name in expected:
                if re.search(rf"(?<!def )\b{name}\(", text):
                    callers[name].add(path.relative_to(root).as_posix())
    assert callers == expected
    assert [n for n in postprocess.__all__ if n.startswith("kidney_sides")] == ["kidney_sides"]
    assert not hasattr(S, "kidney_sides_in_place") and not hasattr(inference, "segment_volume")


class _Bundle:
    """What the pipeline reads from a bundle (for oracle tests without a model)."""

    hu_window, threshold, size_divisor = (-200.0, 400.0), 0.5, 16
    metadata = {"preprocessing": {"pad_multiple": 16}}


def _oracle(labels: np.ndarray):
    """predict_batch that returns the true (half-resolution, padded) kidney mask: one call per volume
    (so its callers predict every slice: ``slab=False``)."""
    half = kernels.downsample_labels(labels).astype(np.float32)

    def predict(x):
        assert x.shape[0] == half.shape[0]
        return inference.pad_slices(half)[:, None]
    return predict


@pytest.mark.parametrize("kidneys", ["left", "right", "both"])
def test_sides_and_stats_on_known_phantom(tmp_path, kidneys):
    case = make_case(5, size=64, seed=2, kidneys=kidneys)
    folder = write_case(case, tmp_path)
    out = tmp_path / "mask.nii.gz"
    result = S.segment_file(S.CaseInput(case.case_id, folder / "imaging.nii.gz", folder), out,
                            _oracle(case.segmentation), bundle=_Bundle(),
                            options=S.SegmentOptions(slab=False, batch_size=1000, split_sides=True, closing=2))
    mask, geo = qio.load_labels(out)
    want = {"left": {LEFT}, "right": {RIGHT}, "both": {LEFT, RIGHT}}[kidneys]
    assert set(np.unique(mask)) - {0} == want
    ml = abs(np.linalg.det(geo.affine[:3, :3])) / 1000  # from the header (float32 sform), as written
    for side, value in (("right", RIGHT), ("left", LEFT)):
        n = int((mask == value).sum())
        assert result.stats[side]["voxels"] == n
        assert result.stats[side]["volume_ml"] == pytest.approx(n * ml, rel=1e-12)
        assert (n > 0) == (value in want)
    # the oracle's mask is the labels up to the 2x down/up-sampling (coarse at 64 px: ~7 mm pixels)
    assert kernels.dice(mask > 0, case.segmentation > 0) > 0.75
    doc = result.to_json()
    assert set(doc["timings_s"]) >= {"load", "preprocess", "inference", "postprocess", "write"}
    assert doc["slices"] == case.imaging.shape[0] and doc["slices_per_s"] > 0


def _true_sides(case, geo) -> np.ndarray:
    """The phantom's kidneys labelled by side: its two kidneys are separate components on either side."""
    from qnkit.postprocess import body_midline_x, split_sides

    return split_sides(case.segmentation > 0, geo.internal_affine, body_midline_x(case.imaging, geo.internal_affine))


def test_default_postprocessing_scored_against_labels(tmp_path):
    """The default pipeline (post-processing on) against the labels, with a prediction that has what a real
    network gets wrong: a false-positive blob on each side, and one right-kidney slice missed."""
    case = make_case(7, size=128, seed=3)
    geo = qio.Geometry.from_affine(case.affine, case.imaging.shape)
    truth = _true_sides(case, geo)
    assert {RIGHT, LEFT} <= set(np.unique(truth))
    half = kernels.downsample_labels(case.segmentation).astype(np.float32)
    rows, cols = np.nonzero(half.max(axis=0) == 0)
    z_right = np.nonzero((truth == RIGHT).any(axis=(1, 2)))[0]
    missed = int(z_right[len(z_right) // 2])
    half[missed][kernels.downsample_labels(truth[missed:missed + 1] == RIGHT)[0] > 0] = 0
    blobs = np.zeros(case.imaging.shape, bool)
    for r, c in ((rows[len(rows) // 5], cols[len(cols) // 5]), (rows[-len(rows) // 5], cols[-len(cols) // 5])):
        half[2:4, r - 1:r + 2, c - 1:c + 2] = 1.0  # ~ 1-2 mL, well away from the kidneys
        blobs[2:4, 2 * r - 2:2 * r + 4, 2 * c - 2:2 * c + 4] = True

    def predict(x):
        return inference.pad_slices(half)[:, None]

    seg = case.segmentation > 0
    plain, _, _ = S.segment_ct(case.imaging, geo, predict, hu_window=(-200, 400),
                               options=S.SegmentOptions(slab=False, batch_size=1000, postprocess=False))
    default, sides, _ = S.segment_ct(case.imaging, geo, predict, hu_window=(-200, 400),
                                     options=S.SegmentOptions(slab=False, batch_size=1000))
    raw_dice, dice = kernels.dice(plain, seg), kernels.dice(default, seg)
    assert np.array_equal(default, plain & (sides > 0))  # post-processing only removes voxels here
    assert dice > raw_dice and dice > 0.9, (raw_dice, dice)
    assert (plain & blobs).any() and not (default & blobs).any()
    for side in (RIGHT, LEFT):  # each side is its true kidney, both halves of the cut one (one half: ~0.63)
        assert kernels.dice(sides == side, truth == side) > 0.85


def test_slices_are_resampled_to_the_model_spacing_and_back_in_register():
    """A model at 4 mm sees a 7 mm CT on a finer grid; the mask comes back on the CT's grid, in register."""
    case = make_case(6, size=64, seed=0)  # ~7 mm pixels
    geo = qio.Geometry.from_affine(case.affine, case.imaging.shape)

    def bright(x):  # a stand-in "model": soft probability of bright tissue (enhancing cortex, bone, contrast)
        return np.clip((x - 0.6) * 4, 0, 1).astype(np.float32)

    options = S.SegmentOptions(postprocess=False, batch_size=8, slab=False)
    old, _, legacy = S.segment_ct(case.imaging, geo, bright, hu_window=(-200, 400), options=options)
    assert legacy["model_pixel_spacing_mm"] is None and legacy["grid"] == [32, 32]  # no domain: half resolution
    fine, _, info = S.segment_ct(case.imaging, geo, bright, hu_window=(-200, 400), model_spacing=4.0, options=options)
    assert info["model_pixel_spacing_mm"] == 4.0
    assert info["input_pixel_spacing_mm"] == pytest.approx(list(geo.spacing[1:]), abs=1e-4)
    assert info["grid"] == list(resample.model_grid_shape((64, 64), geo.spacing[1:], 4.0)) and info["grid"][0] > 64
    assert fine.shape == old.shape == case.imaging.shape
    # same structures, in register: no one-pixel shift matches better
    shifted = [kernels.dice(np.roll(fine, (dy, dx), axis=(1, 2)), old) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    assert shifted[4] > 0.6 and shifted[4] == max(shifted)
    same, _, info = S.segment_ct(case.imaging, geo, bright, hu_window=(-200, 400), model_spacing=geo.spacing[1],
                                 options=options)
    assert info["grid"] == [64, 64]  # the model's own spacing: no resampling, the stand-in model pixel by pixel
    window = (np.clip(case.imaging, -200, 400).astype(np.float32) + 200) / 600
    assert np.array_equal(same, (bright(window) > 0.5).astype(np.uint8))
    half, _, _ = S.segment_ct(case.imaging, geo, bright, hu_window=(-200, 400), model_spacing=2 * geo.spacing[1],
                              options=options)
    assert np.array_equal(half, old)  # exactly 2:1: the same kernels as an old model


def test_same_ct_at_two_pixel_sizes_gives_the_same_kidneys(bundle, split, tmp_path):
    """The trained model on one CT scanned at 64 px and at 96 px over the same field of view (both made
    from a 128 px phantom by area averaging, as a scanner integrates over its pixels): the two masks,
    brought to the 64 px grid, agree. Each reaches the model on the same grid, in millimetres."""
    from conftest import write_resampled_case

    from qnkit.bundle import load_bundle
    from qnkit.nn.eager import make_predict_batch
    from qnkit.train import checkpoint as ckpt

    b = load_bundle(bundle)
    model, _ = ckpt.load_model(split["run"], "best")
    predict = make_predict_batch(model)
    source = write_case(make_case(3, size=128, seed=11), tmp_path / "source")
    masks, grids = [], []
    for size in (64, 96):
        folder = write_resampled_case(source, tmp_path / str(size), size)
        ct, geo = qio.load_image(next(folder.glob("imaging.nii*")))
        mask, _, info = S.segment_ct(ct, geo, predict, **S.model_arguments(b),
                                     options=S.SegmentOptions(postprocess=False, batch_size=8))
        assert mask.shape[1:] == (size, size) and info["model_pixel_spacing_mm"] == b.domain["pixel_spacing_mm"]
        masks.append((mask > 0).astype(np.uint8))
        grids.append(info["grid"])
    coarse, fine = masks
    assert grids[0] == grids[1]
    fine_on_coarse = (resample.coverage_to_model_grid(fine, (1.0, 1.0), 1.5) >= 0.5).view(np.uint8)
    assert coarse.sum() > 50
    assert kernels.dice(fine_on_coarse, coarse) >= 0.95


def test_bundle_records_the_models_domain_and_figures(bundle, split):
    from qnkit.bundle import load_bundle
    from qnkit.train import checkpoint as ckpt

    domain = load_bundle(bundle).domain
    _, meta = ckpt.load_model(split["run"], "best")
    run_domain = json.loads((split["run"] / "splits.json").read_text())["domain"]
    assert {k: v for k, v in domain.items() if k != "figures"} == meta["domain"] == run_domain
    assert domain["pixel_spacing_mm"] > 0 and domain["hu_window"] == [-200.0, 400.0]
    lo, hi = domain["slice_thickness_mm"]
    assert 0 < lo <= hi and domain["training_data"]["source"] == "synthetic"
    assert domain["figures"]["best_validation_dice"] == meta["metrics"]["best_val_dice"]
    test = json.loads((split["run"].parent / "evaluation.json").read_text())  # the fixture evaluated this checkpoint
    assert domain["figures"]["test_dice"] == pytest.approx(test["mean_dice"])
    assert domain["figures"]["test_dice_network"] == pytest.approx(test["mean_dice_network"])
    assert domain["figures"]["test_postprocessed"] is True and domain["figures"]["test_mirrored"] is False
    assert load_bundle(bundle).input_size == tuple(domain["input_size"])


def _reoriented(src: Path, dst: Path, codes: tuple[str, str, str], dtype=None) -> Path:
    """Store the image (or labels) at `src` in another orientation, same patient-space grid."""
    img = nib.load(src)
    data = np.asanyarray(img.dataobj)
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine),
                                           nib.orientations.axcodes2ornt(codes))
    out = nib.orientations.apply_orientation(data, ornt)
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    new = nib.Nifti1Image(out.astype(dtype or data.dtype), affine)
    new.header.set_qform(affine, code=1)
    new.header.set_sform(affine, code=1)
    nib.save(new, dst)
    assert nib.aff2axcodes(affine) == codes
    return dst


@pytest.mark.parametrize("codes", [("I", "P", "L"), ("R", "A", "S"), ("L", "P", "S")])
def test_segment_any_orientation_matches_evaluate(run_qnkit, bundle, split, tmp_path, codes):
    case_id = split["test"][0]
    folder = split["data"] / case_id
    image = _reoriented(folder / "imaging.nii.gz", tmp_path / "ct.nii.gz", codes)
    labels = _reoriented(folder / "segmentation.nii.gz", tmp_path / "seg.nii.gz", codes)
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"{backend}.nii.gz"
        proc = run_qnkit("segment", image, "--model", bundle, "--out", out, "--backend", backend,
                         "--no-postprocess", "--no-progress")
        assert proc.returncode == 0, proc.stderr
        _assert_same_grid(out, image)
        # torch runs the checkpoint's weights exactly as evaluate does; ONNX Runtime may flip a voxel or two
        tol = 1e-9 if backend == "torch" else 2e-3
        assert _dice_of(out, labels) == pytest.approx(split["dice"][case_id], abs=tol)


def _crop_case(case, rows: slice, cols: slice):
    """A non-square in-plane crop of a synthetic case, with the affine moved to the crop's origin."""
    shift = np.eye(4)
    shift[1, 3], shift[2, 3] = rows.start, cols.start
    case.imaging = np.ascontiguousarray(case.imaging[:, rows, cols])
    case.segmentation = np.ascontiguousarray(case.segmentation[:, rows, cols])
    case.affine = case.affine @ shift
    return case


@pytest.mark.parametrize("kind", ["512", "non-square"])
def test_batch_segment_other_sizes_matches_evaluate(run_qnkit, bundle, split, trained_run, tmp_path, kind):
    """The test cases regenerated at 512x512 or cropped to a non-square grid; evaluate and segment agree."""
    from qnkit.train.evaluation import evaluate

    data = tmp_path / "data"
    for n, case_id in enumerate(split["test"]):
        index = int(case_id.split("_")[1])
        if kind == "512":  # one 512x512 case (phantom 9 has 38 slices: quick on a CPU); the others as they were
            case = make_case(9, size=512, seed=0) if n == 0 else make_case(index, size=64, seed=0)
            case.case_id = case_id
        else:
            case = _crop_case(make_case(index, size=64, seed=0), slice(4, 58), slice(9, 53))  # 54 x 44
        write_case(case, data)
    raw = evaluate(trained_run, data_dir=data, postprocess=False, log=False)
    expected = {r["case_id"]: r["dice"] for r in raw["cases"]}
    out = tmp_path / "masks"
    proc = run_qnkit("segment", data, "--model", bundle, "--out", out, "--backend", "torch", "--no-postprocess",
                     "--stats", tmp_path / "stats.json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert [c["name"] for c in stats["cases"]] == sorted(split["test"])
    for entry in stats["cases"]:  # the kidneys' slab (or every slice), as evaluate predicts it
        slab = entry["model_grid"].pop("slab")
        assert 0 <= slab["start"] < slab["stop"] <= entry["slices"] and slab["slices_run"] > 0
    model_mm = json.loads((bundle / "qnkit.json").read_text())["domain"]["pixel_spacing_mm"]
    for entry in stats["cases"]:  # how the model saw each case: its own pixel size, the model's, the grid
        geo = qio.load_geometry(data / entry["name"] / "imaging.nii.gz")
        assert entry["model_grid"] == {"input_pixel_spacing_mm": [round(s, 4) for s in geo.spacing[1:]],
                                       "model_pixel_spacing_mm": model_mm,
                                       "grid": list(resample.model_grid_shape(geo.internal_shape[1:],
                                                                              geo.spacing[1:], model_mm))}
    for case_id in split["test"]:
        mask = out / f"{case_id}_kidneys.nii.gz"
        _assert_same_grid(mask, data / case_id / "imaging.nii.gz")
        assert _dice_of(mask, data / case_id / "segmentation.nii.gz") == pytest.approx(expected[case_id], abs=1e-9)


def test_segment_mirror_matches_evaluate_mirror(run_qnkit, bundle, split, trained_run, tmp_path):
    """--mirror: segment (torch backend, raw mask) and evaluate score the same mirrored prediction."""
    from qnkit.train.evaluation import evaluate

    case_id = split["test"][0]
    expected = evaluate(trained_run, which="best", mirror=True, postprocess=False, log=False)
    assert expected["mirror"] is True
    out = tmp_path / "mirror.nii.gz"
    proc = run_qnkit("segment", split["data"] / case_id / "imaging.nii.gz", "--model", bundle, "--out", out,
                     "--backend", "torch", "--mirror", "--no-postprocess", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    dice = _dice_of(out, split["data"] / case_id / "segmentation.nii.gz")
    assert dice == pytest.approx(expected["cases"][0]["dice"], abs=1e-9)
    assert expected["cases"][0]["dice"] != split["dice"][case_id]  # the mirror image's prediction did count


def test_default_postprocessing_of_the_trained_model(run_qnkit, bundle, split, tmp_path):
    """`qnkit segment` as a user runs it (post-processing on) scored against the labels of the held-out cases:
    never worse than the raw masks `qnkit evaluate` scores, and the stats say which kidneys were found."""
    out = tmp_path / "masks"
    data = tmp_path / "data"
    for case_id in split["test"]:
        shutil.copytree(split["data"] / case_id, data / case_id)
    proc = run_qnkit("segment", data, "--model", bundle, "--out", out, "--backend", "torch", "--split-sides",
                     "--stats", tmp_path / "stats.json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    stats = {c["name"]: c["kidneys"] for c in json.loads((tmp_path / "stats.json").read_text())["cases"]}
    gains = []
    for case_id in split["test"]:
        mask_path = out / f"{case_id}_kidneys.nii.gz"
        dice = _dice_of(mask_path, data / case_id / "segmentation.nii.gz")
        gains.append(dice - split["dice"][case_id])
        mask, _ = qio.load_labels(mask_path)
        for side, value in (("right", RIGHT), ("left", LEFT)):
            assert stats[case_id][side]["present"] == bool((mask == value).any())
            assert stats[case_id][side]["present"] == (stats[case_id][side]["volume_ml"] > 0)
    assert min(gains) >= -0.01 and np.mean(gains) >= 0, gains


def test_stats_split_sides_preview_and_force(run_qnkit, bundle, split, tmp_path):
    case_id = split["test"][0]
    src = split["data"] / case_id
    folder = tmp_path / case_id
    shutil.copytree(src, folder)
    args = ("segment", folder, "--model", bundle, "--split-sides", "--closing", "3mm", "--stats",
            tmp_path / "s.json", "--preview", tmp_path / "p.png", "--no-progress")
    proc = run_qnkit(*args, env={"CUDA_VISIBLE_DEVICES": ""})  # `auto` as without a GPU, on any machine
    assert proc.returncode == 0, proc.stderr
    out = folder / f"{case_id}_kidneys.nii.gz"  # default: inside the KiTS case folder
    _assert_same_grid(out, folder / "imaging.nii.gz")
    mask, geo = qio.load_labels(out)
    assert set(np.unique(mask)) <= {0, RIGHT, LEFT}
    doc = json.loads((tmp_path / "s.json").read_text())
    entry = doc["cases"][0]
    assert doc["backend"]["name"] == "onnxruntime" and doc["backend"]["device"] == "cpu"
    for side, value in (("right", RIGHT), ("left", LEFT)):
        n = int((mask == value).sum())
        assert entry["kidneys"][side]["voxels"] == n
        assert entry["kidneys"][side]["volume_ml"] == pytest.approx(n * geo.voxel_volume_ml, rel=1e-12)
    assert set(entry["timings_s"]) >= {"load", "preprocess", "inference", "postprocess", "write"}
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "right" in proc.stdout and "slices/s" in proc.stdout
    # outputs exist now: refused without --force (nothing changed), replaced with it
    before = out.stat().st_mtime_ns
    again = run_qnkit(*args)
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    assert out.stat().st_mtime_ns == before
    assert run_qnkit(*args, "--force").returncode == 0


# --- bad input ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_case(tmp_path_factory) -> Path:
    return write_case(make_case(0, size=32, seed=0), tmp_path_factory.mktemp("good")) / "imaging.nii.gz"


def _files(folder: Path) -> set:
    return {p.relative_to(folder) for p in folder.rglob("*")}


def _refused(proc, *needles, code: int = 2) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("qnkit: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _segment(run_qnkit, bundle, *inputs, out=None, extra=()):
    args = ["segment", *inputs, "--model", bundle, "--no-progress", *extra]
    if out is not None:
        args += ["--out", out]
    return run_qnkit(*args)


def _write(path: Path, data: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 3.0, 1.0]) if affine is None else affine), path)
    return path


def test_missing_file(run_qnkit, bundle, tmp_path):
    proc = _segment(run_qnkit, bundle, tmp_path / "nope.nii.gz", out=tmp_path / "o")
    _refused(proc, "nope.nii.gz", "no such file")
    assert _files(tmp_path) == set()


def test_folder_without_images(run_qnkit, bundle, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("no images here")
    proc = _segment(run_qnkit, bundle, tmp_path / "in")
    _refused(proc, "no NIfTI images")
    assert _files(tmp_path) == {Path("in"), Path("in/readme.txt")}


@pytest.mark.parametrize("kind", ["2-D", "4-D", "truncated", "not-nifti-name", "garbage", "nan"])
def test_bad_image_files(run_qnkit, bundle, good_case, tmp_path, kind):
    src = tmp_path / "in"
    src.mkdir()
    if kind == "2-D":
        bad = _write(src / "ct.nii.gz", np.zeros((32, 32), np.int16))
        needles = ("expected a 3-D volume", "2-D")
    elif kind == "4-D":
        bad = _write(src / "ct.nii.gz", np.zeros((32, 32, 8, 3), np.int16))
        needles = ("expected a 3-D volume", "4-D")
    elif kind == "truncated":
        bad = src / "ct.nii.gz"
        data = good_case.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
        needles = ("ct.nii.gz",)
    elif kind == "not-nifti-name":
        bad = src / "ct.txt"
        bad.write_text("hello")
        needles = ("not a NIfTI file",)
    elif kind == "garbage":
        bad = src / "ct.nii.gz"
        bad.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
        needles = ("ct.nii.gz", "not a readable NIfTI")
    else:
        data = np.zeros((32, 32, 8), np.float32)
        data[3, 4, 5] = np.nan
        bad = _write(src / "ct.nii.gz", data)
        needles = ("NaN",)
    before = _files(tmp_path)
    proc = _segment(run_qnkit, bundle, bad, extra=("--stats", tmp_path / "s.json", "--preview",
                                                              tmp_path / "p.png"))
    _refused(proc, *needles)
    assert _files(tmp_path) == before


def test_unwritable_output_folder(run_qnkit, bundle, good_case, tmp_path):
    if os.geteuid() == 0:  # root writes anywhere a mode allows nothing: use a folder no one can write to
        folder = Path("/proc/self")
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
    proc = _segment(run_qnkit, bundle, good_case, out=folder / "mask.nii.gz")
    _refused(proc, str(folder), "not writable")
    assert not (folder / "mask.nii.gz").exists()
    assert not (good_case.parent / "imaging_kidneys.nii.gz").exists()


@pytest.mark.parametrize("damage", ["missing", "tampered", "no-bundle"])
def test_bad_bundle(run_qnkit, bundle, good_case, tmp_path, damage):
    damaged = tmp_path / "bundle"
    shutil.copytree(bundle, damaged)
    if damage == "missing":
        (damaged / "model.onnx").unlink()
        needles = ("model.onnx", "missing")
    elif damage == "tampered":
        data = bytearray((damaged / "weights.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (damaged / "weights.safetensors").write_bytes(bytes(data))
        needles = ("weights.safetensors", "SHA-256")
    else:
        (damaged / "qnkit.json").unlink()
        needles = ("not a qnkit bundle",)
    out = tmp_path / "out"
    proc = _segment(run_qnkit, damaged, good_case, out=out)
    _refused(proc, *needles)
    assert not out.exists()


def test_existing_output_and_input_protection(run_qnkit, bundle, good_case, tmp_path):
    target = tmp_path / "mask.nii.gz"
    target.write_bytes(b"old")
    _refused(_segment(run_qnkit, bundle, good_case, out=target), "exists; pass --force")
    assert target.read_bytes() == b"old"
    _refused(_segment(run_qnkit, bundle, good_case, out=good_case, extra=("--force",)),
             "over an input")
    _refused(_segment(run_qnkit, bundle, good_case, good_case, out=tmp_path / "x.nii.gz"),
             "same name")


def test_batch_mode_reports_a_failing_case_and_goes_on(run_qnkit, bundle, good_case, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(good_case, src / "a.nii.gz")
    (src / "b.nii.gz").write_bytes(good_case.read_bytes()[:300])  # truncated
    shutil.copy(good_case, src / "c.nii.gz")
    out = tmp_path / "out"
    proc = _segment(run_qnkit, bundle, src, out=out, extra=("--stats", tmp_path / "s.json"))
    assert proc.returncode == 2, proc.stderr
    assert "b failed" in proc.stderr and "1 of 3 case(s) failed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a_kidneys.nii.gz", "c_kidneys.nii.gz"]
    assert "2 case(s) segmented, 1 failed" in proc.stdout
    # --out must be a folder in batch mode
    _refused(_segment(run_qnkit, bundle, src, out=tmp_path / "one.nii.gz"), "must be a folder")


# --- out-of-domain warnings (qnkit.domain) and --strict ------------------------------------------


def test_kidney_cut_by_the_volume_edge_warns_and_strict_writes_nothing(tmp_path, capsys):
    case, cut = make_case(5, size=64, seed=2), make_case(5, size=64, seed=2)
    z = np.nonzero((case.segmentation > 0).any(axis=(1, 2)))[0]
    start = int(z[len(z) // 2])  # the volume starts mid-kidney
    cut.imaging, cut.segmentation = cut.imaging[start:].copy(), cut.segmentation[start:].copy()
    shift = np.eye(4)
    shift[0, 3] = start
    cut.affine = cut.affine @ shift
    folder = write_case(cut, tmp_path)
    source = S.CaseInput("cut", folder / "imaging.nii.gz", folder)
    result = S.segment_file(source, tmp_path / "cut.nii.gz", _oracle(cut.segmentation), bundle=_Bundle(),
                            options=S.SegmentOptions(slab=False, batch_size=1000))
    (warning,) = result.to_json()["warnings"]
    assert "first slice" in warning
    assert capsys.readouterr().err.splitlines() == [f"qnkit: warning: cut: {warning}"]
    with pytest.raises(QnkitInputError, match="first slice.*--strict"):
        S.segment_file(source, tmp_path / "strict.nii.gz", _oracle(cut.segmentation), bundle=_Bundle(),
                       options=S.SegmentOptions(slab=False, batch_size=1000, strict=True))
    assert not (tmp_path / "strict.nii.gz").exists()
    whole = write_case(case, tmp_path / "whole")
    quiet = S.segment_file(S.CaseInput("whole", whole / "imaging.nii.gz", whole), None, _oracle(case.segmentation),
                           bundle=_Bundle(), options=S.SegmentOptions(slab=False, batch_size=1000, strict=True))
    assert quiet.warnings == [] and capsys.readouterr().err == ""


def test_out_of_domain_inputs_warn_in_the_stats_and_strict_exits_2(run_qnkit, bundle, split, tmp_path):
    src = nib.load(split["data"] / split["test"][0] / "imaging.nii.gz")
    data, affine = np.asanyarray(src.dataobj), src.affine
    folder = tmp_path / "in"
    folder.mkdir()
    _write(folder / "unsigned.nii.gz", (data.astype(np.int32) + 1024).astype(np.uint16), affine)  # no intercept
    thin = affine.copy()
    slice_axis = [f for f, (internal, _) in enumerate(qio.Geometry.from_affine(affine, data.shape).ornt)
                  if internal == 0][0]
    thin[:3, slice_axis] *= 0.3 / np.linalg.norm(affine[:3, slice_axis])  # 0.3 mm slices; the model saw ~7 mm
    _write(folder / "thin.nii.gz", data, thin)
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_zooms(tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0)))
    nib.save(nib.Nifti1Image(data, None, header), folder / "uncoded.nii.gz")  # qform/sform codes 0
    out = tmp_path / "out"
    proc = _segment(run_qnkit, bundle, folder, out=out, extra=("--stats", tmp_path / "s.json", "--backend", "torch"))
    assert proc.returncode == 0, proc.stderr
    stats = {c["name"]: c for c in json.loads((tmp_path / "s.json").read_text())["cases"]}
    expected = {"unsigned": "not CT Hounsfield units", "thin": "slice thickness 0.3 mm is far outside",
                "uncoded": "orientation guessed"}
    warned = [line for line in proc.stderr.splitlines() if line.startswith("qnkit: warning: ")]
    for name, needle in expected.items():
        assert any(needle in w for w in stats[name]["warnings"]), stats[name]["warnings"]
        assert any(line.startswith(f"qnkit: warning: {name}: ") and needle in line for line in warned)
    assert len(warned) == sum(len(c["warnings"]) for c in stats.values())  # one line per warning
    proc = _segment(run_qnkit, bundle, folder / "thin.nii.gz", out=tmp_path / "strict.nii.gz",
                    extra=("--strict", "--backend", "torch"))
    _refused(proc, "thin", "slice thickness", "--strict")
    assert not (tmp_path / "strict.nii.gz").exists()

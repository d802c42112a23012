"""Data: discovery, splits, filter rule, the .npy cache and the slice dataset."""
import gzip
import os
import shutil

import numpy as np
import pytest

from qnkit.errors import QnkitInputError
from qnkit.train import data as D
from qnkit.train.dataset import SliceDataset
from qnkit.train.settings import DataSettings


def _copy_cases(src, dst, ids):
    dst.mkdir(parents=True, exist_ok=True)
    for cid in ids:
        shutil.copytree(src / cid, dst / cid)
    return dst


def test_discover_reads_kits_json_and_accepts_plain_nii(synth_dataset, tmp_path):
    cases = D.discover_cases(synth_dataset)
    assert [c.case_id for c in cases] == [f"case_{i:05d}" for i in range(8)]
    assert all(c.radiographic_size_cm is not None for c in cases)
    data = _copy_cases(synth_dataset, tmp_path / "d", ["case_00000"])
    for name in ("imaging", "segmentation"):
        gz = data / "case_00000" / f"{name}.nii.gz"
        (data / "case_00000" / f"{name}.nii").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    (found,) = D.discover_cases(data)
    assert found.image.name == "imaging.nii" and found.radiographic_size_cm is None


def test_discover_errors(tmp_path, synth_dataset):
    with pytest.raises(QnkitInputError, match="not found"):
        D.discover_cases(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QnkitInputError, match="no KiTS19 cases"):
        D.discover_cases(tmp_path / "empty")
    data = _copy_cases(synth_dataset, tmp_path / "d", ["case_00000", "case_00001"])
    (data / "case_00001" / "segmentation.nii.gz").unlink()
    with pytest.raises(QnkitInputError, match="case_00001"):
        D.discover_cases(data)
    (data / "case_00001" / "segmentation.nii.gz").write_bytes(b"")
    (data / "kits.json").write_text("{not json")
    with pytest.raises(QnkitInputError, match="kits.json"):
        D.discover_cases(data)


def test_splits_are_deterministic_disjoint_and_80_20():
    cases = [D.Case(f"case_{i:05d}", None, None) for i in range(20)]
    pool, test = D.split_test(cases, 0.2, seed=3)
    assert len(test) == 4 and len(pool) == 16
    assert (pool, test) == D.split_test(list(reversed(cases)), 0.2, seed=3)
    assert test != D.split_test(cases, 0.2, seed=4)[1]
    train, val = D.split_train_val([c.case_id for c in pool], 0.2, seed=3)
    assert len(val) == 3 and len(train) == 13
    assert not set(train) & set(val) and not (set(train) | set(val)) & {c.case_id for c in test}
    small_pool, small_test = D.split_test(cases[:3], 0.2, seed=0)
    assert len(small_test) == 1 and len(small_pool) == 2
    with pytest.raises(QnkitInputError):
        D.split_train_val(["case_00000"], 0.2, seed=0)


def test_filter_rule_records_reasons():
    cases = [D.Case("a", None, None, 2.0), D.Case("b", None, None, 12.0), D.Case("c", None, None, None)]
    entries = {"a": D.CacheEntry("a", None, 10, 100, 10), "b": D.CacheEntry("b", None, 10, 100, 10),
               "c": D.CacheEntry("c", None, 10, 100, 150)}
    rule = DataSettings(max_radiographic_size_cm=10.0, max_tumor_kidney_ratio=1.0)
    kept, filtered = D.apply_filter(entries, cases, rule)
    assert kept == ["a"]
    reasons = {f["case_id"]: f["reason"] for f in filtered}
    assert "radiographic_size" in reasons["b"] and "ratio" in reasons["c"]
    kept, filtered = D.apply_filter(entries, cases, DataSettings(max_tumor_kidney_ratio=None))
    assert kept == ["a", "b", "c"] and not filtered


def test_cache_is_reused_and_rebuilt_when_sources_or_params_change(synth_dataset, tmp_path):
    from qnkit import io as qio
    from qnkit import kernels

    data = _copy_cases(synth_dataset, tmp_path / "d", ["case_00000", "case_00001"])
    cases = D.discover_cases(data)
    params = D.PreprocessParams(-200.0, 400.0, 2, 2.0)
    built = []
    entries = D.build_cache(cases, params, tmp_path / "cache", progress=built.append)
    e = entries["case_00000"]
    labels, _ = qio.load_labels(cases[0].labels)
    start, stop = kernels.kidney_slice_range(labels, 2)
    image = np.load(e.path("image"))
    assert image.dtype == np.float32 and image.shape == (stop - start, 32, 32) and e.num_slices == stop - start
    lab = np.load(e.path("labels"))
    np.testing.assert_array_equal(lab, kernels.downsample_labels(np.ascontiguousarray(labels[start:stop])))
    np.testing.assert_array_equal(np.load(e.path("weights")), kernels.border_weights(lab, 2.0))
    assert e.kidney_voxels == int((labels == 1).sum()) and e.tumor_voxels == int((labels == 2).sum())

    stamp = e.path("image").stat().st_mtime_ns
    D.build_cache(cases, params, tmp_path / "cache")
    assert e.path("image").stat().st_mtime_ns == stamp  # reused
    st = cases[0].labels.stat()
    os.utime(cases[0].labels, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # source changed
    D.build_cache(cases, params, tmp_path / "cache")
    assert e.path("image").stat().st_mtime_ns != stamp
    (e.folder / "manifest.json").unlink()  # as if killed mid-write: never used, rebuilt
    with pytest.raises(RuntimeError):
        D.cached_entries(cases, params, tmp_path / "cache")
    D.build_cache(cases, params, tmp_path / "cache")
    assert D.cached_entries(cases, params, tmp_path / "cache")["case_00000"].num_slices == e.num_slices
    other = D.build_cache(cases, D.PreprocessParams(-100.0, 400.0, 2, 2.0), tmp_path / "cache")
    assert other["case_00000"].folder != e.folder
    assert not list((tmp_path / "cache").rglob("*.tmp*"))

    # preprocessed in two processes (a GPU machine's training data): the same arrays and entries, in order
    built.clear()
    parallel = D.build_cache(cases, params, tmp_path / "cache2", progress=built.append, workers=2)
    assert list(parallel) == [c.case_id for c in cases] and sorted(built) == sorted(parallel)
    serial = D.cached_entries(cases, params, tmp_path / "cache")
    for case_id, entry in parallel.items():
        assert (entry.num_slices, entry.kidney_voxels, entry.slice_range) == \
            (serial[case_id].num_slices, serial[case_id].kidney_voxels, serial[case_id].slice_range)
        for name in ("image", "labels", "weights"):
            np.testing.assert_array_equal(np.load(entry.path(name)), np.load(serial[case_id].path(name)))


def test_mismatched_image_and_labels_are_refused(mismatched_case_dataset, tmp_path):
    data = mismatched_case_dataset
    with pytest.raises(QnkitInputError, match="shape"):
        D.build_cache(D.discover_cases(data), D.PreprocessParams(-200.0, 400.0, 20, 2.0), tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.npy"))


def test_slice_dataset_maps_indices_and_pads(tmp_path):
    entries = []
    for v, (z, h, w) in enumerate([(3, 20, 24), (2, 20, 24)]):
        folder = tmp_path / f"v{v}"
        folder.mkdir()
        np.save(folder / "image.npy", np.full((z, h, w), v + 1, np.float32) * np.arange(z)[:, None, None])
        np.save(folder / "labels.npy", np.ones((z, h, w), np.uint8))
        np.save(folder / "coverage.npy", np.full((z, h, w), 0.75, np.float32))
        np.save(folder / "weights.npy", np.full((z, h, w), 2.0, np.float32))
        entries.append(D.CacheEntry(f"v{v}", folder, z, 0, 0))
    ds = SliceDataset(entries, pad_multiple=16)
    assert len(ds) == 5
    assert [ds.locate(i) for i in range(5)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    x, y, w, vol = ds[4]
    assert x.shape == y.shape == w.shape == (1, 32, 32) and vol == 1
    assert float(x[0, 0, 0]) == 2.0 and float(x[0, 20:].abs().sum()) == 0
    assert float(w[0, :20, :24].min()) == 2.0 and float(w[0, :, 24:].max()) == 0.0
    assert float(y[0, 0, 0]) == 0.75  # soft target: kidney fraction of the 2x2 block
    assert float(SliceDataset(entries, pad_multiple=16, target="labels")[4][1][0, 0, 0]) == 1.0
    with pytest.raises(IndexError):
        ds[5]
    assert list(ds.volume_slices(1)) == [3, 4]


def test_preprocess_case_soft_target_is_the_kidney_fraction_of_each_block(tmp_path):
    from qnkit.synth import make_case, write_case

    folder = write_case(make_case(3, size=64, seed=5), tmp_path)
    case = D.discover_cases(tmp_path)[0]
    arrays, stats = D.preprocess_case(case, D.PreprocessParams(-200.0, 400.0, 2, 2.0))
    start, stop = stats["slice_range"]
    seg = make_case(3, size=64, seed=5).segmentation[start:stop] > 0
    fraction = seg.reshape(seg.shape[0], 32, 2, 32, 2).mean(axis=(2, 4))
    np.testing.assert_array_equal(arrays["coverage"], fraction.astype(np.float32))
    np.testing.assert_array_equal(arrays["labels"], (fraction >= 0.5).astype(np.uint8))
    assert folder.is_dir()


def _median_frequency_weights(labels: np.ndarray, omega0: float) -> np.ndarray:
    """NumPy reference of QuickNAT's weights for a binary volume: median(counts) / count(class) + omega0 at edges."""
    counts = np.bincount(labels.ravel(), minlength=2).astype(np.float64)
    present = counts[counts > 0]
    lut = np.where(counts > 0, np.median(present) / np.maximum(counts, 1), 0.0)
    gy, gx = np.gradient(labels.astype(np.float64), axis=(1, 2))
    return (lut[labels] + omega0 * ((gy != 0) | (gx != 0))).astype(np.float32)


def test_hard_negatives_weigh_what_a_kidney_pixel_weighs():
    """Background pixels of the hard-negative mask get factor x the kidney's class weight where that is more than
    their own; kidney pixels and the rest keep theirs; no kidney or no hard pixel changes nothing."""
    from qnkit import kernels

    rng = np.random.default_rng(0)
    labels = np.zeros((3, 41, 37), np.uint8)
    labels[:, 10:30, 8:25] = 1
    labels[:, 17:22, 14:18] = 0  # a sinus inside the kidney
    hard = np.zeros(labels.shape, bool)
    hard[:, 16:23, 13:19] = True  # reaches into the kidney: only its background counts
    hard[2, 0, 0] = True  # a stray pixel far out
    weights = kernels.border_weights(labels, 2.0)
    np.testing.assert_allclose(weights, _median_frequency_weights(labels, 2.0), rtol=1e-6)
    kidney_weight = float(_median_frequency_weights(labels, 0.0)[labels == 1][0])
    expected = weights.copy()
    target = hard & (labels == 0)
    expected[target] = np.maximum(expected[target], 1.5 * kidney_weight)
    assert D.weigh_hard_negatives(weights, labels, hard, 1.5) == int(target.sum())
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    assert (weights[labels == 1] == kernels.border_weights(labels, 2.0)[labels == 1]).all()
    for labels_, hard_ in ((np.zeros_like(labels), hard), (labels, np.zeros_like(hard)),
                           (labels, hard & (labels == 1))):
        w = kernels.border_weights(labels_, 2.0)
        before = w.copy()
        assert D.weigh_hard_negatives(w, labels_, hard_, 1.0) == 0
        np.testing.assert_array_equal(w, before)
    noisy = rng.integers(0, 2, labels.shape).astype(np.uint8)  # odd sizes, every pixel a border
    w = kernels.border_weights(noisy, 2.0)
    D.weigh_hard_negatives(w, noisy, np.ones(labels.shape, bool), 1.0)
    assert (w[noisy == 0] >= w[noisy == 1].min() - 1e-6).all()


def test_class_weights_none_leaves_one_and_the_border_term():
    """Without class weights every pixel weighs 1 plus omega0 at label edges (the NumPy reference with equal
    class weights); the default record and cache key are those of runs before the option."""
    rng = np.random.default_rng(3)
    for labels in (rng.integers(0, 2, (2, 17, 23)).astype(np.uint8), np.zeros((3, 9, 11), np.uint8),
                   np.ones((3, 9, 11), np.uint8)):
        from qnkit import kernels

        weights = D.without_class_weights(kernels.border_weights(labels, 2.0), labels)
        edges = _median_frequency_weights(labels, 2.0) - _median_frequency_weights(labels, 0.0)
        np.testing.assert_allclose(weights, 1.0 + edges, rtol=1e-6, atol=1e-6)
    default = D.PreprocessParams(-200.0, 400.0, 2, 2.0)
    assert "class_weights" not in default.record()
    plain = D.PreprocessParams(-200.0, 400.0, 2, 2.0, class_weights="none")
    assert plain.record()["class_weights"] == "none" and plain.key() != default.key()


def test_hard_negatives_file_is_read_only_when_weighed(tmp_path):
    """A case's hard_negatives.nii.gz raises the weights of its pixels on the model's grid when [DATA]
    hard_negative_weight > 0, and is named in the cache manifest; at 0 the arrays, the record and the cache key are
    those of a run without it. A mask of another shape or with values other than 0/1 is refused."""
    import nibabel as nib

    from qnkit.synth import make_case, write_case

    folder = write_case(make_case(3, size=64, seed=5), tmp_path)
    image = nib.load(str(folder / "segmentation.nii.gz"))
    seg = np.asarray(image.dataobj)
    kidney = np.argwhere(seg > 0)
    z = int(np.median(kidney[:, 0]))
    hard = np.zeros(seg.shape, np.uint8)
    hard[z, :, :] = (seg[z] == 0)  # one slice's background, all of it
    nib.save(nib.Nifti1Image(hard, image.affine), str(folder / "hard_negatives.nii.gz"))
    (case,) = D.discover_cases(tmp_path)
    assert case.hard_negatives == folder / "hard_negatives.nii.gz"
    off = D.PreprocessParams(-200.0, 400.0, 2, 2.0)
    on = D.PreprocessParams(-200.0, 400.0, 2, 2.0, hard_negative_weight=1.0)
    assert off.record() == D.PreprocessParams(-200.0, 400.0, 2, 2.0).record() and "hard_negative_weight" not in off.record()
    assert on.key() != off.key() and on.record()["hard_negative_weight"] == 1.0
    assert "hard_negatives" not in D._manifest_for(case, off)["sources"]
    assert "hard_negatives" in D._manifest_for(case, on)["sources"]
    plain, plain_stats = D.preprocess_case(case, off)
    weighed, stats = D.preprocess_case(case, on)
    assert "hard_negative_pixels" not in plain_stats and stats["hard_negative_pixels"] > 0
    for name in ("image", "labels", "coverage"):
        np.testing.assert_array_equal(weighed[name], plain[name])
    changed = weighed["weights"] != plain["weights"]
    row = z - stats["slice_range"][0]
    assert changed.any() and changed[row].sum() == changed.sum() <= stats["hard_negative_pixels"]
    assert (weighed["weights"] >= plain["weights"]).all() and (weighed["labels"][changed] == 0).all()
    nib.save(nib.Nifti1Image(hard[:-1], image.affine), str(folder / "hard_negatives.nii.gz"))
    with pytest.raises(QnkitInputError, match="shape"):
        D.preprocess_case(case, on)
    nib.save(nib.Nifti1Image(hard * 2, image.affine), str(folder / "hard_negatives.nii.gz"))
    with pytest.raises(QnkitInputError, match="0 and 1"):
        D.preprocess_case(case, on)
    D.preprocess_case(case, off)  # not read at 0
    nib.save(nib.Nifti1Image(hard, image.affine), str(folder / "hard_negatives.nii.gz"))
    flat, _ = D.preprocess_case(case, D.PreprocessParams(-200.0, 400.0, 2, 2.0, hard_negative_weight=3.0,
                                                         class_weights="none"))
    hard_model = (flat["weights"] == 3.0) & (flat["labels"] == 0)
    assert hard_model.sum() > 0 and set(np.unique(flat["weights"]).tolist()) <= {1.0, 3.0}


def test_pixel_spacing_auto_is_twice_the_median_header_spacing(synth_dataset):
    cases = D.discover_cases(synth_dataset)
    spacings = [s[1] for s in D.case_spacings(cases)]
    assert D.resolve_pixel_spacing("auto", cases) == round(2 * float(np.median(spacings)), 2)
    assert D.resolve_pixel_spacing(" 1.25 ", cases) == 1.25
    with pytest.raises(QnkitInputError):
        D.resolve_pixel_spacing("auto", [])


def test_factor_two_preprocessing_is_the_kernels_bit_for_bit(tmp_path):
    from qnkit import io as qio
    from qnkit import kernels
    from qnkit.synth import make_case, write_case

    write_case(make_case(1, size=64, seed=2), tmp_path)
    (case,) = D.discover_cases(tmp_path)
    spacing = qio.load_geometry(case.image).spacing[1]
    params = D.PreprocessParams(-200.0, 400.0, 2, 2.0, round(2 * spacing, 2))  # rounded: still a 2:1 grid
    arrays, stats = D.preprocess_case(case, params)
    legacy, _ = D.preprocess_case(case, D.PreprocessParams(-200.0, 400.0, 2, 2.0))
    ct, _ = qio.load_image(case.image)
    start, stop = stats["slice_range"]
    np.testing.assert_array_equal(arrays["image"], kernels.downsample_image(ct[start:stop], -200.0, 400.0))
    for name in D.ARRAYS:
        np.testing.assert_array_equal(arrays[name], legacy[name])
    assert stats["model_shape"] == [stop - start, 32, 32] and stats["spacing_mm"][1] == pytest.approx(spacing)


def test_cases_at_different_pixel_sizes_reach_the_model_at_one_spacing(synth_dataset, tmp_path):
    from conftest import write_resampled_case

    src = synth_dataset / "case_00001"
    write_resampled_case(src, tmp_path / "fine", 96)
    (coarse,) = D.discover_cases(_copy_cases(synth_dataset, tmp_path / "coarse", ["case_00001"]))
    (fine,) = D.discover_cases(tmp_path / "fine")
    params = D.PreprocessParams(-200.0, 400.0, 2, 2.0, D.resolve_pixel_spacing("auto", [coarse]))
    a, sa = D.preprocess_case(coarse, params)  # 64 px -> 32 px: the 2x2 kernel
    b, sb = D.preprocess_case(fine, params)  # 96 px -> 32 px: area weights over 3x3 pixels
    assert sa["model_shape"] == sb["model_shape"] and sa["slice_range"] == sb["slice_range"]
    assert np.abs(a["image"] - b["image"]).mean() < 0.02
    inter = np.logical_and(a["labels"], b["labels"]).sum()
    assert 2 * inter / (a["labels"].sum() + b["labels"].sum()) > 0.9
    assert a["coverage"].sum() == pytest.approx(b["coverage"].sum(), rel=0.05)
    other = D.PreprocessParams(-200.0, 400.0, 2, 2.0, params.pixel_spacing_mm * 1.5)
    assert other.key() != params.key()  # the spacing is part of the cache key
    c, _ = D.preprocess_case(fine, other)
    assert c["image"].shape[1:] == (21, 21)


def test_model_domain_records_spacing_thickness_window_size_and_source(synth_dataset, tmp_path):
    import json

    cases = D.discover_cases(synth_dataset)[:3]
    params = D.PreprocessParams(-200.0, 400.0, 2, 2.0, D.resolve_pixel_spacing("auto", cases))
    entries = D.build_cache(cases, params, tmp_path / "cache")
    domain = D.model_domain(params, [entries[c.case_id] for c in cases], cases, 16)
    thickness = [s[0] for s in D.case_spacings(cases)]
    assert domain["pixel_spacing_mm"] == params.pixel_spacing_mm
    assert domain["slice_thickness_mm"] == pytest.approx([min(thickness), max(thickness)])
    grids = [entries[c.case_id].stats["model_shape"][1:] for c in cases]
    assert domain["input_size"] == [-(-max(g[i] for g in grids) // 16) * 16 for i in (0, 1)]
    assert domain["hu_window"] == [-200.0, 400.0] and domain["input_size"][0] >= 32
    assert domain["training_data"] == {"source": "synthetic", "generator": None, "cases": 3}
    # kits.json "qnkit_synth" records are passed through; real KiTS19 records are recognised.
    data = _copy_cases(synth_dataset, tmp_path / "d", ["case_00000", "case_00001"])
    recipe = {"recipe": "anatomy-v1", "seed": 7}
    (data / "kits.json").write_text(json.dumps([{"case_id": f"case_0000{i}", "radiographic_size": 1.0,
                                                 "qnkit_synth": recipe} for i in (0, 1)]))
    assert D.training_data_record(D.discover_cases(data))["generator"] == recipe
    (data / "kits.json").write_text(json.dumps([{"case_id": f"case_0000{i}", "radiographic_size": 1.0,
                                                 "tumor_histologic_subtype": "clear_cell_rcc"} for i in (0, 1)]))
    assert D.training_data_record(D.discover_cases(data)) == {"source": "kits19", "cases": 2}
    (data / "kits.json").unlink()  # no kits.json: the NIfTI descrip says qnkit synth
    assert D.training_data_record(D.discover_cases(data))["source"] == "synthetic"


def test_training_slices_of_different_grids_pad_to_one_shape(tmp_path):
    entries = []
    for v, (h, w) in enumerate([(30, 34), (33, 20), (30, 34)]):
        folder = tmp_path / f"v{v}"
        folder.mkdir()
        for name, value in (("image", 0.5), ("coverage", 1.0), ("weights", 1.0)):
            np.save(folder / f"{name}.npy", np.full((2, h, w), value, np.float32))
        entries.append(D.CacheEntry(f"v{v}", folder, 2, 0, 0, stats={"model_shape": [2, h, w]}))
    assert D.training_pad_multiple(entries[:1], 16) == 16
    multiple = D.training_pad_multiple(entries, 16)
    assert multiple == 48
    ds = SliceDataset(entries, pad_multiple=multiple)
    assert {ds[i][0].shape for i in range(len(ds))} == {(1, 48, 48)}
    assert float(ds[2][2][0, 33:].sum()) == 0.0  # padding carries no loss weight


@pytest.mark.parametrize("margin,context_mm", [(1, 20.0), (1000, 2.5)])  # 8.5 mm slices
def test_dataset_context_planes_are_those_inference_builds(tmp_path, margin, context_mm):
    """A 2.5-D model's training image is the C planes inference builds from the whole CT (qnkit.inference,
    the same function, clamped at the volume's ends, not at the cached kidney range's), padded alike; labels and
    weights stay the slice's own. A 2-D model's records and cache key have no context fields."""
    from qnkit import inference
    from qnkit import io as qio
    from qnkit.synth import make_case, write_case

    write_case(make_case(2, size=32, seed=4), tmp_path / "data")
    (case,) = D.discover_cases(tmp_path / "data")
    params = D.PreprocessParams(-200.0, 400.0, margin, 2.0, None, context_planes=3, context_mm=context_mm)
    entry = D.build_cache([case], params, tmp_path / "cache")[case.case_id]
    flat = D.PreprocessParams(-200.0, 400.0, margin, 2.0, None)
    assert set(flat.record()) == {"hu_lo", "hu_hi", "slice_margin", "omega0", "pixel_spacing_mm"}
    assert flat.key() != params.key() and params.record()["context_mm"] == context_mm
    ct, geometry = qio.load_image(case.image)
    start, stop = entry.slice_range
    ds = SliceDataset([entry], pad_multiple=16, target="labels", context=params.context)
    expected = inference.model_input_slices(ct, np.arange(start, stop), hu_window=(-200.0, 400.0), spacing_hw=None,
                                            model_spacing=None, slice_mm=geometry.spacing[0], context=(3, context_mm))
    labels = np.load(entry.path("labels"))
    for z in range(len(ds)):
        x, y, w, _ = ds[z]
        assert x.shape == (3, 16, 16) and y.shape == w.shape == (1, 16, 16)
        np.testing.assert_array_equal(x.numpy(), inference.pad_slices(expected[z], 16))
        np.testing.assert_array_equal(y[0].numpy(), labels[z])
    image_range = entry.stats["image_slice_range"]  # the cache reaches past the kidney range, or is the whole CT
    reach = params.context_slices(geometry.spacing[0])  # 20 mm at 8.5 mm: 3 slices
    assert image_range == ([0, len(ct)] if margin == 1000 else [max(0, start - reach), min(len(ct), stop + reach)])
    assert (image_range[0] < start or stop < image_range[1]) is (margin == 1)

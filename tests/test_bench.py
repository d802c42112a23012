"""`qnkit bench --quick`: every section runs, and every figure agrees with the raw times it was made from and with
the other rows (no time is asserted: speed is measured, not tested)."""
import json

import numpy as np
import pytest

from qnkit import kernels
from qnkit.cli import main


def run_cli(*args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code


def _consistent_timing(t: dict) -> None:
    """A repeated timing: min <= median <= max over at least one repeat, and its spread recomputed."""
    assert t["repeats"] >= 1 and t["min_s"] <= t["median_s"] <= t["max_s"], t
    assert t["spread"] == pytest.approx((t["max_s"] - t["min_s"]) / t["median_s"])


def test_bench_quick_writes_every_row_json_and_plot(shared_bundle, tmp_path, capsys):
    """Every figure of the JSON is checked against the raw times it was made from (speed-ups, ratios, rates,
    shares recomputed), the rows agree with each other (each backend against the eager FP32 row of its
    batch; e2e's eager path ran every slice; the run's peak memory covers its workers', in the same unit),
    and FP32 ONNX Runtime gives the eager masks. On the session's shared bundle (fitted tiny checkpoint,
    FP32/FP16/INT8 graphs), so that the test does not export a random-weight network of its own."""
    report_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    code = run_cli("bench", "--quick", "--model", str(shared_bundle[1]), "--baseline-model", str(shared_bundle[1]),
                   "--json", str(report_path),
                   "--plot", str(plot_path), "--workdir", str(tmp_path / "work"))
    assert code in (0, None)
    report = json.loads(report_path.read_text())
    assert report["mode"] == "quick"
    assert report["system"]["kernel_build"] in kernels.available_builds()
    run = report["run"]
    assert set(run["sections_s"]) >= {"kernels", "io", "backends", "e2e"}
    assert sum(run["sections_s"].values()) <= run["wall_s"]  # sections are parts of the run

    kernel_rows = {(row["kernel"], row["threads"]) for row in report["kernels"]}
    for name in ("downsample_image", "downsample_labels", "kidney_slice_range", "border_weights", "dice",
                 "upsample_threshold", "copy_transposed"):
        assert (name, 1) in kernel_rows
    for row in report["kernels"]:
        for timing in ("kernel_s", "numpy_s", "floor_s"):
            _consistent_timing(row[timing])
        kernel = row["kernel_s"]["median_s"]
        assert row["speedup_vs_numpy"] == pytest.approx(row["numpy_s"]["median_s"] / kernel)
        assert row["ratio_to_floor"] == pytest.approx(kernel / row["floor_s"]["median_s"])
        assert row["gb_per_s"] == pytest.approx(row["bytes_moved"] / kernel / 1e9)

    io_rows = {(row["volume"], row["operation"]): row for row in report["io"]}
    assert set(io_rows) == {(v, op) for v in ("CT int16", "mask uint8") for op in ("write", "read")}
    for (volume, _), row in io_rows.items():
        assert row["shape"] == [24, 128, 128]
        _consistent_timing(row["qnkit_s"])
        _consistent_timing(row["nibabel_s"])
        itemsize = 2 if volume == "CT int16" else 1
        assert row["raw_mb"] == pytest.approx(24 * 128 * 128 * itemsize / 1e6)  # MB, not MiB
        assert row["speedup_vs_nibabel"] == pytest.approx(row["nibabel_s"]["median_s"] / row["qnkit_s"]["median_s"])
        assert row["qnkit_mb_per_s"] == pytest.approx(row["raw_mb"] / row["qnkit_s"]["median_s"])
        assert row["file_mb"]["qnkit"] < row["raw_mb"] and row["file_mb"]["nibabel"] < row["raw_mb"]  # gzip

    rows = [row for row in report["backends"] if "error" not in row]
    labels = {row["backend"] for row in rows}
    assert {"torch fp32 cpu", "onnxruntime fp32 cpu"} <= labels
    eager = {row["batch"]: row for row in rows if row["backend"] == "torch fp32 cpu"}
    assert set(eager) == {1, 4}
    for row in rows:
        _consistent_timing(row["seconds"])
        assert row["slices_per_s"] == pytest.approx(row["batch"] / row["seconds"]["median_s"])
        if row["device"] == "cpu":
            assert row["speedup_vs_eager_fp32"] == pytest.approx(row["slices_per_s"] / eager[row["batch"]]["slices_per_s"])
    assert all(row["speedup_vs_eager_fp32"] == pytest.approx(1.0) for row in eager.values())
    onnx = next(row for row in rows if row["backend"] == "onnxruntime fp32 cpu")
    assert onnx["dice_agreement_vs_eager"] > 0.99 and onnx["agreement_meaningful"] is True
    assert report["bundle"]["trained"] is True and "onnxruntime int8 cpu" in labels

    e2e = report["e2e"]  # the bundle on a small phantom: default path against eager FP32 on every slice
    default, eager_path = e2e["default"], e2e["eager"]
    for path in (default, eager_path):
        stages = path["stages_s"]
        assert set(stages) >= {"load", "preprocess", "inference", "postprocess", "write", "wall"}
        assert path["wall_s"] == stages["wall"] == pytest.approx(float(np.median(path["runs_wall_s"])))
        assert len(path["runs_wall_s"]) == path["repeats"] == e2e["repeats"]
        assert path["share_outside_inference"] == pytest.approx((stages["wall"] - stages["inference"]) / stages["wall"])
        assert stages["inference"] <= stages["wall"]
        assert 0 <= path["dice_vs_truth"] <= 1
    assert default["backend"]["name"] == "onnxruntime" and (eager_path["backend"]["name"],
                                                            eager_path["backend"]["precision"]) == ("torch", "fp32")
    z = e2e["case"]["shape"][0]
    assert eager_path["slab"]["slices_run"] == z and eager_path["slab"]["start"] == 0 and eager_path["slab"]["stop"] == z
    assert e2e["seconds"] == default["wall_s"] and e2e["eager_seconds"] == eager_path["wall_s"]
    assert e2e["speedup_vs_eager"] == pytest.approx(eager_path["wall_s"] / default["wall_s"])
    assert e2e["speedup_vs_eager_with_open"] == pytest.approx(
        (eager_path["wall_s"] + eager_path["open_s"]) / (default["wall_s"] + default["open_s"]))
    assert e2e["peak_rss_gb"] == default["peak_rss_gb"] and e2e["peak_rss_gb_by_slices"] == {str(z): default["peak_rss_gb"]}
    # the run's peak (its own and its waited-for workers', both in GB of 1e9 bytes) covers the e2e worker's
    assert run["peak_rss_gb"] >= default["peak_rss_gb"]
    # FP32 on both paths: the same masks (the slab only skips slices without kidney), the same volumes
    assert default["backend"]["precision"] == "fp32"
    assert e2e["mask_dice_vs_eager"] >= 0.99
    for side in ("right", "left"):
        assert default["kidneys_ml"][side] == pytest.approx(eager_path["kidneys_ml"][side], rel=0.02)
    assert "memory" not in e2e  # the 1,000-slice row is not part of a quick run
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "Backends" in out and "Performance targets" in out
    _check_uncertainty_row(e2e, out)
    # the paths took turns, one case each, the first path alternating from round to round
    starts = sorted((t, name) for name in ("default", "eager", "baseline") for t in e2e[name]["runs_started_s"])
    rounds = [[name for _, name in starts[i:i + 3]] for i in range(0, len(starts), 3)]
    assert len(rounds) == e2e["repeats"] and all(sorted(r) == ["baseline", "default", "eager"] for r in rounds)
    assert rounds[0] == ["default", "eager", "baseline"] and rounds[1:2] in ([], [["baseline", "eager", "default"]])
    baseline = e2e["baseline"]  # the same bundle as its own baseline: the same mask, its own timing
    assert baseline["model"] == shared_bundle[1].name and baseline["mask_dice_vs_default"] == 1.0
    assert e2e["seconds_vs_baseline"] == pytest.approx(default["wall_s"] / baseline["wall_s"])
    assert f"wall of baseline {baseline['model']} s" in out

    targets = {row["target"]: row for row in report["targets"]}
    assert any(t.startswith("every kernel within 2x") for t in targets)
    assert any(t.startswith("best CPU backend") and "batch 4" in t for t in targets)
    gpu = next(row for t, row in targets.items() if "on the GPU" in t)
    assert gpu["met"] is None or report["system"]["gpu"]


def _check_uncertainty_row(e2e: dict, printed: str) -> None:
    """The quick run's e2e row of the default path with --quality --uncertainty N (issue 26): one run, its cost
    against the default path of the same run, the same mask, a verdict per kidney found (with the samples the
    network's dropout allows: none for the shared bundle's), and its row in the printed table."""
    from qnkit.commands.bench import QUICK_UNCERTAINTY_SAMPLES

    row, default = e2e["uncertainty"], e2e["default"]
    assert row["samples_asked"] == QUICK_UNCERTAINTY_SAMPLES and row["repeats"] == 1
    assert row["cost_vs_plain"] == pytest.approx(row["wall_s"] / default["wall_s"])
    assert 0 < row["stages_s"]["uncertainty"] <= row["wall_s"] and "uncertainty" in row["what"]
    assert row["backend"]["name"] == default["backend"]["name"] and row["mask_dice_vs_default"] >= 0.999
    drawn = QUICK_UNCERTAINTY_SAMPLES if e2e["model"]["network"].get("drop_out", 0) > 0 else 0
    for side in ("right", "left"):
        quality = row["quality"][side]
        assert (quality is None) == (default["kidneys_ml"][side] == 0)
        assert quality is None or (quality["verdict"] in ("ok", "check") and quality["samples"] == drawn)
    line = next(line for line in printed.splitlines() if f"--uncertainty {QUICK_UNCERTAINTY_SAMPLES}" in line)
    assert f"({row['cost_vs_plain']:.2f}x)" in line


@pytest.mark.parametrize("args, message", [
    (["--only", "nope"], "--only"),
    (["--batch-sizes", "0,4"], "--batch-sizes"),
    (["--json", "/nonexistent-folder/x.json"], "folder does not exist"),
    (["--model", "/nonexistent-bundle"], "bundle not found"),
    (["--baseline-model", "/nonexistent-bundle"], "--baseline-model"),
    (["--quick", "--full"], "exclude each other"),
])
def test_bench_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert run_cli("bench", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def _kernel(name, threads, floor_ratio, numpy_speedup):
    return {"kernel": name, "threads": threads, "ratio_to_floor": floor_ratio, "speedup_vs_numpy": numpy_speedup}


def _backend(label, device, batch, speedup, dice):
    kind, precision = label.split()[:2]
    return {"backend": f"{label} {device}", "kind": kind, "precision": precision, "device": device,
            "batch": batch, "speedup_vs_eager_fp32": speedup, "dice_agreement_vs_eager": dice}


def test_targets_met_missed_and_unknown():
    from qnkit.benchmarks.targets import evaluate

    report = {
        "kernels": [_kernel("downsample_image", 1, 1.3, 90.0), _kernel("border_weights", 1, 2.4, 8.0),
                    _kernel("downsample_image", 2, 0.9, 120.0), _kernel("border_weights", 2, 1.1, 12.0)],
        "bundle": {"trained": True},
        "backends": [_backend("torch fp32", "cpu", 4, 1.0, 1.0), _backend("onnxruntime fp32", "cpu", 4, 1.9, 0.999),
                     _backend("onnxruntime int8", "cpu", 4, 3.5, 0.995),
                     _backend("torch fp32", "cpu", 1, 1.0, 1.0), _backend("onnxruntime int8", "cpu", 1, 3.1, 0.95),
                     _backend("onnxruntime fp32", "cpu", 1, 1.5, 0.999)],
        "e2e": {"case": {"shape": [320, 512, 512]}, "speedup_vs_eager": 11.2, "mask_dice_vs_eager": 0.995,
                "default": {"share_outside_inference": 0.064, "backend": {"name": "onnxruntime", "precision": "fp32"}},
                "memory": {"shape": [1000, 512, 512], "peak_rss_gb": 3.2}},
    }
    rows = {row["target"]: row for row in evaluate(report)}
    met = {target: row["met"] for target, row in rows.items()}
    assert met["every kernel within 2x its memory floor, 1 thread(s)"] is False
    assert "border_weights 2.40x" in rows["every kernel within 2x its memory floor, 1 thread(s)"]["measured"]
    assert met["every kernel within 2x its memory floor, 2 thread(s)"] is True
    assert met["downsample_image at least 10x its NumPy reference"] is True
    assert met["border_weights at least 10x its NumPy reference"] is False  # the slower thread count counts
    batch4 = next(row for target, row in rows.items() if target.startswith("best CPU") and target.endswith("batch 4"))
    assert batch4["met"] is True and "onnxruntime int8 cpu 3.50x" in batch4["measured"]
    # At batch 1 INT8 is fast but disagrees with eager, so FP32 ONNX Runtime is the best that agrees.
    batch1 = next(row for target, row in rows.items() if target.startswith("best CPU") and target.endswith("batch 1"))
    assert batch1["met"] is False and "onnxruntime fp32 cpu 1.50x" in batch1["measured"]
    assert next(row for target, row in rows.items() if "GPU" in target)["met"] is None
    assert met["end to end, time outside inference at most 10%"] is True
    whole = next(row for target, row in rows.items() if target.startswith("end to end on a whole CT"))
    assert whole["met"] is True and "11.2x, Dice 0.9950" in whole["measured"]
    assert met["peak memory under 3 GB on a 1000-slice 512x512 CT"] is False
    report["e2e"]["mask_dice_vs_eager"] = 0.98  # fast but not the same answer
    assert next(r for r in evaluate(report) if r["target"].startswith("end to end on a whole"))["met"] is False
    report["e2e"]["case"]["shape"] = [24, 128, 128]  # a quick run's phantom cannot tell
    assert next(r for r in evaluate(report) if r["target"].startswith("end to end on a whole"))["met"] is None

    report["bundle"]["trained"] = False  # untrained weights: a fast row cannot be called met
    batch4 = next(row for row in evaluate(report) if row["target"].startswith("best CPU") and "batch 4" in row["target"])
    assert batch4["met"] is None and "untrained" in batch4["measured"]


def test_default_plan_is_bounded_and_full_is_the_complete_sweep():
    """The default run keeps the batches that blew memory (eager FP32 at 32 held 12.5 GB) for --full."""
    from qnkit.benchmarks.plan import MODES, PLANS

    assert set(PLANS) == set(MODES)
    default, full = PLANS["default"], PLANS["full"]
    assert max(default.batch_sizes) <= 4 and default.batch_sizes[0] == 1
    assert full.batch_sizes == (1, 4, 16, 32)
    assert default.io_shape == full.io_shape == (300, 512, 512)  # the whole CT of the I/O rows
    assert default.kernel_shape[1:] == full.kernel_shape[1:] == (512, 512)
    assert all(getattr(PLANS["quick"], f) <= getattr(default, f) for f in ("e2e_slices", "e2e_size"))
    assert default.e2e_whole_ct and full.e2e_whole_ct and not PLANS["quick"].e2e_whole_ct
    assert default.e2e_memory_slices == full.e2e_memory_slices == 1000 and PLANS["quick"].e2e_memory_slices == 0


def test_only_io_section(tmp_path, monkeypatch):
    """`--only io` writes the I/O rows alone and records the mode."""
    from qnkit.benchmarks import plan

    small = plan.BenchPlan(**{**plan.PLANS["quick"].__dict__, "mode": "default", "io_shape": (6, 64, 64)})
    monkeypatch.setitem(plan.PLANS, "default", small)
    report_path = tmp_path / "io.json"
    assert run_cli("bench", "--only", "io", "--json", str(report_path), "--workdir", str(tmp_path)) in (0, None)
    report = json.loads(report_path.read_text())
    assert report["mode"] == "default" and set(report) >= {"io", "targets"} and "backends" not in report
    assert len(report["io"]) == 4 and not list(tmp_path.glob("*.nii.gz"))


def test_e2e_gpu_rows_compare_each_with_the_gpus_eager_fp32(tmp_path, monkeypatch):
    """The GPU rows' bookkeeping, with the worker replaced (no GPU here; tests/test_backends_gpu.py runs the
    real rows on one): each row against the GPU's eager FP32, a row whose package is missing skipped."""
    import nibabel as nib
    import numpy as np

    from qnkit.benchmarks import e2e

    truth = np.zeros((6, 8, 8), dtype=np.uint8)
    truth[2:4, 2:6, 2:6] = 1
    walls = {"gpu_eager": 10.0, "gpu_fp16_cuda_graphs": 2.0}
    jobs = []

    def fake_worker(job):
        jobs.append(job)
        mask = truth.copy()
        if job["path"] != "gpu_eager":
            mask[2, 2, 2] = 0  # one voxel of 32 lost
        nib.save(nib.Nifti1Image(mask, np.eye(4)), job["out"])
        return {"wall_s": walls[job["path"]], "path": job["path"]}

    monkeypatch.setattr(e2e, "_in_subprocess", fake_worker)
    monkeypatch.setitem(e2e.GPU_PATHS["gpu_tensorrt_fp16"], "needs", "no_such_package_for_qnkit")
    from qnkit import io as qio

    nib.save(nib.Nifti1Image(truth, np.eye(4)), tmp_path / "truth.nii.gz")
    internal = qio.load_labels(tmp_path / "truth.nii.gz")[0] > 0  # the layout the rows' masks are read in
    rows = e2e.gpu_rows(tmp_path / "bundle", tmp_path / "ct.nii.gz", internal, tmp_path, batch_size=4, repeats=1)
    assert [job["path"] for job in jobs] == ["gpu_eager", "gpu_fp16_cuda_graphs"]
    assert rows["gpu_eager"]["speedup_vs_gpu_eager"] == 1.0 and rows["gpu_eager"]["mask_dice_vs_gpu_eager"] == 1.0
    graphs = rows["gpu_fp16_cuda_graphs"]
    assert graphs["speedup_vs_gpu_eager"] == 5.0 and graphs["mask_dice_vs_gpu_eager"] == pytest.approx(62 / 63)
    assert "not installed" in rows["gpu_tensorrt_fp16"]["skipped"]
    assert graphs["dice_vs_truth"] == pytest.approx(62 / 63) and rows["gpu_eager"]["dice_vs_truth"] == 1.0
    assert not any(tmp_path.glob("mask_*.nii.gz"))  # masks removed once compared
    for name, path in e2e.GPU_PATHS.items():  # every row names a backend open_backend knows, on the GPU
        assert path["device"].startswith("cuda") and path["backend"] in ("torch", "tensorrt")


# The diagnosis tools (benchmarks.error_map, benchmarks.sinus_taken) through their command lines, on the shared tiny
# bundle: here, beside the other tests that wait for it to be built.


def test_cli_maps_a_real_bundles_errors_and_probes_their_content(shared_bundle, tmp_path, capsys):
    """Through the command line, on a tiny exported bundle and a phantom whose kidneys are labelled 2 and 3 (one
    per half of the image): each side's map, the probe's share for every value asked, the JSON file's other keys kept."""
    import json

    import nibabel as nib
    import numpy as np

    from qnkit.benchmarks.error_map import main as error_map_main
    from qnkit.synth import make_case

    _, bundle = shared_bundle
    case = make_case(1, size=128, seed=5)
    affine = case.affine
    labels = (case.segmentation > 0).astype(np.uint8)
    columns = np.arange(labels.shape[2])[None, None, :]
    sides = np.where(columns < labels.shape[2] // 2, 2, 3).astype(np.uint8)  # one kidney per half
    labels = labels * sides
    nib.save(nib.Nifti1Image(case.imaging.astype(np.int16), affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "seg.nii.gz")
    out = tmp_path / "errors.json"
    out.write_text(json.dumps({"earlier": {"kept": True}}))
    assert error_map_main(["--model", str(bundle), "--ct", str(tmp_path / "ct.nii.gz"), "--labels", str(tmp_path / "seg.nii.gz"),
                 "--probe-hu=-90,40", "--name", "tiny", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["earlier"] == {"kept": True}
    result = doc["tiny"]
    for side in ("right", "left"):
        assert 0.0 <= result[side]["dice"] <= 1.0 and result[side]["voxels_true"] > 0
        assert set(result[side]["fp_by_mm_outside"]) == {"0-3.1", "3.1-6.1", "6.1-9.1", ">9.1"}
    assert set(result["probe"]["still_taken"]) == {"-90", "40"}
    assert all(0.0 <= v <= 1.0 for v in result["probe"]["still_taken"].values())
    capsys.readouterr()
    assert error_map_main(["--model", str(bundle), "--ct", str(tmp_path / "missing.nii.gz"), "--labels",
                           str(tmp_path / "seg.nii.gz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error_map:") and "missing.nii.gz" in err[0]


def test_cli_scores_regenerated_phantoms_and_refuses_other_ones(shared_bundle, tmp_path, capsys):
    from qnkit.benchmarks.sinus_taken import main as sinus_main
    from qnkit.synth import write_dataset

    _, bundle = shared_bundle
    data = tmp_path / "data"
    write_dataset(data, cases=2, size=96, seed=3, generator="anatomy", pixel_range=(4.0, 4.0), anatomy_version=7,
                  progress=False)
    out = tmp_path / "sinus.json"
    assert sinus_main(["--model", str(bundle), "--data", str(data), "--size", "96", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["case"] for r in result["cases"]] == ["case_00000", "case_00001"]
    for row in result["cases"]:
        assert row["sinus_taken"] is None or 0.0 <= row["sinus_taken"] <= 1.0
        assert row["hilum_taken"] is None or 0.0 <= row["hilum_taken"] <= 1.0
        assert row["sinus_taken_by_labels_at_grid"] is None or 0.0 <= row["sinus_taken_by_labels_at_grid"] <= 1.0
        assert row["volume_ratio"] >= 0.0 and all(v >= 0.5 for v in row["false_positive_ml"].values())
    assert sum(p["cases"] for p in result["by_phase"].values()) == 2
    capsys.readouterr()
    assert sinus_main(["--model", str(bundle), "--data", str(data), "--size", "64", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs from the stored one" in err[0]

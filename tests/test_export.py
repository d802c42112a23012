"""`qnkit export`: bundle contents, clean graphs, verification figures, failure modes.

The checkpoint is a tiny QuickNAT (8 filters) fitted for a few seconds on 64x64 slices of
synthetic cases (size 128) and saved with the training code's checkpoint writer; the bundle is
exported once per session through the CLI (FP32 + FP16 + INT8) and shared read-only by
test_export*, test_backends* and test_bundle (the `shared_bundle` fixture of conftest.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import torch
import onnx
import onnxruntime  # noqa: E402,F401  (segmenting needs it: missing is an error, not a skip)

HU = (-200.0, 400.0)  # the shared bundle's HU window (conftest.EXPORT_HU)


def _meta(bundle: Path) -> dict:
    return json.loads((bundle / "qnkit.json").read_text())


def test_bundle_layout_hashes_and_checker(shared_bundle):
    from qnkit.bundle import sha256_file

    _, bundle = shared_bundle
    meta = _meta(bundle)
    names = {"model.onnx", "model.fp16.onnx", "model.int8.onnx", "weights.safetensors"}
    assert set(meta["artefacts"]) == names
    assert {p.name for p in bundle.iterdir()} == names | {"qnkit.json"}
    for name, rec in meta["artefacts"].items():
        assert rec["sha256"] == sha256_file(bundle / name) and rec["bytes"] == (bundle / name).stat().st_size
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        onnx.checker.check_model(str(bundle / name), full_check=True)
    assert meta["model"]["input_size"] == [64, 64] and meta["model"]["network"]["num_filters"] == 8
    assert meta["preprocessing"]["hu_window"] == list(HU) and meta["preprocessing"]["size_divisor"] == 16
    assert meta["preprocessing"]["downsample"] == 2 and meta["threshold"] == 0.5
    assert {"torch", "onnx", "onnxruntime", "qnkit"} <= set(meta["tools"])
    assert meta["training"]["epoch"] == 1 and meta["engine"] is None
    assert meta["export"]["fp32"]["opset"] >= 17
    # no hidden temporary folders left beside the bundle
    assert [p.name for p in bundle.parent.iterdir() if p.name.startswith(".")] == []


def test_verification_figures_recorded_and_meet_the_bars(shared_bundle):
    ver = _meta(shared_bundle[1])["verification"]
    assert ver["eager_foreground_pixels"] > 100, "the fitted model should find kidneys"
    assert ver["fp32"]["passed"] and ver["fp32"]["dice"] >= 0.999 and ver["fp32"]["p99_abs_diff"] < 1e-4
    assert ver["fp32"]["max_abs_diff"] < 0.5  # isolated max-pool near-ties may flip (see qnkit.export.verify)
    assert ver["fp32"]["other_grid"]["p99_abs_diff"] < 1e-4  # dynamic height/width verified
    assert ver["fp16"]["passed"] and ver["fp16"]["dice"] >= 0.99
    assert ver["int8"]["passed"] and ver["int8"]["dice"] >= 0.95, ver["int8"]  # export's own synthetic slices


@pytest.mark.parametrize("name", ["model.onnx", "model.fp16.onnx"])
def test_graphs_have_no_scatter_unpool_or_batchnorm(shared_bundle, name):
    from qnkit.export.onnx_export import op_types

    graph = onnx.load(str(shared_bundle[1] / name))
    ops = op_types(graph)
    assert not {"ScatterND", "ScatterElements", "MaxUnpool", "BatchNormalization", "ArgMax"} & set(ops)
    assert "MaxPool" not in ops  # pooling is an element-wise Max of strided slices (mask form)
    assert graph.opset_import[0].version >= 17
    inp, out = graph.graph.input[0], graph.graph.output[0]
    assert (inp.name, out.name) == ("image", "probability")
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"


def test_prelu_exported_as_leaky_relu(shared_bundle):
    from qnkit.export.onnx_export import op_types

    ops = op_types(onnx.load(str(shared_bundle[1] / "model.onnx")))
    assert "PRelu" not in ops and ops["LeakyRelu"] == 27  # 9 dense blocks x 3 activations


def test_int8_graph_quantises_inner_spatial_convolutions_the_search_kept(shared_bundle):
    """Only inner k x k convolutions can run in INT8 (first, last and 1x1 stay in float); which of them do is what
    the export's sensitivity search recorded, and its record holds: every candidate scored alone, every step's
    figures, and the INT8 set is exactly the accepted steps, each at the target on the tuning phantoms."""
    from qnkit.export.int8 import CALIBRATIONS, CASE_FLOOR, quantised_convolutions

    graph = onnx.load(str(shared_bundle[1] / "model.int8.onnx")).graph
    producers = {out: node for node in graph.node for out in node.output}
    weights = {init.name: list(init.dims) for init in graph.initializer}

    def weight_shape(conv):
        source = producers.get(conv.input[1])
        name = source.input[0] if source is not None and source.op_type == "DequantizeLinear" else conv.input[1]
        return weights[name], source is not None and source.op_type == "DequantizeLinear"

    convs = [node for node in graph.node if node.op_type == "Conv"]
    shapes = [weight_shape(conv) for conv in convs]
    assert not shapes[0][1] and not shapes[-1][1], "first and last convolutions stay in float"
    candidates = {conv.name for conv, (shape, _) in zip(convs[1:-1], shapes[1:-1]) if shape[2] * shape[3] > 1}
    in_int8 = set(quantised_convolutions(shared_bundle[1] / "model.int8.onnx"))
    assert in_int8 <= candidates and in_int8, "only inner k x k convolutions run in INT8, and some do"

    meta = _meta(shared_bundle[1])["export"]["int8"]
    assert meta["activations"].startswith("uint8 asymmetric") and meta["calibration"] in {c[0] for c in CALIBRATIONS}
    assert {q["node"] for q in meta["quantised"]} == in_int8 and meta["quantised_convolutions"] == len(in_int8)
    assert {k["node"] for k in meta["kept_float"]} == {conv.name for conv in convs} - in_int8
    assert all(k["why"] for k in meta["kept_float"]) and 0 < meta["int8_flops_share"] < 1
    search = meta["search"]
    assert {row["node"] for row in search["sensitivity"]} == candidates
    assert all(0 <= row["dice_alone"] <= 1 and row["module"] for row in search["sensitivity"])
    accepted = [step for step in search["steps"] if step["accepted"]]
    assert {step["node"] for step in accepted} == in_int8
    assert all(step["dice"] >= search["target_dice"] and step["worst_case_dice"] >= CASE_FLOOR for step in accepted)
    assert all(not (step["dice"] >= search["target_dice"] and step["worst_case_dice"] >= CASE_FLOOR)
               for step in search["steps"] if not step["accepted"])
    assert search["equalised_fp32_dice"] >= 0.999  # equalising the inputs leaves the FP32 masks as they were


def test_fp16_graph_is_strongly_typed_fp16(shared_bundle):
    graph = onnx.load(str(shared_bundle[1] / "model.fp16.onnx"))
    """Converted from the verified FP32 graph: every weight and activation FP16 except the image, its cast's
    input, and the final sigmoid, which runs in FP32 on logits cast back; nodes in topological order."""
    assert {t.data_type for t in graph.graph.initializer if len(t.dims) > 1} == {onnx.TensorProto.FLOAT16}
    onnx.checker.check_model(graph, full_check=True)  # includes topological order
    inferred = onnx.shape_inference.infer_shapes(graph)
    f32 = {v.name for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
           if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    final = [n for n in graph.graph.node if "probability" in n.output]
    assert [n.op_type for n in final] == ["Sigmoid"]
    assert f32 == {"image", "probability", final[0].input[0]}
    assert _meta(shared_bundle[1])["export"]["fp16"]["converter"].startswith("onnxruntime.transformers.float16")


def test_fold_batchnorm_matches_eager_and_removes_bn():
    from qnkit.export.onnx_export import ChannelAffine, fold_batchnorm
    from qnkit.nn.quicknat import QuickNAT, QuickNATConfig

    torch.manual_seed(1)
    model = QuickNAT(QuickNATConfig(num_filters=4, drop_out=0.0))
    with torch.no_grad():  # non-trivial statistics, including negative gammas (scale+shift path)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-1.0, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    folded, counts = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, ChannelAffine) for m in folded.modules()) == 27
    assert counts.get("scale_shift", 0) > 0
    x = torch.rand(3, 1, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    # optionally, all-positive scales go into the following conv (exact in algebra)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.abs_().add_(0.1)
        folded, counts = fold_batchnorm(model, into_conv=True)
        assert counts == {"into_conv": 27}
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_existing_bundle_needs_force_and_failed_export_leaves_nothing(shared_bundle, run_qnkit, tmp_path):
    run, bundle = shared_bundle
    proc = run_qnkit("export", run, "--out", bundle, "--input-size", "64")
    assert proc.returncode == 2 and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    # a non-bundle folder is never replaced
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    proc = run_qnkit("export", run, "--out", other, "--force")
    assert proc.returncode == 2 and (other / "keep.txt").exists()


def test_export_below_the_bar_fails_and_writes_nothing(export_reusing_shared_graph, tmp_path, monkeypatch):
    from qnkit.export import bundle_writer, verify
    from qnkit.export.onnx_export import ExportError

    monkeypatch.setitem(verify.BARS, "fp32", {"min_dice": 1.5, "p99_abs_diff": 1e-3})
    with pytest.raises(ExportError, match="verification failed"):
        bundle_writer.export_bundle(export_reusing_shared_graph[0], tmp_path / "b", input_size=(64, 64), log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_engine_without_tensorrt_is_a_clear_error(shared_bundle, run_qnkit, tmp_path):
    from qnkit.backends.tensorrt_build import unavailable_reason

    if unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present (see test_backends_gpu)")
    proc = run_qnkit("export", shared_bundle[0], "--out", tmp_path / "b", "--engine")
    assert proc.returncode == 2 and "--engine" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "b").exists()


def test_tampered_checkpoint_is_refused(shared_bundle, run_qnkit, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(shared_bundle[0], run)
    with open(run / "checkpoints" / "best" / "model.safetensors", "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\0\1\2\3")
    proc = run_qnkit("export", run, "--out", tmp_path / "b")
    assert proc.returncode == 2 and "sha256" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "b").exists()


def test_quality_calibration_is_sealed_into_the_bundle(export_reusing_shared_graph, tmp_path, capsys):
    """`qnkit export --quality-calibration FILE`: the limits of `quality_calibration fit` become the bundle's, read
    by `qnkit segment --quality`; a file without a positive limit for every signal is one line and exit code 2."""
    from qnkit.bundle import load_bundle
    from qnkit.cli import main
    from qnkit.quality import SIGNALS, calibration_of

    limits = {name: 0.5 + k for k, name in enumerate(SIGNALS)}
    good, bad = tmp_path / "calibration.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"limits": limits, "chosen_on": {"kidneys": 40}}))
    bad.write_text(json.dumps({"limits": {**limits, "hu_spread": 0}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(export_reusing_shared_graph[0]), "--out", str(tmp_path / "no"), "--quality-calibration",
              str(bad), "--input-size", "64x64", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "hu_spread" in err[0] and not (tmp_path / "no").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(export_reusing_shared_graph[0]), "--out", str(tmp_path / "b"), "--quality-calibration",
              str(good), "--input-size", "64x64", "--no-progress"])
    assert exit_info.value.code in (0, None)
    calibration, source = calibration_of(load_bundle(tmp_path / "b"))
    assert source == "bundle" and calibration["limits"] == limits and calibration["calibrated_for_this_model"]


def test_a_fitted_calibration_is_sealed_into_an_exported_bundle(shared_bundle, tmp_path):
    """`quality_calibration fit --into BUNDLE` (reseal_quality): only the "quality" record changes, and the bundle
    still verifies as a whole."""
    from qnkit.bundle import load_bundle
    from qnkit.export.bundle_writer import reseal_quality
    from qnkit.quality import SIGNALS, calibration_of

    bundle = shutil.copytree(shared_bundle[1], tmp_path / "bundle")
    before = _meta(bundle)
    limits = {name: 1.0 + k for k, name in enumerate(SIGNALS)}
    reseal_quality(bundle, {"limits": limits, "chosen_on": "test"})
    after = _meta(bundle)
    assert {k for k in after if after[k] != before.get(k)} == {"quality", "manifest_sha256"}
    calibration, source = calibration_of(load_bundle(bundle))
    assert source == "bundle" and calibration["limits"] == limits and calibration["calibrated_for_this_model"]


def test_mc_graph_added_to_a_bundle_exported_without_it(shared_bundle, tmp_path):
    """`python -m qnkit.export.mc_dropout BUNDLE` (add_mc_graph): a bundle without model.mc.onnx gets it from its own
    weights, verified as export verifies it; only the new artefact and its records change, the bundle still loads
    whole, and the sampler then runs on ONNX Runtime. A second call, or a bundle that fails its hashes, is one
    line and exit code 2."""
    from qnkit.backends import open_backend, open_sampler
    from qnkit.bundle import MC_ONNX, load_bundle, sealed_metadata_text
    from qnkit.export.mc_dropout import main as add_mc

    bundle = shutil.copytree(shared_bundle[1], tmp_path / "bundle")
    meta = _meta(bundle)
    assert not (bundle / MC_ONNX).exists()  # the tiny network trains without dropout; dropout has no weights
    meta["model"]["network"]["drop_out"] = 0.2
    (bundle / "qnkit.json").write_text(sealed_metadata_text(meta))
    before = _meta(bundle)
    assert add_mc([str(bundle)]) == 0
    after = _meta(bundle)
    assert {k for k in after if after[k] != before.get(k)} == {"artefacts", "export", "verification", "manifest_sha256"}
    assert set(after["artefacts"]) - set(before["artefacts"]) == {MC_ONNX} and after["verification"]["mc"]["passed"]
    loaded = load_bundle(bundle)
    sampler = open_sampler(loaded, open_backend(loaded, "onnxruntime", precision="fp32", log=lambda m: None), log=lambda m: None)
    assert sampler.name == "onnxruntime" and sampler.model_name == MC_ONNX
    assert add_mc([str(bundle)]) == 2
    (bundle / "model.onnx").write_bytes(b"tampered")
    assert add_mc([str(tmp_path / "bundle")]) == 2

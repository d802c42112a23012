"""A 2.5-D model end to end, tiny: three classic phantoms, a one-epoch 2-D run, a one-epoch 3-plane run (context_mm
3.0) fine-tuned from it (its first block inflated; validated on its dataset's planes), evaluated (segment_ct),
exported to ONNX, verified, and segmented through ONNX Runtime and through torch, which agree."""
from __future__ import annotations

import json

import numpy as np
import pytest

from qnkit import io as qio

pytestmark = pytest.mark.slow

TINY = ("--epochs", "1", "--num-filters", "4", "--micro-batch", "4", "--effective-batch", "4", "--lr", "3e-3",
        "--min-steps-per-epoch", "0", "--no-progress", "--device", "cpu", "--seed", "0")
CONTEXT_INI = "[NETWORK]\nnum_channels = 3\nnum_filters = 4\n\n[DATA]\ncontext_mm = 3.0\n"


@pytest.fixture(scope="module")
def context_run(tmp_path_factory, run_qnkit) -> dict:
    """{data, flat, run, bundle}: the phantoms, the 2-D source run, the 3-plane run and its bundle."""
    work = tmp_path_factory.mktemp("context")
    paths = {name: work / name for name in ("data", "flat", "run", "bundle")}
    (work / "context.ini").write_text(CONTEXT_INI)
    for args in (("synth", paths["data"], "--cases", "3", "--size", "64", "--generator", "classic"),
                 ("train", "--data", paths["data"], "--out", paths["flat"], *TINY),
                 ("train", "--data", paths["data"], "--out", paths["run"], "--settings", work / "context.ini",
                  "--init-from", paths["flat"], *TINY),
                 ("evaluate", paths["run"], "--json", work / "evaluation.json"),  # segment_ct on the test case
                 ("export", paths["run"], "--out", paths["bundle"], "--no-progress")):
        proc = run_qnkit(*args)
        assert proc.returncode == 0, proc.stderr
    return paths


def test_the_run_and_bundle_record_the_context_and_the_inflation(context_run, run_qnkit):
    meta = json.loads((context_run["run"] / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["network"]["num_channels"] == 3
    assert (meta["domain"]["context_planes"], meta["domain"]["context_mm"]) == (3, 3.0)
    assert meta["initialised_from"]["inflated"]["from_planes"] == 1
    assert meta["initialised_from"]["inflated"]["to_planes"] == 3
    bundle = json.loads((context_run["bundle"] / "qnkit.json").read_text())
    assert bundle["model"]["network"]["num_channels"] == 3
    assert bundle["model"]["input"]["shape"] == ["batch", 3, "height", "width"]
    assert (bundle["domain"]["context_planes"], bundle["domain"]["context_mm"]) == (3, 3.0)
    assert "inflated" in bundle["training"]["initialised_from"]
    assert bundle["domain"]["figures"]["test_dice"] is not None  # qnkit evaluate scored the 3-plane checkpoint
    proc = run_qnkit("verify", context_run["bundle"])
    assert proc.returncode == 0, proc.stderr


def test_onnxruntime_and_torch_segment_alike(context_run, run_qnkit, tmp_path):
    from qnkit.backends import open_backend
    from qnkit.bundle import load_bundle
    from qnkit.inference import model_context, model_input_slices, network_batch
    from qnkit.segment import model_arguments
    from qnkit.verification import agreement, check

    (case,) = json.loads((context_run["run"] / "evaluation_data.json").read_text())["test"]
    image = context_run["data"] / case / "imaging.nii.gz"
    masks = {}
    for backend in ("onnxruntime", "torch"):
        out, stats = tmp_path / f"{backend}.nii.gz", tmp_path / f"{backend}.json"
        proc = run_qnkit("segment", image, "--model", context_run["bundle"], "--backend", backend, "--device", "cpu",
                         "--out", out, "--stats", stats)
        assert proc.returncode == 0, proc.stderr
        masks[backend] = qio.load_labels(out)[0]
        assert json.loads(stats.read_text())["cases"][0]["model_grid"]["context"] == {"planes": 3, "mm": 3.0}
    assert np.array_equal(masks["onnxruntime"], masks["torch"])

    # Beneath the masks (which a one-epoch network may leave nearly empty): the two backends' probabilities of
    # the CT's context planes.
    bundle = load_bundle(context_run["bundle"])
    ct, geometry = qio.load_image(image)
    arguments = model_arguments(bundle)
    assert arguments["context"] == model_context(bundle) == (3, 3.0)
    planes = model_input_slices(ct, np.arange(len(ct)), hu_window=bundle.hu_window, spacing_hw=geometry.spacing[1:],
                                model_spacing=arguments["model_spacing"], slice_mm=geometry.spacing[0],
                                context=arguments["context"])
    x = network_batch(planes, arguments["pad_multiple"])
    probabilities = {}
    for backend in ("onnxruntime", "torch"):
        with open_backend(bundle, backend, device="cpu", log=lambda *_: None) as opened:
            probabilities[backend] = opened.predict(x)
    assert probabilities["torch"].shape == (len(ct), 1, *x.shape[2:])
    # held to export's FP32 bar (99th percentile of |diff|, mask Dice), not to a maximum: near-tied maxima in
    # max pooling let the two runtimes' last-bit rounding move a few pixels (qnkit.verification)
    figures = agreement(probabilities["torch"], probabilities["onnxruntime"], bundle.threshold)
    assert check("fp32", figures) is None, figures

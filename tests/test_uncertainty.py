"""Monte-Carlo dropout on every backend (the same samples for one seed) and the per-kidney quality verdict."""
from __future__ import annotations

import numpy as np
import pytest

from qnkit import quality as Q
from qnkit.uncertainty import KidneySamples, draw_keep, sample_kidneys


def test_draw_keep_is_dropout2d_masks_and_seeded():
    keep = draw_keep(np.random.default_rng(3), 200, 8, 16, 0.2)
    assert keep.dtype == np.float32 and keep.shape == (200, 8, 16)
    assert set(np.unique(keep).tolist()) == {0.0, np.float32(1 / 0.8)}
    assert abs(float((keep == 0).mean()) - 0.2) < 0.02
    assert np.array_equal(keep, draw_keep(np.random.default_rng(3), 200, 8, 16, 0.2))
    assert np.array_equal(draw_keep(np.random.default_rng(3), 2, 8, 4, 0.0), np.ones((2, 8, 4), np.float32))


@pytest.fixture(scope="module")
def tiny_graphs(tmp_path_factory):
    """(model, Monte-Carlo graph) of a tiny QuickNAT with dropout 0.3 (one export: ~10 s of the budget)."""
    import torch
    import onnxruntime  # noqa: F401
    from qnkit.export.mc_dropout import export_mc
    from qnkit.nn.quicknat import QuickNAT, QuickNATConfig

    torch.manual_seed(0)
    model = QuickNAT(QuickNATConfig(num_filters=4, drop_out=0.3)).eval()
    folder = tmp_path_factory.mktemp("mc")
    export_mc(model, folder / "model.mc.onnx", (32, 32))
    return model, folder / "model.mc.onnx"


def test_mc_graph_with_dropout_off_is_the_eval_network_and_samples_match_eager(tiny_graphs):
    """All-ones masks: the eval-mode network (what model.onnx is verified against; export's verify_mc also
    compares with model.onnx itself); drawn masks: eager torch given the same masks."""
    import onnxruntime
    import torch

    model, mc = tiny_graphs
    session = onnxruntime.InferenceSession(str(mc), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((5, 1, 32, 48), dtype=np.float32)
    with torch.no_grad():
        plain = torch.sigmoid(model(torch.from_numpy(x))).numpy()
    ones = np.ones((5, 8, 4), np.float32)
    assert np.abs(session.run(None, {"image": x, "dropout_keep": ones})[0] - plain).max() < 1e-5
    keep = draw_keep(np.random.default_rng(7), 5, 8, 4, 0.3)
    with torch.no_grad():
        eager = torch.sigmoid(model(torch.from_numpy(x), torch.from_numpy(keep))).numpy()
    sampled = session.run(None, {"image": x, "dropout_keep": keep})[0]
    assert np.abs(sampled - eager).max() < 1e-4 and np.abs(sampled - plain).max() > 1e-3


def test_onnxruntime_and_torch_draw_the_same_scores_for_one_seed(tiny_graphs):
    """sample_kidneys through the ONNX Runtime MC graph and through eager torch: same masks, same signals."""
    import torch

    from qnkit.backends.onnxruntime_backend import OnnxRuntimeBackend

    model, mc = tiny_graphs
    ort = OnnxRuntimeBackend(model_path=mc, batch_size=4)

    def eager(x, keep):
        with torch.no_grad():
            return torch.sigmoid(model(torch.from_numpy(x), torch.from_numpy(keep))).numpy()

    rng = np.random.default_rng(0)
    ct = (rng.normal(40, 30, (12, 40, 40))).astype(np.int16)
    ct[3:9, 10:30, 8:20] = 180
    sides = np.zeros(ct.shape, np.uint8)
    sides[3:9, 10:30, 8:20] = 1
    common = dict(samples=4, seed=5, dropout={"sites": 8, "filters": 4, "p": 0.3}, hu_window=(-200.0, 400.0),
                  model_spacing=None, threshold=0.5, pad_multiple=16)
    spacing = (3.0, 1.0, 1.0)
    a = sample_kidneys(ct, sides, spacing, ort.predict, **common)
    b = sample_kidneys(ct, sides, spacing, eager, **common)
    assert a.count == b.count == 4
    # masks are thresholded probabilities; a probability within rounding of 0.5 may flip a voxel
    assert (a.samples != b.samples).mean() < 1e-3 and (a.mirror != b.mirror).mean() < 1e-3
    sa, sb = Q.kidney_signals(sides, ct, spacing, a)["right"], Q.kidney_signals(sides, ct, spacing, b)["right"]
    for name in ("mc_disagreement", "mc_volume_cv", "mirror_disagreement"):
        assert sa[name] == pytest.approx(sb[name], abs=0.02)
    other = sample_kidneys(ct, sides, spacing, eager, **{**common, "seed": 6})
    assert not np.array_equal(other.samples, b.samples) or model.config.drop_out == 0


def _kidney(shape=(40, 60, 70), centre=(20, 30, 30), radii=(14, 16, 11)) -> np.ndarray:
    z, y, x = np.ogrid[tuple(slice(0, n) for n in shape)]
    return (((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
            + ((x - centre[2]) / radii[2]) ** 2 <= 1).astype(np.uint8)


def test_signals_see_a_glued_lump_mixed_tissue_and_an_implausible_volume():
    spacing = (2.5, 2.0, 2.0)
    kidney = _kidney()
    ct = np.where(kidney > 0, 160, 40).astype(np.int16)
    clean = Q.kidney_signals(kidney, ct, spacing)["right"]
    assert clean["second_lump"] == 0 and clean["hu_spread"] == 0 and clean["at_edge"] == 0
    assert 0 <= clean["concavity"] < 0.3
    glued = kidney.copy()
    glued[:, :, :] |= _kidney(centre=(20, 30, 58), radii=(12, 13, 9))  # a lump beside it ...
    glued[18:22, 28:32, 40:50] = 1  # ... joined by a thin bridge
    ct_glued = np.where(glued > kidney, 60, ct).astype(np.int16)
    lumpy = Q.kidney_signals(glued, ct_glued, spacing)["right"]
    assert lumpy["second_lump"] > 0.2 and lumpy["hu_spread"] > clean["hu_spread"] + 50
    assert lumpy["concavity"] > clean["concavity"]
    small = Q.kidney_signals(_kidney(radii=(3, 3, 3)), ct, spacing)["right"]
    assert small["volume_implausibility"] > 1.0 and clean["volume_implausibility"] == 1.0
    edge = Q.kidney_signals(_kidney(centre=(5, 30, 30)), ct, spacing)["right"]
    assert edge["at_edge"] == 1.0
    assert Q.kidney_signals(kidney * 2, ct, spacing)["right"] is None


def test_verdict_names_the_reasons_and_calibration_falls_back_to_the_default():
    limits = {"limits": {"hu_spread": 100.0, "volume_implausibility": 1.0, "at_edge": 0.5}}
    ok = Q.verdict({"hu_spread": 50.0, "volume_implausibility": 1.0, "at_edge": 0.0}, limits)
    assert ok == {"verdict": "ok", "score": 1.0, "reasons": []}
    bad = Q.verdict({"hu_spread": 150.0, "volume_implausibility": 1.0, "at_edge": 1.0}, limits)
    assert bad["verdict"] == "check" and bad["score"] == 2.0
    assert bad["reasons"][0].startswith("touches the volume's edge") and "mixed tissue" in bad["reasons"][1]
    assert "CHECK" in Q.describe_quality({"right": {**bad, "signals": {}}, "left": None})

    class Plain:
        metadata: dict = {}

    class Calibrated:
        metadata = {"quality": limits}

    assert Q.calibration_of(Plain()) == (Q.DEFAULT_CALIBRATION, "default: the bundle records no calibration")
    assert Q.calibration_of(Calibrated()) == (limits, "bundle")


def test_voxel_uncertainty_is_zero_where_all_agree_and_one_where_they_split():
    samples = np.zeros((3, 1, 1, 3), np.uint8)
    samples[:, 0, 0, 0] = 1
    samples[:2, 0, 0, 1] = 1
    mirror = np.array([[[1, 0, 0]]], np.uint8)
    u = KidneySamples(box=(slice(0, 1),) * 3, samples=samples, mirror=mirror, seed=0).voxel_uncertainty()
    assert u[0, 0, 0] == 0 and u[0, 0, 2] == 0 and u[0, 0, 1] == pytest.approx(1.0)


def test_spearman():
    assert Q.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(Q.spearman([1, 2], [2, 1]))

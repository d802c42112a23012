"""Quantisation-aware fine-tuning (qnkit.train.qat): the fake-quantised convolution computes what ONNX Runtime's QDQ
graph computes, on the convolutions export quantises; the checkpoint stays a plain one; `qnkit train --qat` and a
recipe's ``qat`` step run it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def _conv_with_range(low: float, high: float, seed: int = 0):
    from torch import nn

    from qnkit.train.qat import _quantised_forward

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 4, 3, padding=1))  # the first is never quantised
    from qnkit.train.qat import quantisation_aware

    assert quantisation_aware(model) == ["1"]
    conv = model[1]
    assert conv.forward.__func__ is _quantised_forward
    conv.qat_low.fill_(low)
    conv.qat_high.fill_(high)
    conv.qat_out_low.fill_(-1.5)
    conv.qat_out_high.fill_(2.5)
    conv.qat_seen.fill_(1)
    return model.eval(), conv


def _qdq_conv_graph(conv, scale: float, zero: int, out_scale: float, out_zero: int):
    """ONNX: QuantizeLinear/DequantizeLinear of the input (UINT8, per tensor), INT8 per-channel weights, Conv,
    QuantizeLinear/DequantizeLinear of the output (UINT8): what onnxruntime.quantization writes for a Conv."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = conv.weight.detach().double().numpy()
    w_scale = np.abs(w).max(axis=(1, 2, 3)) / 127
    w_q = np.clip(np.rint(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)  # NumPy's reference
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(zero, np.uint8), "x_zero"),
             numpy_helper.from_array(w_q, "w_q"),
             numpy_helper.from_array(w_scale.astype(np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(len(w_scale), np.int8), "w_zero"),
             numpy_helper.from_array(conv.bias.detach().numpy(), "b"),
             numpy_helper.from_array(np.array(out_scale, np.float32), "y_scale"),
             numpy_helper.from_array(np.array(out_zero, np.uint8), "y_zero")]
    nodes = [helper.make_node("QuantizeLinear", ["image", "x_scale", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c", "y_scale", "y_zero"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "y_scale", "y_zero"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("image", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("low, high, shape", [(-0.5, 2.0, (2, 3, 9, 7)), (0.3, 1.7, (1, 3, 5, 5)),
                                              (-3.0, -1.0, (3, 3, 6, 11))])
def test_a_fake_quantised_convolution_computes_what_the_qdq_graph_computes(low, high, shape):
    """Same input range rule (widened to include 0), same rounding, same per-channel weights as ONNX Runtime."""
    import onnxruntime as ort

    from qnkit.train.qat import activation_qparams

    _, conv = _conv_with_range(low, high)
    scale, zero = activation_qparams(torch.tensor(low), torch.tensor(high))
    out_scale, out_zero = activation_qparams(torch.tensor(-1.5), torch.tensor(2.5))
    x = np.random.default_rng(1).uniform(low - 0.5, high + 0.5, shape).astype(np.float32)  # some outside the range
    with torch.no_grad():
        ours = conv(torch.from_numpy(x)).numpy()
    graph = _qdq_conv_graph(conv, float(scale), int(zero), float(out_scale), int(out_zero))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {"image": x})[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    # NumPy's reading of the same 8 bits: the input's codes and the weights' codes, dequantised, convolved in float64
    s, z = float(scale), int(zero)
    assert s == pytest.approx((max(high, 0.0) - min(low, 0.0)) / 255) and (z == 0) == (low >= 0)
    x_deq = (np.clip(np.rint(x.astype(np.float64) / s) + z, 0, 255) - z) * s
    w = conv.weight.detach().double().numpy()
    w_scale = np.abs(w).max(axis=(1, 2, 3), keepdims=True) / 127
    w_deq = np.clip(np.rint(w / w_scale), -127, 127) * w_scale
    conv_out = torch.nn.functional.conv2d(torch.from_numpy(x_deq), torch.from_numpy(w_deq),
                                          conv.bias.detach().double(), padding=1).numpy()
    so, zo = float(out_scale), int(out_zero)
    reference = (np.clip(np.rint(conv_out / so) + zo, 0, 255) - zo) * so
    assert np.mean(np.isclose(ours, reference, atol=1e-4)) > 0.999  # a rounding tie may fall the other way
    assert np.abs(ours - reference).max() <= so * 1.001


@pytest.mark.parametrize("low, high", [(0, 255), (-127, 127)])
def test_fake_quantise_rounds_to_the_codes_and_passes_the_gradient_only_inside(low, high):
    """Against NumPy (round half to even, clip) and PyTorch's own fake quantisation, odd shape, exact ties."""
    from qnkit.train.qat import fake_quantise

    rng = np.random.default_rng(3)
    scale, zero = 0.05, (0 if low < 0 else 17)
    x = rng.uniform((low - zero - 20) * scale, (high - zero + 20) * scale, (3, 5, 7)).astype(np.float32)
    x[0, 0, :4] = (np.array([0.5, 1.5, 2.5, -0.5]) * scale) if low < 0 else (np.array([0.5, 1.5, 2.5, 3.5]) * scale)
    t = torch.from_numpy(x).requires_grad_()
    ours = fake_quantise(t, torch.tensor(scale), torch.tensor(float(zero)), low, high)
    ours.sum().backward()
    codes = np.rint(x.astype(np.float32) / np.float32(scale)) + zero
    np.testing.assert_allclose(ours.detach().numpy(), (np.clip(codes, low, high) - zero) * np.float32(scale),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(t.grad.numpy(), ((codes >= low) & (codes <= high)).astype(np.float32))
    assert 0 < t.grad.sum() < t.numel()  # some inside, some clipped
    theirs = torch.fake_quantize_per_tensor_affine(t.detach(), scale, zero, low, high)
    np.testing.assert_allclose(ours.detach().numpy(), theirs.numpy(), atol=scale * 1.001)  # equal but at ties


def test_the_quantised_convolutions_are_the_ones_export_quantises(tmp_path):
    """qnkit.train.qat's list and export's INT8 candidates name the same convolutions of a 2.5-D QuickNAT."""
    import onnx

    from qnkit.export.int8 import _module_name, candidate_convolutions
    from qnkit.export.onnx_export import export_fp32
    from qnkit.nn.quicknat import QuickNAT, QuickNATConfig
    from qnkit.train.qat import int8_candidates

    model = QuickNAT(QuickNATConfig(num_channels=3, num_filters=4)).eval()
    export_fp32(model, tmp_path / "model.onnx", (32, 32))
    graph = onnx.load(str(tmp_path / "model.onnx"))
    candidates, _ = candidate_convolutions(graph)
    by_name = {node.name: _module_name(node) for node in graph.graph.node if node.op_type == "Conv"}
    assert sorted(by_name[name] for name in candidates) == sorted(int8_candidates(model))


def test_quantisation_aware_keeps_the_checkpoint_freezes_batch_norm_and_tracks_ranges():
    from qnkit.nn.quicknat import QuickNAT, QuickNATConfig
    from qnkit.train.qat import RANGE_MOMENTUM, quantisation_aware

    torch.manual_seed(0)
    model = QuickNAT(QuickNATConfig(num_channels=1, num_filters=4))
    keys = list(model.state_dict())
    names = quantisation_aware(model)
    assert quantisation_aware(model) == names  # twice is once
    assert list(model.state_dict()) == keys and "encoders.0.conv1" not in names and len(names) == 17
    bn = model.encoders[1].batchnorm1
    before = bn.running_mean.clone(), bn.running_var.clone()
    model.train()
    assert not bn.training and model.encoders[1].drop_out.training
    conv = model.encoders[1].conv1
    seen = []
    conv.register_forward_pre_hook(lambda module, args: seen.append((float(args[0].detach().min()),
                                                                     float(args[0].detach().max()))))
    x1, x2 = torch.rand(2, 1, 32, 32), 3 * torch.rand(2, 1, 32, 32)
    model(x1).mean().backward()
    assert (float(conv.qat_low), float(conv.qat_high)) == pytest.approx(seen[0])  # the first batch sets the range
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    model(x2)
    low1, high1 = seen[0]
    assert float(conv.qat_low) == pytest.approx(low1 + RANGE_MOMENTUM * (seen[1][0] - low1))
    assert float(conv.qat_high) == pytest.approx(high1 + RANGE_MOMENTUM * (seen[1][1] - high1))
    assert int(conv.qat_seen) == 2
    model.eval()
    frozen = float(conv.qat_low), float(conv.qat_high)
    with torch.no_grad():
        model(10 * x2)
    assert (float(conv.qat_low), float(conv.qat_high)) == frozen
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])


@pytest.mark.slow
def test_qnkit_train_qat_fine_tunes_from_a_run(synth_dataset_factory, tmp_path, run_qnkit):
    """`qnkit train --init-from RUN --qat`: the run says how its step ran, its checkpoint has the source's keys."""
    from safetensors.torch import load_file

    data = synth_dataset_factory(4, 64, 0)
    common = ("--no-progress", "--device", "cpu", "--seed", "1", "--num-workers", "0", "--min-steps-per-epoch", "0")
    source = tmp_path / "source"
    proc = run_qnkit("train", "--data", data, "--out", source, "--epochs", "1", "--num-filters", "4",
                     "--micro-batch", "4", "--effective-batch", "4", *common)
    assert proc.returncode == 0, proc.stderr
    tuned = tmp_path / "qat"
    proc = run_qnkit("train", "--data", data, "--out", tuned, "--init-from", source, "--qat", "--epochs", "1",
                     "--lr", "1e-4", *common)
    assert proc.returncode == 0, proc.stderr
    assert "quantisation-aware" in proc.stderr
    row = json.loads((tuned / "metrics.jsonl").read_text().splitlines()[-1])
    assert "quantisation-aware" in row["step"] and np.isfinite(row["val_dice"])
    start = load_file(str(source / "checkpoints" / "best" / "model.safetensors"))
    end = load_file(str(tuned / "checkpoints" / "best" / "model.safetensors"))
    assert start.keys() == end.keys()
    assert any(not torch.equal(start[k], end[k]) for k in start if k.endswith("conv1.weight"))
    assert all(torch.equal(start[k], end[k]) for k in start if "running_" in k)  # batch norms frozen


def test_a_recipe_with_qat_fine_tunes_its_best_checkpoint_and_ships_that(tmp_path, monkeypatch):
    """After its phases, `qnkit train --init-from WORK/run --qat` into WORK/run-qat; evaluate and export read
    run-qat; the entry records the QAT step beside the training run's curve."""
    from qnkit.train import recipe as R

    calls = []
    work = tmp_path / "work"

    def fake_qnkit(*args, **kw):
        args = [str(a) for a in args]
        calls.append(args)
        if args[0] == "train":
            out = Path(args[args.index("--out") + 1])
            best = out / "checkpoints" / "best"
            best.mkdir(parents=True, exist_ok=True)
            (best / "meta.json").write_text(json.dumps({"files": {"model.safetensors": out.name}}))
            (out / "metrics.jsonl").write_text(json.dumps({"epoch": int(args[args.index("--epochs") + 1]),
                                                           "val_dice": 0.8, "cpu_hours": 0.1}) + "\n")
        elif args[0] == "evaluate":
            Path(args[args.index("--json") + 1]).write_text(json.dumps(
                {"checkpoint_sha256": {"model.safetensors": Path(args[1]).name}, "mean_dice": 0.9}))
        elif args[0] == "export":
            bundle = Path(args[args.index("--out") + 1])
            bundle.mkdir(parents=True)
            (bundle / "qnkit.json").write_text(json.dumps(
                {"training": {"checkpoint_sha256": {"model.safetensors": Path(args[1]).name}}}))

    monkeypatch.setattr(R, "_qnkit", fake_qnkit)
    monkeypatch.setitem(R.RECIPES, "qat-test", {**{k: v for k, v in R.RECIPES["kidney-synth-7"].items()
                                                   if k != "init_from"},
                                                "phases": [{"epochs": 2}], "qat": {"epochs": 1, "lr": 1e-5}})
    (work / "data").mkdir(parents=True)
    (work / "data" / "kits.json").write_text("[]")
    entry = R.build("qat-test", work, None, None, None)
    train = [c for c in calls if c[0] == "train"]
    assert len(train) == 2 and "--qat" not in train[0] and "--qat" in train[1]
    assert train[1][train[1].index("--init-from") + 1] == str(work / "run")
    assert train[1][train[1].index("--out") + 1] == str(work / "run-qat")
    assert train[1][train[1].index("--lr") + 1] == "1e-05"
    (evaluate,) = [c for c in calls if c[0] == "evaluate"]
    (export,) = [c for c in calls if c[0] == "export"]
    assert evaluate[1] == export[1] == str(work / "run-qat")
    assert entry["training"]["quantisation_aware"]["validation_curve"] == [[1, 0.8]]
    assert entry["training"]["checkpoint_sha256"] == {"model.safetensors": "run-qat"}
    calls.clear()
    R.build("qat-test", work, None, None, None)  # everything done: nothing runs again
    assert calls == []



@pytest.mark.parametrize("qat", [False, True])
def test_export_quantises_the_grid_a_quantisation_aware_checkpoint_learnt(export_reusing_shared_graph, tmp_path,
                                                                           monkeypatch, qat):
    """A checkpoint trained with [TRAINING] qat is quantised without input equalisation (alpha 0), others with
    export's; the bundle's INT8 record says which."""
    import shutil

    from qnkit.export import bundle_writer, int8

    run = tmp_path / "run"
    shutil.copytree(export_reusing_shared_graph[0], run)
    meta_path = run / "checkpoints" / "best" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.setdefault("settings", {}).setdefault("TRAINING", {})["qat"] = qat
    meta_path.write_text(json.dumps(meta))
    shipped = json.loads((export_reusing_shared_graph[1] / "qnkit.json").read_text())["export"]["int8"]
    asked = {}

    def quantised_already(fp32_path, out_path, grid, **kwargs):
        asked.update(kwargs)
        shutil.copyfile(export_reusing_shared_graph[1] / "model.int8.onnx", out_path)
        return dict(shipped)

    monkeypatch.setattr(int8, "quantize_int8", quantised_already)
    bundle_writer.export_bundle(run, tmp_path / "bundle", input_size=(64, 64), int8=True, log=lambda m: None)
    assert asked.get("equalise_alpha", int8.EQUALISE_ALPHA) == (0.0 if qat else int8.EQUALISE_ALPHA)
    record = json.loads((tmp_path / "bundle" / "qnkit.json").read_text())["export"]["int8"]
    assert record["quantisation_aware_checkpoint"] is qat


def test_qat_teacher_trains_towards_the_fp32_networks_own_output(tmp_path):
    """With [TRAINING] qat_teacher the loss's target is the sigmoid of the frozen FP32 teacher on the same batch,
    not the labels; the teacher's weights do not move. Without a teacher the labels are the target."""
    import copy

    from qnkit.train import distributed as dist
    from qnkit.train import solver as S
    from qnkit.train.checkpoint import build_model
    from qnkit.train.runner import network_config
    from qnkit.train.settings import load_settings

    settings = load_settings(None)
    for key, value in (("qat", True), ("qat_teacher", True), ("micro_batch", 4), ("effective_batch", 4)):
        settings.set("TRAINING", key, value, "test")
    settings.set("NETWORK", "num_filters", 4, "test")
    settings.validate("test")
    torch.manual_seed(0)
    model = build_model(network_config(settings).to_dict())
    teacher = copy.deepcopy(model)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 32, 32, generator=g)
    labels = (torch.rand(4, 1, 32, 32, generator=g) > 0.8).float()
    batches = [(x, labels, torch.ones_like(labels), torch.zeros(4, dtype=torch.long))]
    for with_teacher in (True, False):
        solver = S.Solver(copy.deepcopy(model), settings, device=torch.device("cpu"), info=dist.DistInfo(),
                          run_dir=tmp_path, meta={}, teacher=teacher if with_teacher else None)
        targets = []
        loss_fn = solver.loss_fn
        solver.loss_fn = lambda logits, y, w: (targets.append(y.detach().clone()), loss_fn(logits, y, w))[1]
        solver.train_epoch(batches, 1, 1)
        if with_teacher:
            with torch.no_grad():
                expected = torch.sigmoid(teacher.eval()(x).float())
            torch.testing.assert_close(targets[0], expected)
            assert "towards the FP32 network" in S.describe_step(solver)
        else:
            assert torch.equal(targets[0], labels)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_qat_teacher_needs_qat_and_a_source(tmp_path):
    from qnkit.errors import QnkitInputError
    from qnkit.train.runner import qat_teacher
    from qnkit.train.settings import load_settings

    with pytest.raises(QnkitInputError, match="qat_teacher"):
        load_settings(None, {("TRAINING", "qat_teacher"): True})
    with pytest.raises(QnkitInputError, match="--init-from"):
        qat_teacher(None, None)


@pytest.mark.parametrize("teacher", [False, True])
def test_a_recipes_qat_teacher_reaches_qnkit_train(tmp_path, monkeypatch, teacher):
    from qnkit.train import recipe as R

    calls = []
    monkeypatch.setattr(R, "_qnkit", lambda *args, **kw: calls.append([str(a) for a in args]))
    recipe = {"settings": "shipped-context", "step": ["--amp"], "qat": {"epochs": 1, "lr": 1e-5, "teacher": teacher}}
    R.qat_phase(recipe, tmp_path / "data", tmp_path / "run", tmp_path / "run-qat")
    (train,) = calls
    assert "--qat" in train and ("--qat-teacher" in train) == teacher and "--amp" in train

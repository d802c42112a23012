"""The INT8 graph's own steps (qnkit.export.int8): input equalisation that leaves the FP32 function unchanged, and
the forward selection that keeps the most arithmetic in INT8 for the least loss of mask agreement."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def _block_graph(shared_scale: bool = False):
    """image (1, 3, H, W) -> Mul(scale) -> Add(shift) -> LeakyRelu -> Conv 3->4 (3x3): a folded BN, PReLU, conv.

    ``shared_scale``: the scale constant also feeds a second Mul (an output), so the chain is not the conv's alone.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([0.05, 1.0, 4.0], np.float32).reshape(1, 3, 1, 1), "scale"),
             numpy_helper.from_array(rng.standard_normal((1, 3, 1, 1)).astype(np.float32), "shift"),
             numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")]
    nodes = [helper.make_node("Mul", ["image", "scale"], ["m"], name="bn_mul"),
             helper.make_node("Add", ["m", "shift"], ["a"], name="bn_add"),
             helper.make_node("LeakyRelu", ["a"], ["r"], alpha=0.25, name="prelu"),
             helper.make_node("Conv", ["r", "w", "b"], ["y"], pads=[1, 1, 1, 1], name="conv")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if shared_scale:
        nodes.append(helper.make_node("Mul", ["image", "scale"], ["z"], name="other"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                             [None, 3, None, None])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x})


def test_equalised_inputs_leave_the_function_and_even_out_the_channels():
    from onnx import numpy_helper

    from qnkit.export.int8 import equalise_inputs

    x = np.random.default_rng(1).uniform(-1, 3, (2, 3, 8, 8)).astype(np.float32)
    model = _block_graph()
    equalised, done = equalise_inputs(model, {"conv"}, [x], alpha=0.5)
    assert done == ["conv"]
    np.testing.assert_allclose(_run(equalised, x)[0], _run(model, x)[0], rtol=1e-5, atol=1e-5)
    before = np.abs(_run(_with_output(model, "r"), x)[1]).max(axis=(0, 2, 3))
    after = np.abs(_run(_with_output(equalised, "r"), x)[1]).max(axis=(0, 2, 3))
    # alpha 0.5: each channel's range moves half way (in log) towards the largest
    np.testing.assert_allclose(after, before * np.sqrt(before.max() / before), rtol=1e-4)
    assert after.max() / after.min() < before.max() / before.min()
    weights = {i.name: numpy_helper.to_array(i) for i in equalised.graph.initializer}
    assert not np.allclose(weights["w"], numpy_helper.to_array(model.graph.initializer[2]))


def test_equalisation_leaves_a_chain_it_does_not_own():
    from qnkit.export.int8 import equalise_inputs

    x = np.random.default_rng(2).uniform(-1, 3, (1, 3, 8, 8)).astype(np.float32)
    model = _block_graph(shared_scale=True)
    equalised, done = equalise_inputs(model, {"conv"}, [x])
    assert done == [] and equalised.SerializeToString() == model.SerializeToString()


def _with_output(model, tensor: str):
    import onnx

    copy = onnx.ModelProto.FromString(model.SerializeToString())
    copy.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    return copy


class _FakeQuantiser:
    """Writes the node set it was asked for; the fake agreement reads it back."""

    def __init__(self, workdir: Path):
        self.workdir = workdir

    def quantise(self, out_path: Path, nodes, calibration) -> Path:
        Path(out_path).write_text(",".join(nodes))
        return Path(out_path)


class _FakeAgreement:
    """Mask Dice = 1 - the summed damage of the INT8 nodes; the worst case loses 1.5 times as much."""

    def __init__(self, damage: dict[str, float]):
        self.damage = damage

    def dice(self, path: Path) -> tuple[float, float]:
        nodes = [n for n in Path(path).read_text().split(",") if n]
        loss = sum(self.damage[n] for n in nodes)
        return 1.0 - loss, 1.0 - 1.5 * loss


def test_forward_selection_keeps_the_most_flops_for_the_least_damage(tmp_path):
    from qnkit.export.int8 import sensitivity_search

    damage = {"big_cheap": 0.001, "big_costly": 0.004, "small_cheap": 0.0004, "small_costly": 0.003}
    flops = {"big_cheap": 500, "big_costly": 400, "small_cheap": 50, "small_costly": 50}
    found = sensitivity_search(_FakeQuantiser(tmp_path), _FakeAgreement(damage), list(damage), flops, ("c",),
                               target=0.995, case_floor=0.99)
    assert {row["node"]: row["dice_alone"] for row in found["table"]} == pytest.approx(
        {n: 1 - d for n, d in damage.items()})
    # most FLOPs per loss first: big_cheap (500k), small_cheap (125k), big_costly (100k), small_costly (17k)
    assert [step["node"] for step in found["steps"]] == ["big_cheap", "small_cheap", "big_costly", "small_costly"]
    # + big_costly loses 0.0054 in all (0.9946 < 0.995): left in float; small_costly still fits after it (0.9956)
    assert [step["accepted"] for step in found["steps"]] == [True, True, False, True]
    assert found["quantised"] == ["big_cheap", "small_cheap", "small_costly"]  # in the graph's order
    assert found["dice"] == pytest.approx(0.9956) and found["worst_case_dice"] == pytest.approx(1 - 1.5 * 0.0044)
    assert found["steps"][2]["int8_flops_share"] == pytest.approx(950 / 1000)


def test_forward_selection_honours_the_worst_case_floor(tmp_path):
    from qnkit.export.int8 import sensitivity_search

    damage = {"a": 0.004, "b": 0.004}
    found = sensitivity_search(_FakeQuantiser(tmp_path), _FakeAgreement(damage), ["a", "b"], {"a": 2, "b": 1},
                               ("c",), target=0.99, case_floor=0.99)
    # a alone: pooled 0.996, worst 0.994 -> kept; a + b: pooled 0.992 >= 0.99 but worst 0.988 < 0.99 -> b in float
    assert found["quantised"] == ["a"] and [s["accepted"] for s in found["steps"]] == [True, False]

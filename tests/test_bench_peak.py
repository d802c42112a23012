"""A floor for the network: FLOPs per slice counted from the ONNX graph, the measured GEMM peak, and the
bench's GFLOP/s and % of peak columns derived from them (no speed is asserted: only the relations)."""
import json

import numpy as np
import pytest

from qnkit.cli import main


def _conv_gemm_graph(quantised_weight: bool = False) -> bytes:
    """image (1, 3, H, W) -> Conv 3->8, 3x3, pad 1 -> ReduceMean over H, W -> Gemm 8->5 (transB)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], [numpy_helper.from_array(rng.standard_normal((5, 8)).astype(np.float32), "fc")]
    if quantised_weight:  # QDQ: the weight is an INT8 constant read through a DequantizeLinear
        inits += [numpy_helper.from_array(rng.integers(-127, 128, (8, 3, 3, 3)).astype(np.int8), "w_q"),
                  numpy_helper.from_array(np.float32(0.01), "w_scale")]
        nodes.append(helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"]))
    else:
        inits.append(numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"))
    nodes += [helper.make_node("Conv", ["image", "w"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("ReduceMean", ["c"], ["m"], axes=[2, 3], keepdims=0),
              helper.make_node("Gemm", ["m", "fc"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.parametrize("quantised", [False, True])
def test_network_flops_are_twice_the_multiply_accumulates(quantised):
    from qnkit.benchmarks.peak import network_flops

    counted = network_flops(_conv_gemm_graph(quantised), (12, 20), channels=3)
    conv = 2 * (8 * 12 * 20) * (3 * 3 * 3)  # each output element: 3 input channels x 3x3
    gemm = 2 * 5 * 8
    assert counted["by_op"] == {"Conv": conv, "Gemm": gemm} and counted["flops_per_slice"] == conv + gemm
    assert counted["nodes"] == 2 and counted["uncounted"] == []
    assert counted["int8_flops_share"] == pytest.approx(conv / (conv + gemm) if quantised else 0.0)


def test_network_flops_match_pytorchs_counter_on_quicknat(shared_bundle):
    """The ONNX count of the shared bundle's graphs equals PyTorch's FLOP counter on the eager network."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from qnkit.benchmarks.peak import network_flops
    from qnkit.bundle import load_bundle
    from qnkit.nn.quicknat import QuickNAT

    bundle = load_bundle(shared_bundle[1])
    model = QuickNAT(bundle.network).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 1, *bundle.input_size))
    fp32 = network_flops(bundle.read("model.onnx"), bundle.input_size)
    int8 = network_flops(bundle.read("model.int8.onnx"), bundle.input_size)
    assert fp32["flops_per_slice"] == counter.get_total_flops() == int8["flops_per_slice"]
    assert fp32["int8_flops_share"] == 0.0 and 0.0 < int8["int8_flops_share"] < 1.0


def test_measure_peak_reports_its_best_source():
    from qnkit.benchmarks.peak import measure_peak

    for precision in ("fp32", "int8"):
        peak = measure_peak(precision, threads=1, side=64, repeats=1)
        assert peak["threads"] == 1 and peak["side"] == 64 and peak["precision"] == precision
        rates = {name: source["gflop_per_s"] for name, source in peak["sources"].items()}
        assert all(rate > 0 for rate in rates.values()) and peak["best"] == max(rates, key=rates.get)
        assert peak["gflop_per_s"] == rates[peak["best"]]
        assert any(name.startswith("onnxruntime") for name in rates)
    with pytest.raises(ValueError):
        measure_peak("fp16")


def test_quick_bench_gflops_and_percent_of_peak_follow_from_the_rows(shared_bundle, tmp_path, capsys):
    """GFLOP/s = FLOPs per slice x slices/s; % of peak = that / the measured peak of the row's data type (CPU)."""
    report_path = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--quick", "--only", "backends", "--model", str(shared_bundle[1]), "--json", str(report_path),
              "--workdir", str(tmp_path / "work")])
    assert exit_info.value.code in (0, None)
    report = json.loads(report_path.read_text())
    floor = report["network_floor"]
    flops = {precision: record["flops_per_slice"] for precision, record in floor["flops"].items()}
    assert flops["fp32"] > 0 and flops["int8"] == flops["fp32"]  # the same network, whatever it runs in
    assert set(floor["peak"]) == {"fp32", "int8"}
    for peak in floor["peak"].values():
        assert peak["gflop_per_s"] == max(source["gflop_per_s"] for source in peak["sources"].values()) > 0
    rows = [row for row in report["backends"] if "error" not in row]
    assert {row["precision"] for row in rows} >= {"fp32", "int8"}
    for row in rows:
        assert row["flops_per_slice"] == flops.get(row["precision"], flops["fp32"])  # FP16: the FP32 graph's count
        assert row["gflop_per_s"] == pytest.approx(row["flops_per_slice"] * row["slices_per_s"] / 1e9)
        assert row["slices_per_s"] == pytest.approx(row["batch"] / row["seconds"]["median_s"])
        if row["device"] == "cpu" and row["precision"] in ("fp32", "int8"):
            peak = floor["peak"][row["precision"]]["gflop_per_s"]
            assert row["peak_gflop_per_s"] == peak
            assert row["percent_of_peak"] == pytest.approx(100 * row["gflop_per_s"] / peak)
        else:
            assert row["percent_of_peak"] is None
    out = capsys.readouterr().out
    assert "GFLOP/s" in out and "% of peak" in out and "FP32 peak:" in out and "INT8 peak:" in out

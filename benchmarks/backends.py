"""Backend rows of `qnkit bench`: slices per second per backend and batch size, against eager FP32.

Every backend runs the same preprocessed synthetic slices, after warm-up, as the median of
repeated timings; its speed is also given as a ratio to the eager FP32 model measured in the same
run on the same device, and its masks are compared with those of eager FP32 on the CPU (Dice
agreement). With an untrained bundle the
agreement figures are flagged as not meaningful (speed does not depend on the weights).

Each row also gives the network's achieved GFLOP/s (the FLOPs of one forward pass on the bench's grid,
counted from the ONNX graph, times slices/s) and, on the CPU, that as a percentage of the machine's
measured GEMM peak for the row's data type on the same threads (:mod:`qnkit.benchmarks.peak`): FP32 rows
against an FP32 matrix product, INT8 rows against an INT8 one. FP16 on the CPU and GPU rows get GFLOP/s
without a peak.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from qnkit import kernels
from qnkit.benchmarks.timing import measure
from qnkit.bundle import FP16_ONNX, FP32_ONNX, INT8_ONNX, Bundle, load_bundle


@dataclass(frozen=True)
class BackendConfig:
    kind: str
    precision: str
    device: str
    options: tuple = ()

    @property
    def label(self) -> str:
        extra = "".join(f" +{k}" for k, v in self.options if v)
        return f"{self.kind} {self.precision} {self.device}{extra}"


def random_weight_bundle(workdir: Path, *, num_filters: int = 64, input_size=(256, 256), fp16: bool = True,
                         log=print) -> Bundle:
    """A bundle of a randomly initialised QuickNAT (FP32, INT8 and, with `fp16`, FP16 ONNX), for speed figures only.

    Its INT8 graph is calibrated on 2 slices, not 24 (the export then peaks at 2.9 GB), and the export checks
    the graphs in batches of 4, not 16: the speed of a graph does not depend on its scales, and ONNX Runtime's calibration
    holds every activation of every calibration slice (over 6 GB for 24 slices of the full-size
    network) as eager FP32 does for a batch of 16 (the bench peaked at 6.9 GB): either would break
    the default bench's 4 GB budget.
    """
    import torch

    from qnkit.export.bundle_writer import export_bundle
    from qnkit.nn.quicknat import QuickNAT, QuickNATConfig
    from qnkit.train import checkpoint

    torch.manual_seed(0)
    config = QuickNATConfig(num_filters=num_filters)
    model = QuickNAT(config).eval()
    run = workdir / "random-run"
    checkpoint.save(run, "best", model, {"network": config.to_dict(), "epoch": 0, "metrics": {},
                                          "preprocessing": {"hu_lo": -200.0, "hu_hi": 400.0, "threshold": 0.5}})
    out = workdir / "random-bundle"
    export_bundle(run, out, fp16=fp16, int8=True, input_size=tuple(input_size), force=True, calibration_slices=2,
                  verify_batch_size=4, log=log)
    return load_bundle(out)


def configs_for(bundle: Bundle, gpu: bool, tensorrt: bool) -> list[BackendConfig]:
    """Every backend configuration this machine can run for this bundle; eager FP32 CPU first."""
    rows = [BackendConfig("torch", "fp32", "cpu"), BackendConfig("onnxruntime", "fp32", "cpu")]
    if bundle.has(FP16_ONNX):
        rows.append(BackendConfig("onnxruntime", "fp16", "cpu"))
    if bundle.has(INT8_ONNX):
        rows.append(BackendConfig("onnxruntime", "int8", "cpu"))
    # ONNX Runtime's CPU sessions as they ran before calls side by side, beside them
    rows += [BackendConfig("onnxruntime", row.precision, "cpu", (("one_call_all_threads", True),))
             for row in rows if row.kind == "onnxruntime" and row.precision in ("fp32", "int8")]
    if gpu:
        rows += [BackendConfig("torch", "fp32", "cuda:0"), BackendConfig("torch", "fp16", "cuda:0"),
                 BackendConfig("torch", "bf16", "cuda:0"),
                 BackendConfig("torch", "fp16", "cuda:0", (("cuda_graphs", True),))]
        from qnkit.backends.onnxruntime_backend import gpu_providers

        if gpu_providers():
            rows.append(BackendConfig("onnxruntime", "fp32", "cuda:0", (("tensorrt_ep", False),)))
            if bundle.has(FP16_ONNX):
                rows.append(BackendConfig("onnxruntime", "fp16", "cuda:0", (("tensorrt_ep", False),)))
        if tensorrt:
            rows.append(BackendConfig("tensorrt", "fp16", "cuda:0"))
    return rows


def bench_slices(bundle: Bundle, count: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """`count` preprocessed slices around synthetic kidneys (with labels), on the bundle's grid."""
    from qnkit.inference import model_context
    from qnkit.verification import synthetic_slices

    x, labels = synthetic_slices(bundle.input_size, bundle.hu_window, cases=2, per_case=max(1, count // 2),
                                 context=model_context(bundle))
    reps = -(-count // len(x))
    return np.ascontiguousarray(np.tile(x, (reps, 1, 1, 1))[:count]), np.tile(labels, (reps, 1, 1, 1))[:count]


def measure_config(bundle_path: str, config: dict, batch_sizes, repeats: int, masks_out: str) -> dict:
    """Open one backend, save its masks on the bench slices (for agreement) and time each batch size."""
    from qnkit.backends import open_backend

    bundle = load_bundle(bundle_path)
    x, _ = bench_slices(bundle, max(batch_sizes))
    backend = open_backend(bundle, config["kind"], precision=config["precision"], device=config["device"],
                           batch_size=max(batch_sizes), log=lambda *a: None, **dict(config["options"]))
    with backend:
        np.save(masks_out, (backend.predict(x) > bundle.threshold).astype(np.uint8))
        timings = {}
        for batch in batch_sizes:
            backend.batch_size = batch
            chunk = x[:batch]
            timings[batch] = measure(lambda: backend.predict(chunk), repeats=repeats, warmup=1).as_dict()
        return {"timings": timings, "describe": backend.describe()}


def _in_subprocess(bundle: Bundle, config: BackendConfig, batch_sizes, repeats: int, masks_out: Path) -> dict:
    """measure_config in a fresh interpreter: each backend gets the machine (memory, thread pools) to itself."""
    import json
    import subprocess
    import sys

    job = {"bundle": str(bundle.path), "config": {"kind": config.kind, "precision": config.precision,
                                                  "device": config.device, "options": list(config.options)},
           "batch_sizes": list(batch_sizes), "repeats": repeats, "masks_out": str(masks_out)}
    proc = subprocess.run([sys.executable, "-m", "qnkit.benchmarks.backends"], input=json.dumps(job),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"worker exited with {proc.returncode}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["timings"] = {int(k): v for k, v in result["timings"].items()}
    return result


def network_floor(bundle: Bundle, *, progress: Callable[[str], None] | None = None) -> dict:
    """The FLOPs of one slice on the bench's grid (FP32 graph, and the INT8 graph's share in INT8) and the
    measured GEMM peak of FP32 and, when the bundle has an INT8 graph, INT8, on the backends' threads."""
    from qnkit.benchmarks import peak

    channels = bundle.input_planes
    flops = {"fp32": peak.network_flops(bundle.read(FP32_ONNX), bundle.input_size, channels)}
    precisions = ["fp32"]
    if bundle.has(INT8_ONNX):
        flops["int8"] = peak.network_flops(bundle.read(INT8_ONNX), bundle.input_size, channels)
        precisions.append("int8")
    peaks = {}
    for precision in precisions:
        if progress:
            progress(f"measuring the {precision.upper()} GEMM peak")
        peaks[precision] = peak.measure_peak(precision)
    return {"flops": flops, "peak": peaks}


def _with_floor(row: dict, floor: dict) -> dict:
    """`row` with its GFLOP/s and, where a peak of its data type on its device was measured, % of that peak."""
    from qnkit.benchmarks.peak import achieved

    flops = floor["flops"].get(row["precision"], floor["flops"]["fp32"])["flops_per_slice"]
    peak = floor["peak"].get(row["precision"]) if row["device"] == "cpu" else None
    gflop_per_s, percent = achieved(flops, row["slices_per_s"], peak["gflop_per_s"] if peak else None)
    return {**row, "flops_per_slice": flops, "gflop_per_s": gflop_per_s,
            "peak_gflop_per_s": peak["gflop_per_s"] if peak else None, "percent_of_peak": percent}


def run(bundle: Bundle, *, batch_sizes=(1, 4, 16, 32), repeats: int = 3, trained: bool = True,
        gpu: bool = False, tensorrt: bool = False, progress: Callable[[str], None] | None = None,
        log=print, floor: dict | None = None) -> list[dict]:
    """One row per (backend, batch size) with slices/s, speed-up over eager FP32, mask agreement, and the
    network's GFLOP/s with its % of the measured peak (:func:`network_floor`, written into `floor` when given).

    Each backend runs in its own process, one after the other, on the same slices.
    """
    measured_floor = network_floor(bundle, progress=progress)
    if floor is not None:
        floor.update(measured_floor)
    rows, eager_rate, eager_masks = [], {}, None
    with tempfile.TemporaryDirectory(prefix="qnkit-bench-masks-") as tmp:
        for i, config in enumerate(configs_for(bundle, gpu, tensorrt)):
            if progress:
                progress(f"{config.label}, batch sizes {', '.join(map(str, batch_sizes))}")
            masks_path = Path(tmp) / f"masks_{i}.npy"
            result = _in_subprocess(bundle, config, batch_sizes, repeats, masks_path)
            if "error" in result:
                rows.append({"backend": config.label, "error": result["error"]})
                continue
            masks = np.load(masks_path)
            if eager_masks is None:
                eager_masks = masks
            agreement = kernels.dice(masks, eager_masks, smooth=1.0)
            for batch in batch_sizes:
                timing = result["timings"][batch]
                rate = batch / timing["median_s"]
                # The baseline is eager FP32 on the same device: the CPU for CPU rows, the GPU for GPU rows.
                if config.kind == "torch" and config.precision == "fp32" and not config.options:
                    eager_rate[config.device, batch] = rate
                baseline = eager_rate.get((config.device, batch))
                rows.append(_with_floor({
                    "backend": config.label, "kind": config.kind, "precision": config.precision,
                    "device": config.device, "batch": batch, "seconds": timing, "slices_per_s": rate,
                    "speedup_vs_eager_fp32": rate / baseline if baseline else None,
                    "dice_agreement_vs_eager": agreement, "agreement_meaningful": trained,
                    "describe": result["describe"],
                }, measured_floor))
    return rows


def open_or_make_bundle(model: Path | None, workdir: Path | None = None, *, quick: bool = False, fp16: bool = True,
                        log=print) -> tuple[Bundle, bool]:
    """The given bundle (trained), or a random-weight full-size one made in `workdir` (untrained); its FP16
    graph (the GPU's: ONNX Runtime runs FP16 on a CPU by casting, far slower than FP32) only with `fp16`."""
    if model is not None:
        bundle = load_bundle(model)
        trained = bool((bundle.metadata.get("training") or {}).get("metrics"))
        return bundle, trained
    workdir = Path(workdir or tempfile.mkdtemp(prefix="qnkit-bench-"))
    if quick:
        return random_weight_bundle(workdir, num_filters=4, input_size=(64, 64), fp16=fp16, log=log), False
    return random_weight_bundle(workdir, fp16=fp16, log=log), False


def _worker() -> None:
    """`python -m qnkit.benchmarks.backends`: one measure_config job as JSON on stdin, result on stdout."""
    import json
    import sys

    job = json.loads(sys.stdin.read())
    result = measure_config(job["bundle"], job["config"], job["batch_sizes"], job["repeats"], job["masks_out"])
    print(json.dumps(result))


if __name__ == "__main__":
    _worker()

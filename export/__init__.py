"""qnkit.export: QuickNAT checkpoint -> verified model bundle (ONNX FP32/FP16/INT8, TensorRT engine).

Entry point: :func:`qnkit.export.bundle_writer.export_bundle` (behind ``qnkit export``). Needs torch
and onnx; the bundle it writes is read by the torch-free :mod:`qnkit.bundle` and :mod:`qnkit.backends`.
"""

#!/usr/bin/env bash
# The GPU checks of a session lent an NVIDIA machine (the `device` tool), as one prepared command:
# GPU correctness of the torch backend (tests/test_backends_gpu.py: FP32/FP16/CUDA graphs against the CPU),
# then `qnkit bench --only e2e` with its GPU rows (eager FP32, FP16 + CUDA graphs, TensorRT FP16 where
# installed, each against eager FP32 on that GPU, end to end on the same whole CT). Results land in $OUT.
#
# That machine has PyTorch, Cython, SciPy, Typer, Rich, ONNX Runtime and safetensors but not nibabel or cc3d,
# and reaches no package index: carry their wheels (Python 3.12), made here once with
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     nibabel connected-components-3d isal                 # about 8.5 MB
# then: run(command="bash benchmarks/gpu_session.sh", carry=[".whl", ".gpukits"], timeout_s=560).
set -uo pipefail
OUT=${OUT:-/tmp/qnkit-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
# A stand-in for the KiTS19 label folder: the one case the bench's whole CT draws (case_00106) and empty
# placeholders for the rest, so the generator's draw, and so the CT, is byte-identical to the CPU runs'
# (made here with benchmarks/gpu_kits_stub.sh; carry it as .gpukits).
[ -d .gpukits ] && export QNKIT_KITS_LABELS="$PWD/.gpukits"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
ls /dev/nvidia* >> "$OUT/gpu.txt" 2>&1
# qnkit itself, editable as in CI (kernels compiled there; train/, export/, benchmarks/ mapped into qnkit)
python3 -m pip install --no-deps --no-build-isolation --no-index -e . > "$OUT/build.log" 2>&1 \
  || { tail -20 "$OUT/build.log"; exit 1; }
timeout 120 python3 -m pytest -q -rs tests/test_backends_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
# Three timed runs per path: the median leaves out the first, which captures the coarse pass's CUDA graphs.
timeout 220 python3 -m qnkit bench --only e2e --memory-slices 0 --repeats 3 --json "$OUT/bench_gpu.json" 2>&1 \
  | tee "$OUT/bench_gpu.log" | tail -40
# Per-batch backend rows (FP32, FP16 and BF16 eager, FP16 + CUDA graphs) of a full-size random-weight QuickNAT.
timeout 150 python3 -m qnkit bench --only backends --batch-sizes 1,4,16,32 --json "$OUT/bench_backends.json" 2>&1 \
  | tee "$OUT/bench_backends.log" | tail -40

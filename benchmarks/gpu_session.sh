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
# then: run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=540). The 210 KiTS19 label maps
# (65 MB) exceed what travels, so the whole CT there has the atlas's own kidneys: every row of that run is on
# that one CT, but it is not the CT of the CPU figures in the README.
set -uo pipefail
OUT=${OUT:-/tmp/qnkit-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# qnkit itself, editable as in CI (kernels compiled there; train/, export/, benchmarks/ mapped into qnkit)
python3 -m pip install --no-deps --no-build-isolation --no-index -e . > "$OUT/build.log" 2>&1 \
  || { tail -20 "$OUT/build.log"; exit 1; }
timeout 240 python3 -m pytest -q -x tests/test_backends_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
timeout 280 python3 -m qnkit bench --only e2e --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log" | tail -40

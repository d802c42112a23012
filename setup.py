"""Build qnkit's Cython kernels (csrc/) and map train/, export/, benchmarks/ into the qnkit package.

Metadata lives in pyproject.toml; this file only describes what needs code: the extension
modules and the package layout of SPEC section 3.
"""
import os
import platform
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _openmp_flags():
    """OpenMP where the compiler has it (gcc/clang on Linux); kernels stay correct without it."""
    if os.environ.get("QNKIT_NO_OPENMP") or sys.platform == "darwin" or sys.platform == "win32":
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


def _avx2_flags():
    """Flags for a second build of every kernel with AVX2 (x86-64 only), chosen at import time by CPU."""
    if os.environ.get("QNKIT_NO_AVX2") or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if sys.platform == "win32":
        return ["/arch:AVX2"]
    return ["-mavx2", "-mfma", "-mf16c", "-mpopcnt"]


def _avx512_flags(avx2):
    """A third build for CPUs with AVX-512 (BW, VL, DQ) and BMI2; the row kernels use them where they pay."""
    if avx2 is None or os.environ.get("QNKIT_NO_AVX512") or sys.platform == "win32":
        return None
    return avx2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mbmi2"]


compile_omp, link_omp = _openmp_flags()
# -ffp-contract=off keeps float rounding identical to the NumPy references (no fused multiply-add).
compile_args = ["-O3", "-ffp-contract=off"] + compile_omp
avx2 = _avx2_flags()
avx512 = _avx512_flags(avx2)


def _extension(name, extra=()):
    return Extension(
        f"qnkit._{name}",
        [f"csrc/_{name}.pyx"],
        include_dirs=[np.get_include(), "csrc"],
        depends=["csrc/qn_rows.h"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=compile_args + list(extra),
        extra_link_args=link_omp,
    )


extensions = []
for name in ("preprocess", "metrics", "resample"):
    extensions.append(_extension(name))
    if avx2 is not None:
        extensions.append(_extension(f"{name}_avx2", avx2))
    if avx512 is not None:
        extensions.append(_extension(f"{name}_avx512", avx512))


class ParallelBuildExt(build_ext):
    """Compile the kernels' nine extensions side by side (one job per core unless ``-j`` says otherwise)."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:
            self.parallel = os.cpu_count() or 1


setup(
    cmdclass={"build_ext": ParallelBuildExt},
    packages=["qnkit", "qnkit.synth", "qnkit.models", "qnkit.nn", "qnkit.commands", "qnkit.backends", "qnkit.train", "qnkit.export", "qnkit.benchmarks"],
    package_dir={
        "qnkit": "qnkit",
        "qnkit.train": "train",
        "qnkit.export": "export",
        "qnkit.benchmarks": "benchmarks",
    },
    package_data={"qnkit.train": ["*.ini"], "qnkit.synth": ["data/*"],
                  "qnkit.models": ["registry.json", "*/*.json", "*/*.onnx", "*/*.safetensors"]},
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
    zip_safe=False,
)

"""Build qnkit's Cython kernels (csrc/) and map train/, export/, benchmarks/ into the qnkit package.

Metadata lives in pyproject.toml; this file only describes what needs code: the extension
modules and the package layout of SPEC section 3.

The build backend (setuptools.build_meta) runs this file as ``__main__``; tests import it under another
name to read PACKAGE_FOLDERS, PACKAGE_DATA and discover_packages() without building anything.
"""
import os
import platform
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

# Import name -> folder in the checkout. The runtime is qnkit/; training, export and the benchmarks sit at
# the top level of the checkout (SPEC section 3) and are installed inside the qnkit package, so
# `import qnkit.train.solver` is the file train/solver.py. Sub-packages (folders with an __init__.py) of
# any of these folders are found by discover_packages(); no package is listed by hand.
PACKAGE_FOLDERS = {
    "qnkit": "qnkit",
    "qnkit.train": "train",
    "qnkit.export": "export",
    "qnkit.benchmarks": "benchmarks",
}

# Files other than Python modules that the installed package reads at run time (globs relative to each
# package's folder). tests/test_packaging.py checks that every such file in the checkout is matched.
PACKAGE_DATA = {
    "qnkit.train": ["*.ini"],  # training settings (train/local.ini, shipped.ini, ...)
    "qnkit.synth": ["data/*"],  # the phantom generator's abdomen atlas
    # shipped models: the registry and each bundle folder qnkit/models/<name>/ as `qnkit export` writes it
    "qnkit.models": ["registry.json", "*/*.json", "*/*.onnx", "*/*.safetensors"],
}


def discover_packages(root: str = ".") -> list[str]:
    """Every import package of the distribution: each folder of PACKAGE_FOLDERS and its sub-packages."""
    packages = []
    for import_name, folder in PACKAGE_FOLDERS.items():
        packages.append(import_name)
        packages += [f"{import_name}.{sub}" for sub in find_packages(os.path.join(root, folder))]
    return sorted(packages)


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


def kernel_extensions():
    """The Cython kernels: each of preprocess, metrics, resample, layout built plain, with AVX2 and with AVX-512.

    numpy and Cython are build requirements (pyproject.toml), imported here so that reading the package
    layout above needs neither.
    """
    import numpy as np
    from Cython.Build import cythonize

    compile_omp, link_omp = _openmp_flags()
    # -ffp-contract=off keeps float rounding identical to the NumPy references (no fused multiply-add).
    compile_args = ["-O3", "-ffp-contract=off"] + compile_omp
    avx2 = _avx2_flags()
    avx512 = _avx512_flags(avx2)

    def extension(name, extra=()):
        return Extension(
            f"qnkit._{name}",
            [f"csrc/_{name}.pyx"],
            include_dirs=[np.get_include(), "csrc"],
            depends=["csrc/qn_rows.h", "csrc/qn_transpose.h"],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            extra_compile_args=compile_args + list(extra),
            extra_link_args=link_omp,
        )

    extensions = []
    for name in ("preprocess", "metrics", "resample", "layout"):
        extensions.append(extension(name))
        if avx2 is not None:
            extensions.append(extension(f"{name}_avx2", avx2))
        if avx512 is not None:
            extensions.append(extension(f"{name}_avx512", avx512))
    return cythonize(
        extensions,
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )


class ParallelBuildExt(build_ext):
    """Compile the kernels' twelve extensions side by side (one job per core unless ``-j`` says otherwise)."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:
            self.parallel = os.cpu_count() or 1


if __name__ == "__main__":
    setup(
        cmdclass={"build_ext": ParallelBuildExt},
        packages=discover_packages(os.path.dirname(os.path.abspath(__file__))),
        package_dir=PACKAGE_FOLDERS,
        package_data=PACKAGE_DATA,
        ext_modules=kernel_extensions(),
        zip_safe=False,
    )

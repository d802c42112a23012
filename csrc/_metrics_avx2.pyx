# cython: language_level=3
# The same kernels compiled for AVX2 (see setup.py); qnkit.kernels loads this build when the CPU has AVX2.
include "_metrics.pyx"

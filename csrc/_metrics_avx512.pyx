# cython: language_level=3
# The same kernels compiled for AVX-512 (F, BW, VL, DQ) with BMI2 (see setup.py); qnkit.kernels loads this build when the CPU has them.
include "_metrics.pyx"

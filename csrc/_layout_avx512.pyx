# cython: language_level=3
# The same kernel compiled for AVX512 (see setup.py); qnkit.kernels loads this build when the CPU has it.
include "_layout.pyx"

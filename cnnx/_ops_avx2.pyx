# cython: language_level=3
# The kernels of _ops.pyx compiled for avx2 (setup.py adds the instruction-set flags); cnnx._simd
# imports this module instead of cnnx._ops when the CPU has the instructions.
include "_ops.pyx"

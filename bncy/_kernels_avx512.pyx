"""Private kernels of bncy, compiled for AVX-512 (x86-64-v4: F, CD, BW, DQ, VL) with
512-bit vectors: the same code as bncy._kernels, bitwise-identical results. Chosen
at import when the CPU and the OS support it."""

include "kernels/kernels.pxi"

"""Private kernels of bncy, compiled with -mavx2 (the same code as bncy._kernels,
wider vectors, bitwise-identical results). Chosen at import when the CPU has AVX2."""

include "kernels/kernels.pxi"

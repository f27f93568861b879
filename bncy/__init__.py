"""bncy: fast, bitwise-reproducible batch normalization for NumPy on the CPU.

Forward (training and inference) and the closed-form backward pass, in Cython
with OpenMP, statistics in float64, results identical for every thread count.
``bncy.reference`` holds the same functions in pure NumPy.
"""

from bncy import reference
from bncy._api import backward, forward, inference, isa, openmp_enabled
from bncy._layer import BatchNorm
from bncy._version import __version__

__all__ = [
    "forward", "backward", "inference", "BatchNorm", "openmp_enabled", "isa", "reference",
    "__version__",
]

"""bncy: fast, bitwise-reproducible batch normalization for NumPy on the CPU.

Forward (training and inference) and the closed-form backward pass, in Cython
with OpenMP, statistics in float64, results identical for every thread count.
``bncy.reference`` holds the same functions in pure NumPy.
"""

from bncy import reference
from bncy._api import (
    BatchStats,
    GradStats,
    apply_grad,
    apply_stats,
    backward,
    batch_stats,
    buffer_cache_info,
    describe,
    forward,
    grad_stats,
    inference,
    isa,
    knobs,
    merge_grad_stats,
    merge_stats,
    openmp_enabled,
    set_buffer_cache,
    set_knobs,
)
from bncy._fold import fold
from bncy._layer import BatchNorm
from bncy._version import __version__

__all__ = [
    "forward", "backward", "inference", "BatchNorm", "openmp_enabled", "isa", "reference",
    "batch_stats", "merge_stats", "apply_stats", "grad_stats", "merge_grad_stats",
    "apply_grad", "BatchStats", "GradStats", "set_buffer_cache", "buffer_cache_info",
    "describe", "knobs", "set_knobs", "fold", "__version__",
]

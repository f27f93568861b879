# The kernels of bncy, included by bncy/_kernels.pyx, _kernels_avx2.pyx and
# _kernels_avx512.pyx (one translation unit per build). common.pxi holds the
# Design block; the .pxi files made from .pxi.tp templates are written by setup.py.

include "common.pxi"
include "knobs.pxi"
include "schedule.pxi"
include "statistics.pxi"
include "normalize.pxi"
include "grad_sums.pxi"
include "grad_input.pxi"
include "jobs.pxi"
include "describe.pxi"
include "fast_paths.pxi"
include "probes.pxi"

# The kernels of bncy, compiled three times: bncy/_kernels.pyx (baseline ISA),
# bncy/_kernels_avx2.pyx (-mavx2) and bncy/_kernels_avx512.pyx (AVX-512 with
# 512-bit vectors) on x86-64; bncy._api picks per call among those the CPU runs.
# All run the same IEEE operations in the same order (no FMA contraction:
# -ffp-contract=off), so their results are bitwise identical; only the vector
# width differs.
#
# Private kernels of bncy: unchecked loops only. Not public API.
#
# Files, by job (textual includes: gcc sees one translation unit per build):
#   common.pxi        this Design block, result-defining constants, CPU detection,
#                     prefetch hints, small helpers
#   knobs.pxi         speed-only knobs (set at import from the machine's caches)
#                     and the gates built on them, each decision in one function
#   schedule.pxi      block tiles, coefficient expansion, merges of partial rows
#   statistics.pxi    moments of rows and planes blocks (from statistics.pxi.tp)
#   normalize.pxi     the elementwise normalise/affine pass (from normalize.pxi.tp)
#   grad_sums.pxi     the backward reductions (from grad_sums.pxi.tp)
#   grad_input.pxi    the backward elementwise pass (from grad_input.pxi.tp)
#   jobs.pxi          per-channel coefficients, the running-statistics update and
#                     one core per job (forward, apply, backward, inference), the
#                     entry points bncy._api calls, describe()
#   fast_paths.pxi    the plain public call recognised and run in C
#   probes.pxi        memory-bandwidth probes for bncy.bench
# The .tp files are Tempita templates expanded by setup.py: variants that must
# compute the same sums in the same order (a plain loop and its prefetching twin)
# take their arithmetic from one text; each stays a C function of its own, as gcc
# needs to vectorise it.
#
# Everything a caller can get wrong (dtype, shape, layout, aliasing, thread count)
# is checked in ``bncy._api`` before these functions are called, except by the fast
# paths, which recognise the plain call and hand every other one back to
# ``bncy._api`` (tests check them against the same table of bad calls).
#
# Design
# ------
# Layout. Every array is C-contiguous and seen as ``(N, C, S)``: N = product of
# the axes before the channel axis, C channels, S = product of the axes after it.
# (M, D) with axis=1 is (M, D, 1); NCHW with axis=1 is (N, C, H*W); NHWC with
# axis=-1 is (N*H*W, C, 1). No layout is transposed. Two schedules, chosen by
# the run length S: the elementwise passes take the rows schedule for S <
# ROWS_MAX_RUN (32), the statistics also for longer runs when N >= S / 8 (float32
# moments S < 256, float32 backward sums and float64 moments S < 128, float64
# backward sums never; see _moments, _grad_sums). Runs of 32 to 127
# values (7x7 to 11x11 feature maps) are too short for the planes statistics,
# whose per-segment set-up and merge dominate, but long enough for the planes
# elementwise passes, which need no per-column coefficient vectors (see
# docs/tuning.md for the measurements behind every threshold).
#
# * rows: x is the row-major matrix (N, K = C*S). A block is
#   ROW_BLOCK rows x up to COL_TILE columns; the loop over columns is innermost,
#   with one float64 accumulator per column, so it vectorises without
#   reassociating any sum (and the column tiling does not change any sum).
#   Block statistics take one pass, shifted by the block's first row.
#   Per-channel vectors are expanded to K columns; the S columns of a channel are
#   merged at the end, in column order. The elementwise passes take whole rows
#   while the per-column coefficients fit in L1, and groups of 8 (float32) or 4
#   (float64) rows through chunks of CHUNK columns beyond (see _rows_affine_block);
#   narrow rows (K < 16) go R at a time as one row of R*K columns (see
#   _flat_rows); their statistics likewise, each column then merged from its R
#   copies in a fixed order (see _moments_rows_narrow).
#   Prefetching twins (same sums, same order, plus hints for rows ahead) serve
#   large arrays: the float32 backward sums of whole-row blocks beyond L2
#   (_rows_grad_sums_ahead), grad_input on rows whose coefficients fill most of
#   L1, beyond half of L3 (_rows_grad_input_ahead, whole rows or tiles), and the
#   moments of whole-row blocks of short rows beyond 3/4 of L3
#   (_rows_moments_ahead). knobs.pxi holds each gate.
# * planes: each (n, c) is a contiguous run of S values, cut
#   into segments of at most SEG values. A block is one segment; sums along it use
#   NACC interleaved float64 accumulators in a fixed pattern, added pairwise.
#   Beyond L2, float32 grad_input on one thread asks for dy, x and dx ahead
#   (_grad_input_planes), and float64 moments ask for the next segment while
#   they sum the squared deviations of this one (_run_sqdev).
#
# Precision. Statistics accumulate in float64 whatever the input dtype, and never
# as E[x^2] - E[x]^2 about zero. Rows blocks sum x - p and (x - p)**2 with p the
# block's first row, which bounds the cancellation by a factor 1 + ROW_BLOCK
# whatever the data (see _block_col_moments); float32 planes segments likewise,
# in pieces of RUN_PIECE values shifted by their first value (_run_moments);
# float64 segments (in L1) are two-pass: segment mean, then squared deviations
# about it. Blocks are merged with Chan's
# formula, which is exact for unequal counts. The elementwise passes compute
# (x - center) in float64 and round once when storing.
#
# Reproducibility. The bounds of row blocks and segments depend on the shape
# only, never on the thread count (column tiles may, see _red_tile and
# _row_tile, but each column sums the same rows in the same order whatever its
# tile). Each block writes its own row of partial results; after the parallel
# region the rows are combined in block order (loops parallel over columns, each
# column's order fixed). So every output is bitwise identical for any n_threads.
# prange uses schedule='static'. With one thread the same block functions run in
# a plain loop, outside any OpenMP region (entering one costs ~0.6 us even when
# it starts no thread, a third of a small call); that changes who computes a
# block, never what it computes.
#
# Not checked here: shapes, dtypes, contiguity, aliasing, NaN. NaN and inf stay
# in their own channel because no loop mixes channels.


from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.stdlib cimport malloc, free

from bncy._openmp cimport BNCY_OPENMP_ENABLED, omp_get_max_threads



# Result-defining constants (compile-time: they fix which values each partial sum
# holds and the order of every merge, so changing one changes bits).
cdef enum:
    ROW_BLOCK = 256      # rows of a block in the rows schedule
    SEG = 4096           # values of a block in the planes schedule
    NACC = 16            # interleaved accumulators along a contiguous run
    RUN_PIECE = 256      # values per shifted piece of a float32 planes segment
    ROWS_MAX_RUN = 32    # statistics of shorter runs take the rows schedule ...
    RED_ROWS_MAX_RUN = 128  # ... and of runs up to this too (see _moments)
    FLAT_MAX_K = 16      # statistics of rows narrower than this take R rows ...
    FLAT_RED = 256       # ... at a time, as one row this wide (_moments_rows_narrow)

# Compile-time speed constants: bounds of stack arrays and vector loops, which
# gcc must see as constants. None of them changes a result.
cdef enum:
    COL_TILE = 1024      # columns of a reduction block in the rows schedule, at most
    MIN_TILE = 256       # ... and at least (see _red_tile, _row_tile)
    CHUNK = 8            # columns per coefficient chunk of a wide-row elementwise pass
    PIECE = 64           # columns (values) per prefetch hint step
    PAD = 24             # doubles between expanded coefficient vectors: vectors
                         # 4 KiB apart alias in L1

BLOCKING = {"ROW_BLOCK": ROW_BLOCK, "COL_TILE": COL_TILE, "MIN_TILE": MIN_TILE, "SEG": SEG,
            "ROWS_MAX_RUN": ROWS_MAX_RUN, "RED_ROWS_MAX_RUN": RED_ROWS_MAX_RUN}



cdef extern from *:
    """
    #if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    static int bncy_cpu_has_avx2(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2");
    }
    /* libgcc also checks that the OS saves the zmm registers (XGETBV) */
    static int bncy_cpu_has_avx512(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd")
            && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")
            && __builtin_cpu_supports("avx512vl");
    }
    #else
    static int bncy_cpu_has_avx2(void) { return 0; }
    static int bncy_cpu_has_avx512(void) { return 0; }
    #endif
    #if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
    #define BNCY_BUILT_FOR "avx512"
    #elif defined(__AVX2__)
    #define BNCY_BUILT_FOR "avx2"
    #else
    #define BNCY_BUILT_FOR "baseline"
    #endif
    """
    int bncy_cpu_has_avx2() noexcept nogil
    int bncy_cpu_has_avx512() noexcept nogil
    const char* BNCY_BUILT_FOR


def cpu_has_avx2():
    """True when this CPU (and OS) supports AVX2."""
    return bool(bncy_cpu_has_avx2())


def cpu_has_avx512():
    """True when this CPU (and OS) supports AVX-512 F, CD, BW, DQ and VL."""
    return bool(bncy_cpu_has_avx512())


def isa():
    """The instruction set this module was compiled for: 'avx512', 'avx2' or
    'baseline'."""
    return BNCY_BUILT_FOR.decode()


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(BNCY_OPENMP_ENABLED)


def max_threads():
    """OpenMP's default team size (honours OMP_NUM_THREADS and threadpoolctl)."""
    return omp_get_max_threads()


cdef extern from *:
    """
    #include <assert.h>
    /* live only in the debug build (BNCY_DEBUG=1 compiles with -UNDEBUG) */
    #define bncy_assert(cond) assert(cond)
    """
    void bncy_assert(bint cond) noexcept nogil


cdef extern from *:
    """
    /* a hint to load the line holding p into the cache: no fault, no effect on
       any result */
    #if defined(__GNUC__) || defined(__clang__)
    #define bncy_prefetch(p) __builtin_prefetch((const void*)(p), 0, 3)
    #else
    #define bncy_prefetch(p) ((void)0)
    #endif
    """
    void bncy_prefetch(const void* p) noexcept nogil


cdef extern from *:
    """
    /* the same, for a line about to be written: asks for it in a state that
       the store does not have to wait for */
    #if defined(__GNUC__) || defined(__clang__)
    #define bncy_prefetch_w(p) __builtin_prefetch((const void*)(p), 1, 3)
    #else
    #define bncy_prefetch_w(p) ((void)0)
    #endif
    """
    void bncy_prefetch_w(const void* p) noexcept nogil


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* g where keep, else +0.0 (not g * keep: a NaN or inf gradient behind a
       closed ReLU gives 0, as PyTorch's threshold_backward does). A bit mask,
       not keep ? g : 0.0: gcc (-ftrapping-math, the default) sinks the
       float-to-double conversion of g into that branch, and will not
       speculate it, so the loop stays scalar and branchy. */
    static inline double bncy_select(int keep, double g) {
        uint64_t u;
        memcpy(&u, &g, sizeof u);
        u &= (uint64_t) 0 - (uint64_t) (keep != 0);
        memcpy(&g, &u, sizeof g);
        return g;
    }
    """
    double bncy_select(bint keep, double g) noexcept nogil


cdef inline double _masked(bint keep, floating g) noexcept nogil:
    # g where keep, else +0.0: bncy_select's bit mask for float32, where the
    # conversion to float64 would sit in the branch; a select for float64, which
    # has none (gcc left the float64 residual loops scalar with the bit mask).
    if floating is float:
        return bncy_select(keep, g)
    return g if keep else 0.0


cdef inline double _rounds_above_zero(floating v) noexcept nogil:
    # The float64 values w for which <floating> w > 0 are those w > this (round to
    # nearest even: 2**-150, half float32's least subnormal, rounds to 0), so the
    # ReLU mask is a float64 compare, without rounding to float32 first (v only
    # picks the type).
    if floating is float:
        return 7.0064923216240854e-46   # 2**-150
    return 0.0


cdef inline Py_ssize_t _cdiv(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline Py_ssize_t _imin(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a < b else b


cdef inline void _prefetch_run(const floating* p, Py_ssize_t n) noexcept nogil:
    # Ask for the cache lines of p[0:n], n >= 1, which a later iteration reads.
    cdef Py_ssize_t i, step = 64 // sizeof(floating)
    for i in range(_cdiv(n, step)):
        bncy_prefetch(p + i * step)


cdef inline void _prefetch_run_w(floating* p, Py_ssize_t n) noexcept nogil:
    # Ask for the cache lines of p[0:n], n >= 1, which a later iteration writes.
    cdef Py_ssize_t i, step = 64 // sizeof(floating)
    for i in range(_cdiv(n, step)):
        bncy_prefetch_w(p + i * step)


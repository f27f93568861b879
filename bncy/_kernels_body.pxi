# The kernels of bncy, compiled three times: bncy/_kernels.pyx (baseline ISA),
# bncy/_kernels_avx2.pyx (-mavx2) and bncy/_kernels_avx512.pyx (AVX-512 with
# 512-bit vectors) on x86-64; bncy._api picks per call among those the CPU runs.
# All run the same IEEE operations in the same order (no FMA contraction:
# -ffp-contract=off), so their results are bitwise identical; only the vector
# width differs.
#
# Private kernels of bncy: unchecked loops only. Not public API.
#
# Everything a caller can get wrong (dtype, shape, layout, aliasing, thread count)
# is checked in ``bncy._api`` before these functions are called, except by the fast
# paths at the end of this file, which check the plain call themselves and hand
# every other one back to ``bncy._api``.
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
# whose per-segment set-up and merge dominated (NCHW (256, 512, 7, 7) float32
# moments 5.7 ms on planes, 1.4 ms on rows), but long enough for the planes
# elementwise passes, which need no per-column coefficient vectors.
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
#   The float32 backward sums of whole-row blocks of arrays beyond L2 ask for the
#   rows PF_BYTES ahead with prefetch hints (_rows_grad_sums_ahead): same sums,
#   same order. So does grad_input, for dy, x and the dx it writes, on rows of
#   at least 410 columns of arrays beyond 16 MiB (_rows_grad_input_ahead), whole
#   rows up to 819 columns and tiles of _pf_tile columns beyond.
#   The moments of whole-row blocks, rows of at most 4 KiB, of arrays of 24 MiB
#   and more ask for the rows PF_MOM_BYTES ahead (_rows_moments_ahead).
# * planes: each (n, c) is a contiguous run of S values, cut
#   into segments of at most SEG values. A block is one segment; sums along it use
#   NACC interleaved float64 accumulators in a fixed pattern, added pairwise.
#   float32 grad_input on one thread, beyond L2, asks for dy, x and dx PF_BYTES
#   ahead (_grad_input_planes).
#   float64 moments beyond L2 ask for the next segment while they sum the
#   squared deviations of this one (_run_sqdev).
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


cdef enum:
    ROW_BLOCK = 256      # rows of a block in the rows schedule
    COL_TILE = 1024      # columns of a reduction block in the rows schedule, at most
    MIN_TILE = 256       # ... and at least (see _red_tile, _row_tile)
    SEG = 4096           # values of a block in the planes schedule
    ROWS_MAX_RUN = 32    # runs shorter than this use the rows schedule
    RED_ROWS_MAX_RUN = 128  # statistics of shorter runs may take it too (_moments)
    CHUNK = 8            # columns per coefficient chunk of a wide-row elementwise pass
    COEF_L1 = 24576      # bytes of per-column coefficients that stay in L1
    NACC = 16            # interleaved accumulators along a contiguous run
    FLAT_ROW = 256       # narrow rows go through the affine pass this wide
    FLAT_ROW_GRAD = 128  # ... and through grad_input (five coefficient vectors)
    FLAT_MAX_K = 16      # ... when they are narrower than this
    FLAT_RED = 256       # ... and through the statistics this wide
    RUN_PIECE = 256      # values per shifted piece of a float32 planes segment
    PAD = 24             # doubles between expanded coefficient vectors: vectors
                         # 4 KiB apart alias in L1 (grad_input 1.8x slower)
    PF_BYTES = 4096      # the backward sums ask for rows this far ahead ...
    PIECE = 64           # ... a piece of this many columns at a time, for
    PF_MIN_BYTES = 1 << 20  # ... arrays of at least this size (L2 here)
    PF_COEF_MIN = 16384  # grad_input prefetches rows whose five coefficient
                         # vectors take at least this many bytes, whole rows
    PF_COEF = 32768      # ... up to this many (tiles of _pf_tile columns beyond),
    PF_GI_MIN_BYTES = 1 << 24  # ... in arrays of at least this size (see
                         # _rows_grad_input_block)
    PF_MOM_BYTES = 16384 # the rows moments ask for rows this far ahead ...
    PF_MOM_MIN_BYTES = 3 << 23  # ... for whole-row blocks of arrays of at
                         # least 24 MiB (see _rows_moments_block) ...
    PF_MOM_MAX_ROW = 4096  # ... whose rows take at most this many bytes

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


cdef inline Py_ssize_t _row_tile(Py_ssize_t N, Py_ssize_t K, int n_threads) noexcept nogil:
    # Columns per block of the rows schedule's elementwise passes: whole rows,
    # unless there are too few row blocks for the threads (N <= ROW_BLOCK would
    # run on one): then about 2 * n_threads blocks, each at least MIN_TILE
    # columns wide and a multiple of 16 (whole cache lines of float32).
    cdef Py_ssize_t n_rb = _cdiv(N, ROW_BLOCK), nkt
    if n_threads <= 1 or n_rb >= 2 * n_threads:
        return K
    nkt = _imin(_cdiv(K, MIN_TILE), _cdiv(2 * n_threads, n_rb))
    if nkt <= 1:
        return K
    return _cdiv(_cdiv(K, nkt), 16) * 16


cdef inline Py_ssize_t _red_tile(Py_ssize_t N, Py_ssize_t K, int n_threads) noexcept nogil:
    # Columns per block of the rows schedule's reductions: COL_TILE, so that a
    # block reads long runs of each row (256 columns read 1 KiB of every 2 KiB row
    # of a (65536, 512) float32 array and ran the backward sums at 17 GB/s; 1024,
    # at 24), or MIN_TILE when that leaves fewer than 2 blocks per thread. Every
    # column is summed over the same rows in the same order whatever the width,
    # so the results do not depend on it.
    if n_threads > 1 and _cdiv(N, ROW_BLOCK) * _cdiv(K, COL_TILE) < 2 * n_threads:
        return MIN_TILE
    return COL_TILE


# ---------------------------------------------------------------------------
# Block helpers (one block, one thread, in cache)
# ---------------------------------------------------------------------------

cdef inline void _block_col_moments(
        const floating* x,   # IN (N, K) row-major
        Py_ssize_t K, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t k0, Py_ssize_t k1,
        double* mean_out,    # OUT [k0:k1] mean of rows r0:r1
        double* m2_out,      # OUT [k0:k1] sum of squared deviations about it
) noexcept nogil:
    # One pass over rows r0:r1 in order, with sums shifted by the block's first
    # row p: S1 = sum(x - p), S2 = sum((x - p)**2), M2 = S2 - S1**2 / n. Since
    # sum((x - mean)**2) >= (p - mean)**2, S2 <= (1 + n) * M2: the subtraction
    # loses at most a factor 1 + ROW_BLOCK of relative precision, for any data.
    # Rows go 4 at a time through each column's accumulators, added one row
    # after the other (the same order, a quarter of the loads and stores).
    cdef double p[COL_TILE]
    cdef double s1[COL_TILE]
    cdef double s2[COL_TILE]
    cdef Py_ssize_t r, q, k, w = k1 - k0, nq = (r1 - r0 - 1) // 4
    cdef const floating* a
    cdef const floating* b
    cdef const floating* c
    cdef const floating* e
    cdef double d0, d1, d2, d3, t1, t2, m2, n = <double> (r1 - r0)
    bncy_assert(0 <= r0 and r0 < r1 and r1 - r0 <= ROW_BLOCK)
    bncy_assert(0 <= k0 and k0 < k1 and k1 <= K and w <= COL_TILE)
    a = x + r0 * K + k0
    for k in range(w):
        p[k] = a[k]
        s1[k] = 0.0
        s2[k] = 0.0
    for q in range(nq):
        a = x + (r0 + 1 + 4 * q) * K + k0
        b = a + K
        c = b + K
        e = c + K
        for k in range(w):
            d0 = a[k] - p[k]
            d1 = b[k] - p[k]
            d2 = c[k] - p[k]
            d3 = e[k] - p[k]
            t1 = s1[k]
            t2 = s2[k]
            t1 = t1 + d0
            t2 = t2 + d0 * d0
            t1 = t1 + d1
            t2 = t2 + d1 * d1
            t1 = t1 + d2
            t2 = t2 + d2 * d2
            t1 = t1 + d3
            t2 = t2 + d3 * d3
            s1[k] = t1
            s2[k] = t2
    for r in range(r0 + 1 + 4 * nq, r1):
        a = x + r * K + k0
        for k in range(w):
            d0 = a[k] - p[k]
            s1[k] += d0
            s2[k] += d0 * d0
    for k in range(w):
        m2 = s2[k] - s1[k] * (s1[k] / n)
        m2_out[k0 + k] = 0.0 if m2 < 0.0 else m2
        mean_out[k0 + k] = p[k] + s1[k] / n


cdef inline void _rows_moments_ahead(
        const floating* x,   # IN (N, K) row-major
        Py_ssize_t N, Py_ssize_t K, Py_ssize_t r0, Py_ssize_t r1,
        double* mean_out,    # OUT [0:K] mean of rows r0:r1
        double* m2_out,      # OUT [0:K] sum of squared deviations about it
) noexcept nogil:
    # _block_col_moments(x, K, r0, r1, 0, K, ...) for a block of whole rows, the
    # same sums in the same order, with prefetch hints: each piece of PIECE
    # columns of a 4-row step first asks for the same columns of the 4 rows
    # PF_MOM_BYTES ahead (up to row N). From memory the plain loop read 28 GB/s
    # on (65536, 512) float32 where a read sweep ran at 43 (a C probe, 1 thread);
    # with the hints 42. 4 KiB ahead, as the backward sums ask, was slower (23).
    # A function of its own, like _rows_grad_sums_ahead, whose pieces inside the
    # general block function slowed its column tiles (not measured here).
    cdef double p[COL_TILE]
    cdef double s1[COL_TILE]
    cdef double s2[COL_TILE]
    cdef Py_ssize_t r, q, k, m, kb, ke, ra, npf, nq = (r1 - r0 - 1) // 4
    cdef Py_ssize_t ahead = _cdiv(PF_MOM_BYTES, K * sizeof(floating))
    cdef const floating* a
    cdef double d0, d1, d2, d3, t1, t2, m2, n = <double> (r1 - r0)
    bncy_assert(0 <= r0 and r0 < r1 and r1 - r0 <= ROW_BLOCK and K <= COL_TILE)
    a = x + r0 * K
    for k in range(K):
        p[k] = a[k]
        s1[k] = 0.0
        s2[k] = 0.0
    for q in range(nq):
        ra = r0 + 1 + 4 * q + ahead
        npf = _imin(ra + 4, N) - ra
        a = x + (r0 + 1 + 4 * q) * K
        for m in range(_cdiv(K, PIECE)):
            kb = m * PIECE
            ke = _imin(K, kb + PIECE)
            for r in range(npf):
                _prefetch_run(x + (ra + r) * K + kb, ke - kb)
            for k in range(kb, ke):
                d0 = a[k] - p[k]
                d1 = a[K + k] - p[k]
                d2 = a[2 * K + k] - p[k]
                d3 = a[3 * K + k] - p[k]
                t1 = s1[k]
                t2 = s2[k]
                t1 = t1 + d0
                t2 = t2 + d0 * d0
                t1 = t1 + d1
                t2 = t2 + d1 * d1
                t1 = t1 + d2
                t2 = t2 + d2 * d2
                t1 = t1 + d3
                t2 = t2 + d3 * d3
                s1[k] = t1
                s2[k] = t2
    for r in range(r0 + 1 + 4 * nq, r1):
        a = x + r * K
        for k in range(K):
            d0 = a[k] - p[k]
            s1[k] += d0
            s2[k] += d0 * d0
    for k in range(K):
        m2 = s2[k] - s1[k] * (s1[k] / n)
        m2_out[k] = 0.0 if m2 < 0.0 else m2
        mean_out[k] = p[k] + s1[k] / n


cdef inline void _block_col_grad_sums(
        const floating* dy,    # IN (N, K) row-major
        const floating* x,     # IN (N, K) row-major
        const double* center,  # IN (K,)
        Py_ssize_t K, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t k0, Py_ssize_t k1,
        double* sdy_out,       # OUT [k0:k1] sum of dy over rows r0:r1
        double* sdyx_out,      # OUT [k0:k1] sum of dy * (x - center)
) noexcept nogil:
    # One pass over rows r0:r1 in order, 2 rows at a time through each column's
    # accumulators (added one row after the other), which live on the stack.
    cdef double s1[COL_TILE]
    cdef double s2[COL_TILE]
    cdef Py_ssize_t r, q, k, w = k1 - k0, nq = (r1 - r0) // 2
    cdef const floating* ga
    cdef const floating* gb
    cdef const floating* xa
    cdef const floating* xb
    cdef const double* ce = center + k0
    cdef double g0, g1, t1, t2
    bncy_assert(0 <= r0 and r0 < r1 and r1 - r0 <= ROW_BLOCK)
    bncy_assert(0 <= k0 and k0 < k1 and k1 <= K and w <= COL_TILE)
    for k in range(w):
        s1[k] = 0.0
        s2[k] = 0.0
    for q in range(nq):
        ga = dy + (r0 + 2 * q) * K + k0
        gb = ga + K
        xa = x + (r0 + 2 * q) * K + k0
        xb = xa + K
        for k in range(w):
            g0 = ga[k]
            g1 = gb[k]
            t1 = s1[k] + g0
            t2 = s2[k] + g0 * (xa[k] - ce[k])
            s1[k] = t1 + g1
            s2[k] = t2 + g1 * (xb[k] - ce[k])
    for r in range(r0 + 2 * nq, r1):
        ga = dy + r * K + k0
        xa = x + r * K + k0
        for k in range(w):
            g0 = ga[k]
            s1[k] += g0
            s2[k] += g0 * (xa[k] - ce[k])
    for k in range(w):
        sdy_out[k0 + k] = s1[k]
        sdyx_out[k0 + k] = s2[k]


cdef inline void _rows_grad_sums_ahead(
        const floating* dy,    # IN (N, K) row-major
        const floating* x,     # IN (N, K) row-major
        const double* center,  # IN (K,)
        Py_ssize_t N, Py_ssize_t K, Py_ssize_t r0, Py_ssize_t r1,
        double* sdy_out,       # OUT [0:K] sum of dy over rows r0:r1
        double* sdyx_out,      # OUT [0:K] sum of dy * (x - center)
) noexcept nogil:
    # _block_col_grad_sums(..., 0, K, ...) for a block of whole rows, the same
    # sums in the same order, with prefetch hints: each piece of PIECE columns
    # first asks for the same columns of the rows PF_BYTES ahead (up to row N; a
    # thread's next block is the next rows). From memory the hardware prefetcher
    # alone kept the loop well below a plain sweep. Taken for float32 only (see
    # _rows_grad_sums_block). A hint changes no value and no order. A function of
    # its own: the same pieces inside _block_col_grad_sums, even with the hints
    # off, made its column tiles slower ((1024, 4096) float32 1.17 -> 1.46 ms).
    cdef double s1[COL_TILE]
    cdef double s2[COL_TILE]
    cdef Py_ssize_t r, q, k, m, kb, ke, ra, npf, nq = (r1 - r0) // 2
    cdef Py_ssize_t ahead = _cdiv(PF_BYTES, K * sizeof(floating))
    cdef const floating* ga
    cdef const floating* xa
    cdef double g0, g1, t1, t2
    bncy_assert(0 <= r0 and r0 < r1 and r1 - r0 <= ROW_BLOCK and K <= COL_TILE)
    for k in range(K):
        s1[k] = 0.0
        s2[k] = 0.0
    for q in range(nq):
        ra = r0 + 2 * q + ahead
        npf = _imin(ra + 2, N) - ra
        ga = dy + (r0 + 2 * q) * K
        xa = x + (r0 + 2 * q) * K
        for m in range(_cdiv(K, PIECE)):
            kb = m * PIECE
            ke = _imin(K, kb + PIECE)
            for r in range(npf):
                _prefetch_run(dy + (ra + r) * K + kb, ke - kb)
                _prefetch_run(x + (ra + r) * K + kb, ke - kb)
            for k in range(kb, ke):
                g0 = ga[k]
                g1 = ga[K + k]
                t1 = s1[k] + g0
                t2 = s2[k] + g0 * (xa[k] - center[k])
                s1[k] = t1 + g1
                s2[k] = t2 + g1 * (xa[K + k] - center[k])
    for r in range(r0 + 2 * nq, r1):
        ga = dy + r * K
        xa = x + r * K
        for k in range(K):
            g0 = ga[k]
            s1[k] += g0
            s2[k] += g0 * (xa[k] - center[k])
    for k in range(K):
        sdy_out[k] = s1[k]
        sdyx_out[k] = s2[k]


cdef inline double _pairwise(double* acc) noexcept nogil:
    # acc[0] + ... + acc[NACC - 1] in a fixed tree: acc[j] += acc[j + h] for
    # h = NACC / 2, NACC / 4, ..., 1.
    cdef Py_ssize_t h = NACC // 2, j
    while h >= 1:
        for j in range(h):
            acc[j] = acc[j] + acc[j + h]
        h = h // 2
    return acc[0]


cdef inline double _run_sum(const floating* p, Py_ssize_t L) noexcept nogil:
    # Sum of p[0:L]: value i goes to accumulator i % NACC (i < L - L % NACC),
    # the tail to accumulators 0, 1, ...; then a fixed pairwise combination.
    cdef double acc[NACC]
    cdef Py_ssize_t i, j, Lv = L - L % NACC
    bncy_assert(L >= 1)
    for j in range(NACC):
        acc[j] = 0.0
    for i in range(0, Lv // NACC):
        for j in range(NACC):
            acc[j] += p[i * NACC + j]
    for i in range(Lv, L):
        acc[i - Lv] += p[i]
    return _pairwise(acc)


cdef inline double _run_sqdev(const floating* p, Py_ssize_t L, double c,
                              const floating* nxt, Py_ssize_t Ln) noexcept nogil:
    # Sum of (p[i] - c)**2, in the pattern of _run_sum, PIECE values at a time,
    # each piece first asking for the next PIECE values of nxt[0:Ln] (Ln = 0: no
    # hints): the next segment's lines come in from memory while this sweep
    # runs on L1 (see _planes_moments_block). A hint changes no value.
    cdef double acc[NACC]
    cdef double d
    cdef Py_ssize_t i, j, m, Lv = L - L % NACC, per = PIECE // NACC
    cdef Py_ssize_t ni = Lv // NACC
    for j in range(NACC):
        acc[j] = 0.0
    for m in range(_cdiv(ni, per)):
        if m * PIECE < Ln:
            _prefetch_run(nxt + m * PIECE, _imin(PIECE, Ln - m * PIECE))
        for i in range(m * per, _imin(ni, m * per + per)):
            for j in range(NACC):
                d = p[i * NACC + j] - c
                acc[j] += d * d
    for i in range(Lv, L):
        d = p[i] - c
        acc[i - Lv] += d * d
    return _pairwise(acc)


cdef inline void _run_shifted_sums(const floating* p, Py_ssize_t L, double q,
                                   double* s1, double* s2) noexcept nogil:
    # Sums of p[i] - q (into *s1) and of (p[i] - q)**2 (into *s2), each in the
    # pattern of _run_sum, in one sweep (separate accumulator rows and loops over
    # j, as in _run_grad_sums).
    cdef double acc[2][NACC]
    cdef double d
    cdef Py_ssize_t i, j, Lv = L - L % NACC
    for j in range(NACC):
        acc[0][j] = 0.0
        acc[1][j] = 0.0
    for i in range(0, Lv // NACC):
        for j in range(NACC):
            acc[0][j] += p[i * NACC + j] - q
        for j in range(NACC):
            d = p[i * NACC + j] - q
            acc[1][j] += d * d
    for i in range(Lv, L):
        d = p[i] - q
        acc[0][i - Lv] += d
        acc[1][i - Lv] += d * d
    s1[0] = _pairwise(&acc[0][0])
    s2[0] = _pairwise(&acc[1][0])


cdef inline double _piece_moments(const floating* p, Py_ssize_t L,
                                  double* m2) noexcept nogil:
    # Mean of p[0:L], returned, and its M2 (into *m2), from the sums shifted by
    # q = p[0] (_run_shifted_sums): M2 = S2 - S1 * (S1 / n), which loses at most
    # a factor 1 + L of relative precision (the bound of _block_col_moments).
    cdef double s1, s2, n = <double> L, q = p[0], d
    _run_shifted_sums(p, L, q, &s1, &s2)
    d = s2 - s1 * (s1 / n)
    m2[0] = 0.0 if d < 0.0 else d
    return q + s1 / n


cdef inline void _run_moments(const floating* p, Py_ssize_t L, double* mean_out,
                              double* m2_out) noexcept nogil:
    # Mean and M2 of p[0:L] in one sweep (float32 runs; see _planes_moments_block):
    # pieces of RUN_PIECE values in order (_piece_moments), merged in order
    # (_chan).
    cdef double mean, m2, cnt, mean_b, m2_b
    cdef Py_ssize_t a, Lp
    mean = _piece_moments(p, _imin(RUN_PIECE, L), &m2)
    cnt = <double> _imin(RUN_PIECE, L)
    for a in range(1, _cdiv(L, RUN_PIECE)):
        Lp = _imin(RUN_PIECE, L - a * RUN_PIECE)
        mean_b = _piece_moments(p + a * RUN_PIECE, Lp, &m2_b)
        _chan(&mean, &m2, &cnt, mean_b, m2_b, <double> Lp)
    mean_out[0] = mean
    m2_out[0] = m2


cdef inline double _run_centered_dot(const floating* dy, const floating* x, Py_ssize_t L,
                                     double c) noexcept nogil:
    # Sum of dy[i] * (x[i] - c), in the pattern of _run_sum.
    cdef double acc[NACC]
    cdef Py_ssize_t i, j, Lv = L - L % NACC
    for j in range(NACC):
        acc[j] = 0.0
    for i in range(0, Lv // NACC):
        for j in range(NACC):
            acc[j] += dy[i * NACC + j] * (x[i * NACC + j] - c)
    for i in range(Lv, L):
        acc[i - Lv] += dy[i] * (x[i] - c)
    return _pairwise(acc)


cdef inline void _run_grad_sums(const floating* dy, const floating* x, Py_ssize_t L,
                                double c, double* sdy, double* sdyx) noexcept nogil:
    # Sum of dy[i] (into *sdy) and of dy[i] * (x[i] - c) (into *sdyx), each in the
    # pattern of _run_sum. float32: one sweep of both runs, the two sums in
    # separate accumulator rows and loops over j (one loop for both would not
    # vectorise with gcc 12); NCHW (32, 64, 56, 56) kernel 1.41 -> 1.07-1.24 ms
    # at 1 thread, 0.58 -> 0.46 ms at 2. float64: a sweep per sum, as gcc 12
    # vectorised the one-sweep loop into shuffles (2.7 -> 9.5 ms).
    cdef double acc[2][NACC]
    cdef Py_ssize_t i, j, Lv = L - L % NACC
    if floating is double:
        sdy[0] = _run_sum(dy, L)
        sdyx[0] = _run_centered_dot(dy, x, L, c)
        return
    for j in range(NACC):
        acc[0][j] = 0.0
        acc[1][j] = 0.0
    for i in range(0, Lv // NACC):
        for j in range(NACC):
            acc[0][j] += dy[i * NACC + j]
        for j in range(NACC):
            acc[1][j] += dy[i * NACC + j] * (x[i * NACC + j] - c)
    for i in range(Lv, L):
        acc[0][i - Lv] += dy[i]
        acc[1][i - Lv] += dy[i] * (x[i] - c)
    sdy[0] = _pairwise(&acc[0][0])
    sdyx[0] = _pairwise(&acc[1][0])


# ---------------------------------------------------------------------------
# Merges of per-block partial rows (fixed order: block order)
# ---------------------------------------------------------------------------

cdef inline void _merge_moments(
        const double* pmean,  # IN (J, W) partial means, one row per block
        const double* pm2,    # IN (J, W) partial sums of squared deviations
        Py_ssize_t J, Py_ssize_t W, Py_ssize_t k0, Py_ssize_t k1,
        Py_ssize_t blk, Py_ssize_t total, Py_ssize_t period,
        double* mean_out, double* m2_out,  # OUT [k0:k1]
) noexcept nogil:
    # Chan et al.: rows 0, 1, ..., J-1 in order. Row j counts
    # min(blk, total - (j % period) * blk) values in every column.
    cdef Py_ssize_t j, k
    cdef double na, nb, n, wb, wab, delta
    cdef const double* rm
    cdef const double* rq
    bncy_assert(J >= 1 and 0 <= k0 and k0 < k1 and k1 <= W)
    for k in range(k0, k1):
        mean_out[k] = pmean[k]
        m2_out[k] = pm2[k]
    na = <double> _imin(blk, total)
    for j in range(1, J):
        nb = <double> _imin(blk, total - (j % period) * blk)
        n = na + nb
        wb = nb / n
        wab = na * wb
        rm = pmean + j * W
        rq = pm2 + j * W
        for k in range(k0, k1):
            delta = rm[k] - mean_out[k]
            mean_out[k] = mean_out[k] + delta * wb
            m2_out[k] = m2_out[k] + rq[k] + delta * delta * wab
        na = n


cdef inline void _merge_sums(const double* part, Py_ssize_t J, Py_ssize_t W,
                             Py_ssize_t k0, Py_ssize_t k1, double* out) noexcept nogil:
    # out[k] = part[0, k] + part[1, k] + ... + part[J-1, k], in that order.
    cdef Py_ssize_t j, k
    cdef const double* row
    for k in range(k0, k1):
        out[k] = part[k]
    for j in range(1, J):
        row = part + j * W
        for k in range(k0, k1):
            out[k] += row[k]


cdef inline void _chan(double* mean, double* m2, double* n, double mean_b, double m2_b,
                       double n_b) noexcept nogil:
    # Chan et al.: (mean, m2) of n values absorbs (mean_b, m2_b) of n_b values.
    # The same operations, in the same order, as _merge_moments.
    cdef double wb = n_b / (n[0] + n_b), wab = n[0] * wb, delta = mean_b - mean[0]
    mean[0] = mean[0] + delta * wb
    m2[0] = m2[0] + m2_b + delta * delta * wab
    n[0] = n[0] + n_b


cdef void _merge_group_moments(const double* cmean, const double* cm2, Py_ssize_t C,
                               Py_ssize_t S, double count, double* mean_out,
                               double* m2_out) noexcept nogil:
    # Columns c*S .. c*S+S-1 (count values each) into channel c, in column order.
    cdef Py_ssize_t c, s, k
    cdef double mean, m2, na
    for c in range(C):
        k = c * S
        mean = cmean[k]
        m2 = cm2[k]
        na = count
        for s in range(1, S):
            _chan(&mean, &m2, &na, cmean[k + s], cm2[k + s], count)
        mean_out[c] = mean
        m2_out[c] = m2


cdef void _merge_group_sums(const double* col, Py_ssize_t C, Py_ssize_t S,
                            double* out) noexcept nogil:
    # Columns c*S .. c*S+S-1 into channel c, in column order.
    cdef Py_ssize_t c, s
    cdef double acc
    for c in range(C):
        acc = col[c * S]
        for s in range(1, S):
            acc = acc + col[c * S + s]
        out[c] = acc


cdef void _expand(const double* v, Py_ssize_t C, Py_ssize_t S, double* out) noexcept nogil:
    # out[c*S + s] = v[c]: a per-channel vector as one value per column.
    cdef Py_ssize_t c, s
    for c in range(C):
        for s in range(S):
            out[c * S + s] = v[c]


cdef inline Py_ssize_t _flat_rows(Py_ssize_t N, Py_ssize_t K, Py_ssize_t width) noexcept nogil:
    # Rows of K columns that the rows elementwise passes take as one row of
    # R * K <= width columns (R >= 1), with the coefficient vectors repeated R
    # times: narrow rows (NHWC with few channels) left the vector loop after a
    # few values. In-process A/B, float32, 1 thread: K = 3 (NHWC (64, 224, 224,
    # 3)) affine 7.6 -> 1.9 ms and grad_input 11.7 -> 3.2 ms; wider groups (512
    # columns, 5 vectors of grad_input beyond 128) were slower. From K = 16 on
    # the gain was within the noise, and public calls on NHWC (32, 56, 56, 64)
    # lost 10-40% (inference, backward, float64), hence only K < FLAT_MAX_K.
    # The values and the operation on each are the same; only the loop bounds
    # change.
    cdef Py_ssize_t R = width // K
    if K >= FLAT_MAX_K or N < 2 * R:
        return 1
    return R


cdef void _expand_tiled(const double* v, Py_ssize_t C, Py_ssize_t S, Py_ssize_t R,
                        double* out) noexcept nogil:
    # _expand, repeated R times: out[r*C*S + c*S + s] = v[c].
    cdef Py_ssize_t K = C * S, r, k
    _expand(v, C, S, out)
    for r in range(1, R):
        for k in range(K):
            out[r * K + k] = out[k]


# ---------------------------------------------------------------------------
# Kernels: statistics
# ---------------------------------------------------------------------------

cdef inline void _rows_moments_block(const floating* x, Py_ssize_t N, Py_ssize_t K,
                                     Py_ssize_t TW, Py_ssize_t b, bint ahead,
                                     double* part) noexcept nogil:
    # Block b: row block b // n_kt, column tile b % n_kt (TW wide); into partial
    # row br. ahead: whole rows (TW >= K) of at most PF_MOM_MAX_ROW bytes of an
    # array beyond L3, through the prefetching loop (_rows_moments_ahead). Kernel
    # A/B, 1 thread (2 threads): float32 (65536, 512) 4.96 -> 3.4 ms (3.1-3.6 ->
    # 2.9), (65536, 1024) 10.5 -> 7.9 (7.0 -> 6.3); float64 (12288, 512) 1.59 ->
    # 1.09 (0.9 -> 0.6). In L3 it lost ((8192, 512) float32 57 -> 48 GB/s in a C
    # probe), and so did float64 rows of 8 KiB at 1 thread ((65536, 1024) 22.5
    # -> 24.4 ms).
    cdef Py_ssize_t n_kt = _cdiv(K, TW), br = b // n_kt, kt = b % n_kt
    cdef Py_ssize_t n_rb = _cdiv(N, ROW_BLOCK)
    if ahead:
        _rows_moments_ahead(x, N, K, br * ROW_BLOCK, _imin(N, (br + 1) * ROW_BLOCK),
                            part + br * K, part + (n_rb + br) * K)
        return
    _block_col_moments(x, K, br * ROW_BLOCK, _imin(N, (br + 1) * ROW_BLOCK),
                       kt * TW, _imin(K, (kt + 1) * TW),
                       part + br * K, part + (n_rb + br) * K)


cdef int _moments_rows(const floating* x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                       double* mean_out, double* m2_out, int n_threads) noexcept nogil:
    # Blocks: ROW_BLOCK rows x TW columns of (N, K), row-block-major, so a
    # thread's consecutive blocks are neighbours in memory. Partial row br holds
    # the moments of row block br; merged in row-block order per column.
    cdef Py_ssize_t K = C * S, TW = _red_tile(N, K, n_threads)
    cdef Py_ssize_t n_rb = _cdiv(N, ROW_BLOCK), n_kt = _cdiv(K, TW)
    cdef Py_ssize_t b, br, kt
    cdef double* part = <double*> malloc(2 * n_rb * K * sizeof(double))
    cdef double* cols = NULL
    cdef double* col_mean = mean_out
    cdef double* col_m2 = m2_out
    cdef bint ahead = (TW >= K and K * <Py_ssize_t> sizeof(floating) <= PF_MOM_MAX_ROW
                       and N * K * <Py_ssize_t> sizeof(floating) >= PF_MOM_MIN_BYTES)
    if part == NULL:
        return -1
    if S > 1:
        cols = <double*> malloc(2 * K * sizeof(double))
        if cols == NULL:
            free(part)
            return -1
        col_mean = cols
        col_m2 = cols + K
    if n_threads > 1:
        for b in prange(n_rb * n_kt, schedule='static', num_threads=n_threads):
            _rows_moments_block(x, N, K, TW, b, ahead, part)
        for kt in prange(n_kt, schedule='static', num_threads=n_threads):
            _merge_moments(part, part + n_rb * K, n_rb, K, kt * TW,
                           _imin(K, (kt + 1) * TW), ROW_BLOCK, N, n_rb,
                           col_mean, col_m2)
    else:
        for b in range(n_rb * n_kt):
            _rows_moments_block(x, N, K, TW, b, ahead, part)
        _merge_moments(part, part + n_rb * K, n_rb, K, 0, K, ROW_BLOCK, N, n_rb,
                       col_mean, col_m2)
    if S > 1:
        _merge_group_moments(col_mean, col_m2, C, S, <double> N, mean_out, m2_out)
        free(cols)
    free(part)
    return 0


cdef int _moments_rows_narrow(const floating* x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                              Py_ssize_t R, double* mean_out, double* m2_out,
                              int n_threads) noexcept nogil:
    # The (N // R, R * K) matrix of R rows at a time on the wide schedule: column
    # r * K + k holds the moments of rows r, r + R, r + 2R, ... of column k. Each
    # column k is then merged from its R copies in order r = 0, 1, ..., R - 1
    # (Chan, N // R values each) and the N % R rows left over, and the S columns
    # of a channel as in _moments_rows. A fixed order, whatever n_threads.
    cdef Py_ssize_t K = C * S, NR = N // R, KR = K * R, rest = N - NR * R, k, r
    cdef double na, m, q
    cdef int rc
    cdef double* buf = <double*> malloc((2 * KR + 4 * K) * sizeof(double))
    cdef double* vmean = buf
    cdef double* vm2 = buf + KR
    cdef double* cmean = buf + 2 * KR
    cdef double* cm2 = buf + 2 * KR + K
    cdef double* rmean = buf + 2 * KR + 2 * K
    cdef double* rm2 = buf + 2 * KR + 3 * K
    if buf == NULL:
        return -1
    rc = _moments_rows(x, NR, KR, 1, vmean, vm2, n_threads)
    if rc == 0 and rest > 0:
        rc = _moments_rows(x + NR * KR, rest, K, 1, rmean, rm2, 1)
    if rc != 0:
        free(buf)
        return rc
    for k in range(K):
        m = vmean[k]
        q = vm2[k]
        na = <double> NR
        for r in range(1, R):
            _chan(&m, &q, &na, vmean[r * K + k], vm2[r * K + k], <double> NR)
        if rest > 0:
            _chan(&m, &q, &na, rmean[k], rm2[k], <double> rest)
        cmean[k] = m
        cm2[k] = q
    _merge_group_moments(cmean, cm2, C, S, <double> N, mean_out, m2_out)
    free(buf)
    return 0


cdef void _planes_moments_block(const floating* x, Py_ssize_t N, Py_ssize_t C,
                                Py_ssize_t S, Py_ssize_t b, double* pmean,
                                double* pm2) noexcept nogil:
    # Block b: segment g = b % nseg of run nc = b // nseg; into partial row
    # j = n * nseg + g, column c. float32: one sweep of shifted pieces
    # (_run_moments); a sweep for the mean and one for the squared deviations
    # (in L1) left no load in flight during the second: NCHW (32, 64, 56, 56)
    # moments 0.9 -> 0.7 ms at 1 thread. float64: those two sweeps (exact
    # deviations, so that only |x - mean| near 1e154 overflows, see _api), the
    # second asking for the next segment (arrays beyond L2; _run_sqdev):
    # NCHW (32, 64, 56, 56) 1.69 -> 1.12 ms at 1 thread, 0.86 -> 0.62 ms at 2;
    # (256, 512, 14, 14) 8.0-9.4 -> 7.4-7.7 and 4.95 -> 4.18. (A flag argument
    # for it instead made gcc 12 compile the float32 sweep 1.1-1.5x slower.)
    cdef Py_ssize_t nseg = _cdiv(S, SEG), g = b % nseg, nc = b // nseg
    cdef Py_ssize_t s0 = g * SEG, L = _imin(SEG, S - s0), j = (nc // C) * nseg + g
    cdef Py_ssize_t o, Ln = 0
    cdef double mean
    bncy_assert(nc < N * C and s0 + L <= S and j < N * nseg)
    if floating is float:
        _run_moments(x + nc * S + s0, L, &pmean[j * C + nc % C], &pm2[j * C + nc % C])
        return
    o = nc * S + s0
    mean = _run_sum(x + o, L) / L
    pmean[j * C + nc % C] = mean
    if N * C * S * 8 >= PF_MIN_BYTES:   # beyond L2: ask for the next segment
        Ln = _imin(SEG, N * C * S - (o + L))
    pm2[j * C + nc % C] = _run_sqdev(x + o, L, mean, x + o + L, Ln)


cdef int _moments_planes(const floating* x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                         double* mean_out, double* m2_out, int n_threads) noexcept nogil:
    # Blocks: segment g of run (n, c), ordered (n, c, g) as in memory. Partial
    # row n*nseg + g, column c; merged per channel in (n, g) order.
    cdef Py_ssize_t nseg = _cdiv(S, SEG), J = N * nseg
    cdef Py_ssize_t b, kt
    cdef double* part = <double*> malloc(2 * J * C * sizeof(double))
    cdef double* pmean
    cdef double* pm2
    if part == NULL:
        return -1
    pmean = part
    pm2 = part + J * C
    if n_threads > 1:
        for b in prange(N * C * nseg, schedule='static', num_threads=n_threads):
            _planes_moments_block(x, N, C, S, b, pmean, pm2)
        for kt in prange(_cdiv(C, COL_TILE), schedule='static', num_threads=n_threads):
            _merge_moments(pmean, pm2, J, C, kt * COL_TILE, _imin(C, (kt + 1) * COL_TILE),
                           SEG, S, nseg, mean_out, m2_out)
    else:
        for b in range(N * C * nseg):
            _planes_moments_block(x, N, C, S, b, pmean, pm2)
        _merge_moments(pmean, pm2, J, C, 0, C, SEG, S, nseg, mean_out, m2_out)
    free(part)
    return 0


cdef inline bint _short_runs_on_rows(Py_ssize_t N, Py_ssize_t S,
                                    Py_ssize_t limit) noexcept nogil:
    # Statistics of runs of ROWS_MAX_RUN to limit - 1 values take the rows
    # schedule when there are enough images: its merge of a channel's S columns
    # costs S Chan steps, planes' N, and with N < S / 8 planes stayed faster
    # ((4, 64, 8, 8) float32 forward 8 -> 13 us on rows).
    return S < ROWS_MAX_RUN or (S < limit and S <= 8 * N)


cdef int _moments(const floating* x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                  double* mean_out, double* m2_out, int n_threads) noexcept nogil:
    # The statistics on their schedule (see the Design block). Rows: float32 runs
    # up to 255 values (NCHW 14x14 float32 forward 1.14x-2x faster in an
    # in-process A/B), float64 up to 127 (its planes moments were faster on runs
    # of 196: 2.0 ms against 2.4); narrow rows R at a time (_moments_rows_narrow:
    # rows of 3 values ran the blocks at a quarter of the speed of wide rows).
    cdef Py_ssize_t limit = 2 * RED_ROWS_MAX_RUN if floating is float else RED_ROWS_MAX_RUN
    cdef Py_ssize_t R
    if not _short_runs_on_rows(N, S, limit):
        return _moments_planes(x, N, C, S, mean_out, m2_out, n_threads)
    R = _flat_rows(N, C * S, FLAT_RED)
    if R > 1:
        return _moments_rows_narrow(x, N, C, S, R, mean_out, m2_out, n_threads)
    return _moments_rows(x, N, C, S, mean_out, m2_out, n_threads)


def moments(const floating[:, :, ::1] x,  # IN (N, C, S)
            double[::1] mean_out,          # OUT (C,) mean over axes 0 and 2
            double[::1] m2_out,            # OUT (C,) sum of squared deviations
            int n_threads):
    """Per-channel mean and sum of squared deviations (M2) of x over axes 0, 2."""
    cdef int rc
    with nogil:
        rc = _moments(&x[0, 0, 0], x.shape[0], x.shape[1], x.shape[2], &mean_out[0],
                      &m2_out[0], n_threads)
    if rc != 0:
        raise MemoryError("bncy: could not allocate the partial statistics")


# ---------------------------------------------------------------------------
# Kernels: backward reductions
# ---------------------------------------------------------------------------

cdef inline void _rows_grad_sums_block(const floating* dy, const floating* x,
                                       const double* center, Py_ssize_t N, Py_ssize_t K,
                                       Py_ssize_t TW, Py_ssize_t b,
                                       double* part) noexcept nogil:
    # Block b as in _rows_moments_block. float32 blocks of whole rows of arrays
    # beyond L2 take the prefetching loop; in-process A/B of the kernel, 1 thread
    # (2 threads): NHWC (100352, 64) 1.55 -> 1.07 ms (0.63 -> 0.53), (3211264, 3)
    # 2.88 -> 2.19 ms (1.38 -> 1.05). Not where it lost: in cache ((64, 256)
    # backward 6.9 -> 7.6 us), float64 ((65536, 512) 17 -> 23 ms), column tiles
    # ((1024, 4096)); the moments (one array, 4 rows a step) and the planes runs
    # were slower with such hints too.
    cdef Py_ssize_t n_kt = _cdiv(K, TW), br = b // n_kt, kt = b % n_kt
    cdef Py_ssize_t n_rb = _cdiv(N, ROW_BLOCK), r1 = _imin(N, (br + 1) * ROW_BLOCK)
    if floating is float:
        if TW >= K and N * K * sizeof(floating) >= PF_MIN_BYTES:
            _rows_grad_sums_ahead(dy, x, center, N, K, br * ROW_BLOCK, r1,
                                  part + br * K, part + (n_rb + br) * K)
            return
    _block_col_grad_sums(dy, x, center, K, br * ROW_BLOCK, r1, kt * TW,
                         _imin(K, (kt + 1) * TW), part + br * K, part + (n_rb + br) * K)


cdef int _grad_sums_rows(const floating* dy, const floating* x, const double* center,
                         Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                         double* sdy_out, double* sdyx_out, int n_threads) noexcept nogil:
    # Blocks as in _moments_rows; partial sums merged in row-block order.
    cdef Py_ssize_t K = C * S, TW = _red_tile(N, K, n_threads)
    cdef Py_ssize_t n_rb = _cdiv(N, ROW_BLOCK), n_kt = _cdiv(K, TW)
    cdef Py_ssize_t b, br, kt
    cdef double* part = <double*> malloc(2 * n_rb * K * sizeof(double))
    cdef double* cols = NULL
    cdef const double* ccenter = center
    cdef double* col_sdy = sdy_out
    cdef double* col_sdyx = sdyx_out
    if part == NULL:
        return -1
    if S > 1:
        cols = <double*> malloc(3 * K * sizeof(double))
        if cols == NULL:
            free(part)
            return -1
        col_sdy = cols
        col_sdyx = cols + K
        _expand(center, C, S, cols + 2 * K)
        ccenter = cols + 2 * K
    if n_threads > 1:
        for b in prange(n_rb * n_kt, schedule='static', num_threads=n_threads):
            _rows_grad_sums_block(dy, x, ccenter, N, K, TW, b, part)
        for kt in prange(n_kt, schedule='static', num_threads=n_threads):
            _merge_sums(part, n_rb, K, kt * TW, _imin(K, (kt + 1) * TW), col_sdy)
            _merge_sums(part + n_rb * K, n_rb, K, kt * TW, _imin(K, (kt + 1) * TW),
                        col_sdyx)
    else:
        for b in range(n_rb * n_kt):
            _rows_grad_sums_block(dy, x, ccenter, N, K, TW, b, part)
        _merge_sums(part, n_rb, K, 0, K, col_sdy)
        _merge_sums(part + n_rb * K, n_rb, K, 0, K, col_sdyx)
    if S > 1:
        _merge_group_sums(col_sdy, C, S, sdy_out)
        _merge_group_sums(col_sdyx, C, S, sdyx_out)
        free(cols)
    free(part)
    return 0


cdef int _grad_sums_rows_narrow(const floating* dy, const floating* x,
                                const double* center, Py_ssize_t N, Py_ssize_t C,
                                Py_ssize_t S, Py_ssize_t R, double* sdy_out,
                                double* sdyx_out, int n_threads) noexcept nogil:
    # As _moments_rows_narrow: the sums of the (N // R, R * K) matrix, each column
    # k then summed from its R copies in order and the N % R rows left over,
    # then the S columns of a channel.
    cdef Py_ssize_t K = C * S, NR = N // R, KR = K * R, rest = N - NR * R, k, r
    cdef Py_ssize_t off = NR * KR
    cdef double a, b
    cdef int rc
    cdef double* buf = <double*> malloc((3 * KR + 4 * K) * sizeof(double))
    cdef double* vcenter = buf
    cdef double* vsdy = buf + KR
    cdef double* vsdyx = buf + 2 * KR
    cdef double* csdy = buf + 3 * KR
    cdef double* csdyx = buf + 3 * KR + K
    cdef double* rsdy = buf + 3 * KR + 2 * K
    cdef double* rsdyx = buf + 3 * KR + 3 * K
    if buf == NULL:
        return -1
    _expand_tiled(center, C, S, R, vcenter)
    rc = _grad_sums_rows(dy, x, vcenter, NR, KR, 1, vsdy, vsdyx, n_threads)
    if rc == 0 and rest > 0:
        rc = _grad_sums_rows(dy + off, x + off, vcenter, rest, K, 1, rsdy, rsdyx, 1)
    if rc != 0:
        free(buf)
        return rc
    for k in range(K):
        a = vsdy[k]
        b = vsdyx[k]
        for r in range(1, R):
            a = a + vsdy[r * K + k]
            b = b + vsdyx[r * K + k]
        if rest > 0:
            a = a + rsdy[k]
            b = b + rsdyx[k]
        csdy[k] = a
        csdyx[k] = b
    _merge_group_sums(csdy, C, S, sdy_out)
    _merge_group_sums(csdyx, C, S, sdyx_out)
    free(buf)
    return 0


cdef void _planes_grad_sums_block(const floating* dy, const floating* x,
                                  const double* center, Py_ssize_t N, Py_ssize_t C,
                                  Py_ssize_t S, Py_ssize_t b, double* part) noexcept nogil:
    # Block b as in _planes_moments_block; one sweep of the segment of dy and x
    # (_run_grad_sums). part holds J rows of sum dy, then J of sum dy * (x - center).
    # Not inline, like _planes_moments_block: inlined into the one-thread loop of
    # _grad_sums_planes, gcc 12 compiled that sweep 2.6x slower (NCHW (32, 64, 56,
    # 56) float32 sums 2.8 ms against 1.07).
    cdef Py_ssize_t nseg = _cdiv(S, SEG), J = N * nseg, g = b % nseg, nc = b // nseg
    cdef Py_ssize_t s0 = g * SEG, L = _imin(SEG, S - s0), j = (nc // C) * nseg + g
    bncy_assert(nc < N * C and s0 < S and j < J)
    _run_grad_sums(dy + nc * S + s0, x + nc * S + s0, L, center[nc % C],
                   &part[j * C + nc % C], &part[(J + j) * C + nc % C])


cdef int _grad_sums_planes(const floating* dy, const floating* x, const double* center,
                           Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                           double* sdy_out, double* sdyx_out, int n_threads) noexcept nogil:
    # Blocks as in _moments_planes; partial sums merged in (n, g) order.
    cdef Py_ssize_t nseg = _cdiv(S, SEG), J = N * nseg
    cdef Py_ssize_t b, kt
    cdef double* part = <double*> malloc(2 * J * C * sizeof(double))
    if part == NULL:
        return -1
    if n_threads > 1:
        for b in prange(N * C * nseg, schedule='static', num_threads=n_threads):
            _planes_grad_sums_block(dy, x, center, N, C, S, b, part)
        for kt in prange(_cdiv(C, COL_TILE), schedule='static', num_threads=n_threads):
            _merge_sums(part, J, C, kt * COL_TILE, _imin(C, (kt + 1) * COL_TILE), sdy_out)
            _merge_sums(part + J * C, J, C, kt * COL_TILE, _imin(C, (kt + 1) * COL_TILE),
                        sdyx_out)
    else:
        for b in range(N * C * nseg):
            _planes_grad_sums_block(dy, x, center, N, C, S, b, part)
        _merge_sums(part, J, C, 0, C, sdy_out)
        _merge_sums(part + J * C, J, C, 0, C, sdyx_out)
    free(part)
    return 0


cdef int _grad_sums(const floating* dy, const floating* x, const double* center,
                    Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, double* sdy_out,
                    double* sdyx_out, int n_threads) noexcept nogil:
    # The backward sums on their schedule. Rows: float32 runs up to 127 values
    # (rows were slower on runs of 196: 1.7 -> 2.2 ms, (128, 256, 196)); float64
    # only below ROWS_MAX_RUN (its rows sums were slower on runs of 64: 0.75 ->
    # 0.97 ms, (512, 64, 64), and at 2 threads on runs of 49: 2.4 -> 2.7 ms,
    # (256, 512, 49)); narrow rows R at a time as in _moments.
    cdef Py_ssize_t limit = RED_ROWS_MAX_RUN if floating is float else ROWS_MAX_RUN
    cdef Py_ssize_t R
    if not _short_runs_on_rows(N, S, limit):
        return _grad_sums_planes(dy, x, center, N, C, S, sdy_out, sdyx_out, n_threads)
    R = _flat_rows(N, C * S, FLAT_RED)
    if R > 1:
        return _grad_sums_rows_narrow(dy, x, center, N, C, S, R, sdy_out, sdyx_out,
                                      n_threads)
    return _grad_sums_rows(dy, x, center, N, C, S, sdy_out, sdyx_out, n_threads)


def grad_sums(const floating[:, :, ::1] dy,  # IN (N, C, S)
              const floating[:, :, ::1] x,   # IN (N, C, S)
              const double[::1] center,      # IN (C,) the saved batch mean
              double[::1] sdy_out,           # OUT (C,) sum of dy
              double[::1] sdyx_out,          # OUT (C,) sum of dy * (x - center)
              int n_threads):
    """Per-channel sums of dy and dy * (x - center) over axes 0 and 2."""
    cdef int rc
    with nogil:
        rc = _grad_sums(&dy[0, 0, 0], &x[0, 0, 0], &center[0], x.shape[0], x.shape[1],
                        x.shape[2], &sdy_out[0], &sdyx_out[0], n_threads)
    if rc != 0:
        raise MemoryError("bncy: could not allocate the partial sums")


# ---------------------------------------------------------------------------
# Kernels: elementwise passes
# ---------------------------------------------------------------------------

cdef inline Py_ssize_t _group_rows(const floating* x) noexcept nogil:
    # Rows per group of the chunked wide-row passes (see _rows_affine_block).
    cdef Py_ssize_t g = 4
    if floating is float:
        g = 8
    return g


cdef inline Py_ssize_t _pf_tile(const floating* x) noexcept nogil:
    # Columns per tile of the prefetching grad_input on rows wider than PF_COEF
    # allows whole (see _rows_grad_input_block): 768 for float32 (30 KiB of
    # coefficients; best of 384, 512 and 768), 512 for float64 (the one width
    # measured there).
    cdef Py_ssize_t t = 512
    if floating is float:
        t = 768
    return t


cdef inline void _rows_affine_block(const floating* x, const double* ce, const double* sc,
                                    const double* sh, Py_ssize_t N, Py_ssize_t K,
                                    Py_ssize_t TW, Py_ssize_t b,
                                    floating* y_out) noexcept nogil:
    # Block b: row block b // nkt, columns [k0, k1) of tile b % nkt (TW wide).
    # Rows whole, columns innermost, while the three coefficient vectors fit in
    # L1. Wider rows would read them from L2 for every row (24 bytes per value):
    # there, groups of G rows go through chunks of CHUNK columns whose
    # coefficients are first copied to the stack, 1/G of the reads (G = 8 for
    # float32, 4 for float64: 8 rows made float32 (1024, 4096) 1.25x faster and
    # float64 1.25x slower, 16 both slower). The same operations per value.
    cdef Py_ssize_t nkt = _cdiv(K, TW), br = b // nkt, r, k, q, m, i, j
    cdef Py_ssize_t G = _group_rows(x)
    cdef Py_ssize_t k0 = (b % nkt) * TW, k1 = _imin(K, k0 + TW)
    cdef Py_ssize_t r0 = br * ROW_BLOCK, r1 = _imin(N, r0 + ROW_BLOCK), rq = r0
    cdef Py_ssize_t kc = k0 + (k1 - k0) // CHUNK * CHUNK
    cdef double e[CHUNK]
    cdef double s[CHUNK]
    cdef double h[CHUNK]
    cdef const floating* xr
    cdef floating* yr
    if 3 * 8 * (k1 - k0) > COEF_L1:
        rq = r0 + (r1 - r0) // G * G
        for q in range((rq - r0) // G):
            r = r0 + G * q
            for m in range((kc - k0) // CHUNK):
                k = k0 + m * CHUNK
                for j in range(CHUNK):
                    e[j] = ce[k + j]
                    s[j] = sc[k + j]
                    h[j] = sh[k + j]
                for i in range(G):
                    xr = x + (r + i) * K + k
                    yr = y_out + (r + i) * K + k
                    for j in range(CHUNK):
                        yr[j] = <floating> ((xr[j] - e[j]) * s[j] + h[j])
            for i in range(G):
                xr = x + (r + i) * K
                yr = y_out + (r + i) * K
                for k in range(kc, k1):
                    yr[k] = <floating> ((xr[k] - ce[k]) * sc[k] + sh[k])
    for r in range(rq, r1):
        xr = x + r * K
        yr = y_out + r * K
        for k in range(k0, k1):
            yr[k] = <floating> ((xr[k] - ce[k]) * sc[k] + sh[k])


cdef int _affine_rows(const floating* x, const double* center, const double* scale,
                      const double* shift, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                      floating* y_out, int n_threads) noexcept nogil:
    # Row blocks in parallel, rows in order, whole rows with columns innermost
    # (tiling the columns broke the read/write streams and was slower), except
    # when there are too few row blocks for the threads (see _row_tile).
    # y may be x (same index only). Narrow rows go R at a time as rows of R * K
    # columns (see _flat_rows), the last N % R rows on their own.
    cdef Py_ssize_t K = C * S, R = _flat_rows(N, C * S, FLAT_ROW)
    cdef Py_ssize_t NR = N // R, KR = K * R, TW = _row_tile(NR, KR, n_threads)
    cdef Py_ssize_t nkt = _cdiv(KR, TW), b, rest = N - NR * R
    cdef double* cols = NULL
    cdef const double* ce = center
    cdef const double* sc = scale
    cdef const double* sh = shift
    if S > 1 or R > 1:
        cols = <double*> malloc(3 * (KR + PAD) * sizeof(double))
        if cols == NULL:
            return -1
        _expand_tiled(center, C, S, R, cols)
        _expand_tiled(scale, C, S, R, cols + (KR + PAD))
        _expand_tiled(shift, C, S, R, cols + 2 * (KR + PAD))
        ce = cols
        sc = cols + (KR + PAD)
        sh = cols + 2 * (KR + PAD)
    if n_threads > 1:
        for b in prange(_cdiv(NR, ROW_BLOCK) * nkt, schedule='static', num_threads=n_threads):
            _rows_affine_block(x, ce, sc, sh, NR, KR, TW, b, y_out)
    else:
        for b in range(_cdiv(NR, ROW_BLOCK) * nkt):
            _rows_affine_block(x, ce, sc, sh, NR, KR, TW, b, y_out)
    for b in range(_cdiv(rest, ROW_BLOCK)):
        _rows_affine_block(x + NR * KR, ce, sc, sh, rest, K, K, b, y_out + NR * KR)
    free(cols)
    return 0


cdef inline void _planes_affine_block(const floating* x, const double* center,
                                      const double* scale, const double* shift,
                                      Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                                      Py_ssize_t b, floating* y_out) noexcept nogil:
    # Block b: segment b % nseg of run b // nseg, in memory order.
    cdef Py_ssize_t nseg = _cdiv(S, SEG), c = (b // nseg) % C, i
    cdef Py_ssize_t off = (b // nseg) * S + (b % nseg) * SEG
    cdef Py_ssize_t L = _imin(SEG, S - (b % nseg) * SEG)
    cdef double ce = center[c], sc = scale[c], sh = shift[c]
    bncy_assert(off + L <= N * C * S and c < C)
    for i in range(off, off + L):
        y_out[i] = <floating> ((x[i] - ce) * sc + sh)


cdef int _affine_planes(const floating* x, const double* center, const double* scale,
                        const double* shift, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                        floating* y_out, int n_threads) noexcept nogil:
    # Segments of runs in parallel, in memory order. y may be x (same index only).
    cdef Py_ssize_t b
    if n_threads > 1:
        for b in prange(N * C * _cdiv(S, SEG), schedule='static', num_threads=n_threads):
            _planes_affine_block(x, center, scale, shift, N, C, S, b, y_out)
    else:
        for b in range(N * C * _cdiv(S, SEG)):
            _planes_affine_block(x, center, scale, shift, N, C, S, b, y_out)
    return 0


cdef int _affine(const floating* x, const double* center, const double* scale,
                 const double* shift, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                 floating* y_out, int n_threads) noexcept nogil:
    # The affine pass on its schedule (see the Design block).
    if S < ROWS_MAX_RUN:
        return _affine_rows(x, center, scale, shift, N, C, S, y_out, n_threads)
    return _affine_planes(x, center, scale, shift, N, C, S, y_out, n_threads)


def affine(const floating[:, :, ::1] x,  # IN (N, C, S)
           const double[::1] center,      # IN (C,)
           const double[::1] scale,       # IN (C,)
           const double[::1] shift,       # IN (C,)
           floating[:, :, ::1] y_out,     # OUT (N, C, S), may be x itself
           int n_threads):
    """y = (x - center) * scale + shift per channel, in float64, rounded once."""
    cdef int rc
    with nogil:
        rc = _affine(&x[0, 0, 0], &center[0], &scale[0], &shift[0], x.shape[0], x.shape[1],
                     x.shape[2], &y_out[0, 0, 0], n_threads)
    if rc != 0:
        raise MemoryError("bncy: could not allocate the per-column coefficients")


cdef inline void _rows_grad_input_ahead(const floating* dy, const floating* x,
                                        const double* ce, const double* cs,
                                        const double* ca, const double* cb,
                                        const double* ck, Py_ssize_t N, Py_ssize_t K,
                                        Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t k0,
                                        Py_ssize_t k1, floating* dx_out) noexcept nogil:
    # Columns k0:k1 of rows r0:r1 of _rows_grad_input_block, row after row, the
    # same operations per value, with prefetch hints: each piece of PIECE columns
    # first asks for the same columns of dy and x (to read) and of dx (to write)
    # of the row PF_BYTES of such pieces ahead (up to row N). With the five
    # coefficient vectors taking 16 to 32 KiB of the 48 KiB L1, the plain loop
    # fell from 35 to 25 GB/s at 1 thread (rows of 384 columns: 12.5 ms for 128
    # MiB each of dy, x, dx; 448 columns: 15.7);
    # all three hints are needed (dx alone: 1.5x slower than none; dy and x
    # alone: no gain). A hint changes no value and no order.
    cdef Py_ssize_t ahead = _cdiv(PF_BYTES, (k1 - k0) * sizeof(floating)), r, ra, m, kb, ke, k
    cdef const floating* dr
    cdef const floating* xr
    cdef floating* outr
    bncy_assert(0 <= r0 and r0 < r1 and r1 <= N and 0 <= k0 and k0 < k1 and k1 <= K)
    for r in range(r0, r1):
        dr = dy + r * K
        xr = x + r * K
        outr = dx_out + r * K
        ra = r + ahead
        for m in range(_cdiv(k1 - k0, PIECE)):
            kb = k0 + m * PIECE
            ke = _imin(k1, kb + PIECE)
            if ra < N:
                _prefetch_run(dy + ra * K + kb, ke - kb)
                _prefetch_run(x + ra * K + kb, ke - kb)
                _prefetch_run_w(dx_out + ra * K + kb, ke - kb)
            for k in range(kb, ke):
                outr[k] = <floating> (dr[k] * ca[k] + ((xr[k] - ce[k]) * cs[k]) * cb[k]
                                      + ck[k])


cdef inline void _rows_grad_input_block(const floating* dy, const floating* x,
                                        const double* ce, const double* cs,
                                        const double* ca, const double* cb,
                                        const double* ck, Py_ssize_t N, Py_ssize_t K,
                                        Py_ssize_t TW, Py_ssize_t blk,
                                        floating* dx_out) noexcept nogil:
    # Block blk as in _rows_affine_block, wide rows in chunks likewise (five
    # coefficient vectors here). Blocks of whole rows take the prefetching loop
    # when the coefficients fill PF_COEF_MIN to PF_COEF bytes of L1 (rows of 410
    # to 819 columns) and x is at least PF_GI_MIN_BYTES (x, dy and dx then
    # overflow the 32 MiB L3). Kernel A/B, 1 thread (2 threads): float32
    # (65536, 512) 16.8 -> 12.4 ms (8.1 -> 6.4), (43690, 768) 16.1 -> 12.6 ms
    # (8.5 -> 6.3), (8192, 512) 2.05 -> 1.30 ms (0.87-1.1 -> 0.63); float64
    # (65536, 512) 29 -> 22.5 ms (12.8-18 -> 13.7-19.2, its one loss), (4096,
    # 512) 1.78 -> 1.05 ms (0.93 -> 0.61), (43690, 768) 32.7 -> 25.7 ms (21.5 ->
    # 19.4). Where it lost: float32 in L3 ((4096, 512) at 2 threads 0.27 -> 0.31
    # ms), narrow rows (NHWC (100352, 64) at 2 threads, 5-10%), wider rows
    # whole (chunks: (32768, 1024) 17.7 -> 18.8 ms, worse again with hints in
    # the chunks). Wider rows instead take it in tiles of _pf_tile columns
    # (row after row within a tile, the same values). float64, 512 columns:
    # (1024, 4096) 4.0 -> 3.0 ms (1.9 -> 1.3), (16384, 1024) 16.8 -> 15.0 ms
    # (8.45 -> 7.8), (8192, 1536) 12.5 -> 10.0 ms (8.1 -> 8.4). float32, 768
    # columns: (1024, 4096) 1.88 -> 1.65 ms (0.95 -> 0.85), (8192, 2048) 9.9 ->
    # 8.2 ms (5.3 both), (16384, 1024) 9.65 -> 8.1 ms (5.2 -> 5.35); 512 and 384
    # columns lost beyond L3 ((4096, 4096) 8.6 -> 8.4-9.6 ms).
    cdef Py_ssize_t nkt = _cdiv(K, TW), br = blk // nkt, r, k, q, m, i, j
    cdef Py_ssize_t G = _group_rows(x), pt
    cdef Py_ssize_t q0 = (blk % nkt) * TW, q1 = _imin(K, q0 + TW)
    cdef Py_ssize_t r0 = br * ROW_BLOCK, r1 = _imin(N, r0 + ROW_BLOCK), rq = r0
    cdef Py_ssize_t kc = q0 + (q1 - q0) // CHUNK * CHUNK
    cdef double e[CHUNK]
    cdef double s[CHUNK]
    cdef double fa[CHUNK]
    cdef double fb[CHUNK]
    cdef double fk[CHUNK]
    cdef const floating* dr
    cdef const floating* xr
    cdef floating* outr
    if TW >= K and 5 * 8 * K >= PF_COEF_MIN and N * K * sizeof(floating) >= PF_GI_MIN_BYTES:
        pt = K if 5 * 8 * K <= PF_COEF else _pf_tile(x)   # whole rows: one tile
        for m in range(_cdiv(K, pt)):
            _rows_grad_input_ahead(dy, x, ce, cs, ca, cb, ck, N, K, r0, r1, m * pt,
                                   _imin(K, m * pt + pt), dx_out)
        return
    if 5 * 8 * (q1 - q0) > COEF_L1:
        rq = r0 + (r1 - r0) // G * G
        for q in range((rq - r0) // G):
            r = r0 + G * q
            for m in range((kc - q0) // CHUNK):
                k = q0 + m * CHUNK
                for j in range(CHUNK):
                    e[j] = ce[k + j]
                    s[j] = cs[k + j]
                    fa[j] = ca[k + j]
                    fb[j] = cb[k + j]
                    fk[j] = ck[k + j]
                for i in range(G):
                    dr = dy + (r + i) * K + k
                    xr = x + (r + i) * K + k
                    outr = dx_out + (r + i) * K + k
                    for j in range(CHUNK):
                        outr[j] = <floating> (dr[j] * fa[j] + ((xr[j] - e[j]) * s[j]) * fb[j]
                                              + fk[j])
            for i in range(G):
                dr = dy + (r + i) * K
                xr = x + (r + i) * K
                outr = dx_out + (r + i) * K
                for k in range(kc, q1):
                    outr[k] = <floating> (dr[k] * ca[k] + ((xr[k] - ce[k]) * cs[k]) * cb[k]
                                          + ck[k])
    for r in range(rq, r1):
        dr = dy + r * K
        xr = x + r * K
        outr = dx_out + r * K
        for k in range(q0, q1):
            outr[k] = <floating> (dr[k] * ca[k] + ((xr[k] - ce[k]) * cs[k]) * cb[k] + ck[k])


cdef int _grad_input_rows(const floating* dy, const floating* x, const double* center,
                          const double* invstd, const double* a, const double* b,
                          const double* k0, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                          floating* dx_out, int n_threads) noexcept nogil:
    # Row blocks in parallel, rows in order, whole rows with columns innermost
    # (column tiles when there are too few row blocks, see _row_tile).
    # dx may be dy or x (same index only). Narrow rows as in _affine_rows.
    cdef Py_ssize_t K = C * S, R = _flat_rows(N, C * S, FLAT_ROW_GRAD)
    cdef Py_ssize_t NR = N // R, KR = K * R, TW = _row_tile(NR, KR, n_threads)
    cdef Py_ssize_t nkt = _cdiv(KR, TW), blk, rest = N - NR * R, off = NR * KR
    cdef double* cols = NULL
    cdef const double* ce = center
    cdef const double* cs = invstd
    cdef const double* ca = a
    cdef const double* cb = b
    cdef const double* ck = k0
    if S > 1 or R > 1:
        cols = <double*> malloc(5 * (KR + PAD) * sizeof(double))
        if cols == NULL:
            return -1
        _expand_tiled(center, C, S, R, cols)
        _expand_tiled(invstd, C, S, R, cols + (KR + PAD))
        _expand_tiled(a, C, S, R, cols + 2 * (KR + PAD))
        _expand_tiled(b, C, S, R, cols + 3 * (KR + PAD))
        _expand_tiled(k0, C, S, R, cols + 4 * (KR + PAD))
        ce = cols
        cs = cols + (KR + PAD)
        ca = cols + 2 * (KR + PAD)
        cb = cols + 3 * (KR + PAD)
        ck = cols + 4 * (KR + PAD)
    if n_threads > 1:
        for blk in prange(_cdiv(NR, ROW_BLOCK) * nkt, schedule='static',
                          num_threads=n_threads):
            _rows_grad_input_block(dy, x, ce, cs, ca, cb, ck, NR, KR, TW, blk, dx_out)
    else:
        for blk in range(_cdiv(NR, ROW_BLOCK) * nkt):
            _rows_grad_input_block(dy, x, ce, cs, ca, cb, ck, NR, KR, TW, blk, dx_out)
    for blk in range(_cdiv(rest, ROW_BLOCK)):
        _rows_grad_input_block(dy + off, x + off, ce, cs, ca, cb, ck, rest, K, K, blk,
                               dx_out + off)
    free(cols)
    return 0


cdef inline void _planes_grad_input_block(const floating* dy, const floating* x,
                                          const double* center, const double* invstd,
                                          const double* a, const double* b,
                                          const double* k0, Py_ssize_t N, Py_ssize_t C,
                                          Py_ssize_t S, Py_ssize_t blk,
                                          floating* dx_out, bint ahead) noexcept nogil:
    # Block blk as in _planes_affine_block, in pieces of PIECE values. With ahead,
    # each piece first asks for dy, x (to read) and dx (to write) PF_BYTES further
    # on, which may be the next segment's (see _grad_input_planes).
    cdef Py_ssize_t nseg = _cdiv(S, SEG), c = (blk // nseg) % C, i, m, kb, ke
    cdef Py_ssize_t off = (blk // nseg) * S + (blk % nseg) * SEG
    cdef Py_ssize_t L = _imin(SEG, S - (blk % nseg) * SEG)
    cdef Py_ssize_t T = N * C * S, A = PF_BYTES // sizeof(floating)
    cdef double ce = center[c], cs = invstd[c], ca = a[c], cb = b[c], ck = k0[c]
    bncy_assert(off + L <= N * C * S and c < C)
    for m in range(_cdiv(L, PIECE)):
        kb = off + m * PIECE
        ke = _imin(off + L, kb + PIECE)
        if ahead and kb + A + (ke - kb) <= T:
            _prefetch_run(dy + kb + A, ke - kb)
            _prefetch_run(x + kb + A, ke - kb)
            _prefetch_run_w(dx_out + kb + A, ke - kb)
        for i in range(kb, ke):
            dx_out[i] = <floating> (dy[i] * ca + ((x[i] - ce) * cs) * cb + ck)


cdef int _grad_input_planes(const floating* dy, const floating* x, const double* center,
                            const double* invstd, const double* a, const double* b,
                            const double* k0, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                            floating* dx_out, int n_threads) noexcept nogil:
    # Segments of runs in parallel, in memory order. dx may be dy or x. float32 on
    # one thread, beyond L2, with prefetch hints (the same values): NCHW (32, 64,
    # 56, 56) kernel 1.68 -> 1.51 ms; at 2 threads they cost 1.25 -> 1.28 ms, and
    # float64 lost at both.
    cdef Py_ssize_t blk
    cdef bint ahead = False
    if floating is float:
        ahead = N * C * S * sizeof(floating) >= PF_MIN_BYTES
    if n_threads > 1:
        for blk in prange(N * C * _cdiv(S, SEG), schedule='static', num_threads=n_threads):
            _planes_grad_input_block(dy, x, center, invstd, a, b, k0, N, C, S, blk, dx_out,
                                     False)
    else:
        for blk in range(N * C * _cdiv(S, SEG)):
            _planes_grad_input_block(dy, x, center, invstd, a, b, k0, N, C, S, blk, dx_out,
                                     ahead)
    return 0


cdef int _grad_input(const floating* dy, const floating* x, const double* center,
                     const double* invstd, const double* a, const double* b,
                     const double* k0, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                     floating* dx_out, int n_threads) noexcept nogil:
    # The grad_input pass on its schedule (see the Design block).
    if S < ROWS_MAX_RUN:
        return _grad_input_rows(dy, x, center, invstd, a, b, k0, N, C, S, dx_out, n_threads)
    return _grad_input_planes(dy, x, center, invstd, a, b, k0, N, C, S, dx_out, n_threads)


def grad_input(const floating[:, :, ::1] dy,  # IN (N, C, S)
               const floating[:, :, ::1] x,   # IN (N, C, S)
               const double[::1] center,      # IN (C,) the saved batch mean
               const double[::1] invstd,      # IN (C,) the saved invstd
               const double[::1] a,           # IN (C,) coefficient of dy
               const double[::1] b,           # IN (C,) coefficient of xhat
               const double[::1] k0,          # IN (C,) constant term
               floating[:, :, ::1] dx_out,    # OUT (N, C, S), may be dy or x
               int n_threads):
    """dx = a * dy + b * xhat + k0 per channel with xhat = (x - center) * invstd,
    in float64, rounded once. Every term is O(1)-scaled whatever x's magnitude."""
    cdef int rc
    with nogil:
        rc = _grad_input(&dy[0, 0, 0], &x[0, 0, 0], &center[0], &invstd[0], &a[0], &b[0],
                         &k0[0], x.shape[0], x.shape[1], x.shape[2], &dx_out[0, 0, 0],
                         n_threads)
    if rc != 0:
        raise MemoryError("bncy: could not allocate the per-column coefficients")


# ---------------------------------------------------------------------------
# Per-channel coefficients (C values: serial, no blocking needed)
# ---------------------------------------------------------------------------

cdef int _train_coefficients(const double* mean, const double* m2, Py_ssize_t C,
                             double count, double eps, const double* gamma,
                             double* var_out, double* invstd_out,
                             double* scale_out) noexcept nogil:
    # Per channel: var, invstd, gamma * invstd. Counts the channels that need
    # bncy._api's scaled recomputation (see train_coefficients).
    cdef Py_ssize_t c
    cdef int suspicious = 0
    for c in range(C):
        var_out[c] = m2[c] / count
        invstd_out[c] = 1.0 / sqrt(var_out[c] + eps)
        scale_out[c] = invstd_out[c] * gamma[c] if gamma != NULL else invstd_out[c]
        if (not (m2[c] - m2[c] == 0.0) or not (mean[c] - mean[c] == 0.0)
                or (eps == 0.0 and m2[c] == 0.0)):
            suspicious += 1
    return suspicious


def train_coefficients(const double[::1] mean,   # IN (C,) batch mean
                       const double[::1] m2,     # IN (C,) sum of squared deviations
                       double count,             # IN values per channel
                       double eps,
                       const double[::1] gamma,  # IN (C,) or None (ones)
                       double[::1] var_out,      # OUT (C,) biased batch variance
                       double[::1] invstd_out,   # OUT (C,) 1 / sqrt(var + eps)
                       double[::1] scale_out):   # OUT (C,) gamma * invstd
    """Variance, inverse standard deviation and the scale of the normalising pass.

    Returns how many channels need bncy._api's scaled recomputation: a non-finite
    mean or M2 (float64 data whose squares overflow, or NaN/inf in the channel), or
    M2 == 0 with eps == 0 (a constant channel, or squares that underflowed).
    """
    cdef int suspicious
    with nogil:
        suspicious = _train_coefficients(&mean[0], &m2[0], m2.shape[0], count, eps,
                                         &gamma[0] if gamma is not None else NULL,
                                         &var_out[0], &invstd_out[0], &scale_out[0])
    return suspicious


cdef int _forward_core(const floating* x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                       const double* gamma, const double* shift, double eps,
                       floating* y_out, double* mean_out, double* m2_out, double* var_out,
                       double* invstd_out, double* scale_out, int n_threads,
                       int* suspicious) noexcept nogil:
    # moments, coefficients, affine. gamma may be NULL (ones). Sets *suspicious to
    # train_coefficients' count; when it is not 0, y_out is left unwritten.
    # Returns 0, or -1 when a work buffer could not be allocated.
    cdef int rc
    suspicious[0] = 0
    rc = _moments(x, N, C, S, mean_out, m2_out, n_threads)
    if rc != 0:
        return rc
    suspicious[0] = _train_coefficients(mean_out, m2_out, C, <double> (N * S), eps, gamma,
                                        var_out, invstd_out, scale_out)
    if suspicious[0] != 0:
        return 0
    return _affine(x, mean_out, scale_out, shift, N, C, S, y_out, n_threads)


def forward_train(const floating[:, :, ::1] x,   # IN (N, C, S)
                  const double[::1] gamma,       # IN (C,) or None (ones)
                  const double[::1] beta,        # IN (C,) or None (zeros)
                  double eps,
                  floating[:, :, ::1] y_out,     # OUT (N, C, S), may be x itself
                  double[::1] mean_out,          # OUT (C,)
                  double[::1] m2_out,            # OUT (C,)
                  double[::1] var_out,           # OUT (C,)
                  double[::1] invstd_out,        # OUT (C,)
                  double[::1] scale_out,         # OUT (C,) gamma * invstd
                  int n_threads):
    """moments, train_coefficients and affine in one call (one fused-type dispatch
    instead of three). Returns train_coefficients' count; when it is not 0, y_out
    is left unwritten for the caller to rescue and finish."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2], c
    cdef int rc, suspicious = 0
    cdef double* shift = <double*> malloc(C * sizeof(double))
    if shift == NULL:
        raise MemoryError("bncy: could not allocate the per-channel coefficients")
    with nogil:
        for c in range(C):
            shift[c] = beta[c] if beta is not None else 0.0
        rc = _forward_core(&x[0, 0, 0], N, C, S, &gamma[0] if gamma is not None else NULL,
                           shift, eps, &y_out[0, 0, 0], &mean_out[0], &m2_out[0],
                           &var_out[0], &invstd_out[0], &scale_out[0], n_threads,
                           &suspicious)
    free(shift)
    if rc != 0:
        raise MemoryError("bncy: could not allocate the partial statistics")
    return suspicious


cdef void _backward_coefficients(const double* sdy, const double* sdyx,
                                 const double* invstd, const double* gamma, Py_ssize_t C,
                                 double count, double* a_out, double* b_out, double* k_out,
                                 double* dgamma_out) noexcept nogil:
    # dx = a*dy + b*xhat + k; each product grouped so that every factor is O(1) or
    # O(dy) whatever x's magnitude (see backward_coefficients).
    cdef Py_ssize_t c
    cdef double s, g
    for c in range(C):
        g = gamma[c] if gamma != NULL else 1.0
        s = invstd[c]
        dgamma_out[c] = sdyx[c] * s
        a_out[c] = g * s
        b_out[c] = -(g * s) * ((s * sdyx[c]) / count)
        k_out[c] = -(g * s) * (sdy[c] / count)


def backward_coefficients(const double[::1] sdy,     # IN (C,) sum of dy
                          const double[::1] sdyx,    # IN (C,) sum of dy * (x - mean)
                          const double[::1] invstd,  # IN (C,)
                          const double[::1] gamma,   # IN (C,) or None (ones)
                          double count,              # IN values per channel
                          double[::1] a_out,         # OUT (C,) coefficient of dy
                          double[::1] b_out,         # OUT (C,) coefficient of xhat
                          double[::1] k_out,         # OUT (C,) constant term
                          double[::1] dgamma_out):   # OUT (C,) sum of dy * x-hat
    """Coefficients of dx = a*dy + b*xhat + k, xhat = (x - mean)*invstd (the closed
    form, see docs/derivation.md), grouped so that no product under- or overflows
    before the result would: every factor is O(1) or O(dy)."""
    with nogil:
        _backward_coefficients(&sdy[0], &sdyx[0], &invstd[0],
                               &gamma[0] if gamma is not None else NULL, sdy.shape[0],
                               count, &a_out[0], &b_out[0], &k_out[0], &dgamma_out[0])


cdef int _backward_core(const floating* dy, const floating* x, Py_ssize_t N, Py_ssize_t C,
                        Py_ssize_t S, const double* mean, const double* invstd,
                        const double* gamma, floating* dx_out, double* sdy_out,
                        double* dgamma_out, double* work, int n_threads) noexcept nogil:
    # grad_sums, backward_coefficients, grad_input; gamma may be NULL (ones), work
    # holds 4 * C doubles. Returns 0, or -1 when a work buffer could not be allocated.
    cdef int rc
    rc = _grad_sums(dy, x, mean, N, C, S, sdy_out, work, n_threads)
    if rc != 0:
        return rc
    _backward_coefficients(sdy_out, work, invstd, gamma, C, <double> (N * S), work + C,
                           work + 2 * C, work + 3 * C, dgamma_out)
    return _grad_input(dy, x, mean, invstd, work + C, work + 2 * C, work + 3 * C, N, C, S,
                       dx_out, n_threads)


def backward_train(const floating[:, :, ::1] dy,   # IN (N, C, S)
                   const floating[:, :, ::1] x,    # IN (N, C, S)
                   const double[::1] mean,         # IN (C,)
                   const double[::1] invstd,       # IN (C,)
                   const double[::1] gamma,        # IN (C,) or None (ones)
                   floating[:, :, ::1] dx_out,     # OUT (N, C, S), may be dy or x
                   double[::1] sdy_out,            # OUT (C,) sum of dy (= dbeta)
                   double[::1] dgamma_out,         # OUT (C,)
                   int n_threads):
    """grad_sums, backward_coefficients and grad_input in one call (one fused-type
    dispatch instead of three)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef int rc
    cdef double* work = <double*> malloc(4 * C * sizeof(double))
    if work == NULL:
        raise MemoryError("bncy: could not allocate the per-channel coefficients")
    with nogil:
        rc = _backward_core(&dy[0, 0, 0], &x[0, 0, 0], N, C, S, &mean[0], &invstd[0],
                            &gamma[0] if gamma is not None else NULL, &dx_out[0, 0, 0],
                            &sdy_out[0], &dgamma_out[0], work, n_threads)
    free(work)
    if rc != 0:
        raise MemoryError("bncy: could not allocate the partial sums")


cdef int _inference_core(const floating* x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                         const double* running_mean, const double* running_var,
                         const double* gamma, const double* beta, double eps,
                         floating* y_out, double* work, int n_threads) noexcept nogil:
    # scale = gamma / sqrt(running_var + eps), then the affine pass; gamma and beta
    # may be NULL (ones, zeros), work holds 2 * C doubles. Returns 0, or -1 when a
    # work buffer could not be allocated.
    cdef Py_ssize_t c
    for c in range(C):
        work[c] = 1.0 / sqrt(running_var[c] + eps)
        if gamma != NULL:
            work[c] = work[c] * gamma[c]
        work[C + c] = beta[c] if beta != NULL else 0.0
    return _affine(x, running_mean, work, work + C, N, C, S, y_out, n_threads)


def inference_train(const floating[:, :, ::1] x,   # IN (N, C, S)
                    const double[::1] running_mean, const double[::1] running_var,
                    const double[::1] gamma,        # IN (C,) or None (ones)
                    const double[::1] beta,         # IN (C,) or None (zeros)
                    double eps,
                    floating[:, :, ::1] y_out,      # OUT (N, C, S), may be x itself
                    int n_threads):
    """y = (x - running_mean) * gamma / sqrt(running_var + eps) + beta: the scale and
    the affine pass in one call (bncy.inference)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef int rc
    cdef double* work = <double*> malloc(2 * C * sizeof(double))
    if work == NULL:
        raise MemoryError("bncy: could not allocate the per-channel coefficients")
    with nogil:
        rc = _inference_core(&x[0, 0, 0], N, C, S, &running_mean[0], &running_var[0],
                             &gamma[0] if gamma is not None else NULL,
                             &beta[0] if beta is not None else NULL, eps,
                             &y_out[0, 0, 0], work, n_threads)
    free(work)
    if rc != 0:
        raise MemoryError("bncy: could not allocate the per-column coefficients")


# ---------------------------------------------------------------------------
# Memory-bandwidth probes for bncy.bench (same compiler, flags and threads)
# ---------------------------------------------------------------------------

def stream_read(const floating[::1] x, int n_threads):
    """Sum of x in SEG-sized chunks (a read-only sweep); returns the sum."""
    cdef Py_ssize_t n = x.shape[0], nb = _cdiv(n, SEG), b
    cdef double total = 0.0
    with nogil:
        for b in prange(nb, schedule='static', num_threads=n_threads,
                        use_threads_if=n_threads > 1):
            total += _run_sum(&x[b * SEG], _imin(SEG, n - b * SEG))
    return total


def stream_scale(const floating[::1] x, floating[::1] y_out, int n_threads):
    """y = 2 * x (one read and one write sweep)."""
    cdef Py_ssize_t n = x.shape[0], i
    with nogil:
        for i in prange(n, schedule='static', num_threads=n_threads,
                        use_threads_if=n_threads > 1):
            y_out[i] = x[i] * 2


ctypedef fused stat_t:
    float
    double


def ema_update(stat_t[:] r,             # IN/OUT (C,) a running statistic, any stride
               const double[::1] v,      # IN (C,) this batch's value (before factor)
               double momentum, double factor):
    """r = (1 - momentum) * r + momentum * (factor * v), in float64."""
    cdef Py_ssize_t c
    with nogil:
        for c in range(r.shape[0]):
            r[c] = <stat_t> ((1.0 - momentum) * r[c] + momentum * (factor * v[c]))


# ---------------------------------------------------------------------------
# Fast paths: bncy.forward, inference and backward for the plain call, checked in C
# ---------------------------------------------------------------------------
# A small call spent more time in bncy._api's Python checks and allocations
# (4-5 us) than in the kernels. These take the public arguments as given and run
# only when each one is the plain case: exact ndarrays of native float32/float64,
# C-contiguous and aligned; vectors of shape (C,); a float eps >= 0 and a float
# momentum in [0, 1]; running statistics both given and writeable, or neither;
# n_threads None or an int >= 1; enough values per channel; out None or a plain
# writeable array of x's shape and dtype that does not partly overlap the inputs
# (it may be x or dy itself: the kernels write element i after reading it). For
# anything else they return None before allocating or writing anything, and
# bncy._api takes its general path, which raises the error or normalises the
# layout. Both paths run the same cores (_forward_core, _backward_core,
# _inference_core), so they return the same bits. The C work buffer is taken
# last, after every check and every allocation that could raise, so it is always
# freed.

cimport numpy as cnp
from libc.math cimport isfinite
from libc.string cimport memcpy, memset

from bncy._buffers cimport new_array

cnp.import_array()

cdef enum:
    MAX_FAST_THREADS = 4096


cdef int _plain_type(object a) noexcept:
    # NPY_FLOAT32 or NPY_FLOAT64 for an exact ndarray of native floats, C-contiguous
    # and aligned; -1 for anything else.
    cdef cnp.ndarray arr
    cdef int t
    if not cnp.PyArray_CheckExact(a):
        return -1
    arr = <cnp.ndarray> a
    t = cnp.PyArray_TYPE(arr)
    if t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64:
        return -1
    if not (cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISALIGNED(arr)
            and cnp.PyArray_ISNOTSWAPPED(arr)):
        return -1
    return t


cdef int _plain_vector(object v, Py_ssize_t C) noexcept:
    # _plain_type of v when it has shape (C,); else -1.
    cdef int t = _plain_type(v)
    if t < 0 or cnp.PyArray_NDIM(<cnp.ndarray> v) != 1:
        return -1
    if cnp.PyArray_DIMS(<cnp.ndarray> v)[0] != C:
        return -1
    return t


cdef void _copy_f64(object v, Py_ssize_t C, double* out) noexcept:
    # out[0:C] = v in float64, for a vector _plain_vector(v, C) accepted.
    cdef const float* f
    cdef Py_ssize_t c
    if cnp.PyArray_TYPE(<cnp.ndarray> v) == cnp.NPY_FLOAT64:
        memcpy(out, cnp.PyArray_DATA(<cnp.ndarray> v), C * sizeof(double))
    else:
        f = <const float*> cnp.PyArray_DATA(<cnp.ndarray> v)
        for c in range(C):
            out[c] = f[c]


cdef bint _same_shape(object a, object b) noexcept:
    # Two ndarrays of the same shape.
    cdef int i, nd = cnp.PyArray_NDIM(<cnp.ndarray> a)
    if cnp.PyArray_NDIM(<cnp.ndarray> b) != nd:
        return False
    for i in range(nd):
        if cnp.PyArray_DIMS(<cnp.ndarray> a)[i] != cnp.PyArray_DIMS(<cnp.ndarray> b)[i]:
            return False
    return True


cdef int _fast_eps(object eps, double* e) noexcept:
    # *e = eps for a float that is finite and >= 0 (0), else -1.
    if type(eps) is not float:
        return -1
    e[0] = eps
    return 0 if isfinite(e[0]) and e[0] >= 0.0 else -1


cdef int _fast_threads(object n_threads, Py_ssize_t size, Py_ssize_t small_work):
    # bncy._api._resolve_threads for None or an int in [1, MAX_FAST_THREADS]; 0
    # for anything else (the general path checks it).
    cdef int nt
    if n_threads is None:
        nt = omp_get_max_threads()
    elif type(n_threads) is int and 1 <= n_threads <= MAX_FAST_THREADS:
        nt = n_threads
    else:
        return 0
    return 1 if size < small_work else nt


cdef int _fast_ncs(object x, object axis, Py_ssize_t* ncs) noexcept:
    # (N, C, S) of a plain array of 2 or more dimensions around an int axis.
    cdef cnp.ndarray arr = <cnp.ndarray> x
    cdef int nd = cnp.PyArray_NDIM(arr), i
    cdef long ax
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(arr)
    if nd < 2 or type(axis) is not int or not -nd <= axis < nd:
        return -1
    ax = axis
    if ax < 0:
        ax += nd
    ncs[0] = 1
    ncs[1] = dims[ax]
    ncs[2] = 1
    for i in range(ax):
        ncs[0] *= dims[i]
    for i in range(ax + 1, nd):
        ncs[2] *= dims[i]
    return 0


cdef void* _plain_out(object out, object x, int t) noexcept:
    # out's data when it can take x's result in place of a fresh array: a plain
    # writeable array of x's dtype and shape, not overlapping x unless it is x's
    # very memory (the kernels allow out[i] to be x[i]); else NULL.
    cdef cnp.ndarray o, a = <cnp.ndarray> x
    cdef char* po
    cdef char* px
    cdef Py_ssize_t nbytes
    if _plain_type(out) != t:
        return NULL
    o = <cnp.ndarray> out
    if not cnp.PyArray_ISWRITEABLE(o) or not _same_shape(o, a):
        return NULL
    po, px = <char*> cnp.PyArray_DATA(o), <char*> cnp.PyArray_DATA(a)
    nbytes = cnp.PyArray_NBYTES(a)
    if po != px and po < px + nbytes and px < po + nbytes:
        return NULL
    return po


cdef cnp.ndarray _out_or_new(object out, object x, int t):
    # out when given (already accepted by _plain_out), else a new array of x's
    # shape and dtype t (from bncy._buffers' cache when large).
    if out is not None:
        return <cnp.ndarray> out
    return new_array(cnp.PyArray_NDIM(<cnp.ndarray> x), cnp.PyArray_DIMS(<cnp.ndarray> x), t)


cdef void _ema(void* r, int t, const double* v, Py_ssize_t C, double momentum,
               double factor) noexcept nogil:
    # r = (1 - momentum) * r + momentum * (factor * v): ema_update's operations.
    cdef Py_ssize_t c
    cdef float* rf = <float*> r
    cdef double* rd = <double*> r
    if t == cnp.NPY_FLOAT32:
        for c in range(C):
            rf[c] = <float> ((1.0 - momentum) * rf[c] + momentum * (factor * v[c]))
    else:
        for c in range(C):
            rd[c] = (1.0 - momentum) * rd[c] + momentum * (factor * v[c])


def forward_fast(x, gamma, beta, eps, axis, running_mean, running_var, momentum, out,
                 n_threads, Py_ssize_t small_work, Py_ssize_t f64_limit):
    """bncy.forward(x, gamma, beta, eps=eps, axis=axis, running_mean=..., running_var=...,
    momentum=..., out=..., n_threads=...) for a plain call (see Fast paths):
    (y, mean, invstd); None, with nothing written, for any other call or a float64 x
    beyond f64_limit bytes."""
    cdef int t = _plain_type(x), trm = -1, trv = -1, nt, rc, suspicious = 0
    cdef Py_ssize_t ncs[3]
    cdef Py_ssize_t N, C, S, size
    cdef double e, mom = 0.0
    cdef double* work
    cdef double* gam = NULL
    cdef void* prm = NULL
    cdef void* prv = NULL
    cdef void* px
    cdef void* py
    cdef double* pmean
    cdef double* pinvstd
    cdef cnp.ndarray y, mean, invstd
    if t < 0 or _fast_ncs(x, axis, ncs) < 0:
        return None
    N, C, S = ncs[0], ncs[1], ncs[2]
    size = N * C * S
    if C < 1 or N * S < 2 or (t == cnp.NPY_FLOAT64 and 8 * size > f64_limit):
        return None
    if _fast_eps(eps, &e) < 0:
        return None
    if running_mean is not None or running_var is not None:
        trm = _plain_vector(running_mean, C)
        trv = _plain_vector(running_var, C)
        if (trm < 0 or trv < 0 or type(momentum) is not float
                or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray> running_mean)
                or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray> running_var)):
            return None
        mom = momentum
        if not 0.0 <= mom <= 1.0:
            return None
        prm = cnp.PyArray_DATA(<cnp.ndarray> running_mean)
        prv = cnp.PyArray_DATA(<cnp.ndarray> running_var)
    nt = _fast_threads(n_threads, size, small_work)
    if nt == 0:
        return None
    if out is not None and _plain_out(out, x, t) == NULL:
        return None
    if ((gamma is not None and _plain_vector(gamma, C) < 0)
            or (beta is not None and _plain_vector(beta, C) < 0)):
        return None
    y = _out_or_new(out, x, t)
    py = cnp.PyArray_DATA(y)
    mean = cnp.PyArray_EMPTY(1, <cnp.npy_intp*> &C, cnp.NPY_FLOAT64, 0)
    invstd = cnp.PyArray_EMPTY(1, <cnp.npy_intp*> &C, cnp.NPY_FLOAT64, 0)
    px = cnp.PyArray_DATA(<cnp.ndarray> x)
    pmean = <double*> cnp.PyArray_DATA(mean)
    pinvstd = <double*> cnp.PyArray_DATA(invstd)
    # gamma, shift, m2, var, scale (nothing from here on raises: work is freed)
    work = <double*> malloc(5 * C * sizeof(double))
    if work == NULL:
        return None
    if gamma is not None:
        _copy_f64(gamma, C, work)
        gam = work
    if beta is None:
        memset(work + C, 0, C * sizeof(double))
    else:
        _copy_f64(beta, C, work + C)
    with nogil:
        if t == cnp.NPY_FLOAT32:
            rc = _forward_core(<const float*> px, N, C, S, gam, work + C, e, <float*> py,
                               pmean, work + 2 * C, work + 3 * C, pinvstd, work + 4 * C,
                               nt, &suspicious)
        else:
            rc = _forward_core(<const double*> px, N, C, S, gam, work + C, e, <double*> py,
                               pmean, work + 2 * C, work + 3 * C, pinvstd, work + 4 * C,
                               nt, &suspicious)
        if rc == 0 and suspicious == 0 and prm != NULL:
            # the unbiased batch variance: m2 / (count - 1)
            _ema(prm, trm, pmean, C, mom, 1.0)
            _ema(prv, trv, work + 2 * C, C, mom, 1.0 / <double> (N * S - 1))
    free(work)
    if rc != 0 or suspicious != 0:
        return None   # the general path allocates again (and raises) or rescues
    return y, mean, invstd


def backward_fast(dy, x, mean, invstd, gamma, axis, out, n_threads,
                  Py_ssize_t small_work, Py_ssize_t f64_limit):
    """bncy.backward(dy, x, mean, invstd, gamma, axis=axis, out=..., n_threads=...) for
    a plain call (see Fast paths): (dx, dgamma, dbeta); None, with nothing written,
    for any other call or a float64 x beyond f64_limit bytes."""
    cdef int t = _plain_type(x), nt, rc
    cdef Py_ssize_t ncs[3]
    cdef Py_ssize_t N, C, S, size, c
    cdef double* work
    cdef double* gam = NULL
    cdef void* pdy
    cdef void* px
    cdef void* pdx
    cdef void* pdg
    cdef void* pdb
    cdef cnp.ndarray dx, dgamma, dbeta
    if (t < 0 or _plain_type(dy) != t or not _same_shape(dy, x)
            or _fast_ncs(x, axis, ncs) < 0):
        return None
    N, C, S = ncs[0], ncs[1], ncs[2]
    size = N * C * S
    if C < 1 or size < 1 or (t == cnp.NPY_FLOAT64 and 8 * size > f64_limit):
        return None
    nt = _fast_threads(n_threads, size, small_work)
    if nt == 0:
        return None
    if out is not None and (_plain_out(out, x, t) == NULL   # may be x or dy itself,
                            or _plain_out(out, dy, t) == NULL):  # never a partial overlap
        return None
    if (_plain_vector(mean, C) < 0 or _plain_vector(invstd, C) < 0
            or (gamma is not None and _plain_vector(gamma, C) < 0)):
        return None
    dx = _out_or_new(out, x, t)
    pdx = cnp.PyArray_DATA(dx)
    dgamma = cnp.PyArray_EMPTY(1, <cnp.npy_intp*> &C, t, 0)
    dbeta = cnp.PyArray_EMPTY(1, <cnp.npy_intp*> &C, t, 0)
    pdy, px = cnp.PyArray_DATA(<cnp.ndarray> dy), cnp.PyArray_DATA(<cnp.ndarray> x)
    pdg, pdb = cnp.PyArray_DATA(dgamma), cnp.PyArray_DATA(dbeta)
    # mean, invstd, gamma, sdy, dgamma, 4 * C of _backward_core's work (nothing from
    # here on raises: work is freed)
    work = <double*> malloc(9 * C * sizeof(double))
    if work == NULL:
        return None
    _copy_f64(mean, C, work)
    _copy_f64(invstd, C, work + C)
    if gamma is not None:
        _copy_f64(gamma, C, work + 2 * C)
        gam = work + 2 * C
    with nogil:
        if t == cnp.NPY_FLOAT32:
            rc = _backward_core(<const float*> pdy, <const float*> px, N, C, S, work,
                                work + C, gam, <float*> pdx, work + 3 * C, work + 4 * C,
                                work + 5 * C, nt)
            for c in range(C):
                (<float*> pdg)[c] = <float> work[4 * C + c]
                (<float*> pdb)[c] = <float> work[3 * C + c]
        else:
            rc = _backward_core(<const double*> pdy, <const double*> px, N, C, S, work,
                                work + C, gam, <double*> pdx, work + 3 * C, work + 4 * C,
                                work + 5 * C, nt)
            memcpy(pdg, work + 4 * C, C * sizeof(double))
            memcpy(pdb, work + 3 * C, C * sizeof(double))
    free(work)
    if rc != 0:
        return None   # the general path allocates again, and raises
    return dx, dgamma, dbeta


def inference_fast(x, running_mean, running_var, gamma, beta, eps, axis, out, n_threads,
                   Py_ssize_t small_work, Py_ssize_t f64_limit):
    """bncy.inference(x, running_mean, running_var, gamma, beta, eps=eps, axis=axis,
    out=..., n_threads=...) for a plain call (see Fast paths): y; None, with nothing
    written, for any other call or a float64 x beyond f64_limit bytes."""
    cdef int t = _plain_type(x), nt, rc
    cdef Py_ssize_t ncs[3]
    cdef Py_ssize_t N, C, S, size
    cdef double e
    cdef double* work
    cdef double* gam = NULL
    cdef double* bet = NULL
    cdef void* px
    cdef void* py
    cdef cnp.ndarray y
    if t < 0 or _fast_ncs(x, axis, ncs) < 0:
        return None
    N, C, S = ncs[0], ncs[1], ncs[2]
    size = N * C * S
    if C < 1 or size < 1 or (t == cnp.NPY_FLOAT64 and 8 * size > f64_limit):
        return None
    if _fast_eps(eps, &e) < 0:
        return None
    nt = _fast_threads(n_threads, size, small_work)
    if nt == 0:
        return None
    if out is not None and _plain_out(out, x, t) == NULL:
        return None
    if (_plain_vector(running_mean, C) < 0 or _plain_vector(running_var, C) < 0
            or (gamma is not None and _plain_vector(gamma, C) < 0)
            or (beta is not None and _plain_vector(beta, C) < 0)):
        return None
    y = _out_or_new(out, x, t)
    py = cnp.PyArray_DATA(y)
    px = cnp.PyArray_DATA(<cnp.ndarray> x)
    # running_mean, running_var, gamma, beta, 2 * C of _inference_core's work
    # (nothing from here on raises: work is freed)
    work = <double*> malloc(6 * C * sizeof(double))
    if work == NULL:
        return None
    _copy_f64(running_mean, C, work)
    _copy_f64(running_var, C, work + C)
    if gamma is not None:
        _copy_f64(gamma, C, work + 2 * C)
        gam = work + 2 * C
    if beta is not None:
        _copy_f64(beta, C, work + 3 * C)
        bet = work + 3 * C
    with nogil:
        if t == cnp.NPY_FLOAT32:
            rc = _inference_core(<const float*> px, N, C, S, work, work + C, gam, bet, e,
                                 <float*> py, work + 4 * C, nt)
        else:
            rc = _inference_core(<const double*> px, N, C, S, work, work + C, gam, bet, e,
                                 <double*> py, work + 4 * C, nt)
    free(work)
    if rc != 0:
        return None   # the general path allocates again, and raises
    return y

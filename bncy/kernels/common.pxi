# The kernels of bncy, compiled three times: bncy/_kernels.pyx (baseline ISA),
# bncy/_kernels_avx2.pyx (-mavx2 -mf16c) and bncy/_kernels_avx512.pyx (AVX-512
# and F16C, 512-bit vectors) on x86-64; bncy._api picks per call among those the CPU runs.
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
#   while the per-column coefficients fit in L1 (grad_input: gi_chunk_coef
#   bytes, half a core's L2 on CPUs without AVX-512), and groups of rows (as many as
#   one L1 set holds lines of the arrays streamed, _ew_chunk_rows) through chunks of
#   CHUNK columns beyond (see _rows_affine_block);
#   narrow rows (K < 16) go R at a time as one row of R*K columns (see
#   _flat_rows); their statistics likewise, each column then merged from its R
#   copies in a fixed order (see _moments_rows_narrow).
#   Prefetching twins (same sums, same order, plus hints for rows ahead) serve
#   large arrays: the float32 backward sums of whole-row blocks beyond L2
#   (_rows_grad_sums_ahead), grad_input on rows whose coefficients fill most of
#   L1, beyond half of L3 (_rows_grad_input_ahead), and the
#   moments of whole-row blocks of short rows beyond 3/4 of L3
#   (_rows_moments_ahead). Likewise the backward through ReLU with a residual
#   writes the residual's gradient in the sums pass beyond L2 and reads it back
#   as dy for dx, else in the masked dx pass (_backward_core). knobs.pxi holds
#   each gate.
# * planes: each (n, c) is a contiguous run of S values, cut
#   into segments of at most SEG values. A block is one segment; sums along it use
#   NACC interleaved float64 accumulators in a fixed pattern, added pairwise.
#   The float64 backward beyond group_bytes takes its channels in groups, each
#   group's sums then its dx (_backward_core, _bwd_group): the passes see the
#   group as an (N, G, S) array whose planes are P = C * S apart.
#   float32 grad_input on one thread asks for dy, x and dx ahead from
#   gi_planes_min_bytes (_grad_input_planes; L2 where the CPU has AVX-512, else
#   off), and float64 moments beyond L2 ask for the next segment while they sum
#   the squared deviations of this one (_run_sqdev).
#
# Precision. Statistics accumulate in float64 whatever the input dtype, and never
# as E[x^2] - E[x]^2 about zero. Rows blocks sum x - p and (x - p)**2 with p the
# block's first row, which bounds the cancellation by a factor 1 + ROW_BLOCK
# whatever the data (see _block_col_moments); float32 planes segments likewise,
# in pieces of RUN_PIECE values shifted by their first value (_run_moments);
# float64 segments (in L1) are two-pass: segment mean, then squared deviations
# about it. Blocks are merged with Chan's
# formula, which is exact for unequal counts. Every partial mean is relative to
# its channel's shift, the channel's first value x[0, c, 0] (_moments): Chan's
# merge carries a partial mean's rounding error into M2, and so it is relative
# to the data's spread, not its magnitude (a mean of 1e8 + N(0, 1) rounded to
# float64 is off by up to 7e-9). The elementwise passes compute
# (x - center) in float64 and round once when storing.
#
# Storage. x, dy, y and dx are float32, float64, float16 or bfloat16 (the last two
# as their bits, see _ld and _st). 16-bit values widen exactly to float32, and the
# 16-bit statistics take float32's schedule and code: they equal float32's on the
# widened values, bit for bit. Their elementwise passes go PIECE16 values at a
# time through stack buffers (_affine_run16, _gi_run16): loads widened by
# _widen, float64 values rounded once by _narrow (8 at a time in registers with
# AVX2 and F16C, the same bits as the portable arithmetic, NaN payloads
# included); their planes statistics widen each
# segment first. gcc vectorised the per-value conversions (_ld, _st) poorly when
# inlined into the arithmetic loops (docs/tuning.md).
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
from libc.float cimport DBL_MIN
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
    PIECE16 = 64         # values per staged piece of a 16-bit elementwise pass
    PAD = 24             # doubles between expanded coefficient vectors: vectors
                         # 4 KiB apart alias in L1

BLOCKING = {"ROW_BLOCK": ROW_BLOCK, "COL_TILE": COL_TILE, "MIN_TILE": MIN_TILE, "SEG": SEG,
            "ROWS_MAX_RUN": ROWS_MAX_RUN, "RED_ROWS_MAX_RUN": RED_ROWS_MAX_RUN}



cdef extern from *:
    """
    #if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    static int bncy_cpu_has_avx2(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    }
    /* libgcc also checks that the OS saves the zmm registers (XGETBV) */
    static int bncy_cpu_has_avx512(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd")
            && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")
            && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c");
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
    """True when this CPU (and OS) supports AVX2 and F16C."""
    return bool(bncy_cpu_has_avx2())


def cpu_has_avx512():
    """True when this CPU (and OS) supports AVX-512 F, CD, BW, DQ and VL, and F16C."""
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


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <math.h>
    /* 16-bit storage. float16 and bfloat16 values travel as their bit patterns
       (uint16 and int16: NumPy cannot pass bfloat16 through the buffer
       protocol). Loads widen exactly. Stores round the float64 value once, to
       nearest even, in two steps: first to odd at P significant bits (P = 13
       for float16, 10 for bfloat16: the bits below are dropped and the lowest
       kept one set when any was nonzero), a value float32 holds exactly; then
       float32 to the target, to nearest even. Rounding to odd with at least 2
       more bits than the target makes the second rounding the correctly
       rounded one (Boldo and Melquiond), subnormals and overflow included.
       Branch-free integer and float arithmetic that gcc vectorises on every
       ISA; every build computes the same bits. */
    static inline uint32_t bncy_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
    static inline float bncy_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
    static inline double bncy_f16_load(uint16_t h) {
        /* the exponent rebiased by a multiplication by 2**112 (exact, also
           for subnormals); exponent 31 (inf, NaN) lands at or above 2**16 */
        float f = bncy_bits_f32((uint32_t) (h & 0x7fffu) << 13) * 0x1p112f;
        uint32_t o = bncy_f32_bits(f);
        o |= (f >= 65536.0f) ? 0x7f800000u : 0u;
        o |= (uint32_t) (h & 0x8000u) << 16;
        return (double) bncy_bits_f32(o);
    }
    static inline double bncy_bf16_load(int16_t h) {
        return (double) bncy_bits_f32((uint32_t) (uint16_t) h << 16);
    }
    static inline uint32_t bncy_odd_f32(double d, int drop) {
        /* d rounded to odd at 53 - drop significant bits, as float32 bits:
           (u | ((u & m) + m)) sets bit drop when a dropped bit is nonzero */
        uint64_t u, m = ((uint64_t) 1 << drop) - 1;
        double t;
        memcpy(&u, &d, 8);
        u = (u | ((u & m) + m)) & ~m;
        memcpy(&t, &u, 8);
        return bncy_f32_bits((float) t);
    }
    static inline uint16_t bncy_f16_store(double d) {
        uint32_t u = bncy_odd_f32(d, 40), sign = u & 0x80000000u, n, s, m, o, big;
        u ^= sign;
        /* normal: rebias (127 - 15) << 23, round the 13 dropped bits to even */
        n = (u + 0xc8000fffu + ((u >> 13) & 1u)) >> 13;
        /* below 2**-14: the float add of 0.5 rounds to the subnormal's unit */
        s = bncy_f32_bits(bncy_bits_f32(u) + 0.5f) - 0x3f000000u;
        m = 0u - (uint32_t) (u < 0x38800000u);
        o = (s & m) | (n & ~m);
        /* 2**16 and above: inf; NaN quiet, with the top 10 bits of its
           payload (F16C's and NumPy's NaN, so that every build agrees) */
        big = 0x7c00u | ((0u - (uint32_t) (u > 0x7f800000u)) & (0x200u | ((u >> 13) & 0x3ffu)));
        m = 0u - (uint32_t) (u >= 0x47800000u);
        o = (big & m) | (o & ~m);
        return (uint16_t) (o | (sign >> 16));
    }
    static inline int16_t bncy_bf16_store(double d) {
        uint32_t u = bncy_odd_f32(d, 43);
        uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        uint32_t q = (u >> 16) | 0x40u;   /* NaN: quiet, sign kept */
        uint32_t m = 0u - (uint32_t) ((u & 0x7fffffffu) > 0x7f800000u);
        return (int16_t) (uint16_t) ((q & m) | (r & ~m));
    }
    #if defined(__F16C__) || defined(__AVX2__)
    #include <immintrin.h>
    #endif
    static inline float bncy_f16_f32(uint16_t h) { return (float) bncy_f16_load(h); }
    /* The staged conversions of the 16-bit passes: n values between the array
       and a float32 (load) or float64 (store) buffer. F16C (AVX2 and AVX-512 builds) converts 8 float16 values an
       instruction; it rounds float32 to float16 to nearest even, as the portable
       arithmetic does, so every build stores the same bits. */
    static inline void bncy_widen_f16(const uint16_t* h, float* f, Py_ssize_t n) {
        Py_ssize_t i = 0;
    #if defined(__F16C__)
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*) (h + i))));
    #endif
        for (; i < n; i++)
            f[i] = bncy_f16_f32(h[i]);
    }
    static inline void bncy_widen_bf16(const int16_t* h, float* f, Py_ssize_t n) {
        Py_ssize_t i;
        for (i = 0; i < n; i++)
            f[i] = bncy_bits_f32((uint32_t) (uint16_t) h[i] << 16);
    }
    #if defined(__AVX2__)
    /* bncy_odd_f32 of d[0:8] as 8 float32 values, in registers: the same
       integer steps on the float64 bits, then the (exact) conversion */
    static inline __m256 bncy_odd8(const double* d, int drop) {
        const __m256i m = _mm256_set1_epi64x((long long) (((uint64_t) 1 << drop) - 1));
        __m256i a = _mm256_castpd_si256(_mm256_loadu_pd(d));
        __m256i b = _mm256_castpd_si256(_mm256_loadu_pd(d + 4));
        a = _mm256_andnot_si256(m, _mm256_or_si256(a, _mm256_add_epi64(_mm256_and_si256(a, m), m)));
        b = _mm256_andnot_si256(m, _mm256_or_si256(b, _mm256_add_epi64(_mm256_and_si256(b, m), m)));
        return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm256_cvtpd_ps(_mm256_castsi256_pd(a))),
                                    _mm256_cvtpd_ps(_mm256_castsi256_pd(b)), 1);
    }
    #endif
    /* d[0:n] rounded once to float16 (bfloat16): 8 values at a time in
       registers where the build has AVX2 (odd rounding, then F16C, or the
       integer rounding of bncy_bf16_store), the rest one by one. */
    static inline void bncy_narrow_f16(const double* d, uint16_t* h, Py_ssize_t n) {
        Py_ssize_t i = 0;
    #if defined(__AVX2__) && defined(__F16C__)
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i*) (h + i), _mm256_cvtps_ph(bncy_odd8(d + i, 40), 0));
    #endif
        for (; i < n; i++)
            h[i] = bncy_f16_store(d[i]);
    }
    static inline void bncy_narrow_bf16(const double* d, int16_t* h, Py_ssize_t n) {
        Py_ssize_t i = 0;
    #if defined(__AVX2__)
        for (; i + 8 <= n; i += 8) {
            __m256i v = _mm256_castps_si256(bncy_odd8(d + i, 43));
            __m256i top = _mm256_srli_epi32(v, 16);
            __m256i rv = _mm256_srli_epi32(_mm256_add_epi32(
                _mm256_add_epi32(v, _mm256_set1_epi32(0x7fff)),
                _mm256_and_si256(top, _mm256_set1_epi32(1))), 16);
            __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0x7fffffff)),
                                             _mm256_set1_epi32(0x7f800000));
            rv = _mm256_blendv_epi8(rv, _mm256_or_si256(top, _mm256_set1_epi32(0x40)), nan);
            _mm_storeu_si128((__m128i*) (h + i),
                             _mm_packus_epi32(_mm256_castsi256_si128(rv),
                                              _mm256_extracti128_si256(rv, 1)));
        }
    #endif
        for (; i < n; i++)
            h[i] = bncy_bf16_store(d[i]);
    }
    """
    double bncy_f16_load(unsigned short h) noexcept nogil
    double bncy_bf16_load(short h) noexcept nogil
    unsigned short bncy_f16_store(double d) noexcept nogil
    short bncy_bf16_store(double d) noexcept nogil
    void bncy_widen_f16(const unsigned short* h, float* f, Py_ssize_t n) noexcept nogil
    void bncy_widen_bf16(const short* h, float* f, Py_ssize_t n) noexcept nogil
    void bncy_narrow_f16(const double* d, unsigned short* h, Py_ssize_t n) noexcept nogil
    void bncy_narrow_bf16(const double* d, short* h, Py_ssize_t n) noexcept nogil


# The storage types of x, dy, y and dx. float16 and bfloat16 arrive as their
# bits (see above); every read of a stored value goes through _ld, every write
# through _st. Statistics and coefficients are float64 for all four.
ctypedef unsigned short f16_bits
ctypedef short bf16_bits

ctypedef fused stored:
    float
    double
    f16_bits
    bf16_bits


cdef inline double _ld(stored v) noexcept nogil:
    # A stored value, widened exactly to float64.
    if stored is f16_bits:
        return bncy_f16_load(v)
    elif stored is bf16_bits:
        return bncy_bf16_load(v)
    else:
        return v


cdef inline void _widen(const stored* p, float* out, Py_ssize_t n) noexcept nogil:
    # out[0:n] = p[0:n] widened exactly (16-bit storage only).
    if stored is f16_bits:
        bncy_widen_f16(p, out, n)
    elif stored is bf16_bits:
        bncy_widen_bf16(p, out, n)


cdef inline void _narrow(const double* v, stored* p, Py_ssize_t n) noexcept nogil:
    # p[0:n] = v[0:n], each rounded once as _st does (16-bit storage only).
    if stored is f16_bits:
        bncy_narrow_f16(v, p, n)
    elif stored is bf16_bits:
        bncy_narrow_bf16(v, p, n)


cdef inline void _st(stored* p, double v) noexcept nogil:
    # *p = v rounded once to the storage type, to nearest even.
    if stored is f16_bits:
        p[0] = bncy_f16_store(v)
    elif stored is bf16_bits:
        p[0] = bncy_bf16_store(v)
    else:
        p[0] = <stored> v


cdef inline double _masked(bint keep, stored g) noexcept nogil:
    # g where keep, else +0.0: bncy_select's bit mask for the narrow types, where
    # the conversion to float64 would sit in the branch; a select for float64,
    # which has none (gcc left the float64 residual loops scalar with the mask).
    if stored is double:
        return g if keep else 0.0
    return bncy_select(keep, _ld(g))


cdef inline double _rounds_above_zero(stored v) noexcept nogil:
    # The float64 values w that store (_st) as > 0 are those w > this (round to
    # nearest even: half the least subnormal rounds to 0), so the ReLU mask is a
    # float64 compare, without rounding first (v only picks the type).
    if stored is float:
        return 7.0064923216240854e-46   # 2**-150
    elif stored is f16_bits:
        return 2.9802322387695312e-08   # 2**-25
    elif stored is bf16_bits:
        return 4.591774807899561e-41    # 2**-134
    return 0.0


cdef inline Py_ssize_t _cdiv(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline Py_ssize_t _imin(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a < b else b


cdef inline Py_ssize_t _imax(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a > b else b


# p + off, or NULL for none (optional arrays and per-channel vectors)
cdef inline stored* _at(stored* p, Py_ssize_t off) noexcept nogil:
    return p + off if p != NULL else NULL


cdef inline const stored* _cat(const stored* p, Py_ssize_t off) noexcept nogil:
    return p + off if p != NULL else NULL


cdef inline const double* _cd(const double* p, Py_ssize_t off) noexcept nogil:
    return p + off if p != NULL else NULL


cdef inline void _prefetch_run(const stored* p, Py_ssize_t n) noexcept nogil:
    # Ask for the cache lines of p[0:n], n >= 1, which a later iteration reads.
    cdef Py_ssize_t i, step = 64 // sizeof(stored)
    for i in range(_cdiv(n, step)):
        bncy_prefetch(p + i * step)


cdef inline void _prefetch_run_w(stored* p, Py_ssize_t n) noexcept nogil:
    # Ask for the cache lines of p[0:n], n >= 1, which a later iteration writes.
    cdef Py_ssize_t i, step = 64 // sizeof(stored)
    for i in range(_cdiv(n, step)):
        bncy_prefetch_w(p + i * step)


# ---------------------------------------------------------------------------
# Speed knobs and the gates built on them
# ---------------------------------------------------------------------------
# Every value here only chooses among loops that compute the same values in the
# same order: none changes a result (the tests switch each one and compare bits).
# bncy._knobs derives them at import from the machine's cache sizes, the
# environment variable BNCY_KNOBS overrides them, and bncy.set_knobs() lets a test
# drive every path on small arrays. Each decision is one function below, which the
# kernels and describe() both call.

cdef struct Knobs:
    Py_ssize_t beyond_l2        # bytes from which an array streams from beyond L2
    Py_ssize_t coef_l1          # bytes of per-column coefficients that stay in L1
    Py_ssize_t l1_ways          # lines per L1 set (chunked rows, _ew_chunk_rows)
    Py_ssize_t gi_coef_min      # grad_input prefetches rows whose five coefficient
    Py_ssize_t gi_coef_max      # vectors take gi_coef_min..gi_coef_max bytes ...
    Py_ssize_t gi_min_bytes     # ... in arrays of at least this many bytes
    Py_ssize_t mom_min_bytes    # the rows moments prefetch in arrays this large ...
    Py_ssize_t mom_max_row      # ... whose rows take at most this many bytes
    Py_ssize_t pf_bytes         # how far ahead the backward passes ask
    Py_ssize_t mom_pf_bytes     # how far ahead the rows moments ask
    Py_ssize_t ew_rows_max_run  # elementwise passes of shorter runs take rows
    Py_ssize_t flat_row         # narrow rows go through the affine pass this wide
    Py_ssize_t flat_row_grad    # ... and through grad_input
    Py_ssize_t group_bytes      # x and dy of a backward channel group (_bwd_group)
    Py_ssize_t gi_planes_min_bytes  # float32 planes grad_input asks ahead from here
    Py_ssize_t gi_chunk_coef    # grad_input's chunks: beyond this many coefficient bytes

# Zero until bncy._knobs sets them at import (bncy._api imports it first).
# set_knobs and get_knobs read the struct as an array in KNOB_NAMES order.
cdef Knobs _kn

# The names bncy._knobs sets, in order (all integers >= 0).
KNOB_NAMES = ("beyond_l2", "coef_l1", "l1_ways", "gi_coef_min", "gi_coef_max",
              "gi_min_bytes", "mom_min_bytes", "mom_max_row", "pf_bytes", "mom_pf_bytes",
              "ew_rows_max_run", "flat_row", "flat_row_grad", "group_bytes",
              "gi_planes_min_bytes", "gi_chunk_coef")


def set_knobs(dict values):
    """Set the knobs named in values (validated by bncy._knobs)."""
    for name, v in values.items():
        if name not in KNOB_NAMES:
            raise KeyError(name)
        (<Py_ssize_t*> &_kn)[KNOB_NAMES.index(name)] = v


def get_knobs():
    """The knobs in force in this build, as a dict."""
    return {name: (<Py_ssize_t*> &_kn)[i] for i, name in enumerate(KNOB_NAMES)}


cdef inline bint _ew_on_rows(Py_ssize_t S) noexcept nogil:
    # The elementwise passes: rows schedule for runs shorter than ew_rows_max_run
    # (the same operation per value either way).
    return S < _kn.ew_rows_max_run


cdef inline Py_ssize_t _ew_chunk_rows(Py_ssize_t width, Py_ssize_t nvec,
                                      Py_ssize_t streams, bint grad) noexcept nogil:
    # Rows per group of a wide-row elementwise block that goes through chunks of
    # CHUNK columns, or 0 for whole rows. Chunks when its nvec coefficient
    # vectors of width doubles would not stay in L1 (coef_l1), or for
    # grad_input (grad) beyond gi_chunk_coef. A group's chunk touches
    # streams * G lines of the arrays it reads and writes, all in one L1 set when
    # the row stride is a multiple of 4 KiB, and a float32 line evicted before
    # its second chunk is fetched twice: G = l1_ways // streams, and whole rows
    # when that is below 2 (nothing shared).
    cdef Py_ssize_t G = _kn.l1_ways // streams
    cdef Py_ssize_t limit = _kn.gi_chunk_coef if grad else _kn.coef_l1
    return G if G >= 2 and nvec * 8 * width > limit else 0


cdef inline bint _mom_rows_ahead(Py_ssize_t N, Py_ssize_t K, Py_ssize_t TW,
                                 Py_ssize_t isz) noexcept nogil:
    # Rows moments through _rows_moments_ahead: whole-row blocks of short rows in
    # arrays beyond L3.
    return (TW >= K and K * isz <= _kn.mom_max_row and N * K * isz >= _kn.mom_min_bytes)


cdef inline bint _gsum_rows_ahead(Py_ssize_t N, Py_ssize_t K, Py_ssize_t TW,
                                  Py_ssize_t isz) noexcept nogil:
    # float32 rows backward sums through _rows_grad_sums_ahead: whole-row blocks
    # of arrays beyond L2 (float64 lost with them).
    return isz == 4 and TW >= K and N * K * isz >= _kn.beyond_l2


cdef inline bint _gi_rows_ahead(Py_ssize_t N, Py_ssize_t K, Py_ssize_t TW,
                               Py_ssize_t isz) noexcept nogil:
    # Rows grad_input through its prefetching twin: whole-row blocks whose five
    # coefficient vectors fill gi_coef_min..gi_coef_max bytes (most of L1), of
    # arrays beyond half of L3. Wider rows take the chunks.
    return (TW >= K and _kn.gi_coef_min <= 5 * 8 * K and 5 * 8 * K <= _kn.gi_coef_max
            and N * K * isz >= _kn.gi_min_bytes)


cdef inline bint _planes_mom_ahead(Py_ssize_t nbytes, Py_ssize_t isz) noexcept nogil:
    # float64 planes moments ask for the next segment in arrays beyond L2.
    return isz == 8 and nbytes >= _kn.beyond_l2


cdef inline bint _gi_planes_ahead(Py_ssize_t nbytes, Py_ssize_t isz,
                                  int n_threads) noexcept nogil:
    # float32 planes grad_input on one thread asks for dy, x and dx ahead in
    # arrays of at least gi_planes_min_bytes (at 2 threads, and for float64, it
    # lost).
    return isz == 4 and n_threads <= 1 and nbytes >= _kn.gi_planes_min_bytes


cdef inline Py_ssize_t _bwd_group(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                                   Py_ssize_t isz) noexcept nogil:
    # Channels per group of the backward (_backward_core). For float64 whose
    # passes both take the planes schedule, with x and dy beyond group_bytes: as
    # many channels as fit group_bytes with their x and dy (at least one), whose
    # dx pass then re-reads them from cache. Else all C in one group (float32
    # and 16-bit passes, bound by their conversions, gained nothing).
    cdef Py_ssize_t per = 2 * N * S * isz
    if (isz != 8 or _ew_on_rows(S) or not _gsums_on_planes(N, S, isz)
            or C * per <= _kn.group_bytes):
        return C
    return _imax(1, _kn.group_bytes // per)


cdef inline bint _res_grad_in_sums(Py_ssize_t nbytes) noexcept nogil:
    # The backward through ReLU with a residual (_backward_core) writes the
    # residual's gradient in the sums pass and takes dx from it, 7 array passes
    # instead of 8, in arrays beyond L2; in cache, the masked grad_input pass that
    # writes both took fewer instructions per value.
    return nbytes >= _kn.beyond_l2

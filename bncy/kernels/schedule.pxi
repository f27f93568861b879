# ---------------------------------------------------------------------------
# Schedule: block tiles, merges of partial rows, coefficient expansion
# ---------------------------------------------------------------------------

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
    # block reads long runs of each row, or MIN_TILE when that leaves fewer than
    # 2 blocks per thread. Every
    # column is summed over the same rows in the same order whatever the width,
    # so the results do not depend on it.
    if n_threads > 1 and _cdiv(N, ROW_BLOCK) * _cdiv(K, COL_TILE) < 2 * n_threads:
        return MIN_TILE
    return COL_TILE


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
    # Rows of K columns that the rows passes take as one row of R * K <= width
    # columns (R >= 1), with the coefficient vectors repeated R times: narrow
    # rows (NHWC with few channels) left the vector loop after a few values.
    # Only K < FLAT_MAX_K. The elementwise passes compute the same values either
    # way; the statistics fix R by FLAT_RED (it defines their merge order).
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

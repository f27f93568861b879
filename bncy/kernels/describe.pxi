# ---------------------------------------------------------------------------
# describe(): the path each job takes, from the same gate functions the kernels
# call (knobs.pxi, schedule.pxi), for bncy.describe
# ---------------------------------------------------------------------------

cdef dict _rows_reduction(Py_ssize_t N, Py_ssize_t K, Py_ssize_t isz, int n_threads,
                          bint gsums, bint masked):
    # masked: the ReLU-masked backward sums, which have no prefetching twin
    cdef Py_ssize_t TW = _red_tile(N, K, n_threads)
    cdef bint ahead = (_gsum_rows_ahead(N, K, TW, isz) and not masked
                       if gsums else _mom_rows_ahead(N, K, TW, isz))
    cdef str variant = "prefetch" if ahead else "plain"
    if isz == 2 and not gsums:
        variant = "widened rows"        # _block_col_moments16
    return {"tile": TW, "variant": variant,
            "knobs": ["beyond_l2", "pf_bytes"] if gsums
            else ["mom_min_bytes", "mom_max_row", "mom_pf_bytes"]}


cdef dict _reduction(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t isz,
                     int n_threads, bint gsums, bint masked=False):
    # The schedule of _moments (gsums False) or _grad_sums (True; masked: through
    # ReLU, _grad_sums_fused).
    cdef Py_ssize_t limit, R
    cdef dict d
    limit = 2 * RED_ROWS_MAX_RUN if isz < 8 else RED_ROWS_MAX_RUN
    if _gsums_on_planes(N, S, isz) if gsums else not _short_runs_on_rows(N, S, limit):
        if gsums:
            return {"schedule": "planes", "variant": "plain", "knobs": []}
        if isz < 8:
            return {"schedule": "planes", "variant": "shifted pieces", "knobs": []}
        return {"schedule": "planes", "knobs": ["beyond_l2"],
                "variant": ("prefetch next segment" if _planes_mom_ahead(N * C * S * 8, 8)
                            else "plain")}
    R = _flat_rows(N, C * S, FLAT_RED)
    if R > 1:
        d = _rows_reduction(N // R, C * S * R, isz, n_threads, gsums, masked)
        d["schedule"] = "rows narrow"
        d["rows_at_a_time"] = R
        return d
    d = _rows_reduction(N, C * S, isz, n_threads, gsums, masked)
    d["schedule"] = "rows"
    return d


cdef dict _elementwise(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t isz,
                       int n_threads, bint grad, bint masked=False, bint res=False):
    # The schedule of _affine (grad False) or _grad_input (True; masked: through
    # ReLU, _grad_input_fused, whose rows loops have no prefetching twin and
    # read a sixth coefficient vector); res: with a residual read (and, masked,
    # its gradient written).
    cdef Py_ssize_t K = C * S, R, NR, KR, TW
    cdef bint ahead
    cdef Py_ssize_t nvec = (6 if masked else 5) if grad else 3
    cdef Py_ssize_t streams = (5 if res else 3) if grad else (3 if res else 2)
    if not _ew_on_rows(S):
        if isz == 2:   # 16-bit storage: _affine_run16, _gi_run16 (either schedule)
            return {"schedule": "planes", "variant": "staged pieces",
                    "knobs": ["ew_rows_max_run"]}
        if grad and _gi_planes_ahead(N * C * S * isz, isz, n_threads):
            return {"schedule": "planes", "variant": "prefetch",
                    "knobs": ["ew_rows_max_run", "gi_planes_min_bytes", "pf_bytes"]}
        return {"schedule": "planes", "variant": "plain",
                "knobs": ["ew_rows_max_run"] + (["gi_planes_min_bytes"] if grad else [])}
    R = _flat_rows(N, K, _kn.flat_row_grad if grad else _kn.flat_row)
    NR = N // R
    KR = K * R
    TW = _row_tile(NR, KR, n_threads)
    d = {"schedule": "rows narrow" if R > 1 else "rows", "rows_at_a_time": R,
         "tile": TW, "knobs": ["ew_rows_max_run", "flat_row_grad" if grad else "flat_row",
                               "gi_chunk_coef" if grad else "coef_l1", "l1_ways"]}
    if isz == 2:
        d["variant"] = "staged pieces"
        return d
    ahead = _gi_rows_ahead(NR, KR, TW, isz) if grad and not masked else False
    if grad:
        d["knobs"] += ["gi_coef_min", "gi_coef_max", "gi_min_bytes", "pf_bytes"]
    if ahead:
        d["variant"] = "prefetch whole rows"
    elif _ew_chunk_rows(TW, nvec, streams, grad):
        d["variant"] = "chunked"
    else:
        d["variant"] = "whole rows"
    return d


def describe_paths(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t itemsize,
                   int n_threads, bint relu=False, bint res=False):
    """{job: {schedule, variant, ...}} for an (N, C, S) array of itemsize bytes;
    relu, res: a fused call (activation="relu", a residual). The fused loops
    take the plain ones' schedules; each fused job says its loops in "fused"
    (bncy.backward's: the split phases mask in grad_input)."""
    # with a residual beyond L2, the sums write its gradient (the masked dy) and
    # the plain grad_input loops read it as dy (_backward_core)
    # the backward runs in groups of G channels (_bwd_group), each its own
    # (N, G, S) array to the passes
    cdef bint in_sums = relu and res and _res_grad_in_sums(N * C * S * itemsize)
    cdef Py_ssize_t G = _bwd_group(N, C, S, itemsize)
    cdef dict d = {"statistics": _reduction(N, C, S, itemsize, n_threads, False),
                   "normalize": _elementwise(N, C, S, itemsize, n_threads, False, False,
                                             res),
                   "grad_sums": _reduction(N, G, S, itemsize, n_threads, True, relu),
                   "grad_input": _elementwise(N, G, S, itemsize, n_threads, True,
                                              relu and not in_sums,
                                              relu and res and not in_sums)}
    for job in ("grad_sums", "grad_input"):
        if itemsize == 8:    # (_bwd_group reads the knob for float64 only)
            d[job]["knobs"] = d[job]["knobs"] + ["group_bytes"]
        if G < C:
            d[job]["channel_group"] = G
    if relu or res:
        d["normalize"]["fused"] = ("residual + relu" if relu and res
                                   else "relu" if relu else "residual")
    if relu:    # without ReLU the backward is the plain one (the add's gradient is dy)
        d["grad_sums"]["fused"] = "relu mask, residual gradient" if in_sums else "relu mask"
        d["grad_input"]["fused"] = ("from the residual gradient" if in_sums
                                    else "relu mask, residual gradient" if res
                                    else "relu mask")
    return d

"""The split-phase API (batch_stats / merge_stats / apply_stats and the gradient's):
identical to forward/backward on one part, equal to the whole batch over many."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import bncy
from conftest import DTYPES, make, tol

# rows and planes schedules; (3, 4, 5000) has two segments per run
CASES = [((40, 6), 1), ((9, 4, 6, 7), 1), ((6, 5, 4, 3), -1), ((7, 3, 50), 1),
         ((3, 4, 5000), 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_one_part_is_forward_and_backward_bit_for_bit(shape, axis, dtype, rng):
    x, dy = make(shape, dtype, rng, 2.0, 1.0), make(shape, dtype, rng)
    C = shape[axis]
    g, b = rng.standard_normal(C), rng.standard_normal(C)
    y, m, s = bncy.forward(x, g, b, axis=axis)
    st = bncy.merge_stats([bncy.batch_stats(x, axis=axis)])
    y2, m2, s2 = bncy.apply_stats(x, st, g, b, axis=axis)
    for u, v in zip((y, m, s), (y2, m2, s2)):
        assert_array_equal(u, v)
    dx, dg, db = bncy.backward(dy, x, m, s, g, axis=axis)
    gs = bncy.merge_grad_stats([bncy.grad_stats(dy, x, m, axis=axis)])
    dx2, dg2, db2 = bncy.apply_grad(dy, x, m, s, gs, x.size // C, g, axis=axis)
    for u, v in zip((dx, dg, db), (dx2, dg2, db2)):
        assert_array_equal(u, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_parts_of_unequal_sizes_give_the_whole_batch(shape, axis, dtype, rng):
    x, dy = make(shape, dtype, rng, 3.0, 100.0), make(shape, dtype, rng)
    C = shape[axis]
    g, b = rng.standard_normal(C), rng.standard_normal(C)
    rm, rv = np.zeros(C), np.ones(C)
    y, m, s = bncy.forward(x, g, b, axis=axis, running_mean=rm, running_var=rv)
    dx, dg, db = bncy.backward(dy, x, m, s, g, axis=axis)
    cuts = [0, 0, 1, shape[0] // 2, shape[0]]         # an empty part and unequal ones
    parts = [(x[a:c], dy[a:c]) for a, c in zip(cuts[:-1], cuts[1:])]
    st = bncy.merge_stats([bncy.batch_stats(p, axis=axis) for p, _ in parts])
    assert st.count == x.size // C
    rm2, rv2 = np.zeros(C), np.ones(C)
    ys, mss = [], []
    for p, _ in parts:
        yp, mp, sp = bncy.apply_stats(p, st, g, b, axis=axis, running_mean=rm2,
                                      running_var=rv2, momentum=0.0)
        ys.append(yp)
        mss.append((mp, sp))
    bncy.apply_stats(parts[0][0], st, g, b, axis=axis, running_mean=rm2, running_var=rv2)
    rt, at = tol(dtype)
    assert_allclose(np.concatenate(ys), y, rtol=rt, atol=at)
    assert_allclose(mss[0][0], m, rtol=1e-13, atol=1e-12)
    assert_allclose(mss[0][1], s, rtol=1e-12)
    assert_allclose(rm2, rm, rtol=1e-12, atol=1e-12)
    assert_allclose(rv2, rv, rtol=1e-12)
    gs = bncy.merge_grad_stats([bncy.grad_stats(q, p, mss[0][0], axis=axis) for p, q in parts])
    outs = [bncy.apply_grad(q, p, mss[0][0], mss[0][1], gs, st.count, g, axis=axis)
            for p, q in parts]
    M = x.size // C
    assert_allclose(np.concatenate([o[0] for o in outs]), dx, rtol=rt, atol=at)
    for o in outs:
        assert_allclose(o[1], dg, rtol=rt, atol=at * M)
        assert_allclose(o[2], db, rtol=rt, atol=at * M)


def test_split_phase_errors():
    x = np.ones((4, 3))
    with pytest.raises(ValueError, match="more than 1 value"):
        bncy.apply_stats(x[:1], bncy.batch_stats(x[:1]))
    with pytest.raises(ValueError, match="at least one part"):
        bncy.merge_stats([])
    with pytest.raises(ValueError, match="channel"):
        bncy.merge_stats([bncy.batch_stats(x), bncy.batch_stats(np.ones((4, 2)))])
    with pytest.raises(ValueError):
        bncy.apply_stats(x, bncy.BatchStats(4, np.zeros(2), np.ones(2)))
    st = bncy.batch_stats(x[:0])
    assert st.count == 0 and st.mean.shape == (3,)


def test_phase_one_allocates_no_output():
    """batch_stats and grad_stats reduce only: no array of x's size is allocated
    (outputs of 4 MiB and more all go through the buffer cache, which counts them)."""
    x = np.random.default_rng(0).standard_normal((2048, 1024)).astype(np.float32)
    info = bncy.buffer_cache_info()
    before = info["hits"] + info["misses"]
    st = bncy.batch_stats(x)
    bncy.grad_stats(x, x, st.mean)
    info = bncy.buffer_cache_info()
    assert info["hits"] + info["misses"] == before
    bncy.apply_stats(x, st)   # the counter does count an output
    info = bncy.buffer_cache_info()
    assert info["hits"] + info["misses"] == before + 1


def test_apply_stats_with_a_non_finite_channel():
    """A NaN in one part: apply_stats gives NaN in that channel on every part, the
    other channels and the running statistics (updated once) as bncy.forward,
    and an empty part does not fail (it recomputed the channel from its own
    rows, and updated the running statistics twice)."""
    x = np.random.default_rng(12).standard_normal((10, 3))
    x[7, 2] = np.nan
    rm1, rv1 = np.zeros(3), np.ones(3)
    y1 = bncy.forward(x, running_mean=rm1, running_var=rv1)[0]
    parts = [x[:4], x[4:], x[:0]]
    st = bncy.merge_stats([bncy.batch_stats(p) for p in parts])
    rm, rv = np.zeros(3), np.ones(3)
    y = [bncy.apply_stats(parts[0], st, running_mean=rm, running_var=rv)[0]]
    y += [bncy.apply_stats(p, st)[0] for p in parts[1:]]
    assert_allclose(rm, rm1, rtol=1e-13)
    assert_allclose(rv, rv1, rtol=1e-13)
    assert_allclose(np.concatenate(y), y1, rtol=1e-12, atol=1e-12)   # NaN where y1 is
    assert np.all(np.isnan(y1[:, 2]))

"""Bad input: a clear exception, raised before any output or running statistic is written."""

import numpy as np
import pytest

import bncy
from bncy import _api

C = 3


def _state():
    rng = np.random.default_rng(7)
    return {
        "x": rng.standard_normal((4, C, 5)),
        "dy": rng.standard_normal((4, C, 5)),
        "out": np.full((4, C, 5), -7.0),
        "rm": np.full(C, 0.25),
        "rv": np.full(C, 2.0),
    }


def _snapshot(st):
    return {k: v.copy() for k, v in st.items()}


def _untouched(st, before):
    for k, v in st.items():
        assert np.array_equal(v, before[k], equal_nan=True), f"{k} was written"


# Each case: (description, exception, call(st)); every call passes `out` and, for the
# training forward, the running statistics, so any premature write would be caught.
def _fwd(st, **kw):
    args = dict(running_mean=st["rm"], running_var=st["rv"], out=st["out"])
    args.update(kw)
    x = args.pop("x", st["x"])
    return bncy.forward(x, args.pop("gamma", None), args.pop("beta", None), **args)


def _bwd(st, **kw):
    args = dict(out=st["out"])
    args.update(kw)
    return bncy.backward(args.pop("dy", st["dy"]), args.pop("x", st["x"]),
                         args.pop("mean", np.zeros(C)), args.pop("invstd", np.ones(C)),
                         args.pop("gamma", None), **args)


def _inf(st, **kw):
    args = dict(out=st["out"])
    args.update(kw)
    return bncy.inference(args.pop("x", st["x"]), args.pop("rm", st["rm"]),
                          args.pop("rv", st["rv"]), **args)


CASES = [
    # dtypes
    ("int x", TypeError, lambda st: _fwd(st, x=st["x"].astype(np.int64))),
    ("float16 x", TypeError, lambda st: _fwd(st, x=st["x"].astype(np.float16))),
    ("complex x", TypeError, lambda st: _inf(st, x=st["x"].astype(np.complex128))),
    ("object x", TypeError, lambda st: _fwd(st, x=np.array([[None, 1.0]] * 3))),
    ("int gamma", TypeError, lambda st: _fwd(st, gamma=np.ones(C, np.int32))),
    ("dy dtype differs", TypeError, lambda st: _bwd(st, dy=st["dy"].astype(np.float32))),
    ("out dtype differs", TypeError, lambda st: _fwd(st, out=np.empty((4, C, 5), np.float32))),
    ("out not an ndarray", TypeError, lambda st: _fwd(st, out=[0.0] * 60)),
    # shapes and sizes
    ("1-D x", ValueError, lambda st: _fwd(st, x=np.ones(5), out=None)),
    ("0-D x", ValueError, lambda st: _inf(st, x=np.float64(1.0), out=None)),
    ("empty x", ValueError, lambda st: _fwd(st, x=np.ones((0, C)), out=None)),
    ("empty spatial", ValueError, lambda st: _inf(st, x=np.ones((2, C, 0)), out=None)),
    ("one value per channel", ValueError, lambda st: _fwd(st, x=np.ones((1, C)), out=None)),
    ("one value per channel 4-D", ValueError,
     lambda st: _fwd(st, x=np.ones((1, C, 1, 1)), out=None)),
    ("gamma shape", ValueError, lambda st: _fwd(st, gamma=np.ones(C + 1))),
    ("beta shape", ValueError, lambda st: _fwd(st, beta=np.ones((C, 1)))),
    ("running_mean shape", ValueError, lambda st: _fwd(st, running_mean=np.zeros(C - 1))),
    ("running_var shape", ValueError, lambda st: _fwd(st, running_var=np.zeros(2 * C))),
    ("inference stats shape", ValueError, lambda st: _inf(st, rv=np.ones(C + 2))),
    ("mean shape", ValueError, lambda st: _bwd(st, mean=np.zeros(C + 1))),
    ("invstd shape", ValueError, lambda st: _bwd(st, invstd=np.ones(1))),
    ("dy shape", ValueError, lambda st: _bwd(st, dy=np.ones((4, C, 6)))),
    ("out shape", ValueError, lambda st: _fwd(st, out=np.empty((4, C, 6)))),
    ("out read-only", ValueError, lambda st: _fwd(st, out=np.lib.stride_tricks.as_strided(
        st["out"], writeable=False))),
    ("out not contiguous", ValueError, lambda st: _bwd(st, out=np.empty((4, C, 10))[:, :, ::2])),
    # axis
    ("axis too large", ValueError, lambda st: _fwd(st, axis=3)),
    ("axis too small", ValueError, lambda st: _bwd(st, axis=-4)),
    ("axis not int", TypeError, lambda st: _inf(st, axis=1.0)),
    # parameters
    ("eps negative", ValueError, lambda st: _fwd(st, eps=-1e-5)),
    ("eps nan", ValueError, lambda st: _fwd(st, eps=float("nan"))),
    ("eps inf", ValueError, lambda st: _inf(st, eps=float("inf"))),
    ("eps string", TypeError, lambda st: _inf(st, eps="1e-5")),
    ("momentum > 1", ValueError, lambda st: _fwd(st, momentum=1.5)),
    ("momentum < 0", ValueError, lambda st: _fwd(st, momentum=-0.1)),
    ("momentum nan", ValueError, lambda st: _fwd(st, momentum=float("nan"))),
    ("only running_mean", ValueError, lambda st: _fwd(st, running_var=None)),
    ("running stats read-only", ValueError, lambda st: _fwd(st, running_var=np.broadcast_to(
        np.ones(1), (C,)))),
    ("running stats int", TypeError, lambda st: _fwd(st, running_mean=np.zeros(C, np.int64))),
    ("n_threads 0", ValueError, lambda st: _fwd(st, n_threads=0)),
    ("n_threads negative", ValueError, lambda st: _bwd(st, n_threads=-2)),
    ("n_threads float", TypeError, lambda st: _inf(st, n_threads=2.0)),
    ("n_threads bool", TypeError, lambda st: _inf(st, n_threads=True)),
    # fused residual and activation
    ("activation unknown", ValueError, lambda st: _fwd(st, activation="gelu")),
    ("activation not a string", TypeError, lambda st: _inf(st, activation=1)),
    ("activation callable", TypeError, lambda st: _bwd(st, activation=np.maximum)),
    ("residual dtype", TypeError, lambda st: _fwd(st, residual=st["x"].astype(np.float32))),
    ("residual int", TypeError, lambda st: _inf(st, residual=np.ones((4, C, 5), np.int64))),
    ("residual shape", ValueError, lambda st: _fwd(st, residual=np.ones((4, C, 6)),
                                                   activation="relu")),
    ("residual shape inference", ValueError, lambda st: _inf(st, residual=np.ones((4, C)))),
    ("residual shape backward", ValueError, lambda st: _bwd(st, residual=np.ones((4, C, 4)),
                                                            activation="relu")),
    ("backward beta shape", ValueError, lambda st: _bwd(st, beta=np.ones(C + 1),
                                                        activation="relu")),
    ("residual_out without residual", ValueError,
     lambda st: _bwd(st, residual_out=np.empty((4, C, 5)))),
    ("residual_out overlaps out", ValueError,
     lambda st: _bwd(st, residual=st["x"], activation="relu", residual_out=st["out"])),
    ("residual_out overlaps out, no activation", ValueError,
     lambda st: _bwd(st, residual=st["x"], residual_out=st["out"])),
    ("residual_out dtype", TypeError,
     lambda st: _bwd(st, residual=st["x"], activation="relu",
                     residual_out=np.empty((4, C, 5), np.float32))),
]


@pytest.mark.parametrize("desc,exc,call", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_and_touches_nothing(desc, exc, call):
    st = _state()
    before = _snapshot(st)
    with pytest.raises(exc, match="bncy"):
        call(st)
    _untouched(st, before)


def test_messages_name_the_problem():
    with pytest.raises(TypeError, match="float32, float64, float16 and bfloat16"):
        bncy.forward(np.ones((3, 2), np.int32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bncy.forward(np.ones((1, 2)))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        bncy.forward(np.ones((4, 3)), np.ones(2))


def test_valid_calls_of_the_same_fixtures_succeed():
    """The fixtures above are valid apart from the one bad argument of each case."""
    st = _state()
    _fwd(st)
    _bwd(st)
    _inf(st)


@pytest.mark.parametrize("desc,exc,call", CASES, ids=[c[0] for c in CASES])
def test_fast_paths_decline_every_bad_call(desc, exc, call, monkeypatch):
    """The C fast paths recognise the plain call themselves: run against this same
    table, each declines (returns None, writing nothing) and the Python checks raise."""
    real, seen = _api._kernels_wide, []

    class Spy:
        def __getattr__(self, name):
            attr = getattr(real, name)
            if not name.endswith("_fast"):
                return attr

            def spy(*args):
                seen.append(attr(*args))
                return seen[-1]
            return spy

    monkeypatch.setattr(_api, "_kernels_wide", Spy())
    st = _state()
    before = _snapshot(st)
    with pytest.raises(exc, match="bncy"):
        call(st)
    assert all(r is None for r in seen)
    _untouched(st, before)

"""Speed knobs: derived from the machine's caches, overridable, and never a
change of result. Small arrays reach every kernel variant through them, and
describe() names the path each job takes."""

import os
import subprocess
import sys

import numpy as np
import pytest

import bncy
from bncy import _knobs
from conftest import HALF, make

# Each setting drives small arrays down one family of variants (describe() below
# checks that they do).
SETTINGS = {
    "defaults": {},
    "prefetch everywhere": dict(beyond_l2=0, gi_min_bytes=0, gi_coef_min=0,
                                gi_coef_max=1 << 30, mom_min_bytes=0, mom_max_row=1 << 30,
                                gi_planes_min_bytes=0),
    "chunked rows": dict(coef_l1=0, gi_chunk_coef=0, l1_ways=8),
    "chunked, large groups": dict(coef_l1=0, gi_chunk_coef=0, l1_ways=64),
    "chunked, pairs or whole rows": dict(coef_l1=0, gi_chunk_coef=0, l1_ways=5),
    "planes elementwise": dict(ew_rows_max_run=0),
    "rows elementwise": dict(ew_rows_max_run=1 << 30),
    "wide narrow rows": dict(flat_row=1 << 12, flat_row_grad=1 << 12),
    "near hints": dict(beyond_l2=0, pf_bytes=0, mom_pf_bytes=0, mom_min_bytes=0,
                       mom_max_row=1 << 30, gi_planes_min_bytes=0),
    "threads always": dict(small_work=0),
    "avx2 for float64": dict(wide_f64_bytes=0),
    "backward by channel": dict(group_bytes=1, beyond_l2=0),
    # float64 (4, 3, 70, 70): groups of 2 and 1 channels
    "backward by channel pairs": dict(group_bytes=2 * 2 * 4 * 4900 * 8),
}
SHAPES = [((300, 40), 1), ((130, 1030), 1), ((4, 3, 70, 70), 1), ((6, 3, 5000), 1),
          ((40, 6, 6, 3), -1), ((8, 5, 6, 7), 1), ((20, 2, 2, 64), 1), ((2, 5, 6, 7), -1)]


@pytest.fixture
def knobs():
    """set_knobs for one test; the previous values come back after it."""
    previous = bncy.knobs()
    previous.pop("caches")
    yield bncy.set_knobs
    bncy.set_knobs(**previous)


def _outputs(x, dy, axis, nt):
    C = x.shape[axis]
    rng = np.random.default_rng(5)
    g, b = rng.standard_normal(C), rng.standard_normal(C)
    rm, rv = np.zeros(C), np.ones(C)
    y, mean, invstd = bncy.forward(x, g, b, axis=axis, running_mean=rm, running_var=rv,
                                   n_threads=nt)
    dx, dg, db = bncy.backward(dy, x, mean, invstd, g, axis=axis, n_threads=nt)
    yi = bncy.inference(x, rm, rv, g, b, axis=axis, n_threads=nt)
    # through ReLU with a residual (x[::-1]): beyond_l2 moves its gradient into
    # the sums pass; the fused elementwise loops stream more arrays (l1_ways)
    r = x[::-1]
    fused = bncy.backward(dy, x, mean, invstd, g, axis=axis, beta=b, residual=r,
                          activation="relu", n_threads=nt)
    relu = bncy.backward(dy, x, mean, invstd, g, axis=axis, beta=b, activation="relu",
                         n_threads=nt)
    yf = bncy.forward(x, g, b, axis=axis, residual=r, activation="relu", n_threads=nt)[0]
    yr = bncy.inference(x, rm, rv, g, b, axis=axis, residual=r, n_threads=nt)
    return [y, mean, invstd, rm, rv, dx, dg, db, yi, *fused, *relu, yf, yr]


@pytest.mark.parametrize("nt", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, *HALF], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", SHAPES, ids=lambda c: "x".join(map(str, c[0])))
def test_no_knob_changes_a_bit(case, dtype, nt, knobs):
    shape, axis = case
    rng = np.random.default_rng(1)
    x = make(shape, dtype, rng, scale=2.0, offset=3.0)
    dy = make(shape, dtype, rng)
    base = _outputs(x, dy, axis, nt)
    for name, setting in SETTINGS.items():
        previous = knobs(**setting)
        try:
            got = _outputs(x, dy, axis, nt)
        finally:
            knobs(**{k: previous[k] for k in setting})
        for a, b in zip(base, got):
            assert a.tobytes() == b.tobytes(), name


def _variants(shape, dtype, axis=1, nt=1):
    jobs = bncy.describe(shape, dtype, axis, n_threads=nt)["jobs"]
    return {job: (d["schedule"], d["variant"]) for job, d in jobs.items()}


def test_small_arrays_reach_every_variant(knobs):
    """The SETTINGS above take the small SHAPES through every variant: what
    describe() reports there, from the functions the kernels decide with."""
    seen = set()
    for setting in SETTINGS.values():
        previous = knobs(**setting)
        for shape, axis in SHAPES:
            for dtype in (np.float32, np.float64):
                for job, path in _variants(shape, dtype, axis).items():
                    seen.add((job,) + path)
        knobs(**{k: previous[k] for k in setting})
    expected = {
        ("statistics", "rows", "plain"), ("statistics", "rows", "prefetch"),
        ("statistics", "rows narrow", "plain"), ("statistics", "planes", "shifted pieces"),
        ("statistics", "planes", "plain"), ("statistics", "planes", "prefetch next segment"),
        ("grad_sums", "rows", "plain"), ("grad_sums", "rows", "prefetch"),
        ("grad_sums", "planes", "plain"),
        ("normalize", "rows", "whole rows"), ("normalize", "rows", "chunked"),
        ("normalize", "rows narrow", "whole rows"), ("normalize", "planes", "plain"),
        ("grad_input", "rows", "whole rows"), ("grad_input", "rows", "chunked"),
        ("grad_input", "rows", "prefetch whole rows"), ("grad_input", "planes", "prefetch"),
        ("grad_input", "rows narrow", "whole rows"), ("grad_input", "planes", "plain"),
    }
    assert expected <= seen, expected - seen


def test_describe_at_the_default_knobs():
    """The large shapes the gates were set for (no array is made)."""
    if bncy.knobs()["caches"]["source"] == "fallback":
        pytest.skip("cache sizes unknown here")
    v = _variants((65536, 512), np.float32)
    assert v["statistics"] == ("rows", "prefetch")
    assert v["grad_sums"] == ("rows", "prefetch")
    # without AVX-512 the grad_input twin starts where the chunks would (derive)
    from bncy._api import _baseline
    avx512 = _baseline.cpu_has_avx512()
    assert v["grad_input"] == ("rows", "prefetch whole rows" if avx512 else "whole rows")
    assert (_variants((32, 64, 56, 56), np.float32)["grad_input"]
            == ("planes", "prefetch" if avx512 else "plain"))
    assert _variants((64, 256), np.float32)["grad_input"] == ("rows", "whole rows")
    assert _variants((32, 64, 56, 56), np.float32)["statistics"] == ("planes", "shifted pieces")
    d = bncy.describe((32, 64, 56, 56), "float64", n_threads=2)
    assert d["ncs"] == (32, 64, 3136) and d["n_threads"] == 2
    assert d["jobs"]["grad_input"]["variant"] == "plain"   # planes hints: 1 thread only
    assert set(d["jobs"]["statistics"]["knobs"]) == {"beyond_l2"}
    assert bncy.describe((8, 3), np.float32, n_threads=4)["n_threads"] == 1   # small_work


def test_describe_and_set_knobs_check_their_arguments(knobs):
    with pytest.raises(TypeError, match="float32, float64, float16 and bfloat16"):
        bncy.describe((4, 3), np.int32)
    with pytest.raises(ValueError, match="out of range"):
        bncy.describe((4, 3), np.float32, axis=2)
    with pytest.raises(ValueError, match="2 dimensions"):
        bncy.describe((4,), np.float32)
    before = bncy.knobs()
    with pytest.raises(TypeError, match="unknown knob"):
        knobs(no_such_knob=1)
    with pytest.raises(ValueError, match=">= 0"):
        knobs(beyond_l2=-1)
    with pytest.raises(ValueError, match=">= 16"):
        knobs(flat_row=8)
    with pytest.raises(TypeError, match="integer"):
        knobs(pf_bytes=1.5)
    assert bncy.knobs() == before


def test_caches_from_sysfs_and_the_knobs_derived(tmp_path):
    for i, (level, kind, size, cpus) in enumerate([(1, "Data", "48K", "0"),
                                                  (1, "Instruction", "32K", "0"),
                                                  (2, "Unified", "1024K", "0"),
                                                  (3, "Unified", "32768K", "0-7")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        for name, value in [("level", level), ("type", kind), ("size", size),
                            ("shared_cpu_list", cpus), ("ways_of_associativity", 12)]:
            (d / name).write_text(f"{value}\n")
    c = _knobs.caches(str(tmp_path))
    assert c == {"l1": 48 << 10, "l2": 8 << 20, "l3": 32 << 20, "l1_ways": 12,
                 "l2_core": 1 << 20, "source": "sysfs"}
    k = _knobs.derive(c)
    assert k["beyond_l2"] == 8 << 20 and k["coef_l1"] == 36 << 10 and k["l1_ways"] == 12
    assert k["gi_min_bytes"] == 16 << 20 and k["mom_min_bytes"] == 24 << 20
    assert k["group_bytes"] == 4 << 20
    assert k["gi_coef_min"] == 24 << 10 and k["gi_planes_min_bytes"] == 8 << 20
    k2 = _knobs.derive(c, avx512=False)
    assert k2["gi_coef_min"] == k2["coef_l1"] and k2["gi_planes_min_bytes"] >= 1 << 62
    assert k["gi_chunk_coef"] == k["coef_l1"] and k2["gi_chunk_coef"] == 512 << 10
    assert {n: v for n, v in k2.items() if v != k[n]}.keys() == {
        "gi_coef_min", "gi_planes_min_bytes", "gi_chunk_coef"}
    assert _knobs.caches(str(tmp_path / "missing"))["source"] in ("sysconf", "fallback")
    (tmp_path / "index0" / "ways_of_associativity").unlink()
    assert _knobs.caches(str(tmp_path))["l1_ways"] == _knobs.FALLBACK["l1_ways"]


def test_chunked_groups_fill_at_most_one_l1_set(knobs):
    """A chunked group takes l1_ways // (arrays it streams) rows, and whole rows
    when that is one: x and y (2), dy, x and dx (3), with a residual one more in
    the forward and two more in the masked backward (in cache)."""
    def variants(**fused):
        jobs = bncy.describe((130, 1030), np.float32, **fused)["jobs"]
        return jobs["normalize"]["variant"], jobs["grad_input"]["variant"]

    knobs(coef_l1=0, gi_chunk_coef=0, l1_ways=8, beyond_l2=1 << 40, gi_min_bytes=1 << 40)
    assert variants() == ("chunked", "chunked")
    assert variants(activation="relu", residual=True) == ("chunked", "whole rows")
    knobs(l1_ways=5)
    assert variants() == ("chunked", "whole rows")
    assert variants(residual=True) == ("whole rows", "whole rows")


def test_backward_channel_groups(knobs):
    """The float64 backward takes channels in groups whose x and dy fit
    group_bytes (at least one channel), when both its passes are on planes and
    the arrays are larger; one group otherwise."""
    def group(shape, dtype=np.float64):
        jobs = bncy.describe(shape, dtype, n_threads=1)["jobs"]
        assert jobs["grad_sums"].get("channel_group") == jobs["grad_input"].get("channel_group")
        if np.dtype(dtype) == np.float64:
            assert jobs["grad_input"]["knobs"]["group_bytes"] == bncy.knobs()["group_bytes"]
        return jobs["grad_input"].get("channel_group")

    per = 2 * 4 * 4900 * 8                      # x and dy of one channel of (4, 3, 70, 70)
    knobs(group_bytes=2 * per)
    assert group((4, 3, 70, 70)) == 2
    assert group((4, 5, 70, 70)) == 2           # groups of 2, 2 and 1
    assert group((4, 2, 70, 70)) is None        # fits: one group
    knobs(group_bytes=1)
    assert group((4, 3, 70, 70)) == 1
    assert group((4, 3, 70, 70), np.float32) is None
    assert group((300, 40)) is None             # rows schedule
    assert group((8, 3, 4, 7)) is None          # runs of 28 values: rows
    assert group((4, 3, 8, 8)) == 1             # planes both


def test_bncy_knobs_environment_variable(tmp_path):
    names = {"pf_bytes", "coef_l1"}
    assert _knobs.from_env(" pf_bytes=0, coef_l1=64 ", names) == {"pf_bytes": 0,
                                                                  "coef_l1": 64}
    for bad in ("pf_bytes", "nope=1", "pf_bytes=x", "pf_bytes=-1"):
        with pytest.raises(ValueError, match="BNCY_KNOBS"):
            _knobs.from_env(bad, names)
    code = "import bncy; print(bncy.knobs()['coef_l1'], bncy.knobs()['pf_bytes'])"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, env={**os.environ, "BNCY_KNOBS": "coef_l1=0,pf_bytes=64"},
                         cwd=tmp_path).stdout.split()
    assert out == ["0", "64"]


def test_every_build_runs_with_the_knobs_in_force(knobs):
    from bncy import _api

    knobs(coef_l1=123, pf_bytes=640)
    kernel = {k: v for k, v in bncy.knobs().items() if k in _api._baseline.KNOB_NAMES}
    for build in _api._BUILDS:
        assert build.get_knobs() == kernel


def test_describe_names_the_fused_loops():
    """The fused call keeps the plain schedules and says which loops it fuses; its
    masked backward loops have no prefetching twins (rows), so describe() does
    not report one. With a residual, the masked sums write its gradient and dx
    takes the plain loops (with their prefetching twin) beyond L2; in cache the
    masked grad_input writes both."""
    shape = (65536, 512)
    plain = bncy.describe(shape, np.float32)
    fused = bncy.describe(shape, np.float32, activation="relu", residual=True)
    assert set(plain) <= set(fused) and plain["fused"] == {"activation": None,
                                                           "residual": False}
    assert fused["fused"] == {"activation": "relu", "residual": True}
    assert all("fused" not in d for d in plain["jobs"].values())
    assert fused["jobs"]["statistics"] == plain["jobs"]["statistics"]
    assert fused["jobs"]["normalize"]["fused"] == "residual + relu"
    assert fused["jobs"]["grad_sums"]["fused"] == "relu mask, residual gradient"
    assert fused["jobs"]["grad_input"]["fused"] == "from the residual gradient"
    for job in plain["jobs"]:
        assert fused["jobs"][job]["schedule"] == plain["jobs"][job]["schedule"]
    assert not fused["jobs"]["grad_sums"]["variant"].startswith("prefetch")
    assert fused["jobs"]["grad_input"]["variant"] == plain["jobs"]["grad_input"]["variant"]
    relu = bncy.describe(shape, np.float32, activation="relu")["jobs"]
    assert relu["grad_input"]["fused"] == "relu mask"
    assert not relu["grad_input"]["variant"].startswith("prefetch")
    small = bncy.describe((64, 256), np.float32, activation="relu", residual=True)["jobs"]
    assert small["grad_sums"]["fused"] == "relu mask"
    assert small["grad_input"]["fused"] == "relu mask, residual gradient"
    res_only = bncy.describe(shape, np.float32, residual=True)["jobs"]
    assert res_only["normalize"]["fused"] == "residual"
    assert "fused" not in res_only["grad_sums"] and "fused" not in res_only["grad_input"]
    with pytest.raises(ValueError, match="activation"):
        bncy.describe(shape, np.float32, activation="gelu")

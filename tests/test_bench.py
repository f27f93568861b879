"""``python -m bncy.bench``: the instrument runs, reports every case and refuses
unknown options. (Speed itself is measured by the command, never asserted here.)"""

import numpy as np
import pytest

from bncy import bench

SMALL = [("(64, 8)", (64, 8), 1), ("NCHW (4, 3, 6, 6)", (4, 3, 6, 6), 1)]


def test_run_reports_every_case_and_a_table():
    rows, bws = bench.run([1], SMALL, [np.dtype(np.float32)], repeats=3, budget=0.05,
                          progress=False, bandwidth_bytes=4 << 20)
    assert [(r["case"], r["op"]) for r in rows] == [
        (name, op) for name, _, _ in SMALL for op in bench.OPS]
    assert set(bws) == {1} and bws[1]["read"] > 0 and bws[1]["copy"] > 0
    for r in rows:
        assert r["bncy_s"] > 0 and r["bound_s"] > 0 and r["reference_s"] > 0
        assert r["torch_s"] is None or r["torch_s"] > 0
    text = bench.table(rows, bws)
    assert all(op in text for op in bench.OPS) and "of bound" in text


def test_peers_are_timed_in_turn():
    """bncy, torch and the others take turns within each round, the order
    rotating, after one warm-up call each."""
    log = []
    fs = [lambda n=n: log.append(n) for n in "abc"]
    got = bench._medians(fs, repeats=4, budget=10.0)
    assert len(got) == 3 and all(t >= 0 for t in got)
    assert log[:3] == list("abc")
    assert [log[3 + 3 * i:6 + 3 * i] for i in range(4)] == [
        list("abc"), list("bca"), list("cab"), list("abc")]
    log.clear()
    bench._medians(fs, repeats=50, budget=0.0)     # the budget stops it after 3 rounds
    assert len(log) == 3 + 3 * 3


def test_bound_counts_the_passes():
    bw = {"read": 10.0, "copy": 10.0}  # GB/s
    big = 1 << 30  # no cache reuse
    assert bench.bound_seconds("inference", big, bw) == pytest.approx(2 * big / 1e10)
    assert bench.bound_seconds("forward", big, bw) == pytest.approx(3 * big / 1e10)
    assert bench.bound_seconds("backward", big, bw) == pytest.approx(5 * big / 1e10)
    small = 1 << 20  # re-reads hit the cache
    assert bench.bound_seconds("forward", small, bw) == pytest.approx(2 * small / 1e10)


def test_shape_option_parses_cases_and_refuses_bad_ones(capsys):
    assert bench.parse_shape("256x512x7x7") == ("(256, 512, 7, 7)", (256, 512, 7, 7), 1)
    assert bench.parse_shape("4x5x6x3:-1") == ("(4, 5, 6, 3) axis=-1", (4, 5, 6, 3), -1)
    assert bench.parse_shape("64X8:-1")[1:] == ((64, 8), 1)
    for bad in ("", "8", "8x0", "8xa", "8x3:2", "8x3:x"):
        with pytest.raises(ValueError, match="bad shape"):
            bench.parse_shape(bad)
    with pytest.raises(SystemExit) as e:
        bench.main(["--shape", "8x3:2"])
    assert e.value.code == 2 and "axis 1 or -1" in capsys.readouterr().err


def test_custom_channels_last_case_runs_with_torch():
    case = bench.parse_shape("2x3x4x5x6:-1")   # 5-D channels last
    rows, _ = bench.run([1], [case], [np.dtype(np.float32)], repeats=3, budget=0.05,
                        with_reference=False, progress=False, bandwidth_bytes=4 << 20)
    assert [r["op"] for r in rows] == list(bench.OPS)
    assert all(r["bncy_s"] > 0 for r in rows)
    assert all(r["torch_s"] is None or r["torch_s"] > 0 for r in rows)


def test_unknown_peer_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", "--peers", "mkldnn,bogus"])
    assert e.value.code == 2 and "bogus" in capsys.readouterr().err


def test_mkldnn_peer_runs_on_float32_nchw_only():
    pytest.importorskip("torch")
    rows, _ = bench.run([1], SMALL, [np.dtype(np.float32), np.dtype(np.float64)],
                        repeats=3, budget=0.05, with_reference=False, progress=False,
                        peers=["mkldnn"], bandwidth_bytes=4 << 20)
    for r in rows:
        expected = r["dtype"] == "float32" and r["case"].startswith("NCHW")
        assert (r["mkldnn_s"] is not None) == expected, r


def test_preallocated_outputs_run_every_case():
    rows, _ = bench.run([1], SMALL, [np.dtype(np.float64)], repeats=3, budget=0.05,
                        with_reference=False, progress=False, bandwidth_bytes=4 << 20,
                        prealloc=True)
    assert [(r["case"], r["op"]) for r in rows] == [
        (name, op) for name, _, _ in SMALL for op in bench.OPS]
    assert all(r["bncy_s"] > 0 for r in rows)
    assert all(r["torch_s"] is None or r["torch_s"] > 0 for r in rows)


def test_torch_out_overloads_write_the_same_results():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for shape, axis in [((6, 4, 5, 5), 1), ((6, 5, 5, 4), -1)]:
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        C = shape[axis]
        fresh = bench._torch_case(torch, x, dy, axis, C)
        pre = bench._torch_case(torch, x, dy, axis, C, prealloc=True)
        for op in bench.OPS:   # same order, so both running statistics move alike
            a, b = fresh[op](), pre[op]()
            n = 3 if op != "inference" else 1   # inference leaves save_* undefined
            for u, v in zip(a[:n], b[:n]):
                np.testing.assert_allclose(u.numpy(), v.numpy(), rtol=1e-6, atol=1e-6)


def test_no_cache_runs_without_the_cache_and_restores_it(tmp_path, capsys):
    import json

    import bncy

    limit = bncy.buffer_cache_info()["limit"]
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--threads", "1", "--dtypes", "float32", "--no-reference",
                       "--no-cache", "--shape", "64x8", "--json", str(out)]) == 0
    assert "fresh (--no-cache)" in capsys.readouterr().out
    assert json.loads(out.read_text())["buffer_cache"]["limit"] == 0
    assert bncy.buffer_cache_info()["limit"] == limit


@pytest.mark.parametrize("flags", [["--activation", "relu"], ["--residual"],
                                   ["--activation", "relu", "--residual"]])
def test_fused_flags_report_the_unfused_composition(flags, tmp_path, capsys):
    import json

    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--threads", "1", "--dtypes", "float32", "--no-reference",
                       "--shape", "8x3x4x4", "--json", str(out)] + flags) == 0
    text = capsys.readouterr().out
    assert "unfused" in text and "fused: activation=" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["op"] for r in rows] == list(bench.OPS)
    for r in rows:
        assert r["unfused_s"] > 0 and r["residual"] == ("--residual" in flags)
        assert r["activation"] == ("relu" if "relu" in flags else None)
        assert r["torch_s"] is None or r["torch_s"] > 0


def test_fused_cases_compute_what_they_time():
    """The unfused composition and torch's eager case give the fused call's
    values (so the columns compare like with like)."""
    rng = np.random.default_rng(1)
    shape, axis, C = (6, 4, 5, 5), 1, 4
    x, dy, r = (rng.standard_normal(shape) for _ in range(3))
    g, b = np.ones(C), np.zeros(C)
    rm, rv = np.zeros(C), np.ones(C)
    import bncy

    y, m, s = bncy.forward(x, g, b, residual=r, activation="relu")
    dx, _, _, dr = bncy.backward(dy, x, m, s, g, beta=b, residual=r, activation="relu")
    unf = bench._unfused_case(x, dy, r, g, b, rm.copy(), rv.copy(), axis, 1)
    np.testing.assert_array_equal(unf["forward"](), y)
    (udx, _, _), udr = unf["backward"]()
    np.testing.assert_allclose(udx, dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(udr, dr)
    torch = pytest.importorskip("torch")
    tc = bench._torch_fused_case(torch, x, dy, r, axis, C)
    np.testing.assert_allclose(tc["forward"]()[0].numpy(), y, rtol=1e-10, atol=1e-10)
    (tdx, _, _), tdr = tc["backward"]()
    np.testing.assert_allclose(tdx.numpy(), dx, rtol=1e-8, atol=1e-8)
    np.testing.assert_array_equal(tdr.numpy(), dr)


def test_half_dtypes_run_against_torch_and_own_float32(tmp_path, capsys):
    import json

    pytest.importorskip("ml_dtypes")
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--threads", "1", "--dtypes", "float32,float16,bfloat16",
                       "--shape", "64x8x3x3", "--shape", "64x3x3x8:-1",
                       "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "16-bit storage against bncy's own float32" in text
    rows = json.loads(out.read_text())["rows"]
    assert {r["dtype"] for r in rows} == {"float32", "float16", "bfloat16"}
    assert all(r["bncy_s"] > 0 and r["reference_s"] > 0 for r in rows)
    assert all(r["torch_s"] is None or r["torch_s"] > 0 for r in rows)


def test_unknown_dtype_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--dtypes", "float8"])
    assert "unknown dtype" in capsys.readouterr().err


def test_torch_half_peer_computes_batch_norm():
    """The torch peer's 16-bit tensors are views of the same arrays: its forward
    agrees with bncy's within the storage type's rounding."""
    torch = pytest.importorskip("torch")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import bncy

    rng = np.random.default_rng(2)
    for dt in (np.float16, ml_dtypes.bfloat16):
        x, dy = (rng.standard_normal((16, 4, 5, 5)).astype(dt) for _ in range(2))
        case = bench._torch_case(torch, x, dy, 1, 4)
        y = case["forward"]()[0]
        want = bncy.forward(x)[0].astype(np.float64)
        np.testing.assert_allclose(y.double().numpy(), want, rtol=2e-2, atol=2e-2)

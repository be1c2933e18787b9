"""The numpy references of qk_rmsnorm (what the GPU tests compare kernels against)."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from mlagen import families
from mlagen.numerics import NP_DTYPE, rel_err, round_to

QK = families.get("qk_rmsnorm")

# output dtype -> tolerance of the float32 reference (rounded to the output) against float64
TOL = {"bf16": 1e-2, "f16": 2e-3, "f32": 1e-6}
PAIRS = [("bf16", "bf16"), ("bf16", "f32"), ("f16", "f16"), ("f32", "f32"), ("f32", "bf16")]


@pytest.fixture
def rng0():
    return np.random.default_rng(20240611)


@pytest.mark.parametrize("M", [1, 7, 64])
@pytest.mark.parametrize("dt,odt", PAIRS)
def test_reference_agrees_with_f64(dt, odt, M, rng0):
    p = QK.validate({"dtype": dt, "out_dtype": odt})
    prob = QK.make_problem(p, {"M": M}, rng0)
    ref = QK.reference(p, prob.inputs)
    r64 = QK.reference_f64(p, prob.inputs)
    for name, n in (("q_out", p["nq"]), ("k_out", p["nk"])):
        assert ref[name].dtype == NP_DTYPE[odt] and ref[name].shape == (M, n)
        assert r64[name].shape == (M, n)
        e = rel_err(ref[name], r64[name])
        assert e < TOL[odt], f"{name}: rel err {e}"
        # and row by row (a broken row would hide in the global norm of a large problem)
        for m in range(M):
            assert rel_err(ref[name][m], r64[name][m]) < TOL[odt]


def test_make_problem_inputs(rng0):
    p = QK.validate({"dtype": "bf16"})
    prob = QK.make_problem(p, {"M": 9}, rng0)
    x = prob.inputs
    assert prob.dims == {"M": 9}
    assert x["q"].dtype == NP_DTYPE["bf16"] and x["q"].shape == (9, p["nq"])
    assert x["k"].dtype == NP_DTYPE["bf16"] and x["k"].shape == (9, p["nk"])
    assert x["gamma_q"].dtype == np.float32 and x["gamma_k"].shape == (p["nk"],)
    assert x["qk_var"].dtype == np.float32 and x["qk_var"].shape == (9, 2)
    # qk_var holds the mean squares of the rounded rows
    q = x["q"].astype(np.float64)
    k = x["k"].astype(np.float64)
    np.testing.assert_allclose(x["qk_var"][:, 0], np.mean(q * q, axis=1), rtol=1e-5)
    np.testing.assert_allclose(x["qk_var"][:, 1], np.mean(k * k, axis=1), rtol=1e-5)


@pytest.mark.parametrize("dt,odt", PAIRS)
def test_rows_are_normalised(dt, odt, rng0):
    """With gamma = 1 and qk_var the rows' own mean squares, every output row has RMS 1."""
    p = QK.validate({"dtype": dt, "out_dtype": odt})
    x = dict(QK.make_problem(p, {"M": 16}, rng0).inputs)
    x["gamma_q"] = np.ones_like(x["gamma_q"])
    x["gamma_k"] = np.ones_like(x["gamma_k"])
    x["eps"] = 0.0
    out = QK.reference(p, x)
    for name in ("q_out", "k_out"):
        rms = np.sqrt(np.mean(out[name].astype(np.float64) ** 2, axis=1))
        np.testing.assert_allclose(rms, 1.0, rtol=5e-3 if odt == "bf16" else 1e-3)


@pytest.mark.parametrize("dt,odt", PAIRS)
def test_rows_scale_correctly(dt, odt, rng0):
    """Scaling a row by 2 (mean square by 4) leaves its output unchanged, bit for bit (eps = 0), and
    touches no other row; scaling gamma by 2 doubles the output exactly."""
    p = QK.validate({"dtype": dt, "out_dtype": odt})
    x = dict(QK.make_problem(p, {"M": 6}, rng0).inputs)
    x["eps"] = 0.0
    base = QK.reference(p, x)
    y = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in x.items()}
    y["q"][2] = round_to(y["q"][2].astype(np.float32) * 2, dt)
    y["k"][4] = round_to(y["k"][4].astype(np.float32) * 2, dt)
    y["qk_var"][2, 0] *= 4
    y["qk_var"][4, 1] *= 4
    out = QK.reference(p, y)
    for name in ("q_out", "k_out"):
        assert np.array_equal(out[name].view(np.uint8), base[name].view(np.uint8)), name
    z = dict(x)
    z["gamma_q"] = x["gamma_q"] * 2
    out = QK.reference(p, z)
    got, want = out["q_out"].astype(np.float64), 2 * base["q_out"].astype(np.float64)
    normal = np.abs(want) >= 2 * float(ml_dtypes.finfo(NP_DTYPE[odt]).tiny)   # subnormals round on a fixed grid
    assert normal.mean() > 0.99
    assert np.array_equal(got[normal], want[normal])
    assert np.array_equal(out["k_out"].view(np.uint8), base["k_out"].view(np.uint8))


def test_rows_are_independent(rng0):
    """Permuting the rows of the inputs permutes the rows of the outputs exactly."""
    p = QK.validate({})
    x = QK.make_problem(p, {"M": 11}, rng0).inputs
    perm = rng0.permutation(11)
    y = {k: (v[perm] if k in ("q", "k", "qk_var") else v) for k, v in x.items()}
    a, b = QK.reference(p, x), QK.reference(p, y)
    for name in ("q_out", "k_out"):
        assert np.array_equal(b[name].view(np.uint16), a[name][perm].view(np.uint16))


def test_eps_is_applied(rng0):
    p = QK.validate({"out_dtype": "f32"})
    x = dict(QK.make_problem(p, {"M": 3}, rng0).inputs)
    x["qk_var"] = np.zeros_like(x["qk_var"])
    x["eps"] = 0.25                        # 1/sqrt(0 + 0.25) = 2 exactly
    out = QK.reference(p, x)
    want = x["q"].astype(np.float32) * np.float32(2) * x["gamma_q"]
    assert np.array_equal(out["q_out"], want.astype(np.float32))


def test_bytes_moved():
    p = QK.validate({})
    M = 1000
    n = p["nq"] + p["nk"]
    assert QK.bytes_moved(p, {"M": M}) == M * n * (2 + 2) + M * 8 + n * 4
    p32 = QK.validate({"dtype": "f32", "out_dtype": "f32"})
    assert QK.bytes_moved(p32, {"M": M}) == M * n * 8 + M * 8 + n * 4

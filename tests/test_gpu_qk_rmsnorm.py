"""qk_rmsnorm on the GPU: bundles launched through mlagen.runtime vs the numpy reference."""
import numpy as np
import pytest

from mlagen import families, runtime
from mlagen.abi import ArgumentError
from mlagen.interop import poison, to_numpy, to_torch
from mlagen.numerics import rel_err

from conftest import gpu_bundles

pytestmark = pytest.mark.gpu
FAM = families.get("qk_rmsnorm")
BUNDLES = gpu_bundles("qk_rmsnorm")


def _strided(torch, a, dtype, pad):
    """A row-strided view of a: rows live in a wider buffer (as q/k slices of a fused projection do)."""
    m, n = a.shape
    big = to_torch(np.zeros((m, n + pad)), dtype)
    big[:, :n] = to_torch(a, dtype)
    return big[:, :n]


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
@pytest.mark.parametrize("M,strided", [(1, False), (7, True), (129, False), (1000, True), (4099, False)])
def test_qk_rmsnorm_matches_reference(bundle, M, strided, rng, record_property):
    import torch
    k = runtime.load(bundle)
    p = k.params
    prob = FAM.make_problem(p, {"M": M}, rng)
    x = prob.inputs
    vec = 16 // {"bf16": 2, "f16": 2, "f32": 4}[p["dtype"]]
    if strided:
        q = _strided(torch, x["q"], p["dtype"], 3 * vec)
        kk = _strided(torch, x["k"], p["dtype"], vec)
    else:
        q, kk = to_torch(x["q"], p["dtype"]), to_torch(x["k"], p["dtype"])
    qo = poison(torch.empty((M, p["nq"]), dtype=getattr(torch, {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[p["out_dtype"]]), device="cuda"))
    ko = poison(torch.empty((M, p["nk"]), dtype=qo.dtype, device="cuda"))
    k(q=q, k=kk, gamma_q=to_torch(x["gamma_q"], "f32"), gamma_k=to_torch(x["gamma_k"], "f32"),
      qk_var=to_torch(x["qk_var"], "f32"), q_out=qo, k_out=ko, eps=x["eps"])
    torch.cuda.synchronize()
    ref = FAM.reference(p, x)
    ref64 = FAM.reference_f64(p, x)
    for name, out in (("q_out", qo), ("k_out", ko)):
        got = to_numpy(out, p["out_dtype"])
        assert np.all(np.isfinite(got.astype(np.float32))), f"{name}: unwritten (NaN) elements"
        e = rel_err(got, ref64[name])
        record_property(f"rel_err_{name}", e)
        assert e < (2e-6 if p["out_dtype"] == "f32" else 1e-2), f"{name}: rel err {e}"
        if p["rsqrt"] == "ieee":
            bits = got.view(np.uint16 if got.itemsize == 2 else np.uint32)
            rbits = ref[name].view(bits.dtype)
            mism = int(np.sum(bits != rbits))
            record_property(f"bit_mismatches_{name}", mism)
            assert mism == 0, f"{name}: {mism} elements differ from the bit-exact reference"
        else:
            d = np.abs(got.astype(np.float64) - ref[name].astype(np.float64))
            tol = np.abs(ref[name].astype(np.float64)) * 2.0 ** -7 + 1e-30
            assert np.all(d <= tol), f"{name}: approx rsqrt off by more than one bf16 ulp"


@pytest.mark.skipif(not BUNDLES, reason="no qk_rmsnorm bundles")
def test_qk_rmsnorm_allocates_outputs_and_rejects_bad_input(rng):
    import torch
    k = runtime.load(BUNDLES[0])
    p = k.params
    x = FAM.make_problem(p, {"M": 33}, rng).inputs
    args = dict(q=to_torch(x["q"], p["dtype"]), k=to_torch(x["k"], p["dtype"]),
                gamma_q=to_torch(x["gamma_q"], "f32"), gamma_k=to_torch(x["gamma_k"], "f32"),
                qk_var=to_torch(x["qk_var"], "f32"), eps=1e-6)
    outs = k(**args)
    torch.cuda.synchronize()
    assert outs["q_out"].shape == (33, p["nq"]) and outs["k_out"].shape == (33, p["nk"])
    ref = FAM.reference(p, x)
    assert rel_err(to_numpy(outs["q_out"], p["out_dtype"]), ref["q_out"]) < 1e-2
    bad = dict(args, q=args["q"][:, 1:])
    with pytest.raises(ArgumentError, match="'q'"):
        k(**bad)
    bad = dict(args, qk_var=args["qk_var"][:20])
    with pytest.raises(ArgumentError, match="qk_var"):
        k(**bad)
    bad = dict(args, q=args["q"].float())
    with pytest.raises(ArgumentError, match="dtype"):
        k(**bad)
    bad = dict(args, k=args["k"].cpu())
    with pytest.raises(ArgumentError, match="'k'"):
        k(**bad)


@pytest.mark.skipif(not BUNDLES, reason="no qk_rmsnorm bundles")
def test_qk_rmsnorm_on_a_side_stream(rng):
    import torch
    k = runtime.load(BUNDLES[0])
    p = k.params
    x = FAM.make_problem(p, {"M": 4096}, rng).inputs
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        args = dict(q=to_torch(x["q"], p["dtype"]), k=to_torch(x["k"], p["dtype"]),
                    gamma_q=to_torch(x["gamma_q"], "f32"), gamma_k=to_torch(x["gamma_k"], "f32"),
                    qk_var=to_torch(x["qk_var"], "f32"), eps=1e-6)
        outs = k(stream=s, **args)
    s.synchronize()
    assert rel_err(to_numpy(outs["k_out"], p["out_dtype"]), FAM.reference(p, x)["k_out"]) < 1e-2

"""act_quant_fp8 on the GPU: bit-exact against numpy, and chained into fp8_gemm as MLA's q_nope @ w_uk."""
import numpy as np
import pytest

from mlagen import families, runtime
from mlagen.interop import poison, to_numpy, to_torch
from mlagen.numerics import rel_err

from conftest import gpu_bundles

pytestmark = pytest.mark.gpu
FAM = families.get("act_quant_fp8")
BUNDLES = gpu_bundles("act_quant_fp8")
GEMMS = gpu_bundles("fp8_gemm")


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
@pytest.mark.parametrize("M,K", [(1, 128), (3, 512), (129, 128), (1000, 7168)])
def test_act_quant_is_bit_exact(bundle, M, K, rng, record_property):
    import torch
    k = runtime.load(bundle)
    p = k.params
    if K % p["group"]:
        pytest.skip("K not a multiple of the group")
    x = FAM.make_problem(p, {"M": M, "K": K}, rng).inputs["x"]
    xt = to_torch(x, p["dtype"])
    q = poison(torch.empty((M, K), dtype=torch.float8_e4m3fn, device="cuda"))
    # scales stored "outer-dim major" (stride [1, M]), as cuBLAS wants them: any strides work
    s = poison(torch.empty((K // p["group"], M), dtype=torch.float32, device="cuda")).t()
    k(x=xt, q=q, scales=s)
    torch.cuda.synchronize()
    ref = FAM.reference(p, {"x": x})
    got_q = to_numpy(q, "f8e4m3").view(np.uint8)
    mism = int(np.sum(got_q != ref["q"].view(np.uint8)))
    record_property("fp8_code_mismatches", mism)
    assert mism == 0
    got_s = s.cpu().numpy()
    assert np.array_equal(got_s, ref["scales"]), "scales differ from the float32 reference"


@pytest.mark.skipif(not BUNDLES or not GEMMS, reason="needs act_quant_fp8 and fp8_gemm bundles")
def test_q_nope_quantised_then_absorbed_through_w_uk(rng, record_property):
    """q_nope [T, H, 128] bf16 -> fp8 (1x128) -> per-head GEMM with w_uk [H, 512, 128] (128x128 blocks)."""
    import torch
    T, H, D, R = 37, 16, 128, 512
    quant = runtime.load(next(b for b in BUNDLES if runtime.load(b).params["dtype"] == "bf16"
                              and runtime.load(b).params["group"] == 128))
    gemm = runtime.load(next(b for b in GEMMS if runtime.load(b).params["m_scale_granularity"] == 1
                             and runtime.load(b).params["n_scale_granularity"] == 128))
    gf = families.get("fp8_gemm")
    q_nope = (rng.standard_normal((T, H, D)) * 3).astype(np.float32)
    qt = to_torch(q_nope, "bf16")
    q8 = torch.empty((T, H, D), dtype=torch.float8_e4m3fn, device="cuda")
    qs = torch.empty((T, H, 1), dtype=torch.float32, device="cuda")
    quant(x=qt.view(T * H, D), q=q8.view(T * H, D), scales=qs.view(T * H, 1))
    wprob = gf.make_problem(gemm.params, dict(M=1, N=R, K=D, L=H), rng)     # w_uk as [H, 512, 128] + scales
    w8, ws = to_torch(wprob.inputs["b"], "f8e4m3"), to_torch(wprob.inputs["sb"], "f32")
    out = poison(torch.empty((H, T, R), dtype=torch.bfloat16, device="cuda"))
    args, _ = gf.torch_args(q8.permute(1, 0, 2), w8, qs.permute(1, 0, 2), ws, c=out)
    gemm(**args)
    torch.cuda.synchronize()
    a_deq = to_numpy(q8, "f8e4m3").astype(np.float64) * qs.cpu().numpy().astype(np.float64)
    w_deq = (to_numpy(w8, "f8e4m3").astype(np.float64)
             * np.repeat(np.repeat(wprob.inputs["sb"].astype(np.float64), 128, axis=1)[:, :R], D, axis=2))
    ref = np.einsum("thd,hrd->htr", a_deq, w_deq)
    e = rel_err(to_numpy(out, "bf16"), ref)
    record_property("rel_err_vs_dequantised", e)
    assert e < 1e-2
    e_full = rel_err(to_numpy(out, "bf16"), np.einsum("thd,hrd->htr", to_numpy(qt, "bf16").astype(np.float64), w_deq))
    record_property("rel_err_vs_bf16_activations", e_full)
    assert e_full < 6e-2

"""fp8_gemm on the GPU: blockwise-scaled FP8 GEMM / batched GEMM through TMA descriptors built by the runtime."""
import numpy as np
import pytest

from mlagen import families, runtime
from mlagen.abi import ArgumentError
from mlagen.interop import poison, to_numpy, to_torch
from mlagen.numerics import rel_err

from conftest import gpu_bundles

pytestmark = pytest.mark.gpu
FAM = families.get("fp8_gemm")
BUNDLES = gpu_bundles("fp8_gemm")

SHAPES = [
    dict(M=1, N=256, K=128, L=1),
    dict(M=3, N=384, K=512, L=1),
    dict(M=17, N=200, K=256, L=2),
    dict(M=129, N=256, K=1024, L=1),
    dict(M=256, N=512, K=2048, L=3),
    dict(M=1000, N=2296, K=384, L=3),    # more tiles than a wave of CTAs: persistent CTAs take several
]


def _run(k, prob, torch_layout="contiguous"):
    import torch
    p = k.params
    x = prob.inputs
    a, b = to_torch(x["a"], "f8e4m3"), to_torch(x["b"], "f8e4m3")
    if torch_layout == "token_major":
        # MLA's q_nope is [T, H, K]: view it as [H, T, K] (batch = head) without copying
        a = a.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    args, c = FAM.torch_args(a, b, to_torch(x["sa"], "f32"), to_torch(x["sb"], "f32"))
    poison(c)
    k(**args)
    torch.cuda.synchronize()
    return to_numpy(c, "bf16").astype(np.float64)


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{M}_N{N}_K{K}_L{L}".format(**s))
def test_fp8_gemm_matches_reference(bundle, shape, rng, record_property):
    k = runtime.load(bundle)
    prob = FAM.make_problem(k.params, shape, rng)
    got = _run(k, prob)
    assert np.all(np.isfinite(got)), "unwritten (NaN) elements in C"
    e = rel_err(got, FAM.reference(k.params, prob.inputs)["c"])
    record_property("rel_err", e)
    assert e < 1e-2


@pytest.mark.skipif(not BUNDLES, reason="no fp8_gemm bundles")
def test_fp8_bmm_token_major_activations(rng, record_property):
    k = runtime.load(BUNDLES[0])
    prob = FAM.make_problem(k.params, dict(M=33, N=512, K=128, L=4), rng)
    got = _run(k, prob, "token_major")
    e = rel_err(got, FAM.reference(k.params, prob.inputs)["c"])
    record_property("rel_err", e)
    assert e < 1e-2


@pytest.mark.skipif(not BUNDLES, reason="no fp8_gemm bundles")
def test_fp8_gemm_rejects_bad_input(rng):
    import torch
    k = runtime.load(BUNDLES[0])
    p = k.params
    x = FAM.make_problem(p, dict(M=8, N=256, K=256, L=1), rng).inputs
    a, b = to_torch(x["a"], "f8e4m3"), to_torch(x["b"], "f8e4m3")
    sa, sb = to_torch(x["sa"], "f32"), to_torch(x["sb"], "f32")
    args, _ = FAM.torch_args(a, b, sa, sb)
    with pytest.raises(ArgumentError, match="sa|sb|scales"):
        k(**dict(args, sa=FAM.torch_args(a, b, sa[:, :, :1], sb)[0]["sa"]))
    with pytest.raises(ArgumentError, match="'a'"):
        k(**dict(args, a=args["a"].to(torch.bfloat16) if False else args["a"][:, :100]))

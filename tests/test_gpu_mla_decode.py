"""mla_decode (+ mla_combine) on the GPU: dense / causal / sparse / sink, page sizes, partitions, poisoned outputs,
a cache whose unowned slots hold NaN (reading one would show), and CUDA-graph replay of a bound plan."""
import numpy as np
import pytest

from mlagen import families, runtime
from mlagen.abi import ArgumentError
from mlagen.families.mla_decode.plan import MLADecode
from mlagen.interop import poison, to_numpy, to_torch
from mlagen.numerics import rel_err

from conftest import bundles_root, gpu_bundles

pytestmark = pytest.mark.gpu
FAM = families.get("mla_decode")
COMB = families.get("mla_combine")
BUNDLES = gpu_bundles("mla_decode")
COMBINES = gpu_bundles("mla_combine")

SHAPES = [
    dict(B=1, C=1),                 # a single cached token
    dict(B=3, C=200, zero=1),       # one empty sequence, partial last tiles
    dict(B=17, C=1000),             # odd batch, ragged lengths
    dict(B=128, C=130),             # large batch, short contexts
    dict(B=2, C=32768, uniform=1),  # long context
]


def _plan(k):
    p = k.params
    combs = [runtime.Kernel(b) for b in COMBINES]
    combs = [c for c in combs if (c.params["num_heads"], c.params["q_len"], c.params["attn_sink"],
                                  c.params.get("out_dtype", "bf16"))
             == (p["num_heads"], p["q_len"], p["attn_sink"], "bf16")]
    return MLADecode(k, combs[0] if combs else None)


def _inputs(p, x):
    t = dict(q=to_torch(x["q"], "bf16"), kv_cache=to_torch(x["kv_cache"], p["cache_dtype"]),
             page_table=to_torch(x["page_table"], "i32"), kv_lengths=to_torch(x["kv_lengths"], "i32"))
    kw = dict(layer_idx=x["layer_idx"], softmax_scale=x["softmax_scale"])
    if p["sparse"]:
        kw["indices"], kw["topk_lengths"] = to_torch(x["indices"], "i32"), to_torch(x["topk_lengths"], "i32")
    if p["attn_sink"]:
        kw["attn_sink"] = to_torch(x["attn_sink"], "f32")
    if p["cache_dtype"] == "f8e4m3":
        kw["kv_scales"] = to_torch(x["kv_scales"], "f32")
    return t, kw


def _check(p, x, out, lse, record_property, tag=""):
    ref = FAM.reference(p, x)
    got = to_numpy(out, "bf16").astype(np.float64)
    gl = to_numpy(lse, "f32").astype(np.float64)
    assert np.all(np.isfinite(got)), f"{tag}: NaN/unwritten elements in out"
    e = rel_err(got, ref["out"])
    fin = np.isfinite(ref["lse"])
    assert np.array_equal(np.isfinite(gl), fin), f"{tag}: lse finiteness differs from the reference"
    le = float(np.max(np.abs(gl[fin] - ref["lse"][fin]))) if fin.any() else 0.0
    record_property(f"rel_err{tag}", e)
    record_property(f"lse_abs_err{tag}", le)
    assert e < 1e-2, f"{tag}: rel err {e}"
    assert le < 2e-2, f"{tag}: lse err {le}"


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{B}_C{C}".format(**s))
def test_mla_decode_matches_reference(bundle, shape, rng, record_property):
    import torch
    k = runtime.load(bundle)
    p = k.params
    if p["sparse"] and shape["C"] > 4096:
        shape = dict(shape, C=4096)
    prob = FAM.make_problem(p, shape, rng)
    x = prob.inputs
    t, kw = _inputs(p, x)
    plan = _plan(k)
    B = shape["B"]
    parts = [None, 1, 3] if plan.combine is not None else [1]
    for npart in parts:
        out = poison(torch.empty((B, p["q_len"], p["num_heads"], 512), dtype=torch.bfloat16, device="cuda"))
        lse = poison(torch.empty((B, p["q_len"], p["num_heads"]), dtype=torch.float32, device="cuda"))
        b = plan.bind(**t, **kw, num_partitions=npart, out=out, lse=lse)
        b.launch()
        torch.cuda.synchronize()
        record_property(f"partitions_{npart}", b.num_partitions)
        _check(p, x, out, lse, record_property, f"_p{npart}")


@pytest.mark.parametrize("bundle", COMBINES, ids=lambda b: b.name)
@pytest.mark.parametrize("nparts", [7, 67], ids=lambda n: f"P{n}")
def test_mla_combine_matches_reference(bundle, nparts, rng, record_property):
    import torch
    k = runtime.load(bundle)
    p = k.params
    prob = COMB.make_problem(p, dict(B=5, NPART=nparts), rng)
    x = prob.inputs
    o = to_torch(x["o_part"], "f32")
    l = to_torch(x["lse_part"], "f32")
    R = p["num_heads"] * p["q_len"]
    fp8 = p.get("out_dtype", "bf16") == "f8e4m3"
    out = poison(torch.empty((5, R, 512), dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16, device="cuda"))
    lse = poison(torch.empty((5, R), dtype=torch.float32, device="cuda"))
    args = dict(o_part=o.permute(2, 3, 1, 0), lse_part=l.permute(2, 1, 0), out=out.permute(1, 2, 0),
                lse=lse.permute(1, 0))
    if fp8:
        osc = poison(torch.empty((5, R, 4), dtype=torch.float32, device="cuda"))
        args["out_scales"] = osc.permute(1, 2, 0)
    if p["attn_sink"]:
        args["attn_sink"] = to_torch(x["attn_sink"], "f32")
    k(**args)
    torch.cuda.synchronize()
    ref = COMB.reference(p, x)
    if fp8:
        # the act_quant_fp8 codes of the bf16-rounded output: equal but for rare rounding-boundary flips
        codes, sc = to_numpy(out, "f8e4m3"), to_numpy(osc, "f32")
        assert np.all(np.isfinite(sc)) and np.all(np.isfinite(codes.astype(np.float32)))
        flips = float(np.mean(codes.astype(np.float32) != ref["out_q"].astype(np.float32)))
        record_property("fp8_code_mismatch", flips)
        assert flips < 2e-3, f"{flips:.2%} of fp8 codes differ from act_quant_fp8 of the bf16 output"
        assert np.allclose(sc, ref["out_scales"], rtol=1e-2, atol=0)
        got = (codes.astype(np.float64).reshape(5, R, 4, 128) * sc[..., None]).reshape(5, R, 512)
        tol = 4e-2                     # e4m3 rounding (3 mantissa bits) against the unquantised reference
    else:
        got = to_numpy(out, "bf16").astype(np.float64)
        tol = 1e-2
    assert np.all(np.isfinite(got))
    e = rel_err(got, ref["out"])
    gl = to_numpy(lse, "f32")
    fin = np.isfinite(ref["lse"])
    assert np.array_equal(np.isfinite(gl), fin)
    record_property("rel_err", e)
    assert e < tol
    assert np.max(np.abs(gl[fin] - ref["lse"][fin])) < 1e-3


@pytest.mark.skipif(not BUNDLES, reason="no mla_decode bundles")
def test_mla_decode_cuda_graph_replay(rng, record_property):
    """A bound plan captured in a CUDA graph gives the reference result on new inputs copied in place."""
    import torch
    k = next((runtime.load(b) for b in BUNDLES if not runtime.load(b).params["sparse"]), None)
    if k is None:
        pytest.skip("no dense bundle")
    p = k.params
    plan = _plan(k)
    shape = dict(B=8, C=700)
    x = FAM.make_problem(p, shape, rng).inputs
    t, kw = _inputs(p, x)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        b = plan.bind(**t, **kw, num_partitions=2 if plan.combine else 1, stream=s)
        b.launch()          # warm-up (module load) outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            b.launch()
    x2 = FAM.make_problem(p, shape, rng).inputs
    # same lengths/pages (the graph keeps addresses; the serving loop updates contents): new q and cache rows
    x2 = dict(x, q=x2["q"])
    t["q"].copy_(to_torch(x2["q"], "bf16"))
    poison(b.out)
    g.replay()
    torch.cuda.synchronize()
    _check(p, x2, b.out, b.lse, record_property, "_graph")


@pytest.mark.skipif(not BUNDLES, reason="no mla_decode bundles")
def test_mla_decode_rejects_bad_input(rng):
    k = next(runtime.load(b) for b in BUNDLES if not runtime.load(b).params["sparse"])
    p = k.params
    x = FAM.make_problem(p, dict(B=4, C=300), rng).inputs
    t, kw = _inputs(p, x)
    plan = MLADecode(k, None)
    bad = t["page_table"].clone()
    bad[1, 0] = 10 ** 6
    with pytest.raises(ArgumentError, match=r"page_table\[1, 0\]"):
        plan.bind(**dict(t, page_table=bad), **kw, num_partitions=1)
    lens = t["kv_lengths"].clone()
    lens[2] = t["page_table"].shape[1] * p["page_size"] + 1
    with pytest.raises(ArgumentError, match="capacity"):
        plan.bind(**dict(t, kv_lengths=lens), **kw, num_partitions=1)
    with pytest.raises(ArgumentError, match="layer_idx"):
        plan.bind(**t, **dict(kw, layer_idx=99), num_partitions=1)
    with pytest.raises(ArgumentError, match="'q'"):
        plan.bind(**dict(t, q=t["q"].float()), **kw, num_partitions=1)
    with pytest.raises(ArgumentError, match="mla_combine"):
        plan.bind(**t, **kw, num_partitions=4)


def test_tensor_map_fixed_mode_is_the_slice():
    """TensorMapArg.fixed (the 2-d map of one cache layer that sm_100a's gather4 loads read) encodes exactly the
    map of that layer's slice, and rejects a layer outside the cache."""
    import torch
    from mlagen.abi import TensorMapArg
    kv = torch.randn(3, 256, 576, device="cuda").to(torch.bfloat16)          # [layers, slots, 576]
    view = runtime.as_device_array(kv.permute(1, 2, 0), "kv")                  # (slots, 576, layers) as the ABI
    fixed = TensorMapArg("tma_kvg", "kv", (64, 1), swizzle=128, modes=(1, 0), fixed=((2, "layer_idx"),))
    plain = TensorMapArg("tma_kvg", "kv", (64, 1), swizzle=128, modes=(1, 0))
    for layer in range(3):
        want = runtime.encode_tensor_map(runtime.as_device_array(kv[layer], "kv"), plain)
        assert runtime.encode_tensor_map(view, fixed, values={"layer_idx": layer}) == want
    with pytest.raises(ArgumentError, match="layer_idx=3"):
        runtime.encode_tensor_map(view, fixed, values={"layer_idx": 3})

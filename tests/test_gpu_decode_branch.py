"""The fused MLA decode branch on the GPU against the float64 reference of the whole branch: dense and
sparse, bf16 and fp8 caches, q_len 1 and 2, one partition (decode + act_quant) and several (fp8-output
combine), CUDA-graph replay, and bad input rejected before any launch."""
import numpy as np
import pytest

from mlagen.abi import ArgumentError
from mlagen.decode_branch import MLADecodeBranch, make_problem, mla_decode_branch, reference, torch_inputs
from mlagen.interop import poison, to_numpy
from mlagen.numerics import rel_err

from conftest import bundles_root

pytestmark = pytest.mark.gpu

CONFIGS = {
    "h128_bf16": dict(num_heads=128, page_size=64, cache_dtype="bf16", q_len=1, sparse=False, attn_sink=False),
    "h16_fp8g64": dict(num_heads=16, page_size=64, cache_dtype="f8e4m3", quant_granularity=64, q_len=1, sparse=False,
                       attn_sink=False),
    "h16_q2_sink": dict(num_heads=16, page_size=64, cache_dtype="bf16", q_len=2, sparse=False, attn_sink=True),
    "h64_sparse256": dict(num_heads=64, page_size=64, cache_dtype="bf16", q_len=1, sparse=True, topk=256,
                          attn_sink=False),
    "h128_fp8g576_q2_half": dict(num_heads=128, page_size=64, cache_dtype="f8e4m3", quant_granularity=576, q_len=2,
                                 sparse=False, attn_sink=False, rope_layout="half"),
}
SHAPES = [dict(B=1, C=40), dict(B=5, C=300), dict(B=24, C=1100)]


def _plan(name):
    try:
        return MLADecodeBranch(bundles_root(), **CONFIGS[name])
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _check(p, x, step, record_property, tag):
    """Stage by stage, then end to end.

    The branch re-quantises the attention output to fp8 before w_uv, so a perturbation d (relative) of that
    output, e.g. the decode's bf16 P, flips a fraction ~ d / u of the fp8 codes (u ~ 2^-4, the e4m3
    step), for an error ~ sqrt(d * u) ~ 1e-2 at the end, whoever computes it.  So the tight checks are
    per stage (each against float64 of the stage's own inputs as the plan stored them), and the end to
    end one bounds the sum."""
    from mlagen.families.fp8_gemm import _dequant
    ref = reference(p, x)
    T, H = step.out.shape[:2]
    got = to_numpy(step.out, "bf16").astype(np.float64)
    assert np.all(np.isfinite(got)), f"{tag}: NaN / unwritten elements in out"
    # 1. q for the decode: w_uk projection (into the concat buffer) and rope columns
    eq = rel_err(to_numpy(step.buffers["q_full"], "bf16").astype(np.float64), ref["q_full"])
    # 2. the attention output the plan quantised (decode + combine), dequantised
    o8 = to_numpy(step.buffers["o8"], "f8e4m3").astype(np.float64)
    os_ = to_numpy(step.buffers["o_s"], "f32").astype(np.float64)
    od = (o8.reshape(T, H, 4, 128) * os_[..., None]).reshape(T, H, 512)
    eo = rel_err(od, ref["o"])
    # 3. w_uv of exactly those codes
    w_uv = _dequant(x["w_uv_nk"], x["w_uv_scale_nk"], 128)
    e3 = rel_err(got, np.einsum("thk,hnk->thn", od, w_uv))
    e = rel_err(got, ref["out"])
    if step.buffers["o_bf"] is not None:       # one partition: the decode's bf16 output before act_quant
        eb = rel_err(to_numpy(step.buffers["o_bf"], "bf16").astype(np.float64), ref["o"])
        record_property(f"o_bf16_rel_err{tag}", eb)
        assert eb < 1e-2, f"{tag}: decode output rel err {eb}"
    for k, v in (("q_full", eq), ("o_fp8", eo), ("w_uv_stage", e3), ("out", e)):
        record_property(f"{k}_rel_err{tag}", v)
    record_property(f"launches{tag}", len(step.steps))
    assert eq < 1e-2, f"{tag}: decode query (w_uk projection + rope) rel err {eq}"
    assert eo < 5e-2, f"{tag}: fp8 attention output (dequantised) rel err {eo} (e4m3 alone gives ~3e-2)"
    assert e3 < 1e-2, f"{tag}: w_uv projection of the plan's own fp8 codes rel err {e3}"
    assert e < 3e-2, f"{tag}: end-to-end rel err {e}"
    return ref


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{B}_C{C}".format(**s))
def test_branch_matches_float64_reference(name, shape, rng, record_property):
    import torch
    plan = _plan(name)
    p = plan.p
    for npart in (None, 1, 3):
        x = make_problem(p, shape["B"], shape["C"], rng)       # fresh inputs (and cache) for each run
        args, kw = torch_inputs(p, x)
        out = poison(torch.empty((shape["B"] * p["q_len"], p["num_heads"], 128), dtype=torch.bfloat16, device="cuda"))
        step = plan.bind(*args, **kw, num_partitions=npart, out=out)
        for b in step.buffers.values():
            if b is not None:
                poison(b)
        step.launch()
        torch.cuda.synchronize()
        tag = f"_p{npart}"
        record_property(f"partitions{tag}", step.num_partitions)
        record_property(f"kernels{tag}", step.kernels)
        ref = _check(p, x, step, record_property, tag)
        # the new tokens' cache rows (this step's writes) as the reference wrote them
        cache = args[5]
        rows = ref["cache_layer"]
        got_layer = to_numpy(cache.kv_cache[x["layer_idx"]], p["cache_dtype"]).astype(np.float64)
        lens = x["cache_lengths"]
        ps = p["page_size"]
        for b in range(shape["B"]):
            for j in range(p["q_len"]):
                t = int(lens[b]) + j
                pg, sl = x["page_table"][b, t // ps], t % ps
                want = rows[pg, sl].astype(np.float64)
                assert rel_err(got_layer[pg, sl], want) < 2e-2, f"cache row of sequence {b} token {t}"
        if step.num_partitions > 1:
            assert any("fp8 out" in k for k in step.kernels), "several partitions: the combine quantises (fused)"
        else:
            assert any("act_quant_fp8(o)" in k for k in step.kernels)


def test_branch_cuda_graph_replay(rng, record_property):
    """A bound step captured in a CUDA graph reproduces the reference on new token inputs copied in place."""
    import torch
    name = "h16_fp8g64"
    plan = _plan(name)
    p = plan.p
    x = make_problem(p, 6, 500, rng)
    args, kw = torch_inputs(p, x)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        step = plan.bind(*args, **kw, num_partitions=2, stream=s)
        step.launch()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            step.launch()
    x2 = make_problem(p, 6, 500, rng)
    x2 = dict(x, q=x2["q"], kv_input=x2["kv_input"])       # same lengths and pages, new token inputs
    from mlagen.interop import to_torch
    args[0].copy_(to_torch(x2["q"], "bf16"))
    args[1].copy_(to_torch(x2["kv_input"], "bf16"))
    poison(step.out)
    g.replay()
    torch.cuda.synchronize()
    _check(p, x2, step, record_property, "_graph")


def test_branch_function_form(rng, record_property, monkeypatch):
    """mlagen.mla_decode_branch infers the plan from the tensors and caches it."""
    import torch
    name = "h16_q2_sink"
    p = _plan(name).p
    x = make_problem(p, 3, 200, rng)
    args, kw = torch_inputs(p, x)
    out = mla_decode_branch(*args, **kw, bundles=str(bundles_root()))
    torch.cuda.synchronize()
    ref = reference(p, x)
    e = rel_err(to_numpy(out, "bf16").astype(np.float64), ref["out"])
    record_property("rel_err", e)
    assert e < 3e-2          # end to end (see _check for why not 1e-2)


def test_branch_rejects_bad_input(rng):
    import torch
    plan = _plan("h16_fp8g64")
    p = plan.p
    x = make_problem(p, 4, 100, rng)
    args, kw = torch_inputs(p, x)
    a = list(args)

    def bad(i, v, match):
        b = list(a)
        b[i] = v
        with pytest.raises(ArgumentError, match=match):
            plan.bind(*b, **kw)

    bad(2, torch.tensor([0, 1, 3, 4, 5], dtype=torch.int32, device="cuda"), "input_row_offsets")
    bad(9, a[9].contiguous(), "k dimension")                                  # w_uk with n contiguous
    bad(10, a[10][:, :, :2], "w_uk_scale")
    bad(11, a[11].to(torch.float32), "w_uv")
    bad(0, a[0][:, :8], "q must be")
    cache = a[5]
    from mlagen.decode_branch import PagedLatentCache
    full = PagedLatentCache(cache.kv_cache, cache.page_table, cache.cache_lengths + 10_000, cache.kv_scales)
    bad(5, full, "capacity|freqs_cis")
    bad(5, PagedLatentCache(cache.kv_cache, cache.page_table, cache.cache_lengths, None), "kv_scales")

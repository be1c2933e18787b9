"""rope_rmsnorm_quant on the GPU: ragged batches, page boundaries, bf16 and fp8 caches."""
import numpy as np
import pytest

from mlagen import families, runtime
from mlagen.abi import ArgumentError
from mlagen.interop import poison, to_numpy, to_torch
from mlagen.numerics import rel_err

from conftest import gpu_bundles

pytestmark = pytest.mark.gpu
FAM = families.get("rope_rmsnorm_quant")
BUNDLES = gpu_bundles("rope_rmsnorm_quant")

SHAPES = [
    dict(B=1, S=1, C=0),            # first token of one sequence
    dict(B=3, S=5, C=130),          # ragged prefill chunks
    dict(B=64, S=1, C=2000),        # decode step
    dict(B=5, S=70, C=63),          # crosses page boundaries
    dict(B=7, S=3, C=1),            # odd token counts
]


def _torch_inputs(p, x):
    t = {}
    for name, v in x.items():
        if name in ("layer_idx", "eps"):
            t[name] = v
            continue
        dt = {"input_row_offsets": "u32", "page_table": "i32", "cache_lengths": "i32", "freqs_cis": "f32",
              "kv_scales": "f32", "gamma": p["gamma_dtype"], "kv_cache": p["cache_dtype"]}.get(name, "bf16")
        t[name] = to_torch(v, dt)
    return t


def run_and_check(k, prob, record_property):
    import torch
    p = k.params
    x = prob.inputs
    t = _torch_inputs(p, x)
    t["q_rope_out"] = poison(torch.empty_like(t["q_rope"]))
    if p["q_nope_quant"]:
        T, H = t["q_nope"].shape[:2]
        t["q_nope_fp8"] = poison(torch.empty((T, H, 128), dtype=torch.float8_e4m3fn, device="cuda"))
        t["q_nope_scales"] = poison(torch.empty((T, H), dtype=torch.float32, device="cuda"))
    k(**t)
    torch.cuda.synchronize()
    ref = FAM.reference(p, x)
    if p["q_nope_quant"]:
        # act_quant_fp8's codes and scales (the same float32 recipe: equal up to rare rounding-boundary flips)
        codes = to_numpy(t["q_nope_fp8"], "f8e4m3").astype(np.float32)
        sc = to_numpy(t["q_nope_scales"], "f32")
        assert np.all(np.isfinite(codes)) and np.all(np.isfinite(sc)), "q_nope_fp8 / scales unwritten"
        assert np.array_equal(sc, ref["q_nope_scales"]), "q_nope scales differ from act_quant_fp8's recipe"
        flips = float(np.mean(codes != ref["q_nope_fp8"].astype(np.float32)))
        record_property("q_nope_code_mismatch", flips)
        assert flips < 1e-3, f"{flips:.2%} of q_nope codes differ from act_quant_fp8's"
    ref64 = FAM.reference(p, x, precision="f64")
    q = to_numpy(t["q_rope_out"], "bf16").astype(np.float64)
    assert np.all(np.isfinite(q)), "q_rope_out has unwritten elements"
    e = rel_err(q, ref64["q_rope_out"])
    record_property("rel_err_q_rope", e)
    assert e < 1e-2
    assert np.all(np.abs(q - ref["q_rope_out"]) <= np.abs(ref["q_rope_out"]) * 2.0 ** -7 + 1e-6), \
        "q_rope_out: more than one bf16 ulp from the float32 reference"

    cache = to_numpy(t["kv_cache"], p["cache_dtype"])
    before = x["kv_cache"]
    L = x["layer_idx"]
    slots = FAM.token_slots(p, x)
    written = np.zeros(cache.shape[:3], bool)
    for tok, page, slot in slots:
        written[L, page, slot] = True
    cb = cache.view(np.uint8 if cache.itemsize == 1 else np.uint16)
    bb = before.view(cb.dtype)
    assert np.array_equal(cb[~written], bb[~written]), "the kernel wrote outside the new tokens' cache rows"
    toks = np.array([s[0] for s in slots])
    pages = np.array([s[1] for s in slots])
    sl = np.array([s[2] for s in slots])
    rows = cache[L, pages, sl, 0, :].astype(np.float64)
    if p["cache_dtype"] == "bf16":
        e = rel_err(rows, ref64["rows"][toks])
        record_property("rel_err_cache", e)
        assert e < 1e-2
    else:
        sc = to_numpy(t["kv_scales"], "f32")
        sb = x["kv_scales"]
        assert np.array_equal(sc[~written], sb[~written]), "the kernel wrote outside the new tokens' scale rows"
        scales = sc[L, pages, sl, 0, :]
        es = rel_err(scales, ref["scales"][toks])
        record_property("rel_err_scales", es)
        assert es < 1e-5
        g = p["quant_granularity"]
        deq = (rows.reshape(len(toks), -1, g) * scales[:, :, None]).reshape(rows.shape)
        e = rel_err(deq, ref64["rows"][toks])
        record_property("rel_err_cache_dequant", e)
        assert e < 5e-2
        mism = float(np.mean(cache[L, pages, sl, 0, :].view(np.uint8) != ref["rows_q"][toks].view(np.uint8)))
        record_property("fp8_code_mismatch_frac", mism)
        assert mism < 1e-2


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{B}_S{S}_C{C}".format(**s))
def test_rope_rmsnorm_quant_matches_reference(bundle, shape, rng, record_property):
    k = runtime.load(bundle)
    prob = FAM.make_problem(k.params, shape, rng)
    record_property("T", prob.dims["T"])
    run_and_check(k, prob, record_property)


@pytest.mark.skipif(not BUNDLES, reason="no rope_rmsnorm_quant bundles")
def test_rope_rmsnorm_quant_rejects_bad_pages_and_capacity(rng):
    k = runtime.load(BUNDLES[0])
    p = k.params
    prob = FAM.make_problem(p, dict(B=4, S=3, C=100), rng)
    t = _torch_inputs(p, prob.inputs)
    pt = t["page_table"].clone()
    b, page_idx = 2, int(prob.inputs["cache_lengths"][2]) // p["page_size"]
    pt[b, page_idx] = prob.dims["NP"] + 7
    with pytest.raises(ArgumentError, match=r"page_table\[2,"):
        k(**dict(t, page_table=pt))
    lens = t["cache_lengths"].clone()
    lens[1] = prob.dims["MP"] * p["page_size"]
    with pytest.raises(ArgumentError, match="capacity|freqs_cis"):
        k(**dict(t, cache_lengths=lens))
    with pytest.raises(ArgumentError, match="layer_idx"):
        k(**dict(t, layer_idx=prob.dims["L"]))
    with pytest.raises(ArgumentError, match="input_row_offsets"):
        k(**dict(t, input_row_offsets=t["input_row_offsets"][:-1]))
    with pytest.raises(ArgumentError, match="kv_input"):
        k(**dict(t, kv_input=t["kv_input"][:, 1:]))

"""The decode branch without a GPU: its float64 reference (sparse over every token equals dense, the
rope columns and the lengths offset), the fused quantisation recipe of the fp8-output combine, bundle
discovery and its errors."""
import numpy as np
import pytest

from mlagen import families
from mlagen.decode_branch import MLADecodeBranch, SPEC, make_problem, reference
from mlagen.numerics import quantize_fp8_rows, rel_err, round_to


def _p(**kw):
    p = dict(num_heads=16, page_size=16, cache_dtype="bf16", q_len=1, sparse=False, attn_sink=False, topk=2048,
             quant_granularity=64)
    p.update(kw)
    return p


def test_sparse_over_every_token_equals_dense(rng):
    p = _p()
    x = make_problem(p, 3, 40, rng)
    dense = reference(p, x)
    ps = _p(sparse=True, topk=64)
    end = x["cache_lengths"].astype(np.int64) + 1
    idx = np.full((3, 1, 64), -1, np.int32)
    for b in range(3):
        idx[b, 0, :end[b]] = rng.permutation(int(end[b]))
    xs = dict(x, sparse_indices=idx, topk_lengths=np.full((3, 1), 64, np.int32))
    sparse = reference(ps, xs)
    assert rel_err(sparse["out"], dense["out"]) < 1e-12


def test_reference_decodes_the_new_tokens_and_rope_columns(rng):
    """The step's own tokens are in the cache the decode reads (length + q_len), and q's rope columns are
    the rope family's reference."""
    p = _p(q_len=2, cache_dtype="f8e4m3", quant_granularity=64)
    x = make_problem(p, 2, 30, rng)
    r = reference(p, x)
    rope = families.get("rope_rmsnorm_quant")
    rp = rope.validate(dict(num_heads=16, page_size=16, cache_dtype="f8e4m3", quant_granularity=64))
    rin = dict(input_row_offsets=x["input_row_offsets"], q_rope=x["q"][:, :, 128:], kv_input=x["kv_input"],
               freqs_cis=x["freqs_cis"], gamma=x["kv_norm_gamma"], page_table=x["page_table"],
               cache_lengths=x["cache_lengths"], eps=x["eps"])
    want = round_to(rope.reference(rp, rin, precision="f64")["q_rope_out"], "bf16")
    assert np.array_equal(r["q_full"][:, :, 512:], want)
    for t, page, slot in rope.token_slots(rp, rin):       # new rows written (NaN before), scales too
        assert np.all(np.isfinite(r["cache_layer"][page, slot].astype(np.float32)))
        assert np.all(r["scales_layer"][page, slot] > 0)
    assert np.all(np.isfinite(r["out"]))


def test_fp8_activation_recipe_bounds_the_error(rng):
    y = rng.standard_normal((7, 512)) * np.exp(rng.uniform(-4, 4, (7, 1)))
    q, s = quantize_fp8_rows(y, 128)
    assert s.shape == (7, 4)
    deq = (q.astype(np.float64).reshape(7, 4, 128) * s[..., None]).reshape(7, 512)
    assert rel_err(deq, y) < 4e-2
    assert np.all(np.abs(q.astype(np.float32)) <= 448)


def test_combine_fp8_out_reference(rng):
    comb = families.get("mla_combine")
    p = comb.validate(dict(num_heads=16, out_dtype="f8e4m3"))
    x = comb.make_problem(p, dict(B=3, NPART=4), rng).inputs
    r = comb.reference(p, x)
    deq = (r["out_q"].astype(np.float64).reshape(3, 16, 4, 128) * r["out_scales"][..., None]).reshape(3, 16, 512)
    assert rel_err(deq, r["out"]) < 4e-2
    lay = comb.layout(p)
    assert [a.name for a in lay.args][-1] == "out_scales"


def test_bench_numbers_count_weights_and_cache():
    p = _p(num_heads=128, page_size=64)
    d = dict(B=64, C=4096)
    kv = 64 * 4096 * 576 * 2
    w = 128 * (128 * 512 + 512 * 128)
    assert kv + w < SPEC.bytes_moved(p, d) < 1.1 * (kv + w)
    assert SPEC.flops(p, d) > 2 * 128 * 64 * 4096 * (576 + 512)


def test_plan_names_every_missing_bundle(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        MLADecodeBranch(tmp_path, num_heads=16, page_size=64)
    msg = str(e.value)
    for fam in ("rope_rmsnorm_quant", "act_quant_fp8", "fp8_gemm", "mla_decode"):
        assert fam in msg


@pytest.mark.compile
def test_plan_finds_compiled_bundles(tmp_path):
    """Bundles built here (no GPU) are what the plan picks: the fp8-output combine for several partitions."""
    from mlagen import compile as mcompile
    for fam, params in (("rope_rmsnorm_quant", dict(num_heads=16, head_splits=4, q_unroll=1)),
                        ("act_quant_fp8", {}), ("fp8_gemm", dict(tile_m=64, tile_n=128)),
                        ("mla_decode", dict(num_heads=16)), ("mla_combine", dict(num_heads=16)),
                        ("mla_combine", dict(num_heads=16, out_dtype="f8e4m3"))):
        mcompile.build(fam, params, "sm_90a", tmp_path)
    plan = MLADecodeBranch(tmp_path, num_heads=16, page_size=64)
    assert plan.decode_fp8 is not None and plan.decode_bf16.combine is not None
    k = plan.decode_fp8.combine.kernels[0]
    assert k.params["out_dtype"] == "f8e4m3"
    with pytest.raises(FileNotFoundError, match="mla_decode"):
        MLADecodeBranch(tmp_path, num_heads=16, page_size=64, q_len=2)

"""mla_decode / mla_combine on the CPU: parameter rules, the float64 references against each other
(sparse over all tokens = dense; partitions merged by the combine reference = one pass), the plan's views."""
import math

import numpy as np
import pytest

from mlagen import families
from mlagen.families.base import ParamError
from mlagen.families.mla_decode import D, DV, quantize_rows
from mlagen.families.mla_decode.plan import default_partitions

DEC = families.get("mla_decode")
COMB = families.get("mla_combine")


def test_params_normalise_and_reject():
    p = DEC.validate({"page_size": 1})
    assert p["page_loads"] is False                      # pages smaller than 8 rows load token rows
    assert DEC.validate({"sparse": True})["page_loads"] is False
    assert DEC.validate({"page_size": 48})["page_loads"] is False    # neither divides nor is a multiple of 64
    assert DEC.validate({"page_size": 128})["page_loads"] is True
    with pytest.raises(ParamError, match="shared memory"):
        DEC.validate({"tile_n": 64, "stages": 3})
    # fp8: one dequantised tile beside Q, then half-tile code stages (5/9 the bytes) with their scales
    assert DEC.validate({"tile_n": 32, "stages": 4, "cache_dtype": "f8e4m3"})
    assert DEC.validate({"tile_n": 64, "stages": 3, "cache_dtype": "f8e4m3", "quant_granularity": 32})
    f8 = DEC.validate({"cache_dtype": "f8e4m3", "quant_granularity": 8})      # defaults that fit
    assert (f8["tile_n"], f8["stages"]) == (64, 2) and DEC.load_tile(f8) == 32
    with pytest.raises(ParamError, match="dq_batch"):
        DEC.validate({"cache_dtype": "f8e4m3", "tile_n": 32, "dq_batch": 2})   # 3 pieces per thread a half tile
    for bad in ({"tile_n": 64, "stages": 4}, {"quant_granularity": 16, "stages": 3}, {"quant_granularity": 8, "stages": 3}):
        with pytest.raises(ParamError, match="shared memory"):
            DEC.validate({"cache_dtype": "f8e4m3", **bad})
    with pytest.raises(ParamError, match="shared memory"):
        DEC.validate({"tile_n": 32, "stages": 6})
    with pytest.raises(ParamError):
        DEC.validate({"num_heads": 20})
    # transposed (query rows as the MMA's N): wgmma, 64-token tiles, at most 64 rows per CTA
    t = DEC.validate({"num_heads": 16, "q_len": 2, "transposed": True})
    assert DEC.rows_per_cta(t) == 32 and DEC.row_blocks(t) == 1
    assert DEC.layout(t).arg("tma_q").box[1] == 32
    ts = DEC.validate({"num_heads": 32, "q_len": 2, "sparse": True, "topk": 128, "transposed": True})
    assert DEC.rows_per_cta(ts) == 32 and DEC.grid(ts, dict(NPART=2, B=3)) == (2, 2, 3)   # one CTA per query
    for bad, msg in (({"tile_n": 32}, "tile_n=64"), ({"mma": "warp"}, "mma=wgmma"),
                     ({"num_heads": 128}, "at most 64")):
        with pytest.raises(ParamError, match=msg):
            DEC.validate({"num_heads": 16, "transposed": True, **bad})


def test_grid_and_layout():
    p = DEC.validate({"num_heads": 16, "q_len": 2})
    assert DEC.grid(p, dict(NPART=3, B=5)) == (1, 3, 5)           # 32 rows in one 64-row block
    ps = DEC.validate({"num_heads": 128, "q_len": 2, "sparse": True, "topk": 256})
    assert DEC.grid(ps, dict(NPART=1, B=2)) == (4, 1, 2)           # sparse rows never mix queries
    lay = DEC.layout(DEC.validate({"cache_dtype": "f8e4m3", "quant_granularity": 576, "tile_n": 32, "stages": 3}))
    assert lay.arg("kv_scales").shape == ("NS", 1, "L")
    assert lay.arg("tma_kv").swizzle == 0 and DEC.layout(p).arg("tma_kv").swizzle == 128


def _prob(rng, **kw):
    p = DEC.validate(kw)
    return p, DEC.make_problem(p, dict(B=3, C=150), rng).inputs


def test_sparse_over_all_tokens_equals_dense(rng):
    p, x = _prob(rng, num_heads=16)
    ps = DEC.validate(dict(num_heads=16, sparse=True, topk=256))
    B = x["q"].shape[0]
    idx = np.full((B, 1, 256), -1, np.int32)
    for b in range(B):
        n = int(x["kv_lengths"][b])
        idx[b, 0, :n] = rng.permutation(n)
    xs = dict(x, indices=idx, topk_lengths=np.full((B, 1), 256, np.int32))
    d, s = DEC.reference(p, x), DEC.reference(ps, xs)
    np.testing.assert_allclose(s["out"], d["out"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s["lse"], d["lse"], rtol=1e-12)


def test_causal_rows_see_their_prefix(rng):
    p, x = _prob(rng, num_heads=16, q_len=2)
    r = DEC.reference(p, x)
    # query 0 equals a q_len=1 problem over one token fewer
    p1 = DEC.validate(dict(num_heads=16))
    x1 = dict(x, q=x["q"][:, :1], kv_lengths=x["kv_lengths"] - 1)
    np.testing.assert_allclose(r["out"][:, 0], DEC.reference(p1, x1)["out"][:, 0], rtol=1e-12, atol=1e-12)


def test_sink_only_adds_to_the_denominator(rng):
    p, x = _prob(rng, num_heads=16)
    ps = DEC.validate(dict(num_heads=16, attn_sink=True))
    sink = rng.uniform(-1, 2, 16).astype(np.float32)
    a, b = DEC.reference(p, x), DEC.reference(ps, dict(x, attn_sink=sink))
    nz = x["kv_lengths"] > 0
    w = 1.0 / (1.0 + np.exp(sink[None, None, :] - a["lse"][nz]))
    np.testing.assert_allclose(b["out"][nz], a["out"][nz] * w[..., None], rtol=1e-10)
    np.testing.assert_allclose(b["lse"][nz], np.logaddexp(a["lse"][nz], sink[None, None, :]), rtol=1e-10)


def test_combine_reference_merges_partitions_exactly(rng):
    """Cut one sequence's tokens into partitions, make each partition's normalised output and log2-LSE,
    and check the combine reference reproduces the one-pass softmax."""
    h, n, P = 16, 300, 4
    q = rng.standard_normal((h, D))
    k = rng.standard_normal((n, D))
    s = q @ k.T / math.sqrt(192)
    full = np.exp(s - s.max(1, keepdims=True))
    want = (full @ k[:, :DV]) / full.sum(1, keepdims=True)
    cuts = np.array_split(np.arange(n), P - 1) + [np.arange(0)]        # the last partition is empty
    o = np.full((1, P, h, DV), np.nan)
    l2 = np.full((1, P, h), -np.inf)
    for i, c in enumerate(cuts):
        if len(c):
            e = np.exp(s[:, c] - s[:, c].max(1, keepdims=True))
            o[0, i] = (e @ k[c, :DV]) / e.sum(1, keepdims=True)
            l2[0, i] = (np.log(e.sum(1)) + s[:, c].max(1)) / np.log(2)
    p = COMB.validate({"num_heads": h})
    got = COMB.reference(p, dict(o_part=o, lse_part=l2))
    np.testing.assert_allclose(got["out"][0], want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["lse"][0], np.log(full.sum(1)) + s.max(1), rtol=1e-12)


def test_fp8_rows_round_trip(rng):
    x = rng.standard_normal((5, D)).astype(np.float32)
    for g in (8, 64, 576):
        q, sc = quantize_rows(x, g)
        back = q.astype(np.float32) * np.repeat(sc, g, axis=-1)
        assert np.linalg.norm(back - x) / np.linalg.norm(x) < 0.05


def test_default_partitions():
    p = DEC.validate({"num_heads": 16})
    assert default_partitions(p, 64, 32768, 132) == 2
    assert default_partitions(p, 128, 32768, 132) == 1
    assert default_partitions(p, 1, 32768, 132) == 64        # capped: the combine of more costs more
    assert default_partitions(p, 1, 100, 132) == 1          # two tiles at least per partition
    p128 = DEC.validate({"num_heads": 128})
    assert default_partitions(p128, 64, 4096, 132) == 1     # 128 CTAs already


def test_combine_prefers_partition_splits_only_for_small_batches():
    from types import SimpleNamespace
    from mlagen import families
    comb = families.get("mla_combine")
    ks = [SimpleNamespace(params=comb.validate(dict(num_heads=128, part_splits=ps, warps=4 if ps == 1 else 8)))
          for ps in (1, 2, 4, 8)]
    pick = lambda **d: comb.prefer(ks, d).params["part_splits"]
    assert pick(B=1, NPART=64) == 8 and pick(B=1, NPART=16) == 4
    assert pick(B=1, NPART=4) == 1 and pick(B=8, NPART=16) == 1 and pick(B=128, NPART=2) == 1
    with pytest.raises(ParamError, match="multiple of part_splits"):
        comb.validate(dict(part_splits=8, warps=4))


def test_decode_prefers_transposed_where_it_won():
    """The transposed kernel for an fp8 cache at any length and for bf16 up to 4k tokens (H200 bench at 3a04c02);
    three code stages for transposed fp8; the 64-row kernel for long bf16 contexts."""
    from types import SimpleNamespace
    mk = lambda **kw: SimpleNamespace(params=DEC.validate(dict(num_heads=16, **kw)))
    bf = [mk(), mk(transposed=True), mk(tile_n=32, stages=4)]
    assert DEC.prefer(bf, dict(B=64, C=1024)).params["transposed"] is True
    assert DEC.prefer(bf, dict(B=64, C=32768)).params["transposed"] is False
    f8 = [mk(cache_dtype="f8e4m3"), *(mk(cache_dtype="f8e4m3", transposed=True, stages=s) for s in (2, 3, 4))]
    best = DEC.prefer(f8, dict(B=128, C=32768)).params
    assert best["transposed"] is True and best["stages"] == 3
    assert DEC.validate(dict(num_heads=16, cache_dtype="f8e4m3", transposed=True))["stages"] == 3
    assert DEC.validate(dict(num_heads=16, q_len=2, cache_dtype="f8e4m3", transposed=True))["stages"] == 2
    # as the CLI gives them: strings
    cli = DEC.validate(dict(num_heads="16", cache_dtype="f8e4m3", transposed="true"))
    assert cli["transposed"] is True and cli["stages"] == 3
    assert DEC.validate(dict(num_heads="16", cache_dtype="f8e4m3", transposed="false"))["stages"] == 2

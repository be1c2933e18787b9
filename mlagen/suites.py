"""Named sets of configurations: what the GPU tests check and what the benchmarks time.

``python scripts/build_gpu_suite.py`` (or ``mlagen build-suite``) compiles them into ``build/gpu`` on
any machine with the DSL; the folder is then carried to the GPU host.
"""
from __future__ import annotations

# Correctness: every family's distinct code paths (dtypes, layouts, granularities, splits).
TEST = {
    "qk_rmsnorm": [
        {},
        {"rsqrt": "approx"},
        {"dtype": "f32", "out_dtype": "f32", "threads_per_row": 32, "rows_per_cta": 4},
        {"dtype": "bf16", "out_dtype": "f32", "threads_per_row": 16, "rows_per_cta": 1},
        {"dtype": "f16", "out_dtype": "f16", "nq": 128, "nk": 64, "threads_per_row": 8, "rows_per_cta": 16},
    ],
    "rope_rmsnorm_quant": [
        {},
        {"rope_layout": "half", "gamma_dtype": "f32"},
        {"cache_dtype": "f8e4m3", "quant_granularity": 64},
        {"cache_dtype": "f8e4m3", "quant_granularity": 576, "rope_layout": "half"},
        {"cache_dtype": "f8e4m3", "quant_granularity": 16, "num_heads": 16, "head_splits": 2, "q_unroll": 2,
         "page_size": 16, "tokens_per_cta": 1},
        {"num_heads": 16, "page_size": 1, "tokens_per_cta": 8, "head_splits": 4, "q_unroll": 1},
    ],
}

TEST["fp8_gemm"] = [
    {},
    {"tile_m": 64, "tile_n": 128, "stages": 4},
    {"m_scale_granularity": 128, "n_scale_granularity": 128},
    {"tile_n": 64, "stages": 6, "m_scale_granularity": 1, "n_scale_granularity": 1},
    {"tile_m": 64, "tile_n": 32, "stages": 12},
    {"epilogue": "direct"},
    {"overlap": True},
    {"tile_m": 64, "tile_n": 128, "stages": 3, "ctas_per_sm": 2},
    {"scale_prefetch": False},
    {"tile_m": 128, "tile_n": 64, "stages": 3, "ctas_per_sm": 2},
    {"persistent": True},
    {"tile_m": 64, "tile_n": 128, "stages": 3, "ctas_per_sm": 2, "persistent": True},
    {"persistent": True, "epilogue": "direct", "m_scale_granularity": 128, "n_scale_granularity": 128},
    {"split_k": 4, "tile_m": 64, "tile_n": 64, "stages": 6},
    {"split_k": 2, "persistent": True},
    {"split_k": 2, "epilogue": "direct", "tile_m": 64, "tile_n": 128, "m_scale_granularity": 128},
    # ping-pong issue order of the two MMA warpgroups, and scales loaded one k tile ahead
    {"stagger": True},
    {"scale_lookahead": True, "tile_m": 64, "tile_n": 64, "stages": 6, "m_scale_granularity": 1,
     "n_scale_granularity": 1},
    {"stagger": True, "scale_lookahead": True},
    {"stagger": True, "scale_lookahead": True, "m_scale_granularity": 128, "n_scale_granularity": 128, "stages": 5},
    {"stagger": True, "scale_lookahead": True, "persistent": True},
    {"stagger": True, "scale_lookahead": True, "split_k": 2, "persistent": True, "epilogue": "direct"},
    {"stagger": True, "scale_lookahead": True, "tile_n": 64, "stages": 3, "ctas_per_sm": 2},
    # the overlapped mainloop (two partials, unrolled by two) with every scheduling option
    {"overlap": True, "persistent": True},
    {"overlap": True, "split_k": 2, "tile_m": 64, "tile_n": 64, "stages": 6},
    {"overlap": True, "m_scale_granularity": 128, "n_scale_granularity": 128, "stages": 5},
    {"overlap": True, "tile_m": 64, "tile_n": 128, "stages": 3, "ctas_per_sm": 2, "persistent": True},
    {"overlap": True, "epilogue": "direct", "tile_n": 64, "m_scale_granularity": 1, "n_scale_granularity": 1},
    # 2-CTA clusters along M sharing each B tile by TMA multicast (grid rows padded to whole clusters)
    {"cluster_m": 2},
    {"cluster_m": 2, "overlap": True},
    {"cluster_m": 2, "tile_m": 64, "tile_n": 128, "stages": 6, "m_scale_granularity": 128,
     "n_scale_granularity": 128},
    {"cluster_m": 2, "overlap": True, "epilogue": "direct", "tile_n": 64, "m_scale_granularity": 1,
     "n_scale_granularity": 1},
    # three MMA warpgroups (192-row tiles: fewer, larger tiles where 128-row tiles leave a partial last wave)
    {"tile_m": 192},
    {"tile_m": 192, "stages": 3, "persistent": True, "scale_lookahead": True},
    {"tile_m": 192, "epilogue": "direct", "tile_n": 64, "stages": 6},
    # the post-compile FFMA yield edit of the promotion runs (mlagen.sass_patch)
    {"ffma_yield": 9},
    {"ffma_yield": 16, "overlap": True},
    {"ffma_yield": 4, "scale_lookahead": True, "m_scale_granularity": 1, "n_scale_granularity": 1,
     "tile_n": 64, "stages": 6},
    # two shared-memory C tiles in the persistent epilogue (two TMA stores in flight per CTA)
    {"tile_m": 64, "tile_n": 128, "stages": 3, "ctas_per_sm": 2, "persistent": True, "c_stages": 2},
    {"persistent": True, "c_stages": 2, "m_scale_granularity": 128, "n_scale_granularity": 128},
    {"persistent": True, "c_stages": 2, "stagger": True, "scale_lookahead": True, "tile_n": 64, "stages": 6,
     "m_scale_granularity": 1, "n_scale_granularity": 1},
    {"tile_m": 192, "persistent": True, "c_stages": 2, "stages": 3},
    # persistent 2-CTA clusters (M-neighbour tiles of one B tile, round after round)
    {"tile_m": 64, "tile_n": 128, "stages": 3, "ctas_per_sm": 2, "persistent": True, "cluster_m": 2},
    {"persistent": True, "cluster_m": 2, "m_scale_granularity": 128, "n_scale_granularity": 128},
    {"persistent": True, "cluster_m": 2, "overlap": True, "tile_n": 64, "m_scale_granularity": 1,
     "n_scale_granularity": 1},
]

TEST["act_quant_fp8"] = [{}, {"dtype": "f32"}, {"group": 64, "warps": 8}, {"dtype": "f16", "warps": 1}]

TEST["mla_decode"] = [
    {},
    {"num_heads": 16, "page_size": 16},
    {"num_heads": 16, "q_len": 2, "attn_sink": True},
    {"num_heads": 128, "q_len": 2, "page_size": 128, "tile_n": 32, "stages": 4},
    {"num_heads": 64, "sparse": True, "topk": 256},
    {"num_heads": 16, "q_len": 2, "sparse": True, "topk": 128, "page_size": 1, "attn_sink": True},
    {"num_heads": 128, "page_size": 1},
    {"num_heads": 32, "page_loads": False, "tile_n": 32, "stages": 3},
    {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "tile_n": 32, "stages": 3},
    {"cache_dtype": "f8e4m3", "quant_granularity": 576, "num_heads": 128, "q_len": 2, "tile_n": 32, "stages": 3},
    {"cache_dtype": "f8e4m3", "quant_granularity": 8, "num_heads": 64, "sparse": True, "topk": 256, "page_size": 32,
     "tile_n": 32, "stages": 2},
    {"cache_dtype": "f8e4m3", "quant_granularity": 16, "num_heads": 16, "q_len": 2, "page_size": 16, "stages": 2},
    # 64-token MMA tiles over 32-token code stages (the fp8 defaults), dense, per-row and sparse loads
    {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 128},
    {"cache_dtype": "f8e4m3", "quant_granularity": 32, "num_heads": 16, "page_size": 1, "dq_batch": 3},
    {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "q_len": 2, "sparse": True, "topk": 128,
     "attn_sink": True},
    # transposed: S^T = K Q^T, O^T = V^T P^T with the 16 / 32 query rows as the wgmma's N (no 64-row padding)
    {"num_heads": 16, "transposed": True},
    {"num_heads": 16, "q_len": 2, "attn_sink": True, "page_size": 16, "transposed": True},
    {"num_heads": 32, "page_loads": False, "transposed": True},
    {"num_heads": 16, "q_len": 2, "sparse": True, "topk": 128, "page_size": 1, "attn_sink": True, "transposed": True},
    {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "transposed": True},
    {"cache_dtype": "f8e4m3", "quant_granularity": 16, "num_heads": 16, "q_len": 2, "page_size": 16, "stages": 3,
     "transposed": True},
    {"cache_dtype": "f8e4m3", "quant_granularity": 576, "num_heads": 32, "stages": 4, "transposed": True},
    {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "q_len": 2, "sparse": True, "topk": 128,
     "attn_sink": True, "transposed": True},
    # warpgroup 0 alone dequantises the next tile into a second f16 tile while the MMAs run (16 query rows)
    {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "transposed": True, "dq_producer": True},
    {"cache_dtype": "f8e4m3", "quant_granularity": 16, "num_heads": 16, "page_size": 16, "attn_sink": True,
     "transposed": True, "dq_producer": True, "dq_batch": 3},
    {"cache_dtype": "f8e4m3", "quant_granularity": 576, "num_heads": 16, "page_size": 1, "transposed": True,
     "dq_producer": True},
    {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "q_len": 2, "sparse": True, "topk": 128,
     "transposed": True, "dq_producer": True},
    # one MMA warpgroup (all of S^T and O^T); warpgroups 0 and 1 dequantise the next tile
    {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "transposed": True, "dq_producer": True,
     "mma_warpgroups": 1},
    {"cache_dtype": "f8e4m3", "quant_granularity": 16, "num_heads": 16, "page_size": 16, "attn_sink": True,
     "transposed": True, "dq_producer": True, "mma_warpgroups": 1, "dq_batch": 9},
    {"cache_dtype": "f8e4m3", "quant_granularity": 576, "num_heads": 16, "page_size": 1, "transposed": True,
     "dq_producer": True, "mma_warpgroups": 1},
    {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "q_len": 2, "sparse": True, "topk": 128,
     "attn_sink": True, "transposed": True, "dq_producer": True, "mma_warpgroups": 1},
    # fp8 codes straight into registers (dq_regs): register-A wgmma for S^T and O^T, no f16 tile
    {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "transposed": True, "dq_regs": True},
    {"cache_dtype": "f8e4m3", "quant_granularity": 16, "num_heads": 16, "page_size": 16, "attn_sink": True,
     "transposed": True, "dq_regs": True, "stages": 3},
    {"cache_dtype": "f8e4m3", "quant_granularity": 576, "num_heads": 16, "page_size": 1, "transposed": True,
     "dq_regs": True, "stages": 6},
    {"cache_dtype": "f8e4m3", "quant_granularity": 8, "num_heads": 16, "page_loads": False, "transposed": True,
     "dq_regs": True, "stages": 2},
    {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "q_len": 2, "sparse": True, "topk": 128,
     "attn_sink": True, "transposed": True, "dq_regs": True},
    {"cache_dtype": "f8e4m3", "quant_granularity": 32, "num_heads": 16, "page_size": 128, "transposed": True,
     "dq_regs": True, "stages": 8},
    # ... with the two MMA warpgroups on alternate whole tiles (pingpong)
    {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "transposed": True, "dq_regs": True,
     "pingpong": True},
    {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "transposed": True, "dq_regs": True,
     "pingpong": True, "k_chunk": 12, "stages": 4},
    {"cache_dtype": "f8e4m3", "quant_granularity": 16, "num_heads": 16, "page_size": 16, "attn_sink": True,
     "transposed": True, "dq_regs": True, "pingpong": True, "k_chunk": 12, "stages": 4},
    {"cache_dtype": "f8e4m3", "quant_granularity": 576, "num_heads": 16, "page_size": 1, "transposed": True,
     "dq_regs": True, "pingpong": True, "k_chunk": 4, "stages": 8},
    {"cache_dtype": "f8e4m3", "quant_granularity": 8, "num_heads": 16, "page_loads": False, "transposed": True,
     "dq_regs": True, "pingpong": True, "stages": 4},
    {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "q_len": 2, "sparse": True, "topk": 128,
     "attn_sink": True, "transposed": True, "dq_regs": True, "pingpong": True, "k_chunk": 12},
    # several independent S accumulators (s_chains)
    {"num_heads": 128, "q_len": 2, "s_chains": 2},
    {"num_heads": 64, "sparse": True, "topk": 256, "attn_sink": True, "s_chains": 2},
    {"num_heads": 16, "q_len": 2, "attn_sink": True, "page_size": 16, "transposed": True, "s_chains": 2},
    {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "transposed": True, "s_chains": 4},
    {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "q_len": 2, "sparse": True, "topk": 128,
     "attn_sink": True, "transposed": True, "dq_producer": True, "s_chains": 4},
    {"cache_dtype": "f8e4m3", "quant_granularity": 576, "num_heads": 16, "page_size": 1, "transposed": True,
     "dq_producer": True, "mma_warpgroups": 1, "s_chains": 4},
    # warp-level MMA (mma.sync + ldmatrix): the compute path of the sm_100a variant, run here on Hopper
    {"mma": "warp"},
    {"mma": "warp", "num_heads": 64, "sparse": True, "topk": 256},
    {"mma": "warp", "num_heads": 16, "q_len": 2, "attn_sink": True, "page_size": 16},
    {"mma": "warp", "cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "q_len": 2, "sparse": True,
     "topk": 128, "attn_sink": True},
]
# the sm_100a (Blackwell) variant: warp-level MMA and TMA gather4 token-row loads; compile-verified
# (tests/test_cpu_compile_families.py), no Blackwell GPU here
SM100_MLA_DECODE = [
    {},
    {"num_heads": 64, "sparse": True, "topk": 256},
    {"num_heads": 16, "q_len": 2, "sparse": True, "topk": 128, "page_size": 1, "attn_sink": True},
    {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "q_len": 2, "sparse": True, "topk": 128,
     "attn_sink": True},
]
# one combine kernel per (heads, q_len, sink) the decode bundles use, with bf16 output and with the fp8
# output the decode branch's w_uv GEMM reads
TEST["mla_combine"] = [
    {"num_heads": h, "q_len": q, "attn_sink": s, "out_dtype": o} for h, q, s in sorted(
        {(c.get("num_heads", 128), c.get("q_len", 1), c.get("attn_sink", False)) for c in TEST["mla_decode"]})
    for o in ("bf16", "f8e4m3")] + [{"num_heads": 16, "col_splits": 1, "part_unroll": 1}, {"num_heads": 128, "col_splits": 2,
                                                                    "out_dtype": "f8e4m3", "warps": 8},
                                  {"num_heads": 128, "part_splits": 4, "warps": 8},
                                  {"num_heads": 16, "q_len": 2, "attn_sink": True, "part_splits": 2,
                                   "out_dtype": "f8e4m3"},
                                  {"num_heads": 64, "part_splits": 8, "warps": 8, "col_splits": 1, "part_unroll": 2}]

# the decode branch (tests/test_gpu_decode_branch.py) composes bundles of the lists above; these rope
# bundles complete its configurations (heads 16 and 64 at page size 64)
TEST["rope_rmsnorm_quant"] += [
    {"num_heads": 16, "head_splits": 4, "q_unroll": 1},
    {"num_heads": 16, "cache_dtype": "f8e4m3", "quant_granularity": 64, "head_splits": 4, "q_unroll": 1},
    {"num_heads": 64},
    # q_nope quantised inside the rope launch: the branch then skips act_quant_fp8 for q_nope (three of its
    # five test configurations; the other two keep the separate launch)
    {"q_nope_quant": True, "tokens_per_cta": 2, "head_splits": 16, "q_unroll": 2},
    {"num_heads": 16, "cache_dtype": "f8e4m3", "quant_granularity": 64, "head_splits": 4, "q_unroll": 1,
     "q_nope_quant": True},
    {"num_heads": 64, "q_nope_quant": True},
]

# Performance: a small grid of tuning knobs at the default shapes.
BENCH = {
    "act_quant_fp8": [{"warps": w} for w in (2, 4, 8, 16)],
    "fp8_gemm": [
        {"tile_m": tm, "tile_n": tn, "stages": st} for tm in (64, 128) for tn in (64, 128) for st in (4, 6)
    ] + [{"tile_m": 64, "tile_n": 32, "stages": 12}, {"tile_m": 64, "tile_n": 64, "stages": 10},
         {"tile_m": 64, "tile_n": 128, "stages": 8}, {"tile_m": 128, "tile_n": 128, "stages": 4, "overlap": True},
         {"tile_m": 64, "tile_n": 128, "stages": 3, "ctas_per_sm": 2},
         {"tile_m": 64, "tile_n": 64, "stages": 6, "ctas_per_sm": 2},
         {"tile_m": 128, "tile_n": 128, "stages": 4, "scale_prefetch": False},
         {"tile_m": 128, "tile_n": 128, "stages": 5}] + [
        dict(kw, persistent=True) for kw in (
            {"tile_m": 128, "tile_n": 128, "stages": 4}, {"tile_m": 128, "tile_n": 128, "stages": 5},
            {"tile_m": 64, "tile_n": 128, "stages": 6}, {"tile_m": 64, "tile_n": 128, "stages": 3, "ctas_per_sm": 2},
            {"tile_m": 64, "tile_n": 64, "stages": 6, "ctas_per_sm": 2}, {"tile_m": 128, "tile_n": 64, "stages": 6})] + [
        {"tile_m": 64, "tile_n": tn, "stages": 6, "split_k": sk} for tn in (64, 128) for sk in (2, 4, 8)] + [
        {"tile_m": 64, "tile_n": 64, "stages": 6, "ctas_per_sm": 2, "split_k": 4, "persistent": True}] + [
        {"tile_m": 64, "tile_n": tn, "stages": st, "ctas_per_sm": 2, "split_k": sk}
        for tn, st in ((64, 6), (128, 3)) for sk in (2, 4)] + [
        # the overlapped mainloop (next k tile's wgmma in flight during promotion), scales a tile ahead,
        # 2-CTA clusters multicasting B
        {"tile_m": 128, "tile_n": 128, "stages": 5, "overlap": True},
        {"tile_m": 128, "tile_n": 128, "stages": 4, "overlap": True, "persistent": True},
        {"tile_m": 128, "tile_n": 128, "stages": 5, "overlap": True, "persistent": True},
        {"tile_m": 128, "tile_n": 128, "stages": 4, "overlap": True, "cluster_m": 2},
        {"tile_m": 128, "tile_n": 128, "stages": 5, "overlap": True, "cluster_m": 2},
        {"tile_m": 128, "tile_n": 128, "stages": 5, "scale_lookahead": True},
        {"tile_m": 128, "tile_n": 128, "stages": 4, "scale_lookahead": True, "stagger": True, "persistent": True},
        {"tile_m": 64, "tile_n": 128, "stages": 6, "overlap": True},
        {"tile_m": 64, "tile_n": 128, "stages": 3, "ctas_per_sm": 2, "overlap": True},
        {"tile_m": 64, "tile_n": 128, "stages": 3, "ctas_per_sm": 2, "overlap": True, "persistent": True},
        {"tile_m": 64, "tile_n": 64, "stages": 6, "ctas_per_sm": 2, "overlap": True},
        {"tile_m": 64, "tile_n": 64, "stages": 10, "overlap": True},
        {"tile_m": 64, "tile_n": 128, "stages": 6, "overlap": True, "cluster_m": 2}] + [
        # 192-row tiles (three MMA warpgroups)
        {"tile_m": 192, "tile_n": 128, "stages": 4}, {"tile_m": 192, "tile_n": 128, "stages": 4, "scale_lookahead": True},
        {"tile_m": 192, "tile_n": 128, "stages": 4, "persistent": True},
        {"tile_m": 192, "tile_n": 128, "stages": 3, "persistent": True, "scale_lookahead": True},
        {"tile_m": 192, "tile_n": 64, "stages": 6}] + [
        # the FFMA yield edit of the promotion runs (no effect beyond noise on the H200 at e1effee: the large
        # shapes run at the 700 W power cap, SM clocks 1485-1980 MHz)
        dict(kw, ffma_yield=9) for kw in (
            {"tile_m": 128, "tile_n": 128, "stages": 4}, {"tile_m": 128, "tile_n": 128, "stages": 5, "scale_lookahead": True},
            {"tile_m": 128, "tile_n": 128, "stages": 4, "overlap": True},
            {"tile_m": 64, "tile_n": 128, "stages": 3, "ctas_per_sm": 2})] + [
        # two shared-memory C tiles (persistent): the write-bound short-K BMMs and large shapes
        dict(kw, persistent=True, c_stages=2) for kw in (
            {"tile_m": 64, "tile_n": 128, "stages": 3, "ctas_per_sm": 2},
            {"tile_m": 64, "tile_n": 64, "stages": 4, "ctas_per_sm": 2},
            {"tile_m": 64, "tile_n": 128, "stages": 6},
            {"tile_m": 128, "tile_n": 128, "stages": 4},
            {"tile_m": 128, "tile_n": 128, "stages": 4, "scale_lookahead": True, "stagger": True},
            {"tile_m": 192, "tile_n": 128, "stages": 3})] + [
        # persistent 2-CTA clusters: half the B tile's L2 reads (the w_uk BMM re-reads each head's 64 KB of
        # weights once per 64-token tile: ~128 of its ~320 MB of L2 traffic)
        dict(kw, persistent=True, cluster_m=2) for kw in (
            {"tile_m": 64, "tile_n": 128, "stages": 3, "ctas_per_sm": 2},
            {"tile_m": 64, "tile_n": 64, "stages": 6, "ctas_per_sm": 2},
            {"tile_m": 128, "tile_n": 128, "stages": 4},
            {"tile_m": 128, "tile_n": 128, "stages": 4, "scale_lookahead": True, "stagger": True},
            {"tile_m": 128, "tile_n": 128, "stages": 5}, {"tile_m": 128, "tile_n": 128, "stages": 4, "scale_lookahead": True},
            {"tile_m": 192, "tile_n": 128, "stages": 4}, {"tile_m": 192, "tile_n": 128, "stages": 3},
            {"tile_m": 128, "tile_n": 128, "stages": 4, "overlap": True},
            {"tile_m": 64, "tile_n": 128, "stages": 3, "ctas_per_sm": 2, "overlap": True})],
    "mla_decode": [
        {"num_heads": h, "q_len": q, "tile_n": tn, "stages": st}
        for h in (16, 128) for q in (1, 2) for tn, st in ((64, 2), (32, 4))
    ] + [
        {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": h, "tile_n": tn, "stages": st}
        for h in (16, 128) for tn, st in ((64, 2), (64, 3), (32, 3))
    ] + [
        {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": h, "tile_n": 64, "stages": 3, "dq_batch": q}
        for h in (16, 128) for q in (2, 3)
    ] + [
        {"num_heads": 16, "q_len": q, "transposed": True} for q in (1, 2)
    ] + [
        {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "q_len": q, "stages": st, "transposed": True}
        for q in (1, 2) for st in (2, 3, 4)
    ] + [
        {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "transposed": True, "dq_producer": True,
         "dq_batch": q} for q in (2, 3, 6)
    ] + [
        {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "transposed": True, "dq_producer": True,
         "mma_warpgroups": 1, "dq_batch": q} for q in (3, 9)
    ] + [
        {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "transposed": True, "dq_regs": True,
         "stages": st} for st in (3, 4, 6, 8)
    ] + [
        {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "transposed": True, "dq_regs": True,
         "pingpong": True, "k_chunk": kc, "stages": st} for kc in (6, 12) for st in (4, 8)
    ] + [
        # independent S accumulators
        {"num_heads": 128, "q_len": q, "tile_n": 64, "stages": 2, "s_chains": 2} for q in (1, 2)
    ] + [
        {"num_heads": 16, "q_len": 1, "transposed": True, "s_chains": 4},
        {"num_heads": 16, "q_len": 2, "transposed": True, "s_chains": 2},
        {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "transposed": True, "s_chains": 2},
        {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "transposed": True, "s_chains": 4},
        {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "transposed": True, "dq_producer": True,
         "s_chains": 4},
        {"cache_dtype": "f8e4m3", "quant_granularity": 64, "num_heads": 16, "transposed": True, "dq_producer": True,
         "mma_warpgroups": 1, "s_chains": 4},
    ],
    "mla_combine": [{"num_heads": h, "q_len": q, "out_dtype": o} for h in (16, 128) for q in (1, 2)
                    for o in ("bf16", "f8e4m3")] + [
        {"num_heads": h, "out_dtype": o, "part_splits": ps, "warps": 8} for h in (16, 128)
        for o in ("bf16", "f8e4m3") for ps in (2, 4, 8)],
    "qk_rmsnorm": [
        {"threads_per_row": t, "rows_per_cta": r} for t in (32, 64) for r in (1, 2, 4, 8)
    ],
    "rope_rmsnorm_quant": [
        {"cache_dtype": c, "tokens_per_cta": w, "head_splits": s, "q_unroll": 4}
        for c in ("bf16", "f8e4m3") for w in (2, 4, 8) for s in (1, 2, 4)
    ] + [
        {"cache_dtype": c, "num_heads": 16, "tokens_per_cta": w, "head_splits": s, "q_unroll": 1}
        for c in ("bf16", "f8e4m3") for w in (2, 4, 8) for s in (1, 4)
    ] + [
        {"cache_dtype": c, "num_heads": h, "tokens_per_cta": w, "head_splits": s, "q_unroll": u, "q_nope_quant": True}
        for c in ("bf16", "f8e4m3") for h, w, s, u in ((128, 4, 4, 4), (128, 8, 1, 4), (16, 4, 4, 1),
                                                         (128, 1, 8, 2), (128, 1, 16, 1), (128, 2, 16, 2))
    ],
}


def jobs(suite: dict, arch: str = "sm_90a") -> list[tuple[str, dict, str]]:
    return [(fam, dict(p), arch) for fam, plist in suite.items() for p in plist]

"""AOT compile checks for rope_rmsnorm_quant, fp8_gemm and act_quant_fp8 (no GPU): the instructions the
templates promise are in the PTX/SASS, and nothing spills."""
import json
import re

import pytest

from mlagen import compile as mcompile
from mlagen import families, suites

DEC = families.get("mla_decode")

pytestmark = pytest.mark.compile


def _build(tmp_path_factory, family, params, arch):
    out = tmp_path_factory.mktemp(family)
    b = mcompile.build(family, params, arch, out)
    m = json.loads((b / "manifest.json").read_text())
    return b, m, (b / "kernel.ptx").read_text()


def _no_spills(m):
    res = m["resources"]
    if res:   # cuobjdump present
        assert res["local_bytes"] == 0 and res["stack_bytes"] == 0, res


ROPE = [
    pytest.param(p, a, marks=pytest.mark.xfail(
        reason="known: ptxas for sm_100a gives the fp8 g64 interleaved kernel an 8-byte stack frame "
               "(64 registers); sm_90a has none", strict=False))
    if (a == "sm_100a" and p.get("cache_dtype") == "f8e4m3" and p.get("quant_granularity") == 64) else (p, a)
    for p in suites.TEST["rope_rmsnorm_quant"] for a in ("sm_90a", "sm_100a")
]


@pytest.mark.parametrize("params,arch", ROPE, ids=lambda v: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v)
def test_rope_rmsnorm_quant_compiles_vectorised_without_spills(params, arch, tmp_path_factory):
    b, m, ptx = _build(tmp_path_factory, "rope_rmsnorm_quant", params, arch)
    _no_spills(m)
    assert "ld.global.v4" in ptx or "ld.global.v2.b64" in ptx, "16-byte loads of q_rope / kv rows"
    assert "st.global.v4" in ptx or "st.global.v2.b64" in ptx, "16-byte stores of q_rope_out"
    p = m["params"]
    if p["cache_dtype"] == "f8e4m3":
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
    assert "shfl.sync.bfly" in ptx      # the RMS sum (and fp8 block amax) are warp shuffles


@pytest.mark.parametrize("params", suites.TEST["fp8_gemm"], ids=lambda v: json.dumps(v, sort_keys=True))
def test_fp8_gemm_uses_tma_and_fp8_wgmma(params, tmp_path_factory):
    b, m, ptx = _build(tmp_path_factory, "fp8_gemm", params, "sm_90a")
    _no_spills(m)
    p = m["params"]
    assert "wgmma.mma_async" in ptx and "e4m3.e4m3" in ptx, "fp8 warpgroup MMA"
    assert "cp.async.bulk.tensor.3d.shared::cta.global" in ptx, "TMA loads of A and B"
    if p["epilogue"] == "tma":
        assert "cp.async.bulk.tensor.3d.global.shared::cta" in ptx, "TMA store of C"
        if p["persistent"]:
            # the epilogue waits for the store that last used its C tile: with c_stages tiles, c_stages - 1
            # stores stay in flight; every store reads sC at an offset that follows the tile (not a constant)
            waits = re.findall(r"cp\.async\.bulk\.wait_group\.read \t(\d+);", ptx)
            assert sorted(set(waits)) == sorted({str(p["c_stages"] - 1), "0"}), waits
    fam = families.get("fp8_gemm")
    if p["cluster_m"] > 1:
        # B goes to both CTAs of the cluster; each loads a 1/cluster_m box of it, as the runtime's map declares
        assert ".multicast::cluster" in ptx and "barrier.cluster.wait" in ptx
        assert m["cluster"] == [p["cluster_m"], 1, 1]
        tmb = next(a for a in m["layout"]["args"] if a.get("name") == "tma_b")
        assert tmb["box"] == [128, p["tile_n"] // p["cluster_m"], 1]
    else:
        assert ".multicast::cluster" not in ptx
    producer, consumer = fam.regs(p)
    assert f"setmaxnreg.dec.sync.aligned.u32 \t{producer};" in ptx
    assert f"setmaxnreg.inc.sync.aligned.u32 \t{consumer};" in ptx
    sass = mcompile.sass(b / "kernel.cubin")
    if sass:
        assert "QGMMA" in sass and "E4M3" in sass
        assert "UTMALDG" in sass
        if p["overlap"]:
            # the next k tile's wgmma stays in flight while the last partial is promoted: ptxas did not
            # serialise the wgmmas (C7514 puts a WARPGROUP.DEPBAR.LE gsb0, 0x0 after every QGMMA)
            assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" in sass
            ops = re.findall(r"(QGMMA|WARPGROUP\.DEPBAR)", sass)
            assert "QGMMA QGMMA" in " ".join(ops), "every QGMMA is followed by a wait"
        if p["cluster_m"] > 1:
            assert "UTMALDG.3D.MULTICAST" in sass
        if p["stagger"]:
            assert "BAR.ARV 0x4" in sass and "BAR.ARV 0x5" in sass and "BAR.SYNC.DEFER_BLOCKING 0x5" in sass


@pytest.mark.parametrize("params", suites.TEST["act_quant_fp8"], ids=lambda v: json.dumps(v, sort_keys=True))
def test_act_quant_fp8_compiles_vectorised_without_spills(params, tmp_path_factory):
    b, m, ptx = _build(tmp_path_factory, "act_quant_fp8", params, "sm_90a")
    _no_spills(m)
    assert "ld.global.v4" in ptx
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
    assert "div.rn.f32" in ptx or "rcp.rn.f32" in ptx     # 1/scale correctly rounded, as the reference


def _check_mla_decode(b, m, ptx):
    """What an mla_decode bundle's PTX / SASS must hold, for either MMA and either row-load path."""
    p = m["params"]
    fp8 = p["cache_dtype"] == "f8e4m3"
    warp = p["mma"] == "warp"
    several_pages_per_tile = p["page_loads"] and p["page_size"] < DEC.load_tile(p)
    if warp:
        # known: at the 168-register launch cap ptxas keeps some mma.sync fragments on the stack (the warpgroup
        # MMA reads its operands from shared memory and has none); no local arrays
        assert m["resources"].get("local_bytes", 0) == 0 and m["resources"].get("stack_bytes", 0) <= 1024
    elif p.get("pingpong"):
        # known: with two K and two V^T register chunks beside O's 64 accumulators ptxas keeps up to ~24 loop
        # invariants (addresses, column state) on a <= 96-byte stack, read a few times per tile (the GPU tests pass,
        # and k_chunk 12 at 6 stages has none); no local arrays
        assert m["resources"].get("local_bytes", 0) == 0 and m["resources"].get("stack_bytes", 0) <= 96
    elif fp8:
        # known: ptxas keeps one 4-byte value on an 8-byte stack frame across warpgroup 0's setmaxnreg (one STL at
        # entry, a few LDL); no local arrays, no spills in the loops
        assert m["resources"].get("local_bytes", 0) == 0 and m["resources"].get("stack_bytes", 0) <= 8
    elif several_pages_per_tile:
        # known: the producer's loop over several page boxes per tile gets a 256-byte stack frame from
        # ptxas (no spills; the GPU tests pass with it); one page per tile has none
        assert m["resources"].get("local_bytes", 0) == 0 and m["resources"].get("stack_bytes", 0) <= 256
    else:
        _no_spills(m)
    mt = "f16" if fp8 else "bf16"      # an fp8 cache dequantises to f16 (exact codes, one HMUL2 by the scale)
    if warp:
        assert "wgmma" not in ptx and f"mma.sync.aligned.m16n8k16.row.col.f32.{mt}.{mt}.f32" in ptx, "warp MMA"
        assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in ptx and "ldmatrix.sync.aligned.m8n8.x4.trans" in ptx, \
            "operands by ldmatrix, V transposed"
    else:
        assert "wgmma.mma_async" in ptx and f".{mt}.{mt}" in ptx, "16-bit warpgroup MMA for S and O"
    assert "cp.async.bulk.tensor.3d.shared::cta.global" in ptx, "TMA loads of Q and the KV pages"
    if p["row_loads"] == "gather4":
        assert "cp.async.bulk.tensor.2d.shared::cta.global.tile::gather4" in ptx, "token rows four at a time"
        g = [a for a in m["layout"]["args"] if a["name"] == "tma_kvg"]
        assert g and g[0]["fixed"] == [[2, "layer_idx"]], "the gather4 map: one layer's (slots, 576) slice"
    else:
        assert "gather4" not in ptx
    # warpgroup 0 dequantises fp8 (with one MMA warpgroup, warpgroups 0 and 1: 2 x 152 + 200 <= 3 x 168)
    regs = ((96 if p["mma_warpgroups"] == 2 else 152), 200) if p["cache_dtype"] == "f8e4m3" else (40, 232)
    if p.get("dq_regs"):
        regs = (56, 224)      # warpgroup 0 only issues loads; the MMA threads hold K and V^T as register A values
    assert (f"setmaxnreg.dec.sync.aligned.u32 \t{regs[0]};" in ptx
            and f"setmaxnreg.inc.sync.aligned.u32 \t{regs[1]};" in ptx)
    assert "ex2.approx" in ptx and "shfl.sync.bfly" in ptx, "online softmax"
    if fp8:
        assert "cvt.rn.f16x2.e4m3x2" in ptx and "mul.f16x2" in ptx, "fp8 dequantisation"
        assert "cp.async.ca.shared.global" in ptx and "cp.async.wait_group" in ptx, "scales staged by cp.async"
    sass = mcompile.sass(b / "kernel.cubin")
    if sass:
        ty = r"\b(?!\.BF16)" if fp8 else r"\.BF16"       # SASS names f16 operands by no suffix
        if warp:
            assert re.search(r"HMMA\.16816\.F32" + ty, sass) and "LDSM" in sass
        elif p["transposed"]:
            rows = DEC.rows_per_cta(p)
            # S^T = K Q^T and O^T = V^T P^T: 64-row wgmmas with the query rows as N, nothing wider
            assert re.search(rf"HGMMA\.64x{rows}x16\.F32" + ty, sass), "the query rows are the MMA's N"
            assert not re.search(r"HGMMA\.64x(?!%d)\d+x16\.F32" % rows, sass), "no padded 64-row query MMA"
            if p["mma_warpgroups"] == 1:
                # one warpgroup issues all of a tile's MMAs once: 36 k steps of S^T, 8 value blocks x 4 of O^T
                assert len(re.findall(rf"HGMMA\.64x{rows}x16\.F32", sass)) == 36 + 32, "one MMA warpgroup"
            if p.get("dq_regs"):
                # register-A wgmmas: K for S^T, V^T for O^T (pingpong: each warpgroup's code issues all 36 + 32;
                # else the two static halves of S^T, 18 + 18, and one warpgroup's 4 value blocks x 4 of O^T)
                n = len(re.findall(rf"HGMMA\.64x{rows}x16\.F32 R\d+, R\d+, gdesc", sass))
                assert n == (36 + 32 if p["pingpong"] else 18 + 18 + 16), f"{n} register-A HGMMAs"
                assert "cp.async.mbarrier.arrive.noinc.shared" in ptx, "scales' cp.async tied to the stage mbarrier"
        else:
            assert re.search(r"HGMMA\.64x256x16\.F32" + ty, sass), "O += P V, 256 value dims per warpgroup"
            assert re.search(rf"HGMMA\.64x{p['tile_n'] // 2}x16\.F32" + ty, sass), "S = Q K^T, half the tile each"
        assert "UTMALDG" in sass
        if p["row_loads"] == "gather4":
            assert "UTMALDG.2D.GATHER4" in sass


@pytest.mark.parametrize("params", suites.TEST["mla_decode"], ids=lambda v: json.dumps(v, sort_keys=True))
def test_mla_decode_uses_tma_and_tensor_core_mma(params, tmp_path_factory):
    _check_mla_decode(*_build(tmp_path_factory, "mla_decode", params, "sm_90a"))


@pytest.mark.parametrize("params", suites.SM100_MLA_DECODE, ids=lambda v: json.dumps(v, sort_keys=True))
def test_mla_decode_sm100a_gather4_compiles(params, tmp_path_factory):
    """Blackwell: no wgmma, so warp-level MMA; token rows (sparse lists, partial tiles, small pages) by TMA
    gather4.  Compile-verified only: this workplace has no sm_100 GPU."""
    b, m, ptx = _build(tmp_path_factory, "mla_decode", params, "sm_100a")
    assert m["params"]["mma"] == "warp" and m["params"]["row_loads"] == "gather4"
    _check_mla_decode(b, m, ptx)


@pytest.mark.parametrize("params", [{"num_heads": 64}, {"num_heads": 16, "q_len": 2, "attn_sink": True,
                                                        "out_dtype": "f8e4m3"}], ids=json.dumps)
def test_mla_combine_compiles_for_sm100a(params, tmp_path_factory):
    """The split-KV combine beside the sm_100a decode (CUDA cores only: the same source builds for both)."""
    b, m, ptx = _build(tmp_path_factory, "mla_combine", params, "sm_100a")
    _no_spills(m)
    assert "ld.global.v4.f32" in ptx or "ld.global.v4.b32" in ptx


def test_mla_decode_rejects_mixed_arch_choices():
    with pytest.raises(families.ParamError, match="wgmma needs sm_90a"):
        DEC.validate({"mma": "wgmma"}, arch="sm_100a")
    with pytest.raises(families.ParamError, match="gather4 needs sm_100a"):
        DEC.validate({"row_loads": "gather4"}, arch="sm_90a")


@pytest.mark.parametrize("params", suites.TEST["mla_combine"], ids=lambda v: json.dumps(v, sort_keys=True))
def test_mla_combine_compiles_vectorised_without_spills(params, tmp_path_factory):
    b, m, ptx = _build(tmp_path_factory, "mla_combine", params, "sm_90a")
    _no_spills(m)
    assert "ld.global.v4.f32" in ptx or "ld.global.v4.b32" in ptx, "16-byte loads of the partial outputs"
    if m["params"]["out_dtype"] == "f8e4m3":     # the fused 1x128 quantisation: fp8 conversion + warp amax
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx and "shfl.sync.bfly" in ptx
    if m["params"]["part_splits"] > 1:           # the warps of a task meet in shared memory
        assert "bar.sync" in ptx and "st.shared.b32" in ptx and "ld.shared.b32" in ptx


def test_fp8_gemm_ffma_yield_edits_only_control_bits(tmp_path_factory):
    """The ffma_yield SASS edit (mlagen.sass_patch) on an unedited fp8_gemm cubin: reuse FFMAs at the start of
    the promotion runs lose their reuse and no-yield flags; no other bit of the cubin changes."""
    from mlagen import sass_patch
    b, m, _ = _build(tmp_path_factory, "fp8_gemm", {"overlap": True}, "sm_90a")
    listing = mcompile.sass(b / "kernel.cubin")
    if not listing:
        pytest.skip("cuobjdump / nvdisasm not installed")
    old = (b / "kernel.cubin").read_bytes()
    new, info = sass_patch.ffma_yield(old, listing, m["kernel_symbol"])
    assert info["runs"] >= 2 and info["changed"] >= 16, info
    assert len(new) == len(old)
    diff = [i for i in range(len(old)) if old[i] != new[i]]
    assert diff
    base, _ = sass_patch.text_sections(old)[m["kernel_symbol"]]
    insns = {i.addr: i for i in sass_patch.parse_sass(listing)[m["kernel_symbol"]]}
    mask = sass_patch.REUSE | sass_patch.NO_YIELD
    for addr in sorted({(i - base) // 16 * 16 for i in diff}):
        ins = insns[addr]
        assert ins.opcode == "FFMA" and ".reuse" in ins.text, ins.text
        lo, hi = int.from_bytes(new[base + addr:base + addr + 8], "little"), \
            int.from_bytes(new[base + addr + 8:base + addr + 16], "little")
        assert lo == ins.lo and hi == ins.hi & ~mask
        assert ins.hi & sass_patch.REUSE and ins.hi & sass_patch.NO_YIELD
    # the bundle built with the knob carries the edit and says so
    b2, m2, _ = _build(tmp_path_factory, "fp8_gemm", {"overlap": True, "ffma_yield": 9}, "sm_90a")
    assert m2["sass_patches"]["ffma_yield:9"]["changed"] == info["changed"]
    listing2 = mcompile.sass(b2 / "kernel.cubin")
    reuse = [len(re.findall(r"FFMA[^;]*\.reuse", x)) for x in (listing, listing2)]
    assert reuse[1] < reuse[0]

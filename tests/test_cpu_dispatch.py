"""runtime.Dispatcher: tuned table first, family heuristic otherwise (no GPU: numpy-backed array views)."""
import json

import numpy as np
import pytest

from mlagen import compile as mcompile
from mlagen import families, runtime, suites
from mlagen.runtime import DeviceArray

pytestmark = pytest.mark.compile


def _views(p, M):
    fam = families.get("qk_rmsnorm")
    x = fam.make_problem(p, {"M": M}, np.random.default_rng(0)).inputs
    out, base = {}, [1 << 24]

    def dv(a, dt):
        base[0] += 1 << 24
        return DeviceArray(base[0], a.shape, tuple(s // a.itemsize for s in a.strides), dt, 0, a)
    for n in ("q", "k"):
        out[n] = dv(x[n], p["dtype"])
    for n in ("gamma_q", "gamma_k", "qk_var"):
        out[n] = dv(x[n], "f32")
    out["q_out"] = dv(np.empty_like(x["q"]), p["out_dtype"])
    out["k_out"] = dv(np.empty_like(x["k"]), p["out_dtype"])
    out["eps"] = 1e-6
    return out


def test_dispatcher_uses_table_then_heuristic(tmp_path):
    bundles = [mcompile.build("qk_rmsnorm", {"rows_per_cta": r}, "sm_90a", tmp_path) for r in (1, 4)]
    ks = [runtime.load(b) for b in bundles]
    fam = ks[0].family
    key = fam.table_key(ks[0].params, {"M": 64})
    table = {"qk_rmsnorm": {"GPU X": {key: {"kernel": ks[1].name, "time_us": 1.0}}}}
    d = runtime.Dispatcher(ks, table, device_name="GPU X")
    assert d.select(_views(ks[0].params, 64)) is ks[1]
    assert "tuned table" in d.last_reason
    # M=5000 rounds to bucket M8192: not in the table -> heuristic (large batches prefer 2 rows per CTA)
    chosen = d.select(_views(ks[0].params, 5000))
    assert "heuristic" in d.last_reason and chosen in ks
    # a kernel that cannot take the call is never chosen, whatever the table says
    bad = {"qk_rmsnorm": {"GPU X": {key: {"kernel": "nope", "time_us": 1.0}}}}
    assert runtime.Dispatcher(ks, bad, device_name="GPU X").select(_views(ks[0].params, 64)) in ks


def test_dispatcher_hint_sizes_reach_the_bucket(tmp_path):
    """``select(..., hint)`` adds sizes the arguments do not show (mla_decode's context length) to the dims the
    table is bucketed by: here the hint overrides M, so M=5000 looks up the M=64 entry."""
    bundles = [mcompile.build("qk_rmsnorm", {"rows_per_cta": r}, "sm_90a", tmp_path) for r in (1, 4)]
    ks = [runtime.load(b) for b in bundles]
    key = ks[0].family.table_key(ks[0].params, {"M": 64})
    d = runtime.Dispatcher(ks, {"qk_rmsnorm": {"GPU X": {key: {"kernel": ks[1].name, "time_us": 1.0}}}},
                           device_name="GPU X")
    assert d.select(_views(ks[0].params, 5000), {"M": 64}) is ks[1] and "tuned table" in d.last_reason
    d.select(_views(ks[0].params, 5000))
    assert "heuristic" in d.last_reason          # the same call without the hint is another cache entry


def test_export_builds_a_table_the_dispatcher_reads(tmp_path):
    from mlagen import report, tune
    fam = families.get("qk_rmsnorm")
    p = fam.validate({})
    rows = [dict(table="bench", family="qk_rmsnorm", impl="mlagen", kernel=f"k{i}", params=json.dumps(p),
                 dims=json.dumps({"M": 64}), time_us=t, device="GPU X", status="ok")
            for i, t in enumerate([3.0, 2.0, 5.0])]
    report.append_rows(rows, "bench", tmp_path)
    table = tune.export(str(tmp_path), tmp_path / "d.json")
    assert table["qk_rmsnorm"]["GPU X"][fam.table_key(p, {"M": 64})]["kernel"] == "k1"


def test_fp8_gemm_heuristic_counts_the_device_sms():
    """About a wave of CTAs on *this* device: the Dispatcher passes its SM count as dims["SMS"]."""
    from types import SimpleNamespace
    fam = families.get("fp8_gemm")
    ks = [SimpleNamespace(params=fam.validate(dict(tile_m=64, tile_n=n, stages=6))) for n in (64, 128)]
    pick = lambda sms: fam.prefer(ks, dict(M=64, N=7168, K=2048, L=1, SMS=sms)).params["tile_n"]
    assert pick(132) == 64        # 56 CTAs of 128 columns are under 0.8 x 132: 112 of 64 columns
    assert pick(66) == 128        # on a 66-SM part the 128-wide tiles already fill a wave
    assert fam.prefer(ks, dict(M=64, N=7168, K=2048, L=1)).params["tile_n"] == 64   # no SMS: an H100


def test_fp8_gemm_heuristic_takes_persistent_ctas_for_many_short_k_tiles():
    from types import SimpleNamespace
    fam = families.get("fp8_gemm")
    ks = [SimpleNamespace(params=fam.validate(dict(tile_m=128, tile_n=128, stages=4, persistent=pp)))
          for pp in (False, True)]
    pick = lambda **d: fam.prefer(ks, dict(d, SMS=132)).params["persistent"]
    assert pick(M=4096, N=24576, K=1536, L=1)              # 6144 tiles, short K
    assert not pick(M=4096, N=7168, K=16384, L=1)          # long K: the epilogue is a small share
    assert not pick(M=256, N=1024, K=1024, L=1)            # under two waves


def test_rope_heuristic_splits_heads_finer_when_it_also_quantises_q_nope():
    from types import SimpleNamespace
    fam = families.get("rope_rmsnorm_quant")
    mk = lambda **kw: SimpleNamespace(params=fam.validate(dict(q_nope_quant=True, **kw)))
    ks = [mk(tokens_per_cta=8, head_splits=1, q_unroll=4), mk(tokens_per_cta=4, head_splits=4, q_unroll=4),
          mk(tokens_per_cta=2, head_splits=16, q_unroll=2)]
    for T in (1, 4096):
        assert fam.prefer(ks, dict(T=T)).params["head_splits"] == 16


def test_bundles_from_before_a_new_parameter_load_with_its_default(tmp_path):
    """A manifest without `persistent` (fp8_gemm bundles built before it existed) still sizes its grid."""
    import shutil
    b = mcompile.build("fp8_gemm", {"tile_m": 64, "tile_n": 64, "stages": 4}, "sm_90a", tmp_path / "new")
    old = tmp_path / "old" / b.name
    shutil.copytree(b, old)
    m = json.loads((old / "manifest.json").read_text())
    del m["params"]["persistent"]
    (old / "manifest.json").write_text(json.dumps(m))
    k = runtime.Kernel(old)
    assert k.params["persistent"] is False
    assert k.family.grid(k.params, dict(M=100, N=200, L=3)) == (2, 4, 3)


def test_fp8_gemm_heuristic_leaves_split_k_aside():
    from types import SimpleNamespace
    fam = families.get("fp8_gemm")
    ks = [SimpleNamespace(params=fam.validate(dict(tile_m=64, tile_n=64, stages=6, ctas_per_sm=c, split_k=s)))
          for c, s in ((2, 4), (1, 1), (2, 2))]
    assert fam.prefer(ks, dict(M=64, N=2112, K=7168, L=1, SMS=132)).params["split_k"] == 1


def test_fp8_gemm_heuristic_picks_the_mainloop_by_m_and_k():
    """Among the benchmark bundles: persistent 2-CTA clusters with the serial mainloop for large M up to
    K = 8192, the lookahead / overlapped mainloops for large M beyond, the overlapped one for small M from
    K = 4096 on, the serial one for the short-K MLA BMMs, no cluster elsewhere (H200 rows)."""
    from types import SimpleNamespace
    fam = families.get("fp8_gemm")
    ks = [SimpleNamespace(params=fam.validate(p)) for p in suites.BENCH["fp8_gemm"]]
    pick = lambda **d: fam.prefer(ks, dict({"L": 1, "SMS": 132}, **d)).params
    p = pick(M=4096, N=7168, K=16384)
    assert (p["scale_lookahead"] or p["overlap"]) and p["cluster_m"] == 1 and p["split_k"] == 1
    for shape in (dict(M=4096, N=24576, K=1536), dict(M=4096, N=7168, K=2048), dict(M=4096, N=2112, K=7168)):
        p = pick(**shape)
        assert p["cluster_m"] == 2 and p["persistent"] and not (p["scale_lookahead"] or p["overlap"]), shape
        assert (p["tile_n"], p["c_stages"], p["split_k"]) == (128, 1, 1), shape
        # 192-row tiles where 128-row ones leave a small last wave (544 tiles = 4.1 waves at N=2112)
        assert p["tile_m"] == (192 if shape["N"] == 2112 else 128), shape
    for shape in (dict(M=64, N=7168, K=2048), dict(M=1024, N=512, K=128, L=128), dict(M=64, N=2112, K=7168)):
        assert pick(**shape)["cluster_m"] == 1, shape
    assert pick(M=4096, N=7168, K=16384)["overlap"]
    for shape in (dict(M=64, N=7168, K=16384), dict(M=64, N=2112, K=7168), dict(M=1, N=2112, K=7168)):
        p = pick(**shape)
        assert p["overlap"] and p["tile_m"] == 64, shape
    for shape in (dict(M=64, N=7168, K=2048), dict(M=64, N=512, K=128, L=128), dict(M=1024, N=128, K=512, L=128)):
        assert not pick(**shape)["overlap"], shape


def test_fp8_gemm_cluster_geometry_and_launch_config(monkeypatch):
    """2-CTA clusters: grid rows padded to whole clusters, and the cuLaunchKernelEx config carries the shape."""
    fam = families.get("fp8_gemm")
    p = fam.validate(dict(cluster_m=2))
    assert fam.cluster(p) == (2, 1, 1) and fam.cluster(fam.validate({})) == (1, 1, 1)
    assert fam.grid(p, dict(M=1, N=300, L=3)) == (2, 3, 3)
    assert fam.grid(p, dict(M=4096, N=7168, L=1)) == (32, 56, 1)
    assert fam.grid(p, dict(M=4097, N=7168, L=1)) == (34, 56, 1)
    # persistent clusters: one wave in whole clusters (an odd SM count loses one CTA), never fewer than a cluster
    pp = fam.validate(dict(cluster_m=2, persistent=True, tile_m=64, stages=3, ctas_per_sm=2))
    assert fam.grid(pp, dict(M=1024, N=512, L=128, SMS=132)) == (264, 1, 1)
    assert fam.grid(pp, dict(M=1024, N=512, L=128, SMS=131)) == (262, 1, 1)
    assert fam.grid(pp, dict(M=1, N=128, L=1, SMS=132)) == (2, 1, 1)
    with pytest.raises(ValueError, match="split_k=1"):
        fam.validate(dict(cluster_m=2, persistent=True, split_k=2))
    drv = pytest.importorskip("cuda.bindings.driver")
    # the config is plain data: build it without cuInit (no driver here)
    monkeypatch.setattr(runtime, "_driver", lambda: drv)
    cfg = runtime._launch_config((34, 56, 1), (384, 1, 1), 166336, drv.CUstream(0), (2, 1, 1))
    assert (cfg.gridDimX, cfg.gridDimY, cfg.blockDimX, cfg.sharedMemBytes, cfg.numAttrs) == (34, 56, 384, 166336, 1)
    assert cfg.attrs[0].value.clusterDim.x == 2

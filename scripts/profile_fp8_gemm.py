#!/usr/bin/env python3
"""Launch fp8_gemm bundles on one shape, for a profiler (ncu) to watch; no DSL needed.

    ncu --clock-control none --launch-skip 2 --launch-count 1 --section SpeedOfLight \\
        python3 scripts/profile_fp8_gemm.py build/gpu/exp/fp8_gemm_m128n128_s4_g1x128_overlap.sm_90a \\
        --shape M=4096,N=7168,K=16384

Each bundle is launched ``--launches`` times (3 by default) on fresh random fp8 operands; ncu's
``--launch-skip`` / ``--launch-count`` pick which launch it profiles.  Without a profiler it prints each
bundle's median time over those launches (CUDA events), as a quick check.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch
    from mlagen import families, runtime
    from mlagen.bench import parse_shape

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--shape", default="M=4096,N=7168,K=16384")
    ap.add_argument("--launches", type=int, default=3)
    a = ap.parse_args()
    fam = families.get("fp8_gemm")
    d = parse_shape(a.shape)
    M, N, K, L = d["M"], d["N"], d["K"], d.get("L", 1)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn((L, M, K), device="cuda", generator=g) * 2).to(torch.float8_e4m3fn)
    w = (torch.randn((L, N, K), device="cuda", generator=g) * 0.5).to(torch.float8_e4m3fn)
    for b in a.bundles:
        k = runtime.load(b)
        p = k.params
        sa = torch.rand((L, -(-M // p["m_scale_granularity"]), K // 128), device="cuda", generator=g) + 0.5
        sb = torch.rand((L, -(-N // p["n_scale_granularity"]), K // 128), device="cuda", generator=g) * 0.01
        args, c = fam.torch_args(x, w, sa, sb)
        bound = k.bind(**args)
        times = []
        for _ in range(a.launches):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            bound.launch()
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1) * 1e3)
        print(f"{k.name}: {sorted(times)[len(times) // 2]:.1f} us (median of {a.launches})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Launch fp8_gemm bundles on one shape, for a profiler (ncu) to watch; no DSL needed.

    ncu --clock-control none --launch-skip 2 --launch-count 1 --section SpeedOfLight \\
        python3 scripts/profile_fp8_gemm.py build/gpu/exp/fp8_gemm_m128n128_s4_g1x128_overlap.sm_90a \\
        --shape M=4096,N=7168,K=16384

Each bundle is launched ``--launches`` times (3 by default) on fresh random fp8 operands; ncu's
``--launch-skip`` / ``--launch-count`` pick which launch it profiles.  Without a profiler it prints each
bundle's median time over those launches (CUDA events), as a quick check.

``--seconds S`` instead runs each bundle back to back for S seconds while nvidia-smi samples the SM clock and
the board power every 100 ms, and prints per bundle the time per launch and the median clock and power of its
window: whether a kernel runs at the power cap (and at which clock) is part of why it is as fast as it is.
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
    ap.add_argument("--seconds", type=float, default=0.0, help="clock / power probe: seconds of launches per bundle")
    ap.add_argument("--torch", action="store_true", help="with --seconds: probe torch._scaled_mm blockwise too (L=1)")
    a = ap.parse_args()
    smi = _Sampler() if a.seconds > 0 else None
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
        if smi is not None:
            _probe(k.name, bound, a.seconds, smi)
            continue
        times = []
        for _ in range(a.launches):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            bound.launch()
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1) * 1e3)
        print(f"{k.name}: {sorted(times)[len(times) // 2]:.1f} us (median of {a.launches})", flush=True)
    if smi is not None and a.torch and L == 1:
        from mlagen.families.fp8_gemm import _scaled_mm_blockwise

        sa = torch.rand((M, K // 128), device="cuda", generator=g) + 0.5
        sb = torch.rand((-(-N // 128), K // 128), device="cuda", generator=g) * 0.01
        cache = {}

        class _Torch:
            def launch(self):
                _scaled_mm_blockwise(x[0], w[0], sa, sb, cache)
        _probe("torch._scaled_mm blockwise", _Torch(), a.seconds, smi)
    if smi is not None:
        smi.stop()
    return 0


class _Sampler:
    """nvidia-smi's SM clock (MHz) and board power (W) every 100 ms, with the host time of each sample."""

    def __init__(self):
        import subprocess
        import threading
        import time
        self.samples = []
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                                      "-lms", "100"], stdout=subprocess.PIPE, text=True)

        def read():
            for line in self.proc.stdout:
                try:
                    clk, pw = (float(v) for v in line.split(","))
                except ValueError:
                    continue
                self.samples.append((time.time(), clk, pw))
        threading.Thread(target=read, daemon=True).start()

    def window(self, t0, t1):
        return [(c, p) for t, c, p in self.samples if t0 <= t <= t1]

    def stop(self):
        self.proc.terminate()


def _probe(name, bound, seconds, smi):
    import statistics
    import time

    import torch
    for _ in range(3):
        bound.launch()
    torch.cuda.synchronize()
    t0 = time.time()
    n = 0
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    while time.time() - t0 < seconds:
        for _ in range(20):
            bound.launch()
        n += 20
        torch.cuda.synchronize()
    e1.record()
    torch.cuda.synchronize()
    t1 = time.time()
    per = e0.elapsed_time(e1) * 1e3 / n
    w = smi.window(t0 + 0.3, t1)        # skip the first samples (clocks settling)
    clk = statistics.median(c for c, _ in w) if w else float("nan")
    pw = statistics.median(p for _, p in w) if w else float("nan")
    print(f"{name}: {per:.1f} us per launch back to back ({n} launches), SM clock {clk:.0f} MHz, "
          f"power {pw:.0f} W (median of {len(w)} samples)", flush=True)
    time.sleep(1.0)                     # let the board cool between bundles


if __name__ == "__main__":
    raise SystemExit(main())

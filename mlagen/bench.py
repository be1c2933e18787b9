"""Benchmarks on a GPU host: CUDA events, warm-up, median of many, L2 flushed before every timed launch.

The flush writes a 256 MB buffer (``zero_()``, as ``triton.testing.do_bench`` does; ``MLAGEN_L2_FLUSH=write``,
the default, and what every row without an ``l2_flush`` value used).  That leaves the L2 full of dirty lines
the timed launch has to write back, up to the L2's size (~50 MB on the H200) of someone else's writes.
``read`` reads the buffer instead, so the lines left are clean.  ``none`` times a warm L2.  Each row records
the mode in ``l2_flush``.  On the H200 (c6b2731) ``read`` made the memory-bound kernels 3-18% faster (bf16
mla_decode H=16 B=64 x 1k 37.3 -> 30.9 us, the w_uv BMM at 1024 tokens 37.4 -> 34.2 us) but the fp8
mla_decode 3-18% slower (33.6 -> 39.8 us), reproducibly and unexplained, so ``write`` stays the default.

Each measurement becomes a row (see :func:`row`): family, kernel, impl (mlagen / torch_eager /
torch_compile), params, shape, arch, device, commit, date, median/p10/p90 time, achieved GB/s,
% of the device-copy bandwidth measured in the same run, TFLOP/s, speed-up over torch eager, and the
error against torch's float32 computation of the same math on the same inputs.

Needs torch (events, allocation, the comparison implementations); needs no CuTe DSL.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable, Mapping

import numpy as np

from . import families, runtime
from .env import git_commit, now_utc

FLUSH_BYTES = 256 << 20
FLUSH_MODES = ("write", "read", "none")


def flush_mode(mode: str | None = None) -> str:
    """The L2 flush before each timed launch: ``mode``, else $MLAGEN_L2_FLUSH (write, read or none; default
    write), checked."""
    m = (mode if mode is not None else os.environ.get("MLAGEN_L2_FLUSH", "write")).strip().lower()
    if m not in FLUSH_MODES:
        raise ValueError(f"L2 flush {m!r} (MLAGEN_L2_FLUSH / --l2-flush): expected one of {', '.join(FLUSH_MODES)}")
    return m


class Timer:
    def __init__(self, warmup: int = 10, reps: int = 50, flush: bool | str = True):
        import torch
        self.torch = torch
        self.warmup, self.reps = warmup, reps
        self.mode = flush_mode() if flush is True else flush_mode(flush or "none")
        self.flush_buf = None
        if self.mode != "none":
            self.flush_buf = torch.zeros(FLUSH_BYTES // 8, dtype=torch.int64, device="cuda")

    def flush(self):
        """Evict the previous launch's data from L2 (``read``: by reading 256 MB, so the lines left are clean)."""
        if self.mode == "write":
            self.flush_buf.zero_()
        elif self.mode == "read":
            self._sink = self.flush_buf.sum()

    def __call__(self, fn: Callable[[], Any]) -> dict:
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for i in range(self.reps):
            self.flush()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        ts = sorted(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))   # microseconds
        q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]
        return {"time_us": statistics.median(ts), "p10_us": q(0.1), "p90_us": q(0.9), "reps": len(ts),
                "l2_flush": self.mode}


def measure_ceilings(reps: int = 20) -> dict:
    """Device-copy bandwidth (read + write) and dense bf16 / fp8 matmul rates, measured now."""
    import torch
    out = {}
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    src.random_(0, 255)
    dst = torch.empty_like(src)
    t = Timer(warmup=3, reps=reps, flush=False)
    r = t(lambda: dst.copy_(src))
    out["copy_gbps"] = 2 * n / (r["time_us"] * 1e-6) / 1e9
    # one-way ceilings, for kernels whose traffic is mostly reads (decode) or mostly writes (the K=128 BMM)
    r = t(lambda: dst.fill_(7))
    out["write_gbps"] = n / (r["time_us"] * 1e-6) / 1e9
    words = src.view(torch.int64)
    r = t(lambda: words.sum())
    out["read_gbps"] = n / (r["time_us"] * 1e-6) / 1e9
    del src, dst, words
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    r = Timer(warmup=3, reps=reps, flush=False)(lambda: a @ b)
    out["bf16_tflops"] = 2 * m ** 3 / (r["time_us"] * 1e-6) / 1e12
    try:
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.to(torch.float8_e4m3fn).t()
        one = torch.ones((), device="cuda")
        r = Timer(warmup=3, reps=reps, flush=False)(
            lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
        out["fp8_tflops"] = 2 * m ** 3 / (r["time_us"] * 1e-6) / 1e12
    except Exception as e:  # pragma: no cover - depends on the torch build
        out["fp8_error"] = str(e)[:200]
    props = torch.cuda.get_device_properties(0)
    out.update(device=torch.cuda.get_device_name(0), sms=props.multi_processor_count,
               l2_bytes=getattr(props, "L2_cache_size", None))
    return out


def problem_inputs(fam, kernel, shape, rng):
    """A fresh problem as CUDA tensors, with outputs shaped by one checked launch of ``kernel``."""
    import torch
    prob = fam.make_problem(kernel.params, shape, rng)
    base = fam.torch_inputs(kernel.params, prob)
    outs = kernel(**{n: v for n, v in _clone(base).items() if v is not None})
    for n, v in outs.items():
        if base.get(n) is None:
            base[n] = torch.empty_like(v)
    return prob, base


def _clone(t: dict) -> dict:
    return {k: (v.clone() if hasattr(v, "clone") else v) for k, v in t.items() if not k.startswith("_")}


def _max_rel_err(a: Mapping, b: Mapping) -> float:
    worst = 0.0
    for k in a:
        x, y = a[k].double(), b[k].double()
        den = y.norm().item()
        e = (x - y).norm().item() / den if den > 0 else (x - y).norm().item()
        worst = max(worst, e if np.isfinite(e) else float("inf"))
    return worst


def bench_family(family: str, bundle_dirs, shapes=None, warmup: int = 10, reps: int = 50,
                 with_torch: bool = True, compile_torch: bool = False, ceilings: dict | None = None,
                 seed: int | None = None, log=print) -> list[dict]:
    import torch
    fam = families.get(family)
    kernels = [runtime.load(b) for b in bundle_dirs]
    if not kernels:
        raise SystemExit(f"no {family} bundles given")
    shapes = shapes or fam.bench_shapes
    ceilings = ceilings or measure_ceilings()
    timer = Timer(warmup, reps)
    rng = np.random.default_rng(seed)
    dev = torch.cuda.get_device_name(0)
    commit, date = git_commit(), now_utc()
    rows = []
    # group kernels by the shape-defining parameters: one problem per group and shape
    groups: dict[str, list] = {}
    for k in kernels:
        key = json.dumps({n: k.params[n] for n in fam.shape_params}, sort_keys=True)
        groups.setdefault(key, []).append(k)
    compiled = {}
    for key, ks in groups.items():
        p0 = ks[0].params
        for shape in shapes:
            prob, base = problem_inputs(fam, ks[0], shape, rng)
            ref_t = None
            eager_us = None
            if with_torch:
                ref_t = _clone(base)
                fam.torch_impl(p0, ref_t)
                torch.cuda.synchronize()
                ref_out = fam.bench_outputs(p0, ref_t)
                r = timer(lambda: fam.torch_impl(p0, ref_t))
                eager_us = r["time_us"]
                rows.append(row(fam, None, "torch_eager", p0, prob.dims, shape, r, ceilings, dev, commit, date, 0.0))
                if compile_torch:
                    try:
                        if key not in compiled:
                            compiled[key] = torch.compile(lambda tt, _p=p0: fam.torch_impl(_p, tt), dynamic=True)
                        fn = compiled[key]
                        tc = _clone(base)
                        fn(tc)
                        torch.cuda.synchronize()
                        e = _max_rel_err(fam.bench_outputs(p0, tc), ref_out)
                        r = timer(lambda: fn(tc))
                        rows.append(row(fam, None, "torch_compile", p0, prob.dims, shape, r, ceilings, dev, commit,
                                        date, e, eager_us))
                    except Exception as ex:  # torch.compile failing must not lose the other rows
                        log(f"torch.compile failed for {family} {shape}: {type(ex).__name__}: {str(ex)[:200]}")
            for k in ks:
                tk = _clone(base)
                bound = k.bind(check_contents=True, **tk)
                bound.launch()
                torch.cuda.synchronize()
                e = _max_rel_err(fam.bench_outputs(k.params, tk), ref_out) if ref_t is not None else float("nan")
                r = timer(bound.launch)
                rows.append(row(fam, k, "mlagen", k.params, bound.dims, shape, r, ceilings, dev, commit, date, e,
                                eager_us))
            best = min((x for x in rows if x["shape"] == json.dumps(shape, sort_keys=True) and x["impl"] == "mlagen"
                        and x["group"] == key), key=lambda x: x["time_us"])
            log(f"{family} {shape}: best {best['kernel']} {best['time_us']:.2f} us, {best['gbps']:.0f} GB/s "
                f"({best['pct_copy']:.0f}% of copy"
                + (f", {best['pct_floor']:.0f}% of the one-way floor" if "pct_floor" in best else "")
                + f"), {best.get('speedup_vs_eager', float('nan')):.2f}x eager, "
                f"err {best['err_vs_torch_f32']:.2e}")
    return rows


def row(fam, kernel, impl, p, dims, shape, r, ceil, dev, commit, date, err, eager_us=None) -> dict:
    nbytes = fam.bytes_moved(p, dims)
    flops = fam.flops(p, dims)
    t = r["time_us"] * 1e-6
    d = {
        "table": "bench", "family": fam.name, "impl": impl,
        "kernel": kernel.name if kernel is not None else impl,
        "arch": kernel.arch if kernel is not None else "",
        "params": json.dumps(p, sort_keys=True),
        "group": json.dumps({n: p[n] for n in fam.shape_params}, sort_keys=True),
        "shape": json.dumps(shape, sort_keys=True), "dims": json.dumps(dict(dims), sort_keys=True),
        "device": dev, "commit": commit, "date": date,
        "time_us": r["time_us"], "p10_us": r["p10_us"], "p90_us": r["p90_us"], "reps": r["reps"],
        "bytes": nbytes, "gbps": nbytes / t / 1e9 if t > 0 else float("nan"),
        "ceiling_gbps": ceil.get("copy_gbps"), "tflops": flops / t / 1e12 if t > 0 else 0.0,
        "ceiling_bf16_tflops": ceil.get("bf16_tflops"),
        "err_vs_torch_f32": err, "l2_flush": r.get("l2_flush"),
    }
    d["pct_copy"] = 100.0 * d["gbps"] / d["ceiling_gbps"] if d["ceiling_gbps"] else float("nan")
    # the memory floor from the one-way ceilings: reads at the read-only rate, writes at the write-only rate
    # (a write-heavy kernel cannot reach the copy rate: writing alone runs at ~79% of it on the H200)
    split = getattr(fam, "bytes_written", None)          # (a composition such as the decode branch may not split)
    written = split(p, dims) if split is not None else None
    if written is not None and ceil.get("read_gbps") and ceil.get("write_gbps") and t > 0:
        floor = (nbytes - written) / (ceil["read_gbps"] * 1e9) + written / (ceil["write_gbps"] * 1e9)
        d["floor_us"] = floor * 1e6
        d["pct_floor"] = 100.0 * floor / t
    if eager_us:
        d["speedup_vs_eager"] = eager_us / r["time_us"]
    if impl != "mlagen":
        d["baseline"] = fam.baseline_desc(p)
    if kernel is not None:
        d["registers"] = kernel.manifest.get("resources", {}).get("registers")
    return d


def parse_shape(s: str) -> dict:
    out = {}
    for part in s.split(","):
        k, _, v = part.partition("=")
        if not _:
            raise SystemExit(f"--shape takes k=v[,k=v...], got {s!r}")
        out[k.strip()] = int(v)
    return out


def main_bench(args) -> int:
    """`mlagen bench FAMILY --bundles DIR ...` (arguments parsed by mlagen.cli)."""
    from .report import append_rows
    fam = families.get(args.family)
    bundles = runtime.find_bundles(args.bundles, fam.name, getattr(args, "arch", None))
    if not bundles:
        raise SystemExit(f"no {fam.name} bundles under {args.bundles}")
    shapes = [parse_shape(s) for s in (args.shape or [])] or None
    t0 = time.time()
    ceil = measure_ceilings()
    print(f"ceilings on {ceil['device']}: copy {ceil['copy_gbps']:.0f} GB/s (write only {ceil['write_gbps']:.0f}, "
          f"read only {ceil['read_gbps']:.0f}), bf16 {ceil['bf16_tflops']:.0f} TFLOP/s"
          + (f", fp8 {ceil['fp8_tflops']:.0f} TFLOP/s" if "fp8_tflops" in ceil else ""))
    rows = fam.bench_rows(args.bundles, shapes, args, ceil)    # a family that times more than one kernel per call
    if rows is None:
        rows = bench_family(fam.name, bundles, shapes, args.warmup, args.reps, with_torch=not args.no_torch,
                            compile_torch=args.compile_torch, ceilings=ceil)
    ceil_row = dict(table="ceilings", date=now_utc(), commit=git_commit(), **ceil)
    append_rows([ceil_row], "ceilings", args.results)
    path = append_rows(rows, "bench", args.results)
    print(f"{len(rows)} rows -> {path} ({time.time() - t0:.0f} s)")
    _print_table(rows)
    return 0


def _print_table(rows):
    import pandas as pd
    df = pd.DataFrame(rows)
    if df.empty:
        return
    df = df.sort_values("time_us").groupby(["group", "shape", "impl"], as_index=False).first()
    cols = ["shape", "impl", "kernel", "time_us", "gbps", "pct_copy", "pct_floor", "speedup_vs_eager", "err_vs_torch_f32"]
    cols = [c for c in cols if c in df]
    with pd.option_context("display.width", 220, "display.max_colwidth", 60, "display.max_rows", 500):
        print(df[cols].to_string(index=False, float_format=lambda x: f"{x:.3g}"))

#!/usr/bin/env python3
"""Launch one mla_decode bundle on a GPU problem, for a profiler (ncu / nsys) to watch.

    ncu --set full -k regex:mla_decode --launch-skip 2 --launch-count 1 -o prof \\
        python3 scripts/profile_mla_decode.py BUNDLE --B 128 --C 8192
    python3 scripts/profile_mla_decode.py --stalls prof.ncu-rep      # top stalled SASS lines from the report
"""
import argparse
import csv
import io
import subprocess
import sys


def launch(args):
    import torch
    from mlagen import runtime
    from mlagen.families.mla_decode.plan import MLADecode, torch_problem
    from pathlib import Path
    k = runtime.Kernel(args.bundle)
    t, kw = torch_problem(k.params, args.B, args.C, True)
    comb = None
    if args.partitions > 1:      # the combine bundles beside the decode bundle, bf16 output
        cs = [c for c in (runtime.Kernel(d) for d in runtime.find_bundles(Path(args.bundle).parent, "mla_combine"))
              if c.params["out_dtype"] == "bf16" and all(c.params[n] == k.params[n] for n in ("num_heads", "q_len",
                                                                                           "attn_sink"))]
        comb = runtime.Dispatcher(cs)
    b = MLADecode(k, comb).bind(**t, **kw, num_partitions=args.partitions, max_len=args.C)
    for _ in range(args.launches):
        b.launch()
    torch.cuda.synchronize()
    print(f"{args.launches} launches of {k.name} at B={args.B} C={args.C}")


def stalls(args):
    """Per-SASS-line warp-stall samples of an ncu report (source page), the top lines and the totals."""
    out = subprocess.run(["ncu", "--import", args.stalls, "--page", "source", "--csv", "--print-source", "sass"],
                         capture_output=True, text=True, check=True).stdout
    rows = list(csv.DictReader(io.StringIO(out[out.index('"Address"'):])))
    if not rows:
        sys.exit("no source rows")
    keys = [k for k in rows[0].keys() if k]
    samp = next((k for k in keys if "Sampling (All" in k), None)
    if samp is None:
        sys.exit(f"no stall-sampling column among {keys}\n{out[:2000]}")
    src = next((k for k in keys if k.lower() in ("source", "sass")), keys[1])
    addr = next((k for k in keys if "Address" in k), None)

    def val(r):
        try:
            return float((r[samp] or "0").replace(",", ""))
        except ValueError:
            return 0.0
    total = sum(val(r) for r in rows)
    if args.dump:
        base = int(rows[0][addr], 16) if addr else 0
        with open(args.dump, "w") as f:
            for r in rows:
                off = int(r[addr], 16) - base if addr else 0
                f.write(f"{off:#07x}\t{val(r):.0f}\t{r.get('Instructions Executed', '')}\t{r[src].strip()}\n")
    print(f"{len(rows)} SASS lines, {total:.0f} stall samples; columns: {keys}")
    for r in sorted(rows, key=val, reverse=True)[:args.top]:
        print(f"{val(r):8.0f} {100 * val(r) / total:5.1f}%  {r.get(addr, '')}  {r[src]}")
    # the stall-reason columns summed over all lines
    def num(x):
        try:
            return float((x or "0").replace(",", ""))
        except ValueError:
            return 0.0
    reasons = {k: sum(num(r[k]) for r in rows) for k in keys if ("stall" in k.lower()) and k != samp}
    for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {k}: {v:.0f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", nargs="?")
    ap.add_argument("--B", type=int, default=128)
    ap.add_argument("--C", type=int, default=8192)
    ap.add_argument("--launches", type=int, default=4)
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--stalls", help="an ncu report: print its most stalled SASS lines")
    ap.add_argument("--top", type=int, default=60)
    ap.add_argument("--dump", help="with --stalls: write offset, samples, executions, SASS per line to this file")
    a = ap.parse_args()
    stalls(a) if a.stalls else launch(a)

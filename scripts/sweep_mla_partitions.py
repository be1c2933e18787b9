#!/usr/bin/env python3
"""Time MLADecode (decode + combine) over explicit partition counts, to check default_partitions.

    python3 scripts/sweep_mla_partitions.py build/gpu/bench --heads 16 128 --shape B=1,C=32768 \\
        --partitions 8 16 32 64 128 --results results
Rows go to the bench table (family mla_decode, params.num_partitions), next to the heuristic's own row.
"""
import argparse

from mlagen.bench import parse_shape
from mlagen.families.mla_decode.plan import bench_plan
from mlagen.report import append_rows
from mlagen.runtime import Kernel, find_bundles


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundles")
    ap.add_argument("--heads", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--shape", action="append", default=[])
    ap.add_argument("--partitions", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    ap.add_argument("--results", default="results")
    a = ap.parse_args()
    dec = [b for b in find_bundles(a.bundles, "mla_decode") if (lambda p: p["cache_dtype"] == "bf16" and p["q_len"] == 1
           and p["num_heads"] in a.heads and p["tile_n"] == 64 and not p["sparse"])(Kernel(b).params)]
    comb = find_bundles(a.bundles, "mla_combine")
    rows = bench_plan(dec + comb, [dict(parse_shape(s), uniform=1) for s in a.shape], warmup=5, reps=30,
                      with_torch=False, partitions=(None, *a.partitions))
    for r in rows:
        print(r["kernel"], r["shape"], r["params"][r["params"].index('"num_partitions"'):][:24], f"{r['time_us']:.1f} us")
    append_rows(rows, "bench", a.results)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Build fp8_gemm *ablation* bundles: a normal configuration with one part of the mainloop taken out of the
generated source, to measure what that part costs.  The results are wrong by design (the bench rows record
the error); they are timing probes, never kernels to ship, and their names end in ``_abl_<what>``.

    python scripts/ablate_fp8_gemm.py --out build/gpu/ablate -p stagger=true -p scale_lookahead=true --what nopromote

Ablations (text edits of the rendered source, checked to apply):

- ``nopromote``: wgmma accumulates every k tile straight into ``acc`` (no per-k-tile partial, no scale loads,
  no promotion FFMAs); the pipeline, the barriers and the per-k-tile ``wait_group(0)`` stay.  This is the
  mainloop's rate without blockwise scaling: the gap to it is what promotion costs.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlagen import codegen  # noqa: E402
from mlagen import compile as mcompile  # noqa: E402


def _nopromote(src: str) -> str:
    if "part2 = " in src:
        raise SystemExit("nopromote: not for overlap=True (its two in-flight wgmmas would share one accumulator)")
    n0 = src.count("tiled_mma.set(warpgroup.Field.ACCUMULATE, False)")
    src = src.replace("tiled_mma.set(warpgroup.Field.ACCUMULATE, False)", "tiled_mma.set(warpgroup.Field.ACCUMULATE, True)")
    src, n1 = re.subn(r"cute\.gemm\(tiled_mma, part, (.*?), part\)", r"cute.gemm(tiled_mma, acc, \1, acc)", src)
    # the promotion lines promote_loaded / the per-element form emit: acc[i] = acc[i] + part[i] * <scale>
    src, n2 = re.subn(r"acc\[i\] = acc\[i\] \+ part\[i\] \* .*$", "pass", src, flags=re.M)
    if not (n0 and n1 and n2):
        raise SystemExit(f"nopromote: the source did not match (accumulate flags {n0}, gemms {n1}, promotions {n2})")
    return src


ABLATIONS = {"nopromote": _nopromote}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-p", action="append", default=[], help="fp8_gemm parameter k=v")
    ap.add_argument("--what", choices=sorted(ABLATIONS), required=True)
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    params = dict(kv.split("=", 1) for kv in a.p)
    render = codegen.render

    def patched(family, p, arch):
        fam, pp, name, src = render(family, p, arch)
        return fam, pp, f"{name}_abl_{a.what}", ABLATIONS[a.what](src)

    codegen.render = patched
    try:
        b = mcompile.build("fp8_gemm", params, a.arch, a.out, force=True)
    finally:
        codegen.render = render
    print(b)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

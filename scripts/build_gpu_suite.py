#!/usr/bin/env python3
"""Compile the GPU test and benchmark bundles (no GPU needed) into build/gpu, ready to carry to a GPU host."""
import argparse
import sys
from pathlib import Path

from mlagen import suites
from mlagen.compile import build_many
from mlagen.env import git_commit


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="build/gpu")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", choices=["test", "bench"], default=None)
    a = ap.parse_args(argv)
    jobs = []
    if a.only in (None, "test"):
        jobs += suites.jobs(suites.TEST, a.arch)
    if a.only in (None, "bench"):
        jobs += suites.jobs(suites.BENCH, a.arch)
    seen, uniq = set(), []
    for j in jobs:
        key = (j[0], tuple(sorted(j[1].items())), j[2])
        if key not in seen:
            seen.add(key)
            uniq.append(j)
    res = build_many(uniq, a.out, workers=a.workers)
    bad = [(j, e) for j, b, e in res if e]
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "COMMIT").write_text(git_commit() + "\n")
    print(f"{len(res) - len(bad)} bundles in {a.out}, {len(bad)} failed")
    for j, e in bad:
        print("FAILED", j, e[:500])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

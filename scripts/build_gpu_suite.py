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
    res = []
    for name, suite in (("test", suites.TEST), ("bench", suites.BENCH)):
        if a.only in (None, name):
            res += build_many(suites.jobs(suite, a.arch), Path(a.out) / name, workers=a.workers)
    bad = [(j, e) for j, b, e in res if e]
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "COMMIT").write_text(git_commit() + "\n")
    print(f"{len(res) - len(bad)} bundles in {a.out}, {len(bad)} failed")
    for j, e in bad:
        print("FAILED", j, e[:500])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

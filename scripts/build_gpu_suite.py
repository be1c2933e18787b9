#!/usr/bin/env python3
"""Compile the GPU test and benchmark bundles (no GPU needed) into build/gpu/{test,bench}, ready to carry to a
GPU host.  Same as `mlagen build-suite --out build/gpu`."""
import sys

from mlagen.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--out" not in argv:
        argv += ["--out", "build/gpu"]
    sys.exit(main(["build-suite", "-q", *argv]))

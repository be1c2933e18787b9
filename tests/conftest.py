"""Test configuration: GPU / compile markers, fresh randomness, and result rows for GPU runs.

GPU tests (marked ``gpu``) are skipped where torch sees no CUDA device.  They launch bundles from
``$MLAGEN_BUNDLES`` (default ``build/gpu/test``, made by ``python scripts/build_gpu_suite.py`` on any
machine with the DSL).  Every GPU test's outcome and metrics (``record_property``) become a row in
``$MLAGEN_RESULTS_DIR/gpu_tests.{csv,parquet}`` (default ``results/``) with device, commit and date.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

ROWS: list[dict] = []


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


HAS_CUDA = _has_cuda()


def pytest_collection_modifyitems(config, items):
    from mlagen.compile import dsl_available
    dsl = dsl_available()
    for it in items:
        if "gpu" in it.keywords and not HAS_CUDA:
            it.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)"))
        if "compile" in it.keywords and not dsl:
            it.add_marker(pytest.mark.skip(reason="needs nvidia-cutlass-dsl (pip install -e '.[compile]')"))


@pytest.fixture
def rng():
    """A generator seeded from the OS: fresh inputs on every run (the seed is recorded)."""
    seed = int.from_bytes(os.urandom(4), "little")
    return np.random.default_rng(seed)


def bundles_root() -> Path:
    return Path(os.environ.get("MLAGEN_BUNDLES", "build/gpu/test"))


def _device_arch() -> str | None:
    """The architecture this machine's GPU runs (runtime.device_arch), None without one."""
    try:
        import torch
        if torch.cuda.is_available():
            from mlagen.runtime import device_arch
            return device_arch(0)
    except Exception:
        pass
    return None


def gpu_bundles(family: str) -> list[Path]:
    """The family's bundles under the bundles root that this GPU runs (those of its architecture)."""
    from mlagen.runtime import find_bundles
    root = bundles_root()
    found = find_bundles(root, family, _device_arch()) if root.exists() else []
    if not found and os.environ.get("MLAGEN_REQUIRE_BUNDLES") == "1":
        raise RuntimeError(f"no {family} bundles under {root}: run scripts/build_gpu_suite.py")
    return found


def pytest_runtest_logreport(report):
    if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
        return
    if "gpu" not in report.keywords or not HAS_CUDA:
        return
    props = dict(report.user_properties)
    ROWS.append(dict(test=report.nodeid, outcome=report.outcome, duration_s=round(report.duration, 4),
                     metrics=json.dumps(props, default=str, sort_keys=True)))


def pytest_sessionfinish(session, exitstatus):
    if not ROWS:
        return
    from mlagen.env import git_commit, now_utc
    import torch
    dev = torch.cuda.get_device_name(0)
    for r in ROWS:
        r.update(device=dev, commit=git_commit(), date=now_utc(), table="gpu_tests")
    out = os.environ.get("MLAGEN_RESULTS_DIR", "results")
    try:
        from mlagen.report import append_rows
        append_rows(ROWS, "gpu_tests", out)
    except Exception as e:  # never lose the rows: fall back to plain CSV
        import csv
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "gpu_tests_fallback.csv", "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
            w.writeheader()
            w.writerows(ROWS)
        print(f"report.append_rows failed ({e}); wrote gpu_tests_fallback.csv")

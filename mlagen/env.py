"""Facts about where code runs: commit, device, date.  Used to stamp every result row."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=None)
def git_commit() -> str:
    """The commit of the code that runs: $MLAGEN_COMMIT (set by scripts/gpu_run.sh from the carried
    build/gpu/COMMIT: a GPU host's copy of the tree may carry a stale .git), else git, else a COMMIT file."""
    if os.environ.get("MLAGEN_COMMIT"):
        return os.environ["MLAGEN_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    for cand in (REPO / "COMMIT", REPO / "build" / "COMMIT", Path.cwd() / "COMMIT"):
        if cand.exists():
            return cand.read_text().strip()
    return "unknown"


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def host() -> str:
    return platform.node()

"""Shared pieces of the CPU tests (no GPU): the repository root, fake device arrays, and one bundle
folder per test session so that each qk_rmsnorm configuration is compiled once."""
from __future__ import annotations

import atexit
import re
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# qk_rmsnorm configurations compiled by the CPU suite: every dtype pairing kind (same width, widening,
# narrowing), both rsqrt modes, and several threads_per_row / rows_per_cta.
QK_CONFIGS = {
    "bf16-bf16-ieee-t64r2": {},
    "bf16-f32-approx-t32r4": dict(out_dtype="f32", rsqrt="approx", threads_per_row=32, rows_per_cta=4),
    "f32-f32-ieee-t128r1": dict(dtype="f32", out_dtype="f32", threads_per_row=128, rows_per_cta=1),
    "f32-bf16-approx-t32r8": dict(dtype="f32", out_dtype="bf16", rsqrt="approx", threads_per_row=32, rows_per_cta=8),
    "f16-f16-ieee-t8r16-small": dict(dtype="f16", out_dtype="f16", nq=128, nk=64, threads_per_row=8, rows_per_cta=16),
    "f32-f16-ieee-t64r1": dict(dtype="f32", out_dtype="f16", threads_per_row=64, rows_per_cta=1),
}

# Known defects, asserted as xfail (not strict: the test starts passing once they are fixed).
KNOWN_SPILLS = {
    ("f32-f16-ieee-t64r1", "sm_100a"):
        "ptxas (sm_100a) spills 8 bytes to the stack (STL.64/LDL.64 at 40 registers) for f32-input "
        "qk_rmsnorm with threads_per_row=64; sm_90a does not",
}
ARCHES = ("sm_90a", "sm_100a")

_ROOT: Path | None = None


def bundle_root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="mlagen-cpu-bundles-"))
        atexit.register(shutil.rmtree, str(_ROOT), True)
    return _ROOT


def qk_bundle(params: dict, arch: str) -> Path:
    """Compile (once per session: build() reuses an identical bundle) and return the bundle folder."""
    from mlagen.compile import build
    return build("qk_rmsnorm", params, arch, bundle_root())


# ---- PTX helpers ----
_PTX_BITS = {"8": 8, "16": 16, "32": 32, "64": 64, "128": 128}
_GLOBAL_RE = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)\s")


def global_accesses(ptx: str) -> list[tuple[str, int, str]]:
    """Every ld.global / st.global of the PTX as (op, bytes, full mnemonic)."""
    out = []
    for m in _GLOBAL_RE.finditer(ptx):
        mods = m.group(2).split(".")[1:]
        n = 1
        bits = None
        for t in mods:
            if re.fullmatch(r"v[248]", t):
                n = int(t[1:])
            mt = re.fullmatch(r"[bsuf](8|16|32|64|128)", t)
            if mt:
                bits = _PTX_BITS[mt.group(1)]
        assert bits is not None, f"cannot size {m.group(0)!r}"
        out.append((m.group(1), n * bits // 8, m.group(0).strip()))
    return out


_LDPARAM_RE = re.compile(r"\bld\.param((?:\.[\w]+)*)\s+[^,]+,\s*\[(\w+?)_param_(\d+)(?:\+(\d+))?\]")


def param_loads(ptx: str) -> list[tuple[int, int, int, int]]:
    """Every ``ld.param`` of the kernel as (param index, byte offset, element bytes, element count)."""
    out = []
    for m in _LDPARAM_RE.finditer(ptx):
        mods = m.group(1).split(".")[1:]
        n, bits = 1, None
        for t in mods:
            if re.fullmatch(r"v[248]", t):
                n = int(t[1:])
            mt = re.fullmatch(r"[bsuf](8|16|32|64)", t)
            if mt:
                bits = int(mt.group(1))
        out.append((int(m.group(3)), int(m.group(4) or 0), bits // 8, n))
    return out


_ALIGN_RE = re.compile(r"\.param\s+(?:\.align\s+(\d+)\s+)?\.(\w+)\s+\w+?_param_(\d+)")


def param_aligns(ptx: str) -> dict[int, int | None]:
    """The declared ``.align`` of each ``.param`` of the entry (None where none is declared)."""
    return {int(m.group(3)): (int(m.group(1)) if m.group(1) else None) for m in _ALIGN_RE.finditer(ptx)}

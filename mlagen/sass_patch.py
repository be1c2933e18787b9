"""Post-compile edits of a cubin's instruction control bits (Hopper SASS), applied by :func:`mlagen.compile.build`
when a family asks for them (``Family.sass_patches``).  Needs cuobjdump (for the SASS listing), not a GPU.

Each Volta-and-later instruction is 128 bits; the top 23 bits of its high word are scheduling controls that
ptxas chooses: stall cycles (bits 41-44), a "no yield" flag (bit 45: 1 keeps the warp scheduler on this warp
after the instruction), scoreboard barriers (46-57) and operand-reuse flags (58-61: keep operand a/b/c in the
reuse cache for the next instruction).  An edit here touches only bits 45 and 58-61, never the opcode,
operands, stalls or barriers, so the program computes the same values; only the issue order between warps
changes.

``ffma_yield`` (fp8_gemm's promotion).  The promotion after each k tile is a run of 64-128 dependent-free FFMAs
(``acc += partial * scale``).  ptxas marks every other one ``.reuse`` for the shared scale operand, and a
reuse instruction never yields, so a warp holds its scheduler through most of the run while the other MMA
warpgroup's warp waits to issue its next wgmma.  For the first ``fraction`` of each run of at least
``min_run`` FFMAs this clears both flags of the reuse FFMAs, which makes them plain FFMAs (their operand is
read from the register file again) that let the scheduler switch warps.  The idea is DeepGEMM's
(``interleave_ffma``: up to 10% on its FP8 GEMMs); this is an independent implementation over the ELF
section of the kernel.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass

NO_YIELD = 1 << 45
REUSE = 0xF << 58

_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);\s*/\*\s*(0x[0-9a-f]{16})\s*\*/")
_CTRL = re.compile(r"^\s*/\*\s*(0x[0-9a-f]{16})\s*\*/\s*$")


class SassPatchError(RuntimeError):
    pass


@dataclass
class Insn:
    addr: int          # byte offset inside the function's .text section
    text: str          # e.g. "FFMA R7, R88, R179.reuse, R181"
    lo: int
    hi: int

    @property
    def opcode(self) -> str:
        t = self.text.split()
        i = 1 if t and t[0].startswith("@") else 0
        return t[i].split(".")[0] if len(t) > i else ""


def parse_sass(sass: str) -> dict[str, list[Insn]]:
    """cuobjdump -sass text -> {function symbol: instructions in order}."""
    funcs: dict[str, list[Insn]] = {}
    cur: list[Insn] | None = None
    pending = None
    for line in sass.splitlines():
        m = re.search(r"Function\s*:\s*(\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            pending = None
            continue
        if cur is None:
            continue
        m = _INSN.search(line)
        if m:
            pending = (int(m.group(1), 16), m.group(2).strip(), int(m.group(3), 16))
            continue
        m = _CTRL.match(line)
        if m and pending is not None:
            cur.append(Insn(pending[0], pending[1], pending[2], int(m.group(1), 16)))
            pending = None
    return funcs


def text_sections(cubin: bytes) -> dict[str, tuple[int, int]]:
    """ELF64 section name -> (file offset, size) for the ``.text.<symbol>`` sections of a cubin."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2 or cubin[5] != 1:
        raise SassPatchError("not a little-endian ELF64 cubin")
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)

    def header(i):
        name, _typ, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", cubin, shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = header(shstrndx)
    out = {}
    for i in range(shnum):
        name, off, size = header(i)
        end = cubin.index(b"\0", stroff + name)
        sname = cubin[stroff + name:end].decode()
        if sname.startswith(".text."):
            out[sname[len(".text."):]] = (off, size)
    return out


def ffma_runs(insns: list[Insn], min_run: int) -> list[list[int]]:
    """Index lists of the maximal runs of consecutive FFMA instructions at least ``min_run`` long."""
    runs, cur = [], []
    for i, ins in enumerate(insns):
        if ins.opcode == "FFMA":
            cur.append(i)
            continue
        if len(cur) >= min_run:
            runs.append(cur)
        cur = []
    if len(cur) >= min_run:
        runs.append(cur)
    return runs


def ffma_yield(cubin: bytes, sass: str, symbol: str, fraction: float = 9 / 16, min_run: int = 16
               ) -> tuple[bytes, dict]:
    """The ``ffma_yield`` edit of ``symbol`` (see the module doc); returns the new cubin and a summary."""
    funcs = parse_sass(sass)
    if symbol not in funcs:
        raise SassPatchError(f"{symbol} not in the SASS listing (functions: {list(funcs)[:4]}...)")
    secs = text_sections(cubin)
    if symbol not in secs:
        raise SassPatchError(f"no .text.{symbol} section in the cubin")
    base, size = secs[symbol]
    insns = funcs[symbol]
    buf = bytearray(cubin)
    runs = ffma_runs(insns, min_run)
    changed = 0
    for run in runs:
        for i in run[: int(len(run) * fraction)]:
            ins = insns[i]
            if ins.addr + 16 > size:
                raise SassPatchError(f"{symbol}: instruction at {ins.addr:#x} lies outside its section")
            lo, hi = struct.unpack_from("<QQ", buf, base + ins.addr)
            if (lo, hi) != (ins.lo, ins.hi):
                raise SassPatchError(f"{symbol}: the bytes at {ins.addr:#x} are not the listed instruction "
                                     f"({ins.text})")
            if hi & REUSE and hi & NO_YIELD:
                struct.pack_into("<Q", buf, base + ins.addr + 8, hi & ~(REUSE | NO_YIELD))
                changed += 1
    return bytes(buf), {"runs": len(runs), "ffma": sum(len(r) for r in runs), "changed": changed}


# name -> edit(cubin, sass, symbol, arg); ``arg`` is the text after the colon of a ``name:arg`` spec ('' if none)
PATCHES = {"ffma_yield": lambda cubin, sass, symbol, arg: ffma_yield(cubin, sass, symbol, fraction=int(arg or 9) / 16)}


def apply(spec: str, cubin: bytes, sass: str, symbol: str) -> tuple[bytes, dict]:
    """Apply the patch ``spec``: a name, or ``name:arg`` (ffma_yield:N edits the first N/16 of each run)."""
    name, _, arg = spec.partition(":")
    if name not in PATCHES:
        raise SassPatchError(f"unknown SASS patch {name!r} (known: {sorted(PATCHES)})")
    return PATCHES[name](cubin, sass, symbol, arg)

"""What every kernel family provides.

A family lives in one folder, ``mlagen/families/<name>/``, and its ``__init__.py`` holds its whole story:
the parameter space and constraints, the argument layout (:mod:`mlagen.abi`), the launch geometry,
the template binding (``templates/<name>.py.j2`` and the context it is rendered with), a float64/float32
numpy reference, and how to make test problems.  Nothing here imports the CuTe DSL: the runtime uses
the same family object on GPU hosts where the DSL is absent.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..abi import ArgLayout


class ParamError(ValueError):
    """Invalid kernel parameters; raised before any source is written or compiled."""


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    choices: tuple | None = None
    lo: float | None = None
    hi: float | None = None
    doc: str = ""

    @property
    def type(self) -> type:
        return type(self.default)

    def coerce(self, v: Any) -> Any:
        t = self.type
        if isinstance(v, str) and t is not str:
            if t is bool:
                if v.lower() in ("1", "true", "yes", "on"):
                    return True
                if v.lower() in ("0", "false", "no", "off"):
                    return False
                raise ParamError(f"parameter '{self.name}': expected a boolean, got {v!r}")
            try:
                v = float(v) if t is float else int(v, 0)
            except ValueError:
                raise ParamError(f"parameter '{self.name}': expected {t.__name__}, got {v!r}") from None
        if t is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, t) or (t is int and isinstance(v, bool)):
            raise ParamError(f"parameter '{self.name}': expected {t.__name__}, got {type(v).__name__} {v!r}")
        if self.choices is not None and v not in self.choices:
            raise ParamError(f"parameter '{self.name}'={v!r} is not one of {list(self.choices)}")
        if self.lo is not None and v < self.lo:
            raise ParamError(f"parameter '{self.name}'={v!r} is below its minimum {self.lo}")
        if self.hi is not None and v > self.hi:
            raise ParamError(f"parameter '{self.name}'={v!r} is above its maximum {self.hi}")
        return v

    def describe(self) -> str:
        if self.choices is not None:
            dom = "{" + ", ".join(map(str, self.choices)) + "}"
        elif self.lo is not None or self.hi is not None:
            dom = f"[{self.lo}, {self.hi}]"
        else:
            dom = self.type.__name__
        return f"{self.name}={self.default!r} in {dom}" + (f"  {self.doc}" if self.doc else "")


# Shared-memory budgets (bytes, per CTA, opt-in maximum) by architecture.
SMEM_LIMIT = {"sm_90a": 227 * 1024, "sm_100a": 227 * 1024}
ARCHES = tuple(SMEM_LIMIT)


class Family:
    name: str = ""
    doc: str = ""
    template: str = ""                 # file name under templates/
    params: tuple[Param, ...] = ()
    # Names of the parameters that fix the shapes a bundle serves (the rest are tuning knobs).
    shape_params: tuple[str, ...] = ()
    arches: tuple[str, ...] = ARCHES    # architectures the template supports

    # ---------------- parameters ----------------
    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise ParamError(f"{self.name}: unknown parameter '{name}'; known: {[p.name for p in self.params]}")

    def validate(self, given: Mapping[str, Any] | None = None, arch: str = "sm_90a") -> dict:
        """Coerce and check ``given`` over the defaults; raise ParamError naming every violation."""
        given = dict(given or {})
        for k in given:
            self.param(k)
        p = {q.name: q.coerce(given.get(q.name, q.default)) for q in self.params}
        if arch not in self.arches:
            raise ParamError(f"{self.name}: arch '{arch}' is not supported; choose one of {list(self.arches)}")
        errs = list(self.constraints(p, arch))
        smem = self.smem_bytes(p)
        if smem > SMEM_LIMIT[arch]:
            errs.append(f"needs {smem} bytes of shared memory per CTA, over the {SMEM_LIMIT[arch]} of {arch}")
        bx, by, bz = self.block(p)
        if bx * by * bz > 1024 or bx * by * bz < 1:
            errs.append(f"block of {bx}x{by}x{bz} threads is outside 1..1024")
        if errs:
            raise ParamError(f"{self.name}: invalid parameters {p}:\n  - " + "\n  - ".join(errs))
        return p

    def constraints(self, p: dict, arch: str) -> list[str]:
        return []

    # ---------------- geometry and layout (shared by codegen and runtime) ----------------
    def layout(self, p: dict) -> ArgLayout:
        raise NotImplementedError

    def block(self, p: dict) -> tuple[int, int, int]:
        raise NotImplementedError

    def smem_bytes(self, p: dict) -> int:
        return 0

    def smem_carveout(self, p: dict) -> int | None:
        """Preferred shared-memory carveout (percent) the runtime sets, or None for the driver's choice."""
        return None

    def grid(self, p: dict, dims: Mapping[str, int]) -> tuple[int, int, int]:
        raise NotImplementedError

    def cluster(self, p: dict) -> tuple[int, int, int]:
        """Thread-block cluster shape the kernel is launched with (the DSL records none in the cubin, so the
        runtime launches with cuLaunchKernelEx and this shape; the grid must be a multiple of it)."""
        return (1, 1, 1)

    def template_context(self, p: dict, arch: str) -> dict:
        return {}

    # ---------------- runtime hooks (defaults: nothing family-specific) ----------------
    def scalar_default(self, p: dict, name: str):
        """Value for a scalar argument the caller left out, or None when it is required."""
        return None

    def derive_dims(self, p: dict, dims: Mapping[str, int]) -> dict:
        """Symbol values the inputs do not show but outputs need (e.g. blocks per row)."""
        return {}

    def check_call(self, p: dict, views: Mapping, dims: Mapping[str, int], contents: bool = True) -> None:
        """Family-specific host checks before a launch; raise ArgumentError naming the argument."""

    def kernel_name(self, p: dict) -> str:
        """A readable, unique, file-name-safe name for this configuration."""
        h = hashlib.sha1(json.dumps(p, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.name}_{h}"

    # ---------------- performance model ----------------
    def bytes_moved(self, p: dict, dims: Mapping[str, int]) -> int:
        return 0

    def bytes_written(self, p: dict, dims: Mapping[str, int]) -> int | None:
        """The part of :meth:`bytes_moved` that is written (None: not split).  With the one-way ceilings it
        gives a memory floor, reads at the read-only rate plus writes at the write-only rate (bench.row)."""
        return None

    def flops(self, p: dict, dims: Mapping[str, int]) -> int:
        return 0

    def torch_inputs(self, p: dict, prob: "Problem") -> dict:
        """The problem's numpy inputs as CUDA tensors in the kernel's argument order and dtypes; outputs the
        problem does not provide are None (the runtime allocates them)."""
        from ..interop import to_torch
        t = {}
        for a in self.layout(p).args:
            if a.kind == "scalar":
                t[a.name] = prob.inputs[a.name]
            elif a.kind == "tensor":
                t[a.name] = to_torch(prob.inputs[a.name], a.dtype) if a.name in prob.inputs else None
        return t

    def sass_patches(self, p: dict) -> tuple[str, ...]:
        """Names of :mod:`mlagen.sass_patch` edits applied to the compiled cubin (in order)."""
        return ()

    # ---------------- tuning hooks ----------------
    def tune_companions(self, p: dict) -> list[tuple[str, dict]]:
        """(family, params) of the other kernels a candidate needs to run its call (built beside it)."""
        return []

    def tune_measure(self, kernel, shape: Mapping[str, Any], timer, cache: dict) -> dict | None:
        """Measure one candidate on ``shape`` for a family whose call is more than one launch: return
        {time_us, err, dims, bytes}; None means the generic one-launch path of the tuning worker."""
        return None

    def bench_rows(self, bundles_root, shapes, args, ceilings) -> list | None:
        """Benchmark rows for a family whose call is more than one launch (None: the generic per-bundle bench)."""
        return None

    def baseline_desc(self, p: dict) -> str:
        """What the torch_eager rows of the benchmark ran."""
        return "torch ops (float32 compute)"

    def bucket(self, dims: Mapping[str, int]) -> str:
        """The dispatch-table key of a call: its dynamic sizes, rounded up to powers of two."""
        return "_".join(f"{k}{1 << max(0, int(v) - 1).bit_length()}" for k, v in sorted(dims.items())
                        if k in self.bucket_dims)

    bucket_dims: tuple[str, ...] = ()

    def table_key(self, p: Mapping, dims: Mapping[str, int]) -> str:
        """Dispatch-table key: the shape-defining parameters and the size bucket."""
        return ",".join(f"{k}={p.get(k, self.param(k).default)}" for k in self.shape_params) + "|" + self.bucket(dims)

    def prefer(self, kernels: list, dims: Mapping[str, int]):
        """Heuristic choice among kernels that accept a call, when the tuned table has no entry."""
        return kernels[0]

    def describe(self) -> str:
        lines = [f"{self.name}: {self.doc}"]
        lines += ["    " + q.describe() for q in self.params]
        return "\n".join(lines)


def random_page_table(rng, need, spare: int = 2):
    """A page table for sequences needing ``need[b]`` pages, drawn from a random permutation of
    ``sum(need) + spare`` pages; unused entries are -1.  Returns (table [B, max(need) + 1] int32, pages)."""
    import numpy as np
    npages = int(need.sum()) + spare
    perm = rng.permutation(npages)
    pt = np.full((len(need), int(max(need.max(), 1)) + 1), -1, np.int32)
    k = 0
    for b, n in enumerate(need):
        pt[b, :n] = perm[k:k + n]
        k += n
    return pt, npages


@dataclass
class Problem:
    """One test/benchmark instance: numpy inputs (already rounded to the kernel's dtypes) and sizes."""
    dims: dict
    inputs: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

"""Kernel argument layout: the one description shared by the generator, the compiler and the runtime.

A family describes its kernel's arguments as an :class:`ArgLayout`: named symbols (the dynamic
integers of shapes and strides) and an ordered list of tensor / scalar / tensor-map arguments.

* The generator renders the CuTe-DSL fake arguments (``make_fake_tensor``, ``sym_int32`` ...) from it.
* The compiler checks the ``.entry`` parameters of the emitted PTX against :meth:`ArgLayout.param_sizes`.
* The runtime resolves the symbols from the caller's arrays, checks them, and packs each argument
  into the byte layout the CuTe DSL lowers it to: a tensor becomes a struct
  ``{ void* ptr; <dynamic shape ints in mode order>; <dynamic stride ints in mode order>; }``
  with natural C alignment (verified against the PTX of compiled kernels, see tests/test_abi.py).

This module imports neither the DSL nor any GPU library.
"""
from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union


class ArgumentError(ValueError):
    """A caller's argument does not fit the kernel's declared layout (raised before any launch)."""


@dataclass(frozen=True)
class DType:
    name: str          # mlagen's short name
    itemsize: int      # bytes
    cute: str          # CuTe DSL type expression used in generated source
    torch: str         # attribute name in torch
    kind: str          # 'float' | 'int' | 'uint'
    typestr: str = ""  # __cuda_array_interface__ typestr where one exists


DTYPES: dict[str, DType] = {d.name: d for d in [
    DType("bf16", 2, "cutlass.BFloat16", "bfloat16", "float", ""),
    DType("f16", 2, "cutlass.Float16", "float16", "float", "<f2"),
    DType("f32", 4, "cutlass.Float32", "float32", "float", "<f4"),
    DType("f8e4m3", 1, "cutlass.Float8E4M3FN", "float8_e4m3fn", "float", ""),
    DType("i32", 4, "cutlass.Int32", "int32", "int", "<i4"),
    DType("u32", 4, "cutlass.Uint32", "uint32", "uint", "<u4"),
    DType("i64", 8, "cutlass.Int64", "int64", "int", "<i8"),
    DType("u8", 1, "cutlass.Uint8", "uint8", "uint", "|u1"),
]}

_CTYPE_OF = {"i32": ctypes.c_int32, "u32": ctypes.c_uint32, "i64": ctypes.c_int64, "f32": ctypes.c_float}


def dtype(name: str) -> DType:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {sorted(DTYPES)}") from None


@dataclass(frozen=True)
class Sym:
    """A dynamic integer of the kernel (a shape extent or a stride), passed at launch."""
    name: str
    width: int = 32          # 32 or 64 bits
    divisibility: int = 1    # the kernel may assume value % divisibility == 0
    doc: str = ""

    def check(self, value: int, where: str) -> None:
        lim = 2 ** (self.width - 1) - 1
        if value < 0 or value > lim:
            raise ArgumentError(f"{where}: {self.name}={value} is outside [0, {lim}] ({self.width}-bit)")
        if self.divisibility > 1 and value % self.divisibility:
            raise ArgumentError(f"{where}: {self.name}={value} must be a multiple of {self.divisibility}")


Dim = Union[int, str]


@dataclass(frozen=True)
class TensorArg:
    name: str
    dtype: str
    shape: tuple[Dim, ...]
    stride: tuple[Dim, ...]
    align: int = 16          # byte alignment the kernel assumes for the base pointer
    io: str = "in"           # 'in' | 'out' | 'inout' | 'scratch' (allocated zeroed by the runtime when not passed)
    doc: str = ""
    host_only: bool = False  # reaches the kernel only through a TensorMapArg / CoordArg built from it
    kind: str = field(default="tensor", init=False)

    def __post_init__(self):
        if len(self.shape) != len(self.stride):
            raise ValueError(f"{self.name}: shape and stride ranks differ")
        dtype(self.dtype)

    def dyn_fields(self, syms: Mapping[str, Sym]) -> list[tuple[str, Sym]]:
        out = [(f"shape{i}", syms[d]) for i, d in enumerate(self.shape) if isinstance(d, str)]
        out += [(f"stride{i}", syms[d]) for i, d in enumerate(self.stride) if isinstance(d, str)]
        return out

    def ctype(self, syms: Mapping[str, Sym]) -> type:
        fields = [("ptr", ctypes.c_void_p)]
        for fname, s in self.dyn_fields(syms):
            fields.append((fname, ctypes.c_int64 if s.width == 64 else ctypes.c_int32))
        return type(f"Arg_{self.name}", (ctypes.Structure,), {"_fields_": fields})


@dataclass(frozen=True)
class ScalarArg:
    name: str
    dtype: str   # i32 | u32 | i64 | f32
    doc: str = ""
    kind: str = field(default="scalar", init=False)

    def ctype(self, syms=None) -> type:
        return _CTYPE_OF[self.dtype]


@dataclass(frozen=True)
class TensorMapArg:
    """A 128-byte CUtensorMap passed by value (TMA), built by the runtime with cuTensorMapEncodeTiled.

    ``of`` names the (usually host-only) tensor argument it maps.  The map's dimensions are the tensor's
    modes innermost first (the tensor's last mode must have stride 1); ``box`` is in that same order.
    ``swizzle`` is in bytes (0, 32, 64, 128); ``l2_promotion`` in bytes (0, 64, 128, 256).  These must be
    exactly what the template's TMA atom assumes.  ``fixed`` pins tensor modes at a scalar argument's value
    (``((2, "layer_idx"),)``): the map then covers that slice, a lower-rank tensor (``modes`` and ``box``
    name only the other modes), e.g. the 2-d map that TMA gather4 requires.
    """
    name: str
    of: str
    box: tuple[int, ...]
    swizzle: int = 128
    l2_promotion: int = 256
    doc: str = ""
    modes: tuple[int, ...] = ()   # tensor modes in TMA order, innermost first (default: last mode first)
    fixed: tuple[tuple[int, str], ...] = ()   # (mode, scalar argument) pairs the map is sliced at
    kind: str = field(default="tensormap", init=False)

    def ctype(self, syms=None) -> type:
        return ctypes.c_uint8 * 128


@dataclass(frozen=True)
class CoordArg:
    """The shape of a TMA coordinate tensor (what ``make_tiled_tma_atom`` returns beside the atom):
    one int32 per dynamic extent of tensor ``of``, in mode order."""
    name: str
    of: str
    doc: str = ""
    kind: str = field(default="coord", init=False)

    def ctype(self, syms=None, of_arg: "TensorArg | None" = None) -> type:
        n = sum(isinstance(d, str) for d in of_arg.shape) if of_arg is not None else 0
        return type(f"Coord_{self.name}", (ctypes.Structure,),
                    {"_fields_": [(f"shape{i}", ctypes.c_int32) for i in range(n)] or [("_empty", ctypes.c_uint8 * 0)]})


@dataclass(frozen=True)
class ConstArg:
    """A kernel parameter the DSL derives from a compile-time object (e.g. the accumulate flag of a
    TiledMma); the runtime passes ``value`` in ``size`` bytes."""
    name: str
    size: int = 1
    value: int = 0
    doc: str = ""
    kind: str = field(default="const", init=False)

    def ctype(self, syms=None) -> type:
        return {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32, 8: ctypes.c_uint64}[self.size]


Arg = Union[TensorArg, ScalarArg, TensorMapArg, CoordArg, ConstArg]


@dataclass
class ArgLayout:
    symbols: dict[str, Sym]
    args: list[Arg]

    def __post_init__(self):
        self._ctypes: list[type] | None = None
        names = [a.name for a in self.args]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate argument names: {names}")
        for a in self.args:
            if isinstance(a, TensorArg):
                for d in a.shape + a.stride:
                    if isinstance(d, str) and d not in self.symbols:
                        raise ValueError(f"{a.name}: symbol {d!r} is not declared")

    # ---- serialisation (the manifest carries the layout) ----
    def to_json(self) -> dict:
        return {
            "symbols": [dict(name=s.name, width=s.width, divisibility=s.divisibility, doc=s.doc) for s in self.symbols.values()],
            "args": [_arg_to_json(a) for a in self.args],
        }

    @classmethod
    def from_json(cls, d: Mapping) -> "ArgLayout":
        syms = {s["name"]: Sym(**s) for s in d["symbols"]}
        args: list[Arg] = []
        for a in d["args"]:
            a = dict(a)
            kind = a.pop("kind")
            if kind == "tensor":
                args.append(TensorArg(**{**a, "shape": tuple(a["shape"]), "stride": tuple(a["stride"])}))
            elif kind == "scalar":
                args.append(ScalarArg(**a))
            elif kind == "tensormap":
                args.append(TensorMapArg(**{**a, "box": tuple(a["box"]), "modes": tuple(a.get("modes", ())),
                                            "fixed": tuple((int(m), str(n)) for m, n in a.get("fixed", ()))}))
            elif kind == "coord":
                args.append(CoordArg(**a))
            elif kind == "const":
                args.append(ConstArg(**a))
            else:
                raise ValueError(f"unknown argument kind {kind!r}")
        return cls(syms, args)

    def arg(self, name: str) -> Arg:
        for a in self.args:
            if a.name == name:
                return a
        raise KeyError(name)

    def tensors(self) -> list[TensorArg]:
        return [a for a in self.args if isinstance(a, TensorArg)]

    # ---- the bytes of each kernel parameter ----
    def params(self) -> list[Arg]:
        """The kernel's parameters, in order (host-only tensors are not among them)."""
        return [a for a in self.args if not (isinstance(a, TensorArg) and a.host_only)]

    def ctypes(self) -> list[type]:
        """The ctypes type of every kernel parameter (built once: making ctypes classes is slow)."""
        if self._ctypes is None:
            out = []
            for a in self.params():
                if isinstance(a, CoordArg):
                    out.append(a.ctype(self.symbols, self.arg(a.of)))
                else:
                    out.append(a.ctype(self.symbols))
            self._ctypes = out
        return self._ctypes

    def param_sizes(self) -> list[int]:
        return [ctypes.sizeof(t) for t in self.ctypes()]

    # ---- generated source: fake arguments for cute.compile ----
    def fake_arg_source(self, indent: str = "    ") -> str:
        """Python source (inside a function body) that builds the fake arguments, in order, as ``args``."""
        lines = []
        for s in self.symbols.values():
            fn = "cute.sym_int64" if s.width == 64 else "cute.sym_int32"
            div = f"divisibility={s.divisibility}, " if s.divisibility > 1 else ""
            lines.append(f'{s.name} = {fn}({div}symbol="{s.name}")')
        names = []
        for a in self.args:
            if isinstance(a, TensorArg):
                dt = DTYPES[a.dtype].cute
                shp = ", ".join(str(d) for d in a.shape) + ("," if len(a.shape) == 1 else "")
                std = ", ".join(str(d) for d in a.stride) + ("," if len(a.stride) == 1 else "")
                lines.append(f"{a.name} = make_fake_tensor({dt}, ({shp}), stride=({std}), assumed_align={a.align})")
            elif isinstance(a, ScalarArg):
                lines.append(f"{a.name} = {DTYPES[a.dtype].cute}(0)")
            else:
                continue   # tensor maps and TMA coordinate tensors are built by the host function
            names.append(a.name)
        lines.append(f"args = ({', '.join(names)},)")
        return "\n".join(indent + l for l in lines)

    # ---- runtime: resolve symbols from the caller's arrays and pack ----
    def resolve(self, values: Mapping[str, Any], kernel: str = "kernel") -> dict[str, int]:
        """Check every argument against the layout; return the symbol values.

        ``values`` maps argument names to array views (objects with ``ptr, shape, strides, dtype``
        attributes, strides in elements) for tensors and to Python numbers for scalars.
        """
        dims: dict[str, int] = {}
        where: dict[str, str] = {}
        missing = [a.name for a in self.args if isinstance(a, (TensorArg, ScalarArg)) and a.name not in values]
        if missing:
            raise ArgumentError(f"{kernel}: missing argument(s) {missing}")
        for a in self.args:
            if not isinstance(a, TensorArg):
                continue
            v = values[a.name]
            ctx = f"{kernel}: argument '{a.name}'"
            if v.dtype != a.dtype:
                raise ArgumentError(f"{ctx}: dtype {v.dtype} but the kernel was built for {a.dtype}")
            if len(v.shape) != len(a.shape):
                raise ArgumentError(f"{ctx}: rank {len(v.shape)} (shape {tuple(v.shape)}) but expected rank {len(a.shape)} {_fmt(a.shape)}")
            if v.ptr % a.align:
                raise ArgumentError(f"{ctx}: data pointer 0x{v.ptr:x} is not {a.align}-byte aligned")
            for i, (want, got) in enumerate(zip(a.shape, v.shape)):
                self._bind(dims, where, want, int(got), f"{ctx} shape[{i}]", ctx)
            for i, (want, got) in enumerate(zip(a.stride, v.strides)):
                if v.shape[i] == 1 and isinstance(want, int):
                    continue   # the stride of an extent-1 mode is never used
                self._bind(dims, where, want, int(got), f"{ctx} stride[{i}]", ctx)
        for a in self.args:
            if isinstance(a, ScalarArg):
                x = values[a.name]
                if a.dtype != "f32" and int(x) != x:
                    raise ArgumentError(f"{kernel}: scalar '{a.name}' must be an integer, got {x!r}")
        return dims

    def _bind(self, dims, where, want: Dim, got: int, what: str, ctx: str) -> None:
        if isinstance(want, int):
            if got != want:
                raise ArgumentError(f"{what} is {got} but the kernel was built for {want}")
            return
        sym = self.symbols[want]
        if want in dims:
            if dims[want] != got:
                raise ArgumentError(f"{what} is {got} but {want}={dims[want]} from {where[want]}")
            return
        sym.check(got, ctx)
        dims[want] = got
        where[want] = what

    def pack(self, values: Mapping[str, Any], tensormaps: Mapping[str, bytes] | None = None):
        """Return (kernelParams address, keepalive) for cuLaunchKernel."""
        bufs = []
        for a, ct in zip(self.params(), self.ctypes()):
            if isinstance(a, TensorArg):
                v = values[a.name]
                b = ct()
                b.ptr = v.ptr
                for i, d in enumerate(a.shape):
                    if isinstance(d, str):
                        setattr(b, f"shape{i}", int(v.shape[i]))
                for i, d in enumerate(a.stride):
                    if isinstance(d, str):
                        setattr(b, f"stride{i}", int(v.strides[i]))
            elif isinstance(a, ScalarArg):
                b = ct(values[a.name])
            elif isinstance(a, ConstArg):
                b = ct(a.value)
            elif isinstance(a, CoordArg):
                of, v = self.arg(a.of), values[a.of]
                b = ct()
                dyn = [int(v.shape[i]) for i, d in enumerate(of.shape) if isinstance(d, str)]
                for i, x in enumerate(dyn):
                    setattr(b, f"shape{i}", x)
            else:
                raw = (tensormaps or {})[a.name]
                b = ct.from_buffer_copy(raw)
            bufs.append(b)
        ptrs = (ctypes.c_void_p * len(bufs))(*[ctypes.addressof(b) for b in bufs])
        return ctypes.addressof(ptrs), (bufs, ptrs)


def _fmt(shape: Sequence[Dim]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _arg_to_json(a: Arg) -> dict:
    d = {k: getattr(a, k) for k in a.__dataclass_fields__}
    for k in ("shape", "stride", "box", "modes"):
        if k in d:
            d[k] = list(d[k])
    if "fixed" in d:
        d["fixed"] = [list(f) for f in d["fixed"]]
    return d


# ---- PTX entry signatures ----
_ENTRY_RE = re.compile(r"\.entry\s+(\w+)\s*\(([^)]*)\)", re.S)
_PARAM_RE = re.compile(r"\.param\s+(?:\.align\s+(\d+)\s+)?\.(\w+)\s+\w+(?:\[(\d+)\])?")
_PTX_SIZES = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2, "b32": 4, "u32": 4, "s32": 4,
              "f32": 4, "b64": 8, "u64": 8, "s64": 8, "f64": 8}


def ptx_entries(ptx: str) -> dict[str, list[int]]:
    """Map each ``.entry`` in PTX text to the byte sizes of its parameters."""
    out = {}
    for m in _ENTRY_RE.finditer(ptx):
        sizes = []
        for p in _PARAM_RE.finditer(m.group(2)):
            _, ty, n = p.groups()
            sizes.append(_PTX_SIZES[ty] * (int(n) if n else 1))
        out[m.group(1)] = sizes
    return out

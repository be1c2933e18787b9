"""mlagen.abi on the CPU: layout serialisation, the ctypes byte layout, and agreement with real PTX."""
from __future__ import annotations

import ctypes
import json
import struct

import pytest

from mlagen import families
from mlagen.abi import ArgLayout, ScalarArg, Sym, TensorArg, TensorMapArg, ptx_entries
from mlagen.runtime import DeviceArray

from cpu_helpers import ARCHES, QK_CONFIGS, param_aligns, param_loads, qk_bundle

QK = families.get("qk_rmsnorm")


def _synthetic_layout() -> ArgLayout:
    syms = {
        "A": Sym("A", 32, doc="rows"),
        "B": Sym("B", 32, 2),
        "C": Sym("C", 32),
        "L": Sym("L", 64, doc="a 64-bit extent"),
        "sa": Sym("sa", 64, 8, "row stride"),
        "sb": Sym("sb", 64, 8),
        "s32": Sym("s32", 32, 4),
    }
    args = [
        TensorArg("x", "bf16", ("A", "B", "C"), ("sa", "sb", 1), 16, "in", "rank 3, three int32 extents"),
        TensorArg("y", "f32", ("L", 64), ("s32", 1), 16, "out"),
        TensorArg("z", "u8", (128,), (1,), 16, "inout"),
        ScalarArg("n", "i32"),
        ScalarArg("big", "i64", "a 64-bit scalar"),
        ScalarArg("scale", "f32"),
        TensorMapArg("x_tma", "x", (64, 128), 128, "TMA descriptor of x"),
    ]
    return ArgLayout(syms, args)


# ------------------------------------------------------------------ serialisation
@pytest.mark.parametrize("name", list(QK_CONFIGS))
def test_qk_layout_json_round_trip(name):
    p = QK.validate(QK_CONFIGS[name])
    lay = QK.layout(p)
    text = json.dumps(lay.to_json())
    back = ArgLayout.from_json(json.loads(text))
    assert back == lay
    assert back.to_json() == lay.to_json()
    assert back.param_sizes() == lay.param_sizes()


def test_synthetic_layout_json_round_trip():
    lay = _synthetic_layout()
    back = ArgLayout.from_json(json.loads(json.dumps(lay.to_json())))
    assert back == lay
    assert back.arg("x_tma").box == (64, 128)
    assert back.arg("x").shape == ("A", "B", "C") and isinstance(back.arg("x").shape, tuple)
    assert back.symbols["L"].width == 64 and back.symbols["sa"].divisibility == 8


def test_fixed_mode_tensor_map_round_trips():
    """sm_100a's gather4 map of one cache layer: a tensor map sliced at a scalar argument."""
    from mlagen import families
    dec = families.get("mla_decode")
    lay = dec.layout(dec.validate({"sparse": True, "topk": 256, "num_heads": 64}, arch="sm_100a"))
    back = ArgLayout.from_json(json.loads(json.dumps(lay.to_json())))
    assert back == lay and back.param_sizes() == lay.param_sizes()
    g = back.arg("tma_kvg")
    assert g.fixed == ((2, "layer_idx"),) and g.box == (64, 1) and g.modes == (1, 0)
    assert "tma_kvg" not in [a.name for a in dec.layout(dec.validate({})).args]      # Hopper has none


def test_layout_rejects_undeclared_symbol_and_duplicates():
    with pytest.raises(ValueError, match="'Q'"):
        ArgLayout({}, [TensorArg("x", "f32", ("Q",), (1,))])
    with pytest.raises(ValueError, match="duplicate"):
        ArgLayout({}, [ScalarArg("a", "i32"), ScalarArg("a", "f32")])
    with pytest.raises(ValueError, match="ranks differ"):
        TensorArg("x", "f32", (4, 4), (1,))


# ------------------------------------------------------------------ ctypes byte layout
def test_ctypes_struct_offsets():
    lay = _synthetic_layout()
    x = lay.arg("x").ctype(lay.symbols)
    # ptr at 0, then the dynamic extents as int32 in mode order, then the int64 strides aligned at 8.
    assert [(f, getattr(x, f).offset) for f, _ in x._fields_] == [
        ("ptr", 0), ("shape0", 8), ("shape1", 12), ("shape2", 16), ("stride0", 24), ("stride1", 32)]
    assert ctypes.sizeof(x) == 40 and ctypes.alignment(x) == 8
    y = lay.arg("y").ctype(lay.symbols)
    assert [(f, getattr(y, f).offset, ctypes.sizeof(t)) for f, t in y._fields_] == [
        ("ptr", 0, 8), ("shape0", 8, 8), ("stride0", 16, 4)]
    assert ctypes.sizeof(y) == 24          # padded to its 8-byte alignment
    z = lay.arg("z").ctype(lay.symbols)
    assert ctypes.sizeof(z) == 8           # static shape and stride: the pointer only
    assert lay.param_sizes() == [40, 24, 8, 4, 8, 4, 128]


def _read_params(addr: int, sizes: list[int]) -> list[bytes]:
    ptrs = (ctypes.c_void_p * len(sizes)).from_address(addr)
    return [ctypes.string_at(ptrs[i], n) for i, n in enumerate(sizes)]


def test_pack_qk_rmsnorm_bytes():
    p = QK.validate({})
    lay = QK.layout(p)
    M = 5
    base = 0x7F00_0000_0000
    v = dict(
        q=DeviceArray(base + 0x1000, (M, 1536), (1600, 1), "bf16", device=0),
        k=DeviceArray(base + 0x20000, (M, 512), (520, 1), "bf16", device=0),
        gamma_q=DeviceArray(base + 0x30000, (1536,), (1,), "f32", device=0),
        gamma_k=DeviceArray(base + 0x40000, (512,), (1,), "f32", device=0),
        qk_var=DeviceArray(base + 0x50004, (M, 2), (3, 1), "f32", device=0),
        q_out=DeviceArray(base + 0x60000, (M, 1536), (1536, 1), "bf16", device=0),
        k_out=DeviceArray(base + 0x70000, (M, 512), (512, 1), "bf16", device=0),
        eps=1e-6,
    )
    dims = lay.resolve(v, "qk")
    assert dims == dict(M=M, sq=1600, sk=520, sv=3, sqo=1536, sko=512)
    addr, keep = lay.pack(v)
    raw = _read_params(addr, lay.param_sizes())
    assert [len(b) for b in raw] == [24, 24, 8, 8, 24, 24, 24, 4]
    for i, (name, stride) in enumerate([("q", 1600), ("k", 520)]):
        b = raw[i]
        assert struct.unpack_from("<Q", b, 0)[0] == v[name].ptr        # pointer at offset 0
        assert struct.unpack_from("<i", b, 8)[0] == M                   # int32 extent M right after it
        assert struct.unpack_from("<q", b, 16)[0] == stride             # int64 row stride, 8-aligned
    assert struct.unpack_from("<Q", raw[2], 0)[0] == v["gamma_q"].ptr   # static tensors: pointer only
    assert struct.unpack_from("<Q", raw[3], 0)[0] == v["gamma_k"].ptr
    assert struct.unpack_from("<Qi", raw[4], 0) == (v["qk_var"].ptr, M)
    assert struct.unpack_from("<q", raw[4], 16)[0] == 3
    assert struct.unpack_from("<f", raw[7], 0)[0] == pytest.approx(1e-6, rel=1e-7)
    del keep


def test_pack_synthetic_bytes_and_tensormap():
    lay = _synthetic_layout()
    v = dict(
        x=DeviceArray(0x1000, (3, 4, 5), (160, 40, 1), "bf16", device=0),
        y=DeviceArray(0x2000, (7, 64), (68, 1), "f32", device=0),
        z=DeviceArray(0x3000, (128,), (1,), "u8", device=0),
        n=-3, big=2 ** 40 + 1, scale=0.5,
    )
    lay.resolve(v, "synthetic")
    tma = bytes(range(128))
    addr, keep = lay.pack(v, tensormaps={"x_tma": tma})
    raw = _read_params(addr, lay.param_sizes())
    assert struct.unpack_from("<Q3i", raw[0], 0) == (0x1000, 3, 4, 5)
    assert struct.unpack_from("<2q", raw[0], 24) == (160, 40)
    assert struct.unpack_from("<Qqi", raw[1], 0) == (0x2000, 7, 68)
    assert struct.unpack_from("<Q", raw[2], 0)[0] == 0x3000
    assert struct.unpack("<i", raw[3])[0] == -3
    assert struct.unpack("<q", raw[4])[0] == 2 ** 40 + 1
    assert struct.unpack("<f", raw[5])[0] == 0.5
    assert raw[6] == tma
    del keep


# ------------------------------------------------------------------ PTX parsing
def test_ptx_entries_parses_params():
    ptx = """
.visible .entry kern_a(
\t.param .align 8 .b8 kern_a_param_0[24],
\t.param .u64 kern_a_param_1,
\t.param .f32 kern_a_param_2,
\t.param .align 64 .b8 kern_a_param_3[128]
)
{ ret; }
.visible .entry kern_b()
{ ret; }
"""
    assert ptx_entries(ptx) == {"kern_a": [24, 8, 4, 128], "kern_b": []}


# ------------------------------------------------------------------ against compiled kernels
CASES = [(n, a) for n in QK_CONFIGS for a in ARCHES]


@pytest.mark.compile
@pytest.mark.parametrize("name,arch", CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_param_sizes_match_compiled_ptx(name, arch):
    b = qk_bundle(QK_CONFIGS[name], arch)
    ptx = (b / "kernel.ptx").read_text()
    entries = ptx_entries(ptx)
    assert len(entries) == 1
    lay = QK.layout(QK.validate(QK_CONFIGS[name], arch))
    assert list(entries.values())[0] == lay.param_sizes()
    # Each by-value struct is declared with the alignment of its ctypes twin.
    aligns = param_aligns(ptx)
    for i, a in enumerate(lay.args):
        ct = a.ctype(lay.symbols)
        if isinstance(a, TensorArg):
            assert aligns[i] == ctypes.alignment(ct), f"param {i} ({a.name})"


@pytest.mark.compile
@pytest.mark.parametrize("name,arch", CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_param_field_offsets_match_compiled_ptx(name, arch):
    """Every ld.param of the kernel reads exactly one field of the ctypes struct (offset and width)."""
    b = qk_bundle(QK_CONFIGS[name], arch)
    ptx = (b / "kernel.ptx").read_text()
    lay = QK.layout(QK.validate(QK_CONFIGS[name], arch))
    loads = param_loads(ptx)
    assert loads, "no ld.param found in the PTX"
    seen = set()
    for idx, off, size, n in loads:
        a = lay.args[idx]
        ct = a.ctype(lay.symbols)
        if isinstance(a, TensorArg):
            fields = {getattr(ct, f).offset: (f, ctypes.sizeof(t)) for f, t in ct._fields_}
        else:
            fields = {0: (a.name, ctypes.sizeof(ct))}
        for e in range(n):
            o = off + e * size
            assert o in fields, f"{a.name}: PTX reads offset {o}, fields are at {sorted(fields)}"
            assert fields[o][1] == size, f"{a.name}.{fields[o][0]}: PTX reads {size} bytes, field has {fields[o][1]}"
            seen.add((a.name, fields[o][0]))
    # The kernel reads every pointer, the row count and every dynamic row stride it uses.
    for t in ("q", "k", "gamma_q", "gamma_k", "qk_var", "q_out", "k_out"):
        assert (t, "ptr") in seen
    assert ("q", "shape0") in seen and ("q", "stride0") in seen and ("eps", "eps") in seen

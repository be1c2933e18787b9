"""act_quant_fp8: quantise activations to fp8 e4m3 with one float32 scale per 1 x ``group`` block.

    scale[m, j] = max(amax(x[m, j*G:(j+1)*G]), 1e-12) / 448
    q[m, k]     = cast_e4m3(clamp(x[m, k] * (1 / scale[m, k // G]), -448, 448))     (1/scale correctly rounded)

This is the activation side of DeepSeek's 1x128 x 128x128 recipe, feeding ``fp8_gemm``: MLA's q_nope
``[T, H, 128]`` and the attention output ``[T, H, 512]`` are rows of a ``[T*H, K]`` view; the scales come
out as ``[rows, K/G]`` with any strides (``fp8_gemm`` takes them as ``sa``).

Work decomposition: ``G / VEC`` lanes share a block (one 16-byte load each); the block amax is a
shuffle reduction over those lanes; ``warps`` warps per CTA.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ...abi import DTYPES, ArgLayout, Sym, TensorArg
from ...numerics import FP8_E4M3_MAX, quantize_fp8_rows, round_to
from ..base import Family, Param, Problem


class ActQuantFP8(Family):
    name = "act_quant_fp8"
    template = "act_quant_fp8.py.j2"
    doc = "per-1xG-block fp8 e4m3 quantisation of activations (scales = amax/448), for fp8_gemm"
    params = (
        Param("dtype", "bf16", choices=("bf16", "f16", "f32"), doc="input dtype"),
        Param("group", 128, choices=(32, 64, 128), doc="elements per scale block"),
        Param("warps", 4, choices=(1, 2, 4, 8, 16), doc="warps per CTA"),
    )
    shape_params = ("dtype", "group")
    bucket_dims = ("M", "K")

    def vec(self, p) -> int:
        return 16 // DTYPES[p["dtype"]].itemsize

    def constraints(self, p, arch):
        lpg = p["group"] // self.vec(p)
        if lpg > 32 or 32 % lpg:
            return [f"group={p['group']} of {p['dtype']} needs {lpg} lanes per block; it must divide 32"]
        return []

    def layout(self, p) -> ArgLayout:
        g, vec = p["group"], self.vec(p)
        syms = {s.name: s for s in [
            Sym("M", 32, doc="rows"), Sym("K", 32, g, "row length (multiple of the group)"),
            Sym("KB", 32, doc="blocks per row (K / group)"),
            Sym("sx", 64, vec, "x row stride"), Sym("sq", 64, 16, "q row stride"),
            Sym("ssm", 64, doc="scale row stride"), Sym("ssk", 64, doc="scale block stride"),
        ]}
        args = [
            TensorArg("x", p["dtype"], ("M", "K"), ("sx", 1), 16, "in"),
            TensorArg("q", "f8e4m3", ("M", "K"), ("sq", 1), 16, "out"),
            TensorArg("scales", "f32", ("M", "KB"), ("ssm", "ssk"), 4, "out"),
        ]
        return ArgLayout(syms, args)

    def derive_dims(self, p, dims):
        """Output sizes the inputs do not show: blocks per row."""
        return {"KB": dims["K"] // p["group"]} if "K" in dims else {}

    def check_call(self, p, views, dims, contents: bool = True):
        from ...abi import ArgumentError
        if dims["KB"] != dims["K"] // p["group"]:
            raise ArgumentError(f"{self.name}: 'scales' has {dims['KB']} blocks per row but K={dims['K']} "
                                f"needs {dims['K'] // p['group']}")

    def block(self, p):
        return (32 * p["warps"], 1, 1)

    def grid(self, p, dims):
        bpc = (32 // (p["group"] // self.vec(p))) * p["warps"]
        blocks = dims["M"] * (dims["K"] // p["group"])
        return (max(1, -(-blocks // bpc)), 1, 1)

    def template_context(self, p, arch):
        return dict(vec=self.vec(p), in_cute=DTYPES[p["dtype"]].cute, **p)

    def kernel_name(self, p):
        return f"act_quant_fp8_{p['dtype']}_g{p['group']}_w{p['warps']}"

    def bytes_moved(self, p, dims):
        m, k = dims["M"], dims["K"]
        return m * k * (DTYPES[p["dtype"]].itemsize + 1) + 4 * m * (k // p["group"])

    def bytes_written(self, p, dims):
        m, k = dims["M"], dims["K"]
        return m * k + 4 * m * (k // p["group"])

    def make_problem(self, p, dims: Mapping[str, int], rng: np.random.Generator) -> Problem:
        m, k = int(dims["M"]), int(dims["K"])
        x = rng.standard_normal((m, k)) * np.exp(rng.uniform(-3, 3, (m, 1)))   # rows of very different scale
        if m > 2:
            x[1, : p["group"]] = 0.0                                            # an all-zero block
        return Problem(dict(M=m, K=k), dict(x=round_to(x, p["dtype"])))

    def reference(self, p, inputs) -> dict:
        """float32, the kernel's exact recipe: bit-identical fp8 codes and scales are expected."""
        q, scale = quantize_fp8_rows(inputs["x"], p["group"])
        return {"q": q, "scales": scale}

    # ---------------- benchmark companions ----------------
    bench_shapes = [dict(M=m, K=k) for m, k in ((128 * 16, 128), (128 * 128, 128), (64 * 128, 512),
                                                 (4096, 7168), (16384, 7168))]

    def torch_impl(self, p, t):
        import torch
        x = t["x"].float()
        m, k = x.shape
        blk = x.view(m, k // p["group"], p["group"])
        scale = blk.abs().amax(-1).clamp_min(1e-12) / FP8_E4M3_MAX
        t["q"].copy_((blk * (1.0 / scale)[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).view(m, k)
                     .to(torch.float8_e4m3fn))
        t["scales"].copy_(scale)

    def bench_outputs(self, p, t):
        m, k = t["q"].shape
        deq = t["q"].float().view(m, k // p["group"], p["group"]) * t["scales"][..., None]
        return {"dequantised": deq.view(m, k)}


family = ActQuantFP8()

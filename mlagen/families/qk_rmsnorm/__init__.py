"""qk_rmsnorm: apply QK-RMSNorm from precomputed per-row statistics, q and k in one launch.

    q_out[m, :] = cast((cast(q[m, :], f32) * rsqrt(qk_var[m, 0] + eps)) * gamma_q, out_dtype)
    k_out[m, :] = cast((cast(k[m, :], f32) * rsqrt(qk_var[m, 1] + eps)) * gamma_k, out_dtype)

qk_var holds mean(q^2) and mean(k^2) of each row, as a GEMM epilogue produces them (DeepSeek's
q_a_layernorm / kv_a_layernorm over q_lora_rank 1536 and kv_lora_rank 512 are the default widths).
With ``rsqrt="ieee"`` the kernel computes 1/sqrt with correctly rounded sqrt and division and matches
the numpy reference bit for bit; ``rsqrt="approx"`` uses rsqrt.approx (within 2 ulp).

Work decomposition: ``threads_per_row`` threads share a row, each owning ``(NQ+NK)/VEC/threads_per_row``
16-byte vectors at a stride of ``threads_per_row`` vectors (coalesced); ``threads_per_row`` divides the
q and the k vector counts so every vector slot of a thread is statically q or k.  All loads of a thread
are issued before its first store.  ``rows_per_cta`` rows share a CTA.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from ...abi import DTYPES, ArgLayout, ScalarArg, Sym, TensorArg
from ...numerics import NP_DTYPE, round_to
from ..base import Family, Param, Problem


class QKRMSNorm(Family):
    name = "qk_rmsnorm"
    template = "qk_rmsnorm.py.j2"
    doc = "QK-RMSNorm apply from precomputed per-row mean squares; q and k in one launch"
    params = (
        Param("dtype", "bf16", choices=("bf16", "f16", "f32"), doc="q/k input dtype"),
        Param("out_dtype", "bf16", choices=("bf16", "f16", "f32"), doc="output dtype"),
        Param("nq", 1536, lo=1, hi=65536, doc="q row length"),
        Param("nk", 512, lo=1, hi=65536, doc="k row length"),
        Param("threads_per_row", 64, choices=(8, 16, 32, 64, 128, 256), doc="threads sharing one row"),
        Param("rows_per_cta", 2, choices=(1, 2, 4, 8, 16), doc="rows per CTA"),
        Param("rsqrt", "ieee", choices=("ieee", "approx"), doc="1/sqrt rounding: ieee (bit-exact) or approx"),
    )
    shape_params = ("dtype", "out_dtype", "nq", "nk")
    bucket_dims = ("M",)

    def prefer(self, kernels, dims):
        """Small batches: one row per CTA (more CTAs); large: the measured best (64 threads, 1-2 rows)."""
        want_rows = 1 if dims["M"] < 4096 else 2
        return min(kernels, key=lambda k: (abs(k.params["rows_per_cta"] - want_rows), k.params["threads_per_row"] != 64))

    def vec(self, p) -> int:
        return 16 // DTYPES[p["dtype"]].itemsize

    def constraints(self, p, arch):
        errs = []
        vec = self.vec(p)
        for n in ("nq", "nk"):
            if p[n] % vec:
                errs.append(f"{n}={p[n]} is not a multiple of {vec} elements (16-byte vectors of {p['dtype']})")
        if not errs:
            vq, vk = p["nq"] // vec, p["nk"] // vec
            if vq % p["threads_per_row"] or vk % p["threads_per_row"]:
                errs.append(f"threads_per_row={p['threads_per_row']} must divide both vector counts "
                            f"({vq} q, {vk} k); try a divisor of {math.gcd(vq, vk)}")
            elif (vq + vk) // p["threads_per_row"] > 32:
                errs.append(f"{(vq + vk) // p['threads_per_row']} vectors per thread is over 32 (registers); "
                            "raise threads_per_row")
        return errs

    def layout(self, p) -> ArgLayout:
        vec = self.vec(p)
        ovec = 16 // DTYPES[p["out_dtype"]].itemsize
        dt, odt = p["dtype"], p["out_dtype"]
        syms = {
            "M": Sym("M", 32, doc="rows (tokens)"),
            "sq": Sym("sq", 64, vec, "row stride of q"),
            "sk": Sym("sk", 64, vec, "row stride of k"),
            "sv": Sym("sv", 64, 1, "row stride of qk_var"),
            "sqo": Sym("sqo", 64, ovec, "row stride of q_out"),
            "sko": Sym("sko", 64, ovec, "row stride of k_out"),
        }
        nq, nk = p["nq"], p["nk"]
        args = [
            TensorArg("q", dt, ("M", nq), ("sq", 1), 16, "in"),
            TensorArg("k", dt, ("M", nk), ("sk", 1), 16, "in"),
            TensorArg("gamma_q", "f32", (nq,), (1,), 16, "in"),
            TensorArg("gamma_k", "f32", (nk,), (1,), 16, "in"),
            TensorArg("qk_var", "f32", ("M", 2), ("sv", 1), 4, "in"),
            TensorArg("q_out", odt, ("M", nq), ("sqo", 1), 16, "out"),
            TensorArg("k_out", odt, ("M", nk), ("sko", 1), 16, "out"),
            ScalarArg("eps", "f32"),
        ]
        return ArgLayout(syms, args)

    def block(self, p):
        return (p["threads_per_row"] * p["rows_per_cta"], 1, 1)

    def grid(self, p, dims):
        return (max(1, -(-dims["M"] // p["rows_per_cta"])), 1, 1)

    def template_context(self, p, arch):
        return dict(vec=self.vec(p), out_cute=DTYPES[p["out_dtype"]].cute, **p)

    def kernel_name(self, p):
        return (f"qk_rmsnorm_{p['dtype']}_{p['out_dtype']}_q{p['nq']}_k{p['nk']}"
                f"_t{p['threads_per_row']}_r{p['rows_per_cta']}_{p['rsqrt']}")

    # ---------------- numbers ----------------
    def bytes_moved(self, p, dims):
        m = dims["M"]
        i, o = DTYPES[p["dtype"]].itemsize, DTYPES[p["out_dtype"]].itemsize
        n = p["nq"] + p["nk"]
        return m * n * (i + o) + m * 8 + n * 4

    def bytes_written(self, p, dims):
        return dims["M"] * (p["nq"] + p["nk"]) * DTYPES[p["out_dtype"]].itemsize

    def make_problem(self, p, dims: Mapping[str, int], rng: np.random.Generator) -> Problem:
        m, nq, nk = dims["M"], p["nq"], p["nk"]
        q = round_to(rng.standard_normal((m, nq)) * 2.0, p["dtype"])
        k = round_to(rng.standard_normal((m, nk)) * 0.5, p["dtype"])
        qf, kf = q.astype(np.float32), k.astype(np.float32)
        var = np.stack([np.mean(qf * qf, axis=1), np.mean(kf * kf, axis=1)], axis=1).astype(np.float32)
        gq = (1.0 + 0.1 * rng.standard_normal(nq)).astype(np.float32)
        gk = (1.0 + 0.1 * rng.standard_normal(nk)).astype(np.float32)
        return Problem(dict(M=m), dict(q=q, k=k, gamma_q=gq, gamma_k=gk, qk_var=var, eps=1e-6))

    def reference(self, p, inputs: Mapping) -> dict:
        """numpy float32 with the kernel's grouping; for rsqrt='ieee' it is bit-exact."""
        eps = np.float32(inputs["eps"])
        var = inputs["qk_var"].astype(np.float32)
        out = {}
        for x, g, col, name in (("q", "gamma_q", 0, "q_out"), ("k", "gamma_k", 1, "k_out")):
            r = np.float32(1.0) / np.sqrt(var[:, col] + eps)          # float32 ops, correctly rounded
            y = (inputs[x].astype(np.float32) * r[:, None]) * inputs[g][None, :]
            out[name] = y.astype(NP_DTYPE[p["out_dtype"]])
        return out

    def reference_f64(self, p, inputs: Mapping) -> dict:
        var = inputs["qk_var"].astype(np.float64)
        eps = float(inputs["eps"])
        return {
            "q_out": inputs["q"].astype(np.float64) / np.sqrt(var[:, :1] + eps) * inputs["gamma_q"],
            "k_out": inputs["k"].astype(np.float64) / np.sqrt(var[:, 1:] + eps) * inputs["gamma_k"],
        }

    # ---------------- benchmark companions ----------------
    bench_shapes = [dict(M=1), dict(M=64), dict(M=1024), dict(M=16384), dict(M=65536)]

    def torch_impl(self, p, t):
        """The same math in torch (float32 compute), writing into t['q_out'] / t['k_out']."""
        import torch
        var, eps = t["qk_var"], t["eps"]
        t["q_out"].copy_((t["q"].float() * torch.rsqrt(var[:, 0:1] + eps)) * t["gamma_q"])
        t["k_out"].copy_((t["k"].float() * torch.rsqrt(var[:, 1:2] + eps)) * t["gamma_k"])

    def bench_outputs(self, p, t):
        return {"q_out": t["q_out"].float(), "k_out": t["k_out"].float()}


family = QKRMSNorm()

"""mla_combine: the combine step of split-KV MLA decode (see the package docstring).

``o_part[r, :, p, b]`` is partition p's output normalised by its own softmax sum and
``lse_part[r, p, b]`` its log2-sum-exp (-inf for an empty partition).  The result is
``out = sum_p 2^(lse_p - M) o_p / (sum_p 2^(lse_p - M) [+ 2^(sink*log2 e - M)])`` in bf16 and the
natural-log LSE.  ``col_splits`` warps per row: each finds the largest partial LSE (lanes stride over
partitions), then every lane accumulates 16 / col_splits of the 512 dims over the partitions.

``out_dtype="f8e4m3"`` fuses the activation quantisation that feeds ``fp8_gemm`` (the decode branch's
``@ w_uv``): instead of bf16 the kernel writes fp8 e4m3 codes and one float32 scale per 1 x 128 block,
exactly as ``act_quant_fp8`` would quantise the bf16 output (the row is rounded to bf16 first, then
``scale = max(amax, 1e-12) / 448``, ``q = cast(clamp(y * (1 / scale)))``).  A 128-element block is one
4-element vector of each of the 32 lanes, so its amax is one warp reduction.
"""
from __future__ import annotations

import numpy as np

from ...abi import ArgLayout, Sym, TensorArg
from ..base import Family, Param, Problem

DV = 512
QBLOCK = 128          # elements per fp8 scale of the quantised output


class MLACombine(Family):
    name = "mla_combine"
    template = "mla_combine.py.j2"
    doc = "combine step of split-KV MLA decode: LSE-weighted merge of partial outputs (+ attention sink)"
    params = (
        Param("num_heads", 128, choices=(16, 32, 64, 128), doc="query heads"),
        Param("q_len", 1, choices=(1, 2, 3, 4), doc="queries per sequence"),
        Param("attn_sink", False, doc="per-head sink logit added to the denominator"),
        Param("warps", 4, choices=(1, 2, 4, 8), doc="warps per CTA"),
        Param("col_splits", 4, choices=(1, 2, 4), doc="warps per row, each merging 512 / col_splits columns "
                                                      "(4: four times the parallelism for small batches)"),
        Param("part_unroll", 4, choices=(1, 2, 4, 8), doc="partitions whose loads are issued together"),
        Param("part_splits", 1, choices=(1, 2, 4, 8),
              doc="warps per (row, column chunk), each merging every part_splits-th group of partitions; "
                  "their sums meet in shared memory (more loads in flight for few rows and many partitions)"),
        Param("out_dtype", "bf16", choices=("bf16", "f8e4m3"),
              doc="f8e4m3: write fp8 codes + 1x128 scales (the act_quant_fp8 recipe) instead of bf16"),
    )
    shape_params = ("num_heads", "q_len", "attn_sink", "out_dtype")
    # decode steps: one long sequence cut into many partitions ... a full batch with a few
    bench_shapes = [dict(B=1, NPART=64), dict(B=1, NPART=16), dict(B=8, NPART=16), dict(B=32, NPART=4),
                    dict(B=128, NPART=2)]
    bucket_dims = ("B", "NPART")

    def layout(self, p) -> ArgLayout:
        R = p["num_heads"] * p["q_len"]
        syms = {s.name: s for s in [
            Sym("NPART", 32, doc="KV partitions"), Sym("B", 32, doc="sequences"),
            Sym("spr", 64, 4, "o_part row stride"), Sym("spp", 64, 4, "o_part partition stride"),
            Sym("spb", 64, 4, "o_part batch stride"),
            Sym("sxr", 64, 1, "lse_part row stride"), Sym("sxp", 64, 1, "lse_part partition stride"),
            Sym("sxb", 64, 1, "lse_part batch stride"),
            Sym("sor", 64, 4, "out row stride"), Sym("sob", 64, 4, "out batch stride"),
            Sym("slr", 64, 1, "lse row stride"), Sym("slb", 64, 1, "lse batch stride"),
            Sym("ssr", 64, 1, "out_scales row stride"), Sym("ssk", 64, 1, "out_scales block stride"),
            Sym("ssb", 64, 1, "out_scales batch stride"),
        ]}
        fp8 = p["out_dtype"] == "f8e4m3"
        args = [
            TensorArg("o_part", "f32", (R, DV, "NPART", "B"), ("spr", 1, "spp", "spb"), 16, "in"),
            TensorArg("lse_part", "f32", (R, "NPART", "B"), ("sxr", "sxp", "sxb"), 4, "in"),
        ]
        if p["attn_sink"]:
            args.append(TensorArg("attn_sink", "f32", (p["num_heads"],), (1,), 4, "in"))
        args += [
            TensorArg("out", p["out_dtype"], (R, DV, "B"), ("sor", 1, "sob"), 4 if fp8 else 8, "out"),
            TensorArg("lse", "f32", (R, "B"), ("slr", "slb"), 4, "out"),
        ]
        if fp8:
            args.append(TensorArg("out_scales", "f32", (R, DV // QBLOCK, "B"), ("ssr", "ssk", "ssb"), 4, "out",
                                  "float32 scale per 1 x 128 block of out"))
        return ArgLayout(syms, args)

    def constraints(self, p, arch):
        if p["warps"] % p["part_splits"]:
            return [f"warps={p['warps']} is not a multiple of part_splits={p['part_splits']} (a CTA holds whole "
                    "groups of a task's warps)"]
        return []

    def smem_bytes(self, p):
        acc = DV // p["col_splits"] // 32
        return 0 if p["part_splits"] == 1 else p["warps"] * (32 * acc + 1) * 4 + 32

    def prefer(self, kernels, dims):
        """Without a tuned entry: split the partitions over warps when rows x column chunks leave the GPU
        mostly idle (small batch) and there are many partitions to merge; one warp per task otherwise.
        Read off the H100 rows at 9ccbb5f: B=1 with 64 partitions 24.2 -> 13.8 us (H=128) and 20.5 -> 8.3 us
        (H=16) at part_splits 8; 16 partitions best at 4; from 4096 tasks on (B=8 at H=128), or with 4
        partitions or fewer, splitting only adds the shared-memory step."""
        def want(k):
            p = k.params
            tasks = dims.get("B", 1) * p["num_heads"] * p["q_len"] * p["col_splits"]
            nparts = dims.get("NPART", 1)
            ps = 1 if tasks >= 4096 else max(1, min(8, nparts // 4))
            return (abs(p["part_splits"] - ps), -p["col_splits"], abs(p["part_unroll"] - 4), abs(p["warps"] - 4))
        return min(kernels, key=want)

    def block(self, p):
        return (32 * p["warps"], 1, 1)

    def grid(self, p, dims):
        R = p["num_heads"] * p["q_len"]
        return (-(-R * p["col_splits"] // (p["warps"] // p["part_splits"])), dims["B"], 1)

    def kernel_name(self, p):
        return (f"mla_combine_h{p['num_heads']}_q{p['q_len']}" + ("_sink" if p["attn_sink"] else "")
                + ("_fp8out" if p["out_dtype"] == "f8e4m3" else "") + f"_w{p['warps']}"
                + (f"_cs{p['col_splits']}" if p["col_splits"] != 1 else "") + f"_u{p['part_unroll']}"
                + (f"_ps{p['part_splits']}" if p["part_splits"] != 1 else ""))

    def template_context(self, p, arch):
        return dict(p, fp8_out=p["out_dtype"] == "f8e4m3", qblock=QBLOCK)

    @staticmethod
    def _out_row_bytes(p):
        """One merged output row and its LSE: bf16, or fp8 codes with their 1 x QBLOCK scales."""
        return (DV * 2 if p["out_dtype"] == "bf16" else DV + 4 * (DV // QBLOCK)) + 4

    def bytes_moved(self, p, dims):
        R = p["num_heads"] * p["q_len"]
        return dims["B"] * R * (dims["NPART"] * (DV * 4 + 4) + self._out_row_bytes(p))

    def bytes_written(self, p, dims):
        return dims["B"] * p["num_heads"] * p["q_len"] * self._out_row_bytes(p)

    def make_problem(self, p, dims, rng) -> Problem:
        """Random partials; some partitions empty (lse -inf, o_part NaN: an empty partition's values must
        never be read)."""
        R = p["num_heads"] * p["q_len"]
        B, P = int(dims["B"]), int(dims["NPART"])
        o = rng.standard_normal((B, P, R, DV)).astype(np.float32)
        lse = rng.uniform(-5, 20, (B, P, R)).astype(np.float32)
        empty = rng.random((B, P, R)) < 0.2
        lse[empty] = -np.inf
        o[empty] = np.nan
        if B > 1:
            lse[-1] = -np.inf          # a sequence with nothing at all
            o[-1] = np.nan
        inputs = dict(o_part=o, lse_part=lse)
        if p["attn_sink"]:
            inputs["attn_sink"] = rng.uniform(-1, 3, p["num_heads"]).astype(np.float32)
        return Problem(dict(B=B, NPART=P), inputs)

    # ---------------- benchmark companions ----------------
    def torch_inputs(self, p, prob) -> dict:
        """CUDA tensors as the decode writes them: o_part (B, P, R, 512) viewed as (R, 512, P, B), and so on."""
        import torch
        from ...interop import to_torch
        x = prob.inputs
        B, P, R, _ = x["o_part"].shape
        fp8 = p["out_dtype"] == "f8e4m3"
        out = torch.empty((B, R, DV), dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16, device="cuda")
        t = dict(o_part=to_torch(x["o_part"], "f32").permute(2, 3, 1, 0),
                 lse_part=to_torch(x["lse_part"], "f32").permute(2, 1, 0),
                 out=out.permute(1, 2, 0),
                 lse=torch.empty((B, R), dtype=torch.float32, device="cuda").permute(1, 0))
        if p["attn_sink"]:
            t["attn_sink"] = to_torch(x["attn_sink"], "f32")
        if fp8:
            t["out_scales"] = torch.empty((B, R, DV // QBLOCK), dtype=torch.float32, device="cuda").permute(1, 2, 0)
        return t

    def torch_impl(self, p, t):
        """The merge in torch float32 ops (the act_quant_fp8 recipe for an fp8 output)."""
        import torch
        lse2, o = t["lse_part"], t["o_part"]                      # (R, P, B), (R, 512, P, B)
        allv = lse2
        if p["attn_sink"]:
            sink2 = t["attn_sink"].repeat(p["q_len"]) * (1.0 / np.log(2.0))
            allv = torch.cat([lse2, sink2[:, None, None].expand(-1, 1, lse2.shape[2])], 1)
        mx = allv.amax(1)
        mu = torch.where(torch.isneginf(mx), torch.zeros_like(mx), mx)
        w = torch.exp2(lse2 - mu[:, None, :])
        den = torch.exp2(allv - mu[:, None, :]).sum(1)
        num = torch.einsum("rpb,rdpb->rdb", w, torch.where(w[:, None] > 0, o, torch.zeros_like(o)))
        out = torch.where(den[:, None] > 0, num / den[:, None], torch.zeros_like(num))
        t["lse"].copy_((mu + torch.log2(den)) * float(np.log(2.0)))
        if p["out_dtype"] == "f8e4m3":     # act_quant_fp8's recipe on the bf16-rounded rows (B, R) x 512
            from ..act_quant_fp8 import family as act_quant
            rows = out.to(torch.bfloat16).permute(2, 0, 1).reshape(-1, DV)
            act_quant.torch_impl(dict(group=QBLOCK), dict(x=rows, q=t["out"].permute(2, 0, 1).view(-1, DV),
                                                          scales=t["out_scales"].permute(2, 0, 1).view(-1, DV // QBLOCK)))
        else:
            t["out"].copy_(out.to(torch.bfloat16))

    def bench_outputs(self, p, t):
        o = t["out"].float()
        if p["out_dtype"] == "f8e4m3":
            R, _, B = o.shape
            o = (o.view(R, DV // QBLOCK, QBLOCK, B) * t["out_scales"][:, :, None]).view(R, DV, B)
        return {"out": o}

    def baseline_desc(self, p):
        return "torch: exp2-weighted einsum over partitions, float32"

    def reference(self, p, inputs, precision="f64") -> dict:
        o = inputs["o_part"].astype(np.float64)
        lse2 = inputs["lse_part"].astype(np.float64)               # log2 units
        B, P, R, _ = o.shape
        parts = [lse2]
        if p["attn_sink"]:
            sink2 = np.tile(inputs["attn_sink"].astype(np.float64), p["q_len"]) / np.log(2.0)
            parts.append(np.broadcast_to(sink2[None, None, :], (B, 1, R)))
        allv = np.concatenate(parts, axis=1)
        mx = allv.max(axis=1)
        mu = np.where(np.isneginf(mx), 0.0, mx)
        w = np.exp2(lse2 - mu[:, None, :])
        den = np.exp2(allv - mu[:, None, :]).sum(axis=1)
        num = np.einsum("bpr,bprd->brd", w, np.where(w[..., None] > 0, o, 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(den[..., None] > 0, num / den[..., None], 0.0)
            lse = (mu + np.log2(den)) * np.log(2.0)
        res = {"out": out, "lse": lse}
        if p["out_dtype"] == "f8e4m3":     # the codes act_quant_fp8 makes of the bf16-rounded output
            from ...numerics import quantize_fp8_rows, round_to
            res["out_q"], res["out_scales"] = quantize_fp8_rows(round_to(out, "bf16"), QBLOCK)
        return res



family = MLACombine()

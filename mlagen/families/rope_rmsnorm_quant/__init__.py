"""rope_rmsnorm_quant: MLA's fused RoPE + RMSNorm + quantization of new latent tokens into a paged cache.

For every new token t of a ragged batch (sequence b with ``input_row_offsets[b] <= t < input_row_offsets[b+1]``)
at absolute position ``pos = cache_lengths[b] + t - input_row_offsets[b]``:

* ``q_rope_out[t, h] = rope(q_rope[t, h], pos)`` for every head h;
* the latent row ``kv_input[t] = [c (kv_lora_rank) | k_rope (rope_dim)]`` becomes
  ``[rmsnorm(c) * gamma | rope(k_rope, pos)]`` and is written to
  ``kv_cache[layer_idx, page_table[b, pos // page_size], pos % page_size, 0, :]``,
  as bf16, or as fp8 e4m3 with one float32 scale per ``quant_granularity`` elements
  (``scale = amax / 448``, ``q = cast(y * (1 / scale))``; scales stored in ``kv_scales``, paged like the cache).

RoPE: ``freqs_cis[pos]`` holds (cos_i, sin_i) pairs for i < rope_dim/2; ``rope_layout`` chooses which
elements form pair i: ``interleaved`` = (2i, 2i+1) (DeepSeek's original), ``half`` = (i, i + rope_dim/2) (NeoX).

Work decomposition: one warp per token; grid.y = ``head_splits`` CTAs share a token's q heads, split 0
also writes the cache row.  A lane owns 8 contiguous rope elements (16 bytes) of ``32 / (rope_dim/8)``
heads per pass and 16 latent elements (two 16-byte chunks, lane and lane+32) of the cache row; the RMS
sum and the fp8 block amax are warp shuffles.  The token's sequence is found by a binary search over the
row offsets.  In the kernel, a token whose position is past ``freqs_cis`` or whose page index is out of
range writes nothing; the host-side content check (on by default in ``Kernel.__call__``) reports them.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ...abi import DTYPES, ArgLayout, ArgumentError, ScalarArg, Sym, TensorArg
from ...numerics import FP8_E4M3_MAX, NP_DTYPE, quantize_fp8, quantize_fp8_rows, round_to
from ...interop import host_copy
from ..base import Family, Param, Problem, random_page_table

NOPE = 128            # q_nope width per head: one fp8 scale block (q_nope_quant)


class RopeRMSNormQuant(Family):
    name = "rope_rmsnorm_quant"
    template = "rope_rmsnorm_quant.py.j2"
    doc = "MLA fused RoPE + RMSNorm + bf16/fp8 quantization of new latent tokens into a paged KV cache"
    params = (
        Param("kv_lora_rank", 512, choices=(256, 512, 768, 1024), doc="latent width (RMS-normalised)"),
        Param("rope_dim", 64, choices=(32, 64, 128), doc="rotary width"),
        Param("num_heads", 128, lo=1, hi=1024, doc="q heads (128 for DeepSeek-V3, 16 per GPU at TP8)"),
        Param("page_size", 64, lo=1, hi=4096, doc="tokens per cache page"),
        Param("cache_dtype", "bf16", choices=("bf16", "f8e4m3"), doc="cache element type"),
        Param("quant_granularity", 64, choices=(8, 16, 32, 64, 128, 320, 576, 1088, 1152),
              doc="elements per fp8 scale: a divisor of rope_dim (multiple of 8) or the whole row"),
        Param("rope_layout", "interleaved", choices=("interleaved", "half"), doc="rotary pair layout"),
        Param("gamma_dtype", "bf16", choices=("bf16", "f32"), doc="RMSNorm weight dtype"),
        Param("tokens_per_cta", 4, choices=(1, 2, 4, 8, 16), doc="warps (tokens) per CTA"),
        Param("head_splits", 1, choices=(1, 2, 4, 8, 16, 32), doc="CTAs along y sharing a token's q heads"),
        Param("q_unroll", 4, choices=(1, 2, 4, 8), doc="q rope passes whose loads are issued together"),
        Param("q_nope_quant", False, doc="also quantise q_nope [T, H, 128] to fp8 e4m3 with one float32 scale per "
                                         "head (act_quant_fp8's 1x128 recipe): the decode branch's w_uk input, "
                                         "without a launch of its own"),
    )
    shape_params = ("kv_lora_rank", "rope_dim", "num_heads", "page_size", "cache_dtype", "quant_granularity",
                    "rope_layout", "gamma_dtype", "q_nope_quant")
    bucket_dims = ("T",)

    def prefer(self, kernels, dims):
        """Decode-sized batches: split heads over 4 CTAs; large batches: whole tokens per warp, 8 warps.
        With q_nope_quant a warp also quantises 128 dims of each of its heads, so heads are split finer, to
        8 per CTA at H=128 (H100 rows at 9bd43cb, B=1/32/128: 7.4/8.2/11.0 us with 16 splits against
        11.2/13.3/14.4 with 4 and ~60 with one)."""
        if any(k.params["q_nope_quant"] for k in kernels):
            want = max(4, kernels[0].params["num_heads"] // 8)
            return min(kernels, key=lambda k: (abs(k.params["head_splits"] - want), k.params["tokens_per_cta"]))
        if dims["T"] <= 1024:
            return min(kernels, key=lambda k: (abs(k.params["head_splits"] - 4), k.params["tokens_per_cta"]))
        return min(kernels, key=lambda k: (k.params["head_splits"], -k.params["tokens_per_cta"]))

    # ---------------- parameters ----------------
    def constraints(self, p, arch):
        errs = []
        d = p["kv_lora_rank"] + p["rope_dim"]
        rl = p["rope_dim"] // 8
        hpw = 32 // rl
        if p["num_heads"] % p["head_splits"]:
            errs.append(f"head_splits={p['head_splits']} does not divide num_heads={p['num_heads']}")
        else:
            hs = p["num_heads"] // p["head_splits"]
            if hs % hpw:
                errs.append(f"heads per split ({hs}) must be a multiple of {hpw} (a warp covers {hpw} heads of "
                            f"rope_dim={p['rope_dim']}); lower head_splits")
            elif (hs // hpw) % p["q_unroll"]:
                errs.append(f"q_unroll={p['q_unroll']} must divide the {hs // hpw} q passes per lane")
            if p["q_nope_quant"] and hs % 2:
                errs.append(f"q_nope_quant needs an even number of heads per split (a warp quantises two "
                            f"128-wide heads per pass); got {hs}")
        if p["cache_dtype"] == "f8e4m3":
            g = p["quant_granularity"]
            if not (g == d or (g % 8 == 0 and p["rope_dim"] % g == 0)):
                errs.append(f"quant_granularity={g} must be {d} (one scale per token) or a multiple of 8 "
                            f"dividing rope_dim={p['rope_dim']}")
        return errs

    def validate(self, given=None, arch="sm_90a"):
        p = super().validate(given, arch)
        if p["cache_dtype"] == "bf16":
            p["quant_granularity"] = self.param("quant_granularity").default   # unused: one bundle per config
        return p

    def row(self, p) -> int:
        return p["kv_lora_rank"] + p["rope_dim"]

    def nblocks(self, p) -> int:
        return self.row(p) // p["quant_granularity"]

    # ---------------- layout and geometry ----------------
    def layout(self, p) -> ArgLayout:
        d, r, h, ps = self.row(p), p["rope_dim"], p["num_heads"], p["page_size"]
        cdt = p["cache_dtype"]
        nb = self.nblocks(p)
        syms = {s.name: s for s in [
            Sym("B1", 32, doc="batch + 1 (row offsets)"),
            Sym("T", 32, doc="new tokens in the ragged batch"),
            Sym("sqt", 64, 8, "q_rope token stride"), Sym("sqh", 64, 8, "q_rope head stride"),
            Sym("sot", 64, 8, "q_rope_out token stride"), Sym("soh", 64, 8, "q_rope_out head stride"),
            Sym("skv", 64, 8, "kv_input token stride"),
            Sym("P", 32, doc="rows of freqs_cis (max position + 1)"),
            Sym("L", 32, doc="layers in the cache"), Sym("NP", 32, doc="pages per layer"),
            Sym("s_layer", 64, 16 // DTYPES[cdt].itemsize, "cache layer stride"),
            Sym("ss_layer", 64, 1, "scales layer stride"),
            Sym("B", 32, doc="sequences in the batch"), Sym("MP", 32, doc="max pages per sequence"),
            Sym("spt", 64, 1, "page table row stride"),
        ]}
        args = [
            TensorArg("input_row_offsets", "u32", ("B1",), (1,), 4, "in", "ragged batch boundaries [B+1]"),
            TensorArg("q_rope", "bf16", ("T", h, r), ("sqt", "sqh", 1), 16, "in"),
            TensorArg("q_rope_out", "bf16", ("T", h, r), ("sot", "soh", 1), 16, "out", "may alias q_rope"),
            TensorArg("kv_input", "bf16", ("T", d), ("skv", 1), 16, "in"),
            TensorArg("freqs_cis", "f32", ("P", r), (r, 1), 16, "in", "(cos, sin) pairs per position"),
            TensorArg("gamma", p["gamma_dtype"], (p["kv_lora_rank"],), (1,), 16, "in"),
            TensorArg("kv_cache", cdt, ("L", "NP", ps, 1, d), ("s_layer", ps * d, d, d, 1), 16, "inout"),
        ]
        if cdt == "f8e4m3":
            args.append(TensorArg("kv_scales", "f32", ("L", "NP", ps, 1, nb), ("ss_layer", ps * nb, nb, nb, 1),
                                  4, "inout", "fp8 scales, paged like the cache"))
        args += [
            TensorArg("page_table", "i32", ("B", "MP"), ("spt", 1), 4, "in"),
            TensorArg("cache_lengths", "i32", ("B",), (1,), 4, "in", "tokens already cached per sequence"),
            ScalarArg("layer_idx", "i32"),
            ScalarArg("eps", "f32"),
        ]
        if p["q_nope_quant"]:
            syms.update({s.name: s for s in [
                Sym("snt", 64, 8, "q_nope token stride"), Sym("snh", 64, 8, "q_nope head stride"),
                Sym("sft", 64, 16, "q_nope_fp8 token stride"), Sym("sfh", 64, 16, "q_nope_fp8 head stride"),
                Sym("sst", 64, 1, "q_nope_scales token stride"), Sym("ssh", 64, 1, "q_nope_scales head stride")]})
            args[-2:-2] = [
                TensorArg("q_nope", "bf16", ("T", h, NOPE), ("snt", "snh", 1), 16, "in"),
                TensorArg("q_nope_fp8", "f8e4m3", ("T", h, NOPE), ("sft", "sfh", 1), 16, "out"),
                TensorArg("q_nope_scales", "f32", ("T", h), ("sst", "ssh"), 4, "out", "one scale per (token, head)")]
        # s_layer is NP*PS*D for a compact cache; any larger stride is fine too.
        return ArgLayout(syms, args)

    def block(self, p):
        return (32 * p["tokens_per_cta"], 1, 1)

    def grid(self, p, dims):
        return (max(1, -(-dims["T"] // p["tokens_per_cta"])), p["head_splits"], 1)

    def template_context(self, p, arch):
        hs = p["num_heads"] // p["head_splits"]
        nope_unroll = max(u for u in (1, 2, 4) if (hs // 2) % u == 0) if p["q_nope_quant"] else 1
        return dict(cache_cute=DTYPES[p["cache_dtype"]].cute, nope_unroll=nope_unroll, **p)

    def kernel_name(self, p):
        g = f"_g{p['quant_granularity']}" if p["cache_dtype"] == "f8e4m3" else ""
        return (f"rope_rmsnorm_quant_{p['cache_dtype']}{g}_{p['rope_layout']}_h{p['num_heads']}"
                f"_c{p['kv_lora_rank']}r{p['rope_dim']}_ps{p['page_size']}_gm{p['gamma_dtype']}"
                f"_w{p['tokens_per_cta']}_s{p['head_splits']}_u{p['q_unroll']}" + ("_qn8" if p["q_nope_quant"] else ""))

    def scalar_default(self, p, name):
        return {"eps": 1e-6}.get(name)

    # ---------------- host-side checks ----------------
    def check_call(self, p, views, dims, contents: bool = True):
        k = "rope_rmsnorm_quant"
        if dims["B1"] != dims["B"] + 1:
            raise ArgumentError(f"{k}: input_row_offsets has {dims['B1']} entries but page_table/cache_lengths "
                                f"have B={dims['B']} rows; expected B+1={dims['B'] + 1}")
        layer = int(views["layer_idx"])
        if not 0 <= layer < dims["L"]:
            raise ArgumentError(f"{k}: layer_idx={layer} is outside the cache's {dims['L']} layers")
        if not contents:
            return
        off = host_copy(views["input_row_offsets"]).astype(np.int64)
        lens = host_copy(views["cache_lengths"]).astype(np.int64)
        pt = host_copy(views["page_table"])
        T = dims["T"]
        if off[0] != 0 or np.any(np.diff(off) < 0) or off[-1] != T:
            raise ArgumentError(f"{k}: input_row_offsets must start at 0, never decrease and end at T={T}; "
                                f"got {off.tolist() if off.size <= 16 else off}")
        if np.any(lens < 0):
            raise ArgumentError(f"{k}: cache_lengths has negative entries")
        end = lens + np.diff(off)                       # positions after this step
        if np.any(end > dims["P"]):
            b = int(np.argmax(end > dims["P"]))
            raise ArgumentError(f"{k}: sequence {b} reaches position {int(end[b]) - 1} but freqs_cis has "
                                f"{dims['P']} rows")
        cap = dims["MP"] * p["page_size"]
        if np.any(end > cap):
            b = int(np.argmax(end > cap))
            raise ArgumentError(f"{k}: cache capacity exceeded: sequence {b} needs {int(end[b])} slots but "
                                f"page_table has {dims['MP']} pages of {p['page_size']}")
        for b in range(dims["B"]):
            first, last = lens[b] // p["page_size"], (end[b] - 1) // p["page_size"]
            if end[b] > lens[b]:
                pages = pt[b, first:last + 1]
                bad = (pages < 0) | (pages >= dims["NP"])
                if np.any(bad):
                    i = int(np.argmax(bad))
                    raise ArgumentError(f"{k}: page_table[{b}, {first + i}] = {int(pages[i])} is not a page "
                                        f"of the cache (0..{dims['NP'] - 1})")

    # ---------------- numbers ----------------
    def bytes_moved(self, p, dims):
        T = dims["T"]
        h, r, d = p["num_heads"], p["rope_dim"], self.row(p)
        per_tok = h * r * 2 * 2 + d * 2 + d * DTYPES[p["cache_dtype"]].itemsize + 4 * r + 16
        if p["cache_dtype"] == "f8e4m3":
            per_tok += 4 * self.nblocks(p)
        return T * per_tok + p["kv_lora_rank"] * DTYPES[p["gamma_dtype"]].itemsize

    def bytes_written(self, p, dims):
        h, r, d = p["num_heads"], p["rope_dim"], self.row(p)
        per_tok = h * r * 2 + d * DTYPES[p["cache_dtype"]].itemsize          # q_rope out, the cache row
        if p["cache_dtype"] == "f8e4m3":
            per_tok += 4 * self.nblocks(p)
        return dims["T"] * per_tok

    def make_problem(self, p, dims: Mapping[str, int], rng: np.random.Generator) -> Problem:
        """dims: B sequences, S max new tokens each (ragged 1..S unless uniform=1), C max cached tokens,
        L layers.  Pages are a random permutation; the cache starts as random garbage."""
        B, S, C = int(dims["B"]), int(dims.get("S", 1)), int(dims.get("C", 100))
        L = int(dims.get("L", 2))
        ps, d, r, h = p["page_size"], self.row(p), p["rope_dim"], p["num_heads"]
        seq = np.full(B, S) if dims.get("uniform", 0) or S == 1 else rng.integers(1, S + 1, B)
        lens = rng.integers(0, C + 1, B)
        end = lens + seq
        pt, NP = random_page_table(rng, -(-end // ps), spare=3)
        MP = pt.shape[1]
        off = np.concatenate([[0], np.cumsum(seq)]).astype(np.uint32)
        T = int(off[-1])
        P = int(end.max()) + 5
        freqs = rope_freqs(P, r)
        cdt = p["cache_dtype"]
        cache = round_to(rng.standard_normal((L, NP, ps, 1, d)), cdt)
        inputs = dict(
            input_row_offsets=off,
            q_rope=round_to(rng.standard_normal((T, h, r)), "bf16"),
            kv_input=round_to(rng.standard_normal((T, d)) * 1.5, "bf16"),
            freqs_cis=freqs,
            gamma=round_to(1.0 + 0.2 * rng.standard_normal(p["kv_lora_rank"]), p["gamma_dtype"]),
            kv_cache=cache,
            page_table=pt,
            cache_lengths=lens.astype(np.int32),
            layer_idx=L - 1,
            eps=1e-6,
        )
        if cdt == "f8e4m3":
            inputs["kv_scales"] = rng.uniform(0.5, 2.0, (L, NP, ps, 1, self.nblocks(p))).astype(np.float32)
        if p["q_nope_quant"]:
            inputs["q_nope"] = round_to(rng.standard_normal((T, h, NOPE)) * rng.uniform(0.1, 10, (T, h, 1)), "bf16")
        return Problem(dict(T=T, B=B, NP=NP, L=L, P=P, MP=MP), inputs)

    def token_slots(self, p, inputs) -> list[tuple[int, int, int]]:
        """(token, page, slot) of every new token."""
        off = inputs["input_row_offsets"].astype(np.int64)
        out = []
        for b in range(len(off) - 1):
            for t in range(off[b], off[b + 1]):
                pos = int(inputs["cache_lengths"][b]) + t - int(off[b])
                out.append((t, int(inputs["page_table"][b, pos // p["page_size"]]), pos % p["page_size"]))
        return out

    def positions(self, inputs) -> np.ndarray:
        off = inputs["input_row_offsets"].astype(np.int64)
        pos = np.zeros(int(off[-1]), np.int64)
        for b in range(len(off) - 1):
            pos[off[b]:off[b + 1]] = inputs["cache_lengths"][b] + np.arange(off[b + 1] - off[b])
        return pos

    def _rope(self, p, x, cos, sin):
        """x [..., r]; cos/sin [..., r/2] broadcastable; same dtype arithmetic as x."""
        r = p["rope_dim"]
        if p["rope_layout"] == "interleaved":
            a, b = x[..., 0::2], x[..., 1::2]
        else:
            a, b = x[..., : r // 2], x[..., r // 2:]
        ya, yb = a * cos - b * sin, b * cos + a * sin
        y = np.empty_like(x)
        if p["rope_layout"] == "interleaved":
            y[..., 0::2], y[..., 1::2] = ya, yb
        else:
            y[..., : r // 2], y[..., r // 2:] = ya, yb
        return y

    def reference(self, p, inputs, precision: str = "f32") -> dict:
        """Returns q_rope_out, rows [T, D] (the values written per token, in f32/f64 before storage
        rounding), and for fp8 the quantized rows and scales computed as the kernel does (f32)."""
        ft = np.float64 if precision == "f64" else np.float32
        kv, r = p["kv_lora_rank"], p["rope_dim"]
        pos = self.positions(inputs)
        fr = inputs["freqs_cis"].astype(ft)[pos]
        cos, sin = fr[:, 0::2], fr[:, 1::2]
        q = inputs["q_rope"].astype(ft)
        q_out = self._rope(p, q, cos[:, None, :], sin[:, None, :])
        x = inputs["kv_input"].astype(ft)
        c = x[:, :kv]
        ms = (np.sum(c.astype(np.float64) ** 2, axis=1) / kv).astype(ft)
        rr = ft(1.0) / np.sqrt(ms + ft(inputs["eps"]))
        yn = (c * rr[:, None]) * inputs["gamma"].astype(ft)[None, :]
        yr = self._rope(p, x[:, kv:], cos, sin)
        rows = np.concatenate([yn, yr], axis=1)
        out = {"q_rope_out": q_out, "rows": rows}
        if p["q_nope_quant"]:
            codes, sc = quantize_fp8_rows(inputs["q_nope"].astype(np.float32), NOPE)
            out["q_nope_fp8"], out["q_nope_scales"] = codes, sc[..., 0]
        if p["cache_dtype"] == "f8e4m3":
            g = p["quant_granularity"]
            blk = rows.reshape(rows.shape[0], -1, g)
            amax = np.max(np.abs(blk), axis=2)
            scale = (np.maximum(amax, ft(1e-30)) / ft(FP8_E4M3_MAX)).astype(ft)
            inv = (ft(1.0) / scale).astype(ft)                 # the kernel multiplies by 1/scale
            qv = blk * inv[:, :, None]
            out["rows_q"] = quantize_fp8(qv.reshape(rows.shape).astype(np.float32))
            out["scales"] = scale.astype(np.float32)
        return out

    # ---------------- benchmark companions ----------------
    bench_shapes = [dict(B=1, S=1, C=256), dict(B=32, S=1, C=256), dict(B=128, S=1, C=256),
                    dict(B=512, S=1, C=64), dict(B=8, S=2048, C=64, uniform=1)]

    def torch_impl(self, p, t):
        """The same math in torch ops (float32 compute), in place on t's outputs, indices computed on the GPU."""
        import torch
        kv, r = p["kv_lora_rank"], p["rope_dim"]
        T = t["q_rope"].shape[0]
        b, pos, page, slot = self._slots_torch(p, t)
        fr = t["freqs_cis"][pos].view(T, r // 2, 2)       # (cos, sin) pairs; no strided slices (Inductor)
        cos, sin = fr[..., 0], fr[..., 1]

        def rope(x, c, s):
            if p["rope_layout"] == "interleaved":
                xp = x.view(*x.shape[:-1], r // 2, 2)
                a, bb = xp[..., 0], xp[..., 1]
                return torch.stack([a * c - bb * s, bb * c + a * s], dim=-1).view(x.shape)
            a, bb = x[..., : r // 2], x[..., r // 2:]
            return torch.cat([a * c - bb * s, bb * c + a * s], dim=-1)

        t["q_rope_out"].copy_(rope(t["q_rope"].float(), cos[:, None, :], sin[:, None, :]))
        if p["q_nope_quant"]:          # act_quant_fp8's recipe, on [T*H, 128] views
            from ..act_quant_fp8 import family as act_quant
            qa = dict(x=t["q_nope"].reshape(-1, NOPE), q=t["q_nope_fp8"].view(-1, NOPE),
                      scales=t["q_nope_scales"].view(-1, 1))
            act_quant.torch_impl(dict(group=NOPE), qa)
        x = t["kv_input"].float()
        c = x[:, :kv]
        yn = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + t["eps"]) * t["gamma"].float()
        rows = torch.cat([yn, rope(x[:, kv:], cos, sin)], dim=-1)
        # Scatter through flat row views (index_copy_ is what torch.compile lowers well).
        cache = t["kv_cache"]
        row_idx = (t["layer_idx"] * cache.shape[1] + page) * p["page_size"] + slot
        flat = cache.view(-1, cache.shape[-1])
        if p["cache_dtype"] == "bf16":
            flat.index_copy_(0, row_idx, rows.to(torch.bfloat16))
        else:
            g = p["quant_granularity"]
            blk = rows.view(T, -1, g)
            scale = blk.abs().amax(-1).clamp_min(1e-30) / FP8_E4M3_MAX
            qv = (blk * (1.0 / scale)[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).view(T, -1)
            flat.view(torch.uint8).index_copy_(0, row_idx, qv.to(torch.float8_e4m3fn).view(torch.uint8))
            sc = t["kv_scales"]
            sc.view(-1, sc.shape[-1]).index_copy_(0, row_idx, scale)

    @staticmethod
    def _slots_torch(p, t):
        """Sequence, position, page and slot of every new token, computed with torch on the GPU."""
        import torch
        off = t["input_row_offsets"].long()
        tok = torch.arange(t["q_rope"].shape[0], device=off.device)
        b = torch.searchsorted(off, tok, right=True) - 1    # not off[1:]: Inductor rejects a sliced sorter
        pos = t["cache_lengths"].long()[b] + tok - off[b]
        page = t["page_table"][b, pos // p["page_size"]].long()
        return b, pos, page, pos % p["page_size"]

    def bench_outputs(self, p, t):
        """Comparable float32 views of what a run wrote: q_rope_out and the new (dequantised) cache rows."""
        _, _, page, slot = self._slots_torch(p, t)
        L = t["layer_idx"]
        rows = t["kv_cache"][L, page, slot, 0].float()
        if p["cache_dtype"] == "f8e4m3":
            g = p["quant_granularity"]
            sc = t["kv_scales"][L, page, slot, 0]
            rows = (rows.view(rows.shape[0], -1, g) * sc[..., None]).view(rows.shape)
        out = {"q_rope_out": t["q_rope_out"].float(), "kv_cache_rows": rows}
        if p["q_nope_quant"]:
            out["q_nope"] = t["q_nope_fp8"].float() * t["q_nope_scales"][..., None]
        return out


def rope_freqs(positions: int, rope_dim: int, base: float = 10000.0) -> np.ndarray:
    """freqs_cis [positions, rope_dim] float32: (cos, sin) of pos * base^(-2i / rope_dim) per pair i."""
    inv = 1.0 / (base ** (np.arange(0, rope_dim, 2) / rope_dim))
    ang = np.arange(positions)[:, None] * inv[None, :]
    return np.stack([np.cos(ang), np.sin(ang)], axis=-1).reshape(positions, rope_dim).astype(np.float32)


family = RopeRMSNormQuant()

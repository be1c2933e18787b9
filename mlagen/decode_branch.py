"""The decode branch of a DeepSeek MLA layer as one call, composed from the kernel families.

    plan = MLADecodeBranch("build/gpu/bench", num_heads=128, page_size=64, cache_dtype="f8e4m3")
    step = plan.bind(q, kv_input, input_row_offsets, freqs_cis, kv_norm_gamma, cache, layer_idx,
                     scale, eps, w_uk, w_uk_scale, w_uv, w_uv_scale)          # checks, buffers, packing
    step.launch()                      # every decode step (or capture step.launch() in a CUDA graph)
    out = step.out                     # [T, H, 128] bf16

or, checking and binding on every call, ``mlagen.mla_decode_branch(...)`` (same arguments).

Math, for T = B * q_len new tokens (``input_row_offsets`` must be ``b * q_len``)::

    q_rope'          = rope(q[..., 128:], pos)                         (rope_rmsnorm_quant)
    cache[pos]       = [rmsnorm(kv_input[:, :512]) * gamma | rope(kv_input[:, 512:], pos)]  (bf16 or fp8)
    q_nope8, s       = quant_1x128(q[..., :128])                        (act_quant_fp8)
    q_lat            = (q_nope8 * s) @ (w_uk * w_uk_scale)              (fp8_gemm, batched over heads)
    o                = mla_decode([q_lat | q_rope'], cache[:cache_lengths + q_len])   (mla_decode + combine)
    o8, so           = quant_1x128(bf16(o))                             (fused into mla_combine, or act_quant_fp8)
    out              = (o8 * so) @ (w_uv * w_uv_scale)                  (fp8_gemm, batched over heads)

Tensors (torch, CUDA)::

    q               [T, H, 192] bf16 (128 nope + 64 rope dims; the (T, H) modes viewable as one)
    kv_input        [T, 576] bf16 (512 latent + 64 rope)
    input_row_offsets [B + 1] uint32 (or int32), b * q_len
    freqs_cis       [max_pos, 64] float32 (cos, sin) pairs;  kv_norm_gamma [512] bf16 or float32
    cache           PagedLatentCache: kv_cache [L, pages, page_size, 1, 576] bf16 / fp8 e4m3,
                    kv_scales [L, pages, page_size, 1, 576 / g] float32 (fp8), page_table [B, max_pages] int32,
                    cache_lengths [B] int32 (tokens cached BEFORE this step)
    w_uk            [H, 128, 512] fp8 e4m3 in math order with the 128 (k) dimension contiguous
                    (``w.transpose(1, 2)`` of a contiguous [H, 512, 128]);  w_uk_scale [H, 1, 4] float32
    w_uv            [H, 512, 128] fp8 e4m3, the 512 (k) dimension contiguous;  w_uv_scale [H, 4, 1] float32
    sparse_indices  [B, q_len, topk] int32 positions (-1 = padding), topk_lengths [B, q_len] int32
    attn_sink       [H] float32

What is fused, and the launches that remain (5 or 6 per step):

1. rope_rmsnorm_quant writes the new cache rows and q_rope' straight into the rope columns of the
   decode's query buffer ``q_full [T, H, 576]`` (the concat's rope half costs nothing).
2. q_nope is quantised to fp8 (1x128): inside step 1 when the plan has rope bundles built with
   ``q_nope_quant=True`` (16 lanes per head, two heads per warp pass, act_quant_fp8's exact recipe), else by
   act_quant_fp8 on a strided [T*H, 128] view of q (no copy).
3. fp8_gemm (w_uk) stores its bf16 tile by TMA into the first 512 columns of ``q_full`` (the concat's
   other half costs nothing).
4. mla_decode reads the lengths before this step and adds q_len itself (``kv_len_offset``).
5. with several KV partitions, mla_combine merges them and writes the fp8 codes and 1x128 scales that
   the w_uv GEMM reads (``out_dtype=f8e4m3``); with one partition the decode kernel writes bf16 and
   6. act_quant_fp8 quantises it.
7. fp8_gemm (w_uv) writes ``out``.

Not fused, and why: the one-partition decode epilogue writes bf16 (quantising there would need the whole
512-dim row of a head, which two warpgroups split between them).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import families
from .abi import ArgumentError
from .families.mla_decode.plan import (MLADecode, default_partitions, first_kernel, pick, pick_kernels, restrict,
                                       sm_count)

NOPE, ROPE, LAT, VDIM = 128, 64, 512, 128       # DeepSeek-V3 head dims: q_nope, rope, kv_lora_rank, v_head
D = LAT + ROPE
QB = 128                                         # fp8 activation / weight block


@dataclass
class PagedLatentCache:
    """The paged latent cache of one model (all layers), as rope_rmsnorm_quant and mla_decode use it."""
    kv_cache: Any                 # [L, pages, page_size, 1, 576] bf16 or fp8 e4m3
    page_table: Any               # [B, max_pages] int32
    cache_lengths: Any            # [B] int32: tokens cached before this step
    kv_scales: Any = None         # [L, pages, page_size, 1, 576 / g] float32 (fp8 cache)


def branch_params(q, cache: PagedLatentCache, input_row_offsets, sparse_indices=None, attn_sink=None,
                  kv_norm_gamma=None, rope_layout: str = "interleaved") -> dict:
    """The shape parameters a call implies (what picks the bundles)."""
    T, H = int(q.shape[0]), int(q.shape[1])
    B = int(input_row_offsets.shape[0]) - 1
    if B < 1 or T % B:
        raise ArgumentError(f"mla_decode_branch: T={T} tokens are not q_len tokens for each of the B={B} "
                            "sequences of input_row_offsets (the decode branch needs the same q_len everywhere)")
    kv = cache.kv_cache
    fp8 = str(kv.dtype) == "torch.float8_e4m3fn"
    p = dict(num_heads=H, q_len=T // B, page_size=int(kv.shape[2]), cache_dtype="f8e4m3" if fp8 else "bf16",
             sparse=sparse_indices is not None, attn_sink=attn_sink is not None, rope_layout=rope_layout,
             gamma_dtype="f32" if kv_norm_gamma is not None and str(kv_norm_gamma.dtype) == "torch.float32" else "bf16")
    if fp8:
        if cache.kv_scales is None:
            raise ArgumentError("mla_decode_branch: an fp8 cache needs cache.kv_scales")
        p["quant_granularity"] = D // int(cache.kv_scales.shape[-1])
    if sparse_indices is not None:
        p["topk"] = int(sparse_indices.shape[-1])
    return p


class BoundBranch:
    """One decode step with every argument checked and packed: ``launch()`` is 5-6 cuLaunchKernel calls."""

    def __init__(self, steps, out, buffers, num_partitions):
        self.steps = steps                  # [(name, BoundLaunch)], in launch order
        self.out = out
        self.buffers = buffers              # the intermediates (q_full, fp8 activations, scales, lse)
        self.num_partitions = num_partitions

    def launch(self) -> None:
        for _, b in self.steps:
            b.launch()

    @property
    def kernels(self) -> list[str]:
        return [f"{n}: {b.kernel.name}" for n, b in self.steps]


class MLADecodeBranch:
    """The plan: bundles for every step, chosen once (from a tuned dispatch table when given)."""

    def __init__(self, root, *, num_heads: int, page_size: int, cache_dtype: str = "bf16", quant_granularity: int = 64,
                 q_len: int = 1, sparse: bool = False, topk: int = 2048, attn_sink: bool = False,
                 rope_layout: str = "interleaved", gamma_dtype: str = "bf16", table_path: str | None = None):
        import json
        from pathlib import Path
        self.root = root
        self.p = dict(num_heads=num_heads, page_size=page_size, cache_dtype=cache_dtype, q_len=q_len, sparse=sparse,
                      topk=topk, attn_sink=attn_sink, rope_layout=rope_layout, gamma_dtype=gamma_dtype,
                      quant_granularity=quant_granularity)
        table = json.loads(Path(table_path).read_text()) if table_path else None
        fp8 = cache_dtype == "f8e4m3"
        want_rope = dict(kv_lora_rank=LAT, rope_dim=ROPE, num_heads=num_heads, page_size=page_size,
                         cache_dtype=cache_dtype, rope_layout=rope_layout, gamma_dtype=gamma_dtype)
        want_dec = dict(num_heads=num_heads, q_len=q_len, page_size=page_size, cache_dtype=cache_dtype, sparse=sparse,
                        attn_sink=attn_sink)
        if fp8:
            want_rope["quant_granularity"] = want_dec["quant_granularity"] = quant_granularity
        if sparse:
            want_dec["topk"] = topk
        if q_len > 1:
            want_dec["causal"] = True
        want_comb = dict(num_heads=num_heads, q_len=q_len, attn_sink=attn_sink)
        found = {
            "rope_rmsnorm_quant": pick_kernels(root, "rope_rmsnorm_quant", want_rope, table),
            "act_quant_fp8": pick_kernels(root, "act_quant_fp8", dict(dtype="bf16", group=QB), table),
            "fp8_gemm": pick_kernels(root, "fp8_gemm", dict(m_scale_granularity=1, n_scale_granularity=QB), table),
            "mla_decode": pick_kernels(root, "mla_decode", want_dec, table),
        }
        missing = [f"{n} {w}" for n, w in (("rope_rmsnorm_quant", want_rope), ("act_quant_fp8", dict(group=QB)),
                                           ("fp8_gemm", dict(m_scale_granularity=1, n_scale_granularity=QB)),
                                           ("mla_decode", want_dec)) if found[n] is None]
        if missing:
            raise FileNotFoundError(f"mla_decode_branch: no bundle under {root} for: " + "; ".join(missing)
                                    + " (build them with `mlagen generate FAMILY -p name=value ...` or the suites)")
        self.rope, self.quant, self.gemm = found["rope_rmsnorm_quant"], found["act_quant_fp8"], found["fp8_gemm"]
        # rope bundles that also quantise q_nope take over step 2 (one launch fewer); else act_quant_fp8 runs it
        fused_rope = restrict(self.rope, lambda k: k.params.get("q_nope_quant", False))
        self.rope = fused_rope if fused_rope is not None else restrict(
            self.rope, lambda k: not k.params.get("q_nope_quant", False))
        self.rope_quantises_q_nope = fused_rope is not None
        comb_bf16 = pick_kernels(root, "mla_combine", dict(want_comb, out_dtype="bf16"), table)
        comb_fp8 = pick_kernels(root, "mla_combine", dict(want_comb, out_dtype="f8e4m3"), table)
        self.decode_bf16 = MLADecode(found["mla_decode"], comb_bf16)     # P = 1 (or no fp8 combine): + act_quant
        self.decode_fp8 = MLADecode(found["mla_decode"], comb_fp8) if comb_fp8 is not None else None

    def partitions(self, batch: int, max_len: int, device: int = 0) -> int:
        p = first_kernel(self.decode_bf16.decode).params
        return default_partitions(p, batch, max_len, sm_count(device))

    def bind(self, q, kv_input, input_row_offsets, freqs_cis, kv_norm_gamma, cache: PagedLatentCache, layer_idx: int,
             scale: float, eps: float, w_uk, w_uk_scale, w_uv, w_uv_scale, *, sparse_indices=None, topk_lengths=None,
             attn_sink=None, num_partitions: int | None = None, max_len: int | None = None, out=None,
             stream: Any = None, check_contents: bool = True) -> BoundBranch:
        """Check every argument, allocate the intermediates, pick bundles and partitions, pack the launches.

        ``max_len`` (the longest sequence after this step) avoids a device sync when the partition count
        is left to the heuristic.  ``check_contents`` reads offsets, page table and lengths back to check
        page indices and capacity (it synchronises: False under CUDA-graph capture)."""
        import torch
        p = self.p
        H, ql = p["num_heads"], p["q_len"]
        if q.dim() != 3 or tuple(q.shape[1:]) != (H, NOPE + ROPE) or q.dtype != torch.bfloat16:
            raise ArgumentError(f"mla_decode_branch: q must be [T, {H}, {NOPE + ROPE}] bf16; got "
                                f"{tuple(q.shape)} {q.dtype}")
        T = int(q.shape[0])
        B = int(input_row_offsets.shape[0]) - 1
        if B < 1 or T != B * ql:
            raise ArgumentError(f"mla_decode_branch: T={T} tokens but input_row_offsets has B={B} sequences of "
                                f"q_len={ql} (this plan was built for q_len={ql})")
        if tuple(kv_input.shape) != (T, D):
            raise ArgumentError(f"mla_decode_branch: kv_input must be [T={T}, {D}]; got {tuple(kv_input.shape)}")
        _check_weight("w_uk", w_uk, w_uk_scale, H, NOPE, LAT)
        _check_weight("w_uv", w_uv, w_uv_scale, H, LAT, VDIM)
        if (cache.kv_scales is None) != (p["cache_dtype"] == "bf16"):
            raise ArgumentError("mla_decode_branch: pass cache.kv_scales exactly when the cache is fp8")
        if input_row_offsets.dtype == torch.int32:
            input_row_offsets = input_row_offsets.view(torch.uint32)
        if check_contents:
            off = input_row_offsets.view(torch.int32).cpu().numpy()
            if not np.array_equal(off, np.arange(B + 1) * ql):
                raise ArgumentError(f"mla_decode_branch: input_row_offsets must be b * q_len (q_len={ql}) for a "
                                    f"decode step; got {off.tolist() if off.size <= 16 else off}")
        dev = q.device
        qrows = _rows(q, "q")                                     # [T*H, 192] view
        q_full = torch.empty((T, H, D), dtype=torch.bfloat16, device=dev)
        qn8 = torch.empty((T, H, NOPE), dtype=torch.float8_e4m3fn, device=dev)
        qn_s = torch.empty((T, H, 1), dtype=torch.float32, device=dev)
        o8 = torch.empty((T, H, LAT), dtype=torch.float8_e4m3fn, device=dev)
        o_s = torch.empty((T, H, LAT // QB), dtype=torch.float32, device=dev)
        lse = torch.empty((B, ql, H), dtype=torch.float32, device=dev)
        if out is None:
            out = torch.empty((T, H, VDIM), dtype=torch.bfloat16, device=dev)
        elif tuple(out.shape) != (T, H, VDIM) or out.dtype != torch.bfloat16:
            raise ArgumentError(f"mla_decode_branch: out must be [T={T}, {H}, {VDIM}] bf16; got "
                                f"{tuple(out.shape)} {out.dtype}")
        kw = dict(stream=stream, check_contents=check_contents)
        steps = []

        # 1. rope + rmsnorm + quant into the cache; q_rope' into q_full's rope columns
        ra = rope_args(q, q_full, kv_input, input_row_offsets, freqs_cis, kv_norm_gamma, cache, layer_idx, eps)
        if self.rope_quantises_q_nope:      # ... and 2. q_nope -> fp8 (1 x 128) in the same launch
            ra.update(q_nope=q[:, :, :NOPE], q_nope_fp8=qn8, q_nope_scales=qn_s.view(T, H))
            steps.append(("rope_rmsnorm_quant(+q_nope fp8)", pick(self.rope, ra).bind(**kw, **ra)))
        else:
            steps.append(("rope_rmsnorm_quant", pick(self.rope, ra).bind(**kw, **ra)))
            # 2. q_nope -> fp8 (1 x 128)
            qa = dict(x=qrows[:, :NOPE], q=qn8.view(T * H, NOPE), scales=qn_s.view(T * H, 1))
            steps.append(("act_quant_fp8(q_nope)", pick(self.quant, qa).bind(**kw, **qa)))

        # 3. q_nope @ w_uk -> q_full[:, :, :512] (bf16, TMA store into the concat buffer)
        fam = families.get("fp8_gemm")
        g1, _ = fam.torch_args(qn8.transpose(0, 1), w_uk.transpose(1, 2), qn_s.transpose(0, 1),
                               w_uk_scale.transpose(1, 2), q_full[:, :, :LAT].transpose(0, 1))
        steps.append(("fp8_gemm(w_uk)", pick(self.gemm, g1).bind(**kw, **g1)))

        # 4./5. split-KV decode (+ combine, quantising when it can)
        if num_partitions is None:
            if max_len is None:                   # synchronises; pass max_len to avoid
                max_len = int(cache.cache_lengths.max().item()) + ql
            num_partitions = self.partitions(B, max_len, dev.index or 0)
        num_partitions = int(num_partitions)
        fused = num_partitions > 1 and self.decode_fp8 is not None
        dargs = dict(q=q_full.view(B, ql, H, D), kv_cache=cache.kv_cache, page_table=cache.page_table,
                     kv_lengths=cache.cache_lengths, layer_idx=int(layer_idx), softmax_scale=float(scale),
                     kv_scales=cache.kv_scales, indices=sparse_indices, topk_lengths=topk_lengths, attn_sink=attn_sink,
                     num_partitions=num_partitions, lse=lse, kv_len_offset=ql, max_len=max_len, **kw)
        if fused:
            bd = self.decode_fp8.bind(**dargs, out=o8.view(B, ql, H, LAT), out_scales=o_s.view(B, ql, H, LAT // QB))
            o_bf = None
        else:
            o_bf = torch.empty((T, H, LAT), dtype=torch.bfloat16, device=dev)
            bd = self.decode_bf16.bind(**dargs, out=o_bf.view(B, ql, H, LAT))
        names = ["mla_decode", "mla_combine" + ("(fp8 out)" if fused else "")]
        steps += list(zip(names, bd.launches))
        if not fused:                             # 6. bf16 attention output -> fp8 (1 x 128)
            oa = dict(x=o_bf.view(T * H, LAT), q=o8.view(T * H, LAT), scales=o_s.view(T * H, LAT // QB))
            steps.append(("act_quant_fp8(o)", pick(self.quant, oa).bind(**kw, **oa)))

        # 7. o @ w_uv -> out
        g2, _ = fam.torch_args(o8.transpose(0, 1), w_uv.transpose(1, 2), o_s.transpose(0, 1),
                               w_uv_scale.transpose(1, 2), out.transpose(0, 1))
        steps.append(("fp8_gemm(w_uv)", pick(self.gemm, g2).bind(**kw, **g2)))
        bufs = dict(q_full=q_full, qn8=qn8, qn_s=qn_s, o8=o8, o_s=o_s, lse=lse, o_bf=o_bf)
        return BoundBranch(steps, out, bufs, num_partitions)

    def __call__(self, *args, **kwargs):
        b = self.bind(*args, **kwargs)
        b.launch()
        return b.out


def family_params(p: dict) -> tuple[dict, dict]:
    """The rope_rmsnorm_quant and mla_decode parameters of a branch's shape parameters (for the
    references and the torch composition; the tile choices do not matter there)."""
    rope = families.get("rope_rmsnorm_quant").validate(dict(
        num_heads=p["num_heads"], page_size=p["page_size"], cache_dtype=p["cache_dtype"],
        quant_granularity=p.get("quant_granularity", 64), rope_layout=p.get("rope_layout", "interleaved"),
        gamma_dtype=p.get("gamma_dtype", "bf16")))
    dec = families.get("mla_decode").validate(dict(
        num_heads=p["num_heads"], q_len=p["q_len"], page_size=p["page_size"], cache_dtype=p["cache_dtype"],
        quant_granularity=p.get("quant_granularity", 64), sparse=p["sparse"], topk=p.get("topk", 2048),
        attn_sink=p["attn_sink"], tile_n=32, stages=2))
    return rope, dec


def rope_args(q, q_full, kv_input, input_row_offsets, freqs_cis, kv_norm_gamma, cache: PagedLatentCache,
              layer_idx: int, eps: float) -> dict:
    """rope_rmsnorm_quant's arguments for a branch step: q_rope' goes into q_full's rope columns."""
    a = dict(input_row_offsets=input_row_offsets, q_rope=q[:, :, NOPE:], q_rope_out=q_full[:, :, LAT:],
             kv_input=kv_input, freqs_cis=freqs_cis, gamma=kv_norm_gamma, kv_cache=cache.kv_cache,
             page_table=cache.page_table, cache_lengths=cache.cache_lengths, layer_idx=int(layer_idx), eps=float(eps))
    if cache.kv_scales is not None:
        a["kv_scales"] = cache.kv_scales
    return a


def _rows(q, name):
    """[T, H, X] -> a [T*H, X] view without copying (the (T, H) modes must merge)."""
    T, H, X = q.shape
    if q.stride(0) != H * q.stride(1) or q.stride(2) != 1:
        raise ArgumentError(f"mla_decode_branch: {name} rows must be compact over (T, H) with unit element stride; "
                            f"strides {tuple(q.stride())}")
    return q.as_strided((T * H, X), (q.stride(1), 1))


def _check_weight(name, w, s, H, K, N):
    import torch
    if tuple(w.shape) != (H, K, N) or w.dtype != torch.float8_e4m3fn:
        raise ArgumentError(f"mla_decode_branch: {name} must be [{H}, {K}, {N}] fp8 e4m3 (heads, k, n); got "
                            f"{tuple(w.shape)} {w.dtype}")
    if w.stride(1) != 1:
        raise ArgumentError(f"mla_decode_branch: {name} must have its k dimension ({K}) contiguous, e.g. "
                            f"w_kn.transpose(1, 2) of a contiguous [{H}, {N}, {K}] tensor; strides {tuple(w.stride())}")
    want = (H, -(-K // QB), -(-N // QB))
    if tuple(s.shape) != want or s.dtype != torch.float32:
        raise ArgumentError(f"mla_decode_branch: {name}_scale must be {list(want)} float32 (one per 128 x 128 block); "
                            f"got {tuple(s.shape)} {s.dtype}")


_PLANS: dict = {}


def mla_decode_branch(q, kv_input, input_row_offsets, freqs_cis, kv_norm_gamma, cache: PagedLatentCache, layer_idx: int,
                      scale: float, eps: float, w_uk, w_uk_scale, w_uv, w_uv_scale, *, sparse_indices=None,
                      topk_lengths=None, attn_sink=None, num_partitions: int | None = None, bundles=None,
                      rope_layout: str = "interleaved", table_path: str | None = None, stream: Any = None,
                      check_contents: bool = True):
    """The whole decode branch in one call (see the module docstring); returns [T, H, 128] bf16.

    Bundles come from ``bundles`` (default ``$MLAGEN_BUNDLES`` or ``build``); the plan is cached per
    shape, the launches are checked and packed on every call.  For a serving loop, build an
    :class:`MLADecodeBranch`, ``bind`` once per batch shape and replay ``launch()``."""
    root = bundles or os.environ.get("MLAGEN_BUNDLES", "build")
    p = branch_params(q, cache, input_row_offsets, sparse_indices, attn_sink, kv_norm_gamma, rope_layout)
    key = (str(root), table_path, tuple(sorted(p.items())))
    if key not in _PLANS:
        _PLANS[key] = MLADecodeBranch(root, table_path=table_path, **p)
    return _PLANS[key](q, kv_input, input_row_offsets, freqs_cis, kv_norm_gamma, cache, layer_idx, scale, eps, w_uk,
                       w_uk_scale, w_uv, w_uv_scale, sparse_indices=sparse_indices, topk_lengths=topk_lengths,
                       attn_sink=attn_sink, num_partitions=num_partitions, stream=stream,
                       check_contents=check_contents)


# --------------------------------------------------------------------------------------------
# Problems and the float64 reference (numpy)
# --------------------------------------------------------------------------------------------
def make_problem(p: dict, B: int, C: int, rng: np.random.Generator, layers: int = 2) -> dict:
    """A decode step: B sequences with 0..C cached tokens (random pages, NaN in unowned slots), q_len new
    tokens each, DeepSeek-like weights quantised to fp8 by 128 x 128 blocks.  numpy arrays."""
    from .families.fp8_gemm import _quantize_blocks
    from .families.mla_decode import quantize_rows
    from .families.base import random_page_table
    from .families.rope_rmsnorm_quant import rope_freqs
    from .numerics import round_to
    H, ql, ps = p["num_heads"], p["q_len"], p["page_size"]
    T = B * ql
    lens = rng.integers(0, C + 1, B)
    end = lens + ql
    pt, NP = random_page_table(rng, -(-end // ps), spare=2)
    cache = np.full((layers, NP, ps, 1, D), np.nan, np.float32)
    layer = layers - 1
    for b in range(B):
        t = np.arange(int(lens[b]))
        cache[layer, pt[b, t // ps], t % ps, 0, :] = rng.standard_normal((len(t), D))
    extra = {}
    if p["cache_dtype"] == "f8e4m3":
        cache, extra["kv_scales"] = quantize_rows(cache, p["quant_granularity"])
    else:
        cache = round_to(cache, "bf16")
    P = int(end.max()) + 3
    freqs = rope_freqs(P, ROPE)
    w_uk, w_uk_s = _quantize_blocks(rng.standard_normal((H, LAT, NOPE)).astype(np.float32) * 0.05, QB)
    w_uv, w_uv_s = _quantize_blocks(rng.standard_normal((H, VDIM, LAT)).astype(np.float32) * 0.05, QB)
    x = dict(q=round_to(rng.standard_normal((T, H, NOPE + ROPE)), "bf16"),
             kv_input=round_to(rng.standard_normal((T, D)) * 1.5, "bf16"),
             input_row_offsets=(np.arange(B + 1) * ql).astype(np.uint32), freqs_cis=freqs,
             kv_norm_gamma=round_to(1.0 + 0.2 * rng.standard_normal(LAT), p.get("gamma_dtype", "bf16")),
             kv_cache=cache, page_table=pt, cache_lengths=lens.astype(np.int32), layer_idx=layer,
             scale=1.0 / math.sqrt(NOPE + ROPE), eps=1e-6,
             # weights in the kernels' (n, k) storage; the math-order views are their transposes
             w_uk_nk=w_uk, w_uk_scale_nk=w_uk_s, w_uv_nk=w_uv, w_uv_scale_nk=w_uv_s, **extra)
    if p["sparse"]:
        K = p["topk"]
        idx = np.full((B, ql, K), -1, np.int32)
        tl = np.zeros((B, ql), np.int32)
        for b in range(B):
            n = int(end[b])
            for s in range(ql):
                m = int(rng.integers(1, K + 1))
                take = min(m, n)
                idx[b, s, :take] = rng.choice(n, take, replace=False)
                tl[b, s] = m
        x["sparse_indices"], x["topk_lengths"] = idx, tl
    if p["attn_sink"]:
        x["attn_sink"] = rng.uniform(-1.0, 3.0, H).astype(np.float32)
    return x


def reference(p: dict, x: dict) -> dict:
    """float64 reference of the whole branch: every stored intermediate rounded as the plan stores it
    (bf16 q, the fp8 cache rows and 1 x 128 activation codes), all arithmetic in float64, weights
    dequantised.  Returns out [T, H, 128], the updated cache layer and the decode's q."""
    from .families.fp8_gemm import _dequant
    from .numerics import quantize_fp8_rows, round_to
    rope = families.get("rope_rmsnorm_quant")
    dec = families.get("mla_decode")
    H, ql = p["num_heads"], p["q_len"]
    T = x["q"].shape[0]
    B = T // ql
    rp, dp = family_params(p)
    rin = dict(input_row_offsets=x["input_row_offsets"], q_rope=x["q"][:, :, NOPE:], kv_input=x["kv_input"],
               freqs_cis=x["freqs_cis"], gamma=x["kv_norm_gamma"], page_table=x["page_table"],
               cache_lengths=x["cache_lengths"], eps=x["eps"])
    r = rope.reference(rp, rin, precision="f64")
    cache = x["kv_cache"].copy()
    scales = x["kv_scales"].copy() if "kv_scales" in x else None
    L = x["layer_idx"]
    for t, page, slot in rope.token_slots(rp, rin):
        if scales is None:
            cache[L, page, slot, 0] = round_to(r["rows"][t], "bf16")
        else:
            cache[L, page, slot, 0] = r["rows_q"][t]
            scales[L, page, slot, 0] = r["scales"][t]
    w_uk = _dequant(x["w_uk_nk"], x["w_uk_scale_nk"], QB)        # [H, 512, 128] (n, k)
    w_uv = _dequant(x["w_uv_nk"], x["w_uv_scale_nk"], QB)        # [H, 128, 512]
    qn8, qn_s = quantize_fp8_rows(x["q"][:, :, :NOPE].astype(np.float32), QB)
    qn = qn8.astype(np.float64) * qn_s.astype(np.float64)        # [T, H, 128]
    q_lat = np.einsum("thk,hnk->thn", qn, w_uk)
    q_full = np.concatenate([round_to(q_lat, "bf16"), round_to(r["q_rope_out"], "bf16")], axis=-1)
    din = dict(q=q_full.reshape(B, ql, H, D), kv_cache=cache, page_table=x["page_table"],
               kv_lengths=x["cache_lengths"], kv_len_offset=ql, layer_idx=L, softmax_scale=x["scale"])
    if scales is not None:
        din["kv_scales"] = scales
    if p["sparse"]:
        din["indices"], din["topk_lengths"] = x["sparse_indices"], x["topk_lengths"]
    if p["attn_sink"]:
        din["attn_sink"] = x["attn_sink"]
    o = dec.reference(dp, din)["out"].reshape(T, H, LAT)
    o8, o_s = quantize_fp8_rows(round_to(o, "bf16"), QB)
    od = (o8.astype(np.float64).reshape(T, H, LAT // QB, QB) * o_s[..., None]).reshape(T, H, LAT)
    out = np.einsum("thk,hnk->thn", od, w_uv)
    res = dict(out=out, q_full=q_full, o=o, cache_layer=cache[L])
    if scales is not None:
        res["scales_layer"] = scales[L]
    return res


def torch_inputs(p: dict, x: dict, device="cuda") -> tuple[tuple, dict]:
    """(positional args, keyword args) of ``MLADecodeBranch.bind`` as CUDA tensors, from make_problem's arrays."""
    from .interop import to_torch
    cache = PagedLatentCache(to_torch(x["kv_cache"], p["cache_dtype"], device), to_torch(x["page_table"], "i32", device),
                             to_torch(x["cache_lengths"], "i32", device),
                             to_torch(x["kv_scales"], "f32", device) if "kv_scales" in x else None)
    w_uk = to_torch(x["w_uk_nk"], "f8e4m3", device).transpose(1, 2)              # [H, 128, 512], k contiguous
    w_uv = to_torch(x["w_uv_nk"], "f8e4m3", device).transpose(1, 2)              # [H, 512, 128]
    args = (to_torch(x["q"], "bf16", device), to_torch(x["kv_input"], "bf16", device),
            to_torch(x["input_row_offsets"], "u32", device), to_torch(x["freqs_cis"], "f32", device),
            to_torch(x["kv_norm_gamma"], p.get("gamma_dtype", "bf16"), device), cache, int(x["layer_idx"]),
            float(x["scale"]), float(x["eps"]), w_uk, to_torch(x["w_uk_scale_nk"], "f32", device).transpose(1, 2),
            w_uv, to_torch(x["w_uv_scale_nk"], "f32", device).transpose(1, 2))
    kw = {}
    if p["sparse"]:
        kw["sparse_indices"] = to_torch(x["sparse_indices"], "i32", device)
        kw["topk_lengths"] = to_torch(x["topk_lengths"], "i32", device)
    if p["attn_sink"]:
        kw["attn_sink"] = to_torch(x["attn_sink"], "f32", device)
    return args, kw


# --------------------------------------------------------------------------------------------
# Benchmark: the plan against the same branch in torch, and against the sum of its parts
# --------------------------------------------------------------------------------------------
class BranchSpec:
    """What a bench row needs to know of the branch (it is a composition, not a template family)."""
    name = "mla_decode_branch"
    shape_params = ("num_heads", "q_len", "page_size", "cache_dtype", "sparse")

    def kv_tokens(self, p, dims) -> int:
        if p["sparse"]:
            return dims["B"] * p["q_len"] * min(p["topk"], dims["C"])
        return dims["B"] * dims["C"]

    def bytes_moved(self, p, dims):
        H, T = p["num_heads"], dims["B"] * p["q_len"]
        per_tok = 2 * D if p["cache_dtype"] == "bf16" else D + 4 * (D // p.get("quant_granularity", 64))
        weights = H * (NOPE * LAT + LAT * VDIM) + 4 * H * 2 * (LAT // QB)
        acts = T * H * ((NOPE + ROPE) * 2 + VDIM * 2) + T * D * 2 + T * per_tok
        return self.kv_tokens(p, dims) * per_tok + weights + acts

    def flops(self, p, dims):
        H, T = p["num_heads"], dims["B"] * p["q_len"]
        rows = H * (1 if p["sparse"] else p["q_len"])
        return 2 * T * H * (NOPE * LAT + LAT * VDIM) + 2 * rows * self.kv_tokens(p, dims) * (D + LAT)

    def baseline_desc(self, p) -> str:
        return ("torch: rope/rmsnorm/quant scatter, 1x128 fp8 quantisation, projections as bf16 bmm with the fp8 weights "
                "dequantised once (torch_bmm) or per-head torch._scaled_mm blockwise (torch_scaled_mm), "
                "decode as page gather + bf16 matmuls + float32 softmax")


SPEC = BranchSpec()


def torch_problem(p: dict, B: int, C: int, seed: int = 0):
    """A decode step built on the GPU: sequences of C tokens after this step (C - q_len cached before)."""
    import torch
    from .families.mla_decode.plan import torch_problem as decode_problem
    from .families.rope_rmsnorm_quant import rope_freqs
    dp = dict(p, topk=p.get("topk", 2048), quant_granularity=p.get("quant_granularity", 64))
    t, kw = decode_problem(dp, B, C, seed=seed)
    H, ql = p["num_heads"], p["q_len"]
    T = B * ql
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    cache = PagedLatentCache(t["kv_cache"], t["page_table"], (t["kv_lengths"] - ql).contiguous(), kw.get("kv_scales"))
    P = C + 1
    freqs = torch.from_numpy(rope_freqs(P, ROPE)).cuda()

    def weight(h, n, k):
        w = torch.randn((h, n, k), generator=g, device="cuda") * 0.05
        blk = w.view(h, n // QB, QB, k // QB, QB)
        s = blk.abs().amax((2, 4)).clamp_min(1e-12) / 448.0
        q8 = (blk / s[:, :, None, :, None]).view(h, n, k).to(torch.float8_e4m3fn)
        return q8.transpose(1, 2), s.transpose(1, 2).contiguous()          # math order [H, k, n], k contiguous
    w_uk, w_uk_s = weight(H, LAT, NOPE)
    w_uv, w_uv_s = weight(H, VDIM, LAT)
    q = torch.randn((T, H, NOPE + ROPE), generator=g, device="cuda").to(torch.bfloat16)
    kv_input = (torch.randn((T, D), generator=g, device="cuda") * 1.5).to(torch.bfloat16)
    off = (torch.arange(B + 1, device="cuda", dtype=torch.int32) * ql).view(torch.uint32)
    gamma = (1.0 + 0.2 * torch.randn((LAT,), generator=g, device="cuda")).to(torch.bfloat16)
    args = (q, kv_input, off, freqs, gamma, cache, int(kw["layer_idx"]), float(kw["softmax_scale"]), 1e-6,
            w_uk, w_uk_s, w_uv, w_uv_s)
    extra = {}
    if p["sparse"]:
        extra["sparse_indices"], extra["topk_lengths"] = kw["indices"], kw["topk_lengths"]
    if p["attn_sink"]:
        extra["attn_sink"] = kw["attn_sink"]
    return args, extra


class TorchBranch:
    """The same branch in torch ops; ``proj`` = "bmm" (bf16 weights dequantised once, outside the
    timed step) or "scaled_mm" (torch._scaled_mm blockwise, one call per head and projection)."""

    def __init__(self, p, args, extra, proj: str = "bmm"):
        import torch
        self.p, self.args, self.extra, self.proj = p, args, extra, proj
        q, _, _, _, _, cache, _, _, _, w_uk, w_uk_s, w_uv, w_uv_s = args
        T, H = q.shape[:2]
        self.q_full = torch.empty((T, H, D), dtype=torch.bfloat16, device=q.device)
        self.rope_p, self.dec_p = family_params(p)
        if proj == "bmm":
            self.w_uk = _dequant_torch(w_uk, w_uk_s).to(torch.bfloat16)        # [H, 128, 512]
            self.w_uv = _dequant_torch(w_uv, w_uv_s).to(torch.bfloat16)        # [H, 512, 128]
        self._mm_cache = [dict() for _ in range(2 * H)]

    def _project(self, x, w, ws, which):
        """x [T, H, K] bf16 -> 1x128 fp8 -> @ w -> [T, H, N] bf16."""
        import torch
        from .families.fp8_gemm import _scaled_mm_blockwise
        T, H, K = x.shape
        t = dict(x=x.reshape(T * H, K), q=torch.empty((T * H, K), dtype=torch.float8_e4m3fn, device=x.device),
                 scales=torch.empty((T * H, K // QB), dtype=torch.float32, device=x.device))
        families.get("act_quant_fp8").torch_impl(dict(group=QB), t)          # act_quant_fp8's recipe in torch
        x8, s = t["q"].view(T, H, K), t["scales"].view(T, H, K // QB)
        if self.proj == "bmm":
            xd = (x8.float().view(T, H, K // QB, QB) * s[..., None]).view(T, H, K).to(torch.bfloat16)
            return torch.bmm(xd.transpose(0, 1), self.w_uk if which == 0 else self.w_uv).transpose(0, 1)
        from .families.fp8_gemm import _SCALED_MM_FORM
        x8h = x8.transpose(0, 1).contiguous()                 # [H, T, K]: each head's A row-major
        outs = []
        for h in range(H):
            o = _scaled_mm_blockwise(x8h[h], w[h].t(), s[:, h], ws[h].t(), self._mm_cache[which * H + h])
            if o is None:
                raise RuntimeError(f"torch._scaled_mm: {_SCALED_MM_FORM[0] if _SCALED_MM_FORM else 'rejected'}")
            outs.append(o)
        return torch.stack(outs, 1)

    def __call__(self):
        from .families.mla_decode.plan import torch_reference
        q, kv_input, off, freqs, gamma, cache, layer, scale, eps, w_uk, w_uk_s, w_uv, w_uv_s = self.args
        p = self.p
        families.get("rope_rmsnorm_quant").torch_impl(
            self.rope_p, rope_args(q, self.q_full, kv_input, off, freqs, gamma, cache, layer, eps))
        self.q_full[:, :, :LAT] = self._project(q[:, :, :NOPE], w_uk, w_uk_s, 0)
        T, H = q.shape[:2]
        B = cache.page_table.shape[0]
        ql = T // B
        dt = dict(q=self.q_full.view(B, ql, H, D), kv_cache=cache.kv_cache, page_table=cache.page_table,
                  kv_lengths=cache.cache_lengths + ql)
        dkw = dict(layer_idx=layer, softmax_scale=scale)
        if cache.kv_scales is not None:
            dkw["kv_scales"] = cache.kv_scales
        if p["sparse"]:
            dkw["indices"], dkw["topk_lengths"] = self.extra["sparse_indices"], self.extra["topk_lengths"]
        if p["attn_sink"]:
            dkw["attn_sink"] = self.extra["attn_sink"]
        o, _ = torch_reference(self.dec_p, dt, dkw)
        return self._project(o.view(T, H, LAT), w_uv, w_uv_s, 1)


def _dequant_torch(w, s):
    """fp8 [H, K, N] (math order) with [H, K/128, N/128] scales -> float32."""
    H, K, N = w.shape
    return (w.float().view(H, K // QB, QB, N // QB, QB) * s[:, :, None, :, None]).view(H, K, N)


def bench(root, shapes, warmup: int = 5, reps: int = 20, with_torch: bool = True, table_path: str | None = None,
          ceilings: dict | None = None, log=print) -> list[dict]:
    """Per shape dict (num_heads, B, C, and optional q_len, page_size, cache_dtype, quant_granularity,
    sparse, topk): rows for the plan (eager launches and a CUDA-graph replay), each part on its own, the
    sum of the parts, and the torch compositions."""
    import json
    import torch
    from . import bench as B_
    from .env import git_commit, now_utc
    ceilings = ceilings or B_.measure_ceilings()
    timer = B_.Timer(warmup, reps)
    dev, commit, date = torch.cuda.get_device_name(0), git_commit(), now_utc()
    rows = []
    plans: dict = {}
    for shape in shapes:
        p = dict(num_heads=int(shape["H"]), q_len=int(shape.get("q_len", 1)), page_size=int(shape.get("page_size", 64)),
                 cache_dtype="f8e4m3" if shape.get("fp8", 0) else "bf16", sparse=bool(shape.get("sparse", 0)),
                 attn_sink=False, quant_granularity=int(shape.get("g", 64)), topk=int(shape.get("topk", 2048)))
        Bn, C = int(shape["B"]), int(shape["C"])
        dims = dict(B=Bn, C=C)
        key = json.dumps(p, sort_keys=True)
        try:
            if key not in plans:
                plans[key] = MLADecodeBranch(root, table_path=table_path, **p)
        except FileNotFoundError as e:
            log(f"skip {shape}: {e}")
            continue
        plan = plans[key]
        args, extra = torch_problem(p, Bn, C)
        step = plan.bind(*args, **extra, max_len=C)
        step.launch()
        torch.cuda.synchronize()

        def add(impl, r, err=float("nan"), eager=None, **more):
            rw = B_.row(SPEC, None, impl, dict(p, num_partitions=step.num_partitions), dims, shape, r, ceilings, dev,
                        commit, date, err, eager)
            rw["pct_bf16"] = 100.0 * rw["tflops"] / ceilings["bf16_tflops"]
            rw["kernel"] = impl
            rw.update(more)
            rows.append(rw)
            return rw

        eager = {}
        ref = None
        if with_torch:
            for proj in ("bmm", "scaled_mm"):
                try:
                    tb = TorchBranch(p, args, extra, proj)
                    o = tb()
                    torch.cuda.synchronize()
                    if ref is None:
                        ref = o.double()
                    rt = timer(tb)
                    eager[proj] = rt["time_us"]
                    add(f"torch_{proj}", rt)
                except (RuntimeError, torch.OutOfMemoryError) as e:
                    log(f"torch {proj} failed at {shape}: {type(e).__name__}: {str(e)[:120]}")
                    torch.cuda.empty_cache()
        best_torch = min(eager.values()) if eager else None
        err = ((step.out.double() - ref).norm() / ref.norm()).item() if ref is not None else float("nan")
        r = timer(step.launch)
        main = add("mlagen", r, err, best_torch, launches=len(step.steps), steps=json.dumps(step.kernels))
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            gstep = plan.bind(*args, **extra, max_len=C, stream=s, check_contents=False)
            gstep.launch()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=s):
                gstep.launch()
        torch.cuda.synchronize()
        rg = timer(graph.replay)
        add("mlagen_graph", rg, err, best_torch, launches=len(step.steps))
        parts = {}
        for name, b in step.steps:
            rp = timer(b.launch)
            parts[name] = rp["time_us"]
        total = sum(parts.values())
        add("mlagen_parts_sum", dict(time_us=total, p10_us=total, p90_us=total, reps=reps), err, best_torch,
            parts=json.dumps(parts))
        log(f"branch {key} B={Bn} C={C} P={step.num_partitions}: {r['time_us']:.1f} us eager, "
            f"{rg['time_us']:.1f} us graph, parts {total:.1f} us ({main['gbps']:.0f} GB/s, {main['pct_copy']:.0f}% copy), "
            + ", ".join(f"torch_{k} {v:.0f} us ({v / rg['time_us']:.1f}x)" for k, v in eager.items())
            + f"; err vs torch {err:.1e}")
        args = extra = step = gstep = graph = ref = None
        torch.cuda.empty_cache()
    return rows


BENCH_SHAPES = ([dict(H=h, B=b, C=c) for h in (16, 128) for b in (1, 32, 128) for c in (1024, 8192, 32768)]
                + [dict(H=h, B=b, C=c, fp8=1) for h in (16, 128) for b in (32, 128) for c in (4096,)]
                + [dict(H=h, B=64, C=4096, q_len=2) for h in (16, 128)])

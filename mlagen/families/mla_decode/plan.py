"""MLADecode: split-KV MLA decode as one call (decode kernel + combine kernel), built once per batch shape.

    dec = MLADecode.from_dir("build/gpu/test", num_heads=128, q_len=1, page_size=64)
    out, lse = dec(q, kv_cache, page_table, kv_lengths, layer_idx=3, softmax_scale=s)

``bind`` checks and packs both launches once (workspace allocated, partition count fixed) and returns a
:class:`BoundMLADecode` whose ``launch()`` is two cuLaunchKernel calls and no host work: what a serving
loop replays or a CUDA graph captures.  Tensors are torch tensors in the usual layouts::

    q           [B, q_len, H, 576] bf16 (rows compact: the (q_len, H) modes must be viewable as one)
    kv_cache    [L, pages, page_size, 1, 576] bf16 or fp8 e4m3 (the rope_rmsnorm_quant layout)
    kv_scales   [L, pages, page_size, 1, 576 / quant_granularity] float32 (fp8 bundles)
    page_table  [B, max_pages] int32;  kv_lengths [B] int32 (the new tokens included)
    indices     [B, q_len, topk] int32, topk_lengths [B, q_len] int32 (sparse bundles)
    attn_sink   [H] float32 (sink bundles)
    out         [B, q_len, H, 512] bf16;  lse [B, q_len, H] float32 (natural log)
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ...abi import ArgumentError
from ... import runtime
from . import DV, family as DECODE

sm_count = runtime.sm_count


def default_partitions(p: dict, batch: int, max_len: int, sms: int) -> int:
    """KV partitions per sequence when the caller gives none: enough CTAs for one wave of the SMs
    (one 230 KB CTA per SM), but at least two KV tiles per partition."""
    row_blocks = DECODE.row_blocks(p)
    n = max(1, max_len if not p["sparse"] else min(max_len, p["topk"]))
    tiles = -(-n // p["tile_n"])
    want = max(1, sms // max(1, row_blocks * batch))
    return int(max(1, min(want, tiles // 2, 64)))     # beyond 64 the combine's reads cost more than they save


def pick_kernels(root, family: str, want: dict, table=None):
    """A Dispatcher over the ``family`` bundles under ``root`` whose parameters agree with ``want``
    (names a family lacks are ignored), or None."""
    ks = [runtime.Kernel(b) for b in runtime.find_bundles(root, family)]
    ks = [k for k in ks if all(k.params.get(n, v) == v for n, v in want.items())]
    return runtime.Dispatcher(ks, table) if ks else None


def bf16_combine(combines, p: dict):
    """A Dispatcher over the bf16-output combine kernels that merge decode ``p``'s partitions (its prefer rule
    picks per call), or None."""
    cands = [c for c in combines if c.params.get("out_dtype", "bf16") == "bf16"
             and all(c.params[n] == p[n] for n in ("num_heads", "q_len", "attn_sink"))]
    return runtime.Dispatcher(cands) if cands else None


def first_kernel(k):
    """A kernel of a Kernel-or-Dispatcher (its shape parameters are every candidate's)."""
    return k.kernels[0] if isinstance(k, runtime.Dispatcher) else k


def restrict(k, keep):
    """A Kernel-or-Dispatcher cut to the candidates ``keep(kernel)`` accepts (None if none)."""
    if isinstance(k, runtime.Dispatcher):
        return k.restrict(keep)
    return k if keep(k) else None


def pick(k, args, hint=None):
    """The kernel of a Kernel-or-Dispatcher that runs the call ``args`` (``hint``: sizes the arguments do not
    show, e.g. the context length C that tuned tables bucket by)."""
    return k.select(args, hint) if isinstance(k, runtime.Dispatcher) else k


class BoundMLADecode:
    def __init__(self, launches, out, lse, num_partitions, out_scales=None):
        self.launches, self.out, self.lse, self.num_partitions = launches, out, lse, num_partitions
        self.out_scales = out_scales

    def launch(self) -> None:
        for b in self.launches:
            b.launch()


class MLADecode:
    def __init__(self, decode, combine):
        self.decode = decode          # runtime.Kernel or runtime.Dispatcher of mla_decode
        self.combine = combine        # ... of mla_combine (None: only one partition is ever used)

    @classmethod
    def from_dir(cls, root, table_path: str | None = None, out_dtype: str = "bf16", **shape) -> "MLADecode":
        """Bundles under ``root`` whose parameters match ``shape`` (e.g. num_heads=16, page_size=64);
        ``out_dtype="f8e4m3"`` takes the combine bundles that quantise their output."""
        table = json.loads(Path(table_path).read_text()) if table_path else None
        dec = pick_kernels(root, "mla_decode", shape, table)
        if dec is None:
            raise FileNotFoundError(f"no mla_decode bundle under {root} matches {shape}")
        return cls(dec, pick_kernels(root, "mla_combine", dict(shape, out_dtype=out_dtype), table))

    # ---- views in the kernels' orders ----
    @staticmethod
    def views(p: dict, q, kv_cache, out, lse):
        B, ql, h, d = q.shape
        if p["sparse"]:
            qv = q.reshape(B * ql, h, d).permute(1, 2, 0)
        else:
            qv = q.reshape(B, ql * h, d).permute(1, 2, 0)
        L = kv_cache.shape[0]
        kv = kv_cache.reshape(L, -1, kv_cache.shape[-1]).permute(1, 2, 0)
        return qv, kv, out.reshape(B, ql * h, DV).permute(1, 2, 0), lse.reshape(B, ql * h).permute(1, 0)

    def bind(self, q, kv_cache, page_table, kv_lengths, *, layer_idx: int = 0, softmax_scale: float | None = None,
             kv_scales=None, indices=None, topk_lengths=None, attn_sink=None, num_partitions: int | None = None,
             out=None, lse=None, out_scales=None, kv_len_offset: int = 0, max_len: int | None = None,
             stream: Any = None, check_contents: bool = True) -> BoundMLADecode:
        """``kv_len_offset`` is added to every length (q_len when ``kv_lengths`` counts only the tokens
        cached before this step).  With an fp8-output combine bundle (``out_dtype=f8e4m3``, at least two
        partitions) ``out`` is fp8 e4m3 and ``out_scales`` [B, q_len, H, 4] float32 holds its 1 x 128 scales."""
        import torch
        if q.dim() != 4:
            raise ArgumentError(f"mla_decode: q must be [B, q_len, H, 576]; got shape {tuple(q.shape)}")
        if kv_cache.dim() != 5:
            raise ArgumentError(f"mla_decode: kv_cache must be [L, pages, page_size, 1, 576]; got {tuple(kv_cache.shape)}")
        B, ql, h, _ = q.shape
        fp8_out = self.combine is not None and first_kernel(self.combine).params.get("out_dtype", "bf16") == "f8e4m3"
        if out is None:
            out = torch.empty((B, ql, h, DV), dtype=torch.float8_e4m3fn if fp8_out else torch.bfloat16,
                              device=q.device)
        if fp8_out and out_scales is None:
            out_scales = torch.empty((B, ql, h, DV // 128), dtype=torch.float32, device=q.device)
        if lse is None:
            lse = torch.empty((B, ql, h), dtype=torch.float32, device=q.device)
        args = dict(page_table=page_table, kv_lengths=kv_lengths, layer_idx=int(layer_idx),
                    kv_len_offset=int(kv_len_offset))
        if softmax_scale is not None:
            args["softmax_scale"] = float(softmax_scale)
        if indices is not None:
            args["indices"], args["topk_lengths"] = indices, topk_lengths
        if attn_sink is not None:
            args["attn_sink"] = attn_sink
        if kv_scales is not None:       # [L, pages, page_size, 1, NB] -> (slots, NB, L)
            args["kv_scales"] = kv_scales.reshape(kv_scales.shape[0], -1, kv_scales.shape[-1]).permute(1, 2, 0)
        dec = self.decode
        # the views depend only on shape parameters, which every candidate of the dispatcher shares
        p = first_kernel(dec).params
        qv, kv, ov, lv = self.views(p, q, kv_cache, out, lse)
        dummy_o = torch.empty((DV,), dtype=torch.float32, device=q.device).as_strided((ql * h, DV, 1, B), (0, 1, 0, 0))
        dummy_l = torch.empty((1,), dtype=torch.float32, device=q.device).as_strided((ql * h, 1, B), (0, 0, 0))
        # an fp8-output combine writes `out`; the decode kernel (several partitions) never does: a bf16 dummy
        dec_out = (torch.empty((DV,), dtype=torch.bfloat16, device=q.device).as_strided((ql * h, DV, B), (0, 1, 0))
                   if fp8_out else ov)
        call = dict(args, q=qv, kv=kv, out=dec_out, lse=lv)
        if num_partitions is None and max_len is None:               # synchronises; pass max_len to avoid
            max_len = int(kv_lengths.max().item()) + int(kv_len_offset) if B else 0
        # choose with a one-partition workspace view (the partition count does not change the choice); a tuned
        # table buckets by the context length too, when it is known
        k = pick(dec, dict(call, o_part=dummy_o, lse_part=dummy_l), None if max_len is None else {"C": int(max_len)})
        p = k.params
        if p["sparse"] != (indices is not None):
            raise ArgumentError("mla_decode: pass indices and topk_lengths exactly when the bundle is sparse")
        if p["attn_sink"] != (attn_sink is not None):
            raise ArgumentError("mla_decode: pass attn_sink exactly when the bundle has a sink")
        if num_partitions is None:
            num_partitions = default_partitions(p, B, max_len, sm_count(q.device.index or 0))
        num_partitions = int(num_partitions)
        if num_partitions < 1:
            raise ArgumentError(f"mla_decode: num_partitions={num_partitions} must be >= 1")
        if fp8_out and num_partitions == 1:
            raise ArgumentError("mla_decode: an fp8-output combine needs num_partitions >= 2 (with one partition "
                                "the decode kernel writes bf16 itself; use a bf16 combine and quantise after)")
        launches = []
        if num_partitions == 1:
            launches.append(k.bind(stream=stream, check_contents=check_contents,
                                   **dict(call, o_part=dummy_o, lse_part=dummy_l)))
        else:
            if self.combine is None:
                raise ArgumentError("mla_decode: num_partitions > 1 needs an mla_combine bundle")
            R = ql * h
            o_part = torch.empty((B, num_partitions, R, DV), dtype=torch.float32, device=q.device)
            l_part = torch.empty((B, num_partitions, R), dtype=torch.float32, device=q.device)
            opv, lpv = o_part.permute(2, 3, 1, 0), l_part.permute(2, 1, 0)
            launches.append(k.bind(stream=stream, check_contents=check_contents,
                                   **dict(call, o_part=opv, lse_part=lpv)))
            cargs = dict(o_part=opv, lse_part=lpv, out=ov, lse=lv)
            if fp8_out:
                cargs["out_scales"] = out_scales.reshape(B, ql * h, DV // 128).permute(1, 2, 0)
            if attn_sink is not None:
                cargs["attn_sink"] = attn_sink
            comb = pick(self.combine, cargs)
            launches.append(comb.bind(stream=stream, check_contents=False, **cargs))
        return BoundMLADecode(launches, out, lse, num_partitions, out_scales)

    def __call__(self, *args, **kwargs):
        b = self.bind(*args, **kwargs)
        b.launch()
        return b.out, b.lse


# --------------------------------------------------------------------------------------------
# Benchmark: the plan (decode + combine) against the same math in torch, on GPU-built problems
# --------------------------------------------------------------------------------------------
def torch_problem(p: dict, B: int, C: int, uniform: bool = True, seed: int = 0, layers: int = 1):
    """A decode problem built on the GPU (host numpy would take minutes at B=128, C=32k)."""
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    ps, h, ql = p["page_size"], p["num_heads"], p["q_len"]
    lens = (torch.full((B,), C, dtype=torch.int32, device="cuda") if uniform else
            torch.randint(max(1, ql), C + 1, (B,), generator=g, device="cuda", dtype=torch.int32))
    mp = -(-C // ps)
    npages = B * mp + 1
    perm = torch.randperm(npages, generator=g, device="cuda").to(torch.int32)
    pt = perm[:B * mp].view(B, mp).contiguous()
    cache = torch.randn((layers, npages, ps, 1, 576), generator=g, device="cuda", dtype=torch.float32)
    extra = {}
    if p["cache_dtype"] == "f8e4m3":
        gq = p["quant_granularity"]
        blk = cache.view(layers, npages, ps, 1, 576 // gq, gq)
        sc = blk.abs().amax(-1).clamp_min(1e-30) / 448.0
        cache = (blk / sc[..., None]).view(cache.shape).to(torch.float8_e4m3fn)
        extra["kv_scales"] = sc.contiguous()
    else:
        cache = cache.to(torch.bfloat16)
    q = torch.randn((B, ql, h, 576), generator=g, device="cuda", dtype=torch.float32).to(torch.bfloat16)
    kw = dict(layer_idx=layers - 1, softmax_scale=1.0 / math.sqrt(192.0), **extra)
    if p["sparse"]:
        K = p["topk"]
        n = min(K, C)
        idx = torch.stack([torch.randperm(C, generator=g, device="cuda")[:n] for _ in range(B * ql)]).to(torch.int32)
        if n < K:
            idx = torch.cat([idx, torch.full((B * ql, K - n), -1, dtype=torch.int32, device="cuda")], 1)
        kw["indices"] = idx.view(B, ql, K).contiguous()
        kw["topk_lengths"] = torch.full((B, ql), K, dtype=torch.int32, device="cuda")
    if p["attn_sink"]:
        kw["attn_sink"] = torch.rand((h,), generator=g, device="cuda") * 3 - 1
    return dict(q=q, kv_cache=cache, page_table=pt, kv_lengths=lens), kw


def torch_reference(p: dict, t: dict, kw: dict, chunk: int = 8):
    """The same math in torch ops (bf16 matmuls, float32 softmax), in sequence chunks."""
    import torch
    q, cache, pt, lens = t["q"], t["kv_cache"], t["page_table"], t["kv_lengths"]
    B, ql, h, _ = q.shape
    ps = p["page_size"]
    layer = kw["layer_idx"]
    scale = kw["softmax_scale"]
    n = int(lens.max().item()) if B else 0
    flat = cache[layer].view(-1, 576)
    if p["cache_dtype"] == "f8e4m3":       # dequantise the layer once (the torch path has no fused dequant)
        gq = p["quant_granularity"]
        sc = kw["kv_scales"][layer].reshape(-1, 576 // gq)
        flat = (flat.float().view(-1, 576 // gq, gq) * sc[..., None]).view(-1, 576).to(torch.bfloat16)
    pos = torch.arange(n, device=q.device)
    out = torch.empty((B, ql, h, DV), dtype=torch.bfloat16, device=q.device)
    lse = torch.empty((B, ql, h), dtype=torch.float32, device=q.device)
    for b0 in range(0, B, chunk):
        b1 = min(B, b0 + chunk)
        slots = pt[b0:b1, pos // ps].long() * ps + (pos % ps)
        kv = flat[slots]                                                  # [b, n, 576]
        qq = q[b0:b1].reshape(b1 - b0, ql * h, 576)
        s = torch.matmul(qq, kv.transpose(1, 2)).float() * scale          # [b, ql*h, n]
        if p["sparse"]:
            idx = kw["indices"][b0:b1].long()                             # [b, ql, K]
            valid = (idx >= 0) & (idx < lens[b0:b1, None, None])
            keep = torch.zeros((b1 - b0, ql, n + 1), dtype=torch.bool, device=q.device)
            keep.scatter_(2, torch.where(valid, idx, n), True)
            m = keep[..., :n].repeat_interleave(h, 1)
        else:
            qpos = torch.arange(ql, device=q.device).repeat_interleave(h)
            end = lens[b0:b1, None] - ql + 1 + qpos[None, :] if (p["causal"] and ql > 1) else lens[b0:b1, None].expand(-1, ql * h)
            m = pos[None, None, :] < end[..., None]
        s = s.masked_fill(~m, float("-inf"))
        if p["attn_sink"]:
            s = torch.cat([s, kw["attn_sink"].repeat(ql)[None, :, None].expand(b1 - b0, -1, 1)], 2)
        l = torch.logsumexp(s, -1)
        pr = torch.exp(s - l[..., None])[..., :n]
        o = torch.matmul(pr.to(torch.bfloat16), kv[..., :DV])
        out[b0:b1] = o.view(b1 - b0, ql, h, DV)
        lse[b0:b1] = l.view(b1 - b0, ql, h)
    return out, lse


def bench_plan(bundle_dirs, shapes=None, warmup: int = 5, reps: int = 30, with_torch: bool = True,
               ceilings: dict | None = None, partitions=(None,), log=print) -> list[dict]:
    """Time MLADecode (decode + combine) per bundle and shape; torch rows for the same problem."""
    import json as _json
    import torch
    from ... import bench as B_
    from ...env import git_commit, now_utc
    ks = [runtime.Kernel(b) for b in bundle_dirs]
    decs = [k for k in ks if k.family.name == "mla_decode"]
    combs = [k for k in ks if k.family.name == "mla_combine"]
    fam = DECODE
    ceilings = ceilings or B_.measure_ceilings()
    timer = B_.Timer(warmup, reps)
    dev, commit, date = torch.cuda.get_device_name(0), git_commit(), now_utc()
    shapes = shapes or fam.bench_shapes
    groups: dict[str, list] = {}
    for k in decs:
        groups.setdefault(_json.dumps({n: k.params[n] for n in fam.shape_params}, sort_keys=True), []).append(k)
    rows = []
    for key, group in groups.items():
        p0 = group[0].params
        for shape in shapes:
            B, C = int(shape["B"]), int(shape["C"])
            t, kw = torch_problem(p0, B, C, bool(shape.get("uniform", 1)))
            dims = dict(B=B, C=C, T=B * C)
            ref = None
            eager = None
            if with_torch:
                try:
                    ref = torch_reference(p0, t, kw)
                    r = timer(lambda: torch_reference(p0, t, kw))
                    eager = r["time_us"]
                    rw = B_.row(fam, None, "torch_eager", p0, dims, shape, r, ceilings, dev, commit, date, 0.0)
                    rw["baseline"] = "torch: gather pages, bf16 matmuls, float32 softmax (8-sequence chunks)"
                    rows.append(rw)
                except torch.OutOfMemoryError:
                    log(f"torch baseline out of memory at {shape}")
                    torch.cuda.empty_cache()
            for k in group:
                plan = MLADecode(k, bf16_combine(combs, k.params))
                for npart in partitions:
                    if npart is not None and npart > 1 and plan.combine is None:
                        continue
                    b = plan.bind(**t, **kw, num_partitions=npart, max_len=C)
                    b.launch()
                    torch.cuda.synchronize()
                    err = float("nan")
                    if ref is not None:
                        x, y = b.out.double(), ref[0].double()
                        err = ((x - y).norm() / y.norm()).item()
                    r = timer(b.launch)
                    rw = B_.row(fam, k, "mlagen", dict(k.params, num_partitions=b.num_partitions), dims, shape, r,
                                ceilings, dev, commit, date, err, eager)
                    rw["pct_bf16"] = 100.0 * rw["tflops"] / ceilings["bf16_tflops"]
                    rows.append(rw)
            best = min((x for x in rows if x["impl"] == "mlagen" and x["shape"] == _json.dumps(shape, sort_keys=True)
                        and x["group"] == key), key=lambda x: x["time_us"], default=None)
            if best:
                log(f"mla_decode {key} {shape}: {best['kernel']} P={_json.loads(best['params'])['num_partitions']} "
                    f"{best['time_us']:.1f} us  {best['gbps']:.0f} GB/s ({best['pct_copy']:.0f}% copy)  "
                    f"{best['tflops']:.0f} TFLOP/s ({best['pct_bf16']:.0f}% bf16)  "
                    f"{best.get('speedup_vs_eager', float('nan')):.2f}x torch  err {best['err_vs_torch_f32']:.1e}")
            t = kw = ref = None      # free the problem before the next shape
            torch.cuda.empty_cache()
    return rows

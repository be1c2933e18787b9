"""MLADecode: split-KV MLA decode as one call (decode kernel + combine kernel), built once per batch shape.

    dec = MLADecode.from_dir("build/gpu/test", num_heads=128, q_len=1, page_size=64)
    out, lse = dec(q, kv_cache, page_table, kv_lengths, layer_idx=3, softmax_scale=s)

``bind`` checks and packs both launches once (workspace allocated, partition count fixed) and returns a
:class:`BoundMLADecode` whose ``launch()`` is two cuLaunchKernel calls and no host work: what a serving
loop replays or a CUDA graph captures.  Tensors are torch tensors in the usual layouts::

    q           [B, q_len, H, 576] bf16 (rows compact: the (q_len, H) modes must be viewable as one)
    kv_cache    [L, pages, page_size, 1, 576] bf16 (the rope_rmsnorm_quant layout)
    page_table  [B, max_pages] int32;  kv_lengths [B] int32 (the new tokens included)
    indices     [B, q_len, topk] int32, topk_lengths [B, q_len] int32 (sparse bundles)
    attn_sink   [H] float32 (sink bundles)
    out         [B, q_len, H, 512] bf16;  lse [B, q_len, H] float32 (natural log)
"""
from __future__ import annotations

from typing import Any

from ...abi import ArgumentError
from ... import runtime
from . import BM, DV, family as DECODE

_SM_COUNT: dict[int, int] = {}


def sm_count(device: int = 0) -> int:
    if device not in _SM_COUNT:
        drv = runtime._driver()
        runtime._use_device(device)
        err, dev = drv.cuDeviceGet(device)
        runtime._check(err, "cuDeviceGet")
        attr = drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
        err, n = drv.cuDeviceGetAttribute(attr, dev)
        runtime._check(err, "cuDeviceGetAttribute")
        _SM_COUNT[device] = int(n)
    return _SM_COUNT[device]


def default_partitions(p: dict, batch: int, max_len: int, sms: int) -> int:
    """KV partitions per sequence when the caller gives none: enough CTAs for one wave of the SMs
    (one 230 KB CTA per SM), but at least two KV tiles per partition."""
    rows = p["num_heads"] * p["q_len"]
    row_blocks = p["q_len"] * -(-p["num_heads"] // BM) if p["sparse"] else -(-rows // BM)
    n = max(1, max_len if not p["sparse"] else min(max_len, p["topk"]))
    tiles = -(-n // p["tile_n"])
    want = max(1, sms // max(1, row_blocks * batch))
    return int(max(1, min(want, tiles // 2, 256)))


class BoundMLADecode:
    def __init__(self, launches, out, lse, num_partitions):
        self.launches, self.out, self.lse, self.num_partitions = launches, out, lse, num_partitions

    def launch(self) -> None:
        for b in self.launches:
            b.launch()


class MLADecode:
    def __init__(self, decode, combine):
        self.decode = decode          # runtime.Kernel or runtime.Dispatcher of mla_decode
        self.combine = combine        # ... of mla_combine (None: only one partition is ever used)

    @classmethod
    def from_dir(cls, root, table_path: str | None = None, **shape) -> "MLADecode":
        """Bundles under ``root`` whose parameters match ``shape`` (e.g. num_heads=16, page_size=64)."""
        def pick(fam):
            ks = [runtime.Kernel(b) for b in runtime.find_bundles(root, fam)]
            ks = [k for k in ks if all(k.params.get(n, v) == v for n, v in shape.items())]
            if not ks:
                return None
            import json
            from pathlib import Path
            table = json.loads(Path(table_path).read_text()) if table_path else None
            return runtime.Dispatcher(ks, table)
        dec = pick("mla_decode")
        if dec is None:
            raise FileNotFoundError(f"no mla_decode bundle under {root} matches {shape}")
        return cls(dec, pick("mla_combine"))

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
             indices=None, topk_lengths=None, attn_sink=None, num_partitions: int | None = None,
             out=None, lse=None, max_len: int | None = None, stream: Any = None,
             check_contents: bool = True) -> BoundMLADecode:
        import torch
        if q.dim() != 4:
            raise ArgumentError(f"mla_decode: q must be [B, q_len, H, 576]; got shape {tuple(q.shape)}")
        if kv_cache.dim() != 5:
            raise ArgumentError(f"mla_decode: kv_cache must be [L, pages, page_size, 1, 576]; got {tuple(kv_cache.shape)}")
        B, ql, h, _ = q.shape
        if out is None:
            out = torch.empty((B, ql, h, DV), dtype=torch.bfloat16, device=q.device)
        if lse is None:
            lse = torch.empty((B, ql, h), dtype=torch.float32, device=q.device)
        args = dict(page_table=page_table, kv_lengths=kv_lengths, layer_idx=int(layer_idx))
        if softmax_scale is not None:
            args["softmax_scale"] = float(softmax_scale)
        if indices is not None:
            args["indices"], args["topk_lengths"] = indices, topk_lengths
        if attn_sink is not None:
            args["attn_sink"] = attn_sink
        probe_p = None
        dec = self.decode
        if isinstance(dec, runtime.Dispatcher):
            # choose with a one-partition workspace view (the partition count does not change the choice)
            probe_p = dec.kernels[0].params
        p = (probe_p or dec.params)
        qv, kv, ov, lv = self.views(p, q, kv_cache, out, lse)
        dummy_o = torch.empty((DV,), dtype=torch.float32, device=q.device).as_strided((ql * h, DV, 1, B), (0, 1, 0, 0))
        dummy_l = torch.empty((1,), dtype=torch.float32, device=q.device).as_strided((ql * h, 1, B), (0, 0, 0))
        call = dict(args, q=qv, kv=kv, out=ov, lse=lv)
        k = dec.select(dict(call, o_part=dummy_o, lse_part=dummy_l)) if isinstance(dec, runtime.Dispatcher) else dec
        p = k.params
        if p["sparse"] != (indices is not None):
            raise ArgumentError("mla_decode: pass indices and topk_lengths exactly when the bundle is sparse")
        if p["attn_sink"] != (attn_sink is not None):
            raise ArgumentError("mla_decode: pass attn_sink exactly when the bundle has a sink")
        if num_partitions is None:
            if max_len is None:
                max_len = int(kv_lengths.max().item()) if B else 0      # synchronises; pass max_len to avoid
            num_partitions = default_partitions(p, B, max_len, sm_count(q.device.index or 0))
        num_partitions = int(num_partitions)
        if num_partitions < 1:
            raise ArgumentError(f"mla_decode: num_partitions={num_partitions} must be >= 1")
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
            if attn_sink is not None:
                cargs["attn_sink"] = attn_sink
            comb = self.combine.select(cargs) if isinstance(self.combine, runtime.Dispatcher) else self.combine
            launches.append(comb.bind(stream=stream, check_contents=False, **cargs))
        return BoundMLADecode(launches, out, lse, num_partitions)

    def __call__(self, *args, **kwargs):
        b = self.bind(*args, **kwargs)
        b.launch()
        return b.out, b.lse

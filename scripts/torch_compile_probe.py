#!/usr/bin/env python3
"""Find which part of rope_rmsnorm_quant's torch baseline torch.compile (Inductor) rejects on this host."""
import traceback

import numpy as np
import torch

from mlagen import families

fam = families.get("rope_rmsnorm_quant")
p = fam.validate({})
prob = fam.make_problem(p, dict(B=4, S=3, C=50), np.random.default_rng(0))
t = fam.torch_inputs(p, prob)
t["q_rope_out"] = torch.empty_like(t["q_rope"])
T = t["q_rope"].shape[0]


def part_slots(tt):
    return fam._slots_torch(p, tt)


def part_rope(tt):
    b, pos, page, slot = fam._slots_torch(p, tt)
    fr = tt["freqs_cis"][pos].view(T, 32, 2)
    c, s = fr[..., 0], fr[..., 1]
    x = tt["q_rope"].float().view(T, p["num_heads"], 32, 2)
    a, bb = x[..., 0], x[..., 1]
    tt["q_rope_out"].copy_(torch.stack([a * c[:, None] - bb * s[:, None], bb * c[:, None] + a * s[:, None]], -1).view(tt["q_rope"].shape))


def part_norm(tt):
    x = tt["kv_input"].float()
    c = x[:, :512]
    return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + tt["eps"]) * tt["gamma"].float()


def part_scatter(tt):
    b, pos, page, slot = fam._slots_torch(p, tt)
    cache = tt["kv_cache"]
    idx = (tt["layer_idx"] * cache.shape[1] + page) * p["page_size"] + slot
    cache.view(-1, cache.shape[-1]).index_copy_(0, idx, tt["kv_input"])


def whole(tt):
    fam.torch_impl(p, tt)


for name, fn in [("slots", part_slots), ("rope", part_rope), ("norm", part_norm), ("scatter", part_scatter),
                 ("whole", whole)]:
    torch._dynamo.reset()
    try:
        torch.compile(fn, dynamic=True)(dict(t))
        torch.cuda.synchronize()
        print(f"{name}: OK")
    except Exception as e:
        print(f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        tb = traceback.format_exc().splitlines()
        print("   ", " | ".join(l.strip() for l in tb if "mlagen" in l or "torch_compile_probe" in l)[:800])

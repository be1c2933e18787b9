"""numpy <-> torch conversion for mlagen dtypes (bf16 and fp8 travel as raw bits)."""
from __future__ import annotations

import numpy as np

from .abi import DTYPES
from .numerics import NP_DTYPE

_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def to_torch(a, dtype: str, device="cuda"):
    import torch
    a = np.ascontiguousarray(np.asarray(a).astype(NP_DTYPE[dtype]))
    tdt = getattr(torch, DTYPES[dtype].torch)
    if dtype in ("bf16", "f8e4m3"):
        raw = a.view(_BITS[a.dtype.itemsize])
        if raw.dtype == np.uint16:
            raw = raw.view(np.int16)
        t = torch.from_numpy(raw.copy()).to(device)
        return t.view(tdt)
    return torch.from_numpy(a.copy()).to(device)


def to_numpy(t, dtype: str | None = None) -> np.ndarray:
    import torch
    name = str(t.dtype).replace("torch.", "")
    dtype = dtype or next(k for k, v in DTYPES.items() if v.torch == name)
    t = t.detach().contiguous().cpu()
    if dtype == "bf16":
        return t.view(torch.int16).numpy().view(NP_DTYPE["bf16"])
    if dtype == "f8e4m3":
        return t.view(torch.uint8).numpy().view(NP_DTYPE["f8e4m3"])
    return t.numpy()


def poison(t):
    """Fill an output with NaN (floats) or a sentinel (ints) so unwritten elements are caught."""
    import torch
    if t.dtype.is_floating_point and t.dtype not in (torch.float8_e4m3fn,):
        t.fill_(float("nan"))
    elif t.dtype == torch.float8_e4m3fn:
        t.view(torch.uint8).fill_(0x7F)    # e4m3fn NaN
    else:
        t.fill_(-12345)
    return t


def host_copy(v) -> np.ndarray:
    """Copy an argument view's array (torch, cupy or numpy) to the host, for the runtime's content checks
    (page indices, lengths).  Synchronises."""
    from .abi import ArgumentError
    o = v.owner
    mod = type(o).__module__
    if mod.startswith("torch"):
        return o.detach().cpu().numpy()
    if mod.startswith("cupy"):
        return o.get()
    if isinstance(o, np.ndarray):
        return o
    raise ArgumentError(f"cannot read {type(o).__name__} on the host for the content check; "
                        "pass check_contents=False")

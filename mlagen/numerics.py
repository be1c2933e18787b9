"""Host-side numerics shared by references and tests: rounding to the kernels' storage types."""
from __future__ import annotations

import ml_dtypes
import numpy as np

NP_DTYPE = {
    "bf16": ml_dtypes.bfloat16,
    "f16": np.float16,
    "f32": np.float32,
    "f8e4m3": ml_dtypes.float8_e4m3fn,
    "i32": np.int32,
    "u32": np.uint32,
    "i64": np.int64,
    "u8": np.uint8,
}

FP8_E4M3_MAX = 448.0


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round (nearest-even) to ``dtype`` and return the result in that numpy dtype."""
    return np.asarray(x).astype(NP_DTYPE[dtype])


def quantize_fp8(x: np.ndarray) -> np.ndarray:
    """float32 -> e4m3fn with round-to-nearest-even and saturation to +-448 (cvt.rn.satfinite)."""
    x = np.clip(np.asarray(x, dtype=np.float32), -FP8_E4M3_MAX, FP8_E4M3_MAX)
    return x.astype(ml_dtypes.float8_e4m3fn)


def quantize_fp8_rows(y: np.ndarray, g: int):
    """DeepSeek's 1 x g activation recipe in float32 over the last axis, as act_quant_fp8 computes it:
    ``scale = max(amax, 1e-12) / 448``, ``q = e4m3(clamp(y * (1 / scale)))`` (1/scale correctly rounded).
    Returns (codes, scales [..., n / g])."""
    y = np.asarray(y, dtype=np.float32)
    blk = y.reshape(*y.shape[:-1], -1, g)
    scale = (np.maximum(np.abs(blk).max(axis=-1), np.float32(1e-12)) / np.float32(FP8_E4M3_MAX)).astype(np.float32)
    inv = (np.float32(1.0) / scale).astype(np.float32)
    return quantize_fp8((blk * inv[..., None]).reshape(y.shape)), scale


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    den = np.linalg.norm(ref.ravel())
    num = np.linalg.norm((out - ref).ravel())
    return float(num / den) if den > 0 else float(num)

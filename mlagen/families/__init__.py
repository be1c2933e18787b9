"""Kernel families: each folder holds one family's parameters, constraints, reference, geometry and template binding."""
from __future__ import annotations

from .base import Family, Param, ParamError, Problem

_REGISTRY: dict[str, Family] = {}


def _load() -> dict[str, Family]:
    if not _REGISTRY:
        import importlib
        for mod in ("qk_rmsnorm", "rope_rmsnorm_quant", "fp8_gemm", "act_quant_fp8", "mla_decode", "mla_decode.combine"):
            m = importlib.import_module(f"{__name__}.{mod}")
            if hasattr(m, "family"):
                _REGISTRY[m.family.name] = m.family
    return _REGISTRY


def get(name: str) -> Family:
    reg = _load()
    if name not in reg:
        raise ParamError(f"unknown kernel family {name!r}; known: {sorted(reg)}")
    return reg[name]


def all_families() -> list[Family]:
    return list(_load().values())


__all__ = ["Family", "Param", "ParamError", "Problem", "get", "all_families"]

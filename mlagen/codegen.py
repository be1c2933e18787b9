"""Render a family's Jinja2 template into standalone, importable CuTe-DSL Python source."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import jinja2

from . import families
from ._version import DSL_VERSION, __version__


def templates_dir() -> Path:
    """templates/ of a source checkout, else the copy installed as package data (mlagen._templates)."""
    here = Path(__file__).resolve().parent.parent / "templates"
    if here.is_dir():
        return here
    from importlib.resources import files
    return Path(str(files("mlagen._templates")))


_ENV: jinja2.Environment | None = None


def env() -> jinja2.Environment:
    global _ENV
    if _ENV is None:
        _ENV = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(templates_dir())),
            undefined=jinja2.StrictUndefined,   # a missing template variable is an error, never ""
            keep_trailing_newline=True,
            trim_blocks=False,
        )
    return _ENV


def render(family: str | families.Family, params: Mapping[str, Any] | None = None, arch: str = "sm_90a"):
    """Validate ``params`` and render the family's kernel source.

    Returns ``(family, validated_params, kernel_name, source)``.  Raises ParamError before any
    source exists when the parameters are invalid.
    """
    fam = families.get(family) if isinstance(family, str) else family
    p = fam.validate(params, arch)
    name = fam.kernel_name(p)
    layout = fam.layout(p)
    ctx = dict(
        family=fam.name, kernel_name=name, params=p, arch=arch, mlagen_version=__version__,
        dsl_version=DSL_VERSION, layout_source=layout.fake_arg_source(),
        block=fam.block(p), smem_bytes=fam.smem_bytes(p),
    )
    ctx.update(fam.template_context(p, arch))
    src = env().get_template(fam.template).render(**ctx)
    return fam, p, name, src


def source_hash(src: str) -> str:
    return hashlib.sha256(src.encode()).hexdigest()

"""Ahead-of-time compilation: generated source -> cubin + manifest (a *bundle*).  Needs the DSL, not a GPU.

A bundle is a folder ``<kernel_name>.<arch>/`` holding

* ``<kernel_name>.py``  the generated, standalone CuTe-DSL source,
* ``kernel.cubin``      the machine code that ships (never PTX: the DSL's PTX is newer than deployed drivers JIT),
* ``kernel.ptx``        kept for inspection and the checks in tests,
* ``manifest.json``     family, parameters, arch, kernel symbol, argument layout, launch geometry,
                         shared memory, resource usage, DSL version and hashes.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from . import codegen, families, sass_patch
from ._version import DSL_VERSION, __version__
from .abi import ptx_entries
from .env import git_commit

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


class CompileError(RuntimeError):
    pass


def dsl_available() -> bool:
    return importlib.util.find_spec("cutlass") is not None and importlib.util.find_spec("cutlass.cute") is not None


def _import_file(path: Path, modname: str):
    """Import a generated file as a real module (the DSL reads kernel source through inspect)."""
    spec = importlib.util.spec_from_file_location(modname, str(path))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    spec.loader.exec_module(mod)
    return mod


def find_tool(name: str) -> str | None:
    p = shutil.which(name)
    if p:
        return p
    try:  # the nvidia-cuda-cuobjdump wheel puts its binary here
        import nvidia  # type: ignore
        for base in list(getattr(nvidia, "__path__", [])):
            for sub in ("cu13/bin", "cuda_cuobjdump/bin", "cu12/bin"):
                cand = Path(base) / sub / name
                if cand.exists():
                    return str(cand)
    except ImportError:
        pass
    return None


def resource_usage(cubin: Path, symbol: str) -> dict:
    """Registers, stack, local and shared memory of ``symbol`` in ``cubin`` (cuobjdump), or {}."""
    tool = find_tool("cuobjdump")
    if not tool:
        return {}
    out = subprocess.run([tool, "--dump-resource-usage", str(cubin)], capture_output=True, text=True).stdout
    cur = None
    for line in out.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            cur = m.group(1)
            continue
        if cur == symbol and "REG:" in line:
            vals = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            return {"registers": int(vals.get("REG", 0)), "stack_bytes": int(vals.get("STACK", 0)),
                    "local_bytes": int(vals.get("LOCAL", 0)), "static_shared_bytes": int(vals.get("SHARED", 0))}
    return {}


def sass(cubin: Path) -> str:
    """SASS text of a cubin (cuobjdump), or '' when cuobjdump is not installed."""
    tool = find_tool("cuobjdump")
    if not tool:
        return ""
    r = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True)
    if r.returncode != 0 or "Function" not in r.stdout:   # cuobjdump needs nvdisasm for SASS
        return ""
    return r.stdout


def build(family: str, params: Mapping[str, Any] | None = None, arch: str = "sm_90a",
          out_dir: str | os.PathLike = "build", force: bool = False) -> Path:
    """Generate, compile and write one bundle; return its folder.  Reuses an identical existing bundle."""
    fam, p, name, src = codegen.render(family, params, arch)
    bdir = Path(out_dir) / f"{name}.{arch}"
    src_hash = codegen.source_hash(src)
    mpath = bdir / MANIFEST
    if mpath.exists() and not force:
        try:
            old = json.loads(mpath.read_text())
            if old.get("source_sha256") == src_hash and (bdir / old["cubin"]).exists():
                return bdir
        except (ValueError, KeyError):
            pass
    if not dsl_available():
        raise CompileError("compiling needs nvidia-cutlass-dsl==%s (pip install -e '.[compile]')" % DSL_VERSION)
    bdir.mkdir(parents=True, exist_ok=True)
    src_path = bdir / f"{name}.py"
    src_path.write_text(src)
    dump = bdir / "dump"
    if dump.exists():
        shutil.rmtree(dump)
    dump.mkdir()
    mod = _import_file(src_path, f"mlagen_generated_{name}_{arch}")
    try:
        mod.compile_aot(str(dump))
    except Exception as e:  # the DSL's own message names the failing line of the generated file
        raise CompileError(f"{name} ({arch}): compilation failed: {type(e).__name__}: {e}") from e
    cubins = sorted(dump.glob("*.cubin"))
    ptxs = sorted(dump.glob("*.ptx"))
    if len(cubins) != 1 or len(ptxs) != 1:
        raise CompileError(f"{name}: expected one cubin and one PTX in {dump}, found {cubins + ptxs}")
    shutil.move(str(cubins[0]), bdir / "kernel.cubin")
    shutil.move(str(ptxs[0]), bdir / "kernel.ptx")
    shutil.rmtree(dump)
    ptx = (bdir / "kernel.ptx").read_text()
    entries = ptx_entries(ptx)
    if len(entries) != 1:
        raise CompileError(f"{name}: expected one kernel entry in the PTX, found {list(entries)}")
    symbol, sizes = next(iter(entries.items()))
    layout = fam.layout(p)
    want = layout.param_sizes()
    if sizes != want:
        raise CompileError(f"{name}: the PTX parameters {sizes} (bytes) differ from the argument layout "
                           f"{want} of {[a.name for a in layout.args]}: the template and the family disagree")
    cubin = (bdir / "kernel.cubin").read_bytes()
    patches = {}
    for pname in fam.sass_patches(p):
        listing = sass(bdir / "kernel.cubin")
        if not listing:
            raise CompileError(f"{name}: the SASS patch {pname!r} needs cuobjdump and nvdisasm")
        try:
            cubin, patches[pname] = sass_patch.apply(pname, cubin, listing, symbol)
        except sass_patch.SassPatchError as e:
            raise CompileError(f"{name}: SASS patch {pname!r}: {e}") from e
        (bdir / "kernel.cubin").write_bytes(cubin)
    manifest = {
        "schema": SCHEMA_VERSION,
        "family": fam.name,
        "kernel_name": name,
        "arch": arch,
        "params": p,
        "kernel_symbol": symbol,
        "cubin": "kernel.cubin",
        "ptx": "kernel.ptx",
        "source": src_path.name,
        "layout": layout.to_json(),
        "param_sizes": sizes,
        "block": list(fam.block(p)),
        "cluster": list(fam.cluster(p)),
        "smem_bytes": fam.smem_bytes(p),
        "smem_carveout": fam.smem_carveout(p),
        "resources": resource_usage(bdir / "kernel.cubin", symbol),
        "sass_patches": patches,
        "dsl_version": DSL_VERSION,
        "mlagen_version": __version__,
        "source_sha256": src_hash,
        "cubin_sha256": hashlib.sha256(cubin).hexdigest(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
    }
    mpath.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return bdir


def build_many(jobs: list[tuple[str, dict, str]], out_dir: str | os.PathLike, workers: int = 1,
               progress: bool = True) -> list[tuple[tuple, Path | None, str | None]]:
    """Compile many (family, params, arch) jobs, in worker processes when ``workers > 1``.

    A failing job is reported (with its error) and never stops the others.
    """
    results = []
    if workers <= 1:
        it = jobs
        if progress:
            from tqdm import tqdm
            it = tqdm(jobs, desc="compile", unit="kernel")
        for job in it:
            results.append(_build_job(job, str(out_dir)))
        return results
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        futs = [ex.submit(_build_job, job, str(out_dir)) for job in jobs]
        it = futs
        if progress:
            from tqdm import tqdm
            it = tqdm(futs, desc="compile", unit="kernel")
        for f in it:
            results.append(f.result())
    return results


def _build_job(job, out_dir):
    fam, params, arch = job
    try:
        return job, build(fam, params, arch, out_dir), None
    except Exception as e:
        return job, None, f"{type(e).__name__}: {e}"

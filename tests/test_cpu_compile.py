"""Ahead-of-time compilation on the CPU: bundles, manifests, resources, PTX and SASS of qk_rmsnorm."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from mlagen import codegen, families
from mlagen._version import DSL_VERSION
from mlagen.abi import ArgumentError, ptx_entries
from mlagen.compile import MANIFEST, build, sass

from cpu_helpers import ARCHES, KNOWN_SPILLS, QK_CONFIGS, global_accesses, qk_bundle

pytestmark = pytest.mark.compile

QK = families.get("qk_rmsnorm")
CASES = [(n, a) for n in QK_CONFIGS for a in ARCHES]
IDS = [f"{n}-{a}" for n, a in CASES]

MANIFEST_KEYS = {
    "schema", "family", "kernel_name", "arch", "params", "kernel_symbol", "cubin", "ptx", "source", "layout",
    "param_sizes", "block", "smem_bytes", "resources", "dsl_version", "mlagen_version", "source_sha256",
    "cubin_sha256", "created", "commit",
}


def _case(name, arch):
    p = QK.validate(QK_CONFIGS[name], arch)
    b = qk_bundle(QK_CONFIGS[name], arch)
    return p, b, json.loads((b / MANIFEST).read_text())


@pytest.mark.parametrize("name,arch", CASES, ids=IDS)
def test_manifest_round_trips_into_kernel(name, arch):
    from mlagen.runtime import Kernel
    p, b, m = _case(name, arch)
    assert MANIFEST_KEYS <= set(m), MANIFEST_KEYS - set(m)
    assert m["family"] == "qk_rmsnorm" and m["arch"] == arch and m["params"] == p
    assert m["kernel_name"] == QK.kernel_name(p) and b.name == f"{m['kernel_name']}.{arch}"
    assert m["dsl_version"] == DSL_VERSION
    assert m["block"] == list(QK.block(p)) and m["smem_bytes"] == QK.smem_bytes(p)
    for f in (m["cubin"], m["ptx"], m["source"]):
        assert (b / f).is_file(), f
    assert not (b / "dump").exists()
    cubin = (b / m["cubin"]).read_bytes()
    assert cubin[:4] == b"\x7fELF"
    assert hashlib.sha256(cubin).hexdigest() == m["cubin_sha256"]
    src = (b / m["source"]).read_text()
    assert codegen.source_hash(src) == m["source_sha256"] == codegen.source_hash(codegen.render(QK, p, arch)[3])
    ptx = (b / m["ptx"]).read_text()
    assert list(ptx_entries(ptx)) == [m["kernel_symbol"]]
    assert m["kernel_name"] in m["kernel_symbol"]
    assert re.search(rf"^\.target\s+{arch}\b", ptx, re.M)
    # The manifest is all the runtime needs: constructing a Kernel reads it and touches no GPU.
    k = Kernel(b)
    assert k.name == m["kernel_name"] and k.arch == arch and k.params == p
    assert k.layout.to_json() == m["layout"] == QK.layout(p).to_json()
    assert k.layout.param_sizes() == m["param_sizes"]
    assert k.block == tuple(QK.block(p)) and k.smem == m["smem_bytes"]
    assert k.family is QK
    assert k._fn == {} and k._mod == {}


def _spill_cases():
    out = []
    for n, a in CASES:
        marks = [pytest.mark.xfail(reason=KNOWN_SPILLS[(n, a)], strict=False)] if (n, a) in KNOWN_SPILLS else []
        out.append(pytest.param(n, a, id=f"{n}-{a}", marks=marks))
    return out


@pytest.mark.parametrize("name,arch", _spill_cases())
def test_no_spills(name, arch):
    p, b, m = _case(name, arch)
    res = m["resources"]
    if not res:
        pytest.skip("cuobjdump not installed (pip install nvidia-cuda-cuobjdump): no resource usage in the manifest")
    assert res["registers"] > 0
    assert res["local_bytes"] == 0, res
    assert res["stack_bytes"] == 0, res


def _expected_store_bytes(p) -> int:
    """A thread stores VEC outputs per input vector: 16 bytes, or 8 when the output is narrower than the input."""
    isz = {"bf16": 2, "f16": 2, "f32": 4}
    return min(16, QK.vec(p) * isz[p["out_dtype"]])


@pytest.mark.parametrize("name,arch", CASES, ids=IDS)
def test_ptx_uses_16_byte_accesses(name, arch):
    p, b, m = _case(name, arch)
    acc = global_accesses((b / "kernel.ptx").read_text())
    loads = Counter(n for op, n, _ in acc if op == "ld")
    stores = Counter(n for op, n, _ in acc if op == "st")
    mnem = Counter(s for _, _, s in acc)
    # q, k, gamma: 16-byte vector loads (ld.global.v4.b32, or v2.b64 as sm_100a emits them) ...
    assert loads[16] > 0, mnem
    assert any(re.search(r"\.v4\.[bfu]32$|\.v2\.[bfu]64$", s) for s in mnem if s.startswith("ld.")), mnem
    # ... and the only other loads are the two 4-byte mean squares of qk_var.
    assert set(loads) <= {16, 4} and loads[4] <= 2, mnem
    want = _expected_store_bytes(p)
    assert set(stores) == {want}, f"stores should all be {want} bytes: {mnem}"
    if want == 16:
        assert any(re.search(r"^st\.global(\.\w+)*\.(v4\.[bfu]32|v2\.[bfu]64)$", s) for s in mnem), mnem
    # every thread's vectors: (NQ+NK)/VEC/threads_per_row input vectors, each stored once
    vpt = (p["nq"] + p["nk"]) // QK.vec(p) // p["threads_per_row"]
    isz_out = {"bf16": 2, "f16": 2, "f32": 4}[p["out_dtype"]]
    assert sum(stores.values()) == vpt * QK.vec(p) * isz_out // want, mnem


@pytest.mark.parametrize("name,arch", CASES, ids=IDS)
def test_ptx_rsqrt_rounding(name, arch):
    p, b, m = _case(name, arch)
    ptx = (b / "kernel.ptx").read_text()
    if p["rsqrt"] == "ieee":
        assert "sqrt.rn.f32" in ptx and "rcp.rn.f32" in ptx
        assert "rsqrt.approx" not in ptx and "sqrt.approx" not in ptx and "rcp.approx" not in ptx
    else:
        assert "rsqrt.approx" in ptx
        assert "sqrt.rn.f32" not in ptx


@pytest.mark.parametrize("name,arch", CASES, ids=IDS)
def test_sass_uses_128_bit_accesses(name, arch):
    p, b, m = _case(name, arch)
    s = sass(b / m["cubin"])
    if not s:
        pytest.skip("cuobjdump not installed: no SASS to inspect")
    if "Function :" not in s:
        # cuobjdump -sass needs nvdisasm; without it, it prints only the header (and exits 1,
        # which mlagen.compile.sass ignores)
        pytest.skip("cuobjdump printed no SASS: nvdisasm is missing (pip install nvidia-cuda-nvdisasm)")
    assert re.search(rf"code for {arch}\b", s)
    assert m["kernel_symbol"] in s
    assert "LDG.E.128" in s
    want = _expected_store_bytes(p)
    assert ("STG.E.128" if want == 16 else "STG.E.64") in s


@pytest.mark.parametrize("arch", ARCHES)
def test_kernel_prepare_checks_arguments_without_gpu(arch):
    """Kernel.prepare resolves DeviceArray views and computes the grid on the CPU."""
    from mlagen.runtime import DeviceArray, Kernel
    p, b, m = _case("bf16-f32-approx-t32r4", arch)
    k = Kernel(b)
    M, base = 10, 0x7000_0000_0000
    views = dict(
        q=DeviceArray(base, (M, 1536), (1536, 1), "bf16", 0),
        k=DeviceArray(base + 0x100000, (M, 512), (512, 1), "bf16", 0),
        gamma_q=DeviceArray(base + 0x200000, (1536,), (1,), "f32", 0),
        gamma_k=DeviceArray(base + 0x300000, (512,), (1,), "f32", 0),
        qk_var=DeviceArray(base + 0x400000, (M, 2), (2, 1), "f32", 0),
        q_out=DeviceArray(base + 0x500000, (M, 1536), (1536, 1), "f32", 0),
        k_out=DeviceArray(base + 0x600000, (M, 512), (512, 1), "f32", 0),
        eps=1e-6,
    )
    _, dims, grid, dev = k.prepare(views)
    assert dims["M"] == M and grid == (-(-M // p["rows_per_cta"]), 1, 1) and dev == 0
    with pytest.raises(ArgumentError, match="unknown argument"):
        k.prepare({**views, "qq": 1})
    with pytest.raises(ArgumentError, match="'q_out'.*dtype bf16"):
        k.prepare({**views, "q_out": DeviceArray(base + 0x500000, (M, 1536), (1536, 1), "bf16", 0)})
    bad = dict(views)
    del bad["k"]
    with pytest.raises(ArgumentError, match="missing input 'k'"):
        k.prepare(bad)


def test_rebuild_reuses_and_force_is_deterministic(tmp_path):
    given = QK_CONFIGS["f16-f16-ieee-t8r16-small"]
    b1 = build("qk_rmsnorm", given, "sm_90a", tmp_path)
    m1 = json.loads((b1 / MANIFEST).read_text())
    mtime = (b1 / "kernel.cubin").stat().st_mtime_ns
    assert build("qk_rmsnorm", given, "sm_90a", tmp_path) == b1
    assert (b1 / "kernel.cubin").stat().st_mtime_ns == mtime           # reused, not recompiled
    b2 = build("qk_rmsnorm", given, "sm_90a", tmp_path, force=True)
    m2 = json.loads((b2 / MANIFEST).read_text())
    assert b2 == b1 and m2["cubin_sha256"] == m1["cubin_sha256"]      # same source, same machine code


def _run(cmd, cwd, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    r = subprocess.run(cmd, cwd=str(cwd), capture_output=True, text=True, timeout=300, env=env, **kw)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.parametrize("arch", ARCHES)
def test_generated_file_is_standalone(arch, tmp_path):
    """`python <file> <dir>` compiles the generated source by itself."""
    _, p, name, src = codegen.render("qk_rmsnorm", QK_CONFIGS["f16-f16-ieee-t8r16-small"], arch)
    f = tmp_path / f"{name}.py"
    f.write_text(src)
    out = tmp_path / "out"
    _run([sys.executable, str(f), str(out)], cwd=tmp_path)
    cubins = list(out.glob("*.cubin"))
    assert len(cubins) == 1 and cubins[0].stat().st_size > 0
    assert arch in cubins[0].name
    assert len(list(out.glob("*.ptx"))) == 1


def test_generated_file_needs_no_mlagen(tmp_path):
    """The same with every `mlagen` import blocked in the child interpreter."""
    _, p, name, src = codegen.render("qk_rmsnorm", QK_CONFIGS["f16-f16-ieee-t8r16-small"], "sm_90a")
    f = tmp_path / f"{name}.py"
    f.write_text(src)
    out = tmp_path / "out"
    runner = (
        "import runpy, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'mlagen' or name.startswith('mlagen.'):\n"
        "            raise ImportError('mlagen is blocked in this test: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.argv = [sys.argv[1], sys.argv[2]]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "assert not any(m == 'mlagen' or m.startswith('mlagen.') for m in sys.modules), 'mlagen was imported'\n"
    )
    _run([sys.executable, "-c", runner, str(f), str(out)], cwd=tmp_path)
    assert len(list(out.glob("*.cubin"))) == 1

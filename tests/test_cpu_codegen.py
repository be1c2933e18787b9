"""Template rendering (no DSL needed): valid, standalone, deterministic Python."""
from __future__ import annotations

import ast
import json
import re

import pytest

from mlagen.families.base import ParamError

from mlagen import codegen, families
from mlagen.abi import TensorArg

from cpu_helpers import ARCHES, QK_CONFIGS

QK = families.get("qk_rmsnorm")


def _imports(src: str) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add("." * node.level + (node.module or ""))
    return mods


def _check_standalone(src: str, filename: str) -> None:
    compile(src, filename, "exec")                       # valid Python
    mods = _imports(src)
    assert not any(m == "mlagen" or m.startswith("mlagen.") for m in mods), mods
    assert not any(m.startswith(".") for m in mods), f"relative import in a standalone file: {mods}"
    assert "cutlass" in mods and "cutlass.cute" in mods
    assert not re.search(r"^\s*(import|from)\s+mlagen", src, re.M)


CASES = [(n, a) for n in QK_CONFIGS for a in ARCHES]


@pytest.mark.parametrize("name,arch", CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_qk_render_is_valid_standalone_python(name, arch):
    fam, p, kname, src = codegen.render("qk_rmsnorm", QK_CONFIGS[name], arch)
    _check_standalone(src, f"{kname}.py")
    assert kname == QK.kernel_name(p)
    assert f'ARCH = "{arch}"' in src
    assert f"def {kname}_kernel(" in src
    assert "def compile_aot(" in src and "def fake_args(" in src and 'if __name__ == "__main__":' in src
    # the header records the parameters as JSON
    m = re.search(r"^#\s+params\s*:\s*(\{.*\})$", src, re.M)
    assert m and json.loads(m.group(1)) == p
    # compile-time constants come from the validated parameters
    assert re.search(rf"^NQ = {p['nq']}\b", src, re.M) and re.search(rf"^NK = {p['nk']}\b", src, re.M)
    assert re.search(rf"^TPR = {p['threads_per_row']}\b", src, re.M)
    assert re.search(rf"^ROWS = {p['rows_per_cta']}\b", src, re.M)
    assert re.search(rf"^VEC = {QK.vec(p)}\b", src, re.M)
    # one fake tensor per tensor argument of the layout, in order
    lay = QK.layout(p)
    fakes = re.findall(r"^\s+(\w+) = make_fake_tensor\(", src, re.M)
    assert fakes == [a.name for a in lay.args if isinstance(a, TensorArg)]
    m = re.search(r"^\s+args = \(([\w, ]*),?\)$", src, re.M)
    assert m and [x.strip() for x in m.group(1).split(",") if x.strip()] == [a.name for a in lay.args]


@pytest.mark.parametrize("rsqrt", ["ieee", "approx"])
def test_rsqrt_variants_render_different_code(rsqrt):
    _, _, _, src = codegen.render("qk_rmsnorm", {"rsqrt": rsqrt})
    body = src[src.index("def _inv_rms"):src.index("@cute.kernel")]
    if rsqrt == "ieee":
        assert "cute.math.sqrt(" in body and "fastmath=False" in body and "rsqrt" not in body.replace("_inv_rms", "")
    else:
        assert "cute.math.rsqrt(" in body


def test_render_is_deterministic():
    a = codegen.render("qk_rmsnorm", {"threads_per_row": 32})[3]
    b = codegen.render("qk_rmsnorm", {"threads_per_row": "32"})[3]
    assert codegen.source_hash(a) == codegen.source_hash(b)
    c = codegen.render("qk_rmsnorm", {"threads_per_row": 32}, "sm_100a")[3]
    assert codegen.source_hash(a) != codegen.source_hash(c)


def test_kernel_names_are_distinct_and_file_safe():
    names = set()
    for n, given in QK_CONFIGS.items():
        name = QK.kernel_name(QK.validate(given))
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), name
        names.add(name)
    assert len(names) == len(QK_CONFIGS)


def test_templates_dir_holds_every_family_template():
    d = codegen.templates_dir()
    assert (d / "_common.j2").exists()
    for fam in families.all_families():
        assert (d / fam.template).exists(), fam.template


@pytest.mark.parametrize("arch", ARCHES)
def test_every_family_renders_its_defaults(arch):
    for fam in families.all_families():
        if arch not in fam.arches:
            with pytest.raises(ParamError, match=arch):
                codegen.render(fam.name, {}, arch)
            continue
        _, p, kname, src = codegen.render(fam.name, {}, arch)
        _check_standalone(src, f"{kname}.py")
        assert f'ARCH = "{arch}"' in src, fam.name

"""Parameter validation: ParamError names the problem, and is raised before anything is written."""
from __future__ import annotations

import pytest

from mlagen import cli, codegen, families
from mlagen.families import ParamError

QK = families.get("qk_rmsnorm")

# (given parameters, arch, a fragment the message must contain)
INVALID = {
    "bad-choice-dtype": ({"dtype": "f64"}, "sm_90a", "parameter 'dtype'='f64' is not one of"),
    "bad-choice-rsqrt": ({"rsqrt": "fast"}, "sm_90a", "'rsqrt'='fast' is not one of"),
    "bad-choice-threads": ({"threads_per_row": 48}, "sm_90a", "'threads_per_row'=48 is not one of"),
    "nq-not-multiple-of-vec": ({"nq": 1535}, "sm_90a", "nq=1535 is not a multiple of 8"),
    "nk-not-multiple-of-vec-f32": ({"dtype": "f32", "nk": 510}, "sm_90a", "nk=510 is not a multiple of 4"),
    "threads-not-dividing": ({"threads_per_row": 128}, "sm_90a", "threads_per_row=128 must divide both"),
    "threads-not-dividing-k": ({"nq": 1024, "nk": 64, "threads_per_row": 16}, "sm_90a", "must divide both"),
    "too-many-vectors": ({"nq": 4096, "threads_per_row": 8}, "sm_90a", "over 32"),
    "unknown-param": ({"foo": 1}, "sm_90a", "unknown parameter 'foo'"),
    "not-an-int": ({"threads_per_row": "many"}, "sm_90a", "expected int"),
    "below-minimum": ({"nq": 0}, "sm_90a", "below its minimum"),
    "above-maximum": ({"nk": 1 << 20}, "sm_90a", "above its maximum"),
    "bad-arch": ({}, "sm_80", "arch 'sm_80' is not supported"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_validate_raises_param_error(case):
    given, arch, frag = INVALID[case]
    with pytest.raises(ParamError) as ei:
        QK.validate(given, arch)
    assert frag in str(ei.value)


def test_all_violations_are_listed():
    with pytest.raises(ParamError) as ei:
        QK.validate({"nq": 1535, "nk": 511})
    msg = str(ei.value)
    assert "nq=1535" in msg and "nk=511" in msg


def test_strings_are_coerced():
    p = QK.validate({"threads_per_row": "32", "rows_per_cta": "0x4", "nq": "1536", "dtype": "bf16"})
    assert p["threads_per_row"] == 32 and p["rows_per_cta"] == 4 and p["nq"] == 1536
    assert set(p) == {q.name for q in QK.params}


def test_defaults_are_valid_for_every_family_and_arch():
    for fam in families.all_families():
        for arch in fam.arches:
            p = fam.validate({}, arch)
            assert set(p) == {q.name for q in fam.params}


def test_unknown_family():
    with pytest.raises(ParamError, match="unknown kernel family 'nope'"):
        families.get("nope")


@pytest.mark.parametrize("case", list(INVALID))
def test_render_raises_before_any_source(case):
    given, arch, frag = INVALID[case]
    with pytest.raises(ParamError, match=frag.replace("(", r"\(").replace("[", r"\[")):
        codegen.render("qk_rmsnorm", given, arch)


@pytest.mark.parametrize("case", ["nq-not-multiple-of-vec", "unknown-param", "bad-arch"])
def test_build_raises_before_writing(case, tmp_path):
    from mlagen.compile import build
    given, arch, frag = INVALID[case]
    out = tmp_path / "out"
    with pytest.raises(ParamError):
        build("qk_rmsnorm", given, arch, out)
    assert not out.exists()


def _cli_args(given: dict) -> list[str]:
    return [f"{k}={v}" for k, v in given.items()]


@pytest.mark.parametrize("source_only", [True, False], ids=["source-only", "compile"])
@pytest.mark.parametrize("case", list(INVALID))
def test_cli_generate_invalid_exits_2_and_writes_nothing(case, source_only, tmp_path, capsys):
    given, arch, frag = INVALID[case]
    out = tmp_path / "out"
    out.mkdir()
    argv = ["generate", "qk_rmsnorm", "--arch", arch, "--out", str(out)]
    if given:
        argv += ["-p", *_cli_args(given)]
    if source_only:
        argv.append("--source-only")
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert frag in err
    assert err.startswith("mlagen: error:") and "Traceback" not in err
    assert list(out.iterdir()) == []


def test_cli_generate_invalid_does_not_create_out_dir(tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(["generate", "qk_rmsnorm", "-p", "nq=1535", "--out", str(out), "--source-only"]) == 2
    assert not out.exists()


def test_cli_generate_malformed_param_exits_2(tmp_path, capsys):
    rc = cli.main(["generate", "qk_rmsnorm", "-p", "threads_per_row", "--out", str(tmp_path), "--source-only"])
    assert rc == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_fp8_gemm_register_targets_fit_the_launch_pool():
    """setmaxnreg targets must fit the registers ptxas gives the CTA at launch, else setmaxnreg.inc hangs
    (a hang the tuner found on the H100 for tile_m=128 with 2 CTAs per SM)."""
    fam = families.get("fp8_gemm")
    for tm in (64, 128, 192):
        for ctas in (1, 2) if tm < 192 else (1,):
            p = fam.validate({"tile_m": tm, "tile_n": 32, "stages": 3, "ctas_per_sm": ctas})
            producer, consumer = fam.regs(p)
            threads = 128 * (1 + tm // 64)
            launch = min(255, 65536 // (ctas * threads)) // 8 * 8
            assert producer % 8 == 0 and consumer % 8 == 0 and 24 <= producer <= consumer <= 256
            assert 128 * producer + (threads - 128) * consumer <= launch * threads


def test_fp8_gemm_rejects_accumulators_the_consumer_registers_cannot_hold():
    """Three MMA warpgroups (tile_m=192) leave 152 registers per MMA thread: the serial mainloop's accumulator
    and partial (128) fit, the overlapped one's three (192) do not."""
    fam = families.get("fp8_gemm")
    fam.validate({"tile_m": 192, "tile_n": 128})
    with pytest.raises(ValueError, match="registers per MMA thread"):
        fam.validate({"tile_m": 192, "tile_n": 128, "overlap": True})


def test_fp8_gemm_c_stages_needs_the_persistent_tma_epilogue_and_counts_its_shared_memory():
    """Two C tiles only make sense where one CTA stores several tiles; each adds tile_m x tile_n bf16 of shared
    memory, which the two-CTAs-per-SM budget must still hold."""
    fam = families.get("fp8_gemm")
    one = fam.validate({"tile_m": 64, "tile_n": 128, "stages": 3, "ctas_per_sm": 2, "persistent": True})
    two = fam.validate({"tile_m": 64, "tile_n": 128, "stages": 3, "ctas_per_sm": 2, "persistent": True, "c_stages": 2})
    assert fam.smem_bytes(two) - fam.smem_bytes(one) == 64 * 128 * 2
    assert fam.kernel_name(two) == fam.kernel_name(one) + "_cb2"
    for bad in ({"c_stages": 2}, {"c_stages": 2, "persistent": True, "split_k": 2},
                {"c_stages": 2, "persistent": True, "epilogue": "direct"}):
        with pytest.raises(ValueError, match="c_stages > 1"):
            fam.validate(bad)
    with pytest.raises(ValueError, match="shared memory"):
        fam.validate({"tile_m": 64, "tile_n": 64, "stages": 6, "ctas_per_sm": 2, "persistent": True, "c_stages": 2})

"""The `mlagen` command line, in process (cli.main) and as `python -m mlagen`."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import types

import pytest

import mlagen
from mlagen import cli, families

from cpu_helpers import REPO


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _subprocess(*argv, cwd=REPO):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "mlagen", *argv], cwd=str(cwd), capture_output=True,
                          text=True, timeout=300, env=env)


# ------------------------------------------------------------------ families
def test_families_lists_parameter_spaces(capsys):
    rc, out, err = _run(capsys, "families")
    assert rc == 0 and err == ""
    for fam in families.all_families():
        assert f"{fam.name}: " in out
        for p in fam.params:
            assert f"    {p.name}=" in out
    assert "threads_per_row=64 in {8, 16, 32, 64, 128, 256}" in out
    assert "architectures: sm_90a, sm_100a" in out


def test_python_dash_m_families():
    r = _subprocess("families", "--names")
    assert r.returncode == 0, r.stderr
    assert "qk_rmsnorm" in r.stdout.split()


def test_no_command_prints_help_and_exits_2(capsys):
    rc, out, err = _run(capsys)
    assert rc == 2 and "usage: mlagen" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["--version"])
    assert ei.value.code == 0
    from mlagen._version import __version__
    assert capsys.readouterr().out.strip() == f"mlagen {__version__}"


# ------------------------------------------------------------------ generate
def test_generate_source_only(tmp_path, capsys):
    out = tmp_path / "gen"
    rc, so, err = _run(capsys, "generate", "qk_rmsnorm", "-p", "threads_per_row=32", "rsqrt=approx",
                       "--param", "rows_per_cta=4", "--arch", "sm_100a", "--out", str(out), "--source-only")
    assert rc == 0, err
    name = "qk_rmsnorm_bf16_bf16_q1536_k512_t32_r4_approx"
    f = out / f"{name}.py"
    assert [p.name for p in out.iterdir()] == [f.name]
    assert str(f) in so and f"{name} (sm_100a)" in so
    src = f.read_text()
    ast.parse(src)
    assert 'ARCH = "sm_100a"' in src
    # same again: unchanged, fine; another arch into the same file needs --force
    assert _run(capsys, "generate", "qk_rmsnorm", "-p", "threads_per_row=32", "rsqrt=approx", "rows_per_cta=4",
                "--arch", "sm_100a", "--out", str(out), "--source-only")[0] == 0
    rc, _, err = _run(capsys, "generate", "qk_rmsnorm", "-p", "threads_per_row=32", "rsqrt=approx",
                      "rows_per_cta=4", "--arch", "sm_90a", "--out", str(out), "--source-only")
    assert rc == 2 and "--force" in err
    rc, _, _ = _run(capsys, "generate", "qk_rmsnorm", "-p", "threads_per_row=32", "rsqrt=approx",
                    "rows_per_cta=4", "--arch", "sm_90a", "--out", str(out), "--source-only", "--force")
    assert rc == 0 and 'ARCH = "sm_90a"' in f.read_text()


def test_generate_source_only_works_without_the_dsl(tmp_path, monkeypatch, capsys):
    from mlagen import compile as mcompile
    monkeypatch.setattr(mcompile, "dsl_available", lambda: False)
    monkeypatch.setitem(sys.modules, "cutlass", None)          # importing cutlass would now fail
    rc, so, err = _run(capsys, "generate", "qk_rmsnorm", "--out", str(tmp_path), "--source-only")
    assert rc == 0, err
    assert len(list(tmp_path.glob("*.py"))) == 1


def test_generate_without_dsl_fails_cleanly(tmp_path, monkeypatch, capsys):
    from mlagen import compile as mcompile
    monkeypatch.setattr(mcompile, "dsl_available", lambda: False)
    rc, so, err = _run(capsys, "generate", "qk_rmsnorm", "-p", "nq=1024", "--out", str(tmp_path / "b"))
    assert rc == 1 and "nvidia-cutlass-dsl" in err and "Traceback" not in err


def test_generate_unknown_family_exits_2(tmp_path, capsys):
    rc, _, err = _run(capsys, "generate", "nope", "--out", str(tmp_path))
    assert rc == 2 and "unknown kernel family 'nope'" in err


def test_generate_invalid_via_console_has_no_traceback(tmp_path):
    r = _subprocess("generate", "qk_rmsnorm", "-p", "nq=1001", "threads_per_row=64", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "nq=1001 is not a multiple of 8" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.compile
@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a"])
def test_generate_compiles_a_bundle(arch, tmp_path, capsys):
    rc, out, err = _run(capsys, "generate", "qk_rmsnorm", "-p", "dtype=f16", "out_dtype=f32", "nq=256", "nk=64",
                        "threads_per_row=8", "--arch", arch, "--out", str(tmp_path))
    assert rc == 0, err
    b = tmp_path / f"qk_rmsnorm_f16_f32_q256_k64_t8_r2_ieee.{arch}"
    m = json.loads((b / "manifest.json").read_text())
    assert f"bundle:  {b}" in out
    assert f"symbol:  {m['kernel_symbol']}" in out
    if m["resources"]:
        assert f"registers: {m['resources']['registers']}" in out and "(no spills)" in out
    else:
        assert "resources: unknown" in out


# ------------------------------------------------------------------ build
def test_build_dry_run_lists_invalid_combinations(capsys):
    rc, out, err = _run(capsys, "build", "qk_rmsnorm", "--grid", "threads_per_row=32,64,128",
                        "--grid", "rsqrt=ieee,approx", "--dry-run")
    assert rc == 0, err
    assert "6 combination(s) x arch -> 4 valid, 2 invalid" in out
    lines = [l for l in out.splitlines() if l.startswith("invalid")]
    assert len(lines) == 2 and all("threads_per_row=128 must divide both" in l for l in lines)
    assert sum(l.startswith("valid") for l in out.splitlines()) == 4


def test_build_grid_times_arches(capsys):
    rc, out, _ = _run(capsys, "build", "qk_rmsnorm", "-g", "rows_per_cta=1,2", "--arch", "sm_90a,sm_100a", "--dry-run")
    assert rc == 0 and "-> 4 valid, 0 invalid" in out
    assert out.count("sm_100a") == 2


def test_build_without_valid_combination_exits_2(capsys):
    rc, out, err = _run(capsys, "build", "qk_rmsnorm", "--grid", "threads_per_row=128,256", "--dry-run")
    assert rc == 2 and "no valid combination" in err
    assert out.count("invalid  ") >= 2


def test_build_unknown_parameter_exits_2(capsys):
    rc, _, err = _run(capsys, "build", "qk_rmsnorm", "--grid", "bogus=1,2", "--dry-run")
    assert rc == 2 and "unknown parameter 'bogus'" in err


def test_build_bad_arch_exits_2(capsys):
    rc, _, err = _run(capsys, "build", "qk_rmsnorm", "--grid", "rows_per_cta=1", "--arch", "sm_80", "--dry-run")
    assert rc == 2 and "sm_80" in err


def test_build_reports_compile_failures(tmp_path, monkeypatch, capsys):
    """A failing compile is listed as FAILED with its error (and the exit status is 1)."""
    from mlagen import compile as mcompile

    def fake_build(family, params, arch, out_dir, force=False):
        if params["rows_per_cta"] == 2:
            raise mcompile.CompileError("boom: the DSL rejected line 42")
        b = tmp_path / f"fake_{params['rows_per_cta']}.{arch}"
        b.mkdir(parents=True, exist_ok=True)
        (b / "manifest.json").write_text(json.dumps({"resources": {"registers": 33, "local_bytes": 0,
                                                                   "stack_bytes": 0}}))
        return b

    monkeypatch.setattr(mcompile, "dsl_available", lambda: True)
    monkeypatch.setattr(mcompile, "build", fake_build)
    # threads_per_row=128 is invalid for the default widths (3 invalid combinations), rows_per_cta=2 fails
    rc, out, err = _run(capsys, "build", "qk_rmsnorm", "--grid", "rows_per_cta=1,2,4", "threads_per_row=32,128",
                        "--out", str(tmp_path), "-q")
    assert rc == 1
    failed = [l for l in out.splitlines() if l.startswith("FAILED")]
    assert len(failed) == 1 and "boom: the DSL rejected line 42" in failed[0]
    assert sum(l.startswith("ok") for l in out.splitlines()) == 2
    assert sum(l.startswith("invalid") for l in out.splitlines()) == 3
    assert "2 built, 1 failed, 3 invalid" in out
    assert "33/0" in out


@pytest.mark.compile
def test_build_compiles_the_grid(tmp_path, capsys):
    rc, out, err = _run(capsys, "build", "qk_rmsnorm", "--grid", "nq=256", "nk=64", "threads_per_row=8,16",
                        "rsqrt=ieee,approx", "--out", str(tmp_path), "-q")
    assert rc == 0, out + err
    assert "2 built, 0 failed, 2 invalid" in out
    built = sorted(p.name for p in tmp_path.iterdir())
    assert built == ["qk_rmsnorm_bf16_bf16_q256_k64_t8_r2_approx.sm_90a",
                     "qk_rmsnorm_bf16_bf16_q256_k64_t8_r2_ieee.sm_90a"]
    assert all((tmp_path / b / "manifest.json").exists() for b in built)


@pytest.mark.compile
def test_build_in_worker_processes(tmp_path, capsys):
    rc, out, err = _run(capsys, "build", "qk_rmsnorm", "--grid", "dtype=f16", "nq=128", "nk=64",
                        "threads_per_row=8", "rows_per_cta=4,8", "--out", str(tmp_path), "--workers", "2", "-q")
    assert rc == 0, out + err
    assert "2 built, 0 failed" in out
    assert len(list(tmp_path.glob("*/kernel.cubin"))) == 2


def test_build_suite_dry_run(capsys):
    rc, out, err = _run(capsys, "build-suite", "--dry-run", "--family", "qk_rmsnorm", "--only", "test")
    assert rc == 0, err
    from mlagen import suites
    assert sum(l.startswith("valid") for l in out.splitlines()) == len(suites.TEST["qk_rmsnorm"])


# ------------------------------------------------------------------ bench dispatch
def test_bench_dispatches_to_main_bench(monkeypatch, capsys):
    seen = {}

    def main_bench(args):
        seen["args"] = args
        return 3

    fake = types.ModuleType("mlagen.bench")
    fake.main_bench = main_bench
    monkeypatch.setitem(sys.modules, "mlagen.bench", fake)
    monkeypatch.setattr(mlagen, "bench", fake, raising=False)
    rc, out, err = _run(capsys, "bench", "qk_rmsnorm", "--bundles", "build/gpu", "--shape", "M=4096",
                        "--shape", "M=1", "--results", "res", "--warmup", "3", "--reps", "7", "--no-torch")
    assert rc == 3
    a = seen["args"]
    assert a.family == "qk_rmsnorm" and a.bundles == "build/gpu" and a.shape == ["M=4096", "M=1"]
    assert a.results == "res" and a.warmup == 3 and a.reps == 7 and a.no_torch and not a.compile_torch
    rc, _, _ = _run(capsys, "bench", "qk_rmsnorm", "--compile-torch")
    a = seen["args"]
    assert a.compile_torch and a.warmup == 10 and a.reps == 50 and a.results == "results" and a.shape == []


def test_bench_without_main_bench(monkeypatch, capsys):
    fake = types.ModuleType("mlagen.bench")
    monkeypatch.setitem(sys.modules, "mlagen.bench", fake)
    monkeypatch.setattr(mlagen, "bench", fake, raising=False)
    rc, _, err = _run(capsys, "bench", "qk_rmsnorm")
    assert rc == 1 and "main_bench" in err


def test_bench_unknown_family(monkeypatch, capsys):
    fake = types.ModuleType("mlagen.bench")
    fake.main_bench = lambda args: 0
    monkeypatch.setitem(sys.modules, "mlagen.bench", fake)
    monkeypatch.setattr(mlagen, "bench", fake, raising=False)
    rc, _, err = _run(capsys, "bench", "nope")
    assert rc == 2 and "unknown kernel family" in err


# ------------------------------------------------------------------ report / results-merge
def _rows():
    return [dict(family="qk_rmsnorm", kernel=k, impl="mlagen", M=m, time_us=t, gbps=1000.0 / t, ceiling_gbps=3000.0)
            for k, m, t in [("a", 16, 5.0), ("b", 16, 4.0), ("a", 4096, 50.0), ("b", 4096, 60.0)]]


def test_report_prints_summary_and_plots(tmp_path, capsys):
    from mlagen import report
    report.append_rows(_rows(), "bench", tmp_path / "r")
    rc, out, err = _run(capsys, "report", "--results", str(tmp_path / "r"))
    assert rc == 0, err
    assert "== bench ==" in out and "best time_us per" in out
    png = tmp_path / "plot.png"
    rc, out, err = _run(capsys, "report", "--results", str(tmp_path / "r"), "--table", "bench", "--plot", str(png))
    assert rc == 0, err
    assert png.exists() and f"plot: {png}" in out


def test_report_errors(tmp_path, capsys):
    from mlagen import report
    rc, _, err = _run(capsys, "report", "--results", str(tmp_path / "empty"))
    assert rc == 1 and "no result tables" in err
    rc, _, err = _run(capsys, "report", "--results", str(tmp_path), "--table", "nope")
    assert rc == 1 and "no table 'nope'" in err
    report.append_rows(_rows(), "one", tmp_path)
    report.append_rows(_rows(), "two", tmp_path)
    rc, _, err = _run(capsys, "report", "--results", str(tmp_path), "--plot", str(tmp_path / "p.png"))
    assert rc == 2 and "--table" in err


def test_results_merge(tmp_path, capsys):
    import pandas as pd
    host = tmp_path / "host"
    host.mkdir()
    pd.DataFrame(_rows()).assign(table="bench").to_parquet(host / "bench.parquet")
    res = tmp_path / "results"
    rc, out, err = _run(capsys, "results-merge", str(host / "bench.parquet"), "--results", str(res))
    assert rc == 0, err
    assert f"bench: 4 new row(s) -> {res / 'bench.parquet'}" in out
    rc, out, _ = _run(capsys, "results-merge", str(host / "bench.parquet"), "--results", str(res))
    assert rc == 0 and "bench: 0 new row(s)" in out
    rc, _, err = _run(capsys, "results-merge", str(host / "missing.csv"), "--results", str(res))
    assert rc == 1 and "missing.csv" in err

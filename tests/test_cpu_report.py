"""mlagen.report: append / load / merge result tables, summaries and plots."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from mlagen import report

from cpu_helpers import REPO


def _bench_rows(device="NVIDIA H100 80GB HBM3", scale=1.0, shapes=(1, 64, 1024, 16384)):
    rows = []
    for M in shapes:
        for impl, kernel, eff in (("torch_eager", "torch_eager", 0.3), ("mlagen", "qk_t64_r2", 0.8),
                                  ("mlagen", "qk_t32_r4", 0.7)):
            t = scale * (4.0 + M * 4096 * 4 / (3000e3 * eff))
            rows.append(dict(
                table="bench", family="qk_rmsnorm", impl=impl, kernel=kernel,
                arch="" if impl != "mlagen" else "sm_90a",
                params={"threads_per_row": 64 if "t64" in kernel else 32, "rsqrt": "ieee"},
                group=json.dumps({"nq": 1536, "nk": 512}), shape=json.dumps({"M": M}), dims=json.dumps({"M": M}),
                device=device, time_us=t, gbps=M * 4096 * 4 / (t * 1e3), ceiling_gbps=3000.0))
    return rows


def test_append_creates_both_files_and_json_columns(tmp_path):
    d = tmp_path / "results"
    path = report.append_rows(_bench_rows(), "bench", d)
    assert path == d / "bench.parquet" and path.exists() and (d / "bench.csv").exists()
    df = report.load("bench", d)
    assert len(df) == 12
    assert json.loads(df["params"].iloc[1]) == {"rsqrt": "ieee", "threads_per_row": 64}
    csv = pd.read_csv(d / "bench.csv")
    assert len(csv) == 12 and list(csv.columns) == list(df.columns)


def test_append_unions_columns(tmp_path):
    report.append_rows([{"a": 1, "b": "x"}], "t", tmp_path)
    report.append_rows(pd.DataFrame([{"a": 2, "c": 3.5}]), "t", tmp_path)
    report.append_rows({"d": [1, 2]}, "t", tmp_path)            # a single row as a dict
    df = report.load("t", tmp_path)
    assert list(df.columns) == ["a", "b", "c", "d"]
    assert len(df) == 3
    assert df["a"].tolist()[:2] == [1, 2] and df["b"].iloc[0] == "x" and pd.isna(df["b"].iloc[1])
    assert df["c"].iloc[1] == 3.5 and df["d"].iloc[2] == "[1, 2]"


def test_append_mixed_types_in_a_column(tmp_path):
    report.append_rows([{"v": 1}], "m", tmp_path)
    report.append_rows([{"v": "two"}], "m", tmp_path)
    df = report.load("m", tmp_path)
    assert [str(x) for x in df["v"]] == ["1", "two"]


def test_load_missing_table(tmp_path):
    with pytest.raises(FileNotFoundError, match="no table 'nope'"):
        report.load("nope", tmp_path)


def test_bad_table_name(tmp_path):
    with pytest.raises(ValueError):
        report.append_rows([{"a": 1}], "../x", tmp_path)


def test_load_falls_back_to_csv(tmp_path):
    report.append_rows([{"a": 1}], "c", tmp_path)
    (tmp_path / "c.parquet").unlink()
    assert report.load("c", tmp_path)["a"].tolist() == [1]
    assert report.tables(tmp_path) == ["c"]


def test_decode_json_expands_params(tmp_path):
    report.append_rows(_bench_rows(), "bench", tmp_path)
    df = report.decode_json(report.load("bench", tmp_path), "params", expand=True)
    assert df["params.threads_per_row"].tolist()[:3] == [32, 64, 32]
    assert isinstance(report.decode_json(report.load("bench", tmp_path))["params"].iloc[0], dict)


# ------------------------------------------------------------------ merging
def test_merge_splits_by_table_column_and_dedups(tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    rows = _bench_rows() + [dict(table="ceilings", device="H100", copy_gbps=3000.0)]
    pd.DataFrame([{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()} for r in rows]) \
        .to_parquet(host / "out.parquet")
    res = tmp_path / "results"
    assert report.merge_files([host / "out.parquet"], res) == {"bench": 12, "ceilings": 1}
    assert len(report.load("bench", res)) == 12 and len(report.load("ceilings", res)) == 1
    # the same file again, and its CSV twin: nothing new
    pd.read_parquet(host / "out.parquet").to_csv(host / "out.csv", index=False)
    assert report.merge_files([host / "out.parquet", host / "out.csv"], res) == {"bench": 0, "ceilings": 0}
    assert len(report.load("bench", res)) == 12


def test_merge_by_file_name_and_folder(tmp_path):
    res = tmp_path / "results"
    report.append_rows([{"x": 1, "y": 2.0}, {"x": 2, "y": 3.5}], "tab", res)
    host = tmp_path / "host"
    host.mkdir()
    pd.DataFrame([{"x": 2, "y": 3.5}, {"x": 3, "y": 4.0}, {"x": 3, "y": 4.0}]).to_csv(host / "tab.csv", index=False)
    pd.DataFrame([{"z": "new"}]).to_parquet(host / "other.parquet")
    assert report.merge_files([host], res) == {"tab": 1, "other": 1}
    df = report.load("tab", res)
    assert sorted(df["x"].tolist()) == [1, 2, 3]
    assert report.tables(res) == ["other", "tab"]


def test_merge_treats_csv_and_parquet_spellings_as_equal(tmp_path):
    res = tmp_path / "results"
    report.append_rows([{"M": 4096, "t": 1.5, "note": None, "ok": True}], "eq", res)
    host = tmp_path / "h"
    host.mkdir()
    (host / "eq.csv").write_text("M,t,note,ok\n4096.0,1.5,,True\n")
    assert report.merge_files([host / "eq.csv"], res) == {"eq": 0}


def test_merge_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        report.merge_files([tmp_path / "absent.parquet"], tmp_path)


# ------------------------------------------------------------------ summaries and plots
def test_summary_best_per_kernel_and_fastest_per_shape(tmp_path):
    rows = _bench_rows() + _bench_rows(scale=1.5)          # a second, slower run of everything
    report.append_rows(rows, "bench", tmp_path)
    df = report.load("bench", tmp_path)
    s = report.summary(df)
    assert "24 rows" in s
    assert "best time_us per" in s and "best of up to 2 runs" in s
    assert "fastest per family / device / group / shape" in s
    win = s[s.index("fastest per"):]
    assert win.count("qk_t64_r2") == 4 and "qk_t32_r4" not in win and "torch_eager" not in win
    best = df[(df["kernel"] == "qk_t64_r2") & (df["shape"] == json.dumps({"M": 16384}))]["time_us"].min()
    assert f"{best:.1f}" in s
    assert "%ceiling" in s
    # shapes sort numerically, not as text
    assert s.index('{"M": 64}') < s.index('{"M": 1024}') < s.index('{"M": 16384}')


def test_summary_without_times():
    s = report.summary(pd.DataFrame([{"device": "H100", "copy_gbps": 3000.0}]))
    assert "1 rows" in s
    assert report.summary(pd.DataFrame()) == "(no rows)"


def test_summary_plain_shape_columns():
    df = pd.DataFrame([dict(kernel=k, M=m, time_us=t) for k, m, t in
                       [("a", 1, 3.0), ("b", 1, 2.0), ("a", 8, 5.0), ("b", 8, 6.0)]])
    s = report.summary(df)
    assert "best time_us per M / kernel" in s


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    report.append_rows(_bench_rows(), "bench", tmp_path)
    df = report.load("bench", tmp_path)
    out = report.plot(df, tmp_path / "p" / "bench.png")          # x = M from the JSON shape column
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out2 = report.plot(df, tmp_path / "t.png", y="time_us", by=["kernel"], top=1)
    assert out2.exists() and out2.stat().st_size > 1000
    with pytest.raises(KeyError):
        report.plot(df, tmp_path / "x.png", x="N")


def test_import_is_cheap():
    code = ("import sys, mlagen.report\n"
            "heavy = [m for m in ('pandas', 'pyarrow', 'matplotlib') if m in sys.modules]\n"
            "print(heavy)\nsys.exit(1 if heavy else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_summary_of_test_outcomes():
    df = pd.DataFrame([dict(test="t::a", outcome="passed", device="H100", commit="abc"),
                       dict(test="t::b", outcome="failed", device="H100", commit="abc"),
                       dict(test="t::c", outcome="skipped", device="H100", commit="abc")])
    s = report.summary(df)
    assert "outcomes:" in s and "not passed (1):" in s and "t::b" in s and "t::a" not in s
    assert "all passed" in report.summary(df[df["outcome"] != "failed"])


def test_l2_flush_mode_defaults_to_read_and_rejects_unknown(monkeypatch):
    """Benchmarks flush L2 by writing (as every earlier row did) unless told otherwise; the mode is checked
    before timing."""
    from mlagen import bench, cli
    monkeypatch.delenv("MLAGEN_L2_FLUSH", raising=False)
    assert bench.flush_mode() == "write"
    monkeypatch.setenv("MLAGEN_L2_FLUSH", "Read")
    assert bench.flush_mode() == "read"
    monkeypatch.setenv("MLAGEN_L2_FLUSH", "dirty")
    with pytest.raises(ValueError, match="MLAGEN_L2_FLUSH"):
        bench.flush_mode()
    args = cli.build_parser().parse_args(["bench", "fp8_gemm", "--l2-flush", "none"])
    assert args.l2_flush == "none"


def test_bench_row_memory_floor_from_the_one_way_ceilings():
    """A row's floor: the family's written bytes at the write-only rate plus the rest at the read-only rate
    (the w_uk BMM at 1024 tokens x 128 heads: 134 of 160 MB written, ~45.6 us on the H200's 3368 / 4380 GB/s)."""
    from mlagen import bench, families
    fam = families.get("fp8_gemm")
    p = fam.validate({})
    dims = dict(M=1024, N=512, K=128, L=128)
    assert fam.bytes_written(p, dims) == 2 * 1024 * 512 * 128
    ceil = dict(copy_gbps=4251.0, read_gbps=4380.0, write_gbps=3368.0, bf16_tflops=800.0)
    r = dict(time_us=51.0, p10_us=50.0, p90_us=52.0, reps=30)
    row = bench.row(fam, None, "mlagen", p, dims, {}, r, ceil, "dev", "c0ffee", "2026-12-03", 0.0)
    assert abs(row["floor_us"] - 45.6) < 0.2
    assert abs(row["pct_floor"] - 100 * row["floor_us"] / 51.0) < 1e-9
    # without the one-way ceilings (rows before them) or a split, no floor
    old = bench.row(fam, None, "mlagen", p, dims, {}, r, dict(copy_gbps=4251.0), "dev", "c", "d", 0.0)
    assert "floor_us" not in old and old["pct_copy"] > 0
    # a composition without the split (the decode branch's spec) still gets its row, without a floor
    from mlagen.decode_branch import BranchSpec
    bp = dict(num_heads=16, q_len=1, page_size=64, cache_dtype="bf16", sparse=False, topk=2048)
    brow = bench.row(BranchSpec(), None, "mlagen", bp, dict(B=4, C=1024), {}, r, ceil, "dev", "c", "d", 0.0)
    assert "floor_us" not in brow and brow["gbps"] > 0
    # every family's written bytes are a part of what it moves
    for name, d in (("qk_rmsnorm", dict(M=4096)), ("rope_rmsnorm_quant", dict(T=512, B=512)),
                    ("act_quant_fp8", dict(M=64, K=7168)), ("mla_decode", dict(B=64, C=4096, T=64 * 4096)),
                    ("mla_combine", dict(B=64, NPART=4)), ("fp8_gemm", dims)):
        f = families.get(name)
        q = f.validate({})
        w, total = f.bytes_written(q, d), f.bytes_moved(q, d)
        assert 0 < w < total, (name, w, total)


def test_plot_draws_the_copy_ceiling_on_bandwidth_axes_only(tmp_path, monkeypatch):
    """The copy ceiling (GB/s) marks bandwidth plots; a TFLOP/s plot gets no GB/s line on its axis."""
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.axes import Axes
    labels = []
    orig = Axes.axhline

    def spy(self, *a, **k):
        labels.append(k.get("label"))
        return orig(self, *a, **k)
    monkeypatch.setattr(Axes, "axhline", spy)
    df = pd.DataFrame([dict(r, tflops=r["gbps"] / 10.0) for r in _bench_rows()])
    report.plot(df, tmp_path / "bw.png", y="gbps")
    assert len(labels) == 1 and "copy ceiling" in labels[0]
    report.plot(df, tmp_path / "tf.png", y="tflops")
    assert len(labels) == 1

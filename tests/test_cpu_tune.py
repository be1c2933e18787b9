"""The Optuna tuner (mlagen.tune) and its commands, on a machine without a GPU.

Covered: the exhaustive grid (invalid points come with the violated constraint), ask -> (fake) measure
-> tell into a temporary SQLite study, the supervised worker (a worker that cannot start, crashes or
hangs fails that candidate only), the replay of the sampler on a synthetic measured grid, the dispatch
export, concurrent ask/tell workers on one study in PostgreSQL (``postgres`` marker; skipped where no
server answers), and the tune-grid / tune-replay / export commands.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import re
import sys
import textwrap
import traceback
import uuid
from pathlib import Path

import pytest

from mlagen import cli, families, report, tune
from mlagen.families.base import ParamError

from conftest import HAS_CUDA

FAMILIES = ("qk_rmsnorm", "rope_rmsnorm_quant")
DEVICE = "NVIDIA H100 80GB HBM3"


def _space_size(family: str) -> int:
    return math.prod(len(v) for v in tune.space(family)["space"].values())


def _sqlite(tmp_path: Path, name: str = "t.db") -> str:
    return f"sqlite:///{tmp_path / name}"


def _optuna():
    import optuna
    return optuna


# ------------------------------------------------------------------ search spaces and the grid
@pytest.mark.parametrize("family", FAMILIES)
def test_space_files_name_known_parameters(family):
    fam = families.get(family)
    doc = tune.space(family)
    assert doc["family"] == family
    for k, vals in doc["space"].items():
        for v in vals:                                   # every value is legal for its parameter
            assert fam.param(k).coerce(v) == v
    assert doc["shapes"] and all(isinstance(s, dict) and s for s in doc["shapes"])


def test_space_of_unknown_family_is_a_param_error():
    with pytest.raises(ParamError, match="no search space for nope"):
        tune.space("nope")


@pytest.mark.parametrize("family", FAMILIES)
def test_grid_points_split_valid_and_invalid(family):
    fam = families.get(family)
    valid, invalid = tune.grid_points(family)
    assert len(valid) + len(invalid) == _space_size(family)
    assert valid and invalid
    keys = [json.dumps(p, sort_keys=True) for p in valid]
    assert len(set(keys)) == len(keys)
    for p in valid:
        assert fam.validate(p) == p
    sp = tune.space(family)["space"]
    for params, why in invalid:
        assert set(params) == set(sp)
        with pytest.raises(ParamError) as ei:
            fam.validate(params)
        assert str(ei.value) == why
        # the reason names the violated constraint (one "- ..." line per violation), not just "invalid"
        lines = [l.strip()[2:] for l in why.splitlines()[1:] if l.strip().startswith("- ")]
        assert lines, why
        assert all(re.search(r"\w+=\d+|block of|shared memory", l) for l in lines), why


def test_mla_decode_space_rejects_with_reasons_and_names_its_combine():
    fam = families.get("mla_decode")
    for k in tune.space("mla_decode")["space"]:
        fam.param(k)                                            # every knob is a parameter of the family
    valid, invalid = tune.grid_points("mla_decode", {"num_heads": 16, "cache_dtype": "f8e4m3"})
    assert valid and invalid
    assert any("does not fit shared memory" in why for _, why in invalid)
    assert any("dq_batch=2 must divide the 3 dequantisation pieces" in why for _, why in invalid)
    p = fam.validate({"num_heads": 16, "q_len": 2, "attn_sink": True})
    (cfam, cp), = fam.tune_companions(p)
    assert cfam == "mla_combine" and cp == {"num_heads": 16, "q_len": 2, "attn_sink": True}
    families.get(cfam).validate(cp)


@pytest.mark.compile
def test_ask_builds_mla_decode_trials_with_their_combine(tmp_path):
    """A decode candidate's call needs a combine kernel: ask compiles it once beside the trials."""
    storage = _sqlite(tmp_path)
    study = tune.open_study("mla_b8", storage)
    study.enqueue_trial({"tile_n": 64, "stages": 2, "page_loads": True, "dq_batch": 6})
    study.enqueue_trial({"tile_n": 32, "stages": 3, "page_loads": False, "dq_batch": 6})
    wdir = tune.ask("mla_decode", {"B": 8, "C": 1024}, 2, "mla_b8", tmp_path / "tune", fixed={"num_heads": 16},
                    storage=storage, seed=0, log=lambda *_: None)
    doc = json.loads((wdir / tune.SPEC).read_text())
    assert len(doc["trials"]) == 2
    from mlagen.runtime import find_bundles
    combs = find_bundles(wdir / "bundles", "mla_combine")
    assert len(combs) == 1 and json.loads((combs[0] / "manifest.json").read_text())["params"]["num_heads"] == 16


def test_grid_points_reasons_qk_rmsnorm():
    valid, invalid = tune.grid_points("qk_rmsnorm")
    # bf16 1536 + 512: 192 and 64 vectors; 128 threads per row divide neither
    assert len(valid) == 15 and len(invalid) == 5
    assert {p["threads_per_row"] for p in valid} == {16, 32, 64}
    for params, why in invalid:
        assert params["threads_per_row"] == 128
        assert "threads_per_row=128 must divide both vector counts (192 q, 64 k)" in why
    why16 = dict((json.dumps(p, sort_keys=True), w) for p, w in invalid)[
        json.dumps({"threads_per_row": 128, "rows_per_cta": 16}, sort_keys=True)]
    assert "block of 2048x1x1 threads is outside 1..1024" in why16     # every violation is named


def test_grid_points_reasons_rope_rmsnorm_quant():
    valid, invalid = tune.grid_points("rope_rmsnorm_quant")
    assert len(valid) == 75 and len(invalid) == 5
    for params, why in invalid:       # 128 heads / 8 splits = 16 heads = 4 passes of 4 heads: unroll 8 is too much
        assert (params["head_splits"], params["q_unroll"]) == (8, 8)
        assert "q_unroll=8 must divide the 4 q passes per lane" in why
    # 16 heads (TP8): more of the space is invalid, for the heads-per-split rule
    valid16, invalid16 = tune.grid_points("rope_rmsnorm_quant", {"num_heads": 16})
    assert len(valid16) + len(invalid16) == _space_size("rope_rmsnorm_quant")
    assert all(p["num_heads"] == 16 for p in valid16)
    assert any("heads per split (2) must be a multiple of 4" in w for _, w in invalid16)
    assert all(p["head_splits"] <= 4 for p in valid16)


def test_grid_points_fixed_knob_is_not_tuned():
    valid, invalid = tune.grid_points("qk_rmsnorm", {"threads_per_row": 32})
    assert len(valid) == 5 and not invalid                      # only rows_per_cta varies
    assert {p["threads_per_row"] for p in valid} == {32}
    assert sorted(p["rows_per_cta"] for p in valid) == [1, 2, 4, 8, 16]
    valid, invalid = tune.grid_points("qk_rmsnorm", {"nq": 256, "nk": 128})
    assert {p["threads_per_row"] for p in valid} == {16}        # 32 q and 16 k vectors
    assert len(valid) == 5 and len(invalid) == 15


def test_suggest_pins_fixed_knobs():
    optuna = _optuna()
    st = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sp = tune.space("qk_rmsnorm")["space"]
    for _ in range(10):
        tr = st.ask()
        p = tune.suggest(tr, sp, {"threads_per_row": "32", "nq": 256})
        assert p["threads_per_row"] == "32" and p["nq"] == 256 and p["rows_per_cta"] in sp["rows_per_cta"]
        assert set(tr.params) == {"rows_per_cta"}
        st.tell(tr, 1.0)


# ------------------------------------------------------------------ ask -> measure (fake) -> tell
QK_FIXED = {"nq": 256, "nk": 128}      # 32 q + 16 k vectors: only threads_per_row=16 is valid; small kernels
ENQUEUED = [
    {"threads_per_row": 32, "rows_per_cta": 1},     # invalid: 32 does not divide 16 k vectors
    {"threads_per_row": 16, "rows_per_cta": 1},
    {"threads_per_row": 16, "rows_per_cta": 4},
    {"threads_per_row": 128, "rows_per_cta": 16},   # invalid twice: divisibility and a 2048-thread block
    {"threads_per_row": 16, "rows_per_cta": 8},
]


def _fake_rows(doc, answers):
    """Rows as tune.run writes them, from worker answers {trial: msg}."""
    return [tune._row(doc, t, {"trial": t["trial"], **answers[t["trial"]]})
            for t in doc["trials"] if t["trial"] in answers]


@pytest.mark.compile
def test_ask_compiles_valid_points_and_tell_reports_measurements(tmp_path):
    optuna = _optuna()
    S = optuna.trial.TrialState
    storage, out, results = _sqlite(tmp_path), tmp_path / "tune", tmp_path / "results"
    pre = tune.open_study("qk_m64", storage)
    for p in ENQUEUED:                                           # deterministic points, whatever the sampler
        pre.enqueue_trial(p)
    log = []
    # --trials counts valid (compiled) trials: the 2 invalid enqueued points are rejected on the way
    wdir = tune.ask("qk_rmsnorm", {"M": 64}, 3, "qk_m64", out, fixed=QK_FIXED, storage=storage,
                    seed=0, log=log.append)
    assert wdir == out / "qk_m64"
    assert "3 trials compiled, 2 invalid (told FAIL), 0 failed to compile" in log[-1]

    study = tune.open_study("qk_m64", storage)
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(5))
    assert [t.state for t in trials] == [S.FAIL, S.RUNNING, S.RUNNING, S.FAIL, S.RUNNING]
    assert trials[0].user_attrs["failure"].startswith("invalid: qk_rmsnorm: invalid parameters")
    assert "threads_per_row=32 must divide both vector counts (32 q, 16 k)" in trials[0].user_attrs["failure"]
    assert "block of 2048x1x1 threads is outside 1..1024" in trials[3].user_attrs["failure"]
    for t in trials:
        assert json.loads(t.user_attrs["shape"]) == {"M": 64}
        assert "failure" not in t.user_attrs or t.state == S.FAIL

    doc = json.loads((wdir / tune.SPEC).read_text())
    assert doc["family"] == "qk_rmsnorm" and doc["study"] == "qk_m64" and doc["storage"] == storage
    assert doc["arch"] == "sm_90a"
    assert [t["trial"] for t in doc["trials"]] == [1, 2, 4]
    fam = families.get("qk_rmsnorm")
    for t in doc["trials"]:
        assert t["shape"] == {"M": 64}
        assert t["params"] == fam.validate({**QK_FIXED, **ENQUEUED[t["trial"]]})
        b = Path(t["bundle"])
        assert b.parent == wdir / "bundles" and b.name == f"{fam.kernel_name(t['params'])}.sm_90a"
        m = json.loads((b / "manifest.json").read_text())
        assert m["params"] == t["params"] and (b / m["cubin"]).stat().st_size > 0

    # a GPU host measured them: trial 2 fastest, trial 4 wrong.  Rows merged twice (two hosts) are told once.
    answers = {1: {"status": "ok", "time_us": 5.0, "err": 0.0, "gbps": 100.0, "device": DEVICE},
               2: {"status": "ok", "time_us": 3.0, "err": 0.0, "gbps": 160.0, "device": DEVICE},
               4: {"status": "failed", "reason": "wrong result: rel err 0.5 > 0.02", "err": 0.5}}
    rows = _fake_rows(doc, answers)
    assert [r["kernel"] for r in rows] == [Path(t["bundle"]).name for t in doc["trials"]]
    report.append_rows(rows, "tuning", results)
    report.append_rows(rows, "tuning", results)
    log.clear()
    assert tune.tell(wdir, str(results), log=log.append) == 3
    assert "told 3 trials; best 3.00 us" in log[-1]

    study = tune.open_study("qk_m64", storage)
    trials = study.get_trials()
    assert [t.state for t in trials] == [S.FAIL, S.COMPLETE, S.COMPLETE, S.FAIL, S.FAIL]
    assert trials[1].value == 5.0 and trials[2].value == 3.0
    assert trials[4].user_attrs["failure"] == "wrong result: rel err 0.5 > 0.02"
    assert study.best_trial.number == 2 and study.best_value == 3.0
    assert study.best_trial.params == ENQUEUED[2]

    # telling again changes nothing
    assert tune.tell(wdir, str(results), log=log.append) == 0
    assert len(study.get_trials()) == 5

    # a second round appends to trials.json; trial numbers stay unique
    tune.ask("qk_rmsnorm", {"M": 64}, 2, "qk_m64", out, fixed=QK_FIXED, storage=storage, seed=1, log=log.append)
    doc2 = json.loads((wdir / tune.SPEC).read_text())
    nums = [t["trial"] for t in doc2["trials"]]
    # two more valid trials (invalid proposals on the way take trial numbers too, but are not listed)
    assert nums[:3] == [1, 2, 4] and len(set(nums)) == len(nums) and len(nums) == 5 and min(nums[3:]) >= 5
    assert len(tune.open_study("qk_m64", storage).get_trials()) == max(nums) + 1


# ------------------------------------------------------------------ the supervised runner
FAKE_WORKER = textwrap.dedent('''
    """A stand-in for `python -m mlagen.tune _worker`: answers trials, crashes or hangs on request."""
    import json, os, sys, time
    print("some library chatter on stdout", flush=True)
    for line in sys.stdin:
        t = json.loads(line)
        n = t["trial"]
        if os.environ.get("MLAGEN_TUNE_FAULT") == str(n):
            print("simulated crash in trial %d" % n, file=sys.stderr, flush=True)
            os._exit(3)
        if os.environ.get("FAKE_TUNE_HANG") == str(n):
            time.sleep(120)
        # a stray line and the answer in one write: the supervisor must not lose the answer in a buffer
        sys.stdout.write("warning: chatter\\n" + json.dumps({"trial": n, "status": "ok", "time_us": 10.0 + n,
                         "err": 0.0, "gbps": 1.0, "device": "fake", "pid": os.getpid()}) + "\\n")
        sys.stdout.flush()
''')


def _trials_json(wdir: Path, n: int, family: str = "qk_rmsnorm", study: str = "sup") -> dict:
    fam = families.get(family)
    p = fam.validate({})
    doc = {"family": family, "study": study, "storage": "", "arch": "sm_90a",
           "trials": [{"trial": i, "params": p, "bundle": str(wdir / "bundles" / f"missing_{i}.sm_90a"),
                       "shape": {"M": 64}} for i in range(n)]}
    wdir.mkdir(parents=True, exist_ok=True)
    (wdir / tune.SPEC).write_text(json.dumps(doc))
    return doc


def test_run_with_a_worker_that_cannot_run_fails_every_trial(tmp_path, monkeypatch):
    """The real worker: without CUDA it dies at start-up; every trial is failed with the reason, no raise."""
    monkeypatch.setenv("MLAGEN_TUNE_FAULT", "1")      # on a GPU host: trial 1 crashes the worker
    wdir, results = tmp_path / "w", tmp_path / "results"
    _trials_json(wdir, 2)
    log = []
    rows = tune.run(wdir, str(results), timeout_s=60, warmup=1, reps=1, log=log.append)
    assert [r["trial"] for r in rows] == [0, 1]
    for r in rows:
        assert r["status"] == "failed" and r["reason"], r
        assert r["table"] == "tuning" and r["study"] == "sup" and r["kernel"] == f"missing_{r['trial']}.sm_90a"
    if not HAS_CUDA:
        for r in rows:   # the reason says how the worker ended and why (its last stderr line)
            assert re.match(r"worker (exited with status \d+|died before the trial)", r["reason"]), r["reason"]
            # no GPU here: torch is missing (CI installs none) or is a CPU build without CUDA
            assert any(w in r["reason"] for w in ("CUDA", "cuda", "torch")), r["reason"]
    else:
        assert "FileNotFoundError" in rows[0]["reason"]
        assert rows[1]["reason"].startswith("worker exited with status 3")
    assert log == ["sup: 0 measured, 2 failed"]
    df = report.load("tuning", results)
    assert sorted(df["trial"]) == [0, 1] and set(df["status"]) == {"failed"}
    assert len((wdir / "measured.jsonl").read_text().splitlines()) == 2
    # measured trials are not measured again
    assert tune.run(wdir, str(results), log=log.append) == []
    assert len(report.load("tuning", results)) == 2


def test_supervisor_crash_and_hang_fail_one_trial_each(tmp_path, monkeypatch):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(tune.Supervisor, "command", lambda self: [sys.executable, str(script)])
    monkeypatch.setenv("MLAGEN_TUNE_FAULT", "1")
    monkeypatch.setenv("FAKE_TUNE_HANG", "3")
    wdir, results = tmp_path / "w", tmp_path / "results"
    _trials_json(wdir, 5)
    rows = tune.run(wdir, str(results), timeout_s=2.0, log=lambda *_: None)
    by = {r["trial"]: r for r in rows}
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "failed", "ok"]
    assert by[1]["reason"] == "worker exited with status 3: simulated crash in trial 1"
    assert by[3]["reason"].startswith("timeout")
    assert [by[i]["time_us"] for i in (0, 2, 4)] == [10.0, 12.0, 14.0]
    answers = [json.loads(l) for l in (wdir / "measured.jsonl").read_text().splitlines()]
    pids = {a["trial"]: a["pid"] for a in answers if a["status"] == "ok"}
    assert len({pids[0], pids[2], pids[4]}) == 3           # a fresh worker after the crash and after the hang
    df = report.load("tuning", results)
    assert sorted(df["trial"]) == [0, 1, 2, 3, 4]


def test_supervisor_persistent_worker_and_close(tmp_path, monkeypatch):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(tune.Supervisor, "command", lambda self: [sys.executable, str(script)])
    monkeypatch.delenv("MLAGEN_TUNE_FAULT", raising=False)
    sup = tune.Supervisor("qk_rmsnorm", timeout_s=30)
    try:
        a = sup.measure({"trial": 7, "bundle": "x", "shape": {}})
        b = sup.measure({"trial": 8, "bundle": "x", "shape": {}})
        assert a["status"] == b["status"] == "ok" and a["pid"] == b["pid"]   # one worker for many trials
        proc = sup.proc
    finally:
        sup.close()
    assert sup.proc is None and proc.poll() is not None


def test_run_keeps_rows_when_interrupted(tmp_path, monkeypatch):
    """Trials recorded in measured.jsonl are skipped on resume, so their rows must reach results/ even
    when the runner is interrupted."""
    calls = []

    def measure(self, t):
        calls.append(t["trial"])
        if calls == [0, 1, 2]:
            raise KeyboardInterrupt
        return {"trial": t["trial"], "status": "ok", "time_us": 1.0, "device": "fake"}

    monkeypatch.setattr(tune.Supervisor, "measure", measure)
    wdir, results = tmp_path / "w", tmp_path / "results"
    _trials_json(wdir, 4)
    with pytest.raises(KeyboardInterrupt):
        tune.run(wdir, str(results), log=lambda *_: None)
    assert sorted(report.load("tuning", results)["trial"]) == [0, 1]
    rows = tune.run(wdir, str(results), log=lambda *_: None)           # resume: 2 and 3 only
    assert [r["trial"] for r in rows] == [2, 3] and calls == [0, 1, 2, 2, 3]


@pytest.mark.compile
def test_tune_online_without_cuda_fails_trials_and_goes_on(tmp_path):
    """ask -> compile -> measure -> tell in one process: a worker that cannot run fails each trial with the
    reason; the study records FAIL and the rows are kept."""
    if HAS_CUDA:
        pytest.skip("checks the failure path of a host without CUDA")
    optuna = _optuna()
    storage, results = _sqlite(tmp_path), tmp_path / "results"
    fixed = {**QK_FIXED, "threads_per_row": 16, "rows_per_cta": 2}      # every knob pinned: one kernel
    rows = tune.tune_online("qk_rmsnorm", {"M": 64}, 2, "online", fixed=fixed, storage=storage,
                            results_dir=str(results), out_dir=str(tmp_path / "tune"), timeout_s=60,
                            log=lambda *_: None)
    assert [r["status"] for r in rows] == ["failed", "failed"]
    st = tune.open_study("online", storage)
    assert [t.state for t in st.get_trials()] == [optuna.trial.TrialState.FAIL] * 2
    for t in st.get_trials():
        assert t.user_attrs["failure"].startswith("worker ")
    assert len(report.load("tuning", results)) == 2


def test_tune_online_compile_failure_fails_that_trial(tmp_path, monkeypatch):
    import mlagen.compile as mcompile
    optuna = _optuna()

    def broken_build(*a, **k):
        raise mcompile.CompileError("simulated ptxas failure")

    monkeypatch.setattr(mcompile, "build", broken_build)
    monkeypatch.setattr(tune.Supervisor, "measure", lambda self, t: pytest.fail("nothing to measure"))
    storage = _sqlite(tmp_path)
    log = []
    rows = tune.tune_online("qk_rmsnorm", {"M": 64}, 2, "cf", fixed={"threads_per_row": 16}, storage=storage,
                            results_dir=str(tmp_path / "results"), out_dir=str(tmp_path / "tune"), log=log.append)
    assert rows == []
    trials = tune.open_study("cf", storage).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 2
    assert all("simulated ptxas failure" in t.user_attrs["failure"] for t in trials)


# ------------------------------------------------------------------ replay
def _rope_time(p: dict) -> float:
    """A smooth synthetic cost with one optimum: tokens_per_cta=4, head_splits=2, q_unroll=2."""
    return (10.0 + abs(math.log2(p["tokens_per_cta"]) - 2) + 0.5 * abs(math.log2(p["head_splits"]) - 1)
            + 0.3 * abs(math.log2(p["q_unroll"]) - 1))


def _measured_rope() -> dict:
    valid, _ = tune.grid_points("rope_rmsnorm_quant")
    return {json.dumps(p, sort_keys=True): _rope_time(p) for p in valid}


def test_replay_finds_the_optimum_with_a_generous_budget():
    measured = _measured_rope()
    r = tune.replay(measured, "rope_rmsnorm_quant", budget=150, seeds=4, within=0.0)
    assert r["grid_valid"] == 75 and r["budget"] == 150
    assert len(r["trials_needed"]) == 4
    assert all(1 <= n <= 150 for n in r["trials_needed"]), r          # every seed hit the exact optimum
    assert r["median_trials"] <= 150 and r["p90_trials"] in r["trials_needed"]


def test_replay_counts_misses_and_is_deterministic():
    measured = _measured_rope()
    r = tune.replay(measured, "rope_rmsnorm_quant", budget=2, seeds=3, within=0.0)
    assert r["trials_needed"] == [3, 3, 3]                              # budget + 1: not found
    a = tune.replay(measured, "rope_rmsnorm_quant", budget=30, seeds=3, within=0.05)
    b = tune.replay(measured, "rope_rmsnorm_quant", budget=30, seeds=3, within=0.05)
    assert a == b                                                       # seeded samplers
    # within 100%: every valid point qualifies, so the first valid trial is the hit
    r = tune.replay(measured, "rope_rmsnorm_quant", budget=10, seeds=3, within=1.0)
    assert all(n <= 10 for n in r["trials_needed"])


H16 = {"num_heads": 16, "cache_dtype": "f8e4m3"}     # TP8: 50 of the 80 points of the space are invalid


def test_replay_with_fixed_shape_params():
    valid, invalid = tune.grid_points("rope_rmsnorm_quant", H16)
    assert (len(valid), len(invalid)) == (30, 50)
    measured = {json.dumps(p, sort_keys=True): _rope_time(p) for p in valid}
    r = tune.replay(measured, "rope_rmsnorm_quant", H16, budget=40, seeds=3, within=0.5)
    assert r["grid_valid"] == 30 and len(r["trials_needed"]) == 3
    assert all(1 <= n <= 41 for n in r["trials_needed"])
    # points of another shape group are not in the measured grid: they count as failed trials, never as hits
    r = tune.replay(measured, "rope_rmsnorm_quant", {"num_heads": 128}, budget=10, seeds=2, within=10.0)
    assert r["trials_needed"] == [11, 11]


def test_replay_finds_the_optimum_where_most_points_are_invalid():
    # 16 heads: 50 of 80 points are invalid.  TPE ignores FAIL trials; ask_valid enqueues a random valid
    # point after a streak of invalid proposals, so the study keeps making progress.
    valid, _ = tune.grid_points("rope_rmsnorm_quant", H16)
    measured = {json.dumps(p, sort_keys=True): _rope_time(p) for p in valid}
    r = tune.replay(measured, "rope_rmsnorm_quant", H16, budget=100, seeds=6, within=0.0)
    assert r["median_trials"] <= 100, r


# ------------------------------------------------------------------ export
QK = families.get("qk_rmsnorm")
ROPE = families.get("rope_rmsnorm_quant")
QK_P = QK.validate({})
QK_P32 = QK.validate({"dtype": "f32", "out_dtype": "f32", "threads_per_row": 32})
ROPE_P = ROPE.validate({})


def _tuning_row(p, kernel, dims, time_us, status="ok", device=DEVICE, family="qk_rmsnorm"):
    return {"table": "tuning", "family": family, "study": "s", "trial": 0, "params": json.dumps(p, sort_keys=True),
            "shape": json.dumps(dims, sort_keys=True), "dims": json.dumps(dims, sort_keys=True) if dims else "",
            "kernel": kernel, "status": status, "reason": "" if status == "ok" else "wrong result",
            "time_us": time_us, "device": device}


def _bench_row(p, kernel, dims, time_us, impl="mlagen", device=DEVICE, family="qk_rmsnorm"):
    return {"table": "bench", "family": family, "impl": impl, "kernel": kernel, "arch": "sm_90a",
            "params": json.dumps(p, sort_keys=True), "shape": json.dumps(dims, sort_keys=True),
            "dims": json.dumps(dims, sort_keys=True), "time_us": time_us, "device": device}


def _name(fam, p, **knobs):
    return fam.kernel_name(fam.validate({**p, **knobs}))


QK_A, QK_B, QK_C = (_name(QK, QK_P, threads_per_row=16, rows_per_cta=1), _name(QK, QK_P, threads_per_row=32),
                    _name(QK, QK_P, threads_per_row=64, rows_per_cta=4))
QK_F32 = _name(QK, QK_P32)
ROPE_A = _name(ROPE, ROPE_P, head_splits=2)


def _export_fixture(results: Path):
    m64, m1000, m1024 = {"M": 64}, {"M": 1000}, {"M": 1024}
    report.append_rows([
        _tuning_row(QK_P, f"{QK_A}.sm_90a", m64, 5.0),
        _tuning_row(QK_P, f"{QK_B}.sm_90a", m64, 4.0),
        _tuning_row(QK_P, f"{QK_C}.sm_90a", m64, 1.0, status="failed"),    # failed: never chosen
        _tuning_row(QK_P, "", m64, 0.5),                                     # no kernel: never chosen
        _tuning_row(QK_P, None, m64, 0.4),
        _tuning_row(QK_P, f"{QK_C}.sm_90a", {}, 0.3),                        # no dims (older rows): left out
        _tuning_row(QK_P, f"{QK_A}.sm_90a", m1000, 20.0),                    # M=1000 and M=1024: one bucket
        _tuning_row(QK_P, f"{QK_B}.sm_90a", m1024, 25.0),
        _tuning_row(QK_P32, f"{QK_F32}.sm_90a", m64, 6.0),                   # other shape parameters: own key
        _tuning_row(QK_P, f"{QK_A}.sm_100a", m64, 3.0, device="NVIDIA B200"),
        _tuning_row(ROPE_P, f"{ROPE_A}.sm_90a", {"B1": 513, "T": 512}, 7.5, family="rope_rmsnorm_quant"),
    ], "tuning", results)
    report.append_rows([
        _bench_row(QK_P, QK_C, m64, 4.5),
        _bench_row(QK_P, "torch_eager", m64, 0.1, impl="torch_eager"),     # not a kernel of ours
        _bench_row(QK_P, QK_C, m1024, 18.0),
    ], "bench", results)


def test_export_picks_the_fastest_kernel_per_family_device_and_key(tmp_path):
    results, out = tmp_path / "results", tmp_path / "dispatch.json"
    _export_fixture(results)
    table = tune.export(str(results), out)
    assert json.loads(out.read_text()) == table
    assert table == {
        "qk_rmsnorm": {
            DEVICE: {QK.table_key(QK_P, {"M": 64}): {"kernel": QK_B, "time_us": 4.0},
                     QK.table_key(QK_P, {"M": 1024}): {"kernel": QK_C, "time_us": 18.0},
                     QK.table_key(QK_P32, {"M": 64}): {"kernel": QK_F32, "time_us": 6.0}},
            "NVIDIA B200": {QK.table_key(QK_P, {"M": 64}): {"kernel": QK_A, "time_us": 3.0}},
        },
        "rope_rmsnorm_quant": {DEVICE: {ROPE.table_key(ROPE_P, {"T": 512}): {"kernel": ROPE_A, "time_us": 7.5}}},
    }


def test_export_names_kernels_as_the_runtime_does(tmp_path):
    """Tuning rows name bundle folders (<kernel>.<arch>); the table names kernels (runtime Kernel.name)."""
    results = tmp_path / "results"
    report.append_rows([_tuning_row(QK_P, f"{QK_A}.sm_90a", {"M": 64}, 2.0)], "tuning", results)
    table = tune.export(str(results), tmp_path / "d.json")
    assert table["qk_rmsnorm"][DEVICE][QK.table_key(QK_P, {"M": 64})]["kernel"] == QK_A
    assert tune._kernel_name("a.b.sm_100a") == "a.b" and tune._kernel_name("weird.name") == "weird.name"


def test_export_from_bench_only_and_from_nothing(tmp_path):
    results = tmp_path / "results"
    with pytest.raises(SystemExit, match="no tuning or bench rows"):
        tune.export(str(results), tmp_path / "d.json")
    report.append_rows([_bench_row(QK_P, QK_A, {"M": 64}, 9.0)], "bench", results)
    table = tune.export(str(results), tmp_path / "d.json")
    assert table == {"qk_rmsnorm": {DEVICE: {QK.table_key(QK_P, {"M": 64}): {"kernel": QK_A, "time_us": 9.0}}}}


def test_export_skips_composition_rows(tmp_path):
    """Rows of the decode branch (a composition, not a dispatchable family) do not break the export."""
    results = tmp_path / "results"
    branch = dict(_bench_row(QK_P, "mlagen", {"B": 1, "C": 8}, 3.0), family="mla_decode_branch")
    report.append_rows([_bench_row(QK_P, QK_A, {"M": 64}, 9.0), branch], "bench", results)
    table = tune.export(str(results), tmp_path / "d.json")
    assert list(table) == ["qk_rmsnorm"]


def test_cli_export(tmp_path, capsys):
    results, out = tmp_path / "results", tmp_path / "dispatch.json"
    _export_fixture(results)
    assert cli.main(["export", "--results", str(results), "--out", str(out)]) == 0
    so = capsys.readouterr().out
    assert f"5 shape entries for ['qk_rmsnorm', 'rope_rmsnorm_quant'] -> {out}" in so
    assert json.loads(out.read_text())["qk_rmsnorm"][DEVICE][QK.table_key(QK_P, {"M": 64})]["kernel"] == QK_B


# ------------------------------------------------------------------ PostgreSQL: concurrent workers, one study
PG_URLS = ("postgresql://root@127.0.0.1:5432/test", "postgresql://postgres@127.0.0.1:5432/test",
           "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="module")
def pg_url():
    try:
        import psycopg2
    except ImportError:
        pytest.skip("psycopg2 is not installed (pip install -e '.[postgres]')")
    urls = [os.environ["MLAGEN_TEST_POSTGRES_URL"]] if os.environ.get("MLAGEN_TEST_POSTGRES_URL") else PG_URLS
    errors = []
    for url in urls:
        try:
            psycopg2.connect(re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", url), connect_timeout=3).close()
            return url
        except Exception as e:
            errors.append(f"{url}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
    pytest.skip("no reachable PostgreSQL server (set MLAGEN_TEST_POSTGRES_URL; tried " + "; ".join(errors) + ")")


def test_storage_url():
    assert tune.storage_url(None) == tune.DEFAULT_STORAGE
    assert tune.storage_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert tune.storage_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    import importlib.util
    bare = tune.storage_url("postgres://u@h:5432/db")
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        assert bare == "postgresql+psycopg2://u@h:5432/db"      # SQLAlchemy 2.1 would pick psycopg 3
    else:
        assert bare == "postgresql://u@h:5432/db"


def _pg_objective(p: dict) -> float:
    return _rope_time(p)


def _pg_worker(url, study_name, n_trials, batch, worker_id, barrier, queue):
    """One tuning host: opens (creating, maybe) the shared study and runs ask/tell, ``batch`` asks at a time."""
    try:
        barrier.wait(timeout=120)
        study = tune.open_study(study_name, url, seed=worker_id)
        sp = tune.space("rope_rmsnorm_quant")["space"]
        asked, told = [], {}
        while len(asked) < n_trials:
            trs = [study.ask() for _ in range(min(batch, n_trials - len(asked)))]
            for tr in trs:
                p = tune.suggest(tr, sp)
                v = _pg_objective(p) + 1e-3 * worker_id + 1e-6 * tr.number      # unique per trial
                tr.set_user_attr("worker", worker_id)
                study.tell(tr, v)
                asked.append(tr.number)
                told[tr.number] = v
        queue.put(("ok", worker_id, asked, told))
    except BaseException:
        queue.put(("error", worker_id, traceback.format_exc(), None))


@pytest.mark.postgres
def test_postgres_concurrent_workers_share_one_study(pg_url):
    optuna = _optuna()
    from optuna.storages import RDBStorage
    name = f"mlagen_test_{uuid.uuid4().hex[:12]}"
    RDBStorage(tune.storage_url(pg_url))     # the schema exists before the workers race to create the study
    n_workers, n_trials, batch = 4, 12, 3
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(n_workers), ctx.Queue()
    procs = [ctx.Process(target=_pg_worker, args=(pg_url, name, n_trials, batch, w, barrier, queue))
             for w in range(n_workers)]
    try:
        for p in procs:
            p.start()
        answers = [queue.get(timeout=240) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        errors = [a[2] for a in answers if a[0] != "ok"]
        assert not errors, "\n".join(errors)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]

        study = optuna.load_study(study_name=name, storage=tune.storage_url(pg_url))
        trials = study.get_trials(deepcopy=False)
        asked = [n for a in answers for n in a[2]]
        told = {n: v for a in answers for n, v in a[3].items()}
        assert len(trials) == n_workers * n_trials == len(asked)          # none lost, none extra
        numbers = [t.number for t in trials]
        assert len(set(numbers)) == len(numbers)                           # no duplicate trial numbers
        assert sorted(numbers) == list(range(len(trials)))
        assert sorted(asked) == sorted(numbers)                            # no worker got another's trial
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        for t in trials:
            assert t.value == pytest.approx(told[t.number])
            assert t.number in next(a[2] for a in answers if a[1] == t.user_attrs["worker"])
        assert study.best_value == pytest.approx(min(told.values()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        try:
            optuna.delete_study(study_name=name, storage=tune.storage_url(pg_url))
        except KeyError:
            pass
    with pytest.raises(KeyError):
        optuna.load_study(study_name=name, storage=tune.storage_url(pg_url))


@pytest.mark.postgres
def test_postgres_tell_from_results(pg_url, tmp_path):
    """tune.tell against a PostgreSQL study (the storage named in trials.json), no compiling."""
    optuna = _optuna()
    name = f"mlagen_test_{uuid.uuid4().hex[:12]}"
    try:
        study = tune.open_study(name, pg_url)
        nums = [study.ask().number for _ in range(3)]
        wdir, results = tmp_path / name, tmp_path / "results"
        wdir.mkdir()
        doc = {"family": "qk_rmsnorm", "study": name, "storage": pg_url, "arch": "sm_90a",
               "trials": [{"trial": n, "params": {}, "bundle": f"b{n}", "shape": {"M": 64}} for n in nums]}
        (wdir / tune.SPEC).write_text(json.dumps(doc))
        report.append_rows(_fake_rows(doc, {nums[0]: {"status": "ok", "time_us": 2.0},
                                            nums[1]: {"status": "ok", "time_us": 1.5},
                                            nums[2]: {"status": "failed", "reason": "timeout"}}),
                           "tuning", results)
        assert tune.tell(wdir, str(results), log=lambda *_: None) == 3
        st = optuna.load_study(study_name=name, storage=tune.storage_url(pg_url))
        assert st.best_trial.number == nums[1]
        assert st.trials[2].state == optuna.trial.TrialState.FAIL and st.trials[2].user_attrs["failure"] == "timeout"
    finally:
        try:
            optuna.delete_study(study_name=name, storage=tune.storage_url(pg_url))
        except KeyError:
            pass


# ------------------------------------------------------------------ commands
@pytest.mark.compile
def test_cli_tune_grid_compiles_every_valid_point_for_every_shape(tmp_path, capsys):
    out = tmp_path / "tune"
    assert cli.main(["tune-grid", "qk_rmsnorm", "--study", "s", "--out", str(out)]) == 0
    so = capsys.readouterr().out
    invalid_lines = [l for l in so.splitlines() if l.startswith("invalid ")]
    assert len(invalid_lines) == 5 and all("threads_per_row=128 must divide" in l for l in invalid_lines)
    assert any("block of 2048x1x1 threads" in l for l in invalid_lines)    # every violation is printed
    spec = out / "s" / tune.SPEC
    assert f"15 valid points (5 invalid) x 4 shapes -> {spec}" in so
    doc = json.loads(spec.read_text())
    assert doc["family"] == "qk_rmsnorm" and doc["study"] == "s" and doc["arch"] == "sm_90a"
    trials = doc["trials"]
    assert len(trials) == 60 and [t["trial"] for t in trials] == list(range(60))
    shapes = tune.space("qk_rmsnorm")["shapes"]
    for shape in shapes:
        mine = [t for t in trials if t["shape"] == shape]
        assert len(mine) == 15
        assert len({json.dumps(t["params"], sort_keys=True) for t in mine}) == 15
    valid, _ = tune.grid_points("qk_rmsnorm")
    assert {json.dumps(p, sort_keys=True) for p in valid} == {json.dumps(t["params"], sort_keys=True) for t in trials}
    bundles = {t["bundle"] for t in trials}
    assert len(bundles) == 15
    for b in bundles:
        assert (Path(b) / "manifest.json").exists() and (Path(b) / "kernel.cubin").exists()

    # the same grid again: measured.jsonl still applies; another grid: it is dropped (numbers changed)
    (out / "s" / "measured.jsonl").write_text('{"trial": 0, "status": "ok"}\n')
    assert cli.main(["tune-grid", "qk_rmsnorm", "--study", "s", "--out", str(out)]) == 0
    assert (out / "s" / "measured.jsonl").exists()
    assert cli.main(["tune-grid", "qk_rmsnorm", "--study", "s", "--out", str(out), "--shape", "M=4096"]) == 0
    so = capsys.readouterr().out
    assert not (out / "s" / "measured.jsonl").exists() and "the grid changed" in so
    doc = json.loads(spec.read_text())
    assert len(doc["trials"]) == 15 and all(t["shape"] == {"M": 4096} for t in doc["trials"])


def _qk_time(p: dict, shape: dict) -> float:
    return (shape["M"] / 1000.0 + abs(math.log2(p["threads_per_row"]) - 5)
            + 0.5 * abs(math.log2(p["rows_per_cta"]) - 2) + 1.0)


def _grid_rows(study: str) -> list[dict]:
    valid, _ = tune.grid_points("qk_rmsnorm")
    shapes = [{"M": 64}, {"M": 16384}]
    doc = {"family": "qk_rmsnorm", "study": study}
    rows, n = [], 0
    for shape in shapes:
        for p in valid:
            t = {"trial": n, "params": p, "shape": shape, "bundle": f"/x/{n}.sm_90a"}
            rows.append(tune._row(doc, t, {"trial": n, "status": "ok", "time_us": _qk_time(p, shape),
                                           "device": DEVICE}))
            n += 1
    t = {"trial": n, "params": valid[0], "shape": shapes[0], "bundle": "/x/bad.sm_90a"}
    rows.append(tune._row(doc, t, {"trial": n, "status": "failed", "reason": "timeout"}))
    return rows


def test_cli_tune_replay_prints_a_line_per_shape(tmp_path, capsys):
    results, out = tmp_path / "results", tmp_path / "replay.json"
    report.append_rows(_grid_rows("g"), "tuning", results)
    report.append_rows(_grid_rows("other"), "tuning", results)
    rc = cli.main(["tune-replay", "g", "--results", str(results), "--budget", "40", "--seeds", "3",
                   "--json", str(out)])
    so, err = capsys.readouterr()
    assert rc == 0, err
    lines = so.strip().splitlines()
    assert len(lines) == 2, so
    assert lines[0].startswith('{"M": 16384}: grid 15 valid points, best ') or \
        lines[0].startswith('{"M": 64}: grid 15 valid points, best ')
    assert {l.split("}:")[0] + "}" for l in lines} == {'{"M": 64}', '{"M": 16384}'}
    for l in lines:
        assert re.search(r"TPE within 3% after median \S+ trials \(p90 \S+\) = \d+% of the grid", l), l
    data = json.loads(out.read_text())
    assert len(data) == 2
    for r in data:
        assert r["grid_valid"] == 15 and len(r["trials_needed"]) == 3 and r["budget"] == 40
        shape = json.loads(r["shape"])
        assert r["grid_best_us"] == pytest.approx(shape["M"] / 1000.0 + 1.0)   # t32 r4


def test_cli_tune_replay_errors(tmp_path, capsys):
    results = tmp_path / "results"
    assert cli.main(["tune-replay", "g", "--results", str(results)]) == 1            # no tuning table
    assert "no table 'tuning'" in capsys.readouterr().err
    report.append_rows(_grid_rows("g"), "tuning", results)
    assert cli.main(["tune-replay", "nope", "--results", str(results)]) == 2
    assert "no measured rows of study 'nope'" in capsys.readouterr().err


def test_cli_tune_run_and_tell_missing_workdir(tmp_path, capsys):
    for cmd in ("tune-run", "tune-tell"):
        assert cli.main([cmd, str(tmp_path / "nowhere"), "--results", str(tmp_path / "r")]) == 1
        assert "trials.json" in capsys.readouterr().err


def test_cli_tune_commands_parse():
    ap = cli.build_parser()
    a = ap.parse_args(["tune-ask", "rope_rmsnorm_quant", "--shape", "B=512,S=1,C=64", "--study", "x",
                       "-p", "cache_dtype=f8e4m3", "-p", "num_heads=16", "--trials", "3"])
    assert a.func is cli.cmd_tune_ask and a.param == ["cache_dtype=f8e4m3", "num_heads=16"] and a.trials == 3
    assert cli._shape(a) == {"B": 512, "S": 1, "C": 64}
    a = ap.parse_args(["tune-grid", "qk_rmsnorm", "--study", "g", "--shape", "M=64", "--shape", "M=128"])
    assert a.shape == ["M=64", "M=128"]
    a = ap.parse_args(["tune", "qk_rmsnorm", "--study", "o"])
    with pytest.raises(cli.UsageError, match="--shape is required"):
        cli._shape(a)

"""Autotuning with Optuna, split into a builder (CPU, has the DSL) and a runner (GPU, needs no DSL).

    # CPU host: ask the study for trials, reject invalid points before compiling, compile the rest
    mlagen tune-ask rope_rmsnorm_quant --shape B=512,S=1,C=64 --trials 24 --study rope_b512 --out build/tune
    # GPU host: time every compiled trial (verified against the torch reference) in a supervised child process
    mlagen tune-run build/tune/rope_b512 --results results
    # CPU host: report the measurements to the study; repeat ask/run/tell; then export a dispatch table
    mlagen tune-tell build/tune/rope_b512 --results results
    mlagen export --results results --out dispatch.json

``mlagen tune`` does all three in one process on a GPU host that also has the DSL.

Search spaces are data (``tuning/<family>.json``).  Storage is SQLite by default
(``sqlite:///results/tuning.db``); any SQLAlchemy URL works, e.g. a shared PostgreSQL database for
many hosts (``postgresql://user@host/db``) -- Optuna's RDB storage hands each worker distinct trials.
A candidate that fails verification, crashes or hangs is recorded as a FAILED trial with the reason,
and the study goes on: candidates run in a child process that is restarted after a crash or timeout.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from . import families
from .env import git_commit, now_utc
from .families.base import ParamError

DEFAULT_STORAGE = "sqlite:///results/tuning.db"
SPEC = "trials.json"


def tuning_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "tuning"
    if here.is_dir():
        return here
    from importlib.resources import files
    return Path(str(files("mlagen._tuning")))


def space(family: str) -> dict:
    path = tuning_dir() / f"{family}.json"
    if not path.exists():
        raise ParamError(f"no search space for {family}: {path} is missing")
    return json.loads(path.read_text())


def _optuna():
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_url(storage: str | None = None) -> str:
    """The SQLAlchemy URL for ``storage`` (default: the SQLite file under results/).

    A bare ``postgresql://`` (or ``postgres://``) URL names the driver SQLAlchemy picks by default, which
    is psycopg 3 from SQLAlchemy 2.1 on; where only psycopg2 (the ``postgres`` extra) is installed, the
    URL is pinned to it so that ``postgresql://user@host/db`` works either way.
    """
    import importlib.util
    url = storage or DEFAULT_STORAGE
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres"):
        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return f"postgresql+psycopg2://{rest}"
        return f"postgresql://{rest}"
    return url


def open_study(name: str, storage: str | None = None, seed: int | None = None):
    optuna = _optuna()
    storage = storage_url(storage)
    if storage.startswith("sqlite:///"):
        Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True)
    return optuna.create_study(study_name=name, storage=storage, direction="minimize",
                               sampler=sampler, load_if_exists=True)


def suggest(trial, sp: Mapping[str, list], fixed: Mapping[str, Any] | None = None) -> dict:
    """``fixed`` merged with a suggestion for every knob of ``sp`` that ``fixed`` does not pin."""
    fixed = dict(fixed or {})
    return {**fixed, **{k: trial.suggest_categorical(k, list(v)) for k, v in sp.items() if k not in fixed}}


MAX_INVALID_STREAK = 8


def ask_valid(study, fam, sp: Mapping[str, list], fixed: Mapping[str, Any] | None, arch: str,
              pool: list | None = None, rng=None, on_invalid=None, attrs: Mapping[str, Any] | None = None):
    """Ask until the sampler proposes a valid point; return (trial, validated params).

    Invalid proposals are told FAIL with the reason in the trial's ``failure`` attribute: they cost no
    compile and no GPU time.  TPE learns nothing from FAIL trials, so where most of the space is invalid
    it keeps proposing invalid neighbours of its best points; after ``MAX_INVALID_STREAK`` of them in a
    row, a uniformly drawn valid point (``pool``, default: the valid grid) is enqueued instead.
    """
    import numpy as np
    optuna = _optuna()
    rng = rng if rng is not None else np.random.default_rng()
    streak = 0
    while True:
        tr = study.ask()
        for k, v in (attrs or {}).items():
            tr.set_user_attr(k, v)
        params = suggest(tr, sp, fixed)
        try:
            return tr, fam.validate(params, arch)
        except ParamError as e:
            tr.set_user_attr("failure", f"invalid: {e}")
            study.tell(tr, state=optuna.trial.TrialState.FAIL)
            if on_invalid is not None:
                on_invalid(params, e)
            streak += 1
            if streak >= MAX_INVALID_STREAK:
                if pool is None:
                    pool = grid_points(fam.name, fixed, arch)[0]
                if not pool:
                    raise ParamError(f"{fam.name}: no valid point in the search space with {dict(fixed or {})}")
                pick = pool[int(rng.integers(len(pool)))]
                study.enqueue_trial({k: pick[k] for k in sp if k not in (fixed or {})})
                streak = 0


def _build_companions(fam, params: list[dict], arch: str, out: Path, log=print) -> None:
    """Compile, once each, the other kernels the candidates' calls need (e.g. mla_decode's combine)."""
    from .compile import build
    done = set()
    for p in params:
        for cfam, cp in fam.tune_companions(p):
            key = json.dumps([cfam, cp], sort_keys=True)
            if key not in done:
                done.add(key)
                try:
                    build(cfam, cp, arch, out)
                except Exception as e:      # the candidates then fail at measure time with the reason
                    log(f"companion {cfam} {cp}: compile failed: {str(e)[:200]}")


def ask(family: str, shape: Mapping[str, int], trials: int, study_name: str, out_dir: str | os.PathLike,
        fixed: Mapping[str, Any] | None = None, arch: str = "sm_90a", storage: str | None = None,
        workers: int = 1, seed: int | None = None, log=print) -> Path:
    """Ask ``trials`` trials; invalid points are told FAIL at once with the reason; compile the rest.

    Writes ``out_dir/<study>/trials.json`` listing (trial number, params, bundle, shape) for the runner.
    """
    from .compile import build_many
    fam = families.get(family)
    sp = space(family)["space"]
    study = open_study(study_name, storage, seed)
    optuna = _optuna()
    wdir = Path(out_dir) / study_name
    wdir.mkdir(parents=True, exist_ok=True)
    pending, invalid = [], 0
    counter = {"invalid": 0}

    def _invalid(params, e):
        counter["invalid"] += 1
    for _ in range(trials):
        tr, p = ask_valid(study, fam, sp, fixed, arch, on_invalid=_invalid,
                          attrs={"shape": json.dumps(dict(shape), sort_keys=True)})
        pending.append((tr, p))
    invalid = counter["invalid"]
    results = build_many([(family, p, arch) for _, p in pending], wdir / "bundles", workers=workers,
                         progress=False)
    _build_companions(fam, [p for _, p in pending], arch, wdir / "bundles", log)
    spec = []
    for (tr, p), (_, bdir, err) in zip(pending, results):
        num = tr.number
        if err:
            tr.set_user_attr("failure", f"compile failed: {err[:500]}")
            study.tell(tr, state=optuna.trial.TrialState.FAIL)
            study.set_user_attr(f"compile_failure_{num}", err[:500])
            log(f"trial {num}: compile failed: {err[:200]}")
            continue
        spec.append({"trial": num, "params": p, "bundle": str(bdir), "shape": dict(shape)})
    old = json.loads((wdir / SPEC).read_text()) if (wdir / SPEC).exists() else {"trials": []}
    doc = {"family": family, "study": study_name, "storage": storage or DEFAULT_STORAGE, "arch": arch,
           "trials": old["trials"] + spec}
    (wdir / SPEC).write_text(json.dumps(doc, indent=1))
    log(f"{study_name}: {len(spec)} trials compiled, {invalid} invalid (told FAIL), "
        f"{len(pending) - len(spec)} failed to compile -> {wdir / SPEC}")
    return wdir


# ------------------------------------------------------------------------------------------
# Runner (GPU host): a supervisor and a persistent worker child, restarted after a crash or hang
# ------------------------------------------------------------------------------------------
class Supervisor:
    """Measures candidates in a child process; a crash or a hang fails that candidate only."""

    def __init__(self, family: str, warmup: int = 10, reps: int = 50, timeout_s: float = 60.0):
        self.family, self.warmup, self.reps, self.timeout_s = family, warmup, reps, timeout_s
        self.proc = None
        self._stderr = None
        self._buf = b""                           # bytes read from the worker's stdout, not yet a full line

    def command(self) -> list[str]:
        """The worker's command line (one trial per stdin line, one JSON answer per stdout line)."""
        return [sys.executable, "-m", "mlagen.tune", "_worker", self.family, str(self.warmup), str(self.reps)]

    def _start(self):
        import tempfile
        self._stderr = tempfile.TemporaryFile()      # kept to say why a worker died
        self._buf = b""
        # stdout unbuffered and read with os.read: a buffered readline could swallow the answer along with
        # a line printed before it, leaving select() nothing to report until the deadline
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, bufsize=0)

    def _why_dead(self) -> str:
        """Exit status and the last line the worker wrote to stderr (its exception, usually)."""
        try:
            self.proc.wait(timeout=10)           # stdout closes a moment before the exit status is there
        except subprocess.TimeoutExpired:
            return "worker closed its output but did not exit"
        why = f"worker exited with status {self.proc.returncode}"
        last = ""
        if self._stderr is not None:
            try:
                self._stderr.seek(max(0, self._stderr.seek(0, os.SEEK_END) - 4096))
                lines = [l.strip() for l in self._stderr.read().decode(errors="replace").splitlines() if l.strip()]
                last = lines[-1] if lines else ""
            except (OSError, ValueError):
                pass
        return f"{why}: {last[:300]}" if last else why

    def _fail(self, trial: Mapping, why: str) -> dict:
        self.close()
        return {"trial": trial["trial"], "status": "failed", "reason": why}

    def measure(self, trial: Mapping) -> dict:
        """``trial``: {trial, bundle, shape}.  Returns the worker's answer or a failure record."""
        import selectors
        if self.proc is None or self.proc.poll() is not None:
            self.close()
            self._start()
        try:
            self.proc.stdin.write((json.dumps(dict(trial)) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return self._fail(trial, "worker died before the trial (" + self._why_dead() + ")")
        fd = self.proc.stdout.fileno()
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                while b"\n" in self._buf:
                    line, self._buf = self._buf.split(b"\n", 1)
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue                     # something else printed to stdout
                    if isinstance(msg, dict) and msg.get("trial") == trial["trial"]:
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if sel.select(timeout=min(1.0, left)):
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:                    # EOF: the worker is gone
                        return self._fail(trial, self._why_dead())
                    self._buf += chunk
                elif self.proc.poll() is not None:
                    return self._fail(trial, self._why_dead())
        finally:
            sel.close()
        return self._fail(trial, f"timeout: no answer within {self.timeout_s:g} s")

    def close(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except (OSError, ValueError):
                    pass
            self.proc = None
        self._buf = b""
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


def run(workdir: str | os.PathLike, results_dir: str = "results", timeout_s: float = 60.0,
        warmup: int = 10, reps: int = 50, log=print) -> list[dict]:
    """Time every trial in ``workdir/trials.json`` not yet measured; append rows to results/tuning.*."""
    from .report import append_rows
    wdir = Path(workdir)
    doc = json.loads((wdir / SPEC).read_text())
    done_path = wdir / "measured.jsonl"
    done = {json.loads(l)["trial"] for l in done_path.read_text().splitlines()} if done_path.exists() else set()
    sup = Supervisor(doc["family"], warmup, reps, timeout_s)
    rows = []
    try:
        for t in doc["trials"]:
            if t["trial"] in done:
                continue
            msg = sup.measure(t)
            rows.append(_row(doc, t, msg))
            with done_path.open("a") as f:
                f.write(json.dumps(msg) + "\n")
    finally:
        sup.close()
        if rows:    # also when interrupted: measured.jsonl already counts these trials as done
            append_rows(rows, "tuning", results_dir)
    ok = [r for r in rows if r["status"] == "ok"]
    log(f"{doc['study']}: {len(ok)} measured, {len(rows) - len(ok)} failed")
    return rows


def _row(doc, t, msg) -> dict:
    return {"table": "tuning", "family": doc["family"], "study": doc["study"], "trial": t["trial"],
            "params": json.dumps(t["params"], sort_keys=True), "shape": json.dumps(t["shape"], sort_keys=True),
            "kernel": Path(t["bundle"]).name if t.get("bundle") else "", "status": msg.get("status", "failed"),
            "reason": msg.get("reason", ""), "time_us": msg.get("time_us"), "err": msg.get("err"),
            "gbps": msg.get("gbps"), "device": msg.get("device", ""), "dims": msg.get("dims", ""),
            "commit": git_commit(), "date": now_utc()}


def _worker(family: str, warmup: int, reps: int) -> int:
    """Child process: read one trial per stdin line, answer one JSON line on stdout."""
    import numpy as np
    import torch
    from . import runtime
    from .bench import Timer, _clone, _max_rel_err, problem_inputs
    fam = families.get(family)
    timer = Timer(warmup, reps)
    dev = torch.cuda.get_device_name(0)
    rng = np.random.default_rng()
    cache: dict[str, Any] = {}
    tol = getattr(fam, "tune_tolerance", 2e-2)
    for line in sys.stdin:
        if not line.strip():
            continue
        t = json.loads(line)
        try:
            if os.environ.get("MLAGEN_TUNE_FAULT") == str(t["trial"]):   # test hook: simulate a crash
                os._exit(3)
            k = runtime.load(t["bundle"])
            # a family whose call is several launches measures itself; the others: one bound launch
            res = fam.tune_measure(k, t["shape"], timer, cache)
            if res is None:
                key = json.dumps([{n: k.params[n] for n in fam.shape_params}, t["shape"]], sort_keys=True)
                if key not in cache:
                    _, base = problem_inputs(fam, k, t["shape"], rng)
                    ref = _clone(base)
                    fam.torch_impl(k.params, ref)
                    torch.cuda.synchronize()
                    cache.clear()
                    cache[key] = (base, fam.bench_outputs(k.params, ref))
                base, ref_out = cache[key]
                tk = _clone(base)
                b = k.bind(check_contents=False, **tk)
                b.launch()
                torch.cuda.synchronize()
                res = {"err": _max_rel_err(fam.bench_outputs(k.params, tk), ref_out)}
                if res["err"] <= tol:                  # a wrong result is not timed
                    res.update(time_us=timer(b.launch)["time_us"], dims=dict(b.dims),
                               bytes=fam.bytes_moved(k.params, b.dims))
            if not res["err"] <= tol:
                msg = {"trial": t["trial"], "status": "failed", "err": res["err"],
                       "reason": f"wrong result: rel err {res['err']:.3g} > {tol}"}
            else:
                msg = {"trial": t["trial"], "status": "ok", "time_us": res["time_us"], "err": res["err"],
                       "gbps": res["bytes"] / (res["time_us"] * 1e-6) / 1e9, "device": dev,
                       "dims": json.dumps(dict(res["dims"]), sort_keys=True)}
        except Exception as e:
            msg = {"trial": t["trial"], "status": "failed", "reason": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps(msg), flush=True)
    return 0


def tune_online(family: str, shape: Mapping[str, int], trials: int, study_name: str, bundles: str | None = None,
                fixed: Mapping[str, Any] | None = None, arch: str = "sm_90a", storage: str | None = None,
                results_dir: str = "results", out_dir: str = "build/tune", seed: int | None = None,
                timeout_s: float = 60.0, log=print):
    """ask -> (find or compile) -> measure -> tell, in one process on a GPU host.

    Candidates come from ``bundles`` (precompiled, e.g. a grid built on a CPU host) when given; otherwise
    they are compiled on the spot (needs the DSL).  Invalid points are told FAIL with the reason.
    """
    from .report import append_rows
    from .runtime import find_bundles
    optuna = _optuna()
    fam = families.get(family)
    sp = space(family)["space"]
    study = open_study(study_name, storage, seed)
    prebuilt = {}
    if bundles:
        for bd in find_bundles(bundles, family, arch):
            m = json.loads((bd / "manifest.json").read_text())
            prebuilt[json.dumps(m["params"], sort_keys=True)] = bd
    sup = Supervisor(family, timeout_s=timeout_s)
    doc = {"family": family, "study": study_name}
    rows = []
    try:
        for _ in range(trials):
            tr, p = ask_valid(study, fam, sp, fixed, arch)
            key = json.dumps(p, sort_keys=True)
            if key in prebuilt:
                bdir = prebuilt[key]
            else:
                from .compile import build
                try:
                    bdir = build(family, p, arch, Path(out_dir) / study_name / "bundles")
                    _build_companions(fam, [p], arch, Path(out_dir) / study_name / "bundles", log)
                except Exception as e:   # CompileError, DSL missing: fail this trial, go on
                    tr.set_user_attr("failure", f"compile failed: {type(e).__name__}: {str(e)[:500]}")
                    study.tell(tr, state=optuna.trial.TrialState.FAIL)
                    log(f"trial {tr.number}: compile failed: {str(e)[:200]}")
                    continue
            t = {"trial": tr.number, "bundle": str(bdir), "shape": dict(shape), "params": p}
            msg = sup.measure(t)
            rows.append(_row(doc, t, msg))
            if msg["status"] == "ok":
                study.tell(tr, msg["time_us"])
            else:
                tr.set_user_attr("failure", msg.get("reason", ""))
                study.tell(tr, state=optuna.trial.TrialState.FAIL)
    finally:
        sup.close()
        if rows:
            append_rows(rows, "tuning", results_dir)
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        best = min(ok, key=lambda r: r["time_us"])
        log(f"{study_name}: {len(ok)} measured; best {best['time_us']:.2f} us {best['params']}")
    return rows


def grid_points(family: str, fixed: Mapping[str, Any] | None = None, arch: str = "sm_90a"):
    """Every point of the family's search space: (valid params list, [(params, reason)] invalid)."""
    import itertools
    fam = families.get(family)
    sp = space(family)["space"]
    keys = [k for k in sp if k not in (fixed or {})]
    valid, invalid = [], []
    for vals in itertools.product(*(sp[k] for k in keys)):
        params = {**(fixed or {}), **dict(zip(keys, vals))}
        try:
            valid.append(fam.validate(params, arch))
        except ParamError as e:
            invalid.append((params, str(e)))
    return valid, invalid


def replay(measured: Mapping[str, float], family: str, fixed: Mapping[str, Any] | None = None,
           budget: int = 40, seeds: int = 20, within: float = 0.03, arch: str = "sm_90a") -> dict:
    """How fast does the sampler find a config within ``within`` of the grid's best?

    ``measured`` maps json(params) -> time of every valid grid point (measured on a GPU).  Each seed runs
    a fresh in-memory TPE study whose objective looks the time up.  Invalid proposals are rejected as in
    real tuning (:func:`ask_valid`) and, costing no compile or GPU time, are not counted: the result is
    the number of measured trials per seed until one is within ``within`` of the grid's best.
    """
    import numpy as np
    optuna = _optuna()
    fam = families.get(family)
    sp = space(family)["space"]
    best = min(measured.values())
    pool = [json.loads(k) for k in measured]
    need = []
    for seed in range(seeds):
        st = optuna.create_study(direction="minimize",
                                 sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True))
        rng = np.random.default_rng(seed)
        hit = None
        for i in range(budget):
            tr, p = ask_valid(st, fam, sp, fixed, arch, pool=pool, rng=rng)
            key = json.dumps(p, sort_keys=True)
            if key not in measured:          # valid but not measured (e.g. failed on the GPU)
                st.tell(tr, state=optuna.trial.TrialState.FAIL)
                continue
            v = measured[key]
            st.tell(tr, v)
            if v <= best * (1 + within) and hit is None:
                hit = i + 1
        need.append(hit if hit is not None else budget + 1)
    import statistics
    return {"grid_valid": len(measured), "budget": budget, "trials_needed": need,
            "median_trials": statistics.median(need), "p90_trials": sorted(need)[int(0.9 * (len(need) - 1))]}


def tell(workdir: str | os.PathLike, results_dir: str = "results", storage: str | None = None, log=print) -> int:
    """Report measured trials (rows in results/tuning.*) to the study; returns how many were told."""
    from .report import load
    optuna = _optuna()
    wdir = Path(workdir)
    doc = json.loads((wdir / SPEC).read_text())
    study = open_study(doc["study"], storage or doc["storage"])
    df = load("tuning", results_dir)
    df = df[df["study"] == doc["study"]]
    running = {t.number: t for t in study.get_trials(deepcopy=False)
               if t.state == optuna.trial.TrialState.RUNNING}
    n = 0
    for _, r in df.iterrows():
        num = int(r["trial"])
        ft = running.pop(num, None)       # a trial measured twice (rows merged from two runs) is told once
        if ft is None:
            continue
        if r["status"] == "ok":
            study.tell(num, float(r["time_us"]))
        else:
            reason = "" if r.get("reason") is None or r.get("reason") != r.get("reason") else str(r["reason"])
            optuna.trial.Trial(study, ft._trial_id).set_user_attr("failure", reason[:500])
            study.tell(num, state=optuna.trial.TrialState.FAIL)
            study.set_user_attr(f"failure_{num}", reason[:500])
        n += 1
    best = study.best_trial if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) else None
    log(f"{doc['study']}: told {n} trials" + (f"; best {best.value:.2f} us with {best.params}" if best else ""))
    return n


def _kernel_name(kernel) -> str:
    """The kernel name the runtime knows (``Kernel.name``): tuning rows name bundle folders
    (``<kernel_name>.<arch>``), bench rows the kernel itself."""
    from .families.base import ARCHES
    k = str(kernel)
    stem, dot, arch = k.rpartition(".")
    return stem if dot and arch in ARCHES else k


def export(results_dir: str = "results", out: str | os.PathLike = "dispatch.json") -> dict:
    """Best measured kernel per (family, device, shape bucket) -> the table ``runtime.Dispatcher`` reads.

    Reads benchmark rows and tuning trials (rows that carry the call's ``dims``); the bucket is
    ``family.bucket(dims)``.
    """
    import pandas as pd
    from .report import load
    frames = []
    for name in ("tuning", "bench"):
        try:
            df = load(name, results_dir)
        except FileNotFoundError:
            continue
        if "dims" not in df:
            continue
        if name == "bench":
            df = df[df["impl"] == "mlagen"].assign(status="ok")
        df = df[(df["status"] == "ok") & df["dims"].notna() & (df["dims"].astype(str) != "")]
        frames.append(df[["family", "kernel", "params", "dims", "time_us", "device"]])
    if not frames:
        raise SystemExit(f"no tuning or bench rows with dims under {results_dir}")
    df = pd.concat(frames, ignore_index=True)
    df["time_us"] = pd.to_numeric(df["time_us"], errors="coerce")
    df = df[df["time_us"].notna() & df["kernel"].notna() & (df["kernel"].astype(str) != "")]
    # only kernel families dispatch (the decode branch's rows are a composition of several launches)
    known = {f.name for f in families.all_families()}
    df = df[df["family"].isin(known)]
    # tuning rows name bundle folders (<kernel>.<arch>); the Dispatcher matches Kernel.name
    df = df.assign(device=df["device"].fillna("").astype(str), kernel=df["kernel"].map(_kernel_name))
    df["bucket"] = [families.get(f).table_key(json.loads(p), json.loads(d))
                    for f, p, d in zip(df["family"], df["params"], df["dims"])]
    # the whole fastest row per group (groupby().first() would take each column's first non-null value,
    # possibly from different rows)
    best = df.loc[df.groupby(["family", "device", "bucket"], sort=True)["time_us"].idxmin()]
    table: dict = {}
    for _, r in best.iterrows():
        table.setdefault(r["family"], {}).setdefault(r["device"], {})[r["bucket"]] = {
            "kernel": r["kernel"], "time_us": float(r["time_us"])}
    Path(out).write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "_worker":
        sys.exit(_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    print(__doc__)

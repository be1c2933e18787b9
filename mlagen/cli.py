"""The ``mlagen`` command line.

    mlagen families
    mlagen generate qk_rmsnorm -p threads_per_row=32 -p rsqrt=approx --arch sm_100a --out build
    mlagen generate qk_rmsnorm --param dtype=f32 out_dtype=f32 --source-only --out gen
    mlagen build qk_rmsnorm --grid threads_per_row=16,32,64 rows_per_cta=1,2,4 --arch sm_90a,sm_100a --workers 4
    mlagen build-suite --arch sm_90a --out build/gpu          # the GPU test + benchmark bundles (mlagen.suites)
    mlagen bench qk_rmsnorm --bundles build --shape M=4096 --results results
    mlagen report --results results --table qk_rmsnorm --plot qk.png
    mlagen results-merge host_results/*.parquet --results results

Invalid parameters print the reason and exit with status 2 before anything is written; a compile
failure exits with status 1.  Heavy modules (the DSL, pandas, matplotlib, the bench) are imported only
by the subcommands that need them.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from . import families
from ._version import __version__
from .families.base import ARCHES, ParamError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line input (exit status 2)."""


def _err(msg: str) -> None:
    print(f"mlagen: error: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Parsing helpers (also used by mlagen.bench)
# --------------------------------------------------------------------------------------------
def parse_kv(items: Sequence[str] | None, what: str = "--param") -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; values stay strings (the family coerces them)."""
    out: dict[str, str] = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        k, v = k.strip(), v.strip()
        if not sep or not k:
            raise UsageError(f"{what} expects KEY=VALUE, got {it!r}")
        if k in out and out[k] != v:
            raise UsageError(f"{what}: {k} given twice ({out[k]!r} and {v!r})")
        out[k] = v
    return out


def parse_grid(items: Sequence[str] | None, what: str = "--grid") -> dict[str, list[str]]:
    """``["a=1,2", "b=x"]`` -> ``{"a": ["1", "2"], "b": ["x"]}`` (order kept, duplicates dropped)."""
    out: dict[str, list[str]] = {}
    for k, v in parse_kv(items, what).items():
        vals = [x.strip() for x in v.split(",") if x.strip()]
        if not vals:
            raise UsageError(f"{what}: {k} has no values")
        out[k] = list(dict.fromkeys(vals))
    return out


def parse_arches(items: Sequence[str] | None) -> list[str]:
    arches: list[str] = []
    for it in items or []:
        for a in it.split(","):
            a = a.strip()
            if not a:
                continue
            if a not in ARCHES:
                raise UsageError(f"arch {a!r} is not supported; choose from {list(ARCHES)}")
            if a not in arches:
                arches.append(a)
    return arches or ["sm_90a"]


def _resources_line(res: dict) -> str:
    if not res:
        return "resources: unknown (cuobjdump not found; pip install nvidia-cuda-cuobjdump)"
    spill = res.get("local_bytes", 0) + res.get("stack_bytes", 0)
    s = (f"registers: {res.get('registers', '?')}   stack: {res.get('stack_bytes', 0)} B   "
         f"local: {res.get('local_bytes', 0)} B   static smem: {res.get('static_shared_bytes', 0)} B")
    return s + ("   (no spills)" if spill == 0 else "   ** SPILLS **")


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [[("" if c is None else str(c)) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------
def cmd_families(args) -> int:
    fams = families.all_families()
    if args.names:
        for f in fams:
            print(f.name)
        return EXIT_OK
    for i, f in enumerate(fams):
        if i:
            print()
        print(f.describe())
        if f.shape_params:
            print(f"    shape parameters (fixed per bundle): {', '.join(f.shape_params)}")
    print(f"\narchitectures: {', '.join(ARCHES)}")
    return EXIT_OK


def cmd_generate(args) -> int:
    from . import codegen
    fam = families.get(args.family)
    given = parse_kv(args.param)
    arch = args.arch
    p = fam.validate(given, arch)          # ParamError -> exit 2, nothing written yet
    out = Path(args.out)
    if args.source_only:
        _, p, name, src = codegen.render(fam, p, arch)
        path = out / f"{name}.py"
        if path.exists() and path.read_text() != src and not args.force:
            raise UsageError(f"{path} exists with different content (another arch?); pass --force to overwrite")
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(src)
        print(f"source:  {path}")
        print(f"kernel:  {name} ({arch})")
        print(f"params:  {p}")
        return EXIT_OK
    from . import compile as mcompile
    import json
    try:
        bdir = mcompile.build(fam.name, p, arch, out, force=args.force)
    except mcompile.CompileError as e:
        _err(str(e))
        return EXIT_FAIL
    m = json.loads((bdir / mcompile.MANIFEST).read_text())
    print(f"bundle:  {bdir}")
    print(f"kernel:  {m['kernel_name']} ({m['arch']})")
    print(f"symbol:  {m['kernel_symbol']}")
    print(f"block:   {tuple(m['block'])}   dynamic smem: {m['smem_bytes']} B")
    print(_resources_line(m.get("resources") or {}))
    return EXIT_OK


def _grid_jobs(fam, grid: dict[str, list[str]], fixed: dict[str, str], arches: list[str]):
    """All combinations: returns (valid [(given, arch, params)], invalid [(given, arch, message)])."""
    for k in list(grid) + list(fixed):
        fam.param(k)                        # unknown name -> ParamError (exit 2)
    both = set(grid) & set(fixed)
    if both:
        raise UsageError(f"{sorted(both)} given both in --grid and --param")
    keys = list(grid)
    valid, invalid, seen = [], [], set()
    for arch in arches:
        for combo in itertools.product(*(grid[k] for k in keys)):
            given = {**fixed, **dict(zip(keys, combo))}
            try:
                p = fam.validate(given, arch)
            except ParamError as e:
                invalid.append((given, arch, _short_error(str(e))))
                continue
            key = (arch, tuple(sorted(p.items())))
            if key in seen:
                continue
            seen.add(key)
            valid.append((given, arch, p))
    return keys, valid, invalid


def _short_error(msg: str) -> str:
    """A ParamError message in one line (drop the echo of all parameters)."""
    lines = [l.strip() for l in msg.splitlines() if l.strip()]
    items = [l[2:] if l.startswith("- ") else l for l in lines[1:]]
    return "; ".join(items) if items else lines[0] if lines else msg


def cmd_build(args) -> int:
    fam = families.get(args.family)
    grid = parse_grid(args.grid)
    fixed = parse_kv(args.param)
    arches = parse_arches(args.arch)
    keys, valid, invalid = _grid_jobs(fam, grid, fixed, arches)
    shown = keys or []

    def vals(given):
        return [given.get(k) for k in shown]

    n_all = len(valid) + len(invalid)
    print(f"{fam.name}: {n_all} combination(s) x arch -> {len(valid)} valid, {len(invalid)} invalid")
    rows: list[list[Any]] = []
    for given, arch, msg in invalid:
        rows.append(["invalid", arch, *vals(given), "", msg])
    failed = 0
    if args.dry_run:
        for given, arch, p in valid:
            rows.append(["valid", arch, *vals(given), "", fam.kernel_name(p)])
    elif valid:
        from . import compile as mcompile
        import json
        if not mcompile.dsl_available():
            _err("compiling needs nvidia-cutlass-dsl (pip install -e '.[compile]')")
            return EXIT_FAIL
        jobs = [(fam.name, p, arch) for _, arch, p in valid]
        results = mcompile.build_many(jobs, args.out, workers=args.workers, progress=not args.quiet)
        by_job = {(j[2], tuple(sorted(j[1].items()))): (path, err) for j, path, err in results}
        for given, arch, p in valid:
            path, err = by_job[(arch, tuple(sorted(p.items())))]
            if err is not None:
                failed += 1
                rows.append(["FAILED", arch, *vals(given), "", err.splitlines()[0] if err else ""])
                continue
            res = {}
            try:
                res = json.loads((Path(path) / mcompile.MANIFEST).read_text()).get("resources") or {}
            except (OSError, ValueError):
                pass
            regs = res.get("registers", "?")
            spill = res.get("local_bytes", 0) + res.get("stack_bytes", 0) if res else "?"
            rows.append(["ok", arch, *vals(given), f"{regs}/{spill}", str(path)])
    order = {"FAILED": 0, "invalid": 2, "ok": 1, "valid": 1}
    rows.sort(key=lambda r: order.get(r[0], 3))
    if rows:
        print(_table(rows, ["status", "arch", *shown, "regs/spill", "bundle / reason"]))
    n_ok = sum(r[0] == "ok" for r in rows)
    if not args.dry_run:
        print(f"\n{n_ok} built, {failed} failed, {len(invalid)} invalid combination(s) skipped"
              + (f"  -> {args.out}" if n_ok else ""))
    if failed:
        return EXIT_FAIL
    if not valid:
        _err("no valid combination in the grid")
        return EXIT_USAGE
    return EXIT_OK


def cmd_build_suite(args) -> int:
    """Compile the named configuration sets of mlagen.suites (GPU tests and benchmarks) for a GPU host."""
    from . import suites
    import json
    arches = parse_arches(args.arch)
    sets = {"test": suites.TEST, "bench": suites.BENCH}
    chosen = [args.only] if args.only else ["test", "bench"]
    jobs, seen = [], set()
    for arch in arches:
        for which in chosen:
            for fam_name, p, a in suites.jobs(sets[which], arch):
                if args.family and fam_name not in args.family:
                    continue
                key = (which, fam_name, json.dumps(p, sort_keys=True), a)
                if key not in seen:
                    seen.add(key)
                    jobs.append((which, fam_name, p, a))
    if not jobs:
        raise UsageError(f"no suite configurations for {args.family or 'any family'}")
    rows: list[list[Any]] = []
    valid = []
    for which, fam_name, p, a in jobs:
        try:
            families.get(fam_name).validate(p, a)
            valid.append((which, fam_name, p, a))
        except ParamError as e:
            rows.append(["invalid", fam_name, a, json.dumps(p, sort_keys=True), "", _short_error(str(e))])
    failed = 0
    if args.dry_run:
        rows += [["valid", f, a, json.dumps(p, sort_keys=True), "", ""] for _, f, p, a in valid]
    elif valid:
        from . import compile as mcompile
        from .env import git_commit
        if not mcompile.dsl_available():
            _err("compiling needs nvidia-cutlass-dsl (pip install -e '.[compile]')")
            return EXIT_FAIL
        built = []
        for which in chosen:   # out/test holds what the GPU tests launch, out/bench what the benchmarks time
            sel = [(f, p, a) for w, f, p, a in valid if w == which]
            built += mcompile.build_many(sel, Path(args.out) / which, workers=args.workers, progress=not args.quiet)
        for (f, p, a), path, err in built:
            if err is not None:
                failed += 1
                rows.append(["FAILED", f, a, json.dumps(p, sort_keys=True), "", err.splitlines()[0]])
                continue
            res = json.loads((Path(path) / mcompile.MANIFEST).read_text()).get("resources") or {}
            spill = res.get("local_bytes", 0) + res.get("stack_bytes", 0) if res else "?"
            rows.append(["ok", f, a, json.dumps(p, sort_keys=True), f"{res.get('registers', '?')}/{spill}", str(path)])
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "COMMIT").write_text(git_commit() + "\n")
    order = {"FAILED": 0, "invalid": 1, "ok": 2, "valid": 2}
    rows.sort(key=lambda r: order.get(r[0], 3))
    print(_table(rows, ["status", "family", "arch", "params", "regs/spill", "bundle / reason"]))
    n_bad = failed + sum(r[0] == "invalid" for r in rows)
    if not args.dry_run:
        print(f"\n{len(valid) - failed} bundles in {args.out}, {failed} failed, "
              f"{len(jobs) - len(valid)} invalid")
    return EXIT_FAIL if n_bad else EXIT_OK


def cmd_bench(args) -> int:
    try:
        from . import bench
    except ImportError as e:
        _err(f"the benchmark module is not available ({e}); mlagen/bench.py provides `main_bench(args)`")
        return EXIT_FAIL
    fn = getattr(bench, "main_bench", None)
    if fn is None:
        _err("mlagen.bench has no main_bench(args) yet; cannot run benchmarks")
        return EXIT_FAIL
    families.get(args.family)
    try:
        rc = fn(args)
    except ModuleNotFoundError as e:   # torch / cuda-python absent: a GPU host's dependencies
        _err(f"mlagen bench: {e} (benchmarks run on a GPU host with the runtime dependencies installed)")
        return EXIT_FAIL
    return int(rc) if isinstance(rc, (int, bool)) else EXIT_OK


def cmd_report(args) -> int:
    from . import report
    names = [args.table] if args.table else report.tables(args.results)
    if not names:
        _err(f"no result tables in {args.results}/")
        return EXIT_FAIL
    def _load(n):
        df = report.load(n, args.results)
        if args.family and "family" in df:
            df = df[df["family"] == args.family]
        return df
    for i, n in enumerate(names):
        df = _load(n)
        if i:
            print()
        print(f"== {n} ==")
        print(report.summary(df))
    if args.plot:
        if len(names) != 1:
            raise UsageError(f"--plot needs one table; choose with --table (have: {', '.join(names)})")
        df = _load(names[0])
        out = report.plot(df, args.plot, x=args.x, y=args.y,
                          title=names[0] + (f": {args.family}" if args.family else ""))
        print(f"\nplot: {out}")
    return EXIT_OK


def cmd_results_merge(args) -> int:
    from . import report
    added = report.merge_files(args.files, args.results)
    if not added:
        print("nothing to merge")
    for name, n in sorted(added.items()):
        print(f"{name}: {n} new row(s) -> {Path(args.results) / (name + '.parquet')}")
    return EXIT_OK

# --------------------------------------------------------------------------------------------
# Tuning (mlagen.tune)
# --------------------------------------------------------------------------------------------
def _shape(args) -> dict:
    from .bench import parse_shape
    if not args.shape:
        raise UsageError("--shape is required, e.g. --shape B=512,S=1,C=64")
    return parse_shape(args.shape)


def cmd_tune_ask(args) -> int:
    from . import tune
    tune.ask(args.family, _shape(args), args.trials, args.study, args.out, parse_kv(args.param), args.arch,
             args.storage, args.workers, args.seed)
    return EXIT_OK


def cmd_tune_grid(args) -> int:
    """Compile every valid point of the space (the exhaustive baseline); invalid points are listed."""
    import json as _json
    from . import tune
    from .bench import parse_shape
    from .compile import build_many
    fixed = parse_kv(args.param)
    valid, invalid = tune.grid_points(args.family, fixed, args.arch)
    for params, why in invalid:
        print(f"invalid {params}: {_short_error(why)}")
    wdir = Path(args.out) / args.study
    res = build_many([(args.family, p, args.arch) for p in valid], wdir / "bundles", workers=args.workers,
                     progress=False)
    shapes = [parse_shape(x) for x in args.shape] or tune.space(args.family).get("shapes", [])
    trials, n = [], 0
    for shape in shapes:
        for p, (_, bdir, err) in zip(valid, res):
            if err:
                print(f"compile failed {p}: {err[:200]}")
                continue
            trials.append({"trial": n, "params": p, "bundle": str(bdir), "shape": shape})
            n += 1
    wdir.mkdir(parents=True, exist_ok=True)
    spec = wdir / tune.SPEC
    if spec.exists() and _json.loads(spec.read_text()).get("trials") != trials:
        # trial numbers now name other points: what tune-run recorded as measured no longer applies
        stale = wdir / "measured.jsonl"
        if stale.exists():
            stale.unlink()
            print(f"{stale} removed: the grid changed")
    spec.write_text(_json.dumps({"family": args.family, "study": args.study, "storage": "",
                                 "arch": args.arch, "trials": trials}, indent=1))
    print(f"{len(valid)} valid points ({len(invalid)} invalid) x {len(shapes)} shapes -> {wdir / tune.SPEC}")
    return EXIT_OK


def cmd_tune_run(args) -> int:
    from . import tune
    tune.run(args.workdir, args.results, args.timeout, args.warmup, args.reps)
    return EXIT_OK


def cmd_tune_tell(args) -> int:
    from . import tune
    tune.tell(args.workdir, args.results, args.storage)
    return EXIT_OK


def cmd_tune(args) -> int:
    from . import tune
    tune.tune_online(args.family, _shape(args), args.trials, args.study, args.bundles, parse_kv(args.param),
                     args.arch, args.storage, args.results, args.out, args.seed, args.timeout)
    return EXIT_OK


def cmd_tune_replay(args) -> int:
    """Replay the sampler on a measured grid: trials needed to get within --within of the grid's best."""
    import json as _json
    from . import tune
    from .report import load
    df = load("tuning", args.results)
    df = df[(df["study"] == args.grid_study) & (df["status"] == "ok")]
    if df.empty:
        raise UsageError(f"no measured rows of study {args.grid_study!r} in {args.results}")
    out = []
    for shape, g in df.groupby("shape"):
        measured = {_json.dumps(_json.loads(p), sort_keys=True): t for p, t in zip(g["params"], g["time_us"])}
        fam = families.get(g["family"].iloc[0])
        first = _json.loads(g["params"].iloc[0])
        fx = {**{k: first[k] for k in fam.shape_params if k in first}, **parse_kv(args.param)}
        r = tune.replay(measured, fam.name, fx, args.budget, args.seeds, args.within, args.arch)
        r.update(shape=shape, grid_best_us=min(measured.values()))
        out.append(r)
        print(f"{shape}: grid {r['grid_valid']} valid points, best {r['grid_best_us']:.2f} us; TPE within "
              f"{100 * args.within:.0f}% after median {r['median_trials']} trials (p90 {r['p90_trials']}) "
              f"= {100 * r['median_trials'] / r['grid_valid']:.0f}% of the grid")
    if args.json:
        Path(args.json).write_text(_json.dumps(out, indent=1))
    return EXIT_OK


def cmd_bench_branch(args) -> int:
    """`mlagen bench-branch`: the fused MLA decode branch against torch and the sum of its parts."""
    from . import decode_branch
    from .bench import measure_ceilings, parse_shape, _print_table
    from .env import git_commit, now_utc
    from .report import append_rows
    shapes = [parse_shape(s) for s in args.shape] or decode_branch.BENCH_SHAPES
    ceil = measure_ceilings()
    print(f"ceilings on {ceil['device']}: copy {ceil['copy_gbps']:.0f} GB/s, bf16 {ceil['bf16_tflops']:.0f} TFLOP/s")
    rows = decode_branch.bench(args.bundles, shapes, args.warmup, args.reps, with_torch=not args.no_torch,
                               table_path=args.table, ceilings=ceil)
    append_rows([dict(table="ceilings", date=now_utc(), commit=git_commit(), **ceil)], "ceilings", args.results)
    path = append_rows(rows, "bench", args.results) if rows else None
    print(f"{len(rows)} rows -> {path}")
    _print_table(rows)
    return EXIT_OK if rows else EXIT_FAIL


def cmd_export(args) -> int:
    from . import tune
    table = tune.export(args.results, args.out)
    n = sum(len(s) for d in table.values() for s in d.values())
    print(f"{n} shape entries for {sorted(table)} -> {args.out}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------
def _bench_options(s, shape_help: str, shape_var: str, warmup: int, reps: int) -> None:
    """The options every benchmark command takes (one place for their names and meaning)."""
    s.add_argument("--bundles", default="build", help="folder holding bundles (default: build)")
    s.add_argument("--shape", action="append", default=[], metavar=shape_var, help=shape_help)
    s.add_argument("--results", default="results", help="results folder (default: results)")
    s.add_argument("--warmup", type=int, default=warmup, help=f"warm-up launches (default {warmup})")
    s.add_argument("--reps", type=int, default=reps, help=f"timed launches (default {reps})")
    s.add_argument("--no-torch", action="store_true", help="skip the torch baseline(s)")
    s.add_argument("--l2-flush", choices=("write", "read", "none"), default=None,
                   help="L2 flush before each timed launch: write a 256 MB buffer (dirty lines the launch must "
                        "write back), read it (clean lines), or none (default: $MLAGEN_L2_FLUSH, else write)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mlagen", description="Generate, compile and benchmark CuTe-DSL kernels.")
    ap.add_argument("--version", action="version", version=f"mlagen {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")

    s = sub.add_parser("families", help="list kernel families and their parameter spaces")
    s.add_argument("--names", action="store_true", help="print only the family names")
    s.set_defaults(func=cmd_families)

    s = sub.add_parser("generate", help="render (and compile) one kernel configuration",
                       description="Validate parameters, render the kernel source and compile it to a bundle.")
    s.add_argument("family")
    s.add_argument("-p", "--param", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="a parameter value (repeatable; see `mlagen families`)")
    s.add_argument("--arch", default="sm_90a", help=f"target architecture: {' | '.join(ARCHES)} (default sm_90a)")
    s.add_argument("--out", default="build", help="output folder (default: build)")
    s.add_argument("--source-only", action="store_true", help="write only the generated .py file (no DSL needed)")
    s.add_argument("--force", action="store_true", help="recompile / overwrite even if an identical result exists")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("build", help="compile the cartesian product of parameter values",
                       description="Compile every combination of --grid values (x every --arch).  Invalid "
                                   "combinations and compile failures are listed, never dropped.")
    s.add_argument("family")
    s.add_argument("-g", "--grid", action="extend", nargs="+", default=[], metavar="KEY=V1,V2",
                   help="values of one parameter, comma separated (repeatable)")
    s.add_argument("-p", "--param", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="a fixed parameter value (repeatable)")
    s.add_argument("--arch", action="append", default=None,
                   help=f"architecture(s), comma separated or repeated: {', '.join(ARCHES)} (default sm_90a)")
    s.add_argument("--out", default="build", help="output folder (default: build)")
    s.add_argument("-j", "--workers", type=int, default=1, help="compile in N worker processes")
    s.add_argument("--dry-run", action="store_true", help="list the combinations without compiling")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("build-suite", help="compile the GPU test / benchmark suites (mlagen.suites) for a GPU host")
    s.add_argument("--only", choices=["test", "bench"], default=None, help="one suite (default: both)")
    s.add_argument("--family", action="append", default=None, help="only this family (repeatable)")
    s.add_argument("--arch", action="append", default=None, help="architecture(s) (default sm_90a)")
    s.add_argument("--out", default="build/gpu", help="output folder (default: build/gpu)")
    s.add_argument("-j", "--workers", type=int, default=2, help="compile in N worker processes (default 2)")
    s.add_argument("--dry-run", action="store_true", help="list the configurations without compiling")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_build_suite)

    s = sub.add_parser("bench", help="benchmark compiled bundles on this host's GPU (mlagen.bench)")
    s.add_argument("family")
    _bench_options(s, "a problem size such as M=4096 (repeatable)", "KEY=VALUE", warmup=10, reps=50)
    s.add_argument("--arch", default=None, help="only bundles of this architecture")
    s.add_argument("--device", type=int, default=0, help="CUDA device ordinal (default 0)")
    s.add_argument("--compile-torch", action="store_true", help="also time a torch.compile baseline")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("bench-branch", help="benchmark the fused MLA decode branch (mlagen.decode_branch) on this GPU")
    _bench_options(s, "heads, batch, context (+ q_len, page_size, fp8=1, g, sparse=1, topk); repeatable",
                   "H=..,B=..,C=..", warmup=5, reps=20)     # a branch step is 5-6 launches: fewer repetitions
    s.add_argument("--table", default=None, help="tuned dispatch table (mlagen export) for the plan's bundles")
    s.set_defaults(func=cmd_bench_branch)

    s = sub.add_parser("report", help="summarise result tables (and plot one)")
    s.add_argument("--results", default="results", help="results folder (default: results)")
    s.add_argument("--table", default=None, help="only this table (file stem)")
    s.add_argument("--family", default=None, help="only rows of this kernel family")
    s.add_argument("--plot", default=None, metavar="OUT.png", help="write a plot of the table")
    s.add_argument("--x", default="M", help="plot x column (default M)")
    s.add_argument("--y", default=None, help="plot y column (default: GB/s, else time)")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("results-merge", help="merge result files from GPU hosts into the results folder")
    s.add_argument("files", nargs="+", help=".parquet / .csv files (or folders of them)")
    s.add_argument("--results", default="results", help="results folder (default: results)")
    s.set_defaults(func=cmd_results_merge)
    def _tune_common(s, shape_required=True):
        s.add_argument("family")
        if shape_required:
            s.add_argument("--shape", default=None, help="problem size, e.g. B=512,S=1,C=64")
        else:
            s.add_argument("--shape", action="append", default=[], help="problem sizes (default: tuning/<family>.json)")
        s.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                       help="fixed (shape-defining) parameters, e.g. cache_dtype=f8e4m3")
        s.add_argument("--arch", default="sm_90a")

    s = sub.add_parser("tune-ask", help="ask an Optuna study for trials and compile them (CPU host)")
    _tune_common(s)
    s.add_argument("--trials", type=int, default=16)
    s.add_argument("--study", required=True)
    s.add_argument("--storage", default=None, help="SQLAlchemy URL (default sqlite:///results/tuning.db)")
    s.add_argument("--out", default="build/tune")
    s.add_argument("-j", "--workers", type=int, default=1)
    s.add_argument("--seed", type=int, default=None)
    s.set_defaults(func=cmd_tune_ask)

    s = sub.add_parser("tune-grid", help="compile every valid point of the search space (exhaustive baseline)")
    _tune_common(s, shape_required=False)
    s.add_argument("--study", required=True)
    s.add_argument("--out", default="build/tune")
    s.add_argument("-j", "--workers", type=int, default=1)
    s.set_defaults(func=cmd_tune_grid)

    s = sub.add_parser("tune-run", help="measure compiled trials on this GPU (supervised child process)")
    s.add_argument("workdir")
    s.add_argument("--results", default="results")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds before a candidate counts as hung")
    s.add_argument("--warmup", type=int, default=10)
    s.add_argument("--reps", type=int, default=50)
    s.set_defaults(func=cmd_tune_run)

    s = sub.add_parser("tune-tell", help="report measured trials to the study")
    s.add_argument("workdir")
    s.add_argument("--results", default="results")
    s.add_argument("--storage", default=None)
    s.set_defaults(func=cmd_tune_tell)

    s = sub.add_parser("tune", help="ask/measure/tell in one process on a GPU host")
    _tune_common(s)
    s.add_argument("--trials", type=int, default=20)
    s.add_argument("--study", required=True)
    s.add_argument("--storage", default=None)
    s.add_argument("--bundles", default=None, help="precompiled candidates (else compile, needs the DSL)")
    s.add_argument("--results", default="results")
    s.add_argument("--out", default="build/tune")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--timeout", type=float, default=60.0)
    s.set_defaults(func=cmd_tune)

    s = sub.add_parser("tune-replay", help="sampler efficiency on a measured grid (trials to within 3%%)")
    s.add_argument("grid_study")
    s.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--results", default="results")
    s.add_argument("--budget", type=int, default=40)
    s.add_argument("--seeds", type=int, default=20)
    s.add_argument("--within", type=float, default=0.03)
    s.add_argument("--arch", default="sm_90a")
    s.add_argument("--json", default=None)
    s.set_defaults(func=cmd_tune_replay)

    s = sub.add_parser("export", help="best measured kernel per shape -> dispatch table JSON")
    s.add_argument("--results", default="results")
    s.add_argument("--out", default="dispatch.json")
    s.set_defaults(func=cmd_export)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help(sys.stderr)
        return EXIT_USAGE
    if getattr(args, "l2_flush", None):
        os.environ["MLAGEN_L2_FLUSH"] = args.l2_flush     # every Timer of this process (mlagen.bench.flush_mode)
    try:
        return int(args.func(args) or 0)
    except ParamError as e:
        _err(str(e))
        return EXIT_USAGE
    except UsageError as e:
        _err(str(e))
        return EXIT_USAGE
    except (FileNotFoundError, KeyError, ValueError) as e:
        if args.cmd in ("report", "results-merge") or (
                isinstance(e, FileNotFoundError) and args.cmd in ("tune-run", "tune-tell", "tune-replay", "export")):
            _err(str(e).strip("'\""))
            return EXIT_FAIL
        raise
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

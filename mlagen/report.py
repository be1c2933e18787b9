"""Result tables: append, load, merge, summarise and plot benchmark rows.

A *table* is a name such as ``qk_rmsnorm`` stored twice under the results folder:

* ``results/<name>.parquet`` -- the source of truth (pyarrow), read-concat-written on every append;
* ``results/<name>.csv``     -- the same rows as text, rewritten with it, so that ``git diff`` shows changes.

Columns are the union of all rows ever appended (a missing value is empty).  Nested values (dicts such
as ``params``, lists, tuples) are stored as JSON strings with sorted keys; :func:`decode_json` turns
such a column back into Python objects or into flat columns.

pandas, pyarrow and matplotlib are imported inside the functions, so ``import mlagen.report`` is cheap.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

RESULTS_DIR = "results"

# Columns looked for (in this order) when a summary or plot needs a role filled.
TIME_COLUMNS = ("time_us", "median_us", "us", "time_ms", "median_ms", "ms")
BANDWIDTH_COLUMNS = ("gbps", "GBps", "gb_s", "bandwidth_gbps")
KERNEL_COLUMNS = ("kernel", "kernel_name", "config", "name")
IMPL_COLUMNS = ("impl", "backend", "provider", "variant")
CONTEXT_COLUMNS = ("family", "arch", "device", "gpu", "group")
WINNER_CONTEXT_COLUMNS = ("family", "device", "gpu", "group")   # arch is implied by the device
SHAPE_COLUMNS = ("shape", "dims")                                # JSON {"M": 4096, ...}; the first present
PLAIN_SHAPE_COLUMNS = ("M", "N", "K", "B", "H", "S", "T", "batch", "seq", "tokens")


# --------------------------------------------------------------------------------------------
# Writing and reading
# --------------------------------------------------------------------------------------------
def _to_json_cell(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True, default=str)
    return v


def _frame(rows) -> "pd.DataFrame":
    import pandas as pd
    if isinstance(rows, pd.DataFrame):
        df = rows.copy()
    elif isinstance(rows, dict):
        df = pd.DataFrame([rows])
    else:
        df = pd.DataFrame(list(rows))
    for c in df.columns:
        if df[c].dtype == object and df[c].map(lambda v: isinstance(v, (dict, list, tuple))).any():
            df[c] = df[c].map(_to_json_cell)
    df.columns = [str(c) for c in df.columns]
    return df


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    try:
        return bool(v != v)          # NaN, pd.NA -> True
    except (TypeError, ValueError):
        return False


def _arrow_safe(df: "pd.DataFrame") -> "pd.DataFrame":
    """Make object columns of mixed Python types writable by pyarrow.

    An object column of numbers only becomes numeric; one that mixes kinds (numbers and strings,
    say) or holds other objects becomes strings (JSON for nested values).
    """
    import pandas as pd
    df = df.copy()
    for c in df.columns:
        if df[c].dtype != object:
            continue
        kinds = set()
        for v in df[c]:
            if _is_missing(v):
                continue
            if isinstance(v, bool):
                kinds.add("bool")
            elif isinstance(v, (int, float)):
                kinds.add("num")
            elif isinstance(v, (str, bytes)):
                kinds.add(type(v).__name__)
            else:
                kinds.add("other")
        if len(kinds) <= 1 and kinds <= {"str", "bool", "bytes"}:
            continue
        if kinds == {"num"}:
            df[c] = pd.to_numeric(df[c], errors="coerce")
        else:
            df[c] = df[c].map(lambda v: None if _is_missing(v) else v if isinstance(v, str) else
                              str(_to_json_cell(v)))
    return df


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write(df: "pd.DataFrame", name: str, results_dir: str | os.PathLike) -> Path:
    d = Path(results_dir)
    df = _arrow_safe(df.reset_index(drop=True))
    pq = d / f"{name}.parquet"
    _atomic_write(pq, lambda p: df.to_parquet(p, engine="pyarrow", index=False))
    _atomic_write(d / f"{name}.csv", lambda p: df.to_csv(p, index=False))
    return pq


def _concat(frames: Sequence["pd.DataFrame"]) -> "pd.DataFrame":
    import pandas as pd
    frames = [f for f in frames if f is not None and len(f.columns)]
    if not frames:
        return pd.DataFrame()
    cols: list[str] = []
    for f in frames:
        cols += [c for c in f.columns if c not in cols]
    # Align to the union first, as object columns, so that concat never guesses across empty frames.
    frames = [f.reindex(columns=cols) for f in frames]
    frames = [f.astype({c: object for c in f.columns if f[c].isna().all()}) for f in frames]
    return pd.concat(frames, ignore_index=True, sort=False)


def _check_name(name: str) -> str:
    name = str(name)
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"bad table name {name!r}: use a plain file stem such as 'qk_rmsnorm'")
    return name


def append_rows(rows, name: str, results_dir: str | os.PathLike = RESULTS_DIR) -> Path:
    """Append ``rows`` (list of dicts or a DataFrame) to table ``name``; return the parquet path.

    Writes ``<results_dir>/<name>.parquet`` and ``<results_dir>/<name>.csv``; creates the folder.
    """
    name = _check_name(name)
    new = _frame(rows)
    old = _load_or_none(name, results_dir)
    return _write(_concat([old, new]), name, results_dir)


def _read_file(path: Path) -> "pd.DataFrame":
    import pandas as pd
    if path.suffix == ".parquet":
        return pd.read_parquet(path, engine="pyarrow")
    if path.suffix == ".csv":
        if path.stat().st_size == 0:
            return pd.DataFrame()
        return pd.read_csv(path)
    raise ValueError(f"{path}: not a .parquet or .csv file")


def _load_or_none(name: str, results_dir) -> "pd.DataFrame | None":
    d = Path(results_dir)
    for suffix in (".parquet", ".csv"):
        p = d / f"{name}{suffix}"
        if p.exists():
            return _read_file(p)
    return None


def load(name: str, results_dir: str | os.PathLike = RESULTS_DIR) -> "pd.DataFrame":
    """The rows of table ``name`` (parquet, else the CSV)."""
    df = _load_or_none(_check_name(name), results_dir)
    if df is None:
        have = tables(results_dir)
        raise FileNotFoundError(f"no table {name!r} in {results_dir}/ (have: {have or 'none'})")
    return df


def tables(results_dir: str | os.PathLike = RESULTS_DIR) -> list[str]:
    """Names of the tables stored in ``results_dir``."""
    d = Path(results_dir)
    if not d.is_dir():
        return []
    return sorted({p.stem for p in d.iterdir() if p.suffix in (".parquet", ".csv") and not p.name.startswith(".")})


def decode_json(df: "pd.DataFrame", column: str = "params", expand: bool = False) -> "pd.DataFrame":
    """Parse a JSON-string column; with ``expand`` add one column ``<column>.<key>`` per dict key."""
    df = df.copy()
    vals = df[column].map(lambda v: json.loads(v) if isinstance(v, str) and v[:1] in "{[" else v)
    if not expand:
        df[column] = vals
        return df
    keys: list[str] = []
    for v in vals:
        if isinstance(v, dict):
            keys += [k for k in v if k not in keys]
    import pandas as pd
    for k in keys:
        cells = [v.get(k) if isinstance(v, dict) else None for v in vals]
        present = [v for v in cells if not _is_missing(v)]
        if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
            col = pd.array([None if _is_missing(v) else v for v in cells], dtype="Int64")
        else:
            col = pd.Series(cells, index=df.index, dtype=object)
        df[f"{column}.{k}"] = col
    return df


# --------------------------------------------------------------------------------------------
# Merging files that came back from GPU hosts
# --------------------------------------------------------------------------------------------
def _norm_cell(v: Any) -> str:
    """A representation of a cell that is equal for equal values read from CSV or parquet."""
    if _is_missing(v):
        return ""
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return "True" if v else "False"
    if isinstance(v, str):
        s = v.strip()
        if s in ("True", "False"):
            return s
        try:
            f = float(s)
        except ValueError:
            return v
        v = f
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            v = v.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(v, (int, float)):
        f = float(v)
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        if f.is_integer() and abs(f) < 2 ** 63:
            return str(int(f))
        return repr(f)
    return str(v)


def _dedup(df: "pd.DataFrame") -> "pd.DataFrame":
    if df.empty:
        return df
    seen: set = set()
    keep = []
    for k in _row_keys(df, df.columns):
        keep.append(k not in seen)
        seen.add(k)
    return df.loc[keep].reset_index(drop=True)


def _table_of(path: Path) -> str:
    name = path.name
    for suffix in (".parquet", ".csv"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise ValueError(f"{path}: not a .parquet or .csv file")


def _expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            pqs = sorted(p.glob("*.parquet"))
            stems = {q.stem for q in pqs}
            out += pqs + [c for c in sorted(p.glob("*.csv")) if c.stem not in stems]
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file")
    return out


def merge_files(paths: Iterable[str | os.PathLike], results_dir: str | os.PathLike = RESULTS_DIR) -> dict[str, int]:
    """Merge result files (from GPU hosts) into ``results_dir``; return ``{table: rows added}``.

    A file with a ``table`` column is split by that column; otherwise the file ``<name>.parquet`` /
    ``<name>.csv`` goes to table ``name``.  A folder stands for the result files in it.  Rows identical
    to ones already present (or to each other) are added once; the ``table`` column and empty cells
    do not count in that comparison, and CSV / parquet spellings of one value (``4096`` / ``4096.0``)
    compare equal.
    """
    incoming: dict[str, list] = {}
    for path in _expand_paths(paths):
        df = _frame(_read_file(path))
        if "table" in df.columns:
            for tname, part in df.groupby(df["table"].astype(str), sort=True):
                incoming.setdefault(_check_name(tname), []).append(part)
        else:
            incoming.setdefault(_check_name(_table_of(path)), []).append(df)
    added: dict[str, int] = {}
    for tname, frames in incoming.items():
        old = _load_or_none(tname, results_dir)
        new = _dedup(_concat(frames))
        if old is not None and len(old):
            cols = list(dict.fromkeys([*old.columns, *new.columns]))
            old_keys = set(_row_keys(old, cols))
            new = new[[k not in old_keys for k in _row_keys(new, cols)]]
        n_new = len(new)
        if n_new or old is None:
            _write(_concat([old, new]), tname, results_dir)
        added[tname] = n_new
    return added


def _row_keys(df: "pd.DataFrame", cols: Sequence[str]) -> list[tuple]:
    d = df.reindex(columns=[c for c in cols if c != "table"])
    return [tuple(_norm_cell(v) for v in r) for r in d.itertuples(index=False, name=None)]


# --------------------------------------------------------------------------------------------
# Summaries and plots
# --------------------------------------------------------------------------------------------
def _first(df, names: Iterable[str]) -> str | None:
    for n in names:
        if n in df.columns:
            return n
    return None


def time_column(df) -> str | None:
    c = _first(df, TIME_COLUMNS)
    if c is None:
        c = next((x for x in df.columns if str(x).endswith("_us")), None)
    return c


def shape_columns(df) -> list[str]:
    """The columns that name a problem size: ``shape`` (else ``dims``) or plain ones such as ``M``."""
    j = _first(df, SHAPE_COLUMNS)
    return [j] if j else [c for c in PLAIN_SHAPE_COLUMNS if c in df.columns]


def _sort_key(col):
    """Sort JSON shape strings by their numbers ({"M": 16} before {"M": 256}); other columns as is."""
    def key(v):
        if isinstance(v, str) and v[:1] == "{":
            try:
                d = json.loads(v)
            except ValueError:
                return v
            return ",".join(f"{k}={int(x):020d}" if isinstance(x, (int, float)) and float(x).is_integer()
                            else f"{k}={x}" for k, x in sorted(d.items()))
        return v
    if col.dtype == object or str(col.dtype) in ("str", "string"):
        return col.map(key)
    return col


def _column_values(df, name: str):
    """Column ``name``, or the key ``name`` of a JSON shape column (``shape`` / ``dims``)."""
    if name in df.columns:
        return df[name]
    for c in SHAPE_COLUMNS:
        if c in df.columns:
            vals = df[c].map(lambda v: json.loads(v) if isinstance(v, str) and v[:1] == "{" else v)
            if vals.map(lambda v: isinstance(v, dict) and name in v).any():
                return vals.map(lambda v: v.get(name) if isinstance(v, dict) else None)
    return None


def _fmt_num(v: Any) -> str:
    if _is_missing(v):
        return ""
    if isinstance(v, float) or type(v).__name__.startswith("float"):
        v = float(v)
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def _render(df) -> str:
    if df.empty:
        return "(no rows)"
    cells = df.astype(object).apply(lambda col: col.map(_fmt_num))
    return cells.to_string(index=False)


def summary(df, shape_cols: Sequence[str] | None = None, max_rows: int = 200) -> str:
    """A printable summary: the best time per kernel and shape, and the fastest kernel per shape."""
    import pandas as pd
    if df is None or len(df) == 0:
        return "(no rows)"
    tcol = time_column(df)
    bcol = _first(df, BANDWIDTH_COLUMNS)
    kcol = _first(df, KERNEL_COLUMNS)
    icol = _first(df, IMPL_COLUMNS)
    ctx = [c for c in CONTEXT_COLUMNS if c in df.columns]
    shapes = list(shape_cols) if shape_cols is not None else shape_columns(df)
    lines = [f"{len(df)} rows, {len(df.columns)} columns"]
    if tcol is None and bcol is None:
        if "outcome" in df.columns:
            return "\n".join(lines + [_outcome_summary(df, max_rows)])
        lines.append("no time or bandwidth column; columns: " + ", ".join(map(str, df.columns)))
        lines.append(_render(_clip(df.tail(10))))
        return "\n".join(lines)
    metric = tcol or bcol
    lower_is_better = metric == tcol
    d = df.copy()
    d[metric] = pd.to_numeric(d[metric], errors="coerce")
    d = d[d[metric].notna()]
    if d.empty:
        lines.append(f"no numeric values in '{metric}'")
        return "\n".join(lines)
    who = [c for c in (icol, kcol) if c]
    keys = ctx + shapes
    show = [c for c in [*keys, *who, tcol, bcol, "ceiling_gbps"] if c and c in d.columns]
    show = list(dict.fromkeys(show))

    def best(frame, by):
        if not by:
            idx = [frame[metric].idxmin() if lower_is_better else frame[metric].idxmax()]
        else:
            g = frame.groupby(by, dropna=False, sort=True)[metric]
            idx = (g.idxmin() if lower_is_better else g.idxmax()).dropna().tolist()
        return frame.loc[idx]

    per_kernel = best(d, keys + who)
    order = [c for c in keys if c != "arch"] + [c for c in ("arch",) if c in keys] + who
    per_kernel = per_kernel.sort_values(order, key=_sort_key) if order else per_kernel
    show = [c for c in order if c in show] + [c for c in show if c not in order]
    runs = d.groupby(keys + who, dropna=False).size().max() if keys + who else len(d)
    head = f"best {metric} per {' / '.join(keys + who) or 'table'}"
    if runs > 1:
        head += f" (best of up to {runs} runs)"
    out = per_kernel[show].copy()
    if bcol and "ceiling_gbps" in out.columns:
        ceil = pd.to_numeric(out["ceiling_gbps"], errors="coerce")
        out["%ceiling"] = 100.0 * pd.to_numeric(out[bcol], errors="coerce") / ceil
        out = out.drop(columns=["ceiling_gbps"])
    lines += ["", head + ":", _render(out.head(max_rows))]
    if len(out) > max_rows:
        lines.append(f"... {len(out) - max_rows} more")
    wkeys = [c for c in WINNER_CONTEXT_COLUMNS if c in d.columns] + shapes
    if who and wkeys:
        win = best(d, wkeys).sort_values(wkeys, key=_sort_key)
        keys = wkeys
        wshow = [c for c in [*keys, *who, tcol, bcol] if c]
        wshow = list(dict.fromkeys(wshow))
        lines += ["", f"fastest per {' / '.join(keys)}:", _render(win[wshow].head(max_rows))]
    return "\n".join(lines)


def _clip(df, width: int = 48):
    """Cut long cells (JSON, test ids) for display."""
    def cut(v):
        t = v if isinstance(v, str) else None
        return t if t is None or len(t) <= width else t[: width - 3] + "..."
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object or str(out[c].dtype) in ("str", "string"):
            out[c] = out[c].map(lambda v: cut(v) if isinstance(v, str) else v)
    return out


def _outcome_summary(df, max_rows: int) -> str:
    """Test-result tables (a column ``outcome``): counts per device / commit, and the tests that did not pass."""
    by = [c for c in ("device", "commit") if c in df.columns]
    d = df.copy()
    d["outcome"] = d["outcome"].astype(str)
    counts = (d.groupby(by + ["outcome"], dropna=False).size().unstack("outcome", fill_value=0).reset_index()
              if by else d["outcome"].value_counts().to_frame("n").T.reset_index(drop=True))
    lines = ["outcomes:", _render(counts)]
    bad = d[~d["outcome"].isin(["passed", "skipped", "xfailed"])]
    if len(bad):
        cols = [c for c in ("test", "outcome", "device", "commit", "date") if c in bad.columns]
        lines += ["", f"not passed ({len(bad)}):", bad[cols].head(max_rows).to_string(index=False)]
    else:
        lines.append("all passed")
    return "\n".join(lines)


def _default_series_columns(df) -> list[str]:
    """impl and kernel, plus the context columns (device, arch, group) that vary in ``df``."""
    cols = [c for c in (_first(df, IMPL_COLUMNS), _first(df, KERNEL_COLUMNS)) if c]
    # mlagen kernel names already spell out the shape-defining parameters: the group only matters for the
    # torch baselines, whose "kernel" is the same name for every group
    for c in ("device", "arch") + (() if "kernel" in df.columns and "impl" not in df.columns else ("group",)):
        if c in df.columns and df[c].astype(str).nunique(dropna=False) > 1:
            cols.append(c)
    return cols


def plot(df, out_png: str | os.PathLike, x: str = "M", y: str | None = None,
         by: Sequence[str] | None = None, top: int = 12, title: str | None = None, logx: bool | None = None) -> Path:
    """Plot ``y`` against ``x``, one line per kernel configuration (``by`` columns), to a PNG.

    ``y`` defaults to the bandwidth column (GB/s), else the time column.  For each series the best value
    at each ``x`` is drawn (max for bandwidth, min for times).  When a ``ceiling_gbps`` column exists and
    ``y`` is a bandwidth, a horizontal line marks the measured copy ceiling.  At most ``top`` series are
    drawn (the best ones); the title says how many were left out.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    if y is None:
        y = _first(df, BANDWIDTH_COLUMNS) or time_column(df)
    xs, ys = _column_values(df, x), (_column_values(df, y) if y else None)
    for c, v in ((x, xs), (y, ys)):
        if v is None:
            raise KeyError(f"plot: column {c!r} is not in the table (columns: {list(df.columns)})")
    by = list(by) if by is not None else _default_series_columns(df)
    missing = [c for c in by if c not in df.columns]
    if missing:
        raise KeyError(f"plot: series column(s) {missing} are not in the table")
    d = df.copy()
    d[x] = pd.to_numeric(xs, errors="coerce")
    d[y] = pd.to_numeric(ys, errors="coerce")
    d = d[d[x].notna() & d[y].notna()]
    if d.empty:
        raise ValueError(f"plot: no numeric ({x}, {y}) pairs to draw")
    higher_is_better = not (y == time_column(df) or str(y).endswith(("_us", "_ms")) or "time" in str(y))
    def _short(v) -> str:
        v = str(v)
        if v.startswith("{"):   # a JSON group: keep the values only, e.g. bf16/128
            try:
                return "/".join(str(x) for x in json.loads(v).values())
            except ValueError:
                return v
        return v
    label = (d[by].map(_short).agg(" ".join, axis=1) if by else pd.Series(["all"] * len(d), index=d.index))
    d = d.assign(_series=label)
    agg = "max" if higher_is_better else "min"
    pts = d.groupby(["_series", x], sort=True)[y].agg(agg).reset_index()
    rank = pts.groupby("_series")[y].agg(agg).sort_values(ascending=not higher_is_better)
    keep = list(rank.index[:top])
    dropped = len(rank) - len(keep)

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for s in keep:
        p = pts[pts["_series"] == s].sort_values(x)
        ax.plot(p[x], p[y], marker="o", ms=3, lw=1.2, label=s)
    # the copy ceiling is a bandwidth: drawn on bandwidth plots only (not on a TFLOP/s axis)
    if "ceiling_gbps" in d.columns and higher_is_better and y in BANDWIDTH_COLUMNS:
        ceil = pd.to_numeric(d["ceiling_gbps"], errors="coerce").dropna()
        if len(ceil):
            c = float(ceil.max())
            ax.axhline(c, color="k", ls="--", lw=1, label=f"copy ceiling {c:,.0f} GB/s")
    if logx is None:
        xs = d[x]
        logx = bool((xs > 0).all() and xs.max() / max(xs.min(), 1e-30) >= 16)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(True, which="both", alpha=0.3)
    t = title or ""
    if dropped:
        t = (t + "  " if t else "") + f"(best {len(keep)} of {len(rank)} series)"
    if t:
        ax.set_title(t)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

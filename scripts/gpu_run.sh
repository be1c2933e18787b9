#!/usr/bin/env bash
# Run on a GPU host from the repository root, with build/gpu (from scripts/build_gpu_suite.py) present.
# Usage: scripts/gpu_run.sh [tests|bench|all] [FAMILY ...]
# Writes result tables and logs under results/, or, on the device tool's machine ($OUT set), packs them into
# one archive $OUT/results.tgz (the tool brings back at most 8 files); here: tar xzf it into a folder, then
# `mlagen results-merge FOLDER`.
set -u -o pipefail
what=${1:-all}; shift || true
fams=${*:-"qk_rmsnorm rope_rmsnorm_quant fp8_gemm act_quant_fp8 mla_decode decode_branch"}
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
if [ -n "${OUT:-}" ]; then res=$(mktemp -d); trap 'tar czf "$OUT/results.tgz" -C "$res" .' EXIT; else res=results; fi
export MLAGEN_RESULTS_DIR=$res MLAGEN_REQUIRE_BUNDLES=1
[ -f build/gpu/COMMIT ] && export MLAGEN_COMMIT=$(cat build/gpu/COMMIT)
out=$MLAGEN_RESULTS_DIR; mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python3 - <<'PY'
import importlib
for m in ("torch", "numpy", "pandas", "pyarrow", "ml_dtypes", "cuda.bindings", "optuna", "matplotlib"):
    try:
        mod = importlib.import_module(m); print(f"{m} {getattr(mod, '__version__', '?')}")
    except Exception as e:
        print(f"{m} MISSING ({type(e).__name__})")
PY
rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  files="tests/test_gpu_dispatch.py"; for f in $fams; do files="$files tests/test_gpu_$f.py"; done
  python3 -m pytest -q -m gpu -p no:cacheprovider $files 2>&1 | tee "$out/pytest_gpu.log" | tail -25 || rc=1
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  for f in $fams; do
    if [ "$f" = decode_branch ]; then
      python3 -m mlagen bench-branch --bundles build/gpu/bench --results "$out" ${BRANCH_ARGS:-} 2>&1 | tee "$out/bench_$f.log" | tail -60 || rc=1
      continue
    fi
    python3 -m mlagen bench "$f" --bundles build/gpu/bench --results "$out" ${BENCH_ARGS:---compile-torch} 2>&1 | tee "$out/bench_$f.log" | tail -60 || rc=1
  done
fi
exit $rc

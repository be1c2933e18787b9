#!/usr/bin/env bash
# Run on a GPU host: measure the precompiled tuning grids (mlagen tune-grid) and run one online Optuna study.
# Needs optuna (carry .whl from ../shared/device/wheels.sh).  Rows land in $OUT (or results/).
set -u -o pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || exit 1
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
[ -f build/gpu/COMMIT ] && export MLAGEN_COMMIT=$(cat build/gpu/COMMIT)
out=${OUT:-results}; mkdir -p "$out"
for d in build/gpu/tune/*/; do
  [ -f "$d/trials.json" ] && python3 -m mlagen tune-run "$d" --results "$out" 2>&1 | tail -3
done
python3 -m mlagen tune rope_rmsnorm_quant --shape B=512,S=1,C=64 --trials 20 --study rope_b512_online \
  --bundles build/gpu/tune/rope_h128_bf16_grid --storage "sqlite:///$out/tuning.db" --results "$out" --seed 0 2>&1 | tail -3

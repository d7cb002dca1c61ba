#!/usr/bin/env bash
# The whole GPU benchmark (stages + ablation ladder) in one device call (run from the repo root; the device tool sets $OUT).
# Figures, JSON, CSV and the ladder chart land in $OUT; the short tables are printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench_out}"
mkdir -p "$OUT"
source benchmarks/env.sh
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/step1x_inductor}"  # a rerun on a warm machine reuses it
# A hard stop inside the device tool's own limit: a hung compile still returns what $OUT holds.
timeout --signal=TERM --kill-after=15 "${BENCH_TIMEOUT_S:-470}" \
    python3 benchmarks/device_ladder.py --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/device_ladder.log"
exit "${PIPESTATUS[0]}"

#!/usr/bin/env bash
# The GPU checks (runtime as shipped, quantization, export) in one device call (run from the repo root; the device tool sets $OUT).
# JSON lands in $OUT/device_checks.json (rewritten after every check); the short table is printed last.
#   CPU dry run:  OUT=/tmp/dc bash benchmarks/device_checks.sh --model tiny --device cpu
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_checks_out}"
mkdir -p "$OUT"
source benchmarks/env.sh
# A hard stop inside the device tool's own limit: a hung check still returns what $OUT holds.
timeout --signal=TERM --kill-after=15 "${CHECKS_TIMEOUT_S:-470}" \
    python3 benchmarks/device_checks.py --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/device_checks.log"
exit "${PIPESTATUS[0]}"

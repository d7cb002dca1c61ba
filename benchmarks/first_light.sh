#!/usr/bin/env bash
# First light on a GPU: everything one 480 s device window can tell, most important first (benchmarks/first_light.py).
# $OUT/first_light.json is rewritten after every step (a timeout keeps what was measured); a markdown table is printed last.
#   device:       run(command="bash benchmarks/first_light.sh", carry=[".whl"], timeout_s=540)
#   CPU dry run:  OUT=/tmp/fl bash benchmarks/first_light.sh --model tiny --device cpu
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/first_light_out}"
mkdir -p "$OUT"
source benchmarks/env.sh
# A hard stop inside the device tool's limit: a hung step still returns what $OUT holds.
timeout --signal=TERM --kill-after=15 "${FIRST_LIGHT_TIMEOUT_S:-500}" \
    python3 benchmarks/first_light.py --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/first_light.log"
exit "${PIPESTATUS[0]}"

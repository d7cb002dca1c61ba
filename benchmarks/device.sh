#!/usr/bin/env bash
# One GPU script in one device call, run from the repo root (the device tool sets $OUT):
#   bash benchmarks/device.sh NAME [flags]     NAME = first_light | device_checks | device_ladder | device_parallel
# runs benchmarks/NAME.py --out-dir "$OUT" [flags] with the checkout and carried wheels on PYTHONPATH (env.sh),
# tees its output to $OUT/NAME.log and stops it hard inside the device tool's own limit, so a hung step still
# returns what $OUT holds. DEVICE_TIMEOUT_S overrides the script's limit; device_parallel runs under torchrun,
# one process per visible GPU (NPROC=N to choose; 1 on a machine without GPUs). With --device cpu, or on a machine
# without GPUs, torch gets one CPU thread (OMP_NUM_THREADS=1) unless the caller exported OMP_NUM_THREADS: the tiny
# model's operators are too small to share among threads; on the GPU machine torch keeps its default.
#   CPU dry run:  OUT=/tmp/fl bash benchmarks/device.sh first_light --model tiny --device cpu
set -uo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash benchmarks/device.sh NAME [flags]; NAME is one of: first_light device_checks device_ladder device_parallel"
name="${1:?$usage}"
shift
case "$name" in  # each script's hard stop, inside the device call's timeout_s that benchmarks/README.md gives
    first_light) limit=400 ;;
    device_checks|device_ladder) limit=470 ;;
    device_parallel) limit=540 ;;
    *) echo "unknown script '$name'; $usage" >&2; exit 2 ;;
esac
OUT="${OUT:-$PWD/${name}_out}"
export OUT
mkdir -p "$OUT"
source benchmarks/env.sh
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/step1x_inductor}"  # a rerun on a warm machine reuses it
gpus=$(nvidia-smi -L 2>/dev/null | grep -c GPU)
on_cpu=$(( gpus == 0 ))
prev=""
for arg in "$@"; do  # --device cpu / --device=cpu: a CPU dry run even where GPUs are
    if [ "$arg" = --device=cpu ] || { [ "$prev" = --device ] && [ "$arg" = cpu ]; }; then on_cpu=1; fi
    prev="$arg"
done
if [ "$on_cpu" = 1 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
    export OMP_NUM_THREADS=1
fi
launch=(python3)
if [ "$name" = device_parallel ]; then
    NPROC="${NPROC:-$(( gpus > 0 ? gpus : 1 ))}"
    python3 -c "import torch; print('nccl', torch.cuda.nccl.version() if torch.cuda.is_available() else '-')"
    launch=(python3 -m torch.distributed.run --standalone --nproc-per-node "$NPROC")
fi
timeout --signal=TERM --kill-after=15 "${DEVICE_TIMEOUT_S:-$limit}" \
    "${launch[@]}" "benchmarks/$name.py" --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/$name.log"
exit "${PIPESTATUS[0]}"

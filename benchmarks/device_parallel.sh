#!/usr/bin/env bash
# 1 vs N GPUs for one edit's denoising + TeaCache skips, full-size DiT with random weights (run from the repo root;
# the device tool sets $OUT). Needs torch with NCCL and N GPUs; no diffusers, no TensorRT.
#   GPU:          OUT=<dir> bash benchmarks/device_parallel.sh                 (NPROC defaults to every visible GPU)
#   CPU dry run:  NPROC=2 OUT=/tmp/dp bash benchmarks/device_parallel.sh --model tiny --device cpu --size 64 --steps 4
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_parallel_out}"
mkdir -p "$OUT"
export OUT
source benchmarks/env.sh  # the checkout and any carried wheel (einops) on PYTHONPATH; GPU and versions printed
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c GPU)
NPROC="${NPROC:-$(( GPUS > 0 ? GPUS : 1 ))}"
python3 -c "import torch; print('nccl', torch.cuda.nccl.version() if torch.cuda.is_available() else '-')"
# A hard stop inside the device tool's own limit: a hung run still returns what $OUT holds.
timeout --signal=TERM --kill-after=15 "${BENCH_TIMEOUT_S:-540}" \
    python3 -m torch.distributed.run --standalone --nproc-per-node "$NPROC" benchmarks/device_parallel.py \
    --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/device_parallel.log"
exit "${PIPESTATUS[0]}"

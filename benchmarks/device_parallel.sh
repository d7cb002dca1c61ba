#!/usr/bin/env bash
# The old name of `bash benchmarks/device.sh device_parallel [flags]` (benchmarks/README.md).
exec bash "$(dirname "$0")/device.sh" device_parallel "$@"

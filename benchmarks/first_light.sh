#!/usr/bin/env bash
# The old name of `bash benchmarks/device.sh first_light [flags]` (benchmarks/README.md).
exec bash "$(dirname "$0")/device.sh" first_light "$@"

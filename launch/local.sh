#!/usr/bin/env bash
# One machine (CPU or the GPUs/TPU cores it has): set up once, then run any preset.
#   launch/local.sh configs/default.py:demo runs/demo [--config.x=y ...]
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?config, e.g. configs/default.py:demo}; workdir=${2:?workdir}; shift 2
[ -x .venv/bin/reft-jax ] || { python3 -m venv .venv && .venv/bin/pip install -q -e .; }
exec .venv/bin/reft-jax --config="$config" --workdir="$workdir" "$@"

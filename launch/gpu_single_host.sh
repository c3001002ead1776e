#!/usr/bin/env bash
# A single GPU host (1-8 GPUs): CUDA JAX, FSDP over all local GPUs, bf16 compute.
#   launch/gpu_single_host.sh configs/default.py:llama2_7b runs/llama --config.model.hf_path=/ckpt/Llama-2-7b-chat-hf
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?config}; workdir=${2:?workdir}; shift 2
[ -x .venv/bin/reft-jax ] || { python3 -m venv .venv && .venv/bin/pip install -q -e '.[cuda]'; }
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec .venv/bin/reft-jax --config="$config" --workdir="$workdir" --config.mesh.fsdp=-1 \
  --config.model.dtype=bfloat16 "$@"

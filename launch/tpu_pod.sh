#!/usr/bin/env bash
# A TPU VM or pod slice: create (or reuse) it, copy this repository to every worker, install, and run
# the same command on all workers; jax.distributed.initialize() joins them (--distributed).
#   TPU_NAME=reft ZONE=us-central2-b ACCELERATOR=v4-8 launch/tpu_pod.sh configs/default.py:llama2_7b \
#       gs://bucket/runs/llama --config.model.hf_path=/mnt/ckpt/Llama-2-7b-chat-hf
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?config}; workdir=${2:?workdir (a gs:// path or a disk every worker sees)}; shift 2
: "${TPU_NAME:?}" "${ZONE:?}"
ACCELERATOR=${ACCELERATOR:-v4-8}; VERSION=${VERSION:-tpu-ubuntu2204-base}
if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" \
    --version "$VERSION"
fi
tar czf /tmp/reft_jax_src.tgz --exclude=.venv --exclude=runs --exclude=.git .
gcloud compute tpus tpu-vm scp /tmp/reft_jax_src.tgz "$TPU_NAME":~/ --zone "$ZONE" --worker=all
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e; mkdir -p ~/reft-jax && tar xzf ~/reft_jax_src.tgz -C ~/reft-jax && cd ~/reft-jax
  [ -x .venv/bin/reft-jax ] || { python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'; }
  .venv/bin/reft-jax --distributed --config=$config --workdir=$workdir --config.mesh.fsdp=-1 $args"

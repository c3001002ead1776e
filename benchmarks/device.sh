#!/usr/bin/env bash
# The GPU benchmark in one command (benchmarks/device.py has the details): SFT and ReFT student steps of
# a 1B-class Llama (LoRA and full; bf16, cuDNN attention), the filter pass and KV-cache generation, with
# tokens/s, MFU against a bf16 matmul peak measured in the same run, peak device memory and compile times;
# one JSON, rewritten after every section. <= 8 minutes on one H200 (the driver's budget is 440 s, and a
# hard stop at 470 s below keeps whatever sections finished).
#
#   bash benchmarks/device.sh --out "$OUT/device.json"   # on the GPU machine (no internet)
#   bash benchmarks/device.sh --smoke                    # tiny shapes, end to end, on any machine
#
# The GPU image has jax, flax, optax, orbax, transformers and torch but not all of the project's own
# dependencies. Those it lacks come as wheels in benchmarks/wheels/ (fetch them on a machine with internet
# with `bash benchmarks/fetch_device_wheels.sh`; carry the folder along, it is not committed):
#   required: ml-collections (reft_jax imports it)
#   optional: tensorboardX, datasets (+ dill, multiprocess), gguf (the CLI's logging, HF datasets, GGUF)
# Each is installed only when python cannot import it already, without its dependencies (the image has
# them) and into a folder of its own (DEVICE_SITE), so the image's packages are never replaced.
# Other flags go to device.py; PYTHON picks the interpreter (default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WHEELS="${DEVICE_WHEELS:-$ROOT/benchmarks/wheels}"
SITE="${DEVICE_SITE:-/tmp/reft_jax_device_site}"

# pip name, import name, required?
PACKAGES=(
  "ml-collections ml_collections required"
  "tensorboardX tensorboardX optional"
  "dill dill optional"
  "multiprocess multiprocess optional"
  "datasets datasets optional"
  "gguf gguf optional"
)

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # reft_jax imports from the checkout
missing_required=()
to_install=()
shopt -s nocaseglob  # wheel names: tensorboardX-… or tensorboardx-…
for entry in "${PACKAGES[@]}"; do
  read -r pip_name module need <<<"$entry"
  if "$PY" -c "import $module" >/dev/null 2>&1; then
    continue
  fi
  if compgen -G "$WHEELS/${pip_name//-/[-_]}-*.whl" >/dev/null; then
    to_install+=("$pip_name")
  elif [[ "$need" == optional ]]; then
    echo "device.sh: optional $pip_name is neither installed nor in benchmarks/wheels (the benchmark does not need it)"
  fi
done
for pip_name in "${to_install[@]}"; do  # one at a time: an optional one that fails stops nothing
  echo "device.sh: installing $pip_name from benchmarks/wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --root-user-action=ignore --upgrade \
    --find-links "$WHEELS" --target "$SITE" "$pip_name" || echo "device.sh: $pip_name did not install"
done
if ((${#to_install[@]})); then
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
for entry in "${PACKAGES[@]}"; do
  read -r pip_name module need <<<"$entry"
  if [[ "$need" == required ]] && ! "$PY" -c "import $module" 2>&1 | tail -1 >&2; then
    missing_required+=("$pip_name")
  fi
done
if ((${#missing_required[@]})); then
  echo "device.sh: cannot import ${missing_required[*]} (error above). Without its wheel in benchmarks/wheels," \
    "run 'bash benchmarks/fetch_device_wheels.sh' on a machine with internet and bring the folder along" >&2
  exit 2
fi

SMOKE=0
for a in "$@"; do [[ "$a" == --smoke ]] && SMOKE=1; done
if ((SMOKE)); then
  exec "$PY" benchmarks/device.py "$@"
fi
# A device with nothing else on it: let the workers' allocator take 90% (the default 75% is tighter
# for the full fine-tuning ReFT step's activations and logits).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
exec timeout -k 10 470 "$PY" benchmarks/device.py "$@"

#!/usr/bin/env bash
# One call on the GPU machine: benchmarks/device.sh on cores 0-5 next to the test suite on the image's
# jax (CPU backend, CI's selection) on cores 6-15, so that a 15-minute device lease checks both at once.
# The image lacks some packages: bring them as wheels (`bash benchmarks/fetch_device_wheels.sh --tests`
# on a machine with internet, then carry benchmarks/wheels). Logs and the benchmark's JSON go to $OUT.
#
#   OUT=/tmp/out bash benchmarks/device_tests.sh      # ~5 min on one H200 with 16 cores (session 23)
#
# The benchmark's compile times read high here: its workers share the machine with ten test workers.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${OUT:?set OUT to the folder for the logs and JSON}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
{
  date
  nproc
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|jax-cuda|flax|optax|orbax|transformers|torch |numpy|peft|tokenizers)"
} >"$OUT/env.txt" 2>&1
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/reft_jax_test_site \
  benchmarks/wheels/*.whl >"$OUT/install.log" 2>&1
export PYTHONPATH="/tmp/reft_jax_test_site:$PWD"
(
  taskset -c 0-5 bash benchmarks/device.sh --out "$OUT/device.json" >"$OUT/device.log" 2>&1
  echo "device.sh rc=$?" >>"$OUT/device.log"
) &
bench=$!
JAX_PLATFORMS=cpu CI=true taskset -c 6-15 timeout -k 5 500 "$PY" -m pytest -q -n 10 --dist loadfile tests \
  -p no:cacheprovider --timeout 420 -rfE --durations=20 >"$OUT/tests.log" 2>&1
echo "pytest rc=$?" >>"$OUT/tests.log"
wait $bench
tail -3 "$OUT/tests.log"
tail -14 "$OUT/device.log"
cat "$OUT/env.txt"

"""Test setup: 8 simulated CPU devices and no network, fixed before jax/transformers are imported.

Compiled executables go to one compilation cache per test session (JAX's persistent cache, in a fresh temporary
directory, shared with the subprocesses the tests start and with pytest-xdist's workers, which inherit it): the
many tests that run the same tiny model's steps compile each program once instead of once per test. It starts
empty, so CI's clean clone compiles everything at least once; set JAX_COMPILATION_CACHE_DIR to keep one across sessions.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="reft-jax-tests-xla-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

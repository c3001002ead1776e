"""Shared benchmark plumbing: environment report, timing, peak matmul rate, memory, markdown tables.

Timings belong in benchmarks/, never in tests.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable


def str2bool(s: str) -> bool:
  if s.lower() in ("1", "true", "yes", "on"):
    return True
  if s.lower() in ("0", "false", "no", "off"):
    return False
  raise ValueError(f"{s!r} is not a boolean")


def num_cores() -> int:
  return len(os.sched_getaffinity(0))


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def versions(*modules: str) -> dict[str, str]:
  from importlib.metadata import PackageNotFoundError, version

  out = {}
  for m in modules:
    try:
      out[m] = version(m)
    except PackageNotFoundError:
      out[m] = "not installed"
  return out


@dataclasses.dataclass
class Runner:
  """One benchmarked step: run() launches it, block(result) waits for it. compile_s: measured ahead of
  time, or None when the first call compiles (then compile_s = first call - median call)."""

  run: Callable[[], object]
  block: Callable[[object], object]
  compile_s: float | None = None
  info: dict = dataclasses.field(default_factory=dict)
  after_warmup: Callable[[], dict] | None = None  # extra figures read once warm (e.g. device memory)


def measure(runners: dict[str, Runner], warmup: int, steps: int) -> dict[str, dict]:
  """Warms each runner up alone (its peak RSS growth is measured there), then times `steps` rounds in
  which every runner takes one step in turn, so that load from other processes on a shared machine
  hits all of them alike. Returns per runner: step_s (median), times, compile_s, rss_delta_mb."""
  out = {}
  for name, r in runners.items():
    with PeakRss() as rss:
      first = _time(lambda r=r: r.block(r.run()))
      for _ in range(warmup - 1):
        r.block(r.run())
    out[name] = {"first_s": first, "rss_delta_mb": rss.delta_mb, "times": [], **r.info}
    if r.after_warmup is not None:
      out[name].update(r.after_warmup())
  for _ in range(steps):
    for name, r in runners.items():
      time.sleep(0.05)  # lets the previous runtime's spinning worker threads go idle
      out[name]["times"].append(_time(lambda r=r: r.block(r.run())))
  for name, r in runners.items():
    o = out[name]
    o["step_s"] = statistics.median(o["times"])
    o["compile_s"] = r.compile_s if r.compile_s is not None else max(o["first_s"] - o["step_s"], 0.0)
  return out


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_free_memory():
  """Hands freed heap pages back to the OS (glibc malloc_trim), so an RSS delta measures the next step
  rather than what earlier benchmarks left cached in the allocator."""
  import gc

  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


class PeakRss:
  """Peak resident-set growth of this process while the block runs (sampled every `every` s by a
  thread; the compute releases the GIL). On CPU this is what a step really needs beyond its inputs."""

  def __init__(self, every: float = 0.001):
    self.every, self.peak, self.start = every, 0, 0
    self._stop = threading.Event()

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _rss_bytes())
      time.sleep(self.every)

  def __enter__(self):
    release_free_memory()
    self.start = self.peak = _rss_bytes()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _rss_bytes())

  @property
  def delta_mb(self) -> float:
    return (self.peak - self.start) / 2**20


def jax_matmul_flops(n: int = 2048, reps: int = 5) -> float:
  """Best float32 FLOP/s of one jitted n x n x n matmul on the default device."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  best = min(_time(lambda: f(a, b).block_until_ready()) for _ in range(reps))
  return 2 * n**3 / best


def torch_matmul_flops(n: int = 2048, reps: int = 5, device: str = "cpu") -> float:
  import torch

  a = torch.randn(n, n, device=device)
  b = torch.randn(n, n, device=device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  a @ b
  sync()
  best = min(_time(lambda: (a @ b, sync())) for _ in range(reps))
  return 2 * n**3 / best


def _time(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
  """columns: (key, header, format spec); a missing or None value prints as '—'."""

  def cell(r, key, fmt):
    v = r.get(key)
    return "—" if v is None else (format(v, fmt) if fmt else str(v))

  lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
  return "\n".join(lines)

"""Shared benchmark plumbing: environment report, timing, peak matmul rate, memory, markdown tables.

Timings belong in benchmarks/, never in tests.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
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
  out = {name: {**_warm_up(r, warmup)[0], "times": []} for name, r in runners.items()}
  for _ in range(steps):
    for name, r in runners.items():
      time.sleep(0.05)  # lets the previous runtime's spinning worker threads go idle
      out[name]["times"].append(_time(lambda r=r: r.block(r.run())))
  return _summarise(out)


def _warm_up(r: Runner, warmup: int) -> tuple[dict, object]:
  """The first (compiling) call and warmup - 1 more, alone, with the peak RSS growth they cause; returns
  (figures, the first call's result)."""
  with PeakRss() as rss:
    t0 = time.perf_counter()
    first_out = r.block(r.run())
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
      r.block(r.run())
  figures = {"first_s": first, "rss_delta_mb": rss.delta_mb, "compile_s": r.compile_s, **r.info}
  if r.after_warmup is not None:
    figures.update(r.after_warmup())
  return figures, first_out


def _summarise(out: dict[str, dict]) -> dict[str, dict]:
  """step_s: the median timed step; compile_s: measured, or the first call's excess over the median."""
  for o in out.values():
    o["step_s"] = statistics.median(o["times"])
    if o.get("step_usage"):  # measure_isolated: the worker's CPU seconds per step (median)
      o["step_cpu_s"] = statistics.median(u["cpu_s"] for u in o["step_usage"])
    o["compile_s"] = o["compile_s"] if o["compile_s"] is not None else max(o["first_s"] - o["step_s"], 0.0)
  return out


# ---------------------------------------------------------------- one process per runner

WORKER_FLAG = "--bench-worker"


def worker_name(argv: list[str] | None = None) -> tuple[str | None, list[str]]:
  """(NAME, the other arguments) when argv (default: this process's) holds `--bench-worker NAME` (a
  worker of measure_isolated), else (None, argv)."""
  argv = sys.argv[1:] if argv is None else argv
  if WORKER_FLAG not in argv:
    return None, argv
  i = argv.index(WORKER_FLAG)
  return argv[i + 1], argv[:i] + argv[i + 2 :]


def measure_isolated(
  script: str, argv: list[str], names: list[str], warmup: int, steps: int, prime: bool = True
) -> dict[str, dict]:
  """measure() with every runner in its own process (`python script --bench-worker NAME *argv`, which
  calls serve): JAX and torch in one process slow each other's next step down (allocator and thread
  pool state: a JAX step right after a torch step took up to 2x its time alone on 2 cores), so each
  keeps its own. Workers start, compile and warm up one at a time, then the timed steps go round-robin,
  one worker computing at a time. Returns what measure() does, plus "output": the first call's result
  where the worker sends it.

  prime: each timed step comes right after an untimed one of the same worker, as in a training loop.
  Why: a step's temporaries are mapped afresh (page faults), and on a virtual machine that hands free
  memory back to its host (virtio-balloon free page reporting), memory left free for a while faults far
  slower. Without priming, the worker whose turn follows one that freed less than it needs paid 5-6 s of
  kernel time per 10 s ReFT step at SmolLM2's shape (session 23), its twins 0.2 s."""
  procs, out = {}, {}
  try:
    for name in names:
      cmd = [sys.executable, script, WORKER_FLAG, name, *argv]
      procs[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
      out[name] = {**_receive(procs[name], name), "times": [], "step_usage": []}
    for _ in range(steps):
      for name, p in procs.items():
        time.sleep(0.05)  # as measure(): the previous worker's threads go idle
        if prime:
          _request(p, name, "prime")
        before = process_cpu_seconds()
        reply = _request(p, name, "step")
        out[name]["times"].append(reply.pop("t"))
        reply["others"] = other_cpu_use(before, process_cpu_seconds(), p.pid)
        out[name]["step_usage"].append(reply)
  finally:
    for p in procs.values():
      try:
        p.stdin.close()  # the worker's loop ends at end of input
      except BrokenPipeError:  # it has died; _request named it
        pass
      p.wait()
  return _summarise(out)


def _request(proc, name: str, command: str) -> dict:
  try:
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
  except BrokenPipeError:
    raise _worker_died(proc, name) from None
  return _receive(proc, name)


def _worker_died(proc, name: str) -> RuntimeError:
  return RuntimeError(f"benchmark worker {name!r} exited (code {proc.wait()}); its error is printed above")


def process_cpu_seconds() -> dict[int, tuple[str, float]]:
  """Every process's (name, user + system CPU seconds so far), from /proc/PID/stat; {} off Linux."""
  tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
  seen = {}
  for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
    if not pid.isdigit():
      continue
    try:
      with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    except OSError:  # the process ended meanwhile
      continue
    name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
    seen[int(pid)] = (name, (int(fields[11]) + int(fields[12])) / tick)  # utime, stime
  return seen


def other_cpu_use(before: dict, after: dict, worker_pid: int, top: int = 3) -> dict:
  """CPU seconds that processes other than the timed worker used during its step: the total and the
  largest users ("pid name": s). On 2 cores a neighbour's background work slows the timed step."""
  used = {f"{pid} {name}": t - before.get(pid, (name, 0.0))[1] for pid, (name, t) in after.items() if pid != worker_pid}
  used = {k: s for k, s in used.items() if s > 0}
  largest = sorted(used.items(), key=lambda kv: -kv[1])[:top]
  return {"cpu_s": round(sum(used.values()), 3), "largest": {k: round(v, 3) for k, v in largest}}


def _receive(proc, name: str) -> dict:
  line = proc.stdout.readline()
  if not line:
    raise _worker_died(proc, name)
  return json.loads(line)


def serve(build: Callable[[], Runner], warmup: int, send_output: bool = False):
  """The worker side of measure_isolated: builds the runner, warms it up (peak RSS growth measured
  there, as in measure), answers each `step` line on stdin with that step's time (and each `prime` line
  with an untimed step's), and ends at end of input. The replies go to the original stdout; anything
  else printed goes to stderr."""
  channel = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  runner = build()
  ready, first_out = _warm_up(runner, warmup)
  ready["memory_after_warmup"] = memory_backing()
  if send_output:
    ready["output"] = first_out
  send = lambda msg: channel.write(json.dumps(msg, default=lambda o: o.tolist()) + "\n")
  send(ready)
  for line in sys.stdin:
    if line.strip() == "prime":  # an untimed step just before the timed one (measure_isolated)
      send({"primed_s": _time(lambda: runner.block(runner.run()))})
      continue
    if line.strip() != "step":
      break
    before = resource.getrusage(resource.RUSAGE_SELF)
    t = _time(lambda: runner.block(runner.run()))
    send({"t": t, **usage_delta(before, resource.getrusage(resource.RUSAGE_SELF))})


def memory_backing() -> dict:
  """This process's resident and transparent-huge-page-backed memory in MB (/proc/self/smaps_rollup)."""
  try:
    with open("/proc/self/smaps_rollup") as f:
      kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f if ":" in line and "kB" in line)}
  except OSError:
    return {}
  return {"rss_mb": kb.get("Rss", 0) / 1024, "anon_huge_mb": kb.get("AnonHugePages", 0) / 1024}


def usage_delta(before, after) -> dict:
  """What a step cost this process besides wall time: CPU seconds (user + system; wall x cores when
  nothing else runs), minor page faults and involuntary context switches (preemption by other load). A
  worker slower than its twin at equal CPU time waited; at more CPU time it computed slower."""
  cpu = lambda u: u.ru_utime + u.ru_stime
  return {
    "cpu_s": cpu(after) - cpu(before),
    "system_s": after.ru_stime - before.ru_stime,  # in the kernel: page faults, zeroing, compaction
    "minor_faults": after.ru_minflt - before.ru_minflt,
    "major_faults": after.ru_majflt - before.ru_majflt,
    "preempted": after.ru_nivcsw - before.ru_nivcsw,
  }


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

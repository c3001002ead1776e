"""benchmarks/common.py: measure_isolated runs every runner in its own worker process, round-robin, and
brings back each worker's figures, step times (with each step's CPU time) and first output; a worker that
dies is named."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import ROOT, load_module


@pytest.fixture(scope="module")
def common():
  return load_module("benchmarks/common.py", "bench_common")


WORKER = """
import os, sys
sys.path.insert(0, {bench!r})
import common

name, argv = common.worker_name(sys.argv[1:])
if name == "broken":
  raise SystemExit("broken worker: cannot build its runner")
calls = []

def run():
  print("noise on stdout that must not reach the protocol")
  calls.append(os.getpid())
  if name == "dies" and len(calls) > 2:  # after its warm-up, at its first step
    os._exit(3)
  with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls_" + name), "a") as f:
    f.write(".")  # every call, primed and timed alike
  sum(i * i for i in range(200_000))  # some CPU time for the usage figures
  return {{"name": name, "argv": argv, "pid": os.getpid(), "call": len(calls)}}

common.serve(lambda: common.Runner(run, lambda x: x, info={{"built_by": name}}), warmup=2, send_output=True)
"""


def _script(tmp_path):
  path = tmp_path / "worker.py"
  path.write_text(textwrap.dedent(WORKER.format(bench=os.path.join(ROOT, "benchmarks"))))
  return str(path)


def test_worker_name_pops_the_flag(common):
  assert common.worker_name(["--a", "1"]) == (None, ["--a", "1"])
  assert common.worker_name(["--a", "1", "--bench-worker", "x|y", "--b"]) == ("x|y", ["--a", "1", "--b"])


def test_measure_isolated_runs_each_runner_in_its_own_process(common, tmp_path):
  out = common.measure_isolated(_script(tmp_path), ["--flag", "v"], ["a", "b"], warmup=2, steps=3)
  assert set(out) == {"a", "b"}
  pids = {name: o["output"]["pid"] for name, o in out.items()}
  assert len(set(pids.values()) | {os.getpid()}) == 3  # two workers, neither is this process
  for name, o in out.items():
    assert o["output"] == {"name": name, "argv": ["--flag", "v"], "pid": pids[name], "call": 1}
    assert o["built_by"] == name  # the runner's info travels with its figures
    assert len(o["times"]) == 3 and all(t >= 0 for t in o["times"])
    assert o["step_s"] == sorted(o["times"])[1]  # the median
    assert o["compile_s"] >= 0 and "rss_delta_mb" in o
    # each timed step's own usage: CPU seconds spent (a busy loop: > 0, and at most wall x this
    # machine's cores), the kernel's share of them, page faults, preemptions, and what other processes
    # used meanwhile; the memory's huge-page backing after warm-up
    assert len(o["step_usage"]) == 3
    for t, u in zip(o["times"], o["step_usage"]):
      assert set(u) == {"cpu_s", "system_s", "minor_faults", "major_faults", "preempted", "others"}
      assert 0 < u["cpu_s"] <= t * os.cpu_count() + 0.02 and 0 <= u["system_s"] <= u["cpu_s"]
      assert u["minor_faults"] >= 0 and u["major_faults"] >= 0 and u["preempted"] >= 0
      assert u["others"]["cpu_s"] >= 0 and str(pids[name]) not in " ".join(u["others"]["largest"])
    assert o["step_cpu_s"] == sorted(u["cpu_s"] for u in o["step_usage"])[1]
    assert o["memory_after_warmup"]["rss_mb"] > 0 and o["memory_after_warmup"]["anon_huge_mb"] >= 0


@pytest.mark.parametrize("prime", [True, False])
def test_each_timed_step_follows_an_untimed_one_when_primed(common, tmp_path, prime):
  common.measure_isolated(_script(tmp_path), [], ["a", "b"], warmup=2, steps=3, prime=prime)
  for name in ("a", "b"):  # warm-up + timed (+ one untimed before each timed)
    assert len((tmp_path / f"calls_{name}").read_text()) == 2 + 3 * (2 if prime else 1)


def test_a_worker_that_dies_is_named(common, tmp_path, capfd):
  with pytest.raises(RuntimeError, match=r"worker 'broken' exited \(code 1\)"):
    common.measure_isolated(_script(tmp_path), [], ["a", "broken"], warmup=1, steps=1)
  assert "cannot build its runner" in capfd.readouterr().err


def test_a_worker_that_dies_during_the_timed_steps_is_named(common, tmp_path):
  with pytest.raises(RuntimeError, match=r"worker 'dies' exited \(code 3\)"):
    common.measure_isolated(_script(tmp_path), [], ["a", "dies"], warmup=2, steps=2)


def test_other_cpu_use_names_a_busy_neighbour(common):
  """A process that computes while a step runs shows up by pid and name with its CPU seconds; the timed
  worker itself is left out."""
  busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 5: pass"])
  try:
    time.sleep(0.3)  # the interpreter has started
    before = common.process_cpu_seconds()
    time.sleep(0.6)
    after = common.process_cpu_seconds()
  finally:
    busy.kill()
    busy.wait()
  assert os.getpid() in after and after[busy.pid][1] > before[busy.pid][1]
  use = common.other_cpu_use(before, after, worker_pid=os.getpid())
  neighbour = [v for k, v in use["largest"].items() if k.startswith(f"{busy.pid} ")]
  assert neighbour and neighbour[0] > 0.2 and use["cpu_s"] >= neighbour[0]
  assert not any(k.startswith(f"{os.getpid()} ") for k in use["largest"])

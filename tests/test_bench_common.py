"""benchmarks/common.py: measure_isolated runs every runner in its own worker process, round-robin, and
brings back each worker's figures, step times (with each step's CPU time) and first output; a worker that
dies is named."""

from __future__ import annotations

import os
import textwrap

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
    # machine's cores), page faults, preemptions; the memory's huge-page backing after warm-up
    assert len(o["step_usage"]) == 3
    for t, u in zip(o["times"], o["step_usage"]):
      assert set(u) == {"cpu_s", "minor_faults", "preempted"}
      assert 0 < u["cpu_s"] <= t * os.cpu_count() + 0.02 and u["minor_faults"] >= 0 and u["preempted"] >= 0
    assert o["step_cpu_s"] == sorted(u["cpu_s"] for u in o["step_usage"])[1]
    assert o["memory_after_warmup"]["rss_mb"] > 0 and o["memory_after_warmup"]["anon_huge_mb"] >= 0


def test_a_worker_that_dies_is_named(common, tmp_path, capfd):
  with pytest.raises(RuntimeError, match=r"worker 'broken' exited \(code 1\)"):
    common.measure_isolated(_script(tmp_path), [], ["a", "broken"], warmup=1, steps=1)
  assert "cannot build its runner" in capfd.readouterr().err

"""benchmarks/device.sh: the GPU benchmark end to end on CPU (--smoke), and its driver's pieces: time
boxes that keep partial records, the cuDNN -> XLA attention fallback, MFU, FLOP counts, wheel installs."""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from helpers import ROOT, load_module

BENCH = os.path.join(ROOT, "benchmarks")


def _device():
  sys.path.insert(0, BENCH)  # device.py imports its neighbours (common, steps) by name
  return load_module("benchmarks/device.py", "device_bench")


def _strict_json(text: str):
  def bad(c):
    raise ValueError(f"non-standard JSON constant {c}")

  return json.loads(text, parse_constant=bad)


def _env(**kw) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a GPU host
  env.update({"JAX_PLATFORMS": "cpu", "PYTHON": sys.executable, **kw})
  return env


@pytest.mark.slow
def test_smoke_run_writes_one_sane_json(tmp_path):
  out = tmp_path / "device.json"
  r = subprocess.run(
    ["bash", os.path.join(BENCH, "device.sh"), "--smoke", "--out", str(out)],
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  d = _strict_json(out.read_text())
  dev = _device()
  assert d["schema"] == dev.SCHEMA and d["smoke"] and d["status"] == "complete"
  assert list(d["sections"]) == list(dev.SECTIONS)
  assert all(s["status"] == "ok" for s in d["sections"].values()), d["sections"]
  peaks = [d["sections"][p]["flops_per_s"] for p in ("peak", "peak_end")]
  assert min(peaks) > 0 and d["peak_flops"] == max(peaks) and d["peak_source"] == "measured"
  assert d["sections"]["peak"]["finite"] and d["sections"]["peak"]["backend"] == "cpu"
  for name in ("sft_full", "sft_lora", "reft_full", "reft_lora", "filter", "gen"):
    s = d["sections"][name]
    assert s["units_per_s"] > 0 and s["flops_per_s"] > 0, name
    assert 0 < s["mfu"] <= 1, (name, s["mfu"])
    assert s["compile_s"] > 0 and s["first_call_s"] > 0 and s["step_s"] > 0, name
    assert 1 <= s["steps_timed"] == len(s["times"]) <= 2, name
    assert "device_peak_gib" in s and s["max_rss_mb"] > 0, name  # device stats are None on CPU
    # cudnn was asked for; off GPU the section runs XLA attention and says so
    assert s["attention"] == "dpa" and "cudnn" in s["attention_note"], name
  for name in ("sft_full", "sft_lora", "reft_full", "reft_lora"):
    s = d["sections"][name]
    assert s["unit"] == "tokens" and math.isfinite(s["loss"]) and s["loss"] > 0, name
    assert s["trace_lower_s"] > 0 and s["xla_compile_s"] > 0, name
    assert math.isclose(s["compile_s"], s["trace_lower_s"] + s["xla_compile_s"]), name
    tokens = (2 if name.startswith("reft") else 1) * s["batch"] * s["seq"]
    assert math.isclose(s["units_per_s"], tokens / s["step_s"]), name
  full, lora = d["sections"]["sft_full"], d["sections"]["sft_lora"]
  assert full["trainable_params"] == full["params"] == d["model"]["params"]
  assert 0 < lora["trainable_params"] == lora["params"] - full["params"]  # the adapters, nothing else
  gen = d["sections"]["gen"]
  assert gen["unit"] == "new tokens" and gen["units_per_step"] == gen["batch"] * gen["new_tokens"]
  assert gen["ms_per_new_token"] > 0
  assert d["sections"]["filter"]["unit"] == "prompts"
  assert "| sft_full | ok | dpa |" in r.stdout  # the closing markdown table


def test_timed_steps_fit_the_time_box():
  dev = _device()
  assert dev.timed_steps(10, 0.5, math.inf) == 10
  assert dev.timed_steps(10, 0.5, 100.0) == 10
  assert dev.timed_steps(10, 2.0, 20.0) == 5  # (20 - 5 - 4) / 2.05
  assert dev.timed_steps(10, 30.0, 20.0) == 1  # always one


def test_cudnn_failure_reruns_with_xla_attention():
  dev = _device()
  calls = []

  def run(att):
    calls.append(att)
    if att == "cudnn":
      return {"status": "error", "error": "cuDNN: unsupported bias", "wall_s": 7.0}
    return {"status": "ok", "attention": att}

  rec = dev.run_with_fallback(run, "sft_full", "cudnn", lambda: 100.0)
  assert calls == ["cudnn", "dpa"]
  assert rec["status"] == "ok" and rec["attention"] == "dpa"
  assert rec["cudnn_error"] == "cuDNN: unsupported bias" and rec["cudnn_attempt_s"] == 7.0
  # no rerun: a time-out, a section without attention, no time left, or another attention that failed
  for name, status, left, att in [
    ("gen", "timeout", 100.0, "cudnn"),
    ("peak", "error", 100.0, "cudnn"),
    ("gen", "error", 1.0, "cudnn"),
    ("gen", "error", 100.0, "dpa"),
  ]:
    calls.clear()
    rec = dev.run_with_fallback(lambda a, s=status: (calls.append(a), {"status": s})[1], name, att, lambda v=left: v)
    assert calls == [att] and rec["status"] == status and "cudnn_error" not in rec


def test_mfu_against_the_larger_measured_peak_or_the_given_one():
  dev = _device()
  out = {
    "args": {"peak_flops": 0.0},
    "model": {},
    "sections": {
      "peak": {"status": "ok", "flops_per_s": 100.0},
      "sft_full": {"status": "ok", "flops_per_s": 30.0, "params": 7},
      "peak_end": {"status": "ok", "flops_per_s": 120.0},
    },
  }
  dev.derive(out)
  assert out["peak_flops"] == 120.0 and out["peak_source"] == "measured"
  assert out["sections"]["sft_full"]["mfu"] == 0.25 and out["model"]["params"] == 7
  out["args"]["peak_flops"] = 60.0
  dev.derive(out)
  assert out["sections"]["sft_full"]["mfu"] == 0.5 and out["peak_source"] == "given"
  none = {
    "args": {"peak_flops": 0.0},
    "model": {},
    "sections": {"peak": {"status": "timeout"}, "gen": {"status": "ok", "flops_per_s": 3.0}},
  }
  dev.derive(none)
  assert none["peak_flops"] is None and "mfu" not in none["sections"]["gen"]


def test_flops_count_frozen_weights_without_weight_gradients():
  dev = _device()
  from reft_jax.train import flops_per_token

  args = dev.parse_args(["--smoke"])
  cfg = dev.model_config(args)
  n = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.hidden_size
  full = dev.train_flops_per_token(cfg, args.seq, "full")
  assert full == flops_per_token(cfg, args.seq)
  assert math.isclose(full - dev.train_flops_per_token(cfg, args.seq, "lora"), 2 * n)
  bt = args.batch * args.seq
  sft, units, _ = dev.section_flops("sft_lora", cfg, args)
  assert units == bt and math.isclose(sft, dev.train_flops_per_token(cfg, args.seq, "lora") * bt)
  reft, units, _ = dev.section_flops("reft_full", cfg, args)
  # the teacher's forward over the alignment batch: a third of a training token (up to the final norm)
  assert units == 2 * bt and math.isclose(reft, full * 2 * bt + full / 3 * bt, rel_tol=1e-4)


def test_smoke_defaults_yield_to_explicit_flags_and_bad_sections_fail():
  dev = _device()
  a = dev.parse_args(["--smoke", "--seq", "48"])
  assert a.layers == 2 and a.dtype == "float32" and a.seq == 48
  assert dev.parse_args([]).layers == 16 and dev.parse_args([]).vocab == 128256
  with pytest.raises(SystemExit):
    dev.parse_args(["--sections", "peak,nope"])


def test_time_box_kills_a_section_and_keeps_its_partial_record(tmp_path):
  dev = _device()
  result = tmp_path / "r.json"
  slow = (
    f"import json, time; json.dump({{'section': 'gen', 'status': 'running', 'compile_s': 1.5}}, "
    f"open({str(result)!r}, 'w')); print('compiled', flush=True); time.sleep(60)"
  )
  t0 = time.perf_counter()
  rec = dev.run_child([sys.executable, "-c", slow], 3.0, str(result))
  assert time.perf_counter() - t0 < 30
  assert rec["status"] == "timeout" and rec["compile_s"] == 1.5 and rec["time_box_s"] == 3.0
  rec = dev.run_child(
    [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 30.0, str(tmp_path / "none.json")
  )
  assert rec["status"] == "error" and rec["error"] == "exit code 3" and rec["log_tail"] == ["boom"]


def _children(pid: int) -> list[int]:
  kids = []
  for d in os.listdir("/proc"):
    try:
      with open(f"/proc/{d}/stat") as f:
        if d.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
          kids.append(int(d))
    except (OSError, ValueError, IndexError):
      pass
  return kids


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not reaped yet
  except OSError:
    return False


def test_stopping_the_driver_stops_its_worker_and_keeps_the_json(tmp_path):
  """An outer timeout (SIGTERM) must not leave a worker, which runs in a session of its own, on the GPU."""
  out = tmp_path / "device.json"
  p = subprocess.Popen(
    [sys.executable, os.path.join(BENCH, "device.py"), "--smoke", "--sections", "sft_full", "--out", str(out)],
    cwd=ROOT,
    env=_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  kids, deadline = [], time.time() + 120
  while time.time() < deadline and not (
    kids and out.exists() and _strict_json(out.read_text()).get("current") == "sft_full"
  ):
    kids = _children(p.pid)
    time.sleep(0.2)
  assert kids, "no worker started"
  p.send_signal(signal.SIGTERM)
  assert p.wait(timeout=60) == 128 + signal.SIGTERM
  d = _strict_json(out.read_text())
  assert d["status"] == "killed" and d["sections"]["sft_full"]["status"] == "killed"
  deadline = time.time() + 20
  while time.time() < deadline and any(_alive(k) for k in kids):
    time.sleep(0.2)
  assert not any(_alive(k) for k in kids)


def test_device_sh_installs_missing_packages_from_the_wheels_folder(tmp_path):
  """A fake interpreter that lacks ml_collections: device.sh installs it from DEVICE_WHEELS (no index, no
  deps, a folder of its own), leaves importable packages alone, and stops when the import still fails."""
  log = tmp_path / "calls.log"
  fake = tmp_path / "python"
  fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {log}
[[ "$*" == *"import ml_collections"* ]] && exit 1
exit 0
""")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  wheels = tmp_path / "wheels"
  wheels.mkdir()
  (wheels / "ml_collections-1.1.0-py3-none-any.whl").write_text("")
  (wheels / "tensorboardx-2.6.5-py3-none-any.whl").write_text("")
  env = _env(PYTHON=str(fake), DEVICE_WHEELS=str(wheels), DEVICE_SITE=str(tmp_path / "site"))
  r = subprocess.run(
    ["bash", os.path.join(BENCH, "device.sh"), "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env
  )
  assert r.returncode == 2, r.stdout + r.stderr
  assert "cannot import ml-collections" in r.stderr and "fetch_device_wheels.sh" in r.stderr
  installs = [line for line in log.read_text().splitlines() if line.startswith("-m pip install")]
  assert len(installs) == 1, installs  # tensorboardX imports already: not installed
  for flag in ("--no-index", "--no-deps", f"--find-links {wheels}", f"--target {tmp_path / 'site'}"):
    assert flag in installs[0]
  assert installs[0].endswith(" ml-collections")
  assert not any("benchmarks/device.py" in line for line in log.read_text().splitlines())

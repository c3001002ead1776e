"""The command line: a real run end to end, SIGTERM + resume, and config errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT

TINY = [
  "--config=configs/default.py:tiny",
  "--config.data.seq_len=32",
  "--config.data.builtin_examples=64",
  "--config.log.progress=False",
]


def _cli(args, workdir, **kw):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "reft_jax", *TINY, f"--workdir={workdir}", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    **kw,
  )


@pytest.mark.slow
def test_cli_trains_and_writes_every_artefact(tmp_path):
  r = _cli(["--config.train.num_steps=6", "--config.checkpoint.every_steps=4"], tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "done: 6 steps" in r.stdout
  config = json.load(open(tmp_path / "config.json"))
  assert config["train"]["num_steps"] == 6 and config["data"]["seq_len"] == 32
  lines = [json.loads(l) for l in open(tmp_path / "sft" / "metrics.jsonl")]
  assert [l["step"] for l in lines] == list(range(6))
  assert all({"loss", "tokens_per_sec", "lr", "grad_norm"} <= set(l) for l in lines)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "sft" / "tensorboard"))
  assert sorted(os.listdir(tmp_path / "sft" / "checkpoints")) == ["4", "6"]
  from reft_jax import load_hf

  model = load_hf(str(tmp_path / "sft" / "model"))  # the exported model loads back
  assert model.cfg.num_layers == 2
  # Rerunning the same command finds the work done.
  r = _cli(["--config.train.num_steps=6"], tmp_path)
  assert r.returncode == 0 and "finished stages were reused" in r.stdout
  # With a persistent compilation cache the compiled step is written to disk for the next run.
  cache = tmp_path / "xla_cache"
  r = _cli(["--config.train.num_steps=2", f"--config.compile_cache={cache}"], tmp_path / "cached")
  assert r.returncode == 0, r.stderr[-3000:]
  assert cache.is_dir() and len(os.listdir(cache)) >= 1

  # The exported directory is a real HF checkpoint: LoRA fine-tune it on a JSONL file, as a user
  # would with a downloaded model.
  data = tmp_path / "user.jsonl"
  data.write_text(
    "".join(
      json.dumps({"prompt": f"Add one and {w}.", "response": "The answer is."}) + "\n"
      for w in ["two", "three", "four", "five"]
    )
  )
  lora_dir = tmp_path / "lora_run"
  r = _cli(
    [
      f"--config.model.hf_path={tmp_path / 'sft' / 'model'}",
      f"--config.data.source={data}",
      "--config.train.mode=lora",
      "--config.train.lora_targets=q,k,v,o,gate,up,down",
      "--config.train.num_steps=3",
      "--config.train.batch_size=2",
    ],
    lora_dir,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  adapter = json.load(open(lora_dir / "sft" / "adapter" / "adapter_config.json"))
  assert adapter["peft_type"] == "LORA" and adapter["r"] == 8
  assert os.path.exists(lora_dir / "sft" / "adapter" / "adapter_model.safetensors")
  assert load_hf(str(lora_dir / "sft" / "model")).options.lora is None  # merged export


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes(tmp_path):
  args = ["--config.train.num_steps=100000", "--config.checkpoint.every_steps=0"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
    [sys.executable, "-m", "reft_jax", *TINY, f"--workdir={tmp_path}", *args],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  metrics = tmp_path / "sft" / "metrics.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "stopped by signal" in out
  saved = [int(s) for s in os.listdir(tmp_path / "sft" / "checkpoints")]
  assert len(saved) == 1 and saved[0] >= 1
  # Resume for two more steps: the metrics continue from the saved step (a shorter schedule changes results,
  # so the rerun says it reuses the checkpoint: tests/test_faults.py).
  r = _cli(
    [f"--config.train.num_steps={saved[0] + 2}", "--config.checkpoint.every_steps=0", "--config.resume_policy=reuse"],
    tmp_path,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  steps = [json.loads(l)["step"] for l in open(metrics)]
  assert steps[-2:] == [saved[0], saved[0] + 1]


@pytest.mark.parametrize(
  "arg,message",
  [
    ("--config.train.bogus=1", "bogus"),
    ("--config.train.lr=-1", "config.train.lr=-1.0: must be positive"),
    ("--config.train.num_steps=abc", "num_steps"),
    ("--config.train.mode=half", "config.train.mode='half'"),
    ("--config.mesh.tensor=3", "mesh data=1 x fsdp=-1"),
    ("--config.data.source=/nonexistent.jsonl", "config.data.source='/nonexistent.jsonl': file not found"),
  ],
)
def test_bad_config_fails_at_once_with_a_clear_message(tmp_path, arg, message):
  r = _cli([arg], tmp_path)
  assert r.returncode != 0
  assert message in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr

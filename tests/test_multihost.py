"""Two processes on localhost (2 CPU devices each, FSDP over the 4 global devices) train together
and match one process with 4 devices; what they save restores in one process, and generation and
refusal features give every process the full result.

Run as a script, this file is the worker of the generation / feature check (one per process).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT

STEPS = 10
ARGS = [
  "--config=configs/default.py:tiny",
  "--config.data.seq_len=32",
  "--config.data.builtin_examples=64",
  "--config.log.progress=False",
  "--config.log.tensorboard=False",
  f"--config.train.num_steps={STEPS}",
  "--config.mesh.fsdp=-1",
  f"--config.checkpoint.every_steps={STEPS // 2}",
]
PROMPTS = ["Add one and two.", "Say hello to the world.", "Name a color."]  # batches of 4: padded


def _env(devices: int) -> dict:
  # conftest's 8 simulated devices must not leak into the children: exactly `devices` each.
  return dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _spawn(cmd: list[str], devices: int, log) -> subprocess.Popen:
  """Starts `cmd` with `devices` CPU devices, output to the file `log` (kept on the process)."""
  with open(log, "w") as f:  # the child holds its own descriptor
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(devices), stdout=f, stderr=subprocess.STDOUT)
  proc.log = log
  return proc


def _pair(cmd: list[str], log_prefix) -> list[subprocess.Popen]:
  """`cmd` as processes 0 and 1 of one job (2 devices each) on a free localhost port."""
  port = _free_port()
  job = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  return [_spawn([*cmd, *job, f"--process_id={i}"], 2, f"{log_prefix}.{i}.log") for i in range(2)]


def _wait(procs, timeout=240) -> None:
  try:
    codes = [p.wait(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  logs = "\n".join(f"--- {p.log}\n" + open(p.log).read()[-3000:] for p in procs)
  assert codes == [0] * len(procs), logs


def _losses(workdir) -> list[float]:
  lines = [json.loads(l) for l in open(workdir / "sft" / "metrics.jsonl")]
  assert [l["step"] for l in lines] == list(range(STEPS))  # one writer: each step once
  return [l["loss"] for l in lines]


def _features_and_texts(model_dir: str, mesh):
  """What the worker computes: refusal features at layer 1 and sampled answers. The mesh splits the
  batch over 2 x 2 devices (data over processes, fsdp within one: cheap collectives on CPU)."""
  from reft_jax import refusal
  from reft_jax.data import sft
  from reft_jax.data.tokenizer import load_tokenizer
  from reft_jax.generate import generate_texts
  from reft_jax.model import load_hf

  model, tok = load_hf(model_dir, mesh=mesh), load_tokenizer(model_dir)
  examples = [sft.Example(p, "") for p in PROMPTS]
  data = refusal.tokenize_prompts(examples, tok, 32, "alpaca")
  feats = refusal.prompt_features(model, data, 1, batch_size=4, mesh=mesh)
  # Sampled, so that rows differ and a misordered gather would show (greedy answers all alike here).
  texts = generate_texts(
    model, tok, [sft.format_prompt(e) for e in examples], max_new_tokens=4, batch_size=4, temperature=1.0, mesh=mesh
  )
  return feats, texts


def _worker(model_dir: str, out: str, job_flags: list[str]) -> None:
  from reft_jax import distributed as dist

  job = dict(a.lstrip("-").split("=", 1) for a in job_flags)  # the flags _pair appends
  process_id = int(job["process_id"])
  dist.initialize(job["coordinator_address"], int(job["num_processes"]), process_id)
  from reft_jax import sharding as shd

  feats, texts = _features_and_texts(model_dir, shd.make_mesh(2, 2, 1))
  np.save(f"{out}.{process_id}.npy", feats)
  with open(f"{out}.{process_id}.json", "w") as f:
    json.dump(texts, f)


def _restore_checkpoint(workdir, mesh):
  """The two-process run's last orbax checkpoint, restored in this one process onto `mesh`, and
  the exported model's parameters."""
  from reft_jax.checkpoint import Checkpointer
  from reft_jax.model import load_hf
  from reft_jax.optim import make_optimizer
  from reft_jax.train import init_train_state, split_model, trainable_subset

  t = json.load(open(workdir / "config.json"))["train"]
  _, params = split_model(load_hf(str(workdir / "sft" / "model"), mesh=mesh))
  tx, _, labels = make_optimizer(
    params,
    lr=t["lr"],
    num_steps=t["num_steps"],
    warmup_steps=t["warmup_steps"],
    schedule=t["schedule"],
    weight_decay=t["weight_decay"],
    grad_clip=t["grad_clip"],
  )
  state, _ = init_train_state(params, tx, mesh)
  ckpt = Checkpointer(str(workdir / "sft" / "checkpoints"))
  try:
    assert ckpt.manager.all_steps() == [STEPS // 2, STEPS]
    subset, meta = ckpt.restore(STEPS, trainable_subset(state, labels))
  finally:
    ckpt.close()
  return subset, meta, params


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  import jax

  from helpers import mesh_of
  from reft_jax.model import load_hf
  from reft_jax.train import split_model

  one, two = tmp_path / "one", tmp_path / "two"
  cli = [sys.executable, "-m", "reft_jax", *ARGS]
  # The reference run overlaps the two-process one: fewer idle cores while they start up.
  procs = [
    _spawn([*cli, f"--workdir={one}"], 4, tmp_path / "one.log"),
    *_pair([*cli, f"--workdir={two}", "--distributed"], tmp_path / "two"),
  ]
  _wait(procs)
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=0, atol=1e-5)
  assert not (two / "error.log").exists() and sorted(os.listdir(two / "sft" / "checkpoints")) == ["10", "5"]

  # Generation and features in two processes on the exported model, every process writing its own
  # copy of the result ...
  out = tmp_path / "worker"
  workers = _pair([sys.executable, __file__, str(two / "sft" / "model"), str(out)], tmp_path / "worker")
  # ... while this process restores the two-process checkpoint onto a one-process mesh.
  mesh = mesh_of(fsdp=4)
  subset, meta, params = _restore_checkpoint(two, mesh)
  assert int(subset["step"]) == STEPS and meta["data_position"] == STEPS
  for a, b in zip(jax.tree.leaves(subset["params"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the export is the checkpointed state
  _, params_one = split_model(load_hf(str(one / "sft" / "model"), mesh=mesh))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_one)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  feats, texts = _features_and_texts(str(two / "sft" / "model"), mesh_of(data=2, fsdp=2))

  _wait(workers)
  for i in range(2):
    np.testing.assert_allclose(np.load(f"{out}.{i}.npy"), feats, atol=1e-5)
    assert json.load(open(f"{out}.{i}.json")) == texts
  assert feats.shape[0] == len(PROMPTS) and len(texts) == len(PROMPTS)


if __name__ == "__main__":
  _worker(sys.argv[1], sys.argv[2], sys.argv[3:])

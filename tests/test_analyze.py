"""Refusal-feature layer sweep: per-layer separation on held-out sets, written and printed."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT
from reft_jax.pipelines.analyze import recall_at_fpr


def test_recall_at_fpr():
  safe = np.linspace(0, 1, 101)
  harm = np.array([0.5, 0.97, 0.995, 1.2])
  assert recall_at_fpr(harm, safe, 0.05) == 0.75  # threshold at the 95th percentile, 0.95
  assert recall_at_fpr(harm, safe, 0.01) == 0.5  # threshold 0.99


@pytest.mark.slow
def test_analyze_command_on_a_small_world_model(tmp_path):
  world = [
    f"--config.world.{k}={v}"
    for k, v in dict(
      n_alignment=20,
      n_probe=32,
      n_harmful_pool=20,
      n_eval_harmful=16,
      n_eval_harmless=16,
      n_task_train=20,
      n_task_test=16,
      n_pretrain=64,
    ).items()
  ]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  run = lambda *args: subprocess.run(
    [sys.executable, "-m", "reft_jax", *args, *world], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  r = run(
    "--config=configs/default.py:world_base",
    f"--workdir={tmp_path / 'base'}",
    "--config.model.arch=tiny",
    "--config.train.num_steps=3",
    "--config.eval.enabled=False",
    "--config.log.progress=False",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  r = run(
    "--config=configs/default.py:world_base",
    "--config.method=analyze",
    f"--workdir={tmp_path / 'an'}",
    f"--config.model.hf_path={tmp_path / 'base' / 'pretrain' / 'model'}",
    "--config.analyze.n_train=16",
    "--config.analyze.n_eval=16",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.load(open(tmp_path / "an" / "refusal_layers.json"))
  assert [row["layer"] for row in out["rows"]] == [1, 2]
  for row in out["rows"]:
    assert 0 <= row["auroc"] <= 1 and 0 <= row["recall@1%fpr"] <= 1 and "task_fpr@5%" in row
  assert out["counts"]["harmful_train"] == 16 and out["counts"]["task_eval"] == 16
  assert "| layer | auroc |" in r.stdout

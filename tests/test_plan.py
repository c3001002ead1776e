"""Memory plans: exact bytes equal a really initialised sharded state, 7B plans are plausible, the
compiled step's arguments are the planned state, and the CLI prints a table or one-line errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx, traverse_util

from helpers import ROOT, load_config_module, mesh_of, tiny_config
from reft_jax.pipelines import plan
from reft_jax import sharding as shd
from reft_jax.model import PRESETS, Transformer
from reft_jax.optim import make_optimizer
from reft_jax.train import init_train_state, split_model
from reft_jax.model import build as model_build


def _device0_bytes(tree) -> int:
  """Bytes that really live on the first device."""
  d0 = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == d0)


def test_tiny_plan_equals_a_real_sharded_state():
  c = tiny_config(**{"train.mode": "lora", "train.lora_targets": "q,v,up", "method": "reft"})
  spec = plan.stage_spec(c, stage="student")
  mesh, rules = mesh_of(fsdp=8), shd.parse_rules("")
  exact = plan.exact_bytes(spec, plan.abstract_mesh((1, 8, 1)), rules)

  _, params = split_model(model_build.build_model(c, mesh, rules))  # as a stage builds its model
  tx, _, _ = make_optimizer(params, lr=1e-3, num_steps=10, mode="lora")
  state, _ = init_train_state(params, tx, mesh)
  # The teacher as load_hf places it: every tensor straight to its logical-axis sharding.
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(spec.model, spec.teacher, rngs=nnx.Rngs(0))))
  teacher = jax.tree.map(
    lambda x, sh: jax.device_put(np.zeros(x.shape, x.dtype), sh),
    nnx.to_pure_dict(abstract),
    shd.state_shardings(abstract, mesh, rules),
  )

  assert exact["params"] == _device0_bytes(state.params) < sum(x.nbytes for x in jax.tree.leaves(params)) / 4
  lora = [v for k, v in traverse_util.flatten_dict(state.params).items() if k[-1] in ("lora_a", "lora_b")]
  assert exact["lora"] == _device0_bytes(lora) > 0
  assert exact["opt"] == _device0_bytes(state.opt_state)
  assert exact["teacher"] == _device0_bytes(teacher) == exact["params"] - exact["lora"]


@pytest.mark.parametrize("preset", ["llama2_7b", "llama3_8b", "qwen2_7b", "gemma2_9b"])
def test_7b_plans_are_plausible(preset):
  c = load_config_module().get_config("llama2_7b" if preset == "llama3_8b" else preset)
  c.model.arch = preset
  n = PRESETS[preset].num_params()
  rows = {}
  for mode in ("lora", "full"):
    spec = plan.stage_spec(c, mode=mode, stage="student")
    for hw in ("v5e-8", "h100"):
      rows[mode, hw] = plan.plan_row(spec, plan.HARDWARE[hw], (1, -1, 1), None, compile=False)
  one, eight = rows["lora", "h100"], rows["lora", "v5e-8"]
  # The frozen teacher is kept in the compute dtype (bf16); one device holds everything.
  assert one["teacher"] == pytest.approx(n * 2, rel=1e-6)
  assert eight["teacher"] == pytest.approx(n * 2 / 8, rel=0.01)  # fsdp=8 splits (norms replicated)
  assert 0 < eight["lora"] < 0.03 * eight["params"]
  assert eight["params"] - eight["lora"] == pytest.approx(2 * eight["teacher"], rel=1e-6)  # f32 student
  assert eight["opt"] <= 2 * eight["lora"] + 64  # Adam moments of LoRA only (+ counts)
  full = rows["full", "v5e-8"]
  assert full["opt"] == pytest.approx(2 * full["params"], rel=1e-3) and full["lora"] == 0
  assert full["total"] > eight["total"] > eight["params"] + eight["teacher"]
  assert rows["full", "h100"]["fits"] == "no"  # 7-9B full fine-tuning + teacher on one 80 GB GPU


def test_compiled_step_arguments_are_the_planned_state():
  c = tiny_config(**{"train.mode": "lora", "method": "reft", "data.seq_len": 16})
  spec = plan.stage_spec(c)
  assert spec.stage == "student" and spec.teacher is not None
  row = plan.plan_row(spec, plan.HARDWARE["v5e-8"], (1, -1, 1), None, compile=True)
  comp = row["compiled"]
  batch = sum(4 * b // 8 * t * 3 for _, b, t in spec.parts)  # tokens, masks: int32 [B/8, T]
  assert comp["argument"] == row["params"] + row["opt"] + row["teacher"] + batch + 4  # + step counter
  assert comp["alias"] == row["params"] + row["opt"] + 4  # the donated state is updated in place
  assert comp["peak"] == comp["argument"] + comp["output"] - comp["alias"] + comp["temp"] > comp["argument"]


def _cli(*args, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "reft_jax", "plan", f"--workdir={tmp_path}", *args]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_plan_prints_a_table(tmp_path):
  r = _cli(
    "--config=configs/default.py:llama2_7b",
    "--config.plan.hardware=v5e-8,h100",
    "--config.plan.compile=False",
    "--config.plan.stage=student",
    tmp_path=tmp_path,
  )
  assert r.returncode == 0, r.stderr[-2000:]
  assert "| llama2_7b | v5e-8 | 1x8x1 | student | lora |" in r.stdout
  assert "| llama2_7b | h100 | 1x1x1 | student | full |" in r.stdout
  saved = json.load(open(tmp_path / "plan.json"))
  assert len(saved["rows"]) == 4 and all(row["compiled"] is None for row in saved["rows"])


@pytest.mark.parametrize(
  "args,message",
  [
    (["--config.plan.hardware=v6-8"], "config.plan.hardware='v6-8': unknown hardware 'v6-8'"),
    (["--config.plan.hardware=v5e-8", "--config.mesh.tensor=3"], "mesh data=1 x fsdp=-1 x tensor=3: 8 devices"),
  ],
)
def test_cli_bad_hardware_or_mesh_is_one_line(tmp_path, args, message):
  r = _cli("--config=configs/default.py:tiny", *args, tmp_path=tmp_path)
  assert r.returncode == 2
  assert message in r.stderr and "Traceback" not in r.stderr
  assert len([line for line in r.stderr.splitlines() if line.startswith("error")]) == 1


def test_parse_hardware():
  assert [h.name for h in plan.parse_hardware("all")] == list(plan.HARDWARE)
  assert [h.devices for h in plan.parse_hardware("v4-8, 8xh100")] == [4, 8]
  with pytest.raises(ValueError, match="unknown hardware 'tpu'"):
    plan.parse_hardware("v5e-8,tpu")


def test_loss_chunk_and_alignment_length_shape_the_plan():
  c = load_config_module().get_config("gemma2_9b")
  c.train.loss_chunk = 0
  base = plan.plan_row(plan.stage_spec(c, stage="student"), plan.HARDWARE["v5e-8"], (1, -1, 1), None, False)
  c.train.loss_chunk, c.reft.align_seq_len = 128, 256
  spec = plan.stage_spec(c, stage="student")
  assert spec.parts == (("user", 16, 512), ("align", 8, 256)) and spec.loss_chunk == 128
  chunked = plan.plan_row(spec, plan.HARDWARE["v5e-8"], (1, -1, 1), None, False)
  assert chunked["act"] < base["act"] / 2  # a 256k vocabulary: the logits dominate
  assert chunked["params"] == base["params"]

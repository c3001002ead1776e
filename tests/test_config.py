"""Config presets and validation; 7B-class presets plan their train state without allocating."""

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import load_config_module, tiny_config
from reft_jax import config as config_lib
from reft_jax import sharding as shd
from reft_jax.model import PRESETS, abstract_model
from reft_jax.optim import make_optimizer
from reft_jax.pipelines.validate import validate as validate_config
from reft_jax.model import build as model_build

PRESET_NAMES = ["tiny", "llama2_7b", "gemma2_9b", "qwen2_7b"]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_validate(name):
  c = load_config_module().get_config(name)
  validate_config(c)
  assert c.preset == name


def test_unknown_preset_is_named():
  with pytest.raises(ValueError, match="unknown preset 'llama9'"):
    load_config_module().get_config("llama9")


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("train.grad_accum", 3, "must divide train.batch_size=8"),
    ("train.schedule", "step", "train.schedule='step'"),
    ("train.mode", "regex", "train.trainable_regex=''"),
    ("model.remat", "some", "remat='some'"),
    ("model.dtype", "int8", "dtype='int8'"),
    ("model.arch", "gpt5", "model.arch='gpt5'"),
    ("model.hf_path", "/no/such/dir", "model.hf_path='/no/such/dir'"),
    ("train.lora_targets", "q,zz", "lora.targets"),
    ("mesh.rules", "embed=pipeline", "mesh axes must be among"),
    ("mesh.data", 0, "mesh.data=0"),
    ("smart.beta", 1.0, "smart.beta=1.0"),
    ("sweep.methods", "smart,smarter", "sweep.methods='smart,smarter'"),
  ],
)
def test_bad_values_name_the_field(field, value, message):
  overrides = {field: value}
  if field == "train.lora_targets":
    overrides["train.mode"] = "lora"
  c = tiny_config(**overrides)
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
    validate_config(c)


@pytest.mark.parametrize("name", ["llama2_7b", "gemma2_9b", "qwen2_7b"])
def test_7b_presets_plan_train_state_without_allocating(name):
  """Parameters + LoRA + optimizer state of the preset as shapes only, sharded over 8 devices."""
  c = load_config_module().get_config(name)
  options = model_build.run_options(c)
  model = abstract_model(PRESETS[c.model.arch], options)
  state = nnx.state(model)
  params = nnx.to_pure_dict(state)
  tx, _, _ = make_optimizer(params, lr=1e-4, num_steps=10, mode="lora")
  opt = jax.eval_shape(tx.init, params)
  mesh = shd.make_mesh(1, -1, 1)
  sh = shd.state_shardings(state, mesh)
  per_device = sum(
    p.dtype.itemsize * int(np.prod(s.shard_shape(p.shape)))
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(sh))
  )
  total = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params))
  assert per_device < total / 6  # fsdp=8 really splits the big matrices
  n_opt = sum(x.size for x in jax.tree.leaves(opt))
  n_lora = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
  assert n_opt <= 2 * n_lora + 8  # moments only for the LoRA adapters
  assert 0 < n_lora < 0.01 * sum(p.size for p in jax.tree.leaves(params))

"""The pure train step, parameter groups, sharding equivalence, checkpoints and exact resume."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from helpers import mesh_of, tiny_config
from reft_jax.checkpoint import Checkpointer
from reft_jax.data import sft
from reft_jax.losses import lm_loss
from reft_jax.optim import make_optimizer
from reft_jax.train import NonFiniteLoss, init_train_state, split_model, trainable_subset
from reft_jax.model import build as model_build
from reft_jax.data import load as data_load
from reft_jax import stages
from reft_jax import sharding as shd


def _setup(c, workdir, mesh):
  examples = data_load.read_examples(c)
  tok = data_load.get_tokenizer(c, str(workdir), examples)
  data = sft.tokenize(examples, tok, c.data.seq_len, c.data.template)
  rules = shd.parse_rules(c.mesh.rules)
  return model_build.build_model(c, mesh, rules, tok), data, rules


def _train(c, workdir, mesh, hooks=()):
  model, data, rules = _setup(c, workdir, mesh)
  return stages.train_stage(c, str(workdir), "sft", model, data, lm_loss, mesh, rules, hooks)[:3]


def _flat(model):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model))).items()}


def test_loss_is_masked_cross_entropy_on_response_tokens(tmp_path):
  c = tiny_config()
  model, data, _ = _setup(c, tmp_path, mesh_of())
  batch = {
    k: jnp.asarray(v[:4])
    for k, v in dict(tokens=data.tokens, loss_mask=data.loss_mask, attention_mask=data.attention_mask).items()
  }
  total, count, _ = lm_loss(model, batch)
  logits = np.asarray(model(batch["tokens"], batch["attention_mask"]), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ref, n = 0.0, 0
  for b in range(4):
    for t in range(c.data.seq_len - 1):
      if data.loss_mask[b, t + 1]:
        ref -= logp[b, t, data.tokens[b, t + 1]]
        n += 1
  assert n == int(count) == int(data.loss_mask[:4, 1:].sum())
  assert np.isclose(float(total), ref, rtol=1e-5)


def test_sharded_training_matches_single_device(tmp_path):
  c = tiny_config(**{"train.num_steps": 5, "train.lr": 3e-3})
  m1, h1, _ = _train(c, tmp_path / "one", mesh_of())
  m8, h8, _ = _train(c, tmp_path / "eight", mesh_of(data=2, fsdp=2, tensor=2))
  np.testing.assert_allclose([h["loss"] for h in h1], [h["loss"] for h in h8], atol=1e-5)
  p1, p8 = _flat(m1), _flat(m8)
  for k in p1:
    np.testing.assert_allclose(p1[k], p8[k], atol=1e-5, err_msg=k)
  # Large parameters really are split over devices; tiny norm vectors are not.
  gate = m8.blocks.mlp.gate.kernel.value
  assert gate.sharding.shard_shape(gate.shape) == (2, 32, 64)  # [L, D/fsdp, F/tensor]
  embed = m8.embed.value
  assert np.prod(embed.sharding.shard_shape(embed.shape)) == embed.size // 4


def test_grad_accumulation_equals_one_big_batch(tmp_path):
  m1, h1, _ = _train(tiny_config(**{"train.num_steps": 2}), tmp_path / "a", mesh_of())
  m2, h2, _ = _train(tiny_config(**{"train.num_steps": 2, "train.grad_accum": 4}), tmp_path / "b", mesh_of())
  np.testing.assert_allclose([h["loss"] for h in h1], [h["loss"] for h in h2], rtol=1e-6)
  for k, v in _flat(m1).items():
    np.testing.assert_allclose(v, _flat(m2)[k], atol=1e-6, err_msg=k)


@pytest.mark.parametrize(
  "mode,regex,trained",
  [
    ("lora", "", lambda k: k.endswith(("lora_a", "lora_b"))),
    ("regex", "blocks/mlp/", lambda k: k.startswith("blocks/mlp/")),
  ],
)
def test_frozen_parameters_do_not_move(tmp_path, mode, regex, trained):
  c = tiny_config(
    **{"train.mode": mode, "train.trainable_regex": regex, "train.num_steps": 3, "train.lora_targets": "q,v,up"}
  )
  model, data, rules = _setup(c, tmp_path, mesh_of())
  before = _flat(model)
  after_model, *_ = stages.train_stage(c, str(tmp_path), "sft", model, data, lm_loss, mesh_of(), rules)
  after = _flat(after_model)
  moved = {k for k in before if not np.array_equal(before[k], after[k])}
  expected = {k for k in before if trained(k)}
  # lora_a receives no gradient on step 0 (lora_b starts at zero) but moves afterwards.
  assert moved == expected


def test_frozen_group_keeps_no_optimizer_state(tmp_path):
  c = tiny_config(**{"train.mode": "lora"})
  model, _, _ = _setup(c, tmp_path, mesh_of())
  _, params = split_model(model)
  tx, _, _ = make_optimizer(params, lr=1e-3, num_steps=10, mode="lora")
  state, _ = init_train_state(params, tx, mesh_of())
  n_moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  n_lora = sum(v.size for k, v in _flat(model).items() if "lora" in k)
  assert n_moments == 2 * n_lora  # Adam's mu and nu for LoRA only


def test_interrupted_run_resumes_with_exactly_the_same_losses(tmp_path):
  c = tiny_config(**{"train.num_steps": 8, "checkpoint.every_steps": 3})
  _, full, _ = _train(c, tmp_path / "full", mesh_of(fsdp=2))

  def sigterm_at_step_3(step, metrics):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  _, first, stopped = _train(c, tmp_path / "resumed", mesh_of(fsdp=2), hooks=[sigterm_at_step_3])
  assert stopped and len(first) < 8
  _, second, stopped = _train(c, tmp_path / "resumed", mesh_of(fsdp=2))
  assert not stopped
  steps = [h["step"] for h in first + second]
  assert steps == list(range(8))
  assert [h["loss"] for h in first + second] == [h["loss"] for h in full]  # bitwise equal


def test_checkpoint_restores_onto_another_mesh(tmp_path):
  c = tiny_config(**{"train.num_steps": 2})
  model, _, _ = _train(c, tmp_path, mesh_of(fsdp=8))
  # Build the same state on a different mesh and restore the step-2 checkpoint onto it.
  mesh = mesh_of(data=2, fsdp=2, tensor=2)
  fresh, _, _ = _setup(c, tmp_path, mesh)
  _, params = split_model(fresh)
  tx, _, labels = make_optimizer(params, lr=1e-3, num_steps=2)
  state, _ = init_train_state(params, tx, mesh)
  ckpt = Checkpointer(str(tmp_path / "sft" / "checkpoints"))
  assert ckpt.latest_step() == 2
  restored, meta = ckpt.restore(2, trainable_subset(state, labels))
  ckpt.close()
  assert meta == {"step": 2, "data_position": 2}
  want = _flat(model)
  for k, v in traverse_util.flatten_dict(restored["params"]).items():
    k = "/".join(k)
    np.testing.assert_array_equal(np.asarray(v), want[k], err_msg=k)
    assert v.sharding.mesh.shape == mesh.shape
  gate = restored["params"]["blocks"]["mlp"]["gate"]["kernel"]
  assert gate.sharding.shard_shape(gate.shape) == (2, 32, 64)


def test_non_finite_loss_stops_with_the_step_and_saves_nothing(tmp_path):
  c = tiny_config(**{"checkpoint.every_steps": 1})
  model, data, rules = _setup(c, tmp_path, mesh_of())
  model.final_norm.scale.value = model.final_norm.scale.value * jnp.nan
  with pytest.raises(NonFiniteLoss, match="at step 0"):
    stages.train_stage(c, str(tmp_path), "sft", model, data, lm_loss, mesh_of(), rules)
  ckpt = Checkpointer(str(tmp_path / "sft" / "checkpoints"))
  assert ckpt.latest_step() is None
  ckpt.close()

"""Activation sharding constraints: the batch stays split over (data, fsdp) inside the model, so the
compiled step gathers weights, not whole-batch activations, and computes the same losses."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import mesh_of
from reft_jax import sharding as shd
from reft_jax.losses import lm_loss
from reft_jax.model import ModelConfig, RunOptions, init_model
from reft_jax.optim import make_optimizer
from reft_jax.train import batch_shardings, init_train_state, jit_step, make_train_step

CFG = ModelConfig(
  vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16
)
B, T = 16, 24  # T matches no weight dimension, so [B, T, ...] results are activations
COLLECTIVE = re.compile(
  r"= (.+?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
  r"(?:-start)?\("
)


def _batch():
  rng = np.random.RandomState(0)
  mask = (np.arange(T)[None] < rng.randint(T // 2, T + 1, size=(B, 1))).astype(np.int32)
  return {
    "tokens": rng.randint(0, CFG.vocab_size, (B, T)).astype(np.int32) * mask,
    "attention_mask": mask,
    "loss_mask": mask * (np.arange(T)[None] >= 4),
  }


def _run(mesh, options=RunOptions(), steps=3):
  """Compiles the real train step on `mesh` and runs `steps` steps; returns (losses, compiled)."""
  graphdef, state = nnx.split(init_model(CFG, options, seed=0))
  params = jax.device_put(nnx.to_pure_dict(state), shd.state_shardings(state, mesh))
  tx, schedule, labels = make_optimizer(params, lr=1e-2, num_steps=steps, schedule="constant")
  train_state, state_sh = init_train_state(params, tx, mesh)
  batch_sh = batch_shardings(_batch(), mesh)
  batch = jax.device_put(_batch(), batch_sh)
  step = jit_step(make_train_step(graphdef, tx, lm_loss, schedule, labels), state_sh, batch_sh, mesh)
  compiled = step.lower(train_state, batch).compile()
  losses = []
  for _ in range(steps):
    train_state, metrics = compiled(train_state, batch)
    losses.append(float(metrics["loss"]))
  return np.array(losses), compiled


def _batch_gathering_collectives(hlo: str, per_device: int) -> list[str]:
  """Collectives with a float [b, T, ...] result, b > the per-device batch: activations of more examples
  than a device owns. (Token ids and masks that jnp.take gathers, s32/pred [b, T], are not counted.)"""
  out = []
  for line in hlo.splitlines():
    m = COLLECTIVE.search(line)
    if m and any(int(b) > per_device for b in re.findall(rf"\b(?:f32|bf16|f16)\[(\d+),{T}\b", m.group(1))):
      out.append(f"{m.group(2)} {m.group(1)[:80]}")
  return out


@pytest.fixture(scope="module")
def runs():
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(shd, "constrain", lambda x, *a, **k: x)  # the model without activation constraints
    unconstrained = _run(mesh_of(data=2, fsdp=4))
  return {"one": _run(mesh_of()), "constrained": _run(mesh_of(data=2, fsdp=4)), "unconstrained": unconstrained}


def test_losses_unchanged(runs):
  one = runs["one"][0]
  assert one[-1] < one[0]  # the steps really train
  np.testing.assert_allclose(runs["constrained"][0], one, atol=1e-5)
  np.testing.assert_allclose(runs["constrained"][0], runs["unconstrained"][0], atol=1e-5)


def test_no_full_batch_activation_collectives(runs):
  per_device = B // 8  # batch over data=2 x fsdp=4
  before = _batch_gathering_collectives(runs["unconstrained"][1].as_text(), per_device)
  after = _batch_gathering_collectives(runs["constrained"][1].as_text(), per_device)
  assert before, "the unconstrained step no longer gathers activations: this test checks nothing"
  assert after == [], after
  temp = {k: runs[k][1].memory_analysis().temp_size_in_bytes for k in ("unconstrained", "constrained")}
  assert temp["constrained"] < 0.75 * temp["unconstrained"], temp


def test_constrain_is_a_no_op_without_a_mesh():
  x = jnp.ones((8, 4, 2))
  assert shd.constrain(x, ("batch", None, None)) is x
  assert jax.jit(lambda x: shd.constrain(x, ("batch", None, None)))(x).sharding.is_fully_replicated


@pytest.mark.parametrize(
  "batch, rules, spec",
  [
    (8, None, P(("data", "fsdp"), None, None)),
    (2, None, P("data", None, None)),  # fsdp=4 does not divide the rest: dropped, as for params
    (8, {**shd.DEFAULT_RULES, "batch": "data"}, P("data", None, None)),
  ],
)
def test_constraint_follows_the_rules(batch, rules, spec):
  mesh = mesh_of(data=2, fsdp=4)
  x = jnp.ones((batch, 4, 2))

  def f(x):
    with shd.activation_sharding(mesh, rules):  # entered inside the trace, as jit_step does
      return shd.constrain(x * 2, ("batch", None, None))

  assert jax.jit(f)(x).sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)


def test_claim_order_lets_a_later_dim_keep_its_axis():
  mesh = mesh_of(data=2, fsdp=4)

  def f(x):  # the embedding lookup's layout: D split like the table's "embed", the batch over the rest
    with shd.activation_sharding(mesh):
      return shd.constrain(x * 2, ("batch", None, "embed"), claim_order=(2, 0, 1))

  out = jax.jit(f)(jnp.ones((8, 4, 16)))
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, "fsdp")), 3)


def test_jax_set_mesh_is_honoured():
  mesh = mesh_of(data=2, fsdp=4)
  with jax.set_mesh(mesh):
    out = jax.jit(lambda x: shd.constrain(x * 2, ("batch", None, None)))(jnp.ones((8, 4, 2)))
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 3)

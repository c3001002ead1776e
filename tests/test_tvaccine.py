"""T-Vaccine: Vaccine's perturbation on sampled safety-critical layers (reft_jax/defences/tvaccine.py)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from reft_jax.defences import tvaccine  # registers the config section before tiny_config() builds it
from reft_jax.defences import vaccine
from helpers import mesh_of, tiny_config
from reft_jax import sharding as shd
from reft_jax import stages
from reft_jax.data import load as data_load
from reft_jax.data import sft
from reft_jax.losses import batch_cross_entropy, lm_loss
from reft_jax.model import build as model_build
from reft_jax.train import Context, TrainState, split_model


def _setup(tmp_path, **overrides):
  c = tiny_config(**{"train.num_steps": 3, "train.lr": 3e-3, **overrides})
  examples = data_load.read_examples(c)
  tok = data_load.get_tokenizer(c, str(tmp_path), examples)
  data = sft.tokenize(examples, tok, c.data.seq_len, c.data.template)
  mesh, rules = mesh_of(), shd.parse_rules("")
  return c, data, tok, examples, lambda: model_build.build_model(c, mesh, rules, tok), mesh, rules


def _batch(data, rows):
  return {k: jnp.asarray(getattr(data, k)[rows]) for k in ("tokens", "loss_mask", "attention_mask")}


def _grads(loss_fn, graphdef, params, batch, extras):
  """(mean loss, its parameter gradient, aux) of a (sum, count, aux) loss."""

  def mean(p):
    total, count, aux = loss_fn(nnx.merge(graphdef, p), batch, Context(extras))
    return total / count, aux

  (value, aux), g = jax.value_and_grad(mean, has_aux=True)(params)
  return value, g, aux


def _flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _err(a, b):
  return float(optax.global_norm(jax.tree.map(jnp.subtract, a, b)))


def _layers(*mask):
  return {"layers": jnp.asarray(mask, jnp.float32)}


def test_tvaccine_with_rho_zero_is_sft(tmp_path):
  _, data, _, _, build, _, _ = _setup(tmp_path)
  graphdef, params = split_model(build())
  batch = _batch(data, slice(0, 4))
  want, g_lm, _ = _grads(lm_loss, graphdef, params, batch, {})
  got, g_tv, _ = _grads(tvaccine.tvaccine_loss(0.0), graphdef, params, batch, _layers(1, 1))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert _err(g_tv, g_lm) < 1e-6 * float(optax.global_norm(g_lm))


def test_tvaccine_with_every_layer_selected_is_vaccine(tmp_path):
  _, data, _, _, build, _, _ = _setup(tmp_path)
  graphdef, params = split_model(build())
  batch = _batch(data, slice(0, 4))
  vac = lambda model, b, ctx: vaccine.vaccine_loss(3.0)(model, b)
  want, g_vac, aux_vac = _grads(vac, graphdef, params, batch, {})
  got, g_tv, aux_tv = _grads(tvaccine.tvaccine_loss(3.0), graphdef, params, batch, _layers(1, 1))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(aux_tv["attn_grad_norm"], aux_vac["attn_grad_norm"], rtol=1e-6)
  assert _err(g_tv, g_vac) < 1e-5 * float(optax.global_norm(g_vac))
  # The perturbation matters: SFT's gradient is far from it.
  _, g_lm, _ = _grads(lm_loss, graphdef, params, batch, {})
  assert _err(g_lm, g_vac) > 1e-2 * float(optax.global_norm(g_vac))


def test_perturbation_and_training_only_on_the_selected_layers(tmp_path):
  """Layer 0 selected, layer 1 not: eps = rho g_0 / ||g_0|| on layer 0 and 0 on layer 1; layer 1's attention
  gets no gradient, its MLP does. The gradient is recomputed here from the explicit perturbation."""
  _, data, _, _, build, _, _ = _setup(tmp_path)
  model = build()
  graphdef, params = split_model(model)
  batch = _batch(data, slice(0, 4))
  rho = 3.0
  g = tvaccine.attn_out_grad(model, batch)
  norms = [np.linalg.norm(np.asarray(g[layer]).ravel()) for layer in range(2)]
  np.testing.assert_allclose(tvaccine.layer_grad_norms(model, batch), norms, rtol=1e-5)
  eps = jnp.zeros_like(g).at[0].set(rho * g[0] / jnp.sqrt(jnp.sum(g[0] ** 2)))

  def ce(p, e):
    s, n = batch_cross_entropy(nnx.merge(graphdef, p), batch, {"attn_out": e})
    return s / n

  want_g = jax.grad(ce)(params, eps)
  want_g["blocks"]["attn"] = jax.tree.map(lambda x: x.at[1].set(0.0), want_g["blocks"]["attn"])
  value, got_g, aux = _grads(tvaccine.tvaccine_loss(rho), graphdef, params, batch, _layers(1, 0))
  np.testing.assert_allclose(value, ce(params, eps), rtol=1e-6)
  np.testing.assert_allclose(aux["attn_grad_norm"], jnp.sqrt(jnp.sum(g[0] ** 2)), rtol=1e-6)
  assert _err(got_g, want_g) < 1e-5 * float(optax.global_norm(want_g))
  # Not Vaccine's loss (eps on both layers, one norm over both) and not the loss with layer 1 perturbed.
  both = rho * g / jnp.sqrt(jnp.sum(g * g))
  assert abs(float(ce(params, both)) - float(value)) > 1e-4
  only_1 = jnp.zeros_like(g).at[1].set(rho * g[1] / jnp.sqrt(jnp.sum(g[1] ** 2)))
  assert abs(float(ce(params, only_1)) - float(value)) > 1e-4
  flat = _flat(got_g)
  attn = [k for k in flat if k.startswith("blocks/attn/")]
  mlp = [k for k in flat if k.startswith("blocks/mlp/")]
  assert attn and mlp
  assert all(not flat[k][1].any() and flat[k][0].any() for k in attn)
  assert all(flat[k][1].any() for k in mlp)


def test_layers_are_drawn_without_replacement_proportionally_to_their_gradient_norms():
  np.testing.assert_allclose(tvaccine.layer_probabilities([1.0, 3.0, 0.0]), [0.25, 0.75, 0.0], atol=1e-9)
  assert tvaccine.layer_probabilities([0.0, 0.0]).tolist() == [0.5, 0.5]  # no crash on zero norms
  p = np.array([0.5, 0.3, 0.15, 0.05])
  rng = np.random.default_rng(0)
  draws = np.stack([tvaccine.select_layers(rng, p, 2) for _ in range(20000)])
  assert set(draws.sum(axis=1)) == {2.0}  # two distinct layers each time
  # Successive sampling without replacement: P(i in S) = p_i + sum_{j != i} p_j p_i / (1 - p_j).
  exact = [p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(4) if j != i) for i in range(4)]
  np.testing.assert_allclose(draws.mean(axis=0), exact, atol=0.015)
  one = np.stack([tvaccine.select_layers(rng, p, 1) for _ in range(20000)])
  np.testing.assert_allclose(one.mean(axis=0), p, atol=0.015)
  assert tvaccine.select_layers(rng, p, 8).tolist() == [1, 1, 1, 1]  # more than L: every layer


def test_state_reweights_and_resamples_on_their_schedules(tmp_path):
  c, data, _, _, build, _, _ = _setup(tmp_path)
  model = build()
  graphdef, params = split_model(model)
  rows = np.flatnonzero(data.loss_mask.sum(axis=1) > 0)[:5]  # examples whose answer fits in seq_len
  pool = sft.TokenizedSet(data.tokens[rows], data.loss_mask[rows], data.attention_mask[rows], 0)
  norms_of = jax.jit(lambda p, b: tvaccine.layer_grad_norms(nnx.merge(graphdef, p), b))
  ms = tvaccine.tvaccine_state(graphdef, pool, 2, 1, resample_every=2, reweight_every=3, seed=7)
  state = TrainState(jnp.zeros((), jnp.int32), params, None, ms.extras)
  order = np.random.default_rng(7).permutation(5)
  probs, masks = [], []
  for step in range(7):
    state = state.replace(params=jax.tree.map(lambda p: p * 1.05, state.params))  # the weights move
    state = ms.before_step(step, state)
    probs.append(np.asarray(state.extras["probs"]))
    masks.append(np.asarray(state.extras["layers"]))
    if step % 3 == 0:  # the norms of one pool example under the current weights
      norms = norms_of(state.params, _batch(pool, [order[step // 3]]))
      np.testing.assert_allclose(probs[-1], norms / jnp.sum(norms), rtol=1e-4)
    if step % 2 == 0:
      want = tvaccine.select_layers(np.random.default_rng((7, step)), probs[-1], 1)
      np.testing.assert_array_equal(masks[-1], want)
  changed = lambda xs: [s for s in range(1, 7) if not np.array_equal(xs[s], xs[s - 1])]
  assert changed(probs) == [3, 6]
  assert set(changed(masks)) <= {2, 4, 6} and all(m.sum() == 1 for m in masks)


def _env(tmp_path, **overrides):
  c, _, tok, user, build, mesh, rules = _setup(tmp_path, **overrides)
  return stages.Env(c, mesh, rules, tok, str(tmp_path / "base"), str(tmp_path / "shared")), user, build


def test_harmful_pool_must_be_disjoint_from_the_attack(tmp_path):
  from reft_jax.config import ConfigError

  env, _, _ = _env(
    tmp_path,
    **{
      "data.harmful_source": "builtin:requests_train[0:20]",
      "tvaccine.harmful_source": "builtin:requests_train[15:30]",
    },
  )
  env.c.data.attack = "harmful_mix"
  with pytest.raises(ConfigError, match="tvaccine.harmful_source.*5 prompt"):
    tvaccine.harmful_pool(env)
  env.c.tvaccine.harmful_source = "builtin:requests_train[20:30]"
  assert len(tvaccine.harmful_pool(env)) == 10


@pytest.mark.slow
def test_alignment_stage_trains_only_the_sampled_layers_attention(tmp_path):
  """The registered stage through run_stage: one of 2 layers drawn at step 0 and kept (resampled every 100
  steps); with no weight decay, the other layer's attention never moves."""
  from reft_jax.defences import registry
  from reft_jax.model import save_hf

  env, _, build = _env(
    tmp_path,
    **{
      "data.seq_len": 48,  # every answer of these sets fits
      "teacher.num_steps": 4,
      "teacher.batch_size": 8,
      "reft.alignment": "builtin:requests_train[40:56]",
      "tvaccine.harmful_source": "builtin:requests_train[20:30]",
      "tvaccine.layers": 1,
      "tvaccine.resample_every": 100,
      "tvaccine.reweight_every": 100,
    },
  )
  base = build()
  save_hf(base, env.base_path, env.tokenizer)
  spec = registry.get("tvaccine").align(env)
  assert spec.name == "aligned_tvaccine" and spec.train["num_steps"] == 4
  final = {}
  spec.finish = lambda model, extras: final.update(jax.device_get(extras))
  result = stages.run_stage(env, env.shared_dir, spec)
  assert os.path.exists(os.path.join(result.model_dir, "config.json"))
  rows = [json.loads(line) for line in open(os.path.join(env.shared_dir, "aligned_tvaccine", "metrics.jsonl"))]
  assert len(rows) == 4 and all(np.isfinite(r["loss"]) and r["attn_grad_norm"] > 0 for r in rows)
  assert all(r["layers_selected"] == 1 for r in rows)
  chosen = int(np.argmax(final["layers"]))
  before, after = _flat(split_model(base)[1]), _flat(split_model(result.model)[1])
  for k in (k for k in before if k.startswith("blocks/attn/")):
    np.testing.assert_array_equal(after[k][1 - chosen], before[k][1 - chosen], err_msg=k)
    assert not np.array_equal(after[k][chosen], before[k][chosen]), k
  for k in (k for k in before if k.startswith("blocks/mlp/")):  # the MLPs of both layers train
    assert all(not np.array_equal(after[k][layer], before[k][layer]) for layer in (0, 1)), k

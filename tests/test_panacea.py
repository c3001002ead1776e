"""Panacea (defences/panacea.py): the objective, its perturbation, its stage and the exported w + eps."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from reft_jax.defences import panacea  # registers the section before tiny_config() builds the config
from helpers import mesh_of, tiny_config
from reft_jax import sharding as shd
from reft_jax import stages
from reft_jax.data import load as data_load
from reft_jax.data import sft
from reft_jax.losses import batch_cross_entropy, lm_loss
from reft_jax.model import build as model_build
from reft_jax.optim import overlay, trainable_labels, trainable_part
from reft_jax.train import Context, split_model


def _setup(tmp_path, **overrides):
  c = tiny_config(**{"train.num_steps": 3, "train.lr": 3e-3, **overrides})
  examples = data_load.read_examples(c)
  tok = data_load.get_tokenizer(c, str(tmp_path), examples)
  data = sft.tokenize(examples, tok, c.data.seq_len, c.data.template)
  mesh, rules = mesh_of(), shd.parse_rules("")
  return c, data, tok, lambda: model_build.build_model(c, mesh, rules, tok), mesh, rules


def _batch(data, n=4, reverse=False):
  arrays = dict(tokens=data.tokens, loss_mask=data.loss_mask, attention_mask=data.attention_mask)
  return {k: jnp.asarray(v[::-1][:n] if reverse else v[:n]) for k, v in arrays.items()}


def _two_part_batch(data):
  return {"user": _batch(data), "harmful": _batch(data, reverse=True)}


def _mean(graphdef, params, part_batch):
  """The mean CE of one batch part as a function of a trainable subset of `params`."""

  def f(t):
    s, n = batch_cross_entropy(nnx.merge(graphdef, overlay(params, t)), part_batch)
    return s / n

  return jax.jit(f)


def _norm(tree):
  return float(optax.global_norm(tree))


def _diff(a, b):
  return _norm(jax.tree.map(jnp.subtract, a, b))


def _flat(params):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


@pytest.mark.slow
def test_panacea_with_lambda_zero_is_sft_and_with_rho_zero_too_exports_sfts_weights(tmp_path):
  c, data, _, build, mesh, rules = _setup(tmp_path)
  graphdef, params = split_model(build())
  batch = _two_part_batch(data)

  def mean(loss_fn, b):
    def f(p):
      total, count, _ = loss_fn(nnx.merge(graphdef, p), b, Context({}))
      return total / count

    return jax.jit(jax.value_and_grad(f))(params)

  want, g_want = mean(lm_loss, batch["user"])
  got, g_got = mean(panacea.panacea_loss(0.0, 1.0), batch)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert _diff(g_got, g_want) < 1e-6 * _norm(g_want)

  # Through the train step with its method state: lam = 0 trains SFT's weights, and rho = 0 adds nothing.
  sft_model = stages.train_stage(c, str(tmp_path / "sft"), "sft", build(), data, lm_loss, mesh, rules)[0]
  mixed = sft.MixedBatcher(
    {
      "user": sft.Batcher(data, c.train.batch_size, seed=c.seed),
      "harmful": sft.Batcher(data, c.train.batch_size, seed=c.seed + 7),
    }
  )
  model = build()
  p0 = split_model(model)[1]
  state = panacea.panacea_state(p0, trainable_labels(p0, "full"))
  out = stages.train_stage(
    c,
    str(tmp_path / "pan"),
    "pan",
    model,
    mixed,
    panacea.panacea_loss(0.0, 0.0),
    mesh,
    rules,
    extras=state.extras,
    update_extras=state.update,
  )
  pan_model, extras = out[0], out[3]
  assert _norm(extras[panacea.EPSILON]) == 0.0
  panacea.apply_epsilon(pan_model, extras[panacea.EPSILON])
  p_sft, p_pan = _flat(split_model(sft_model)[1]), _flat(split_model(pan_model)[1])
  for k in p_sft:
    np.testing.assert_allclose(p_pan[k], p_sft[k], atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_panacea_epsilon_ascends_the_harmful_loss_on_the_rho_sphere(tmp_path):
  c, data, _, build, _, _ = _setup(tmp_path)
  graphdef, params = split_model(build())
  batch = _two_part_batch(data)
  part = trainable_part(params, trainable_labels(params, "full"))
  h = _mean(graphdef, params, batch["harmful"])
  h0, g_h = jax.jit(jax.value_and_grad(h))(part)
  rho = 0.05
  eps = panacea.panacea_epsilon(g_h, rho)
  # The closed-form inner maximiser: along grad h, norm rho (up to the official +1e-7 in the denominator).
  np.testing.assert_allclose(_norm(eps), rho, rtol=1e-5)
  cos = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(eps), jax.tree.leaves(g_h))) / (
    _norm(eps) * _norm(g_h)
  )
  assert cos == pytest.approx(1.0, abs=1e-5)
  h_eps = float(h(panacea.add_epsilon(part, eps)))
  assert h_eps > float(h0) + 0.5 * rho * _norm(g_h)  # first order: h(w + eps) - h(w) ~ rho ||grad h||
  # No other direction of the same norm raises h as much (five random ones here).
  keys = iter(jax.random.split(jax.random.key(3), 64))
  for _ in range(5):
    r = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype), part)
    r = jax.tree.map(lambda x, s=rho / _norm(r): x * s, r)
    assert float(h(panacea.add_epsilon(part, r))) < h_eps
  # The loss hands the same eps (and its norm) to the method state, which keeps it for the export.
  loss = panacea.panacea_loss(1e-3, rho)
  _, _, aux = jax.jit(lambda p: loss(nnx.merge(graphdef, p), batch, Context({})))(params)
  assert _diff(aux[panacea.EPSILON], eps) < 1e-6 * rho
  np.testing.assert_allclose(aux["epsilon_norm"], rho, rtol=1e-5)
  np.testing.assert_allclose(aux["harmful_loss_perturbed"], h_eps, rtol=1e-5)
  state = panacea.panacea_state(params, trainable_labels(params, "full"))
  extras, rest = state.update(state.extras, aux)
  assert panacea.EPSILON not in rest and "epsilon_norm" in rest
  assert _diff(extras[panacea.EPSILON], eps) == 0.0


def _lora_graph_and_params(tmp_path):
  """A LoRA-mode tiny model whose lora_b are not zero (so every adapter has a gradient)."""
  c, data, _, build, _, _ = _setup(tmp_path, **{"train.mode": "lora"})
  graphdef, params = split_model(build())
  key = iter(jax.random.split(jax.random.key(7), 64))
  flat = traverse_util.flatten_dict(params)
  flat = {
    k: (0.1 * jax.random.normal(next(key), v.shape, v.dtype) if k[-1] == "lora_b" else v) for k, v in flat.items()
  }
  params = traverse_util.unflatten_dict(flat)
  return data, graphdef, params, trainable_labels(params, "lora")


@pytest.mark.slow
def test_panacea_gradient_is_grad_g_minus_lambda_grad_h_difference_over_the_lora_weights(tmp_path):
  data, graphdef, params, labels = _lora_graph_and_params(tmp_path)
  batch = _two_part_batch(data)
  part = trainable_part(params, labels)
  lam, rho = 2.0, 0.5
  g, h = _mean(graphdef, params, batch["user"]), _mean(graphdef, params, batch["harmful"])
  # The official step: eps = rho g_h / (||g_h|| + 1e-7) over the trained (LoRA) parameters; update with
  # grad g(w) - lam [grad h(w + eps) - grad h(w)].
  g_g, (h0, g_h) = jax.jit(jax.grad(g))(part), jax.jit(jax.value_and_grad(h))(part)
  eps = jax.tree.map(lambda x: rho * x / (_norm(g_h) + 1e-7), g_h)
  shifted = jax.tree.map(jnp.add, part, eps)
  h_eps, g_h_eps = jax.jit(jax.value_and_grad(h))(shifted)
  assert float(h_eps) > float(h0)
  want = jax.tree.map(lambda a, b, d: a - lam * (d - b), g_g, g_h, g_h_eps)

  def grad_of(loss):
    def f(t):
      total, count, aux = loss(nnx.merge(graphdef, overlay(params, t)), batch, Context({}))
      return total / count, aux

    return jax.jit(jax.grad(f, has_aux=True))(part)

  got, aux = grad_of(panacea.panacea_loss(lam, rho, cap=0.0, mode="lora"))
  assert _diff(got, want) < 1e-4 * _norm(want)
  paths = traverse_util.flatten_dict(aux[panacea.EPSILON])
  assert paths and all(k[-1] in ("lora_a", "lora_b") for k in paths)  # eps covers the adapters only
  np.testing.assert_allclose(aux["harmful_grad_norm"], _norm(g_h), rtol=1e-5)
  # The official clamp: once h(w + eps) is above the cap, its term has no gradient: grad g + lam grad h(w).
  capped, _ = grad_of(panacea.panacea_loss(lam, rho, cap=0.5 * float(h_eps), mode="lora"))
  want_capped = jax.tree.map(lambda a, b: a + lam * b, g_g, g_h)
  assert _diff(capped, want_capped) < 1e-4 * _norm(want_capped)


def test_panacea_refuses_a_harmful_set_that_shares_prompts_with_the_attack_and_bad_settings(tmp_path):
  from reft_jax.config import ConfigError

  c, _, tok, _, mesh, rules = _setup(
    tmp_path,
    **{
      "data.harmful_source": "builtin:requests_train[0:20]",
      "panacea.harmful_source": "builtin:requests_train[15:30]",
    },
  )
  user = data_load.read_examples(c)
  env = stages.Env(c, mesh, rules, tok, str(tmp_path / "base"), str(tmp_path / "shared"))
  env.c.data.attack = "harmful_mix"  # the attack draws from the pool (after the user data was read)
  with pytest.raises(ConfigError, match="panacea.harmful_source.*5 prompt"):
    panacea.PANACEA.finetune(env, str(tmp_path / "cell"), env.base_path, user)
  env.c.panacea.harmful_source = "builtin:requests_train[20:30]"
  spec = panacea.PANACEA.finetune(env, str(tmp_path / "cell"), env.base_path, user)
  assert spec.name == "panacea" and len(spec.data.parts["harmful"].data.tokens) == 10
  assert panacea.PANACEA.align is not None  # Panacea fine-tunes the aligned model
  for key, bad in (("lam", -1.0), ("rho", -0.1), ("harmful_loss_cap", -1.0), ("harmful_source", "")):
    with pytest.raises(ConfigError, match=f"panacea.{key}"):
      panacea.PANACEA.validate(tiny_config(**{f"panacea.{key}": bad}))
  panacea.PANACEA.validate(tiny_config())


@pytest.mark.slow
def test_panacea_stage_exports_the_trained_weights_plus_the_last_epsilon(tmp_path):
  from reft_jax.model import load_hf, save_hf

  rho = 0.3
  c, _, tok, build, mesh, rules = _setup(
    tmp_path,
    **{
      "train.num_steps": 4,
      "panacea.rho": rho,
      "panacea.lam": 1.0,
      # toy prompts with answers (the builtin requests have none; no attack here, so no disjointness check)
      "panacea.harmful_source": "builtin:toy[0:16]",
    },
  )
  user = data_load.read_examples(c)
  base = str(tmp_path / "base")
  save_hf(build(), base, tok)
  env = stages.Env(c, mesh, rules, tok, base, str(tmp_path / "shared"))
  root = str(tmp_path / "cell")
  spec = panacea.PANACEA.finetune(env, root, base, user)  # from `base` (the aligned stage is SFT, tested)
  seen = {}
  finish = spec.finish

  def spy(model, extras):
    seen.update(trained=split_model(model)[1], eps=extras[panacea.EPSILON])
    finish(model, extras)

  spec.finish = spy
  out = stages.run_stage(env, root, spec).model_dir
  trained, eps = jax.tree.map(np.asarray, seen["trained"]), seen["eps"]
  np.testing.assert_allclose(_norm(eps), rho, rtol=1e-4)
  exported = _flat(split_model(load_hf(out))[1])
  want = _flat(panacea.add_epsilon(trained, eps))
  for k, v in exported.items():
    np.testing.assert_allclose(v, want[k], atol=1e-6, err_msg=k)
  assert max(float(np.max(np.abs(exported[k] - v))) for k, v in _flat(trained).items()) > 1e-3  # eps is there
  rows = [json.loads(line) for line in open(os.path.join(root, "panacea", "metrics.jsonl"))]
  assert len(rows) == 4 and all(np.isfinite(r["loss"]) and r["epsilon_norm"] == pytest.approx(rho) for r in rows)
  assert all(r["harmful_loss_perturbed"] > r["harmful_loss"] for r in rows)
  # The results fields carry eps's norm, also when the finished stage is reused (no retraining, no finish).
  assert spec.record["panacea"]["epsilon_norm"] == pytest.approx(rho, rel=1e-4)
  again = panacea.PANACEA.finetune(env, root, base, user)
  assert stages.run_stage(env, root, again).history == [] and again.record == spec.record

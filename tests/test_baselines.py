"""Baselines: sanity equivalences with SFT, their extra gradients against references, and a sweep."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from helpers import small_world_flags, ROOT, mesh_of, tiny_config
from reft_jax.data import sft
from reft_jax.losses import lm_loss
from reft_jax.defences import booster, lisa, smart, vaccine
from reft_jax.losses import batch_cross_entropy
from reft_jax.optim import overlay, trainable_part
from reft_jax.train import split_model
from reft_jax.train import Context
from reft_jax.model import build as model_build
from reft_jax.data import load as data_load
from reft_jax import stages
from reft_jax import sharding as shd


def _setup(tmp_path, **overrides):
  c = tiny_config(**{"train.num_steps": 3, "train.lr": 3e-3, **overrides})
  examples = data_load.read_examples(c)
  tok = data_load.get_tokenizer(c, str(tmp_path), examples)
  data = sft.tokenize(examples, tok, c.data.seq_len, c.data.template)
  mesh, rules = mesh_of(), shd.parse_rules("")
  return c, data, lambda: model_build.build_model(c, mesh, rules, tok), mesh, rules


def _params(model):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model))).items()}


def _assert_same(m1, m2, atol=1e-6):
  p1, p2 = _params(m1), _params(m2)
  for k in p1:
    np.testing.assert_allclose(p1[k], p2[k], atol=atol, err_msg=k)


def _train(c, root, name, model, data, loss, mesh, rules, **kw):
  return stages.train_stage(c, str(root / name), name, model, data, loss, mesh, rules, **kw)[0]


def test_vaccine_with_rho_zero_is_sft(tmp_path):
  c, data, build, mesh, rules = _setup(tmp_path)
  sft_model = _train(c, tmp_path, "sft", build(), data, lm_loss, mesh, rules)
  vac = _train(c, tmp_path, "vac", build(), data, vaccine.vaccine_loss(0.0), mesh, rules)
  _assert_same(sft_model, vac)
  moved = _train(c, tmp_path, "vac2", build(), data, vaccine.vaccine_loss(2.0), mesh, rules)
  assert not np.allclose(_params(moved)["embed"], _params(sft_model)["embed"], atol=1e-6)


def test_booster_with_lambda_zero_is_sft_on_the_alignment_data(tmp_path):
  c, data, build, mesh, rules = _setup(tmp_path)
  sft_model = _train(c, tmp_path, "sft", build(), data, lm_loss, mesh, rules)
  mixed = sft.MixedBatcher(
    {
      "align": sft.Batcher(data, c.train.batch_size, seed=c.seed),
      "harmful": sft.Batcher(data, c.train.batch_size, seed=c.seed + 3),
    }
  )
  boo = _train(c, tmp_path, "boo", build(), mixed, booster.booster_loss(0.0, 0.1), mesh, rules)
  _assert_same(sft_model, boo)


def test_lisa_with_rho_zero_and_no_alignment_steps_is_sft(tmp_path):
  c, data, build, mesh, rules = _setup(tmp_path)
  sft_model = _train(c, tmp_path, "sft", build(), data, lm_loss, mesh, rules)
  mixed = sft.MixedBatcher(
    {
      "user": sft.Batcher(data, c.train.batch_size, seed=c.seed),
      "align": sft.Batcher(data, c.train.batch_size, seed=c.seed + 5),
    }
  )
  model = build()
  params = split_model(model)[1]
  extras = {"anchor": params, "align_phase": jnp.asarray(0, jnp.int32), "prox_on": jnp.asarray(1.0)}
  lisa_model = _train(c, tmp_path, "lisa", model, mixed, lisa.lisa_loss(0.0), mesh, rules, extras=extras)
  _assert_same(sft_model, lisa_model)


def test_lisa_proximal_term_and_schedule():
  phase = lisa.lisa_schedule(2, 3)
  assert [phase(s) for s in range(10)] == [1, 1, 0, 0, 0, 1, 1, 0, 0, 0]
  assert [lisa.lisa_schedule(0, 5)(s) for s in range(3)] == [0, 0, 0]


def _tiny_batch(c, data, n=4):
  return {
    k: jnp.asarray(v[:n])
    for k, v in dict(tokens=data.tokens, loss_mask=data.loss_mask, attention_mask=data.attention_mask).items()
  }


def test_vaccine_perturbation_gradient_matches_finite_differences(tmp_path):
  c, data, build, _, _ = _setup(tmp_path)
  model = build()
  batch = _tiny_batch(c, data)
  cfg = model.cfg
  delta0 = jnp.zeros((cfg.num_layers, 4, c.data.seq_len, cfg.hidden_size), jnp.float32)

  def mean_loss(delta):
    s, n = batch_cross_entropy(model, batch, {"attn_out": delta})
    return s / n

  g = jax.grad(mean_loss)(delta0)
  idx = (1, 0, 5, 3)  # layer 1, example 0, position 5, feature 3
  h = 1e-2
  e = jnp.zeros_like(delta0).at[idx].set(h)
  fd = (mean_loss(delta0 + e) - mean_loss(delta0 - e)) / (2 * h)
  np.testing.assert_allclose(float(g[idx]), float(fd), rtol=2e-2, atol=1e-6)
  # The loss's parameter gradient is that of the loss under eps = rho g / ||g|| (a constant).
  rho = 2.0
  eps = rho * g / jnp.sqrt(jnp.sum(g * g))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  want = jax.grad(lambda p: batch_cross_entropy(nnx.merge(graphdef, p), batch, {"attn_out": eps})[0])(params)
  got = jax.grad(lambda p: vaccine.vaccine_loss(rho)(nnx.merge(graphdef, p), batch)[0])(params)
  np.testing.assert_allclose(optax.global_norm(jax.tree.map(jnp.subtract, got, want)), 0.0, atol=1e-5)


def test_booster_gradient_is_grad_f_plus_lambda_grad_h_difference(tmp_path):
  c, data, build, _, _ = _setup(tmp_path)
  model = build()
  batch = {"align": _tiny_batch(c, data), "harmful": {k: v[::-1] for k, v in _tiny_batch(c, data).items()}}
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  lam, alpha = 5.0, 0.1

  def f(p):
    s, n = batch_cross_entropy(nnx.merge(graphdef, p), batch["align"])
    return s / n

  def h(p):
    s, n = batch_cross_entropy(nnx.merge(graphdef, p), batch["harmful"])
    return s / n

  g_f, g_h = jax.grad(f)(params), jax.grad(h)(params)
  norm = optax.global_norm(g_h)
  shifted = jax.tree.map(lambda p, g: p - alpha * g / norm, params, g_h)
  g_h2 = jax.grad(h)(shifted)
  want = jax.tree.map(lambda a, b, c: a + lam * (b - c), g_f, g_h, g_h2)

  def booster_mean(p):
    total, count, _ = booster.booster_loss(lam, alpha)(nnx.merge(graphdef, p), batch, Context({}))
    return total / count

  got = jax.grad(booster_mean)(params)
  err = optax.global_norm(jax.tree.map(jnp.subtract, got, want))
  assert float(err) < 1e-4 * float(optax.global_norm(want))


@pytest.mark.slow
def test_sweep_runs_every_cell_on_shared_stages_and_writes_the_table(tmp_path):
  world = small_world_flags()
  args = [
    "--config=configs/default.py:sweep",
    f"--workdir={tmp_path}",
    "--config.demo.arch=tiny",
    "--config.sweep.seeds=0",
    "--config.demo.pretrain_steps=3",
    "--config.train.num_steps=2",
    "--config.teacher.num_steps=2",
    "--config.reft.probe_size=8",
    "--config.data.n=20",
    "--config.train.batch_size=4",
    "--config.teacher.batch_size=4",
    "--config.eval.max_new_tokens=4",
    "--config.eval.batch_size=8",
    "--config.eval.n_harmless=4",
    "--config.log.progress=False",
    "--config.sweep.p=0,0.2",
    "--config.lisa.k_align=1",
    "--config.lisa.k_user=1",
    "--config.data.buckets=",
    "--config.reft.tau_mode=fixed",
    "--config.reft.tau=1.5",
    "--config.restore.steps=2",
    "--config.restore.warmup_steps=1",
    "--config.sweep.methods=sft_aligned,vaccine,booster,reft",
    *world,
  ]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  r = subprocess.run(
    [sys.executable, "-m", "reft_jax", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
  )
  assert r.returncode == 0, r.stderr[-3000:]
  runs = json.load(open(tmp_path / "results.json"))["runs"]
  # Every defence also runs alone (tests/test_defences.py); here the cells and the shared stages.
  methods = ["sft_aligned", "vaccine", "booster", "reft"]
  assert {(v["method"], v["p"]) for v in runs.values()} == {(m, p) for m in methods for p in (0.0, 0.2)}
  table = open(tmp_path / "sweep.md").read()
  assert all(f"| {m} |" in table for m in methods) and "p=0.2 HS↓ / FA↑" in table
  rows = list(open(tmp_path / "sweep.csv"))
  assert len(rows) == 1 + 2 * len(methods)
  assert os.path.exists(tmp_path / "sweep.png")
  # shared stages trained once: one teacher, one aligned model per alignment method
  assert sorted(d for d in os.listdir(tmp_path) if d.startswith(("aligned", "teacher"))) == [
    "aligned",
    "aligned_booster",
    "aligned_vaccine",
    "teacher",
  ]


def test_lisa_gradient_is_the_active_states_ce_plus_rho_times_distance_to_anchor(tmp_path):
  c, data, build, _, _ = _setup(tmp_path)
  model = build()
  user = _tiny_batch(c, data)
  align = {k: v[::-1] for k, v in user.items()}
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  anchor = jax.tree.map(lambda p: p + 0.01, params)
  rho = 3.0
  for phase, active in ((0, user), (1, align)):
    extras = {"anchor": anchor, "align_phase": jnp.asarray(phase), "prox_on": jnp.asarray(1.0)}

    def mean_loss(p):
      total, count, _ = lisa.lisa_loss(rho)(nnx.merge(graphdef, p), {"user": user, "align": align}, Context(extras))
      return total / count

    def ce(p):
      s, n = batch_cross_entropy(nnx.merge(graphdef, p), active)
      return s / n

    want = jax.tree.map(lambda g, p, a: g + rho * (p - a), jax.grad(ce)(params), params, anchor)
    got = jax.grad(mean_loss)(params)
    err = optax.global_norm(jax.tree.map(jnp.subtract, got, want))
    assert float(err) < 1e-4 * float(optax.global_norm(want)), phase


# ---------------------------------------------------------------- SMART


def _smart_ctx(params, shift=0.0, key=0):
  momentum = jax.tree.map(lambda p: p.astype(jnp.float32) + shift, params)
  return Context({"smart_momentum": momentum, "smart_key": jax.random.PRNGKey(key)})


def test_embed_intervention_none_is_the_plain_forward_and_a_delta_moves_the_logits(tmp_path):
  c, data, build, _, _ = _setup(tmp_path)
  model = build()
  b = _tiny_batch(c, data)
  tokens, mask = b["tokens"], b["attention_mask"]
  plain = model(tokens, mask)
  np.testing.assert_array_equal(model.forward(tokens, mask, interventions=None)[0], plain)
  zeros = jnp.zeros((*tokens.shape, model.cfg.hidden_size))
  np.testing.assert_array_equal(model.forward(tokens, mask, interventions={"embed": zeros})[0], plain)
  delta = 0.1 * jax.random.normal(jax.random.key(0), zeros.shape)
  assert not np.allclose(model.forward(tokens, mask, interventions={"embed": delta})[0], plain, atol=1e-4)
  # It is added to what the blocks see (hidden state 0).
  h = lambda d: model.forward(tokens, mask, hidden_layers=(0,), stop_after=0, interventions={"embed": d})[1][0]
  np.testing.assert_allclose(h(delta) - h(None), delta, atol=1e-6)


def test_smart_with_lam_and_mu_zero_is_the_lm_loss(tmp_path):
  c, data, build, _, _ = _setup(tmp_path)
  batch = _tiny_batch(c, data)
  graphdef, params = split_model(build())
  ctx = _smart_ctx(params, shift=0.05)  # a momentum copy away from the weights: the proximal term is > 0

  def mean(loss_fn):
    def f(p):
      total, count, _ = loss_fn(nnx.merge(graphdef, p), batch, ctx)
      return total / count

    return jax.jit(jax.value_and_grad(f))(params)

  want, g_want = mean(lm_loss)
  got, g_got = mean(smart.smart_loss(0.0, 1e-2, 1e-2, 1e-2, 0.0))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert float(optax.global_norm(jax.tree.map(jnp.subtract, g_got, g_want))) < 1e-6 * float(optax.global_norm(g_want))
  # Otherwise the objective is CE + lam * adversarial + mu * proximal, both terms > 0 here.
  loss = smart.smart_loss(2.0, 1e-2, 1e-2, 1e-2, 3.0)
  total, count, aux = jax.jit(lambda p: loss(nnx.merge(graphdef, p), batch, ctx))(params)
  assert aux["smart_adv"] > 0 and aux["smart_prox"] > 0
  np.testing.assert_allclose(total / count, want + 2 * aux["smart_adv"] + 3 * aux["smart_prox"], rtol=1e-6)


def test_smart_adversarial_term_grows_with_eps_and_the_ascent_step_is_adversarial(tmp_path):
  c, data, build, _, _ = _setup(tmp_path)
  model = build()
  batch = _tiny_batch(c, data)
  ctx = _smart_ctx(split_model(model)[1])

  def adv(eps, eta):
    return float(smart.smart_loss(1.0, eps, eps, eta, 0.0)(model, batch, ctx)[2]["smart_adv"])

  assert adv(0.0, 1e-3) == 0.0
  small, large = adv(1e-3, 1e-3), adv(1e-2, 1e-2)
  assert 0.0 < small < large
  # The same start noise without the ascent step (eta=0) moves the outputs less.
  assert adv(1e-2, 0.0) < 0.8 * large
  logits = model(batch["tokens"], batch["attention_mask"])[:, :-1]
  delta = smart.smart_delta(model, batch, logits, jax.random.PRNGKey(0), 1e-2, 1e-2, 1.0)
  assert float(jnp.max(jnp.abs(delta))) == pytest.approx(1e-2)  # projected onto the inf-norm ball


def test_smart_proximal_term_and_momentum_cover_the_lora_parameters_only(tmp_path):
  from reft_jax.optim import trainable_labels
  from reft_jax.train import TrainState

  c, data, build, _, _ = _setup(tmp_path, **{"train.mode": "lora"})
  model = build()
  batch = _tiny_batch(c, data)
  params = split_model(model)[1]
  labels = trainable_labels(params, "lora")
  state0 = smart.smart_state(params, labels, beta=0.9, seed=0)
  extras, before_step = state0.extras, state0.before_step
  paths = traverse_util.flatten_dict(extras["smart_momentum"])
  assert paths and all(k[-1] in ("lora_a", "lora_b") for k in paths)
  loss = smart.smart_loss(0.0, 0.0, 0.0, 0.0, 1.0)
  prox = lambda ex: float(loss(model, batch, Context(ex))[2]["smart_prox"])
  assert prox(extras) == 0.0
  assert prox({**extras, "smart_momentum": jax.tree.map(lambda m: m + 0.05, extras["smart_momentum"])}) > 0
  # before step 0 w~ = the initial weights; before step t > 0 w~ <- 0.1 w + 0.9 w~.
  moved = jax.tree.map(lambda p: p + 1.0, params)
  state = TrainState(jnp.zeros((), jnp.int32), moved, None, extras)
  m0 = jax.tree.map(np.asarray, extras["smart_momentum"])
  want = jax.tree.map(lambda m, p: 0.1 * p + 0.9 * m, m0, trainable_part(moved, labels))
  s0 = before_step(0, state)
  jax.tree.map(np.testing.assert_array_equal, s0.extras["smart_momentum"], m0)
  s1 = before_step(1, s0)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  jax.tree.map(close, s1.extras["smart_momentum"], want)
  assert not np.array_equal(s0.extras["smart_key"], s1.extras["smart_key"])  # fresh start noise each step


def test_smart_trains_through_the_stage_runner(tmp_path):
  from reft_jax.model import save_hf

  c, _, build, mesh, rules = _setup(
    tmp_path, **{"train.num_steps": 5, "smart.eps": 1e-2, "smart.sigma": 1e-2, "smart.eta": 1e-2}
  )
  user = data_load.read_examples(c)
  tok = data_load.get_tokenizer(c, str(tmp_path), user)
  base = str(tmp_path / "base")
  save_hf(build(), base, tok)
  env = stages.Env(c, mesh, rules, tok, base, str(tmp_path / "shared"))
  spec = smart.SMART.finetune(env, str(tmp_path / "cell"), base, user)  # from `base` (the aligned stage is SFT, tested)
  out = stages.run_stage(env, str(tmp_path / "cell"), spec).model_dir
  assert os.path.exists(os.path.join(out, "config.json")) and spec.record == {}
  rows = [json.loads(line) for line in open(tmp_path / "cell" / "smart" / "metrics.jsonl")]
  assert len(rows) == 5 and all(np.isfinite(r["loss"]) and r["smart_adv"] > 0 for r in rows)
  # w~ starts at the initial weights and lags behind them once they move.
  assert rows[-1]["loss"] < rows[0]["loss"] and rows[0]["smart_prox"] == 0.0 and rows[-1]["smart_prox"] > 1e-9


def _lora_graph_and_params(tmp_path):
  """A LoRA-mode tiny model whose lora_b are not zero (so every adapter has a gradient), its batch and
  trainable labels."""
  from reft_jax.optim import trainable_labels

  c, data, build, _, _ = _setup(tmp_path, **{"train.mode": "lora"})
  graphdef, params = split_model(build())
  key = iter(jax.random.split(jax.random.key(7), 64))
  flat = traverse_util.flatten_dict(params)
  flat = {
    k: (0.1 * jax.random.normal(next(key), v.shape, v.dtype) if k[-1] == "lora_b" else v) for k, v in flat.items()
  }
  params = traverse_util.unflatten_dict(flat)
  return c, data, graphdef, params, trainable_labels(params, "lora")


def test_booster_in_lora_mode_shifts_and_normalises_over_the_lora_weights_only(tmp_path):
  c, data, graphdef, params, labels = _lora_graph_and_params(tmp_path)
  batch = {"align": _tiny_batch(c, data), "harmful": {k: v[::-1] for k, v in _tiny_batch(c, data).items()}}
  lam, alpha = 5.0, 0.1
  part = trainable_part(params, labels)
  merged = lambda t: nnx.merge(graphdef, overlay(params, t))

  def mean(name):
    def f(t):
      s, n = batch_cross_entropy(merged(t), batch[name])
      return s / n

    return f

  # The official step: g_h, its norm and the shift over the trainable (LoRA) parameters only.
  g_f, g_h = jax.grad(mean("align"))(part), jax.grad(mean("harmful"))(part)
  norm = optax.global_norm(g_h)
  g_h2 = jax.grad(mean("harmful"))(jax.tree.map(lambda p, g: p - alpha * g / norm, part, g_h))
  want = jax.tree.map(lambda a, b, d: a + lam * (b - d), g_f, g_h, g_h2)

  def booster_mean(t):
    total, count, _ = booster.booster_loss(lam, alpha, "lora")(merged(t), batch, Context({}))
    return total / count

  got = jax.grad(booster_mean)(part)
  err = optax.global_norm(jax.tree.map(jnp.subtract, got, want))
  assert float(err) < 1e-4 * float(optax.global_norm(want))
  aux = booster.booster_loss(lam, alpha, "lora")(merged(part), batch, Context({}))[2]
  np.testing.assert_allclose(aux["harmful_grad_norm"], norm, rtol=1e-5)

  # Perturbing the frozen base weights too (a norm over all parameters) is a different gradient.
  def h_all(p):
    s, n = batch_cross_entropy(nnx.merge(graphdef, p), batch["harmful"])
    return s / n

  g_all = jax.grad(h_all)(params)
  n_all = optax.global_norm(g_all)
  assert float(n_all) > 1.01 * float(norm)
  shifted_all = jax.tree.map(lambda p, g: p - alpha * g / n_all, params, g_all)
  g_h2_all = trainable_part(jax.grad(h_all)(shifted_all), labels)
  assert float(optax.global_norm(jax.tree.map(jnp.subtract, g_h2_all, g_h2))) > 1e-2 * float(optax.global_norm(g_h2))


def _suite_env(tmp_path, **overrides):
  c, _, build, mesh, rules = _setup(tmp_path, **overrides)
  user = data_load.read_examples(c)
  tok = data_load.get_tokenizer(c, str(tmp_path), user)
  return stages.Env(c, mesh, rules, tok, str(tmp_path / "base"), str(tmp_path / "shared")), user, build


def test_booster_refuses_a_harmful_set_that_shares_prompts_with_the_attack(tmp_path):
  from reft_jax.config import ConfigError

  pool = "builtin:requests_train[0:20]"
  env, _, _ = _suite_env(
    tmp_path,
    **{
      "data.harmful_source": pool,
      "booster.harmful_source": "builtin:requests_train[15:30]",
      "reft.alignment": "builtin:requests_train[40:48]",
    },
  )
  env.c.data.attack = "harmful_mix"  # the attack draws from `pool` (after the user data was read)
  with pytest.raises(ConfigError) as err:
    booster.BOOSTER.align(env)
  msg = str(err.value)
  assert "booster.harmful_source" in msg and "data.harmful_source" in msg and "5 prompt" in msg
  assert "\n" not in msg
  # Disjoint: Booster trains on its own set, not on the attack's pool.
  env.c.booster.harmful_source = "builtin:requests_train[20:30]"
  spec = booster.BOOSTER.align(env)
  assert spec.name == "aligned_booster" and len(spec.data.parts["harmful"].data.tokens) == 10


def test_lisa_cycle_scales_the_published_ratio_to_the_run():
  from helpers import load_config_module

  demo = load_config_module().get_config("demo")
  l, steps = demo.lisa, demo.train.num_steps
  assert (l.k_align, l.k_user, l.min_cycles, steps) == (100, 900, 4, 300)
  ka, kf = lisa.lisa_cycle(l.k_align, l.k_user, steps, l.min_cycles)
  assert ka >= 1 and kf == 9 * ka and steps // (ka + kf) >= 4
  phases = [lisa.lisa_schedule(ka, kf)(s) for s in range(steps)]
  entries = sum(1 for s in range(steps) if phases[s] == 1 and (s == 0 or phases[s - 1] == 0))
  assert phases[0] == 1 and entries >= 4  # alignment first, as the official LisaTrainer
  # The official run (4,000 steps) keeps the published cycle; so does any longer one.
  assert lisa.lisa_cycle(100, 900, 4000, 4) == (100, 900)
  assert lisa.lisa_cycle(100, 900, 20000, 4) == (100, 900)
  assert lisa.lisa_cycle(100, 900, 40, 4) == (1, 9)
  # Too short for the exact ratio: each state still >= 1 step and min_cycles periods fit.
  assert lisa.lisa_cycle(100, 900, 20, 4) == (1, 4)
  assert lisa.lisa_cycle(1, 1, 2, 4) == (1, 1)
  assert lisa.lisa_cycle(0, 900, 300, 4) == (0, 900)  # no alignment state: nothing to scale


def test_lisa_state_anchors_the_trainable_weights_entering_each_state(tmp_path):
  from reft_jax.train import TrainState

  c, data, graphdef, params, labels = _lora_graph_and_params(tmp_path)
  state0 = lisa.lisa_state(params, labels, 2, 3, prox_after=0.1 * 50)
  extras, before_step = state0.extras, state0.before_step
  paths = traverse_util.flatten_dict(extras["anchor"])
  assert paths and all(k[-1] in ("lora_a", "lora_b") for k in paths)  # frozen weights: no anchor
  state = TrainState(jnp.zeros((), jnp.int32), params, None, extras)
  anchors, phases, prox = [], [], []
  for step in range(7):
    state = state.replace(params=jax.tree.map(lambda p: p + 1.0, state.params))  # the weights move
    state = before_step(step, state)
    anchors.append(float(jax.tree.leaves(state.extras["anchor"])[0].ravel()[0]))
    phases.append(int(state.extras["align_phase"]))
    prox.append(float(state.extras["prox_on"]))
  start = float(jax.tree.leaves(trainable_part(params, labels))[0].ravel()[0])
  assert phases == [1, 1, 0, 0, 0, 1, 1]
  # Snapshots at step 0 and on entering each state (steps 2 and 5): the weights before that step.
  assert [a - start for a in anchors] == pytest.approx([1, 1, 3, 3, 3, 6, 6])
  # Proximal term from step > 10% of the run (official: steps > 0.1 * total).
  assert prox == [0, 0, 0, 0, 0, 0, 1]


def test_lisa_trains_through_the_stage_runner_alternating_with_lora_anchors(tmp_path):
  from reft_jax.model import save_hf

  env, user, build = _suite_env(
    tmp_path,
    **{
      "train.mode": "lora",
      "train.num_steps": 12,
      "lisa.min_cycles": 2,
      "lisa.rho": 1.0,
      "reft.alignment": "builtin:requests_train[0:16]",
    },
  )
  save_hf(build(), env.base_path, env.tokenizer)
  spec = lisa.LISA.finetune(env, str(tmp_path / "cell"), env.base_path, user)
  out = stages.run_stage(env, str(tmp_path / "cell"), spec).model_dir
  assert os.path.exists(os.path.join(out, "config.json")) and spec.record == {"lisa": {"k_align": 1, "k_user": 5}}
  rows = [json.loads(line) for line in open(tmp_path / "cell" / "lisa" / "metrics.jsonl")]
  # 12 steps, min_cycles 2: K_a/K_f = 1/5 (the 1:9 ratio does not fit twice), alignment first.
  assert [int(r["align_phase"]) for r in rows] == [1, 0, 0, 0, 0, 0] * 2
  # Off for steps <= 1.2; then > 0 except on a state's first step (the anchor is the current weights).
  assert [r["proximal"] > 0 for r in rows] == [False, False] + [True] * 4 + [False, False] + [True] * 4


@pytest.mark.parametrize("how", ["sft_aligned", "vaccine", "booster"])
def test_every_alignment_stage_trains_with_the_teachers_optimisation(tmp_path, monkeypatch, how):
  """aligned / aligned_vaccine / aligned_booster get the ReFT teacher's alignment budget (teacher.*), not the
  fine-tuning stage's train.* (the published alignment runs at lr 5e-4 for 20 epochs, fine-tuning 1e-5)."""
  from reft_jax import defences
  from reft_jax.model import save_hf

  env, _, build = _suite_env(
    tmp_path,
    **{
      "data.harmful_source": "builtin:requests_train[0:10]",
      "booster.harmful_source": "builtin:requests_train[20:30]",
      "reft.alignment": "builtin:requests_train[40:48]",
      "train.lr": 1e-5,
      "train.num_steps": 7,
      "teacher.lr": 5e-4,
      "teacher.num_steps": 11,
      "teacher.batch_size": 6,
    },
  )
  save_hf(build(), env.base_path, env.tokenizer)
  seen = {}

  def stop(c, *args, **kw):
    seen.update(train=c.train)
    raise KeyboardInterrupt

  monkeypatch.setattr(stages, "train_stage", stop)
  monkeypatch.setattr(stages, "build_model", lambda *a, **k: build())
  with pytest.raises(KeyboardInterrupt):
    stages.run_stage(env, env.shared_dir, defences.get(how).align(env))
  assert (seen["train"].lr, seen["train"].num_steps, seen["train"].batch_size) == (5e-4, 11, 6)
  assert env.c.train.lr == 1e-5  # the caller's config is untouched
